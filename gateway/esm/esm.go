// Package esm is skiff's queue event source mappings (Lambda's
// EventSourceMapping for SQS): the EventSourceService handler, the mappings
// in KV bucket "esm" (key = the mapping's UUID, value = the
// proto-marshalled skiffv1.EventSourceMapping), and the pollers that read
// batches from skiff queues and invoke functions synchronously with SQS's
// Lambda event shape.
//
// Pollers run under leases from the leasing service (gateway/lease): every
// enabled mapping is the lease resource "esm:<uuid>" with one or more slots
// (one per Config.ConcurrencyPerSlot of the mapping's maximum concurrency),
// so the pollers of a mapping are spread over the gateways and move to
// another gateway within the lease expiry when one dies. A slot runs up to
// its share of MaximumConcurrency concurrent batches: it starts with one
// poller, adds one for every non-empty batch while under its share, and
// drops back toward one when long polls come back empty or the function is
// throttled. Deleting messages after an invoke is fenced: the poller checks
// that it still holds its lease with the same epoch first, and a poller that
// lost it stops; the messages it did not delete come back after the queue's
// visibility timeout (processing is at-least-once, as in Lambda).
//
// Outcome of one batch (Lambda's rules):
//
//   - success: every message is deleted; with ReportBatchItemFailures the
//     response {"batchItemFailures":[{"itemIdentifier":"<messageId>"}]}
//     names the messages to keep, and an unparsable or invalid response
//     (an empty, missing or unknown itemIdentifier, a response that is not
//     a JSON object) fails the whole batch;
//   - function error (or timeout): nothing is deleted; the messages come
//     back after the visibility timeout and reach the queue's dead-letter
//     queue after its max receive count;
//   - throttle or platform error: the poller backs off exponentially
//     (Config.Backoff up to Config.MaxBackoff) and makes the batch visible
//     again after the backoff. As in Lambda each such receive counts toward
//     the queue's max receive count, so give queues with a dead-letter
//     queue a max receive count of 5 or more.
//
// Stream mappings (stream set instead of queue: Lambda's Kinesis event
// source) are validated and stored here too, with their own fields and
// defaults (starting position, batch size 1-10000 defaulting to 100,
// parallelization factor, bisect, retries, record age, OnFailure through
// Config.Destinations, tumbling window); stream-only fields on a queue
// mapping and MaximumConcurrency on a stream mapping are refused naming
// the field. This package's pollers ignore them: gateway/streams runs
// them.
//
// The package reaches queues, functions, invokes and leases through the
// small Queues, Functions, Invoker and leaser interfaces; New wires the real
// *lease.Service.
package esm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/lease"
	"skiff.dev/skiff/internal/errs"
)

// Queues is what the pollers and the handler need from the customer queues
// (gateway/queue's *queue.Manager implements it).
type Queues interface {
	// Exists returns errs.NotFound when the queue does not exist.
	Exists(ctx context.Context, name string) error
	Receive(ctx context.Context, req *skiffv1.ReceiveMessageRequest) ([]*skiffv1.Message, error)
	Delete(ctx context.Context, queue, receiptHandle string) error
	ChangeVisibility(ctx context.Context, queue, receiptHandle string, d time.Duration) error
	Attributes(ctx context.Context, name string) (*skiffv1.GetQueueAttributesResponse, error)
}

// Functions is what the handler needs to know about functions.
type Functions interface {
	// Exists returns errs.NotFound when the function does not exist.
	Exists(ctx context.Context, name string) error
}

// Invoker runs a synchronous invoke through the front end's admission and
// router path (the front end's InvokeSync).
type Invoker interface {
	InvokeSync(ctx context.Context, function string, payload []byte, requestID string) (*skiffv1.InvokeResponse, error)
}

// Names and defaults.
const (
	// Bucket is the KV bucket of the mappings.
	Bucket = "esm"
	// ResourcePrefix starts the lease resource of a mapping: "esm:<uuid>".
	ResourcePrefix = "esm:"

	DefaultConcurrencyPerSlot    = 1000
	DefaultUnboundedConcurrency  = 1000
	DefaultMaxSlots              = 256
	DefaultPollWait              = 20 * time.Second
	DefaultBackoff               = time.Second
	DefaultMaxBackoff            = 30 * time.Second
	DefaultMaxPayload            = 6 << 20
	DefaultReconcileInterval     = 30 * time.Second
	defaultDeleteParallelism     = 8
	maxReceivePerCall            = 10
	maxMessageEstimate           = 256<<10 + 4<<10 // a maximal SQS message and its record fields
	reportBatchItemFailures      = "ReportBatchItemFailures"
	eventSourceSQS               = "aws:sqs"
	defaultBatchSize             = 10
	maxBatchSize                 = 10000
	maxBatchSizeWithoutWindow    = 10
	maxBatchingWindowSeconds     = 300
	minMaximumConcurrency        = 2
	maxMaximumConcurrency        = 1000
	stateEnabled, stateDisabled  = "Enabled", "Disabled"
	maxQueueNameLen, maxFnLength = 80, 64
)

// Config configures a Service. The zero value of every field means its
// default.
type Config struct {
	// Region and AccountID make the events' awsRegion and, when the queue
	// service does not report a queue's ARN, its eventSourceARN (defaults
	// "local" and "000000000000", as the other gateway services).
	Region, AccountID string
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// After is the timer used for backoffs and batching windows; nil means
	// time.After.
	After  func(d time.Duration) <-chan time.Time
	Logger *slog.Logger
	// Registry receives the metrics; nil registers nothing.
	Registry prometheus.Registerer

	// ConcurrencyPerSlot is how much of a mapping's maximum concurrency one
	// lease slot runs: a mapping gets ceil(MaximumConcurrency /
	// ConcurrencyPerSlot) slots, each with its share of the concurrency.
	// The leasing service gives one holder at most one slot of a resource,
	// so slots spread a mapping over gateways; with more slots than
	// gateways some stay unheld (the bound holds, the capacity is lower).
	// The default (1000, the largest MaximumConcurrency) gives every
	// mapping one slot: it runs on one gateway and moves on failure.
	ConcurrencyPerSlot int
	// UnboundedConcurrency is the poller bound of a mapping without a
	// MaximumConcurrency (the function's own concurrency limits still
	// apply through admission).
	UnboundedConcurrency int
	// MaxSlots bounds the lease slots this gateway holds.
	MaxSlots int
	// PollWait is the long-poll wait of an idle poller's receive (whole
	// seconds, at most 20).
	PollWait time.Duration
	// Backoff and MaxBackoff bound the exponential backoff after throttles
	// and platform errors.
	Backoff, MaxBackoff time.Duration
	// MaxPayload bounds the event of one invoke (the sync payload limit).
	MaxPayload int
	// ReconcileInterval is how often Run re-checks the lease resources
	// against the stored mappings besides reacting to changes.
	ReconcileInterval time.Duration

	// Streams checks that the stream of a stream mapping exists
	// (gateway/kinesis's *Store); nil refuses stream mappings. Stream
	// mappings are stored here but run by gateway/streams.
	Streams StreamChecker
	// Destinations validates the OnFailure target of stream mappings
	// (gateway/destinations' *Writer); nil refuses on_failure.
	Destinations TargetValidator
}

// StreamChecker is what the handler needs to know about streams.
type StreamChecker interface {
	// Exists returns errs.NotFound when the stream does not exist.
	Exists(ctx context.Context, stream string) error
}

// TargetValidator checks a destination target ("queue:NAME", a URL).
type TargetValidator interface {
	Validate(ctx context.Context, target string) error
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
	if c.ConcurrencyPerSlot <= 0 {
		c.ConcurrencyPerSlot = DefaultConcurrencyPerSlot
	}
	if c.UnboundedConcurrency <= 0 {
		c.UnboundedConcurrency = DefaultUnboundedConcurrency
	}
	if c.MaxSlots <= 0 {
		c.MaxSlots = DefaultMaxSlots
	}
	if c.PollWait <= 0 {
		c.PollWait = DefaultPollWait
	}
	if c.PollWait > 20*time.Second {
		c.PollWait = 20 * time.Second
	}
	if c.Backoff <= 0 {
		c.Backoff = DefaultBackoff
	}
	if c.MaxBackoff <= 0 {
		c.MaxBackoff = DefaultMaxBackoff
	}
	if c.MaxBackoff < c.Backoff {
		c.MaxBackoff = c.Backoff
	}
	if c.MaxPayload <= 0 {
		c.MaxPayload = DefaultMaxPayload
	}
	if c.ReconcileInterval <= 0 {
		c.ReconcileInterval = DefaultReconcileInterval
	}
}

// Service is the event source mapping service of one gateway: the handler
// and, while Run runs, this gateway's pollers.
type Service struct {
	cfg    Config
	log    *slog.Logger
	kv     jetstream.KeyValue
	q      Queues
	fns    Functions
	inv    Invoker
	ls     leaser
	holder string
	met    *metrics

	// writeMu serializes this gateway's create and update checks (a
	// duplicate queue+function pair, a revision) with their writes.
	writeMu sync.Mutex

	mu       sync.Mutex
	mappings map[string]*skiffv1.EventSourceMapping // guarded by mu: the watched mappings by uuid
	slots    map[string]*slotRunner                 // guarded by mu: running slots by lease key
	running  bool                                   // guarded by mu: Run is running
	runCtx   context.Context                        // guarded by mu: Run's context, the parent of the slots'
	closed   bool                                   // guarded by mu: Close was called
	runners  sync.WaitGroup                         // the slot runners

	trigger chan struct{} // coalescing "mappings changed" signal for reconcile

	closeOnce sync.Once
}

// New opens (creating if needed) the "esm" bucket. holder names this
// gateway's pollers in the leasing service and must be unique among live
// holders (for example "<gateway id>/esm").
func New(ctx context.Context, js jetstream.JetStream, cfg Config, q Queues, fns Functions, inv Invoker, ls *lease.Service, holder string) (*Service, error) {
	if ls == nil {
		return nil, errs.Invalid("", "esm: the leasing service is required")
	}
	return newService(ctx, js, cfg, q, fns, inv, leaseService{ls}, holder)
}

func newService(ctx context.Context, js jetstream.JetStream, cfg Config, q Queues, fns Functions, inv Invoker, ls leaser, holder string) (*Service, error) {
	if js == nil || q == nil || fns == nil || inv == nil || ls == nil {
		return nil, errs.Invalid("", "esm: jetstream, queues, functions, invoker and leases are required")
	}
	if holder == "" {
		return nil, errs.Invalid("holder", "esm: a lease holder name is required")
	}
	cfg.setDefaults()
	met, err := newMetrics(cfg.Registry)
	if err != nil {
		return nil, err
	}
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      Bucket,
		Description: "skiff event source mappings",
		History:     1,
		Storage:     jetstream.FileStorage,
	})
	if err != nil {
		return nil, errs.Unavailable("opening kv bucket %s: %w", Bucket, err)
	}
	return &Service{
		cfg:      cfg,
		log:      cfg.Logger.With("component", "esm", "holder", holder),
		kv:       kv,
		q:        q,
		fns:      fns,
		inv:      inv,
		ls:       ls,
		holder:   holder,
		met:      met,
		mappings: map[string]*skiffv1.EventSourceMapping{},
		slots:    map[string]*slotRunner{},
		trigger:  make(chan struct{}, 1),
	}, nil
}

// Close stops the pollers and keeps new ones from starting; Run keeps
// watching (and holding leases) until its context ends, so cancel that
// first. It is safe to call twice.
func (s *Service) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		s.stopAllSlots()
	})
	return nil
}

// Run runs this gateway's part of the pollers until ctx ends: it watches
// the mappings, keeps the lease resources ("esm:<uuid>", slots by
// concurrency; removed when a mapping is disabled or deleted) in line with
// them, holds slots through a lease keeper and runs a poller group for
// every slot it holds. It returns nil when ctx ends, after the pollers
// stopped, or the error that stopped it.
func (s *Service) Run(ctx context.Context) error {
	s.mu.Lock()
	if s.running {
		s.mu.Unlock()
		return errs.New(errs.KindFailedPrecondition, "esm: Run is already running")
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s.running = true
	s.runCtx = ctx
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.running = false
		s.runCtx = nil
		s.mu.Unlock()
		s.stopAllSlots()
	}()

	w, err := s.kv.WatchAll(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return errs.Unavailable("watching kv bucket %s: %w", Bucket, err)
	}
	defer func() { _ = w.Stop() }()

	// The initial values, up to the nil marker, before anything else: the
	// keeper's match and the reconcile need them.
	if err := s.loadInitial(ctx, w); err != nil {
		return err
	}
	errc := make(chan error, 2)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		errc <- s.watchLoop(ctx, w)
	}()
	go func() {
		defer wg.Done()
		err := s.ls.Keep(ctx, s.holder, s.cfg.MaxSlots, s.match, s.gained, s.lost)
		if ctx.Err() != nil {
			err = nil
		}
		errc <- err
	}()
	err = s.reconcileLoop(ctx, errc)
	cancel()
	wg.Wait()
	return err
}

func (s *Service) loadInitial(ctx context.Context, w jetstream.KeyWatcher) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-w.Updates():
			if !ok {
				return errs.Unavailable("watching kv bucket %s: watcher closed", Bucket)
			}
			if e == nil {
				return nil
			}
			s.apply(e)
		}
	}
}

func (s *Service) watchLoop(ctx context.Context, w jetstream.KeyWatcher) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-w.Updates():
			if !ok {
				if ctx.Err() != nil {
					return nil
				}
				return errs.Unavailable("watching kv bucket %s: watcher closed", Bucket)
			}
			if e != nil {
				s.apply(e)
			}
		}
	}
}

// apply updates the cache with one watched entry, tells the slots of the
// mapping and triggers a reconcile.
func (s *Service) apply(e jetstream.KeyValueEntry) {
	id := e.Key()
	var m *skiffv1.EventSourceMapping
	if e.Operation() == jetstream.KeyValuePut {
		var err error
		m, err = decodeMapping(e.Value(), e.Revision())
		if err != nil {
			s.log.Error("skipping undecodable mapping", "uuid", id, "err", err)
			return
		}
	}
	s.mu.Lock()
	if m == nil {
		delete(s.mappings, id)
	} else {
		s.mappings[id] = m
	}
	var affected []*slotRunner
	for _, r := range s.slots {
		if r.uuid == id {
			affected = append(affected, r)
		}
	}
	s.mu.Unlock()
	for _, r := range affected {
		r.notify()
	}
	select {
	case s.trigger <- struct{}{}:
	default:
	}
}

// mapping returns the watched mapping (nil when it is gone). The result is
// shared: callers must not mutate it.
func (s *Service) mapping(id string) *skiffv1.EventSourceMapping {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.mappings[id]
}

// match tells the lease keeper which resources this gateway polls: the
// enabled mappings it knows of.
func (s *Service) match(resource string) bool {
	id, ok := strings.CutPrefix(resource, ResourcePrefix)
	if !ok {
		return false
	}
	m := s.mapping(id)
	return m != nil && m.GetEnabled() && m.GetStream() == ""
}

func (s *Service) reconcileLoop(ctx context.Context, errc <-chan error) error {
	for {
		if err := s.reconcile(ctx); err != nil && ctx.Err() == nil {
			s.log.Warn("reconciling lease resources", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case err := <-errc:
			return err
		case <-s.trigger:
		case <-s.cfg.After(s.cfg.ReconcileInterval):
		}
	}
}

// reconcile sets the lease resources to what the mappings want: slots for
// every enabled mapping, none for disabled, deleted or unknown ones.
func (s *Service) reconcile(ctx context.Context) error {
	s.mu.Lock()
	want := make(map[string]int, len(s.mappings))
	for id, m := range s.mappings {
		if m.GetEnabled() && m.GetStream() == "" {
			want[ResourcePrefix+id] = s.slotCount(m)
		}
	}
	s.mu.Unlock()
	have, err := s.ls.Resources(ctx)
	if err != nil {
		return err
	}
	var errList []error
	for res, n := range want {
		if have[res] != n {
			if err := s.ls.SetDesired(ctx, res, n); err != nil {
				errList = append(errList, fmt.Errorf("setting %d slots for %s: %w", n, res, err))
			}
		}
	}
	for res := range have {
		if _, ok := want[res]; !ok && strings.HasPrefix(res, ResourcePrefix) {
			if err := s.ls.RemoveResource(ctx, res); err != nil {
				errList = append(errList, fmt.Errorf("removing %s: %w", res, err))
			}
		}
	}
	return errors.Join(errList...)
}

// concurrency is the bound on concurrent batches of a mapping.
func (s *Service) concurrency(m *skiffv1.EventSourceMapping) int {
	if m.MaximumConcurrency != nil {
		return int(m.GetMaximumConcurrency())
	}
	return s.cfg.UnboundedConcurrency
}

// slotCount is the number of lease slots of a mapping.
func (s *Service) slotCount(m *skiffv1.EventSourceMapping) int {
	c := s.concurrency(m)
	return (c + s.cfg.ConcurrencyPerSlot - 1) / s.cfg.ConcurrencyPerSlot
}

// share is slot's part of the mapping's concurrency: the parts of all
// slots add up to exactly the mapping's bound; a slot beyond the count
// (being dropped) gets none.
func (s *Service) share(m *skiffv1.EventSourceMapping, slot int) int {
	c, n := s.concurrency(m), s.slotCount(m)
	if slot < 0 || slot >= n {
		return 0
	}
	sh := c / n
	if slot < c%n {
		sh++
	}
	return sh
}

func (s *Service) gained(l heldSlot) {
	id, ok := strings.CutPrefix(l.Resource, ResourcePrefix)
	if !ok {
		return
	}
	s.mu.Lock()
	if !s.running || s.closed {
		s.mu.Unlock()
		return
	}
	if old := s.slots[l.Key]; old != nil {
		if old.lease.Epoch == l.Epoch {
			s.mu.Unlock()
			return
		}
		old.cancel()
	}
	r := newSlotRunner(s, s.runCtx, id, l)
	s.slots[l.Key] = r
	s.runners.Add(1)
	s.met.assignments.Set(float64(len(s.slots)))
	s.mu.Unlock()
	s.log.Info("polling mapping", "uuid", id, "slot", l.Slot, "epoch", l.Epoch)
	r.start()
}

func (s *Service) lost(l heldSlot) {
	s.mu.Lock()
	r := s.slots[l.Key]
	if r != nil && r.lease.Epoch == l.Epoch {
		delete(s.slots, l.Key)
	} else {
		r = nil
	}
	s.met.assignments.Set(float64(len(s.slots)))
	s.mu.Unlock()
	if r != nil {
		s.log.Info("stopped polling mapping", "uuid", r.uuid, "slot", l.Slot, "epoch", l.Epoch)
		r.cancel()
	}
}

// dropSlot forgets a runner that stopped by itself (its lease check
// failed).
func (s *Service) dropSlot(r *slotRunner) {
	s.mu.Lock()
	if s.slots[r.lease.Key] == r {
		delete(s.slots, r.lease.Key)
	}
	s.met.assignments.Set(float64(len(s.slots)))
	s.mu.Unlock()
}

func (s *Service) stopAllSlots() {
	s.mu.Lock()
	runners := make([]*slotRunner, 0, len(s.slots))
	for k, r := range s.slots {
		runners = append(runners, r)
		delete(s.slots, k)
	}
	s.met.assignments.Set(0)
	s.mu.Unlock()
	for _, r := range runners {
		r.cancel()
	}
	s.runners.Wait()
}

// Held returns the lease keys of the slots this gateway polls, for tests
// and status pages.
func (s *Service) Held() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.slots))
	for k := range s.slots {
		out = append(out, k)
	}
	return out
}
