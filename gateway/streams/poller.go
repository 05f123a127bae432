package streams

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/esm"
	"skiff.dev/skiff/gateway/lease"
	"skiff.dev/skiff/internal/errs"
)

// errDone ends a poller whose lane is finished (shard end).
var errDone = errors.New("lane done")

// poller runs one lane while this gateway holds its lease.
type poller struct {
	s      *Service
	lane   lane
	lease  lease.Lease
	ctx    context.Context
	cancel context.CancelFunc
	prev   <-chan struct{} // closed when the lane's previous poller stopped (nil: none)
	done   chan struct{}   // closed when this poller stopped

	// Owned by the run goroutine.
	stream   string
	ec       eventContext
	cp       Checkpoint // the last committed checkpoint
	pos      uint64     // read position: every record ≤ pos is in buf, done or not of this lane
	buf      []Record   // records of this lane read and not yet taken into a batch
	bufBytes int
	shardEnd bool // the shard is closed and pos is at its end
	backoff  time.Duration
	ageGauge prometheus.Gauge // the lane's shard's iterator age
	lagGauge prometheus.Gauge // and checkpoint lag
}

func newPoller(s *Service, parent context.Context, ln lane, l lease.Lease, prev <-chan struct{}) *poller {
	ctx, cancel := context.WithCancel(parent)
	return &poller{s: s, lane: ln, lease: l, ctx: ctx, cancel: cancel, prev: prev, done: make(chan struct{})}
}

func (p *poller) run() {
	defer p.s.pollerWG.Done()
	defer close(p.done)
	defer p.cancel()
	if p.prev != nil {
		select {
		case <-p.prev:
		case <-p.ctx.Done():
			p.s.dropPoller(p)
			return
		}
	}
	err := p.loop()
	switch {
	case err == nil, errors.Is(err, errDone), p.ctx.Err() != nil:
	case IsStale(err):
		p.s.met.fenced.Inc()
		p.s.log.Warn("stream lane fenced: stopping", "uuid", p.lane.uuid, "shard", p.lane.shard, "lane", p.lane.n, "epoch", p.lease.Epoch, "err", err)
	default:
		p.s.log.Error("stream poller stopped", "uuid", p.lane.uuid, "shard", p.lane.shard, "lane", p.lane.n, "err", err)
	}
	p.s.dropPoller(p)
}

func (p *poller) fence(ctx context.Context) error { return p.s.ls.Check(ctx, p.lease) }

func (p *poller) loop() error {
	m := p.s.mapping(p.lane.uuid)
	if m == nil || !m.GetEnabled() {
		return nil
	}
	p.stream = m.GetStream()
	p.ageGauge = p.s.met.iteratorAge.WithLabelValues(p.lane.uuid, p.lane.shard)
	p.lagGauge = p.s.met.checkpointLag.WithLabelValues(p.lane.uuid, p.lane.shard)
	p.ec = eventContext{shardID: p.lane.shard, streamARN: p.s.streamARN(p.stream), region: p.s.cfg.Region, identity: p.s.identityARN()}
	if err := p.start(m); err != nil {
		return err
	}
	for p.ctx.Err() == nil {
		m := p.s.mapping(p.lane.uuid)
		if m == nil || !m.GetEnabled() {
			return nil
		}
		err := p.step(m)
		switch {
		case err == nil:
		case errors.Is(err, errDone), IsStale(err), p.ctx.Err() != nil:
			return err
		default:
			d := p.nextBackoff()
			p.s.log.Warn("stream poller step failed", "uuid", p.lane.uuid, "shard", p.lane.shard, "lane", p.lane.n, "err", err, "backoff", d)
			p.s.sleep(p.ctx, d, nil)
		}
	}
	return nil
}

// start reads the lane's checkpoint (or the starting position) and claims
// it with this lease's epoch, which fences out any earlier holder.
func (p *poller) start(m *skiffv1.EventSourceMapping) error {
	for {
		err := p.claim(m)
		if err == nil || errors.Is(err, errDone) || IsStale(err) || p.ctx.Err() != nil {
			return err
		}
		d := p.nextBackoff()
		p.s.log.Warn("claiming a stream lane", "uuid", p.lane.uuid, "shard", p.lane.shard, "lane", p.lane.n, "err", err, "backoff", d)
		if !p.s.sleep(p.ctx, d, nil) {
			return p.ctx.Err()
		}
	}
}

func (p *poller) claim(m *skiffv1.EventSourceMapping) error {
	cp, ok, err := p.s.cps.get(p.ctx, p.lane)
	if err != nil {
		return err
	}
	if ok && cp.Ended {
		p.s.kick()
		return errDone
	}
	if !ok {
		after, err := p.startAfter(m)
		if err != nil {
			return err
		}
		cp = Checkpoint{Seq: after}
	} else if cp.Holder != "" && (cp.Holder != p.lease.Holder || cp.Epoch < p.lease.Epoch) {
		// Another holder, or a dead incarnation of this one (same holder
		// name, reclaimed with a new epoch), left this checkpoint.
		p.s.met.takeovers.Inc()
		p.s.log.Info("stream lane taken over", "uuid", p.lane.uuid, "shard", p.lane.shard, "lane", p.lane.n, "previous_holder", cp.Holder, "previous_epoch", cp.Epoch, "epoch", p.lease.Epoch, "sequence", cp.Seq)
	}
	next := cp
	next.Epoch, next.Holder = p.lease.Epoch, p.lease.Holder
	got, err := p.s.cps.commit(p.ctx, p.lane, next, p.fence)
	if err != nil {
		return err
	}
	p.cp, p.pos = got, got.Seq
	return nil
}

// startAfter is where a lane without a checkpoint starts.
func (p *poller) startAfter(m *skiffv1.EventSourceMapping) (uint64, error) {
	switch m.GetStartingPosition() {
	case esm.PositionAtTimestamp:
		ts, err := time.Parse(time.RFC3339Nano, m.GetStartingPositionTimestamp())
		if err != nil {
			return 0, errs.Invalid("starting_position_timestamp", "bad starting position timestamp %q", m.GetStartingPositionTimestamp())
		}
		return p.s.data.SeqAt(p.ctx, p.stream, p.lane.shard, esm.PositionAtTimestamp, ts)
	case esm.PositionLatest:
		t0, err := p.s.cps.origin(p.ctx, p.lane.uuid, p.s.cfg.Now())
		if err != nil {
			return 0, err
		}
		return p.s.data.SeqAt(p.ctx, p.stream, p.lane.shard, esm.PositionAtTimestamp, t0)
	default:
		return p.s.data.SeqAt(p.ctx, p.stream, p.lane.shard, esm.PositionTrimHorizon, time.Time{})
	}
}

func (p *poller) nextBackoff() time.Duration {
	if p.backoff == 0 {
		p.backoff = p.s.cfg.Backoff
	} else {
		p.backoff = min(2*p.backoff, p.s.cfg.MaxBackoff)
	}
	return p.backoff
}

// readLimit is how many records of the shard one read asks for: a batch
// of this lane's records needs about BatchSize × lanes.
func readLimit(m *skiffv1.EventSourceMapping) int {
	return min(maxRead, max(100, int(m.GetBatchSize())*lanes(m)))
}

// fill reads the next records of the shard into buf (those of this lane)
// and returns how many records it read.
func (p *poller) fill(m *skiffv1.EventSourceMapping) (int, error) {
	recs, end, err := p.s.data.Read(p.ctx, p.stream, p.lane.shard, p.pos, readLimit(m))
	if err != nil {
		return 0, err
	}
	p.absorb(m, recs, end)
	return len(recs), nil
}

// absorb takes the records of a read after pos into buf (those of this
// lane) and moves pos past them.
func (p *poller) absorb(m *skiffv1.EventSourceMapping, recs []Record, end bool) {
	n := lanes(m)
	for _, r := range recs {
		if r.Seq <= p.pos {
			continue
		}
		p.pos = r.Seq
		if laneOf(r.PartitionKey, n) == p.lane.n {
			p.buf = append(p.buf, r)
			p.bufBytes += recordSize(r)
		}
	}
	if len(recs) == 0 && end {
		p.shardEnd = true
	}
}

// readAhead is a read of the shard's next records that runs while the
// function processes a batch, so that the lane's next batch is ready when
// the invoke (and its checkpoint) is done. It reads what the next step's
// fill would read; the records go into buf only after the batch.
type readAhead struct {
	after uint64 // pos when it started
	done  chan struct{}
	recs  []Record
	end   bool
	err   error
}

// startReadAhead starts a read after pos when the next step would read:
// buf holds less than a batch and the shard is not at its end.
func (p *poller) startReadAhead(m *skiffv1.EventSourceMapping, bs, limit int) *readAhead {
	if p.shardEnd || len(p.buf) >= bs || p.bufBytes >= limit {
		return nil
	}
	ra := &readAhead{after: p.pos, done: make(chan struct{})}
	n := readLimit(m)
	go func() {
		defer close(ra.done)
		ra.recs, ra.end, ra.err = p.s.data.Read(p.ctx, p.stream, p.lane.shard, ra.after, n)
	}()
	return ra
}

// finishReadAhead waits for ra and, with keep, takes its records as fill
// would (a failed read is left to the next fill).
func (p *poller) finishReadAhead(m *skiffv1.EventSourceMapping, ra *readAhead, keep bool) {
	if ra == nil {
		return
	}
	<-ra.done
	if keep && ra.err == nil && ra.after == p.pos {
		p.absorb(m, ra.recs, ra.end)
	}
}

// rewind makes the lane read again from its checkpoint, after a batch
// failed with an error that stops neither the poller nor the lane (the
// batch's records were taken out of buf and must be read again).
func (p *poller) rewind() {
	p.buf, p.bufBytes = nil, 0
	p.pos, p.shardEnd = p.cp.Seq, false
}

// windowStart is the tumbling window of t.
func windowStart(t time.Time, secs int32) time.Time {
	u := t.Unix()
	return time.Unix(u-u%int64(secs), 0).UTC()
}

// step gathers one batch (or closes a tumbling window, or ends the shard)
// and processes it.
func (p *poller) step(m *skiffv1.EventSourceMapping) error {
	bs := int(m.GetBatchSize())
	win := time.Duration(m.GetMaximumBatchingWindowSeconds()) * time.Second
	tw := m.GetTumblingWindowSeconds()
	limit := p.s.cfg.MaxPayload - 1024
	var firstSeen time.Time
	for {
		if err := p.ctx.Err(); err != nil {
			return err
		}
		wake := p.s.wakeCh(p.stream)
		read := 0
		if len(p.buf) < bs && p.bufBytes < limit && !p.shardEnd {
			n, err := p.fill(m)
			if err != nil {
				return err
			}
			read = n
		}
		now := p.s.cfg.Now()
		if tw > 0 && p.cp.Window != nil {
			w := p.cp.Window
			closing := len(p.buf) > 0 && !windowStart(p.buf[0].Arrival, tw).Equal(w.Start.UTC())
			if len(p.buf) == 0 && read == 0 && (p.shardEnd || !now.Before(w.End)) {
				closing = true
			}
			if closing {
				early := len(p.buf) == 0 && p.shardEnd && now.Before(w.End)
				return p.finishWindow(m, early)
			}
		}
		if len(p.buf) == 0 {
			if p.shardEnd {
				if err := p.s.ShardEnded(p.ctx, p.lease, p.pos); err != nil {
					return err
				}
				p.lagGauge.Set(0)
				return errDone
			}
			if read == 0 {
				p.ageGauge.Set(0)
				wait := p.s.cfg.PollInterval
				if tw > 0 && p.cp.Window != nil {
					wait = min(wait, max(p.cp.Window.End.Sub(now), time.Millisecond))
				}
				p.s.sleep(p.ctx, wait, wake)
			}
			continue
		}
		if win > 0 && len(p.buf) < bs && p.bufBytes < limit && !p.shardEnd {
			if firstSeen.IsZero() {
				firstSeen = now
			}
			if rem := firstSeen.Add(win).Sub(now); rem > 0 {
				if read == 0 {
					p.s.sleep(p.ctx, min(rem, p.s.cfg.PollInterval), wake)
				}
				continue
			}
		}
		break
	}
	batch := p.take(bs, limit, tw)
	end := p.pos
	if len(p.buf) > 0 {
		end = batch[len(batch)-1].Seq
	}
	ra := p.startReadAhead(m, bs, limit)
	err := p.process(m, batch, end)
	p.finishReadAhead(m, ra, err == nil)
	if err != nil && !errors.Is(err, errDone) && !IsStale(err) && p.ctx.Err() == nil {
		p.rewind()
	}
	return err
}

// take removes the next batch from buf: up to bs records within the
// payload limit, of one tumbling window.
func (p *poller) take(bs, limit int, tw int32) []Record {
	n, size := 0, 0
	for n < len(p.buf) && n < bs {
		sz := recordSize(p.buf[n])
		if n > 0 && size+sz > limit {
			break
		}
		if tw > 0 && n > 0 && !windowStart(p.buf[n].Arrival, tw).Equal(windowStart(p.buf[0].Arrival, tw)) {
			break
		}
		size += sz
		n++
	}
	batch := slices.Clone(p.buf[:n])
	p.buf = slices.Delete(p.buf, 0, n)
	p.bufBytes -= size
	return batch
}

// sub is a batch or a part of one being retried.
type sub struct {
	recs    []Record
	end     uint64 // the checkpoint once recs are done
	retries int    // failed attempts counted against MaximumRetryAttempts
	invokes int
	last    *skiffv1.InvokeResponse
}

// process invokes the function with a batch until every record is done:
// processed, or skipped to OnFailure after its retries or age ran out.
func (p *poller) process(m *skiffv1.EventSourceMapping, batch []Record, end uint64) error {
	met := p.s.met
	stack := []*sub{{recs: batch, end: end}}
	tw := m.GetTumblingWindowSeconds()
	for len(stack) > 0 {
		if err := p.ctx.Err(); err != nil {
			return err
		}
		b := stack[0]
		if age := m.GetMaximumRecordAgeSeconds(); age >= 0 {
			cutoff := p.s.cfg.Now().Add(-time.Duration(age) * time.Second)
			k := 0
			for i, r := range b.recs {
				if r.Arrival.Before(cutoff) {
					k = i + 1
				}
			}
			if k > 0 {
				expEnd := b.end
				if k < len(b.recs) {
					expEnd = b.recs[k-1].Seq
				}
				if err := p.skip(m, b.recs[:k], ConditionRecordAgeExceeded, b, expEnd); err != nil {
					return err
				}
				if k == len(b.recs) {
					stack = stack[1:]
					continue
				}
				b.recs = b.recs[k:]
			}
		}
		var w *Window
		if tw > 0 {
			if p.cp.Window != nil {
				c := *p.cp.Window
				w = &c
			} else {
				st := windowStart(b.recs[0].Arrival, tw)
				w = &Window{Start: st, End: st.Add(time.Duration(tw) * time.Second)}
			}
		}
		payload, err := encodeEvent(p.ec, b.recs, w, false, false)
		if err != nil {
			return errs.Internal("encoding a stream event: %w", err)
		}
		rid := newRequestID()
		resp, err := p.s.inv.InvokeSync(p.ctx, m.GetFunctionName(), payload, rid)
		if err != nil {
			if p.ctx.Err() != nil {
				return p.ctx.Err()
			}
			met.batches.WithLabelValues("throttled").Inc()
			d := p.nextBackoff()
			p.s.log.Warn("invoking with a stream batch: backing off", "uuid", p.lane.uuid, "shard", p.lane.shard, "function", m.GetFunctionName(), "request_id", rid, "records", len(b.recs), "err", err, "backoff", d)
			p.s.sleep(p.ctx, d, nil)
			continue
		}
		p.backoff = 0
		b.invokes++
		b.last = resp
		failedAt := -1
		if resp.GetFunctionError() != "" {
			failedAt = 0
		} else if reportsItemFailures(m) {
			if i, ok := itemFailure(resp.GetPayload(), b.recs); !ok {
				failedAt = 0
			} else if i < len(b.recs) {
				failedAt = i
			}
		}
		if failedAt < 0 {
			if w != nil {
				if st := windowState(resp.GetPayload()); st != nil {
					w.State = st
				}
			}
			if err := p.commit(b.end, w); err != nil {
				return err
			}
			met.batches.WithLabelValues("success").Inc()
			met.records.Add(float64(len(b.recs)))
			p.ageGauge.Set(float64(p.s.cfg.Now().Sub(b.recs[len(b.recs)-1].Arrival).Milliseconds()))
			stack = stack[1:]
			continue
		}
		if failedAt > 0 {
			met.batches.WithLabelValues("partial").Inc()
			if err := p.commit(b.recs[failedAt-1].Seq, w); err != nil {
				return err
			}
			met.records.Add(float64(failedAt))
			b.recs = b.recs[failedAt:]
		} else {
			met.batches.WithLabelValues("function_error").Inc()
		}
		if failedAt == 0 && m.GetBisectBatchOnFunctionError() && len(b.recs) > 1 {
			half := len(b.recs) / 2
			a := &sub{recs: b.recs[:half], end: b.recs[half-1].Seq}
			c := &sub{recs: b.recs[half:], end: b.end}
			stack = append([]*sub{a, c}, stack[1:]...)
			met.bisections.Inc()
			continue
		}
		b.retries++
		if r := m.GetMaximumRetryAttempts(); r >= 0 && b.retries > int(r) {
			if err := p.skip(m, b.recs, ConditionRetryAttemptsExhausted, b, b.end); err != nil {
				return err
			}
			stack = stack[1:]
			continue
		}
		p.s.sleep(p.ctx, p.s.cfg.RetryDelay, nil)
	}
	return nil
}

func reportsItemFailures(m *skiffv1.EventSourceMapping) bool {
	return slices.Contains(m.GetFunctionResponseTypes(), "ReportBatchItemFailures")
}

// commit checkpoints seq (and the tumbling window w) with this lease.
func (p *poller) commit(seq uint64, w *Window) error {
	next := Checkpoint{Seq: seq, Epoch: p.lease.Epoch, Holder: p.lease.Holder, Window: w}
	cp, err := p.s.cps.commitFrom(p.ctx, p.lane, p.cp, next, p.fence)
	if err != nil {
		return err
	}
	p.cp = cp
	p.lagGauge.Set(float64(len(p.buf)))
	return nil
}

// skip sends the metadata of recs to OnFailure and checkpoints past them.
func (p *poller) skip(m *skiffv1.EventSourceMapping, recs []Record, condition string, b *sub, end uint64) error {
	rec := failureRecord{
		RequestContext: failureRequest{
			RequestID:              newRequestID(),
			FunctionArn:            p.s.functionARN(m.GetFunctionName()),
			Condition:              condition,
			ApproximateInvokeCount: b.invokes,
		},
		Version:   "1.0",
		Timestamp: formatTime(p.s.cfg.Now()),
		KinesisBatchInfo: batchInfo{
			ShardID:                         p.lane.shard,
			StartSequenceNumber:             seqString(recs[0]),
			EndSequenceNumber:               seqString(recs[len(recs)-1]),
			ApproximateArrivalOfFirstRecord: formatTime(recs[0].Arrival),
			ApproximateArrivalOfLastRecord:  formatTime(recs[len(recs)-1].Arrival),
			BatchSize:                       len(recs),
			StreamArn:                       p.ec.streamARN,
		},
	}
	if b.last != nil {
		rec.ResponseContext = failureResponse{StatusCode: int(b.last.GetStatusCode()), ExecutedVersion: b.last.GetExecutedVersion(), FunctionError: b.last.GetFunctionError()}
		if rec.ResponseContext.StatusCode == 0 {
			rec.ResponseContext.StatusCode = 200
		}
	}
	if rec.ResponseContext.ExecutedVersion == "" && b.last != nil {
		rec.ResponseContext.ExecutedVersion = "$LATEST"
	}
	p.s.met.skipped.WithLabelValues(condition).Add(float64(len(recs)))
	if target := m.GetOnFailure(); target != "" {
		if err := p.deliver(target, rec); err != nil {
			return err
		}
	} else {
		p.s.log.Warn("stream records skipped without an OnFailure destination", "uuid", p.lane.uuid, "shard", p.lane.shard, "condition", condition, "records", len(recs), "first", rec.KinesisBatchInfo.StartSequenceNumber, "last", rec.KinesisBatchInfo.EndSequenceNumber)
	}
	return p.commit(end, p.cp.Window)
}

// deliver sends an OnFailure record, retrying transient failures with
// backoff until it is accepted or the poller stops; a permanent failure
// (the destination is gone or refuses) is logged and the batch dropped.
func (p *poller) deliver(target string, rec failureRecord) error {
	body, err := json.Marshal(&rec)
	if err != nil {
		return errs.Internal("encoding an on-failure record: %w", err)
	}
	if p.s.dest == nil {
		p.s.log.Error("on-failure destinations are not available: record dropped", "uuid", p.lane.uuid, "record", string(body))
		return nil
	}
	for {
		err := p.s.dest.DeliverJSON(p.ctx, target, rec.RequestContext.RequestID, body)
		if err == nil {
			p.s.met.onFailure.WithLabelValues("delivered").Inc()
			return nil
		}
		if p.ctx.Err() != nil {
			return p.ctx.Err()
		}
		switch errs.KindOf(err) {
		case errs.KindUnavailable, errs.KindThrottled, errs.KindResourceExhausted, errs.KindDeadlineExceeded, errs.KindInternal, errs.KindUnknown:
			d := p.nextBackoff()
			p.s.log.Warn("delivering an on-failure record: retrying", "uuid", p.lane.uuid, "target", target, "err", err, "backoff", d)
			p.s.sleep(p.ctx, d, nil)
		default:
			p.s.met.onFailure.WithLabelValues("failed").Inc()
			p.s.log.Error("on-failure record refused: dropped", "uuid", p.lane.uuid, "target", target, "err", err, "record", string(body))
			return nil
		}
	}
}

// finishWindow makes the final invoke of the open tumbling window (no
// records, its state) and forgets the window.
func (p *poller) finishWindow(m *skiffv1.EventSourceMapping, early bool) error {
	w := *p.cp.Window
	payload, err := encodeEvent(p.ec, nil, &w, true, early)
	if err != nil {
		return errs.Internal("encoding a window event: %w", err)
	}
	retries := 0
	for {
		if err := p.ctx.Err(); err != nil {
			return err
		}
		resp, err := p.s.inv.InvokeSync(p.ctx, m.GetFunctionName(), payload, newRequestID())
		if err != nil {
			if p.ctx.Err() != nil {
				return p.ctx.Err()
			}
			p.s.sleep(p.ctx, p.nextBackoff(), nil)
			continue
		}
		p.backoff = 0
		if resp.GetFunctionError() == "" {
			p.s.met.batches.WithLabelValues("window_final").Inc()
			break
		}
		p.s.met.batches.WithLabelValues("function_error").Inc()
		retries++
		if r := m.GetMaximumRetryAttempts(); r >= 0 && retries > int(r) {
			p.s.log.Warn("final invoke of a tumbling window failed: state dropped", "uuid", p.lane.uuid, "shard", p.lane.shard, "window_start", w.Start)
			break
		}
		p.s.sleep(p.ctx, p.s.cfg.RetryDelay, nil)
	}
	return p.commit(p.cp.Seq, nil)
}
