package queue

import (
	"context"
	"encoding/json"
	"errors"
	"sort"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

// Create creates a queue. Creating an existing queue with the same config
// returns it (as SQS does); with a different config it is
// errs.KindAlreadyExists.
func (m *Manager) Create(ctx context.Context, req *skiffv1.CreateQueueRequest) (*skiffv1.Queue, error) {
	name := req.GetName()
	if err := validateName("name", name); err != nil {
		return nil, err
	}
	cfg, err := normalizeConfig(name, req.GetConfig())
	if err != nil {
		return nil, err
	}
	if rp := cfg.GetRedrivePolicy(); rp != nil {
		dlq, err := m.queueFor(ctx, "config.redrive_policy.dead_letter_queue", rp.GetDeadLetterQueue())
		if err != nil {
			return nil, errs.Invalid("config.redrive_policy.dead_letter_queue", "dead-letter queue %q: %w", rp.GetDeadLetterQueue(), err)
		}
		if dlq.fifo() != cfg.GetFifo() {
			return nil, errs.Invalid("config.redrive_policy.dead_letter_queue", "the dead-letter queue of a %s queue must be a %s queue too", kindName(cfg.GetFifo()), kindName(cfg.GetFifo()))
		}
	}
	info, err := m.stream.Info(ctx)
	if err != nil {
		return nil, engineErr(err, "reading stream %s", StreamName)
	}
	floor := info.State.LastSeq + 1
	q := &skiffv1.Queue{Name: name, Arn: m.arn(name), Config: cfg, Created: m.now().UTC().Format(time.RFC3339Nano)}
	val, err := encodeRecord(q, floor)
	if err != nil {
		return nil, err
	}
	rev, err := m.queuesKV.Create(ctx, name, val)
	if isConflict(err) {
		existing, gerr := m.readQueue(ctx, name)
		if gerr != nil {
			return nil, gerr
		}
		if proto.Equal(existing.q.GetConfig(), cfg) {
			return existing.q, nil
		}
		return nil, errs.New(errs.KindAlreadyExists, "queue %q exists with a different config", name)
	}
	if err != nil {
		return nil, engineErr(err, "creating queue %q", name)
	}
	rec := &queueRecord{Floor: floor}
	rec.Queue, _ = proto.Marshal(q)
	m.applyQueue(name, rev, rec)
	// Leftovers of an earlier incarnation (a delete that did not finish).
	m.purgeBelow(ctx, token(name), floor)
	m.log.Info("queue created", "queue", name, "fifo", cfg.GetFifo())
	return q, nil
}

func kindName(fifo bool) string {
	if fifo {
		return "FIFO"
	}
	return "standard"
}

func encodeRecord(q *skiffv1.Queue, floor uint64) ([]byte, error) {
	b, err := proto.Marshal(q)
	if err != nil {
		return nil, errs.Internal("encoding queue %q: %w", q.GetName(), err)
	}
	val, err := json.Marshal(queueRecord{Queue: b, Floor: floor})
	if err != nil {
		return nil, errs.Internal("encoding queue %q: %w", q.GetName(), err)
	}
	return val, nil
}

// readQueue reads a queue's metadata from the bucket (not the index).
func (m *Manager) readQueue(ctx context.Context, name string) (*queueMeta, error) {
	e, err := m.queuesKV.Get(ctx, name)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, errs.NotFound("queue %q does not exist", name)
	}
	if err != nil {
		return nil, engineErr(err, "reading queue %q", name)
	}
	var rec queueRecord
	if err := json.Unmarshal(e.Value(), &rec); err != nil {
		return nil, errs.Internal("decoding queue %q: %w", name, err)
	}
	q := &skiffv1.Queue{}
	if err := proto.Unmarshal(rec.Queue, q); err != nil {
		return nil, errs.Internal("decoding queue %q: %w", name, err)
	}
	m.applyQueue(name, e.Revision(), &rec)
	return &queueMeta{q: q, token: token(name), floor: rec.Floor, rev: e.Revision()}, nil
}

// DeleteQueue deletes a queue and its messages. A queue that is another
// queue's dead-letter queue is not deleted (FailedPrecondition).
func (m *Manager) DeleteQueue(ctx context.Context, name string) error {
	q, err := m.queueFor(ctx, "name", name)
	if err != nil {
		return err
	}
	if src := m.sourcesOf(name); len(src) > 0 {
		return failedPrecondition("queue_in_use", "queue %q is the dead-letter queue of %s; change or delete those first", name, strings.Join(src, ", "))
	}
	if err := m.queuesKV.Delete(ctx, name, jetstream.LastRevision(q.rev)); err != nil {
		if isConflict(err) {
			return errs.Conflict("queue %q changed while being deleted; retry", name)
		}
		return engineErr(err, "deleting queue %q", name)
	}
	m.mu.Lock()
	m.applyQueueLocked(name, q.rev+1, nil)
	m.mu.Unlock()
	// The messages go with it; a later queue of the same name starts above
	// its own floor anyway.
	m.purgeBelow(ctx, q.token, 0)
	m.log.Info("queue deleted", "queue", name)
	return nil
}

// sourcesOf lists the queues whose redrive policy names dlq.
func (m *Manager) sourcesOf(dlq string) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for name, q := range m.queues {
		if !q.deleted && q.q.GetConfig().GetRedrivePolicy().GetDeadLetterQueue() == dlq {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out
}

// purgeBelow removes a token's messages below seq (all of them when seq is
// 0) and all its receive state, best effort: the index already ignores
// them.
func (m *Manager) purgeBelow(ctx context.Context, tok string, seq uint64) {
	opts := []jetstream.StreamPurgeOpt{jetstream.WithPurgeSubject(msgSubject(tok))}
	if seq > 0 {
		opts = append(opts, jetstream.WithPurgeSequence(seq))
	}
	if err := m.stream.Purge(ctx, opts...); err != nil {
		m.log.Warn("purging queue messages", "token", tok, "err", err)
	}
	if err := m.stateStream.Purge(ctx, jetstream.WithPurgeSubject(statePrefix+tok+".>")); err != nil {
		m.log.Warn("purging queue message state", "token", tok, "err", err)
	}
}

// List returns the queues whose names start with prefix, by name.
func (m *Manager) List(ctx context.Context, prefix string) []*skiffv1.Queue {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []*skiffv1.Queue
	for name, q := range m.queues {
		if !q.deleted && strings.HasPrefix(name, prefix) {
			out = append(out, q.q)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].GetName() < out[j].GetName() })
	return out
}

// Attributes returns a queue and its approximate message counts.
func (m *Manager) Attributes(ctx context.Context, name string) (*skiffv1.GetQueueAttributesResponse, error) {
	q, err := m.queueFor(ctx, "name", name)
	if err != nil {
		return nil, err
	}
	c := m.counts(q)
	return &skiffv1.GetQueueAttributesResponse{
		Queue:                         q.q,
		ApproximateMessages:           c.visible,
		ApproximateMessagesNotVisible: c.inFlight,
		ApproximateMessagesDelayed:    c.delayed,
		OldestMessageAgeSeconds:       c.oldestAge,
	}, nil
}

type counts struct{ visible, inFlight, delayed, oldestAge int64 }

func (m *Manager) counts(q *queueMeta) counts {
	now := ms(m.now())
	expiry := q.retention().Milliseconds()
	var out counts
	oldest := int64(-1)
	m.mu.Lock()
	defer m.mu.Unlock()
	c := m.caches[q.token]
	if c == nil {
		return out
	}
	c.each(func(e *entry) bool {
		if e.sent+expiry <= now {
			return true
		}
		switch {
		case e.inFlight(now) || e.claiming:
			out.inFlight++
		case e.delayed(now):
			out.delayed++
		default:
			out.visible++
		}
		if oldest < 0 || e.sent < oldest {
			oldest = e.sent
		}
		return true
	})
	if oldest >= 0 && now > oldest {
		out.oldestAge = (now - oldest) / 1000
	}
	return out
}

// Purge deletes every message in a queue (sent before the purge).
func (m *Manager) Purge(ctx context.Context, name string) error {
	for attempt := 0; ; attempt++ {
		q, err := m.queueFor(ctx, "name", name)
		if err != nil {
			return err
		}
		info, err := m.stream.Info(ctx)
		if err != nil {
			return engineErr(err, "reading stream %s", StreamName)
		}
		floor := info.State.LastSeq + 1
		val, err := encodeRecord(q.q, floor)
		if err != nil {
			return err
		}
		rev, err := m.queuesKV.Update(ctx, name, val, q.rev)
		if isConflict(err) && attempt < 3 {
			if _, err := m.readQueue(ctx, name); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return engineErr(err, "purging queue %q", name)
		}
		rec := &queueRecord{Floor: floor}
		rec.Queue, _ = proto.Marshal(q.q)
		m.applyQueue(name, rev, rec)
		m.purgeBelow(ctx, q.token, floor)
		m.metrics.purged.WithLabelValues(name).Inc()
		return nil
	}
}

// Redrive moves the messages of a dead-letter queue that are not in flight
// to destination (by default the one queue whose redrive policy names the
// dead-letter queue) and returns how many moved.
func (m *Manager) Redrive(ctx context.Context, req *skiffv1.RedriveQueueRequest) (int64, error) {
	dlq, err := m.queueFor(ctx, "dead_letter_queue", req.GetDeadLetterQueue())
	if err != nil {
		return 0, err
	}
	destName := req.GetDestination()
	if destName == "" {
		src := m.sourcesOf(dlq.q.GetName())
		if len(src) != 1 {
			return 0, errs.Invalid("destination", "%d queues use %q as their dead-letter queue; name the destination", len(src), dlq.q.GetName())
		}
		destName = src[0]
	}
	dest, err := m.queueFor(ctx, "destination", destName)
	if err != nil {
		return 0, err
	}
	if dest.q.GetName() == dlq.q.GetName() {
		return 0, errs.Invalid("destination", "cannot redrive a queue into itself")
	}
	if dest.fifo() != dlq.fifo() {
		return 0, errs.Invalid("destination", "cannot redrive a %s queue into a %s queue", kindName(dlq.fifo()), kindName(dest.fifo()))
	}
	var moved int64
	for {
		picks := m.pickAll(dlq, 100)
		if len(picks) == 0 {
			return moved, nil
		}
		progress := false
		for i, p := range picks {
			ok, err := m.move(ctx, dlq, dest, p, true)
			if err != nil {
				m.release(dlq.token, picks[i:])
				return moved, err
			}
			m.release(dlq.token, picks[i:i+1])
			if ok {
				moved++
				progress = true
			}
		}
		if !progress {
			return moved, nil
		}
	}
}

// pickAll marks up to n messages of q that are not in flight for a move.
func (m *Manager) pickAll(q *queueMeta, n int) []pick {
	now := ms(m.now())
	expiry := q.retention().Milliseconds()
	m.mu.Lock()
	defer m.mu.Unlock()
	c := m.caches[q.token]
	if c == nil {
		return nil
	}
	var out []pick
	c.each(func(e *entry) bool {
		if e.claiming || e.inFlight(now) || e.sent+expiry <= now {
			return true
		}
		e.claiming = true
		out = append(out, snapshot(e))
		return len(out) < n
	})
	return out
}
