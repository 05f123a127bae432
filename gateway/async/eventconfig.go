package async

import (
	"context"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

// Limits of an event invoke config, as Lambda's.
const (
	MinRetries     = 0
	MaxRetries     = 2
	MinEventAgeSec = 60
	MaxEventAgeSec = 21600
	maxTargetLen   = 2048
)

// ValidateEventConfig checks the ranges and the form of the targets of an
// event invoke config (whether the targets exist is the caller's to check).
func ValidateEventConfig(c *skiffv1.EventInvokeConfig) error {
	if c == nil {
		return errs.Invalid("config", "config is required")
	}
	if c.MaximumRetryAttempts != nil {
		if n := c.GetMaximumRetryAttempts(); n < MinRetries || n > MaxRetries {
			return errs.Invalid("maximum_retry_attempts", "maximum_retry_attempts %d is outside %d-%d", n, MinRetries, MaxRetries)
		}
	}
	if c.MaximumEventAgeSeconds != nil {
		if n := c.GetMaximumEventAgeSeconds(); n < MinEventAgeSec || n > MaxEventAgeSec {
			return errs.Invalid("maximum_event_age_seconds", "maximum_event_age_seconds %d is outside %d-%d", n, MinEventAgeSec, MaxEventAgeSec)
		}
	}
	for _, t := range []struct{ field, v string }{{"on_success", c.GetOnSuccess()}, {"on_failure", c.GetOnFailure()}} {
		if err := checkTargetForm(t.field, t.v); err != nil {
			return err
		}
	}
	if d := c.GetDeadLetterQueue(); d != "" {
		name, ok := strings.CutPrefix(d, "queue:")
		if !ok || name == "" || len(d) > maxTargetLen {
			return errs.Invalid("dead_letter_queue", "dead_letter_queue %q is not queue:NAME", d)
		}
	}
	return nil
}

func checkTargetForm(field, v string) error {
	if v == "" {
		return nil
	}
	if len(v) > maxTargetLen {
		return errs.Invalid(field, "%s is %d bytes, over the %d-byte limit", field, len(v), maxTargetLen)
	}
	for _, p := range []string{"queue:", "function:", "https://", "http://"} {
		if rest, ok := strings.CutPrefix(v, p); ok && rest != "" {
			return nil
		}
	}
	return errs.Invalid(field, "%s %q is not queue:NAME, function:NAME or an http(s) URL", field, v)
}

// DLQName returns the queue name of a dead_letter_queue setting.
func DLQName(target string) string { return strings.TrimPrefix(target, "queue:") }

func decodeConfig(b []byte) (any, error) {
	c := &skiffv1.EventInvokeConfig{}
	if err := proto.Unmarshal(b, c); err != nil {
		return nil, err
	}
	return c, nil
}

func decodeRoute(b []byte) (any, error) { return string(b), nil }

// PutEventConfig stores a function's event invoke config (validated by
// the caller with ValidateEventConfig and checked targets), stamped with
// the time, and returns it as stored.
func (s *Service) PutEventConfig(ctx context.Context, function string, c *skiffv1.EventInvokeConfig) (*skiffv1.EventInvokeConfig, error) {
	if err := ValidateEventConfig(c); err != nil {
		return nil, err
	}
	out := proto.Clone(c).(*skiffv1.EventInvokeConfig)
	out.LastModified = s.now().UTC().Format(time.RFC3339Nano)
	b, err := proto.Marshal(out)
	if err != nil {
		return nil, errs.Internal("encoding event invoke config: %w", err)
	}
	if err := s.configs.put(ctx, function, b); err != nil {
		return nil, err
	}
	return out, nil
}

// GetEventConfig returns a function's event invoke config (errs.NotFound
// when none is set).
func (s *Service) GetEventConfig(_ context.Context, function string) (*skiffv1.EventInvokeConfig, error) {
	v, ok := s.configs.get(function)
	if !ok {
		return nil, errs.NotFound("function %s has no event invoke config", function)
	}
	return proto.Clone(v.(*skiffv1.EventInvokeConfig)).(*skiffv1.EventInvokeConfig), nil
}

// DeleteEventConfig removes a function's event invoke config; the defaults
// apply again. Deleting a missing config is errs.NotFound.
func (s *Service) DeleteEventConfig(ctx context.Context, function string) error {
	if _, ok := s.configs.get(function); !ok {
		return errs.NotFound("function %s has no event invoke config", function)
	}
	return s.configs.del(ctx, function)
}

// policy is the effective event invoke config of a function.
type policy struct {
	maxRetries int
	maxAge     time.Duration
	onSuccess  string
	onFailure  string
	dlq        string // queue name
}

func (s *Service) policyFor(function string) policy {
	p := policy{maxRetries: DefaultMaxRetries, maxAge: DefaultMaxEventAge}
	v, ok := s.configs.get(function)
	if !ok {
		return p
	}
	c := v.(*skiffv1.EventInvokeConfig)
	if c.MaximumRetryAttempts != nil {
		p.maxRetries = int(c.GetMaximumRetryAttempts())
	}
	if c.MaximumEventAgeSeconds != nil {
		p.maxAge = time.Duration(c.GetMaximumEventAgeSeconds()) * time.Second
	}
	p.onSuccess, p.onFailure = c.GetOnSuccess(), c.GetOnFailure()
	if d := c.GetDeadLetterQueue(); d != "" {
		p.dlq = DLQName(d)
	}
	return p
}
