package destinations

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

// QueueSender sends records to skiff queues (gateway/queue's Manager).
type QueueSender interface {
	Send(ctx context.Context, req *skiffv1.SendMessageRequest) (*skiffv1.SendMessageResponse, error)
	Exists(ctx context.Context, name string) error
}

// AsyncInvoker invokes functions asynchronously (the async accept path).
// depth is the destination-chain depth of the new event.
type AsyncInvoker interface {
	InvokeAsync(ctx context.Context, function string, payload []byte, depth int) error
	Exists(ctx context.Context, function string) error
}

// Defaults.
const (
	DefaultMaxDepth       = 4
	DefaultMaxAttempts    = 5
	DefaultBaseDelay      = time.Second
	DefaultMaxDelay       = 30 * time.Second
	DefaultWebhookTimeout = 10 * time.Second
	minSigningKey         = 16
)

// Config configures a Writer.
type Config struct {
	// SigningKey is the HMAC key of webhook signatures (EnsureSigningKey);
	// required, at least 16 bytes.
	SigningKey []byte
	// MaxDepth bounds chains of function destinations: a record of an event
	// at depth ≥ MaxDepth is not delivered to a function (default 4).
	MaxDepth int
	// MaxAttempts is how many times a webhook POST is tried (default 5).
	MaxAttempts int
	// BaseDelay is the first webhook retry delay, doubled for each further
	// retry (default 1s) up to MaxDelay (default 30s).
	BaseDelay time.Duration
	MaxDelay  time.Duration
	// WebhookTimeout bounds one webhook attempt (default 10s).
	WebhookTimeout time.Duration
	// HTTPClient sends webhooks; by default a client that does not follow
	// redirects (a 3xx is a refusal).
	HTTPClient *http.Client
	// Sleep waits between webhook attempts (default: a timer that stops
	// early when ctx ends). Tests inject one that does not sleep.
	Sleep    func(ctx context.Context, d time.Duration) error
	Now      func() time.Time
	Logger   *slog.Logger
	Registry prometheus.Registerer // a private registry when nil
}

func (c *Config) defaults() error {
	if len(c.SigningKey) < minSigningKey {
		return fmt.Errorf("signing key is %d bytes, want at least %d", len(c.SigningKey), minSigningKey)
	}
	if c.MaxDepth < 0 || c.MaxAttempts < 0 || c.BaseDelay < 0 || c.MaxDelay < 0 || c.WebhookTimeout < 0 {
		return errors.New("negative limit")
	}
	if c.MaxDepth == 0 {
		c.MaxDepth = DefaultMaxDepth
	}
	if c.MaxAttempts == 0 {
		c.MaxAttempts = DefaultMaxAttempts
	}
	if c.BaseDelay == 0 {
		c.BaseDelay = DefaultBaseDelay
	}
	if c.MaxDelay == 0 {
		c.MaxDelay = DefaultMaxDelay
	}
	if c.MaxDelay < c.BaseDelay {
		c.MaxDelay = c.BaseDelay
	}
	if c.WebhookTimeout == 0 {
		c.WebhookTimeout = DefaultWebhookTimeout
	}
	if c.HTTPClient == nil {
		c.HTTPClient = &http.Client{
			Transport: http.DefaultTransport.(*http.Transport).Clone(),
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse
			},
		}
	}
	if c.Sleep == nil {
		c.Sleep = sleep
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Registry == nil {
		c.Registry = prometheus.NewRegistry()
	}
	return nil
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// Writer validates destination targets and delivers invocation records to
// them. It is safe for concurrent use.
type Writer struct {
	cfg Config
	q   QueueSender
	fn  AsyncInvoker
	log *slog.Logger
	met *metrics
}

// New returns a Writer. q or fn may be nil; targets of that kind are then
// refused.
func New(cfg Config, q QueueSender, fn AsyncInvoker) (*Writer, error) {
	if err := cfg.defaults(); err != nil {
		return nil, fmt.Errorf("destinations config: %w", err)
	}
	met, err := newMetrics(cfg.Registry)
	if err != nil {
		return nil, fmt.Errorf("registering destination metrics: %w", err)
	}
	return &Writer{cfg: cfg, q: q, fn: fn, log: cfg.Logger, met: met}, nil
}

// Validate checks a target when a configuration names it: it must parse
// (errs.Invalid "destination") and a queue or function must exist
// (errs.NotFound, reason "destination_not_found"). Webhooks are not
// contacted.
func (w *Writer) Validate(ctx context.Context, target string) error {
	t, err := ParseTarget(target)
	if err != nil {
		return err
	}
	var exists func(context.Context, string) error
	switch t.Kind {
	case KindQueue:
		if w.q == nil {
			return errs.Invalid("destination", "queue destinations are not available on this gateway")
		}
		exists = w.q.Exists
	case KindFunction:
		if w.fn == nil {
			return errs.Invalid("destination", "function destinations are not available on this gateway")
		}
		exists = w.fn.Exists
	default:
		return nil
	}
	if err := exists(ctx, t.Name); err != nil {
		if errs.IsNotFound(err) {
			return errs.NotFound("destination %s %q does not exist", t.Kind, t.Name).WithReason("destination_not_found")
		}
		return fmt.Errorf("checking destination %s %q: %w", t.Kind, t.Name, err)
	}
	return nil
}

// Deliver sends rec to target. depth is the destination-chain depth of the
// event rec describes (0 for an event a client sent); a function target
// receives the record as an asynchronous event of depth+1, and is refused
// (errs KindFailedPrecondition, reason "destination_depth_exceeded") when
// depth ≥ MaxDepth, which ends loops of functions naming each other. Queue
// and webhook targets end a chain and are not limited.
//
// A nil return means the destination accepted the record: the queue stored
// it, the async path accepted the event, or the webhook answered 2xx.
// Webhooks are retried here (5xx, 408, 429 and network errors, with
// exponential backoff); an error returned is final for this call. Errors of
// kind Unavailable are transient and worth retrying later.
func (w *Writer) Deliver(ctx context.Context, target string, depth int, rec *Record) error {
	start := w.cfg.Now()
	t, err := ParseTarget(target)
	if err != nil {
		w.met.deliveries.WithLabelValues("invalid", "failed").Inc()
		return err
	}
	err = w.deliver(ctx, t, depth, rec)
	outcome := "delivered"
	switch {
	case errs.Is(err, errs.KindFailedPrecondition) && errorReason(err) == "destination_depth_exceeded":
		outcome = "depth_exceeded"
	case err != nil:
		outcome = "failed"
	}
	w.met.deliveries.WithLabelValues(t.Kind, outcome).Inc()
	w.met.duration.WithLabelValues(t.Kind).Observe(w.cfg.Now().Sub(start).Seconds())
	if err != nil {
		reqID := ""
		if rec != nil {
			reqID = rec.RequestContext.RequestID
		}
		w.log.Warn("destination delivery failed", "kind", t.Kind, "target", redactTarget(t), "request_id", reqID, "depth", depth, "err", err)
	}
	return err
}

func (w *Writer) deliver(ctx context.Context, t Target, depth int, rec *Record) error {
	if rec == nil {
		return errs.Invalid("record", "record is nil")
	}
	if depth < 0 {
		return errs.Invalid("depth", "destination depth %d is negative", depth)
	}
	if t.Kind == KindFunction && depth >= w.cfg.MaxDepth {
		return errs.New(errs.KindFailedPrecondition, "destination function %q refused: the chain of destinations is %d deep, the limit is %d", t.Name, depth, w.cfg.MaxDepth).WithReason("destination_depth_exceeded")
	}
	body, err := rec.Encode()
	if err != nil {
		return errs.Internal("encoding invocation record: %w", err)
	}
	switch t.Kind {
	case KindQueue:
		return w.sendQueue(ctx, t.Name, rec, body)
	case KindFunction:
		if w.fn == nil {
			return errs.Invalid("destination", "function destinations are not available on this gateway")
		}
		if err := w.fn.InvokeAsync(ctx, t.Name, body, depth+1); err != nil {
			return fmt.Errorf("invoking destination function %q: %w", t.Name, err)
		}
		return nil
	case KindWebhook:
		return w.postWebhook(ctx, t.URL, rec.RequestContext.RequestID, body)
	}
	return errs.Internal("unknown destination kind %q", t.Kind)
}

// sendQueue sends the record as one message. On a FIFO queue the message
// group is the function's ARN (records of one function stay in order) and
// the deduplication id is the request id and condition, so a record that
// at-least-once processing delivers twice within the queue's deduplication
// window is stored once.
func (w *Writer) sendQueue(ctx context.Context, name string, rec *Record, body []byte) error {
	if w.q == nil {
		return errs.Invalid("destination", "queue destinations are not available on this gateway")
	}
	req := &skiffv1.SendMessageRequest{Queue: name, Body: string(body)}
	if isFIFO(name) {
		req.MessageGroupId = fifoID(rec.RequestContext.FunctionArn, "invocation-records")
		dedup := ""
		if rec.RequestContext.RequestID != "" {
			dedup = rec.RequestContext.RequestID + ":" + rec.RequestContext.Condition
		}
		if dedup == "" {
			sum := sha256.Sum256(body)
			dedup = hex.EncodeToString(sum[:])
		}
		req.MessageDeduplicationId = fifoID(dedup, "")
	}
	if _, err := w.q.Send(ctx, req); err != nil {
		return fmt.Errorf("sending record to destination queue %q: %w", name, err)
	}
	return nil
}

func isFIFO(name string) bool { return len(name) > 5 && name[len(name)-5:] == ".fifo" }

// fifoID fits s to SQS's group and deduplication id rule (1-128 printable
// ASCII characters); longer ids are replaced by their sha256.
func fifoID(s, fallback string) string {
	if s == "" {
		s = fallback
	}
	ok := len(s) <= 128
	for i := 0; ok && i < len(s); i++ {
		ok = s[i] > ' ' && s[i] < 0x7f
	}
	if ok {
		return s
	}
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

func errorReason(err error) string {
	var e *errs.Error
	if errors.As(err, &e) {
		return e.Reason
	}
	return ""
}

func redactTarget(t Target) string {
	if t.Kind == KindWebhook {
		return redact(t.URL)
	}
	return t.String()
}

type metrics struct {
	deliveries *prometheus.CounterVec
	duration   *prometheus.HistogramVec
	attempts   *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skiff_destination_deliveries_total",
			Help: "Invocation records delivered to destinations, by kind (queue, function, webhook) and outcome (delivered, failed, depth_exceeded).",
		}, []string{"kind", "outcome"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "skiff_destination_delivery_duration_seconds",
			Help:    "Time to deliver one record, retries included.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 20),
		}, []string{"kind"}),
		attempts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skiff_destination_webhook_attempts_total",
			Help: "Webhook POST attempts, by outcome (ok, retryable, rejected).",
		}, []string{"outcome"}),
	}
	for _, c := range []prometheus.Collector{m.deliveries, m.duration, m.attempts} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// DeliverJSON sends body, a complete JSON record that is not an invocation
// record (the OnFailure record of a skipped stream batch), to a queue or
// webhook target. requestID names it: the webhook's request id and, on a
// FIFO queue, its deduplication id. Function targets are refused (errs
// Invalid "destination"). Errors are as Deliver's.
func (w *Writer) DeliverJSON(ctx context.Context, target, requestID string, body []byte) error {
	start := w.cfg.Now()
	t, err := ParseTarget(target)
	if err != nil {
		w.met.deliveries.WithLabelValues("invalid", "failed").Inc()
		return err
	}
	switch t.Kind {
	case KindQueue:
		if w.q == nil {
			err = errs.Invalid("destination", "queue destinations are not available on this gateway")
			break
		}
		req := &skiffv1.SendMessageRequest{Queue: t.Name, Body: string(body)}
		if isFIFO(t.Name) {
			sum := sha256.Sum256(body)
			req.MessageGroupId = "stream-batches"
			req.MessageDeduplicationId = fifoID(requestID, hex.EncodeToString(sum[:]))
		}
		if _, serr := w.q.Send(ctx, req); serr != nil {
			err = fmt.Errorf("sending record to destination queue %q: %w", t.Name, serr)
		}
	case KindWebhook:
		err = w.postWebhook(ctx, t.URL, requestID, body)
	default:
		err = errs.Invalid("destination", "a %s destination cannot receive this record: use a queue or a webhook", t.Kind)
	}
	outcome := "delivered"
	if err != nil {
		outcome = "failed"
		w.log.Warn("destination delivery failed", "kind", t.Kind, "target", redactTarget(t), "request_id", requestID, "err", err)
	}
	w.met.deliveries.WithLabelValues(t.Kind, outcome).Inc()
	w.met.duration.WithLabelValues(t.Kind).Observe(w.cfg.Now().Sub(start).Seconds())
	return err
}
