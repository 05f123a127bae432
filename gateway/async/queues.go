package async

import (
	"context"
	"errors"
	"sort"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"skiff.dev/skiff/internal/errs"
)

// consumerName returns the durable consumer of a queue subject.
func consumerName(subject string) string { return strings.ReplaceAll(subject, ".", "_") }

// ensureConsumer returns the durable pull consumer of a queue, creating it
// when missing. Every poller of the queue (on any gateway) shares it, so
// JetStream hands each event to one of them.
func (s *Service) ensureConsumer(ctx context.Context, subject string) (jetstream.Consumer, error) {
	s.consMu.Lock()
	defer s.consMu.Unlock()
	if c, ok := s.consumers[subject]; ok {
		return c, nil
	}
	c, err := s.js.CreateOrUpdateConsumer(ctx, StreamName, jetstream.ConsumerConfig{
		Durable:       consumerName(subject),
		Description:   "skiff async pollers of " + subject,
		FilterSubject: subject,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       s.cfg.AckWait,
		MaxDeliver:    -1,
		MaxAckPending: -1,
		DeliverPolicy: jetstream.DeliverAllPolicy,
	})
	if err != nil {
		return nil, errs.Unavailable("creating consumer of %s: %w", subject, err)
	}
	s.consumers[subject] = c
	return c, nil
}

// QueueStats is the state of one async queue.
type QueueStats struct {
	Subject string
	// Function is the owner of a dedicated queue ("" for a shared one).
	Function string
	// Routed reports whether new events of Function go to this dedicated
	// queue.
	Routed bool
	// Backlog is the messages stored and not yet acknowledged: waiting,
	// delayed for a retry or being invoked. A batch message (a group of
	// accepts, batch.go) counts once however many events it holds.
	Backlog uint64
	// InFlight is the part of Backlog delivered to a poller and not yet
	// acknowledged (including events waiting for a retry).
	InFlight uint64
	// OldestAge is the age of the oldest stored event (since its first
	// accept); 0 when the queue is empty.
	OldestAge time.Duration
}

// Queues returns the state of every async queue: the shared ones, the
// dedicated queues functions are routed to and any other dedicated queue
// that still holds events.
func (s *Service) Queues(ctx context.Context) ([]QueueStats, error) {
	subjects := map[string]QueueStats{}
	for i := range s.cfg.SharedQueues {
		subj := SharedSubject(i)
		subjects[subj] = QueueStats{Subject: subj}
	}
	for fn := range s.routes.all() {
		subj := DedicatedSubject(fn)
		subjects[subj] = QueueStats{Subject: subj, Function: fn, Routed: true}
	}
	info, err := s.stream.Info(ctx, jetstream.WithSubjectFilter(dedicatedPattern))
	if err != nil {
		return nil, errs.Unavailable("reading stream %s: %w", StreamName, err)
	}
	for subj := range info.State.Subjects {
		if _, ok := subjects[subj]; !ok {
			subjects[subj] = QueueStats{Subject: subj, Function: strings.TrimPrefix(subj, DedicatedPrefix)}
		}
	}
	out := make([]QueueStats, 0, len(subjects))
	for _, q := range subjects {
		if err := s.fillStats(ctx, &q); err != nil {
			return nil, err
		}
		out = append(out, q)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Subject < out[j].Subject })
	return out, nil
}

func (s *Service) fillStats(ctx context.Context, q *QueueStats) error {
	c, err := s.ensureConsumer(ctx, q.Subject)
	if err != nil {
		return err
	}
	ci, err := c.Info(ctx)
	if err != nil {
		if errors.Is(err, jetstream.ErrConsumerNotFound) {
			s.forgetConsumer(q.Subject)
		}
		return errs.Unavailable("reading consumer of %s: %w", q.Subject, err)
	}
	q.Backlog = ci.NumPending + uint64(ci.NumAckPending)
	q.InFlight = uint64(ci.NumAckPending)
	if q.Backlog == 0 {
		return nil
	}
	m, err := s.stream.GetMsg(ctx, 1, jetstream.WithGetMsgSubject(q.Subject))
	if err != nil {
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return nil
		}
		return errs.Unavailable("reading the oldest event of %s: %w", q.Subject, err)
	}
	if t, err := time.Parse(time.RFC3339Nano, m.Header.Get(HeaderAccepted)); err == nil {
		q.OldestAge = max(s.now().Sub(t), 0)
	}
	return nil
}

// RemoveQueue deletes the consumer of an empty dedicated queue that no
// function is routed to. It refuses (errs.FailedPrecondition) while the
// queue holds events or is routed.
func (s *Service) RemoveQueue(ctx context.Context, subject string) error {
	fn, ok := strings.CutPrefix(subject, DedicatedPrefix)
	if !ok {
		return errs.Invalid("subject", "%s is not a dedicated queue", subject)
	}
	if _, routed := s.routes.get(fn); routed {
		return errs.New(errs.KindFailedPrecondition, "queue %s is still routed", subject)
	}
	q := QueueStats{Subject: subject, Function: fn}
	if err := s.fillStats(ctx, &q); err != nil {
		return err
	}
	if q.Backlog > 0 {
		return errs.New(errs.KindFailedPrecondition, "queue %s still holds %d events", subject, q.Backlog)
	}
	s.forgetConsumer(subject)
	if err := s.js.DeleteConsumer(ctx, StreamName, consumerName(subject)); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
		return errs.Unavailable("deleting consumer of %s: %w", subject, err)
	}
	return nil
}

func (s *Service) forgetConsumer(subject string) {
	s.consMu.Lock()
	delete(s.consumers, subject)
	s.consMu.Unlock()
}
