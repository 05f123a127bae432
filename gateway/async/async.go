// Package async is skiff's asynchronous invoke, as Lambda's: the accept
// path that stores an event durably before answering 202, the async queues
// (JetStream stream "ASYNC", shared subjects "async.shared.<n>" and
// dedicated per-function subjects "async.fn.<function>"), the event invoke
// configs (KV bucket "eventconfig") and the poller pool that runs events
// through the synchronous invoke path with Lambda's retry, event age,
// destination and dead-letter semantics.
//
// One file per concern:
//
//   - async.go: Config, names, headers, New.
//   - accept.go: Accept and InvokeAsync and the route of a function to its
//     queue (KV "asyncroutes").
//   - group.go: group commit (concurrent accepts of a queue stored as one
//     message, acknowledged together) and the dedupe of request ids.
//   - batch.go: the batch message that holds a group of events.
//   - eventconfig.go: the event invoke configs and their validation.
//   - queues.go: the durable consumer of each queue, queue statistics for
//     the state manager.
//   - pool.go: the pollers, one per held lease assignment.
//   - process.go: what a poller does with one event.
//
// An event is one JetStream message, or one of the events of a batch
// message (the accepts of a group, batch.go). A single event's headers
// carry the request id (the same for every attempt), the function, the
// time it was first accepted, the number of attempts made, the
// destination-chain depth and, for a retry, the time before which it must
// not run. A retry is a new message published with the next attempt number
// before the current one is acknowledged, so a crash between the two
// repeats an attempt but never loses the event (at-least-once). Platform
// errors (throttles, a lost agent) put the event back with a delay without
// counting an attempt. A batch message is acknowledged once every event in
// it is finished or handed on as a message of its own (a retry, or an
// event put back after a platform error); until then a crash redelivers
// the whole batch.
package async

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/uuid"
)

// Stream, subject and bucket names. They are fixed: other gateways, the
// state manager and the leasing service agree on them.
const (
	StreamName       = "ASYNC"
	SubjectPrefix    = "async."
	SharedPrefix     = "async.shared."
	DedicatedPrefix  = "async.fn."
	BucketConfigs    = "eventconfig"
	BucketRoutes     = "asyncroutes"
	ResourcePrefix   = "async:"
	dedicatedPattern = "async.fn.>"
)

// Message headers of an event.
const (
	HeaderRequestID = "Skiff-Request-Id"
	HeaderFunction  = "Skiff-Function"
	HeaderAccepted  = "Skiff-Accepted"   // RFC 3339 with nanoseconds, the first accept
	HeaderAttempt   = "Skiff-Attempt"    // attempts already made (0 for a new event)
	HeaderDepth     = "Skiff-Depth"      // destination-chain depth (0 for a client's invoke)
	HeaderNotBefore = "Skiff-Not-Before" // unix nanoseconds; absent: run at once
)

// Defaults of Config.
const (
	DefaultMaxPayload   = 1 << 20
	DefaultSharedQueues = 2
	DefaultRetryDelay   = time.Minute
	DefaultAckWait      = 30 * time.Second
	DefaultConcurrency  = 64
	DefaultDedupWindow  = 2 * time.Minute
	DefaultPlatformBase = 100 * time.Millisecond
	DefaultPlatformMax  = 5 * time.Second
	DefaultGroupEvents  = 256
	DefaultGroupBytes   = 4 << 20
	// maxGroupBytes keeps a batch message under the store's 8 MiB message
	// limit with room for headers.
	maxGroupBytes = 7 << 20
	// DefaultMaxRetries and DefaultMaxEventAge apply when a function has no
	// event invoke config (or leaves a field unset), as in Lambda.
	DefaultMaxRetries  = 2
	DefaultMaxEventAge = 6 * time.Hour
)

// Durability is when an accepted event is acknowledged.
type Durability string

// The durability settings.
const (
	// DurabilityAlways: JetStream fsyncs every write before it acks
	// (the store's SyncAlways); nothing acknowledged is lost even if the
	// host loses power.
	DurabilityAlways Durability = "always"
	// DurabilityInterval: JetStream writes every event to the OS before it
	// acks and fsyncs periodically (every 2 minutes by default): a process
	// crash loses nothing, a host crash or power loss can lose the events
	// accepted since the last sync.
	DurabilityInterval Durability = "interval"
)

// ParseDurability parses a --async-durability value ("" is always).
func ParseDurability(s string) (Durability, error) {
	switch Durability(s) {
	case "", DurabilityAlways:
		return DurabilityAlways, nil
	case DurabilityInterval:
		return DurabilityInterval, nil
	}
	return "", errs.Invalid("async_durability", "async durability %q is not always or interval", s)
}

// SyncAlways reports whether the store must fsync every write
// (store.Config.SyncAlways).
func (d Durability) SyncAlways() bool { return d != DurabilityInterval }

// Config configures a Service. Zero values take the defaults.
type Config struct {
	// MaxPayload bounds an async event's payload (default 1 MiB).
	MaxPayload int
	// SharedQueues is the number of shared async queues (default 2).
	SharedQueues int
	// RetryDelay is the backoff before the first retry of a failed
	// attempt; the second waits twice as long (default 1 minute, Lambda's).
	RetryDelay time.Duration
	// AckWait is how long a delivered event stays invisible without a sign
	// of progress; pollers signal progress while an invocation runs, so it
	// bounds only how fast the events of a dead poller come back (default
	// 30 s).
	AckWait time.Duration
	// Concurrency bounds the invocations one poller assignment runs at once
	// (default 64); admission still applies per function.
	Concurrency int
	// DedupWindow is how long a request id is remembered to drop a
	// duplicate accept (default 2 minutes).
	DedupWindow time.Duration
	// GroupEvents and GroupBytes bound the accepts stored together as one
	// message (defaults 256 events, 4 MiB; at most 7 MiB, and at least
	// MaxPayload plus headers so that any one event fits).
	GroupEvents, GroupBytes int
	// PlatformBase and PlatformMax bound the backoff after a platform error
	// (throttle, lost agent): it doubles with every redelivery from
	// PlatformBase up to PlatformMax (defaults 100 ms and 5 s).
	PlatformBase, PlatformMax time.Duration
	// Region and AccountID go into function ARNs in invocation records.
	Region, AccountID string
	// Registry receives the metrics (none when nil).
	Registry prometheus.Registerer
	Logger   *slog.Logger
	Now      func() time.Time
}

func (c *Config) setDefaults() error {
	def := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	if c.MaxPayload == 0 {
		c.MaxPayload = DefaultMaxPayload
	}
	if c.SharedQueues == 0 {
		c.SharedQueues = DefaultSharedQueues
	}
	if c.Concurrency == 0 {
		c.Concurrency = DefaultConcurrency
	}
	if c.GroupEvents == 0 {
		c.GroupEvents = DefaultGroupEvents
	}
	if c.GroupBytes == 0 {
		c.GroupBytes = max(DefaultGroupBytes, min(c.MaxPayload+64<<10, maxGroupBytes))
	}
	def(&c.RetryDelay, DefaultRetryDelay)
	def(&c.AckWait, DefaultAckWait)
	def(&c.DedupWindow, DefaultDedupWindow)
	def(&c.PlatformBase, DefaultPlatformBase)
	def(&c.PlatformMax, DefaultPlatformMax)
	if c.Region == "" {
		c.Region = "local"
	}
	if c.AccountID == "" {
		c.AccountID = "000000000000"
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	switch {
	case c.MaxPayload < 0 || c.MaxPayload > maxGroupBytes-64<<10:
		return fmt.Errorf("max payload %d is outside 0-%d", c.MaxPayload, maxGroupBytes-64<<10)
	case c.GroupEvents < 1 || c.GroupEvents > maxBatchEvents:
		return fmt.Errorf("group events %d is outside 1-%d", c.GroupEvents, maxBatchEvents)
	case c.GroupBytes < c.MaxPayload+64<<10 || c.GroupBytes > maxGroupBytes:
		return fmt.Errorf("group bytes %d is outside %d-%d (max payload plus 64 KiB to 7 MiB)", c.GroupBytes, c.MaxPayload+64<<10, maxGroupBytes)
	case c.SharedQueues < 1 || c.SharedQueues > 64:
		return fmt.Errorf("shared queues %d is outside 1-64", c.SharedQueues)
	case c.RetryDelay < 0 || c.AckWait < time.Second || c.DedupWindow < 0:
		return errors.New("retry delay must not be negative, ack wait at least 1s")
	case c.Concurrency < 1:
		return fmt.Errorf("concurrency %d is below 1", c.Concurrency)
	case c.PlatformBase <= 0 || c.PlatformMax < c.PlatformBase:
		return errors.New("platform backoff must be positive with max ≥ base")
	}
	return nil
}

// Service is the async invoke of one gateway: accept, event configs,
// routes and queues. Its methods are safe for concurrent use.
type Service struct {
	cfg    Config
	js     jetstream.JetStream
	stream jetstream.Stream
	log    *slog.Logger
	now    func() time.Time
	met    *metrics

	configs *kvCache // function → *skiffv1.EventInvokeConfig
	routes  *kvCache // function → dedicated subject

	consMu    sync.Mutex
	consumers map[string]jetstream.Consumer // guarded by consMu: subject → durable consumer

	lanesMu sync.Mutex
	lanes   map[string]*lane // guarded by lanesMu: subject → group commit lane

	dedup    *dedupIndex
	nc       *nats.Conn         // announcements of accepted ids (nil: none)
	instance string             // this Service's id in announcements
	dedupSub *nats.Subscription // nil until listening
}

// New creates (or opens) the ASYNC stream and the eventconfig and
// asyncroutes buckets and loads their caches.
func New(ctx context.Context, js jetstream.JetStream, cfg Config) (*Service, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, fmt.Errorf("async config: %w", err)
	}
	met, err := newMetrics(cfg.Registry)
	if err != nil {
		return nil, fmt.Errorf("registering async metrics: %w", err)
	}
	s := &Service{cfg: cfg, js: js, log: cfg.Logger.With("component", "async"), now: cfg.Now, met: met,
		consumers: map[string]jetstream.Consumer{}, lanes: map[string]*lane{},
		dedup: newDedupIndex(cfg.DedupWindow, cfg.Now), nc: js.Conn(), instance: uuid.New()}
	s.stream, err = js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:        StreamName,
		Description: "skiff async invoke queues",
		Subjects:    []string{SubjectPrefix + ">"},
		Retention:   jetstream.WorkQueuePolicy,
		Storage:     jetstream.FileStorage,
		Duplicates:  cfg.DedupWindow,
		MaxMsgSize:  int32(cfg.GroupBytes + 64<<10),
	})
	if err != nil {
		return nil, errs.Unavailable("opening stream %s: %w", StreamName, err)
	}
	cfgKV, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket: BucketConfigs, Description: "skiff event invoke configs", History: 1, Storage: jetstream.FileStorage,
	})
	if err != nil {
		return nil, errs.Unavailable("opening kv bucket %s: %w", BucketConfigs, err)
	}
	routeKV, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket: BucketRoutes, Description: "skiff async routes: functions with a dedicated queue", History: 1, Storage: jetstream.FileStorage,
	})
	if err != nil {
		return nil, errs.Unavailable("opening kv bucket %s: %w", BucketRoutes, err)
	}
	if s.configs, err = newKVCache(ctx, cfgKV, decodeConfig, s.log); err != nil {
		return nil, err
	}
	if s.routes, err = newKVCache(ctx, routeKV, decodeRoute, s.log); err != nil {
		s.configs.stop()
		return nil, err
	}
	if err := s.listen(); err != nil {
		s.configs.stop()
		s.routes.stop()
		return nil, errs.Unavailable("subscribing to %s: %w", dedupSubject, err)
	}
	return s, nil
}

// Close stops the caches' watchers. Pools must be stopped first.
func (s *Service) Close() error {
	s.configs.stop()
	s.routes.stop()
	if s.dedupSub != nil {
		_ = s.dedupSub.Unsubscribe()
	}
	return nil
}

// SharedSubject returns the subject of shared queue n.
func SharedSubject(n int) string { return SharedPrefix + strconv.Itoa(n) }

// DedicatedSubject returns the subject of a function's dedicated queue.
func DedicatedSubject(function string) string { return DedicatedPrefix + function }

// Resource returns the lease resource of a queue subject.
func Resource(subject string) string { return ResourcePrefix + subject }

// IsResource reports whether a lease resource is an async queue; it is the
// match function of the pool's lease keeper.
func IsResource(resource string) bool {
	_, ok := SubjectOf(resource)
	return ok
}

// SubjectOf returns the queue subject of a lease resource.
func SubjectOf(resource string) (string, bool) {
	if len(resource) <= len(ResourcePrefix) || resource[:len(ResourcePrefix)] != ResourcePrefix {
		return "", false
	}
	subj := resource[len(ResourcePrefix):]
	if len(subj) <= len(SubjectPrefix) || subj[:len(SubjectPrefix)] != SubjectPrefix {
		return "", false
	}
	return subj, true
}

// FunctionARN returns the ARN of a function as records carry it.
func (s *Service) FunctionARN(function string) string {
	return "arn:aws:lambda:" + s.cfg.Region + ":" + s.cfg.AccountID + ":function:" + function
}
