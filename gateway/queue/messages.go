package queue

import (
	"context"
	"crypto/md5"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/uuid"
)

// Send stores one message; it is durable when Send returns.
func (m *Manager) Send(ctx context.Context, req *skiffv1.SendMessageRequest) (*skiffv1.SendMessageResponse, error) {
	q, err := m.queueFor(ctx, "queue", req.GetQueue())
	if err != nil {
		return nil, err
	}
	in := &sendInput{body: req.GetBody(), delay: req.DelaySeconds, attrs: req.GetMessageAttributes(),
		group: req.GetMessageGroupId(), dedup: req.GetMessageDeduplicationId()}
	if _, err := validateSend(q, in); err != nil {
		return nil, err
	}
	return m.publish(ctx, q, in)
}

func md5Hex(s string) string {
	sum := md5.Sum([]byte(s))
	return hex.EncodeToString(sum[:])
}

func (m *Manager) publish(ctx context.Context, q *queueMeta, in *sendInput) (*skiffv1.SendMessageResponse, error) {
	cfg := q.q.GetConfig()
	now := m.now()
	delay := cfg.GetDelaySeconds()
	if in.delay != nil {
		delay = *in.delay
	}
	sent := ms(now)
	visible := sent + int64(delay)*1000
	id := newID()
	sum := md5Hex(in.body)
	attrs := map[string]string{
		"SentTimestamp": strconv.FormatInt(sent, 10),
		"SenderId":      m.cfg.AccountID,
	}
	var opts []jetstream.PublishOpt
	if q.fifo() {
		dedup := in.dedup
		if dedup == "" {
			h := sha256.Sum256([]byte(in.body))
			dedup = hex.EncodeToString(h[:])
		}
		attrs["MessageGroupId"] = in.group
		attrs["MessageDeduplicationId"] = dedup
		opts = append(opts, jetstream.WithMsgID(q.token+":"+dedup))
	}
	env := &skiffv1.Message{MessageId: id, Body: in.body, Md5OfBody: sum, Attributes: attrs, MessageAttributes: in.attrs}
	data, err := proto.Marshal(env)
	if err != nil {
		return nil, errs.Internal("encoding message: %w", err)
	}
	msg := nats.NewMsg(msgSubject(q.token))
	msg.Data = data
	msg.Header.Set(hdrID, id)
	msg.Header.Set(hdrSent, strconv.FormatInt(sent, 10))
	msg.Header.Set(hdrVisible, strconv.FormatInt(visible, 10))
	if in.group != "" {
		msg.Header.Set(hdrGroup, in.group)
	}
	ack, err := m.js.PublishMsg(ctx, msg, opts...)
	if err != nil {
		return nil, engineErr(err, "storing a message in queue %q", q.q.GetName())
	}
	if ack.Duplicate {
		id = m.originalID(ctx, ack.Sequence)
	} else {
		m.applyBody(q.token, ack.Sequence, sent, visible, in.group, false)
		m.metrics.sent.WithLabelValues(q.q.GetName()).Inc()
	}
	out := &skiffv1.SendMessageResponse{MessageId: id, Md5OfBody: sum}
	if q.fifo() {
		out.SequenceNumber = fmt.Sprintf("%020d", ack.Sequence)
	}
	return out, nil
}

// originalID is the id of the message a duplicate send matched.
func (m *Manager) originalID(ctx context.Context, seq uint64) string {
	raw, err := m.stream.GetMsg(ctx, seq)
	if err == nil {
		if id := raw.Header.Get(hdrID); id != "" {
			return id
		}
	}
	// Already deleted: an id derived from its sequence, stable across retries.
	h := sha256.Sum256([]byte(strconv.FormatUint(seq, 10)))
	return uuid.Format([16]byte(h[:16]))
}

// SendBatch stores 1-10 messages (256 KB in total) with a result per entry.
func (m *Manager) SendBatch(ctx context.Context, req *skiffv1.SendMessageBatchRequest) (*skiffv1.SendMessageBatchResponse, error) {
	q, err := m.queueFor(ctx, "queue", req.GetQueue())
	if err != nil {
		return nil, err
	}
	entries := req.GetEntries()
	ids := make([]string, len(entries))
	total := 0
	for i, e := range entries {
		ids[i] = e.GetId()
		total += len(e.GetBody())
		for name, a := range e.GetMessageAttributes() {
			total += len(name) + len(a.GetDataType()) + len(a.GetStringValue()) + len(a.GetBinaryValue())
		}
	}
	if err := validateBatchIDs(ids); err != nil {
		return nil, err
	}
	if total > MaxBatchBytes {
		return nil, errs.Invalid("entries", "the batch holds %d bytes; at most %d are allowed in total", total, MaxBatchBytes)
	}
	type result struct {
		ok  *skiffv1.SendMessageBatchResultEntry
		bad *skiffv1.BatchResultError
	}
	results := make([]result, len(entries))
	inputs := make([]*sendInput, len(entries))
	for i, e := range entries {
		in := &sendInput{body: e.GetBody(), delay: e.DelaySeconds, attrs: e.GetMessageAttributes(),
			group: e.GetMessageGroupId(), dedup: e.GetMessageDeduplicationId()}
		if _, err := validateSend(q, in); err != nil {
			results[i].bad = batchError(e.GetId(), err)
			continue
		}
		inputs[i] = in
	}
	send := func(i int) {
		resp, err := m.publish(ctx, q, inputs[i])
		if err != nil {
			results[i].bad = batchError(entries[i].GetId(), err)
			return
		}
		results[i].ok = &skiffv1.SendMessageBatchResultEntry{Id: entries[i].GetId(), MessageId: resp.GetMessageId(),
			Md5OfBody: resp.GetMd5OfBody(), SequenceNumber: resp.GetSequenceNumber()}
	}
	if q.fifo() {
		for i := range entries { // in order: the batch's order is the group's
			if inputs[i] != nil {
				send(i)
			}
		}
	} else {
		var wg sync.WaitGroup
		for i := range entries {
			if inputs[i] != nil {
				wg.Add(1)
				go func() { defer wg.Done(); send(i) }()
			}
		}
		wg.Wait()
	}
	out := &skiffv1.SendMessageBatchResponse{}
	for _, r := range results {
		if r.ok != nil {
			out.Successful = append(out.Successful, r.ok)
		} else {
			out.Failed = append(out.Failed, r.bad)
		}
	}
	return out, nil
}

func batchError(id string, err error) *skiffv1.BatchResultError {
	var e *errs.Error
	code, fault := "internal", false
	if errors.As(err, &e) {
		code, fault = e.Reason, e.Fault == errs.FaultCaller
	}
	return &skiffv1.BatchResultError{Id: id, Code: code, Message: err.Error(), SenderFault: fault}
}

// pick is a snapshot of an index entry taken for a claim.
type pick struct {
	seq      uint64
	rev      uint64
	receives int
	first    int64
	sent     int64
	group    string
}

func snapshot(e *entry) pick {
	return pick{seq: e.seq, rev: e.rev, receives: e.receives, first: e.first, sent: e.sent, group: e.group}
}

// release clears the claiming marks of picks.
func (m *Manager) release(tok string, picks []pick) {
	m.mu.Lock()
	defer m.mu.Unlock()
	c := m.caches[tok]
	if c == nil {
		return
	}
	for _, p := range picks {
		if e := c.msgs[p.seq]; e != nil {
			e.claiming = false
		}
	}
}

// Receive returns up to MaxMessages messages, waiting up to the long-poll
// wait for the first one.
func (m *Manager) Receive(ctx context.Context, req *skiffv1.ReceiveMessageRequest) ([]*skiffv1.Message, error) {
	q, err := m.queueFor(ctx, "queue", req.GetQueue())
	if err != nil {
		return nil, err
	}
	max := req.GetMaxMessages()
	if max == 0 {
		max = 1
	}
	if max < 1 || max > MaxBatchEntries {
		return nil, errs.Invalid("max_messages", "max messages %d is not within 1-%d", max, MaxBatchEntries)
	}
	wait := time.Duration(q.q.GetConfig().GetReceiveWaitSeconds()) * time.Second
	if w := req.WaitSeconds; w != nil {
		if *w < 0 || *w > MaxWaitSeconds {
			return nil, errs.Invalid("wait_seconds", "wait %d is not within 0-%d", *w, MaxWaitSeconds)
		}
		wait = time.Duration(*w) * time.Second
	}
	vis := q.visibility()
	if v := req.VisibilityTimeoutSeconds; v != nil {
		if *v < 0 || *v > 43200 {
			return nil, errs.Invalid("visibility_timeout_seconds", "visibility timeout %d is not within 0-43200", *v)
		}
		vis = time.Duration(*v) * time.Second
	}
	deadline := time.Now().Add(wait)
	var poll *time.Ticker
	var timeout <-chan time.Time
	for {
		changed := m.changedCh()
		q, err := m.queueFor(ctx, "queue", req.GetQueue())
		if err != nil {
			return nil, err
		}
		msgs, err := m.receiveOnce(ctx, q, int(max), vis)
		if err != nil || len(msgs) > 0 {
			return msgs, err
		}
		if wait <= 0 || !time.Now().Before(deadline) {
			return nil, nil
		}
		if poll == nil {
			poll = time.NewTicker(m.cfg.PollInterval)
			defer poll.Stop()
			t := time.NewTimer(time.Until(deadline))
			defer t.Stop()
			timeout = t.C
		}
		select {
		case <-ctx.Done():
			return nil, engineErr(ctx.Err(), "receiving from queue %q", q.q.GetName())
		case <-changed:
		case <-poll.C:
		case <-timeout:
		}
	}
}

type outcome int

const (
	claimed outcome = iota
	conflicted
	gone
	moved
)

func (m *Manager) receiveOnce(ctx context.Context, q *queueMeta, max int, vis time.Duration) ([]*skiffv1.Message, error) {
	var out []*skiffv1.Message
	// A pick that loses its compare-and-set (another receiver, or an index
	// that was behind) refreshes the index; a few rounds fill the batch.
	for round := 0; round < 4 && len(out) < max; round++ {
		got, retry, err := m.receiveRound(ctx, q, max-len(out), vis)
		if err != nil {
			if len(out) > 0 {
				m.log.Warn("receive cut short", "queue", q.q.GetName(), "err", err)
				return out, nil
			}
			return nil, err
		}
		out = append(out, got...)
		if !retry {
			break
		}
	}
	return out, nil
}

// receiveRound claims up to max messages; retry reports picks that did
// not become messages.
func (m *Manager) receiveRound(ctx context.Context, q *queueMeta, max int, vis time.Duration) (out []*skiffv1.Message, retry bool, err error) {
	now := m.now()
	picks, expired := m.pickForReceive(q, 2*max, ms(now))
	for _, seq := range expired {
		if err := m.remove(ctx, q.token, seq); err != nil {
			m.log.Warn("removing an expired message", "queue", q.q.GetName(), "seq", seq, "err", err)
		} else {
			m.metrics.expired.WithLabelValues(q.q.GetName()).Inc()
		}
	}
	defer m.release(q.token, picks)
	skipGroup := map[string]bool{}
	for _, p := range picks {
		if len(out) == max {
			break
		}
		if q.fifo() && skipGroup[p.group] {
			continue
		}
		msg, res, err := m.claim(ctx, q, p, vis, now)
		if err != nil {
			if len(out) > 0 {
				m.log.Warn("receive cut short", "queue", q.q.GetName(), "err", err)
				return out, false, nil
			}
			return nil, false, err
		}
		switch res {
		case claimed:
			out = append(out, msg)
		case conflicted:
			skipGroup[p.group] = true
			retry = true
		default:
			retry = true
		}
	}
	return out, retry, nil
}

// pickForReceive marks up to n receivable messages of q as being claimed,
// and returns them with the sequences of expired messages (up to 100).
// FIFO queues: only groups with nothing in flight, each from its first
// message on, stopping at a message that is not yet visible.
func (m *Manager) pickForReceive(q *queueMeta, n int, now int64) (picks []pick, expired []uint64) {
	expiry := q.retention().Milliseconds()
	m.mu.Lock()
	defer m.mu.Unlock()
	c := m.caches[q.token]
	if c == nil {
		return nil, nil
	}
	isExpired := func(e *entry) bool {
		if e.sent+expiry > now {
			return false
		}
		if !e.claiming && len(expired) < 100 {
			expired = append(expired, e.seq)
		}
		return true
	}
	if !q.fifo() {
		c.each(func(e *entry) bool {
			if isExpired(e) || e.claiming || e.visibleAt > now {
				return true
			}
			e.claiming = true
			picks = append(picks, snapshot(e))
			return len(picks) < n
		})
		return picks, expired
	}
	busy := map[string]bool{}
	c.each(func(e *entry) bool {
		if e.claiming || e.inFlight(now) {
			busy[e.group] = true
		}
		return true
	})
	c.each(func(e *entry) bool {
		if isExpired(e) || busy[e.group] {
			return true
		}
		if e.visibleAt > now { // a delayed head holds its group back
			busy[e.group] = true
			return true
		}
		e.claiming = true
		picks = append(picks, snapshot(e))
		return len(picks) < n
	})
	return picks, expired
}

// claim receives one picked message: a compare-and-set on its state, then
// the read of its body. A message received max receive count times moves
// to the dead-letter queue instead.
func (m *Manager) claim(ctx context.Context, q *queueMeta, p pick, vis time.Duration, now time.Time) (*skiffv1.Message, outcome, error) {
	if rp := q.q.GetConfig().GetRedrivePolicy(); rp != nil && p.receives >= int(rp.GetMaxReceiveCount()) {
		dlq, err := m.queueFor(ctx, "dead_letter_queue", rp.GetDeadLetterQueue())
		if err == nil {
			ok, err := m.move(ctx, q, dlq, p, false)
			if err != nil {
				return nil, 0, err
			}
			if !ok {
				return nil, conflicted, nil
			}
			m.metrics.deadLettered.WithLabelValues(q.q.GetName()).Inc()
			return nil, moved, nil
		}
		m.metrics.deadLetterErrors.WithLabelValues(q.q.GetName()).Inc()
		m.log.Error("dead-letter queue missing; delivering the message again", "queue", q.q.GetName(), "dlq", rp.GetDeadLetterQueue(), "err", err)
	}
	nowMs := ms(now)
	st := msgState{VisibleAt: nowMs + vis.Milliseconds(), Receives: p.receives + 1, FirstReceive: p.first, Nonce: newNonce()}
	if st.FirstReceive == 0 {
		st.FirstReceive = nowMs
	}
	rev, err := m.writeState(ctx, q.token, p, &st)
	if err != nil || rev == 0 {
		return nil, conflicted, err
	}
	raw, err := m.getBody(ctx, p.seq)
	if isNotFound(err) {
		m.dropState(ctx, q.token, p.seq)
		return nil, gone, nil
	}
	if err != nil {
		return nil, 0, engineErr(err, "reading a message of queue %q", q.q.GetName())
	}
	env, err := m.decode(q, raw)
	if err != nil {
		m.log.Error("dropping an unreadable message", "queue", q.q.GetName(), "seq", p.seq, "err", err)
		m.dropState(ctx, q.token, p.seq)
		return nil, gone, nil
	}
	env.ReceiptHandle = encodeHandle(q.token, p.seq, st.Nonce)
	env.Attributes["ApproximateReceiveCount"] = strconv.Itoa(st.Receives)
	env.Attributes["ApproximateFirstReceiveTimestamp"] = strconv.FormatInt(st.FirstReceive, 10)
	if q.fifo() {
		env.Attributes["SequenceNumber"] = fmt.Sprintf("%020d", p.seq)
	}
	m.metrics.received.WithLabelValues(q.q.GetName()).Inc()
	return env, claimed, nil
}

// writeState stores st for a picked message with a compare-and-set on the
// revision the pick saw. It returns 0 (and refreshes the index) when the
// message changed since.
func (m *Manager) writeState(ctx context.Context, tok string, p pick, st *msgState) (uint64, error) {
	val, err := json.Marshal(st)
	if err != nil {
		return 0, errs.Internal("encoding message state: %w", err)
	}
	rev, err := m.stateKV.Update(ctx, stateKey(tok, p.seq), val, p.rev)
	if isConflict(err) {
		m.refresh(ctx, tok, p.seq)
		return 0, nil
	}
	if err != nil {
		return 0, engineErr(err, "claiming a message")
	}
	m.applyState(tok, p.seq, rev, st)
	return rev, nil
}

// decode reads a stored message that belongs to q.
func (m *Manager) decode(q *queueMeta, raw *jetstream.RawStreamMsg) (*skiffv1.Message, error) {
	if raw.Subject != msgSubject(q.token) {
		return nil, fmt.Errorf("sequence %d is on subject %q, not queue %q's", raw.Sequence, raw.Subject, q.q.GetName())
	}
	env := &skiffv1.Message{}
	if err := proto.Unmarshal(raw.Data, env); err != nil {
		return nil, fmt.Errorf("decoding message %d: %w", raw.Sequence, err)
	}
	if env.Attributes == nil {
		env.Attributes = map[string]string{}
	}
	return env, nil
}

// getBody reads the stored message at seq. Reads are direct gets, which
// any replica of the stream may answer, and a replica that has not yet
// applied a message the leader acknowledged answers "not found": a claim
// right after a send (the index knows its own writes at once) can meet one
// on a cluster. A not-found is therefore confirmed by the stream leader
// before the message counts as gone; otherwise its state would be dropped
// and the index would forget a message that exists, which then stays in
// the stream and is never received.
func (m *Manager) getBody(ctx context.Context, seq uint64) (*jetstream.RawStreamMsg, error) {
	raw, err := m.stream.GetMsg(ctx, seq)
	if !isNotFound(err) {
		return raw, err
	}
	return m.leaderGetMsg(ctx, seq)
}

// leaderGetMsg reads the message at seq through the stream leader (the
// JetStream API's message get, not a direct get).
func (m *Manager) leaderGetMsg(ctx context.Context, seq uint64) (*jetstream.RawStreamMsg, error) {
	ctx, cancel := context.WithTimeout(ctx, leaderGetTimeout)
	defer cancel()
	req, err := json.Marshal(struct {
		Seq uint64 `json:"seq"`
	}{seq})
	if err != nil {
		return nil, err
	}
	reply, err := m.js.Conn().RequestWithContext(ctx, "$JS.API.STREAM.MSG.GET."+StreamName, req)
	if err != nil {
		return nil, fmt.Errorf("reading message %d from the stream leader: %w", seq, err)
	}
	var resp struct {
		Error *struct {
			ErrCode     jetstream.ErrorCode `json:"err_code"`
			Description string              `json:"description"`
		} `json:"error"`
		Message *struct {
			Subject string    `json:"subject"`
			Seq     uint64    `json:"seq"`
			Header  []byte    `json:"hdrs"`
			Data    []byte    `json:"data"`
			Time    time.Time `json:"time"`
		} `json:"message"`
	}
	if err := json.Unmarshal(reply.Data, &resp); err != nil {
		return nil, fmt.Errorf("reading message %d from the stream leader: %w", seq, err)
	}
	switch {
	case resp.Error != nil && resp.Error.ErrCode == jetstream.JSErrCodeMessageNotFound:
		return nil, jetstream.ErrMsgNotFound
	case resp.Error != nil:
		return nil, fmt.Errorf("reading message %d from the stream leader: %s", seq, resp.Error.Description)
	case resp.Message == nil:
		return nil, fmt.Errorf("reading message %d from the stream leader: empty answer", seq)
	}
	raw := &jetstream.RawStreamMsg{Subject: resp.Message.Subject, Sequence: resp.Message.Seq, Data: resp.Message.Data, Time: resp.Message.Time}
	if len(resp.Message.Header) > 0 {
		if raw.Header, err = nats.DecodeHeadersMsg(resp.Message.Header); err != nil {
			return nil, fmt.Errorf("reading message %d from the stream leader: %w", seq, err)
		}
	}
	return raw, nil
}

// leaderGetTimeout bounds the leader's confirmation of a missing message.
const leaderGetTimeout = 5 * time.Second

// dropState forgets a message whose body is gone.
func (m *Manager) dropState(ctx context.Context, tok string, seq uint64) {
	if err := m.stateKV.Delete(ctx, stateKey(tok, seq)); err != nil {
		m.log.Debug("deleting message state", "token", tok, "seq", seq, "err", err)
	}
	m.forget(tok, seq)
}

// remove deletes a message and its state.
func (m *Manager) remove(ctx context.Context, tok string, seq uint64) error {
	if err := m.stream.DeleteMsg(ctx, seq); err != nil && !isNotFound(err) {
		return engineErr(err, "deleting a message")
	}
	m.dropState(ctx, tok, seq)
	return nil
}

// move moves a picked message from one queue to another: a
// compare-and-set hides it, the copy is published (deduplicated, so a
// retried move after a crash does not duplicate it), then the original is
// deleted. redrive gives the copy a new sent time.
func (m *Manager) move(ctx context.Context, from, to *queueMeta, p pick, redrive bool) (bool, error) {
	now := m.now()
	nowMs := ms(now)
	st := msgState{VisibleAt: nowMs + moveGuard.Milliseconds(), Receives: p.receives, FirstReceive: p.first, Nonce: "move-" + newNonce()}
	rev, err := m.writeState(ctx, from.token, p, &st)
	if err != nil || rev == 0 {
		return false, err
	}
	raw, err := m.getBody(ctx, p.seq)
	if isNotFound(err) {
		m.dropState(ctx, from.token, p.seq)
		return false, nil
	}
	if err != nil {
		return false, engineErr(err, "reading a message of queue %q", from.q.GetName())
	}
	env, err := m.decode(from, raw)
	if err != nil {
		m.log.Error("dropping an unreadable message", "queue", from.q.GetName(), "seq", p.seq, "err", err)
		m.dropState(ctx, from.token, p.seq)
		return false, nil
	}
	sent := p.sent
	if redrive {
		sent = nowMs
		env.Attributes["SentTimestamp"] = strconv.FormatInt(sent, 10)
	}
	data, err := proto.Marshal(env)
	if err != nil {
		return false, errs.Internal("encoding message: %w", err)
	}
	msg := nats.NewMsg(msgSubject(to.token))
	msg.Data = data
	msg.Header.Set(hdrID, env.GetMessageId())
	msg.Header.Set(hdrSent, strconv.FormatInt(sent, 10))
	msg.Header.Set(hdrVisible, strconv.FormatInt(nowMs, 10))
	if p.group != "" {
		msg.Header.Set(hdrGroup, p.group)
	}
	ack, err := m.js.PublishMsg(ctx, msg, jetstream.WithMsgID(to.token+":mv:"+from.token+":"+strconv.FormatUint(p.seq, 10)))
	if err != nil {
		return false, engineErr(err, "moving a message to queue %q", to.q.GetName())
	}
	if !ack.Duplicate {
		m.applyBody(to.token, ack.Sequence, sent, nowMs, p.group, false)
	}
	if err := m.remove(ctx, from.token, p.seq); err != nil {
		return false, err
	}
	if redrive {
		m.metrics.redriven.WithLabelValues(from.q.GetName()).Inc()
	}
	return true, nil
}

// handle is a decoded receipt handle.
type handle struct {
	token string
	seq   uint64
	nonce string
}

func encodeHandle(tok string, seq uint64, nonce string) string {
	return base64.RawURLEncoding.EncodeToString([]byte(tok + "." + strconv.FormatUint(seq, 10) + "." + nonce))
}

func decodeHandle(q *queueMeta, s string) (handle, error) {
	bad := errs.Invalid("receipt_handle", "receipt handle is not one of queue %q's", q.q.GetName())
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return handle{}, bad
	}
	parts := strings.Split(string(b), ".")
	if len(parts) != 3 || parts[0] != q.token || parts[2] == "" {
		return handle{}, bad
	}
	seq, err := strconv.ParseUint(parts[1], 10, 64)
	if err != nil || seq == 0 {
		return handle{}, bad
	}
	return handle{token: parts[0], seq: seq, nonce: parts[2]}, nil
}

// readState returns a message's stored state and revision; nil when it
// has none (never received, or deleted).
func (m *Manager) readState(ctx context.Context, tok string, seq uint64) (*msgState, uint64, error) {
	e, err := m.stateKV.Get(ctx, stateKey(tok, seq))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, 0, nil
	}
	if err != nil {
		return nil, 0, engineErr(err, "reading message state")
	}
	var st msgState
	if err := json.Unmarshal(e.Value(), &st); err != nil {
		return nil, 0, errs.Internal("decoding message state: %w", err)
	}
	return &st, e.Revision(), nil
}

func staleHandle() error {
	return failedPrecondition("stale_receipt_handle", "the receipt handle is stale: the message was received again since")
}

// Delete deletes the message a receipt handle names. Deleting a message
// that is already gone succeeds; a stale handle (the message was received
// again since) fails.
func (m *Manager) Delete(ctx context.Context, queue, receiptHandle string) error {
	q, err := m.queueFor(ctx, "queue", queue)
	if err != nil {
		return err
	}
	h, err := decodeHandle(q, receiptHandle)
	if err != nil {
		return err
	}
	st, _, err := m.readState(ctx, h.token, h.seq)
	if err != nil {
		return err
	}
	if st == nil {
		return nil
	}
	if st.Nonce != h.nonce {
		return staleHandle()
	}
	if err := m.remove(ctx, h.token, h.seq); err != nil {
		return err
	}
	m.metrics.deleted.WithLabelValues(q.q.GetName()).Inc()
	return nil
}

// DeleteBatch deletes 1-10 messages with a result per entry.
func (m *Manager) DeleteBatch(ctx context.Context, req *skiffv1.DeleteMessageBatchRequest) (*skiffv1.DeleteMessageBatchResponse, error) {
	if _, err := m.queueFor(ctx, "queue", req.GetQueue()); err != nil {
		return nil, err
	}
	ids := make([]string, len(req.GetEntries()))
	for i, e := range req.GetEntries() {
		ids[i] = e.GetId()
	}
	if err := validateBatchIDs(ids); err != nil {
		return nil, err
	}
	out := &skiffv1.DeleteMessageBatchResponse{}
	for _, e := range req.GetEntries() {
		if err := m.Delete(ctx, req.GetQueue(), e.GetReceiptHandle()); err != nil {
			out.Failed = append(out.Failed, batchError(e.GetId(), err))
			continue
		}
		out.Successful = append(out.Successful, e.GetId())
	}
	return out, nil
}

// ChangeVisibility makes a received message visible again d from now
// (0-12 h). The message must still be in flight under this handle.
func (m *Manager) ChangeVisibility(ctx context.Context, queue, receiptHandle string, d time.Duration) error {
	q, err := m.queueFor(ctx, "queue", queue)
	if err != nil {
		return err
	}
	if d < 0 || d > 43200*time.Second {
		return errs.Invalid("visibility_timeout_seconds", "visibility timeout %v is not within 0-43200s", d)
	}
	h, err := decodeHandle(q, receiptHandle)
	if err != nil {
		return err
	}
	st, rev, err := m.readState(ctx, h.token, h.seq)
	if err != nil {
		return err
	}
	if st == nil {
		return errs.NotFound("the message of this receipt handle no longer exists")
	}
	if st.Nonce != h.nonce {
		return staleHandle()
	}
	now := ms(m.now())
	if st.VisibleAt <= now {
		return failedPrecondition("message_not_in_flight", "the message is visible again: its visibility timeout has expired")
	}
	st.VisibleAt = now + d.Milliseconds()
	nrev, err := m.writeState(ctx, h.token, pick{seq: h.seq, rev: rev}, st)
	if err != nil {
		return err
	}
	if nrev == 0 {
		return staleHandle()
	}
	return nil
}

// sweepLoop deletes expired messages every SweepInterval.
func (m *Manager) sweepLoop(ctx context.Context) {
	defer m.wg.Done()
	t := time.NewTicker(m.cfg.SweepInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			m.sweep(ctx)
			m.pruneGone()
		}
	}
}

// sweep deletes the messages past their queue's retention and returns how
// many it deleted.
func (m *Manager) sweep(ctx context.Context) int {
	now := ms(m.now())
	type victim struct {
		name, tok string
		seq       uint64
	}
	var victims []victim
	m.mu.Lock()
	for name, q := range m.queues {
		if q.deleted {
			continue
		}
		c := m.caches[q.token]
		if c == nil {
			continue
		}
		expiry := q.retention().Milliseconds()
		c.each(func(e *entry) bool {
			if !e.claiming && e.sent+expiry <= now {
				victims = append(victims, victim{name, q.token, e.seq})
			}
			return true
		})
	}
	m.mu.Unlock()
	n := 0
	for _, v := range victims {
		if err := m.remove(ctx, v.tok, v.seq); err != nil {
			m.log.Warn("removing an expired message", "queue", v.name, "seq", v.seq, "err", err)
			continue
		}
		m.metrics.expired.WithLabelValues(v.name).Inc()
		n++
	}
	return n
}
