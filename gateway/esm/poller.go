package esm

import (
	"context"
	"skiff.dev/skiff/gateway/lease"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

// slotRunner polls one lease slot of one mapping: a group of pollers that
// grows to the slot's share of the mapping's concurrency while batches
// keep coming and shrinks to one when the queue is idle.
type slotRunner struct {
	s      *Service
	uuid   string
	lease  heldSlot
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	wg     sync.WaitGroup // the pollers

	mu      sync.Mutex
	workers int           // guarded by mu: running pollers
	backoff time.Duration // guarded by mu: the last backoff, 0 after a success
	changed chan struct{} // guarded by mu: closed (and replaced) when the mapping changes
	arn     string        // guarded by mu: the queue's ARN once known
}

func newSlotRunner(s *Service, parent context.Context, id string, l heldSlot) *slotRunner {
	ctx, cancel := context.WithCancel(parent)
	return &slotRunner{s: s, uuid: id, lease: l, ctx: ctx, cancel: cancel, done: make(chan struct{}), changed: make(chan struct{})}
}

func (r *slotRunner) start() { go r.run() }

// notify tells the runner and its pollers that the mapping changed.
func (r *slotRunner) notify() {
	r.mu.Lock()
	close(r.changed)
	r.changed = make(chan struct{})
	r.mu.Unlock()
}

// changes returns a channel closed at the next change of the mapping; take
// it before reading the mapping so that no change is missed.
func (r *slotRunner) changes() <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.changed
}

// activeShare is how many pollers the slot may run for m now (0: none).
func (r *slotRunner) activeShare(m *skiffv1.EventSourceMapping) int {
	if m == nil || !m.GetEnabled() {
		return 0
	}
	return r.s.share(m, r.lease.Slot)
}

// run starts pollers while the mapping is enabled and stops them when it
// is disabled or deleted, until the slot's context ends.
func (r *slotRunner) run() {
	defer close(r.done)
	defer r.s.runners.Done()
	for r.ctx.Err() == nil {
		ch := r.changes()
		if r.activeShare(r.s.mapping(r.uuid)) == 0 {
			select {
			case <-r.ctx.Done():
			case <-ch:
			}
			continue
		}
		pctx, pcancel := context.WithCancel(r.ctx)
		r.spawn(pctx)
		for active := true; active; {
			select {
			case <-r.ctx.Done():
				active = false
			case <-ch:
				ch = r.changes()
				active = r.activeShare(r.s.mapping(r.uuid)) > 0
			}
		}
		pcancel()
		r.wg.Wait()
	}
}

// spawn starts one more poller.
func (r *slotRunner) spawn(ctx context.Context) {
	r.mu.Lock()
	r.workers++
	r.mu.Unlock()
	r.s.met.pollers.Inc()
	r.wg.Add(1)
	go r.poll(ctx)
}

// leaveIf ends the calling poller when keep(n) is false for the current
// number n of pollers; it reports whether the poller must return.
func (r *slotRunner) leaveIf(leave func(n int) bool) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !leave(r.workers) {
		return false
	}
	r.workers--
	r.s.met.pollers.Dec()
	return true
}

// grow adds a poller when the slot runs fewer than its share.
func (r *slotRunner) grow(ctx context.Context, share int) {
	r.mu.Lock()
	more := r.workers < share
	r.mu.Unlock()
	if more && ctx.Err() == nil {
		r.spawn(ctx)
	}
}

func (r *slotRunner) poll(ctx context.Context) {
	defer r.wg.Done()
	for {
		if ctx.Err() != nil {
			r.leaveIf(func(int) bool { return true })
			return
		}
		ch := r.changes()
		m := r.s.mapping(r.uuid)
		share := r.activeShare(m)
		// Above the share (the mapping's concurrency was lowered): leave,
		// keeping one poller that waits for the mapping to change.
		if r.leaveIf(func(n int) bool { return n > max(share, 1) }) {
			return
		}
		if share == 0 {
			select {
			case <-ctx.Done():
			case <-ch:
			}
			continue
		}
		items, err := r.gather(ctx, m)
		if err != nil {
			if ctx.Err() != nil {
				continue
			}
			d := r.nextBackoff()
			r.s.log.Warn("receiving from queue", "uuid", r.uuid, "queue", m.GetQueue(), "err", err, "backoff", d)
			r.pause(ctx, d)
			continue
		}
		if len(items) == 0 {
			// An empty long poll: the queue is idle, need fewer pollers.
			if r.leaveIf(func(n int) bool { return n > 1 }) {
				return
			}
			continue
		}
		r.grow(ctx, share)
		if throttled := r.process(ctx, m, items); throttled {
			// Back off with fewer pollers.
			if r.leaveIf(func(n int) bool { return n > 1 }) {
				return
			}
		}
	}
}

// pause waits d or until ctx ends.
func (r *slotRunner) pause(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-r.s.cfg.After(d):
	}
}

func (r *slotRunner) nextBackoff() time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case r.backoff == 0:
		r.backoff = r.s.cfg.Backoff
	default:
		r.backoff = min(2*r.backoff, r.s.cfg.MaxBackoff)
	}
	return r.backoff
}

func (r *slotRunner) resetBackoff() {
	r.mu.Lock()
	r.backoff = 0
	r.mu.Unlock()
}

// queueARN returns the queue's ARN as the queue service reports it, or
// one built from the region and account when it cannot.
func (r *slotRunner) queueARN(ctx context.Context, queue string) string {
	r.mu.Lock()
	arn := r.arn
	r.mu.Unlock()
	if arn != "" {
		return arn
	}
	if a, err := r.s.q.Attributes(ctx, queue); err == nil && a.GetQueue().GetArn() != "" {
		arn = a.GetQueue().GetArn()
		r.mu.Lock()
		r.arn = arn
		r.mu.Unlock()
		return arn
	}
	return "arn:aws:sqs:" + r.s.cfg.Region + ":" + r.s.cfg.AccountID + ":" + queue
}

// item is one received message and its record in the event.
type item struct {
	msg *skiffv1.Message
	rec []byte
}

// gather receives one batch: up to BatchSize messages, in receives of at
// most 10. The first receive long-polls; with a batching window the
// poller keeps receiving until the batch is full or the window (counted
// from the first message) has passed; without one, a single receive makes
// the batch. It stops early when the event would outgrow MaxPayload, and
// makes what does not fit visible again.
func (r *slotRunner) gather(ctx context.Context, m *skiffv1.EventSourceMapping) ([]item, error) {
	size := int(batchSize(m))
	window := time.Duration(m.GetMaximumBatchingWindowSeconds()) * time.Second
	arn := r.queueARN(ctx, m.GetQueue())
	budget := r.s.cfg.MaxPayload - len(eventPrefix) - len(eventSuffix)
	var (
		items    []item
		bytes    int
		deadline time.Time
	)
	for len(items) < size {
		n := min(maxReceivePerCall, size-len(items))
		var wait int32
		if len(items) == 0 {
			wait = int32(r.s.cfg.PollWait / time.Second)
		} else {
			if window == 0 {
				break
			}
			rem := deadline.Sub(r.s.cfg.Now())
			if rem <= 0 {
				break
			}
			wait = int32(min(rem, 20*time.Second) / time.Second)
			// Receive more only if maximal messages would still fit.
			n = min(n, (budget-bytes)/maxMessageEstimate)
			if n <= 0 {
				break
			}
		}
		msgs, err := r.s.q.Receive(ctx, &skiffv1.ReceiveMessageRequest{Queue: m.GetQueue(), MaxMessages: int32(n), WaitSeconds: &wait})
		if err != nil {
			if len(items) > 0 && ctx.Err() == nil {
				r.s.log.Warn("receiving more of a batch: invoking with what arrived", "uuid", r.uuid, "err", err)
				break
			}
			return nil, err
		}
		if len(items) == 0 && len(msgs) > 0 {
			deadline = r.s.cfg.Now().Add(window)
		}
		for _, msg := range msgs {
			rec, err := encodeRecord(msg, arn, r.s.cfg.Region)
			if err != nil {
				return nil, errs.Internal("encoding message %s: %w", msg.GetMessageId(), err)
			}
			items = append(items, item{msg: msg, rec: rec})
			bytes += len(rec) + 1
		}
		if len(items) == 0 {
			return nil, nil
		}
		if len(msgs) == 0 && wait == 0 {
			// A short poll came back empty within the window: wait a
			// little (at most what is left of it) before polling again.
			r.pause(ctx, min(deadline.Sub(r.s.cfg.Now()), 100*time.Millisecond))
		}
		if ctx.Err() != nil {
			break
		}
	}
	// Escaped bodies can make records bigger than estimated: what does not
	// fit goes back to the queue (always keeping one message).
	for len(items) > 1 && bytes > budget {
		last := items[len(items)-1]
		items = items[:len(items)-1]
		bytes -= len(last.rec) + 1
		if err := r.s.q.ChangeVisibility(ctx, m.GetQueue(), last.msg.GetReceiptHandle(), 0); err != nil {
			r.s.log.Warn("returning a message that does not fit the batch", "uuid", r.uuid, "message_id", last.msg.GetMessageId(), "err", err)
		}
	}
	return items, nil
}

// process invokes the function with one batch and settles its messages;
// it reports whether the invoke was throttled (or failed on the platform).
func (r *slotRunner) process(ctx context.Context, m *skiffv1.EventSourceMapping, items []item) (throttled bool) {
	met := r.s.met
	met.batchSize.Observe(float64(len(items)))
	recs := make([][]byte, len(items))
	for i, it := range items {
		recs[i] = it.rec
	}
	payload := joinEvent(recs)
	rid := newUUID()
	resp, err := r.s.inv.InvokeSync(ctx, m.GetFunctionName(), payload, rid)
	switch {
	case err != nil && ctx.Err() != nil:
		// Stopping: the messages come back after the visibility timeout.
		return false
	case err != nil:
		result := resultError
		if retryable(err) {
			result = resultThrottled
		}
		met.batches.WithLabelValues(result).Inc()
		d := r.nextBackoff()
		r.s.log.Warn("invoking with a batch", "uuid", r.uuid, "function", m.GetFunctionName(), "request_id", rid, "messages", len(items), "err", err, "backoff", d)
		r.release(ctx, m.GetQueue(), items, d)
		r.pause(ctx, d)
		return true
	case resp.GetFunctionError() != "":
		r.resetBackoff()
		met.batches.WithLabelValues(resultFunctionError).Inc()
		met.messagesFailed.Add(float64(len(items)))
		r.s.log.Debug("function failed a batch: the messages stay in the queue", "uuid", r.uuid, "function", m.GetFunctionName(), "request_id", rid, "messages", len(items))
		return false
	}
	r.resetBackoff()
	keep := map[string]bool{}
	result := resultSuccess
	if reportsItemFailures(m) {
		ids := make(map[string]bool, len(items))
		for _, it := range items {
			ids[it.msg.GetMessageId()] = true
		}
		failed, ok := parseBatchItemFailures(resp.GetPayload(), ids)
		if !ok {
			met.batches.WithLabelValues(resultInvalidResponse).Inc()
			met.messagesFailed.Add(float64(len(items)))
			r.s.log.Warn("invalid batchItemFailures response: the whole batch failed", "uuid", r.uuid, "function", m.GetFunctionName(), "request_id", rid)
			return false
		}
		if len(failed) > 0 {
			result = resultPartial
		}
		keep = failed
	}
	var del []item
	for _, it := range items {
		if !keep[it.msg.GetMessageId()] {
			del = append(del, it)
		}
	}
	met.batches.WithLabelValues(result).Inc()
	met.messagesFailed.Add(float64(len(items) - len(del)))
	r.deleteAll(ctx, m.GetQueue(), del)
	return false
}

// deleteAll deletes processed messages, after checking that this slot
// still holds its lease with its epoch (a poller that lost it stops and
// leaves the messages to the new holder).
func (r *slotRunner) deleteAll(ctx context.Context, queue string, items []item) {
	if len(items) == 0 {
		return
	}
	if err := r.lease.Check(ctx); err != nil {
		if !lease.IsLost(err) {
			// The lease could not be checked (the store is slow or failing
			// over): leave the batch to come back after its visibility
			// timeout and keep polling; the keeper still holds the lease.
			r.s.log.Warn("lease not checked: not deleting the batch", "uuid", r.uuid, "slot", r.lease.Slot, "epoch", r.lease.Epoch, "err", err)
			return
		}
		r.s.met.fenced.Inc()
		r.s.log.Warn("lease lost: not deleting the batch, stopping", "uuid", r.uuid, "slot", r.lease.Slot, "epoch", r.lease.Epoch, "err", err)
		r.s.dropSlot(r)
		r.cancel()
		return
	}
	var g errgroup.Group
	g.SetLimit(defaultDeleteParallelism)
	for _, it := range items {
		g.Go(func() error {
			if err := r.s.q.Delete(ctx, queue, it.msg.GetReceiptHandle()); err != nil {
				r.s.met.deleteErrors.Inc()
				r.s.log.Warn("deleting a processed message: it will be delivered again", "uuid", r.uuid, "message_id", it.msg.GetMessageId(), "err", err)
				return nil
			}
			r.s.met.messagesDeleted.Inc()
			return nil
		})
	}
	_ = g.Wait()
}

// release makes a batch visible again after d (rounded down to whole
// seconds, the queue's granularity).
func (r *slotRunner) release(ctx context.Context, queue string, items []item, d time.Duration) {
	var g errgroup.Group
	g.SetLimit(defaultDeleteParallelism)
	for _, it := range items {
		g.Go(func() error {
			if err := r.s.q.ChangeVisibility(ctx, queue, it.msg.GetReceiptHandle(), d.Truncate(time.Second)); err != nil && ctx.Err() == nil {
				r.s.log.Warn("making a message visible again", "uuid", r.uuid, "message_id", it.msg.GetMessageId(), "err", err)
			}
			return nil
		})
	}
	_ = g.Wait()
}

// retryable reports whether an invoke error is a throttle or a platform
// error (the batch is retried after a backoff) rather than a caller error.
func retryable(err error) bool {
	switch errs.KindOf(err) {
	case errs.KindThrottled, errs.KindResourceExhausted, errs.KindUnavailable, errs.KindDeadlineExceeded, errs.KindInternal, errs.KindUnknown:
		return true
	}
	return false
}
