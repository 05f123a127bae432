// Package streams runs stream event source mappings (Lambda's Kinesis
// event source): the stream tracker, which turns every enabled stream
// mapping into lease resources of the leasing service (gateway/lease), one
// per shard and parallelization lane, and the pollers, which hold those
// leases and invoke the mapping's function synchronously, strictly in
// order, with Kinesis's Lambda event.
//
// Mappings are gateway/esm's EventSourceMappings with stream set, read
// from (and, when their stream is deleted, disabled in) the KV bucket
// "esm". gateway/esm validates and stores them; this package runs them.
//
// Lanes. A mapping with ParallelizationFactor P reads every shard in P
// lanes: a record belongs to lane fnv32a(partition key) mod P, so records
// of one partition key stay in one lane and in order. Each lane is the
// lease resource "stream:<mapping uuid>:<shard id>:<lane>" with one slot.
//
// Parents first. A shard's lanes become resources only when every parent
// shard (parent and adjacent parent) that is still listed has all its
// lanes checkpointed at shard end, so records of one partition key are
// processed in order across a split or merge. A poller that reaches shard
// end checkpoints it (ShardEnded) and the tracker then drops the finished
// lane's resource and, when the parents are done, creates the children's.
//
// Checkpoints live in the KV bucket "checkpoints": "cp.<uuid>.<shard
// id>.<lane>" = {sequence, epoch, holder, ended, window}, where sequence
// is the stream sequence at or below which every record of the lane is
// done. Writes are compare-and-set, carry the writer's lease epoch and
// are fenced: a write with an epoch lower than the stored one, or from a
// holder whose lease.Check fails, is rejected, and a checkpoint never moves
// backward. A poller that gains a lane first claims its checkpoint with
// its epoch, so a stale holder's later writes fail.
//
// Starting positions. A lane that has no checkpoint starts at
// TRIM_HORIZON, at the mapping's timestamp (AT_TIMESTAMP) or, for LATEST,
// at the time the mapping was first seen ("origin.<uuid>" in the
// checkpoints bucket): a timestamp rather than "the end now" keeps LATEST
// exact for shards that appear later (children of a split start at their
// beginning, which is after that time).
//
// Batches and errors follow Lambda: a batch holds up to BatchSize records
// of one lane, gathered for up to MaximumBatchingWindowInSeconds and cut at
// the 6 MB payload limit (and, with a tumbling window, at the window's
// end). Throttles and platform errors back off exponentially without
// counting as retries. A function error retries the batch; with
// BisectBatchOnFunctionError a failing batch of more than one record is
// split in halves that are retried separately (a split is not a retry;
// the retries are counted per batch that cannot be split further or when
// bisecting is off). When MaximumRetryAttempts or MaximumRecordAgeInSeconds
// is exhausted the batch's metadata goes to OnFailure (Lambda's record
// with KinesisBatchInfo) and the checkpoint moves past it. With
// ReportBatchItemFailures the checkpoint moves up to the first failed item
// and the rest is retried.
package streams

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/esm"
	"skiff.dev/skiff/gateway/kinesis"
	"skiff.dev/skiff/gateway/lease"
	"skiff.dev/skiff/internal/errs"
)

// Record is one stored stream record as the pollers read it: Seq orders
// the records of a shard (strictly increasing, not necessarily
// contiguous).
type Record = kinesis.StoredRecord

// Streams is what the tracker and pollers need from the stream store
// (gateway/kinesis's *Store implements it, and Watcher).
type Streams interface {
	// Exists returns errs.NotFound when the stream does not exist.
	Exists(ctx context.Context, stream string) error
	// Shards lists every shard, closed ones too, with lineage; errs.NotFound
	// when the stream does not exist.
	Shards(ctx context.Context, stream string) ([]*skiffv1.Shard, error)
	// Read returns up to limit records of the shard with Seq > after;
	// shardEnd is true when the shard is closed and after is at or beyond
	// its last record.
	Read(ctx context.Context, stream, shardID string, after uint64, limit int) (recs []Record, shardEnd bool, err error)
	// SeqAt returns the "after" to start reading a shard at pos
	// (TRIM_HORIZON, LATEST or AT_TIMESTAMP with ts).
	SeqAt(ctx context.Context, stream, shardID, pos string, ts time.Time) (uint64, error)
}

// Watcher is optionally implemented by a Streams: a channel signalled
// (coalesced) when a stream gets records or its shards change.
type Watcher interface {
	Watch(ctx context.Context, stream string) (<-chan struct{}, error)
}

var (
	_ Streams = (*kinesis.Store)(nil)
	_ Watcher = (*kinesis.Store)(nil)
)

// Invoker runs a synchronous invoke through the front end (its
// InvokeSync).
type Invoker interface {
	InvokeSync(ctx context.Context, function string, payload []byte, requestID string) (*skiffv1.InvokeResponse, error)
}

// Destinations delivers OnFailure records. body is the complete JSON
// record; requestID names it (webhook header, FIFO deduplication).
type Destinations interface {
	DeliverJSON(ctx context.Context, target, requestID string, body []byte) error
}

// Names and defaults.
const (
	// ResourcePrefix starts the lease resource of a lane:
	// "stream:<uuid>:<shard id>:<lane>".
	ResourcePrefix = "stream:"
	// Bucket is the KV bucket of the checkpoints.
	Bucket = "checkpoints"

	DefaultPollInterval      = 200 * time.Millisecond
	DefaultShardSyncInterval = time.Second
	DefaultBackoff           = 100 * time.Millisecond
	DefaultMaxBackoff        = 10 * time.Second
	DefaultRetryDelay        = 100 * time.Millisecond
	DefaultMaxPayload        = 6 << 20
	DefaultMaxLeases         = 1024
	// maxRead bounds one Read.
	maxRead = 10000
)

// Config configures a Service; the zero value of every field means its
// default.
type Config struct {
	// Region and AccountID make the ARNs of the events (defaults "local"
	// and "000000000000").
	Region, AccountID string
	// Now is the clock (record age, windows, iterator age); nil means
	// time.Now.
	Now func() time.Time
	// After is the timer of backoffs, waits for records and batching
	// windows; nil means time.After.
	After  func(d time.Duration) <-chan time.Time
	Logger *slog.Logger
	// Registry receives the metrics; nil registers nothing.
	Registry prometheus.Registerer
	// PollInterval is how often an idle poller reads its shard (it is also
	// woken by the stream's Watch when the store has one).
	PollInterval time.Duration
	// ShardSyncInterval is how often the tracker lists the shards of every
	// mapping.
	ShardSyncInterval time.Duration
	// Backoff and MaxBackoff bound the exponential backoff after throttles
	// and platform errors.
	Backoff, MaxBackoff time.Duration
	// RetryDelay is the pause before retrying a batch the function failed.
	RetryDelay time.Duration
	// MaxPayload bounds the event of one invoke (the sync payload limit).
	MaxPayload int
	// MaxLeases bounds the lanes this gateway polls.
	MaxLeases int
}

func (c *Config) setDefaults() {
	if c.Region == "" {
		c.Region = "local"
	}
	if c.AccountID == "" {
		c.AccountID = "000000000000"
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.After == nil {
		c.After = time.After
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.PollInterval <= 0 {
		c.PollInterval = DefaultPollInterval
	}
	if c.ShardSyncInterval <= 0 {
		c.ShardSyncInterval = DefaultShardSyncInterval
	}
	if c.Backoff <= 0 {
		c.Backoff = DefaultBackoff
	}
	if c.MaxBackoff < c.Backoff {
		c.MaxBackoff = max(DefaultMaxBackoff, c.Backoff)
	}
	if c.RetryDelay < 0 {
		c.RetryDelay = 0
	} else if c.RetryDelay == 0 {
		c.RetryDelay = DefaultRetryDelay
	}
	if c.MaxPayload <= 0 {
		c.MaxPayload = DefaultMaxPayload
	}
	if c.MaxLeases <= 0 {
		c.MaxLeases = DefaultMaxLeases
	}
}

// Service is one gateway's stream tracker and stream pollers.
type Service struct {
	cfg    Config
	log    *slog.Logger
	esmKV  jetstream.KeyValue
	cps    *checkpoints
	data   Streams
	inv    Invoker
	dest   Destinations
	ls     *lease.Service
	holder string
	met    *metrics

	mu        sync.Mutex
	mappings  map[string]*skiffv1.EventSourceMapping // guarded by mu: stream mappings by uuid
	pollers   map[string]*poller                     // guarded by mu: running pollers by lease key
	lastDone  map[string]chan struct{}               // guarded by mu: by lease key, closed when the lane's last poller stopped
	wakes     map[string]chan struct{}               // guarded by mu: closed when a stream changes
	watches   map[string]context.CancelFunc          // guarded by mu: stream watchers
	running   bool                                   // guarded by mu
	runCtx    context.Context                        // guarded by mu
	closed    bool                                   // guarded by mu
	noRelease bool                                   // guarded by mu: tests simulate a crash
	pollerWG  sync.WaitGroup

	trigger chan struct{} // coalescing "resync the resources"
	keepNow chan struct{} // coalescing "tick the lease keeper now" (new lanes)

	closeOnce sync.Once
}

// New opens (creating them if needed) the "esm" and "checkpoints"
// buckets. holder names this gateway's pollers in the leasing service
// ("<gateway id>/streams"). dest may be nil: OnFailure targets are then
// logged and the batches dropped.
func New(ctx context.Context, js jetstream.JetStream, cfg Config, data Streams, inv Invoker, dest Destinations, ls *lease.Service, holder string) (*Service, error) {
	if js == nil || data == nil || inv == nil || ls == nil {
		return nil, errs.Invalid("", "streams: jetstream, streams, invoker and leases are required")
	}
	if holder == "" {
		return nil, errs.Invalid("holder", "streams: a lease holder name is required")
	}
	cfg.setDefaults()
	met, err := newMetrics(cfg.Registry)
	if err != nil {
		return nil, errs.Internal("registering stream metrics: %w", err)
	}
	ekv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      esm.Bucket,
		Description: "skiff event source mappings",
		History:     1,
		Storage:     jetstream.FileStorage,
	})
	if err != nil {
		return nil, errs.Unavailable("opening kv bucket %s: %w", esm.Bucket, err)
	}
	cps, err := openCheckpoints(ctx, js)
	if err != nil {
		return nil, err
	}
	return &Service{
		cfg:      cfg,
		log:      cfg.Logger.With("component", "streams", "holder", holder),
		esmKV:    ekv,
		cps:      cps,
		data:     data,
		inv:      inv,
		dest:     dest,
		ls:       ls,
		holder:   holder,
		met:      met,
		mappings: map[string]*skiffv1.EventSourceMapping{},
		pollers:  map[string]*poller{},
		lastDone: map[string]chan struct{}{},
		wakes:    map[string]chan struct{}{},
		watches:  map[string]context.CancelFunc{},
		trigger:  make(chan struct{}, 1),
		keepNow:  make(chan struct{}, 1),
	}, nil
}

// Close stops the pollers and keeps new ones from starting. Cancel Run's
// context first: Run releases the leases. It is safe to call twice.
func (s *Service) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		s.stopPollers()
	})
	return nil
}

// Run runs the tracker and this gateway's pollers until ctx ends: it
// watches the mappings, keeps the lane resources in line with them and
// their shards, and holds lanes through a lease keeper, running a poller
// for each. On return the leases are released and the pollers stopped.
func (s *Service) Run(ctx context.Context) error {
	s.mu.Lock()
	if s.running {
		s.mu.Unlock()
		return errs.New(errs.KindFailedPrecondition, "streams: Run is already running")
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s.running, s.runCtx = true, ctx
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.running, s.runCtx = false, nil
		for st, c := range s.watches {
			c()
			delete(s.watches, st)
		}
		s.mu.Unlock()
		s.stopPollers()
	}()

	w, err := s.esmKV.WatchAll(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return errs.Unavailable("watching kv bucket %s: %w", esm.Bucket, err)
	}
	defer func() { _ = w.Stop() }()
	if err := s.watchMappings(ctx, w, true); err != nil {
		return err
	}

	keeper := s.ls.NewKeeper(s.holder, s.cfg.MaxLeases, s.match, s.gained, s.lost)
	errc := make(chan error, 2)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		errc <- s.watchMappings(ctx, w, false)
	}()
	go func() {
		defer wg.Done()
		errc <- s.keep(ctx, keeper)
	}()
	err = s.trackLoop(ctx, errc)
	cancel()
	wg.Wait()
	return err
}

// keep ticks the keeper every lease interval, and at once when the
// tracker added lanes; when ctx ends it releases the leases (unless a test
// simulates a crash).
func (s *Service) keep(ctx context.Context, k *lease.Keeper) error {
	// A ticker, not a pause after each tick: a slow tick (many lanes, a
	// busy engine) must not push the next heartbeat toward the expiry.
	t := time.NewTicker(s.ls.Interval())
	defer t.Stop()
	for {
		if err := k.Tick(ctx); err != nil && ctx.Err() == nil {
			s.log.Warn("stream lease keeper tick failed", "err", err)
		}
		select {
		case <-ctx.Done():
			s.mu.Lock()
			crash := s.noRelease
			s.mu.Unlock()
			if !crash {
				s.stopPollers()
				rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.ls.Interval())
				k.ReleaseAll(rctx)
				cancel()
			}
			return nil
		case <-t.C:
		case <-s.keepNow:
		case <-k.Kicked():
		}
	}
}

// watchMappings applies watched mapping entries; with initial it returns
// at the end of the initial values.
func (s *Service) watchMappings(ctx context.Context, w jetstream.KeyWatcher, initial bool) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-w.Updates():
			if !ok {
				if ctx.Err() != nil {
					return nil
				}
				return errs.Unavailable("watching kv bucket %s: watcher closed", esm.Bucket)
			}
			if e == nil {
				if initial {
					return nil
				}
				continue
			}
			s.applyMapping(ctx, e)
		}
	}
}

func (s *Service) applyMapping(ctx context.Context, e jetstream.KeyValueEntry) {
	id := e.Key()
	var m *skiffv1.EventSourceMapping
	if e.Operation() == jetstream.KeyValuePut {
		m = &skiffv1.EventSourceMapping{}
		if err := proto.Unmarshal(e.Value(), m); err != nil {
			s.log.Error("skipping undecodable mapping", "uuid", id, "err", err)
			return
		}
		m.Revision = e.Revision()
		if m.GetStream() == "" {
			m = nil // a queue mapping: gateway/esm runs it
		}
	}
	s.mu.Lock()
	_, had := s.mappings[id]
	if m == nil {
		delete(s.mappings, id)
	} else {
		s.mappings[id] = m
	}
	s.mu.Unlock()
	if e.Operation() != jetstream.KeyValuePut && had {
		// Deleted: its checkpoints go too.
		if err := s.cps.purge(ctx, id); err != nil && ctx.Err() == nil {
			s.log.Warn("purging checkpoints of a deleted mapping", "uuid", id, "err", err)
		}
	}
	s.kick()
}

// kick triggers a resync of the resources.
func (s *Service) kick() {
	select {
	case s.trigger <- struct{}{}:
	default:
	}
}

func (s *Service) mapping(id string) *skiffv1.EventSourceMapping {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.mappings[id]
}

// match tells the lease keeper which resources this gateway polls: the
// lanes of enabled stream mappings it knows of.
func (s *Service) match(resource string) bool {
	r, ok := parseResource(resource)
	if !ok {
		return false
	}
	m := s.mapping(r.uuid)
	return m != nil && m.GetEnabled()
}

// lane identifies one lane of one shard of one mapping.
type lane struct {
	uuid, shard string
	n           int
}

func (l lane) resource() string {
	return ResourcePrefix + l.uuid + ":" + l.shard + ":" + strconv.Itoa(l.n)
}

func parseResource(r string) (lane, bool) {
	rest, ok := strings.CutPrefix(r, ResourcePrefix)
	if !ok {
		return lane{}, false
	}
	parts := strings.Split(rest, ":")
	if len(parts) != 3 {
		return lane{}, false
	}
	n, err := strconv.Atoi(parts[2])
	if err != nil || n < 0 {
		return lane{}, false
	}
	return lane{uuid: parts[0], shard: parts[1], n: n}, true
}

func (s *Service) gained(l lease.Lease) {
	ln, ok := parseResource(l.Resource)
	if !ok {
		return
	}
	s.mu.Lock()
	if !s.running || s.closed {
		s.mu.Unlock()
		return
	}
	if old := s.pollers[l.Key()]; old != nil {
		if old.lease.Epoch == l.Epoch {
			s.mu.Unlock()
			return
		}
		old.cancel()
	}
	// A lane is polled strictly in order: a new poller of the lane starts
	// only after the previous one on this gateway stopped.
	p := newPoller(s, s.runCtx, ln, l, s.lastDone[l.Key()])
	s.lastDone[l.Key()] = p.done
	s.pollers[l.Key()] = p
	s.pollerWG.Add(1)
	s.met.pollers.Set(float64(len(s.pollers)))
	s.mu.Unlock()
	s.log.Info("polling stream lane", "uuid", ln.uuid, "shard", ln.shard, "lane", ln.n, "epoch", l.Epoch)
	go p.run()
}

func (s *Service) lost(l lease.Lease) {
	s.mu.Lock()
	p := s.pollers[l.Key()]
	if p != nil && p.lease.Epoch == l.Epoch {
		delete(s.pollers, l.Key())
	} else {
		p = nil
	}
	s.met.pollers.Set(float64(len(s.pollers)))
	s.mu.Unlock()
	if p != nil {
		s.log.Info("stopped polling stream lane", "uuid", p.lane.uuid, "shard", p.lane.shard, "lane", p.lane.n, "epoch", l.Epoch)
		p.cancel()
	}
}

// dropPoller forgets a poller that stopped by itself.
func (s *Service) dropPoller(p *poller) {
	s.mu.Lock()
	if s.pollers[p.lease.Key()] == p {
		delete(s.pollers, p.lease.Key())
	}
	if s.lastDone[p.lease.Key()] == p.done {
		delete(s.lastDone, p.lease.Key())
	}
	s.met.pollers.Set(float64(len(s.pollers)))
	s.mu.Unlock()
}

func (s *Service) stopPollers() {
	s.mu.Lock()
	ps := make([]*poller, 0, len(s.pollers))
	for k, p := range s.pollers {
		ps = append(ps, p)
		delete(s.pollers, k)
	}
	s.met.pollers.Set(0)
	s.mu.Unlock()
	for _, p := range ps {
		p.cancel()
	}
	s.pollerWG.Wait()
}

// Held returns the lease resources of the lanes this gateway polls, for
// tests and status pages.
func (s *Service) Held() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.pollers))
	for _, p := range s.pollers {
		out = append(out, p.lease.Resource)
	}
	return out
}

// wakeCh returns the channel closed at the next change of stream.
func (s *Service) wakeCh(stream string) <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	ch := s.wakes[stream]
	if ch == nil {
		ch = make(chan struct{})
		s.wakes[stream] = ch
	}
	return ch
}

// wake wakes the pollers of stream.
func (s *Service) wake(stream string) {
	s.mu.Lock()
	ch := s.wakes[stream]
	delete(s.wakes, stream)
	s.mu.Unlock()
	if ch != nil {
		close(ch)
	}
}

// sleep waits for d, ctx or (when wake is not nil) a wake-up; it returns
// false when ctx ended.
func (s *Service) sleep(ctx context.Context, d time.Duration, wake <-chan struct{}) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	select {
	case <-ctx.Done():
		return false
	case <-s.cfg.After(d):
	case <-wake:
	}
	return true
}

// disable turns a mapping off because its stream is gone.
func (s *Service) disable(ctx context.Context, id, why string) error {
	for range 5 {
		e, err := s.esmKV.Get(ctx, id)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			return nil
		}
		if err != nil {
			return errs.Unavailable("reading mapping %s: %w", id, err)
		}
		m := &skiffv1.EventSourceMapping{}
		if err := proto.Unmarshal(e.Value(), m); err != nil {
			return errs.Internal("decoding mapping %s: %w", id, err)
		}
		if !m.GetEnabled() {
			return nil
		}
		m.Enabled = proto.Bool(false)
		m.State, m.Revision = "", 0
		m.LastModified = s.cfg.Now().UTC().Format(time.RFC3339Nano)
		b, err := proto.Marshal(m)
		if err != nil {
			return errs.Internal("encoding mapping %s: %w", id, err)
		}
		_, err = s.esmKV.Update(ctx, id, b, e.Revision())
		if errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			continue
		}
		if err != nil {
			return errs.Unavailable("disabling mapping %s: %w", id, err)
		}
		s.log.Warn("event source mapping disabled", "uuid", id, "stream", m.GetStream(), "why", why)
		return nil
	}
	return errs.Conflict("disabling mapping %s: too many concurrent updates", id)
}

// ARNs.

func (s *Service) streamARN(stream string) string {
	return fmt.Sprintf("arn:aws:kinesis:%s:%s:stream/%s", s.cfg.Region, s.cfg.AccountID, stream)
}

func (s *Service) functionARN(fn string) string {
	return fmt.Sprintf("arn:aws:lambda:%s:%s:function:%s", s.cfg.Region, s.cfg.AccountID, fn)
}

func (s *Service) identityARN() string {
	return fmt.Sprintf("arn:aws:iam::%s:role/skiff-event-source", s.cfg.AccountID)
}
