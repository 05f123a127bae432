package async

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/destinations"
	"skiff.dev/skiff/gateway/lease"
)

// SyncInvoker runs one synchronous invocation through the front end's
// admission and router path (frontend.Frontend.InvokeSync). A function
// error is a response with FunctionError set; an error is a platform or
// caller error with an errs kind.
type SyncInvoker interface {
	InvokeSync(ctx context.Context, function string, payload []byte, requestID string) (*skiffv1.InvokeResponse, error)
}

// Destinations delivers invocation records (destinations.Writer).
type Destinations interface {
	Deliver(ctx context.Context, target string, depth int, rec *destinations.Record) error
}

// DLQ sends a failed event's original payload to a dead-letter queue (the
// composition root adapts gateway/queue).
type DLQ interface {
	Send(ctx context.Context, queueName string, body []byte, attrs map[string]string) error
}

// Fence checks that a lease is still held by its holder at its epoch
// (lease.Service.Check); acknowledgements are made only after it passes.
type Fence interface {
	Check(ctx context.Context, l lease.Lease) error
}

// Runner runs until ctx ends (a lease.Keeper).
type Runner interface {
	Run(ctx context.Context) error
}

// Pool is one gateway's async pollers: one poller per held assignment
// (lease of resource "async:<queue subject>").
type Pool struct {
	s     *Service
	inv   SyncInvoker
	dest  Destinations
	dlq   DLQ
	fence Fence

	work   context.Context // invocations run under it; canceled by Close
	cancel context.CancelFunc

	mu      sync.Mutex
	pollers map[string]*poller // guarded by mu: lease key → poller
	closed  bool               // guarded by mu
}

// poller polls one queue under one lease.
type poller struct {
	lease   lease.Lease
	subject string
	cancel  context.CancelFunc // ends the fetch context
	done    chan struct{}      // closed when the poller and its events are done

	mu sync.Mutex
	it jetstream.MessagesContext // guarded by mu: the open iterator, if any
}

// stop stops fetching at once (the iterator is closed before stop
// returns, so an event given back afterwards is not fetched again by this
// poller); events in flight finish.
func (pl *poller) stop() {
	pl.cancel()
	pl.mu.Lock()
	it := pl.it
	pl.mu.Unlock()
	if it != nil {
		stopIterator(it)
	}
}

// stopIterator stops an iterator and waits (briefly) until it has
// unsubscribed: until then JetStream may still hand its pending pull
// request an event, which would then wait out the ack wait.
func stopIterator(it jetstream.MessagesContext) {
	it.Stop()
	if c, ok := it.(interface{ Closed() <-chan struct{} }); ok {
		select {
		case <-c.Closed():
		case <-time.After(time.Second):
		}
	}
}

// setIterator records the open iterator; false when the poller is
// already stopped (then the iterator is stopped).
func (pl *poller) setIterator(ctx context.Context, it jetstream.MessagesContext) bool {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if ctx.Err() != nil {
		stopIterator(it)
		return false
	}
	pl.it = it
	return true
}

// NewPool returns a pool; dest and dlq may be nil (records and dead
// letters then count as failed deliveries).
func (s *Service) NewPool(inv SyncInvoker, dest Destinations, dlq DLQ, fence Fence) *Pool {
	work, cancel := context.WithCancel(context.Background())
	return &Pool{s: s, inv: inv, dest: dest, dlq: dlq, fence: fence, work: work, cancel: cancel, pollers: map[string]*poller{}}
}

// Gained starts polling the queue of a lease (the keeper's gained
// callback). Leases of other resources are ignored.
func (p *Pool) Gained(l lease.Lease) {
	subject, ok := SubjectOf(l.Resource)
	if !ok {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	if old, ok := p.pollers[l.Key()]; ok {
		old.stop()
		p.s.met.assignments.Dec()
	}
	fetch, cancel := context.WithCancel(p.work)
	pl := &poller{lease: l, subject: subject, cancel: cancel, done: make(chan struct{})}
	p.pollers[l.Key()] = pl
	p.s.met.assignments.Inc()
	p.s.log.Info("async poller started", "queue", subject, "lease", l.String())
	go p.run(fetch, pl)
}

// Lost stops the poller of a lease (the keeper's lost callback): it
// fetches nothing more at once; events in flight finish, but their acks
// are fenced and so refused, and the events come back to the new holder.
func (p *Pool) Lost(l lease.Lease) {
	p.mu.Lock()
	pl, ok := p.pollers[l.Key()]
	if ok && pl.lease.Epoch == l.Epoch {
		delete(p.pollers, l.Key())
	} else {
		ok = false
	}
	p.mu.Unlock()
	if ok {
		pl.stop()
		p.s.met.assignments.Dec()
		p.s.log.Info("async poller stopped", "queue", pl.subject, "lease", l.String())
	}
}

// Run runs the keeper that feeds the pool until ctx ends. Then the pollers
// stop fetching, the events in flight finish (for at most drain) while the
// leases are still held, and only then the keeper releases the leases.
func (p *Pool) Run(ctx context.Context, keeper Runner, drain time.Duration) error {
	kctx, kcancel := context.WithCancel(context.WithoutCancel(ctx))
	kdone := make(chan error, 1)
	go func() { kdone <- keeper.Run(kctx) }()
	select {
	case err := <-kdone:
		kcancel()
		p.Close()
		return err
	case <-ctx.Done():
	}
	p.drain(drain)
	kcancel()
	err := <-kdone
	p.Close()
	return err
}

// drain stops fetching and waits up to d for events in flight.
func (p *Pool) drain(d time.Duration) {
	p.mu.Lock()
	pls := make([]*poller, 0, len(p.pollers))
	for _, pl := range p.pollers {
		pl.stop()
		pls = append(pls, pl)
	}
	p.mu.Unlock()
	deadline := time.NewTimer(d)
	defer deadline.Stop()
	for _, pl := range pls {
		select {
		case <-pl.done:
		case <-deadline.C:
			return
		}
	}
}

// Close stops every poller and cancels the invocations in flight, and
// waits for them to end.
func (p *Pool) Close() {
	p.mu.Lock()
	p.closed = true
	pls := make([]*poller, 0, len(p.pollers))
	for k, pl := range p.pollers {
		pl.stop()
		pls = append(pls, pl)
		delete(p.pollers, k)
		p.s.met.assignments.Dec()
	}
	p.mu.Unlock()
	p.cancel()
	for _, pl := range pls {
		<-pl.done
	}
}

// Polling reports the queue subjects the pool polls now.
func (p *Pool) Polling() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]string, 0, len(p.pollers))
	for _, pl := range p.pollers {
		out = append(out, pl.subject)
	}
	return out
}

// run fetches events of pl's queue until fetch ends, each processed in
// its own goroutine, at most Concurrency at once.
func (p *Pool) run(fetch context.Context, pl *poller) {
	defer close(pl.done)
	var wg sync.WaitGroup
	defer wg.Wait()
	backoff := p.s.cfg.PlatformBase
	for fetch.Err() == nil {
		err := p.consume(fetch, pl, &wg)
		if err == nil || fetch.Err() != nil {
			return
		}
		p.s.log.Warn("async poller failed; retrying", "queue", pl.subject, "err", err, "backoff", backoff)
		select {
		case <-fetch.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, p.s.cfg.PlatformMax)
	}
}

func (p *Pool) consume(fetch context.Context, pl *poller, wg *sync.WaitGroup) error {
	cons, err := p.s.ensureConsumer(fetch, pl.subject)
	if err != nil {
		return err
	}
	conc := p.s.cfg.Concurrency
	it, err := cons.Messages(jetstream.PullMaxMessages(conc))
	if err != nil {
		p.s.forgetConsumer(pl.subject)
		return err
	}
	if !pl.setIterator(fetch, it) {
		return nil
	}
	defer stopIterator(it)
	sem := make(chan struct{}, conc)
	for {
		select {
		case sem <- struct{}{}:
		case <-fetch.Done():
			return nil
		}
		msg, err := it.Next()
		if err != nil {
			<-sem
			if errors.Is(err, jetstream.ErrMsgIteratorClosed) && fetch.Err() != nil {
				return nil
			}
			if errors.Is(err, jetstream.ErrConsumerDeleted) || errors.Is(err, jetstream.ErrConsumerNotFound) {
				p.s.forgetConsumer(pl.subject)
			}
			return err
		}
		if fetch.Err() != nil {
			// Stopped while this one arrived: give it back.
			_ = msg.Nak()
			<-sem
			return nil
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.processMsg(p.work, pl, msg, sem) // releases its slot of sem
		}()
	}
}
