package destinations

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"skiff.dev/skiff/internal/errs"
)

// Webhook request headers.
const (
	HeaderSignature = "X-Skiff-Signature"
	HeaderTimestamp = "X-Skiff-Timestamp"
	HeaderRequestID = "X-Skiff-Request-Id"
	HeaderAttempt   = "X-Skiff-Delivery-Attempt"
)

// maxResponseDrain is how much of a webhook's answer is read (and thrown
// away, so the connection can be reused).
const maxResponseDrain = 64 << 10

// Sign returns the X-Skiff-Signature value of body sent at timestamp (the
// X-Skiff-Timestamp value): "sha256=" + hex(HMAC-SHA256(key, timestamp + "." + body)).
func Sign(key []byte, timestamp string, body []byte) string {
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(timestamp))
	mac.Write([]byte{'.'})
	mac.Write(body)
	return "sha256=" + hex.EncodeToString(mac.Sum(nil))
}

// Verify checks a webhook request as a receiver would: the signature must
// match (compared in constant time) and the timestamp must be within
// tolerance of now, which bounds replays. A tolerance ≤ 0 skips the time
// check.
func Verify(key []byte, timestamp string, body []byte, signature string, now time.Time, tolerance time.Duration) error {
	want := Sign(key, timestamp, body)
	if !hmac.Equal([]byte(want), []byte(signature)) {
		return errors.New("signature does not match")
	}
	if tolerance <= 0 {
		return nil
	}
	sec, err := strconv.ParseInt(timestamp, 10, 64)
	if err != nil {
		return fmt.Errorf("timestamp %q is not Unix seconds", timestamp)
	}
	if d := now.Sub(time.Unix(sec, 0)); d > tolerance || d < -tolerance {
		return fmt.Errorf("timestamp is %s away from now, over the tolerance of %s", d.Round(time.Second), tolerance)
	}
	return nil
}

// postWebhook POSTs body to u, retrying transient failures (network errors,
// 5xx, 408, 429) with exponential backoff. Each attempt is signed afresh
// with the current time.
func (w *Writer) postWebhook(ctx context.Context, u, requestID string, body []byte) error {
	delay := w.cfg.BaseDelay
	for attempt := 1; ; attempt++ {
		status, retryAfter, err := w.postOnce(ctx, u, requestID, attempt, body)
		if err == nil && status >= 200 && status < 300 {
			w.met.attempts.WithLabelValues("ok").Inc()
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("delivering to webhook %s: %w", redact(u), ctx.Err())
		}
		if err == nil && !retryable(status) {
			w.met.attempts.WithLabelValues("rejected").Inc()
			return errs.New(errs.KindFailedPrecondition, "webhook %s refused the record with status %d", redact(u), status).WithReason("webhook_rejected")
		}
		w.met.attempts.WithLabelValues("retryable").Inc()
		if err == nil {
			err = fmt.Errorf("status %d", status)
		}
		if attempt >= w.cfg.MaxAttempts {
			return errs.Unavailable("delivering to webhook %s: %d attempts failed, the last with %w", redact(u), attempt, err).WithReason("webhook_failed")
		}
		wait := min(max(delay, retryAfter), w.cfg.MaxDelay)
		w.log.Debug("webhook attempt failed, retrying", "url", redact(u), "attempt", attempt, "wait", wait, "err", err)
		if err := w.cfg.Sleep(ctx, wait); err != nil {
			return fmt.Errorf("delivering to webhook %s: %w", redact(u), err)
		}
		delay = min(delay*2, w.cfg.MaxDelay)
	}
}

// postOnce makes one attempt; it returns the status and the Retry-After
// hint, or a network error.
func (w *Writer) postOnce(ctx context.Context, u, requestID string, attempt int, body []byte) (int, time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, w.cfg.WebhookTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(body))
	if err != nil {
		return 0, 0, err
	}
	ts := strconv.FormatInt(w.cfg.Now().Unix(), 10)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "skiff-destinations/1")
	req.Header.Set(HeaderTimestamp, ts)
	req.Header.Set(HeaderSignature, Sign(w.cfg.SigningKey, ts, body))
	req.Header.Set(HeaderAttempt, strconv.Itoa(attempt))
	if requestID != "" {
		req.Header.Set(HeaderRequestID, requestID)
	}
	resp, err := w.cfg.HTTPClient.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			ue.URL = redact(ue.URL) // the query may carry a token
		}
		return 0, 0, err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxResponseDrain))
	return resp.StatusCode, retryAfter(resp.Header.Get("Retry-After")), nil
}

func retryable(status int) bool {
	return status >= 500 || status == http.StatusRequestTimeout || status == http.StatusTooManyRequests
}

// retryAfter reads a Retry-After header given in seconds (the HTTP-date form
// is ignored).
func retryAfter(v string) time.Duration {
	n, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil || n <= 0 {
		return 0
	}
	return time.Duration(min(n, 3600)) * time.Second
}
