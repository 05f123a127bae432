// Package queue is skiff's customer queues with Amazon SQS semantics,
// stored in NATS JetStream: visibility timeouts, per-queue and per-message
// delays, enforced retention, a maximum message size, long polling,
// approximate receive counts, redrive to a dead-letter queue after a
// maximum number of receives and back again, purge, and FIFO queues with
// message groups (strict order per group, one batch in flight per group)
// and deduplication (by id or by content, within five minutes).
//
// The Manager serves the QueueService RPCs (Handler) and the same
// operations in-process (Send, Receive, Delete, ChangeVisibility,
// Attributes, Exists) for destinations, the async DLQ and event source
// pollers.
//
// # Storage
//
//   - KV bucket "queues": key = queue name, value = a queueRecord (JSON):
//     the proto-marshalled skiffv1.Queue (its config with every default
//     filled in) and Floor, the first stream sequence that belongs to this
//     incarnation of the queue. Purging a queue raises Floor; deleting and
//     re-creating a queue starts a new Floor, so leftovers of an earlier
//     incarnation are never delivered.
//   - Stream "QUEUES": every queue's messages, subject
//     "queue.<token>.m", where token is the name with ".fifo" written
//     "=fifo" (stream subjects and KV keys cannot hold the dot, and a
//     standard queue name cannot hold '='). One stream rather than one per
//     queue so that one headers-only watcher keeps every gateway's index
//     current; per-queue retention is enforced by this package with the
//     injected clock (expired messages are never returned and are deleted
//     by a sweeper), and the stream's MaxAge (15 days, beyond the longest
//     retention) is the engine's backstop. The data is a proto-marshalled
//     skiffv1.Message (id, body, md5, system and message attributes);
//     headers carry what the index needs (id, sent time, the time the
//     message first becomes visible, the FIFO group). FIFO deduplication
//     uses Nats-Msg-Id "<token>:<dedup id>" and the stream's 5 minute
//     duplicate window.
//   - KV bucket "queuestate": key "<token>.<seq>", the state of a message
//     that has been received (visible-at, receive count, first receive,
//     the nonce of the current receipt handle). A receive claims a message
//     with a compare-and-set on this key (revision 0 = never received; a
//     delete leaves a tombstone so a stale claim fails), so any number of
//     gateways can serve one queue without delivering a message twice
//     within its visibility timeout.
//
// Each Manager keeps an in-memory index of every queue's messages, fed by
// watchers on the three (and by its own writes, read-your-writes). The
// index is a hint: every receive is decided by the compare-and-set, and a
// message the index believes in but the stream no longer has is dropped
// when a claim finds it gone.
//
// Receipt handles are opaque (base64 of token, sequence and a random
// nonce) and bound to one receive: a later receive of the message makes
// the earlier handle stale (DeleteMessage and ChangeMessageVisibility then
// fail with FailedPrecondition, reason "stale_receipt_handle"). Deleting a
// message that is already gone succeeds.
//
// Decisions:
//   - DeleteQueue refuses (FailedPrecondition, "queue_in_use") while the
//     queue is another queue's dead-letter queue.
//   - A message moved to the dead-letter queue keeps its id, attributes and
//     original sent time (retention counts from it, as SQS does); it is
//     visible there at once. RedriveQueue moves the dead-letter queue's
//     messages that are not in flight, with a new sent time.
//   - Long polls wait in real time (the caller's wait), re-checking on
//     every change the watchers see and every PollInterval; message times
//     (visibility, delay, retention) use the injected clock.
//   - With several gateways and concurrent senders to one FIFO group, order
//     is the stream order; a receive on a gateway whose watcher has not yet
//     seen a message sent through another gateway may skip it until it
//     does.
package queue

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/uuid"
)

// Names of the buckets and the stream this package owns.
const (
	BucketQueues = "queues"
	BucketState  = "queuestate"
	StreamName   = "QUEUES"

	subjectRoot  = "queue"
	statePrefix  = "$KV." + BucketState + "."
	streamMaxAge = 15 * 24 * time.Hour
	dedupWindow  = 5 * time.Minute
	maxEnvelope  = 1 << 20
	// moveGuard hides a message being moved to another queue; if the mover
	// dies the message reappears and the move is retried (deduplicated).
	moveGuard = 30 * time.Second
)

// Limits and defaults (SQS's).
const (
	DefaultVisibility     = 30 * time.Second
	DefaultRetention      = 345600 * time.Second
	DefaultMaxMessageSize = 262144
	MaxBatchEntries       = 10
	MaxBatchBytes         = 262144
	MaxWaitSeconds        = 20
	MaxAttributes         = 10
)

// Message headers.
const (
	hdrID      = "Skiff-Id"
	hdrSent    = "Skiff-Sent"
	hdrVisible = "Skiff-Visible"
	hdrGroup   = "Skiff-Group"
)

// Config configures a Manager.
type Config struct {
	// Now is the clock for message times; nil means time.Now.
	Now func() time.Time
	// Logger; nil discards.
	Logger *slog.Logger
	// Registry receives the queue metrics; nil registers nothing.
	Registry prometheus.Registerer
	// Region and AccountID go into ARNs (defaults "local", "000000000000").
	Region, AccountID string
	// SweepInterval is how often expired messages are deleted (default 1s).
	SweepInterval time.Duration
	// PollInterval is how often a long poll re-checks time-based visibility
	// (default 50ms).
	PollInterval time.Duration
}

func (c *Config) setDefaults() {
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Region == "" {
		c.Region = "local"
	}
	if c.AccountID == "" {
		c.AccountID = "000000000000"
	}
	if c.SweepInterval <= 0 {
		c.SweepInterval = time.Second
	}
	if c.PollInterval <= 0 {
		c.PollInterval = 50 * time.Millisecond
	}
}

// Manager owns the customer queues. Its methods are safe for concurrent use.
type Manager struct {
	cfg Config
	log *slog.Logger
	js  jetstream.JetStream

	stream      jetstream.Stream
	stateStream jetstream.Stream
	queuesKV    jetstream.KeyValue
	stateKV     jetstream.KeyValue
	metrics     *metrics

	mu     sync.Mutex
	queues map[string]*queueMeta // by name; guarded by mu
	caches map[string]*qcache    // by token; guarded by mu
	// bodySeen is the highest sequence the message watcher delivered, and
	// gone the deleted sequences above it: the watcher's late copy of a
	// message deleted here first must not bring it back. guarded by mu.
	bodySeen uint64
	gone     map[uint64]struct{}
	changed  chan struct{} // closed on every index change; guarded by mu

	cancel    context.CancelFunc
	wg        sync.WaitGroup
	stops     []func()
	closeOnce sync.Once
}

// New creates or opens the queue storage, loads the index and starts the
// watchers and the retention sweeper. It returns once the index holds
// everything already stored.
func New(ctx context.Context, js jetstream.JetStream, cfg Config) (*Manager, error) {
	cfg.setDefaults()
	m := &Manager{
		cfg:     cfg,
		log:     cfg.Logger.With("component", "queue"),
		js:      js,
		queues:  map[string]*queueMeta{},
		caches:  map[string]*qcache{},
		gone:    map[uint64]struct{}{},
		changed: make(chan struct{}),
	}
	var err error
	m.metrics, err = newMetrics(cfg.Registry, m)
	if err != nil {
		return nil, err
	}
	m.queuesKV, err = js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      BucketQueues,
		Description: "skiff customer queue metadata",
		History:     1,
		Storage:     jetstream.FileStorage,
	})
	if err != nil {
		return nil, engineErr(err, "opening kv bucket %s", BucketQueues)
	}
	m.stateKV, err = js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      BucketState,
		Description: "skiff customer queue message receive state",
		History:     1,
		TTL:         streamMaxAge,
		Storage:     jetstream.FileStorage,
	})
	if err != nil {
		return nil, engineErr(err, "opening kv bucket %s", BucketState)
	}
	m.stateStream, err = js.Stream(ctx, "KV_"+BucketState)
	if err != nil {
		return nil, engineErr(err, "opening the stream of kv bucket %s", BucketState)
	}
	m.stream, err = js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:        StreamName,
		Description: "skiff customer queue messages",
		Subjects:    []string{subjectRoot + ".>"},
		Retention:   jetstream.LimitsPolicy,
		Discard:     jetstream.DiscardOld,
		MaxAge:      streamMaxAge,
		MaxMsgSize:  maxEnvelope,
		Duplicates:  dedupWindow,
		Storage:     jetstream.FileStorage,
		AllowDirect: true,
	})
	if err != nil {
		return nil, engineErr(err, "opening stream %s", StreamName)
	}
	wctx, cancel := context.WithCancel(context.Background())
	m.cancel = cancel
	if err := m.startWatchers(ctx, wctx); err != nil {
		_ = m.Close()
		return nil, err
	}
	m.wg.Add(1)
	go m.sweepLoop(wctx)
	return m, nil
}

// Close stops the watchers and the sweeper. The JetStream connection is
// the caller's.
func (m *Manager) Close() error {
	m.closeOnce.Do(func() {
		if m.cancel != nil {
			m.cancel()
		}
		for _, stop := range m.stops {
			stop()
		}
		m.wg.Wait()
	})
	return nil
}

func (m *Manager) now() time.Time { return m.cfg.Now() }

func (m *Manager) arn(name string) string {
	return "arn:aws:sqs:" + m.cfg.Region + ":" + m.cfg.AccountID + ":" + name
}

// token is the form of a queue name used in subjects and keys.
func token(name string) string { return strings.Replace(name, ".fifo", "=fifo", 1) }

func msgSubject(tok string) string { return subjectRoot + "." + tok + ".m" }

func stateKey(tok string, seq uint64) string { return tok + "." + strconv.FormatUint(seq, 10) }

// engineErr maps a JetStream error: context errors keep their kind,
// anything else is Unavailable.
func engineErr(err error, format string, args ...any) error {
	args = append(args, err)
	switch {
	case errors.Is(err, context.Canceled):
		return errs.New(errs.KindCanceled, format+": %w", args...)
	case errors.Is(err, context.DeadlineExceeded):
		return errs.New(errs.KindDeadlineExceeded, format+": %w", args...)
	}
	return errs.Unavailable(format+": %w", args...)
}

func isConflict(err error) bool {
	return errors.Is(err, jetstream.ErrKeyRevisionMismatch) || errors.Is(err, jetstream.ErrKeyExists)
}

func failedPrecondition(reason, format string, args ...any) error {
	return errs.New(errs.KindFailedPrecondition, format, args...).WithReason(reason)
}

// newID returns a random RFC 4122 version 4 UUID, SQS's message id form.
func newID() string { return uuid.New() }

func newNonce() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func ms(t time.Time) int64 { return t.UnixMilli() }

// queueFor returns the live queue named in field, or errs.Invalid for a bad
// name and errs.NotFound for a missing queue. A queue the index does not
// know (created through another gateway a moment ago) is read from the
// bucket.
func (m *Manager) queueFor(ctx context.Context, field, name string) (*queueMeta, error) {
	if err := validateName(field, name); err != nil {
		return nil, err
	}
	m.mu.Lock()
	q := m.queues[name]
	m.mu.Unlock()
	if q == nil {
		return m.readQueue(ctx, name)
	}
	if q.deleted {
		return nil, errs.NotFound("queue %q does not exist", name)
	}
	return q, nil
}

// Exists reports errs.NotFound unless the queue exists.
func (m *Manager) Exists(ctx context.Context, name string) error {
	_, err := m.queueFor(ctx, "queue", name)
	return err
}
