package async

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/destinations"
	"skiff.dev/skiff/gateway/lease"
	"skiff.dev/skiff/internal/errs"
)

// ackTimeout bounds one acknowledgement or retry publish.
const ackTimeout = 10 * time.Second

// event is an async event as read from its message headers.
type event struct {
	requestID string
	function  string
	accepted  time.Time
	attempt   int // attempts already made
	depth     int
	notBefore time.Time // zero: at once
	payload   []byte
}

func parseEvent(m jetstream.Msg) (event, error) {
	h := m.Headers()
	ev := event{requestID: h.Get(HeaderRequestID), function: h.Get(HeaderFunction), payload: m.Data()}
	if ev.requestID == "" || ev.function == "" {
		return ev, errors.New("event without request id or function")
	}
	var err error
	if ev.accepted, err = time.Parse(time.RFC3339Nano, h.Get(HeaderAccepted)); err != nil {
		return ev, fmt.Errorf("accepted time: %w", err)
	}
	if ev.attempt, err = strconv.Atoi(h.Get(HeaderAttempt)); err != nil || ev.attempt < 0 {
		return ev, fmt.Errorf("attempt %q is not a count", h.Get(HeaderAttempt))
	}
	if ev.depth, err = strconv.Atoi(h.Get(HeaderDepth)); err != nil || ev.depth < 0 {
		return ev, fmt.Errorf("depth %q is not a count", h.Get(HeaderDepth))
	}
	if nb := h.Get(HeaderNotBefore); nb != "" {
		ns, err := strconv.ParseInt(nb, 10, 64)
		if err != nil {
			return ev, fmt.Errorf("not-before %q: %w", nb, err)
		}
		ev.notBefore = time.Unix(0, ns)
	}
	return ev, nil
}

// isPlatform reports whether an invoke error is the platform's (retried
// without counting an attempt) rather than the caller's or the function's.
func isPlatform(err error) bool {
	switch errs.KindOf(err) {
	case errs.KindThrottled, errs.KindResourceExhausted, errs.KindUnavailable, errs.KindInternal,
		errs.KindDeadlineExceeded, errs.KindCanceled:
		return true
	case errs.KindUnknown:
		return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
	}
	return false
}

// processMsg handles one delivery of a message: a single event or a batch.
func (p *Pool) processMsg(ctx context.Context, pl *poller, m jetstream.Msg, sem chan struct{}) {
	if p.s.log.Enabled(ctx, slog.LevelDebug) {
		// The trail of an event across gateways: which delivery of which
		// message held it, and when it finished (finish, processBatch).
		if md, err := m.Metadata(); err == nil {
			p.s.log.Debug("async message delivered", "queue", pl.subject, "seq", md.Sequence.Stream, "delivered", md.NumDelivered,
				"request_id", m.Headers().Get(HeaderRequestID), "request_ids", m.Headers().Get(HeaderRequestIDs), "attempt", m.Headers().Get(HeaderAttempt))
		}
	}
	if m.Headers().Get(HeaderBatch) != "" {
		p.processBatch(ctx, pl, m, sem)
		return
	}
	defer func() { <-sem }()
	ev, err := parseEvent(m)
	if err != nil {
		p.malformed(ctx, pl, m, err)
		return
	}
	p.process(ctx, pl, singleCarrier{p: p, m: m}, ev)
}

// malformed drops an unreadable message.
func (p *Pool) malformed(ctx context.Context, pl *poller, m jetstream.Msg, err error) {
	p.s.log.Error("dropping an unreadable async event", "queue", pl.subject, "err", err)
	p.s.met.dropped.WithLabelValues("malformed").Inc()
	if p.fenced(ctx, pl) {
		_ = m.Term()
	}
}

// carrier is how the outcome of one event reaches JetStream: through the
// message it came in (singleCarrier) or through its share of a batch
// message (batchCarrier).
type carrier interface {
	// ack: the event is finished.
	ack(ctx context.Context, log interface{ Warn(string, ...any) })
	// nak: give the event back at once, untouched (the lease is lost or
	// the pool is closing).
	nak()
	// nakWithDelay: run the event again (the same attempt) after d.
	nakWithDelay(ctx context.Context, ev event, d time.Duration)
	// delivered is how often the event was delivered (the backoff's
	// exponent).
	delivered() uint64
	// inProgress tells JetStream the event is still being worked on.
	inProgress()
}

// singleCarrier is a message holding one event.
type singleCarrier struct {
	p *Pool
	m jetstream.Msg
}

func (c singleCarrier) ack(ctx context.Context, log interface{ Warn(string, ...any) }) {
	c.p.ack(ctx, c.m, log)
}
func (c singleCarrier) nak() { _ = c.m.Nak() }
func (c singleCarrier) nakWithDelay(_ context.Context, _ event, d time.Duration) {
	_ = c.m.NakWithDelay(d)
}
func (c singleCarrier) inProgress() { _ = c.m.InProgress() }
func (c singleCarrier) delivered() uint64 {
	if md, err := c.m.Metadata(); err == nil && md.NumDelivered > 0 {
		return md.NumDelivered
	}
	return 1
}

// process handles one delivery of an event.
func (p *Pool) process(ctx context.Context, pl *poller, m carrier, ev event) {
	s := p.s
	log := s.log.With("request_id", ev.requestID, "function", ev.function)
	pol := s.policyFor(ev.function)
	now := s.now()
	deadline := ev.accepted.Add(pol.maxAge)
	age := now.Sub(ev.accepted)
	if age > pol.maxAge {
		s.met.outcomes.WithLabelValues(outcomeAgeExceeded).Inc()
		log.Info("async event too old: not invoked", "age", age, "max_age", pol.maxAge, "attempts", ev.attempt)
		p.finish(ctx, pl, m, ev, func() { p.fail(ctx, ev, pol, destinations.ConditionEventAgeExceeded, nil, ev.attempt) })
		return
	}
	if ev.notBefore.After(now) {
		// A retry that is not due yet (or due after the age limit: then
		// it comes back just after the limit and expires).
		due := ev.notBefore
		if deadline.Before(due) {
			due = deadline
		}
		m.nakWithDelay(ctx, ev, due.Sub(now)+time.Millisecond)
		return
	}
	s.met.eventAge.Observe(age.Seconds())

	start := time.Now()
	resp, err := p.invoke(ctx, m, ev)
	switch {
	case err != nil && isPlatform(err):
		outcome := outcomePlatformError
		if errs.IsThrottled(err) {
			outcome = outcomeThrottled
		}
		s.met.outcomes.WithLabelValues(outcome).Inc()
		s.met.invokeTime.WithLabelValues(outcome).Observe(time.Since(start).Seconds())
		if ctx.Err() != nil { // the pool is closing: give the event back at once
			m.nak()
			return
		}
		d := p.platformDelay(m, err)
		log.Debug("async invoke hit a platform error; retrying without counting an attempt", "err", err, "delay", d)
		m.nakWithDelay(ctx, ev, d)
		return
	case err != nil && errs.IsNotFound(err):
		// The function was deleted: its events are discarded.
		s.met.dropped.WithLabelValues("function_not_found").Inc()
		log.Info("dropping async event of a missing function", "err", err)
		p.finish(ctx, pl, m, ev, nil)
		return
	case err != nil:
		// A caller error (the event itself cannot run): counts as a
		// failed attempt with no response.
		resp = &skiffv1.InvokeResponse{StatusCode: int32(errs.ToConnect(err).Code()), FunctionError: "Unhandled",
			Payload: errorPayload(errs.KindOf(err).String(), err.Error()), ExecutedVersion: "$LATEST"}
		log.Warn("async invoke refused", "err", err)
	}
	if resp.GetFunctionError() == "" {
		s.met.outcomes.WithLabelValues(outcomeSuccess).Inc()
		s.met.invokeTime.WithLabelValues(outcomeSuccess).Observe(time.Since(start).Seconds())
		p.finish(ctx, pl, m, ev, func() {
			if pol.onSuccess != "" {
				p.deliver(ctx, "on_success", pol.onSuccess, ev, p.record(ev, destinations.ConditionSuccess, resp, ev.attempt+1))
			}
		})
		return
	}
	s.met.invokeTime.WithLabelValues(outcomeFailed).Observe(time.Since(start).Seconds())
	attempts := ev.attempt + 1
	if attempts <= pol.maxRetries {
		s.met.outcomes.WithLabelValues(outcomeRetried).Inc()
		delay := s.cfg.RetryDelay << (attempts - 1)
		log.Info("async invoke failed; retrying", "attempt", attempts, "delay", delay, "function_error", resp.GetFunctionError())
		if !p.fenced(ctx, pl) {
			m.nak()
			return
		}
		if err := p.publishRetry(ctx, ev, attempts, s.now().Add(delay)); err != nil {
			log.Warn("publishing the retry failed; the event comes back", "err", err)
			m.nakWithDelay(ctx, ev, p.s.cfg.PlatformBase)
			return
		}
		m.ack(ctx, log)
		return
	}
	s.met.outcomes.WithLabelValues(outcomeFailed).Inc()
	log.Info("async invoke failed; retries exhausted", "attempts", attempts, "function_error", resp.GetFunctionError())
	p.finish(ctx, pl, m, ev, func() { p.fail(ctx, ev, pol, destinations.ConditionRetriesExhausted, resp, attempts) })
}

// invoke runs the event through the sync path, telling JetStream the event
// is in progress so it is not redelivered while the function runs.
func (p *Pool) invoke(ctx context.Context, m carrier, ev event) (*skiffv1.InvokeResponse, error) {
	done := make(chan struct{})
	defer close(done)
	go func() {
		t := time.NewTicker(p.s.cfg.AckWait / 3)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				m.inProgress()
			}
		}
	}()
	return p.inv.InvokeSync(ctx, ev.function, ev.payload, ev.requestID)
}

// platformDelay is the backoff after a platform error: it doubles with
// each redelivery, from PlatformBase up to PlatformMax, and is at least
// the error's retry hint.
func (p *Pool) platformDelay(m carrier, err error) time.Duration {
	n := max(m.delivered(), 1)
	d := p.s.cfg.PlatformBase << min(n-1, 20)
	d = min(d, p.s.cfg.PlatformMax)
	var e *errs.Error
	if errors.As(err, &e) && e.Retry > d {
		d = min(e.Retry, p.s.cfg.PlatformMax)
	}
	return d
}

// finish runs then (delivery of the outcome) and acknowledges the event,
// both only while the lease is held; otherwise the event goes back.
func (p *Pool) finish(ctx context.Context, pl *poller, m carrier, ev event, then func()) {
	if !p.fenced(ctx, pl) {
		m.nak()
		return
	}
	if then != nil {
		then()
	}
	m.ack(ctx, p.s.log.With("request_id", ev.requestID, "function", ev.function))
	p.s.log.Debug("async event finished", "request_id", ev.requestID, "attempt", ev.attempt)
}

// fenced reports whether pl still holds its lease (at its epoch).
func (p *Pool) fenced(ctx context.Context, pl *poller) bool {
	if p.fence == nil {
		return true
	}
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), ackTimeout)
	defer cancel()
	err := p.fence.Check(cctx, pl.lease)
	switch {
	case err == nil:
		return true
	case lease.IsLost(err):
		p.s.log.Warn("async poller lost its lease: not acknowledging", "queue", pl.subject, "lease", pl.lease.String(), "err", err)
		p.Lost(pl.lease)
	default:
		// The lease could not be checked (the store is slow or failing
		// over): give this event back, keep polling. Stopping here would
		// stop the poller for good, since the keeper still holds the
		// lease and never reports it gained again.
		p.s.log.Warn("async poller could not check its lease: not acknowledging", "queue", pl.subject, "lease", pl.lease.String(), "err", err)
	}
	return false
}

func (p *Pool) ack(ctx context.Context, m jetstream.Msg, log interface{ Warn(string, ...any) }) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), ackTimeout)
	defer cancel()
	if err := m.DoubleAck(cctx); err != nil {
		log.Warn("acknowledging an async event failed; it will be processed again", "err", err)
	}
}

// publishRetry stores the next attempt of an event, due at notBefore. The
// message id makes a repeated publish of the same attempt a no-op.
func (p *Pool) publishRetry(ctx context.Context, ev event, attempt int, notBefore time.Time) error {
	return p.republish(ctx, ev, attempt, notBefore, ev.requestID+"/"+strconv.Itoa(attempt))
}

// republish stores an event as a message of its own on its function's
// queue, with attempt and notBefore, under a message id.
func (p *Pool) republish(ctx context.Context, ev event, attempt int, notBefore time.Time, msgID string) error {
	msg := singleMsg(p.s.QueueFor(ev.function), &ev, attempt, notBefore)
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), ackTimeout)
	defer cancel()
	if _, err := p.s.js.PublishMsg(cctx, msg, jetstream.WithMsgID(msgID)); err != nil {
		return publishErr(err)
	}
	return nil
}

// record builds the invocation record of an outcome.
func (p *Pool) record(ev event, condition string, resp *skiffv1.InvokeResponse, invokes int) *destinations.Record {
	rec := &destinations.Record{
		Version:   destinations.RecordVersion,
		Timestamp: destinations.Timestamp(p.s.now()),
		RequestContext: destinations.RequestContext{
			RequestID:              ev.requestID,
			FunctionArn:            p.s.FunctionARN(ev.function) + ":$LATEST",
			Condition:              condition,
			ApproximateInvokeCount: invokes,
		},
		RequestPayload: ev.payload,
	}
	if resp != nil {
		rec.ResponseContext = destinations.ResponseContext{
			StatusCode:      int(resp.GetStatusCode()),
			ExecutedVersion: resp.GetExecutedVersion(),
			FunctionError:   resp.GetFunctionError(),
		}
		rec.ResponsePayload = resp.GetPayload()
	}
	return rec
}

// fail sends a failed event's record to OnFailure, else its payload to the
// dead-letter queue, else drops it (counted).
func (p *Pool) fail(ctx context.Context, ev event, pol policy, condition string, resp *skiffv1.InvokeResponse, invokes int) {
	switch {
	case pol.onFailure != "":
		p.deliver(ctx, "on_failure", pol.onFailure, ev, p.record(ev, condition, resp, invokes))
	case pol.dlq != "":
		p.sendDLQ(ctx, ev, pol.dlq, condition, resp)
	default:
		p.s.met.dropped.WithLabelValues(condition).Inc()
	}
}

func (p *Pool) deliver(ctx context.Context, which, target string, ev event, rec *destinations.Record) {
	if p.dest == nil {
		p.s.met.destFailures.WithLabelValues(which).Inc()
		p.s.log.Warn("no destination writer: record not delivered", "request_id", ev.requestID, "target", target)
		return
	}
	if err := p.dest.Deliver(context.WithoutCancel(ctx), target, ev.depth, rec); err != nil {
		p.s.met.destFailures.WithLabelValues(which).Inc()
		p.s.log.Warn("delivering the invocation record failed", "request_id", ev.requestID, "function", ev.function, "destination", which, "err", err)
	}
}

// sendDLQ sends the original payload with Lambda's dead-letter attributes:
// RequestID, ErrorCode and ErrorMessage.
func (p *Pool) sendDLQ(ctx context.Context, ev event, queue, condition string, resp *skiffv1.InvokeResponse) {
	attrs := map[string]string{"RequestID": ev.requestID, "ErrorCode": "0", "ErrorMessage": condition}
	if resp != nil {
		attrs["ErrorCode"] = strconv.Itoa(int(resp.GetStatusCode()))
		if msg := errorMessage(resp.GetPayload()); msg != "" {
			attrs["ErrorMessage"] = msg
		}
	}
	if p.dlq == nil {
		p.s.met.dlqErrors.Inc()
		p.s.log.Warn("no dead-letter sender: event dropped", "request_id", ev.requestID, "queue", queue)
		return
	}
	if err := p.dlq.Send(context.WithoutCancel(ctx), queue, ev.payload, attrs); err != nil {
		p.s.met.dlqErrors.Inc()
		p.s.log.Warn("sending to the dead-letter queue failed", "request_id", ev.requestID, "queue", queue, "err", err)
		return
	}
	p.s.met.dlqSent.Inc()
}

// errorMessage returns the errorMessage of a Lambda error payload,
// truncated to 1 KB as Lambda's dead-letter attribute.
func errorMessage(payload []byte) string {
	var e struct {
		ErrorMessage string `json:"errorMessage"`
	}
	if json.Unmarshal(payload, &e) != nil {
		return ""
	}
	if len(e.ErrorMessage) > 1024 {
		return e.ErrorMessage[:1024]
	}
	return e.ErrorMessage
}

func errorPayload(typ, msg string) []byte {
	b, _ := json.Marshal(map[string]string{"errorType": typ, "errorMessage": msg})
	return b
}

// batchState is the progress of one delivery of a batch message.
type batchState struct {
	p *Pool
	m jetstream.Msg

	mu       sync.Mutex
	giveBack bool          // guarded by mu: an event was given back: the whole batch goes back
	backoff  time.Duration // guarded by mu: the delay of that give-back
}

// batchCarrier is one event's share of a batch message: finishing it is
// recorded; putting it back with a delay hands it on as a message of its
// own; giving it back at once gives the whole batch back.
type batchCarrier struct{ b *batchState }

func (c batchCarrier) ack(context.Context, interface{ Warn(string, ...any) }) {}
func (c batchCarrier) nak()                                                   { c.b.back(0) }
func (c batchCarrier) delivered() uint64                                      { return 1 }
func (c batchCarrier) inProgress()                                            {} // processBatch signals for the whole batch

// nakWithDelay hands the event on: a message of its own, due after d, with
// the same attempt count. Its message id makes a second hand-off of the
// same event (after the batch was redelivered) a no-op within the dedup
// window. If the publish fails the batch goes back.
func (c batchCarrier) nakWithDelay(ctx context.Context, ev event, d time.Duration) {
	p := c.b.p
	err := p.republish(ctx, ev, ev.attempt, p.s.now().Add(d), ev.requestID+"/"+strconv.Itoa(ev.attempt)+"h")
	if err != nil {
		p.s.log.Warn("handing an event of a batch on failed; the batch comes back", "request_id", ev.requestID, "err", err)
		c.b.back(p.s.cfg.PlatformBase)
	}
}

func (b *batchState) back(d time.Duration) {
	b.mu.Lock()
	b.giveBack = true
	b.backoff = max(b.backoff, d)
	b.mu.Unlock()
}

// processBatch handles one delivery of a batch message: each event as a
// single one would be (holding a slot of sem while it runs; the message's
// own slot is the first event's), then the message is acknowledged if
// every event finished or was handed on, else given back whole.
func (p *Pool) processBatch(ctx context.Context, pl *poller, m jetstream.Msg, sem chan struct{}) {
	evs, err := decodeBatch(m.Data())
	if err != nil {
		<-sem
		p.malformed(ctx, pl, m, err)
		return
	}
	p.s.met.batchEvents.Observe(float64(len(evs)))
	b := &batchState{p: p, m: m}
	stopTicks := make(chan struct{})
	go func() {
		t := time.NewTicker(p.s.cfg.AckWait / 3)
		defer t.Stop()
		for {
			select {
			case <-stopTicks:
				return
			case <-t.C:
				_ = m.InProgress()
			}
		}
	}()
	var wg sync.WaitGroup
	for i, ev := range evs {
		if i > 0 {
			acquired := false
			select {
			case sem <- struct{}{}:
				acquired = true
			case <-ctx.Done():
			}
			if ctx.Err() != nil {
				// The pool is closing: the events not started go back
				// with the batch.
				if acquired {
					<-sem
				}
				b.back(0)
				break
			}
		}
		wg.Go(func() {
			defer func() { <-sem }()
			p.process(ctx, pl, batchCarrier{b}, ev)
		})
	}
	wg.Wait()
	close(stopTicks)
	b.mu.Lock()
	giveBack, backoff := b.giveBack, b.backoff
	b.mu.Unlock()
	if p.s.log.Enabled(ctx, slog.LevelDebug) {
		if md, err := m.Metadata(); err == nil {
			p.s.log.Debug("async batch done", "queue", pl.subject, "seq", md.Sequence.Stream, "events", len(evs), "give_back", giveBack, "backoff", backoff)
		}
	}
	switch {
	case giveBack && backoff > 0:
		_ = m.NakWithDelay(backoff)
	case giveBack:
		_ = m.Nak()
	case p.fenced(ctx, pl):
		p.ack(ctx, m, p.s.log.With("queue", pl.subject, "batch_events", len(evs)))
	default:
		_ = m.Nak()
	}
}
