package async

import (
	"context"
	"errors"
	"hash/fnv"

	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/uuid"
)

// Accept stores an event for function under requestID and returns once
// JetStream has stored it with the configured durability (the publish
// ack of its group, group.go). A second accept of the same request id
// within the dedup window is acknowledged without storing the event again.
// The caller has checked that the function exists.
func (s *Service) Accept(ctx context.Context, function string, payload []byte, requestID string) error {
	return s.accept(ctx, function, payload, requestID, 0)
}

// InvokeAsync accepts an event with a new request id at a destination-chain
// depth (the function destination of gateway/destinations).
func (s *Service) InvokeAsync(ctx context.Context, function string, payload []byte, depth int) error {
	return s.accept(ctx, function, payload, NewRequestID(), depth)
}

func (s *Service) accept(ctx context.Context, function string, payload []byte, requestID string, depth int) error {
	if n := len(payload); n > s.cfg.MaxPayload {
		return errs.Invalid("payload", "async payload is %d bytes, over the %d-byte limit", n, s.cfg.MaxPayload)
	}
	if !validID(requestID) {
		return errs.Invalid("request_id", "request id %q is not 1-%d letters, digits, '-' or '_'", requestID, maxIDLen)
	}
	if function == "" || len(function) > maxIDLen*4 {
		return errs.Invalid("function", "function name is empty or longer than %d bytes", maxIDLen*4)
	}
	p := &pendingAccept{
		ev:   event{requestID: requestID, function: function, accepted: s.now(), depth: depth, payload: payload},
		done: make(chan struct{}),
	}
	for {
		wait, dup := s.dedup.begin(p)
		if dup {
			return nil
		}
		if wait == nil {
			break
		}
		// The same request id is being accepted: its outcome is ours
		// unless it failed, when this accept tries again.
		select {
		case <-wait.done:
		case <-ctx.Done():
			return publishErr(ctx.Err())
		}
		if wait.err == nil {
			return nil
		}
	}
	if err := s.commit(ctx, s.laneFor(s.QueueFor(function)), p); err != nil {
		return err
	}
	if !p.dup {
		s.met.received.Inc()
	}
	return nil
}

// maxIDLen bounds a request id.
const maxIDLen = 64

// validID reports whether a request id is 1-64 letters, digits, '-' or
// '_' (the front end's rule; batch headers rely on it).
func validID(s string) bool {
	if len(s) == 0 || len(s) > maxIDLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// publishErr maps a failed publish: a context error keeps its kind, a
// refused or unanswered publish is Unavailable (the client may retry with
// the same request id).
func publishErr(err error) error {
	switch {
	case errors.Is(err, context.Canceled):
		return errs.New(errs.KindCanceled, "storing async event: %w", err)
	case errors.Is(err, context.DeadlineExceeded):
		return errs.New(errs.KindDeadlineExceeded, "storing async event: %w", err)
	}
	return errs.Unavailable("storing async event: %w", err)
}

// QueueFor returns the subject new events of function are published to:
// its dedicated queue when the state manager gave it one, else one of the
// shared queues chosen by a hash of the name.
func (s *Service) QueueFor(function string) string {
	if v, ok := s.routes.get(function); ok {
		return v.(string)
	}
	h := fnv.New32a()
	h.Write([]byte(function))
	return SharedSubject(int(h.Sum32() % uint32(s.cfg.SharedQueues)))
}

// SetDedicated routes a function's new events to its dedicated queue (on)
// or back to the shared queues. Events already queued stay where they are
// and are processed there, so a move neither loses nor duplicates events.
func (s *Service) SetDedicated(ctx context.Context, function string, on bool) error {
	_, has := s.routes.get(function)
	switch {
	case on && !has:
		if _, err := s.ensureConsumer(ctx, DedicatedSubject(function)); err != nil {
			return err
		}
		return s.routes.put(ctx, function, []byte(DedicatedSubject(function)))
	case !on && has:
		return s.routes.del(ctx, function)
	}
	return nil
}

// Dedicated returns the functions routed to a dedicated queue.
func (s *Service) Dedicated() map[string]bool {
	out := map[string]bool{}
	for fn := range s.routes.all() {
		out[fn] = true
	}
	return out
}

// NewRequestID returns a random (version 4) UUID.
func NewRequestID() string { return uuid.New() }
