package destinations

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"skiff.dev/skiff/internal/errs"
)

// fakeClock is an injected clock whose Sleep records the wait and moves the
// time on instead of sleeping.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time       // guarded by mu
	sleeps []time.Duration // guarded by mu
	onWait func(attempt int) error
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2024, 5, 1, 10, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Sleep(ctx context.Context, d time.Duration) error {
	c.mu.Lock()
	c.sleeps = append(c.sleeps, d)
	c.now = c.now.Add(d)
	n := len(c.sleeps)
	c.mu.Unlock()
	if c.onWait != nil {
		if err := c.onWait(n); err != nil {
			return err
		}
	}
	return ctx.Err()
}

func (c *fakeClock) Sleeps() []time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]time.Duration(nil), c.sleeps...)
}

// hookRequest is what the test webhook saw in one request.
type hookRequest struct {
	Attempt   string
	RequestID string
	Timestamp string
	Verified  error
	Record    Record
}

// hookServer is a real HTTP server on 127.0.0.1 that verifies every request's
// signature against the fake clock and answers with respond(n) for the nth
// request (1-based).
type hookServer struct {
	*httptest.Server
	mu   sync.Mutex
	reqs []hookRequest // guarded by mu
}

func newHookServer(t *testing.T, clk *fakeClock, respond func(n int, w http.ResponseWriter, r *http.Request)) *hookServer {
	t.Helper()
	h := &hookServer{}
	h.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			t.Errorf("reading webhook body: %v", err)
		}
		hr := hookRequest{
			Attempt:   r.Header.Get(HeaderAttempt),
			RequestID: r.Header.Get(HeaderRequestID),
			Timestamp: r.Header.Get(HeaderTimestamp),
			Verified:  Verify(testKey, r.Header.Get(HeaderTimestamp), body, r.Header.Get(HeaderSignature), clk.Now(), 5*time.Minute),
		}
		if r.Method != http.MethodPost || r.Header.Get("Content-Type") != "application/json" {
			t.Errorf("webhook got %s with Content-Type %q, want POST application/json", r.Method, r.Header.Get("Content-Type"))
		}
		if err := json.Unmarshal(body, &hr.Record); err != nil {
			t.Errorf("webhook body is not a record: %v", err)
		}
		h.mu.Lock()
		h.reqs = append(h.reqs, hr)
		n := len(h.reqs)
		h.mu.Unlock()
		respond(n, w, r)
	}))
	t.Cleanup(h.Close)
	return h
}

func (h *hookServer) Requests() []hookRequest {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]hookRequest(nil), h.reqs...)
}

func status(codes ...int) func(int, http.ResponseWriter, *http.Request) {
	return func(n int, w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(codes[min(n, len(codes))-1])
	}
}

func TestWebhookSignedDelivery(t *testing.T) {
	clk := newFakeClock()
	srv := newHookServer(t, clk, status(http.StatusNoContent))
	w, reg := newWriter(t, Config{Now: clk.Now, Sleep: clk.Sleep}, nil, nil)
	rec := testRecord()
	if err := w.Deliver(context.Background(), srv.URL+"/hook?token=abc", 7, rec); err != nil {
		t.Fatalf("Deliver: %v", err)
	}
	reqs := srv.Requests()
	if len(reqs) != 1 {
		t.Fatalf("webhook requests = %d, want 1", len(reqs))
	}
	r := reqs[0]
	if r.Verified != nil {
		t.Errorf("signature check: %v", r.Verified)
	}
	if want := strconv.FormatInt(clk.Now().Unix(), 10); r.Timestamp != want {
		t.Errorf("timestamp header = %q, want %q", r.Timestamp, want)
	}
	if r.Attempt != "1" || r.RequestID != "req-1" {
		t.Errorf("attempt, request id headers = %q, %q; want 1, req-1", r.Attempt, r.RequestID)
	}
	if diff := cmp.Diff(*rec, r.Record); diff != "" {
		t.Errorf("record received (-want +got):\n%s", diff)
	}
	if n := deliveries(t, reg, KindWebhook, "delivered"); n != 1 {
		t.Errorf("delivered webhook metric = %v, want 1", n)
	}
	if n := webhookAttempts(t, reg, "ok"); n != 1 {
		t.Errorf("ok attempts metric = %v, want 1", n)
	}
}

func TestWebhookRetries(t *testing.T) {
	tests := []struct {
		name       string
		cfg        Config
		respond    func(int, http.ResponseWriter, *http.Request)
		wantReqs   int
		wantSleeps []time.Duration
		wantKind   errs.Kind // KindUnknown: delivered
		wantReason string
	}{
		{
			name:       "5xx then success",
			respond:    status(500, 503, 200),
			wantReqs:   3,
			wantSleeps: []time.Duration{time.Second, 2 * time.Second},
		},
		{
			name:       "408 and 429 are transient",
			respond:    status(408, 429, 201),
			wantReqs:   3,
			wantSleeps: []time.Duration{time.Second, 2 * time.Second},
		},
		{
			name:       "exhausted",
			respond:    status(502),
			wantReqs:   5,
			wantSleeps: []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second},
			wantKind:   errs.KindUnavailable,
			wantReason: "webhook_failed",
		},
		{
			name:       "delay capped",
			cfg:        Config{BaseDelay: 10 * time.Second, MaxDelay: 15 * time.Second, MaxAttempts: 4},
			respond:    status(500),
			wantReqs:   4,
			wantSleeps: []time.Duration{10 * time.Second, 15 * time.Second, 15 * time.Second},
			wantKind:   errs.KindUnavailable,
			wantReason: "webhook_failed",
		},
		{
			name: "retry-after honoured",
			respond: func(n int, w http.ResponseWriter, _ *http.Request) {
				if n == 1 {
					w.Header().Set("Retry-After", "7")
					w.WriteHeader(http.StatusTooManyRequests)
					return
				}
				w.WriteHeader(http.StatusOK)
			},
			wantReqs:   2,
			wantSleeps: []time.Duration{7 * time.Second},
		},
		{
			name:       "4xx is final",
			respond:    status(400),
			wantReqs:   1,
			wantKind:   errs.KindFailedPrecondition,
			wantReason: "webhook_rejected",
		},
		{
			name:       "410 is final",
			respond:    status(410),
			wantReqs:   1,
			wantKind:   errs.KindFailedPrecondition,
			wantReason: "webhook_rejected",
		},
		{
			name: "redirects are not followed",
			respond: func(n int, w http.ResponseWriter, r *http.Request) {
				http.Redirect(w, r, "/elsewhere", http.StatusTemporaryRedirect)
			},
			wantReqs:   1,
			wantKind:   errs.KindFailedPrecondition,
			wantReason: "webhook_rejected",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := newFakeClock()
			srv := newHookServer(t, clk, tt.respond)
			cfg := tt.cfg
			cfg.Now, cfg.Sleep = clk.Now, clk.Sleep
			w, reg := newWriter(t, cfg, nil, nil)
			err := w.Deliver(context.Background(), srv.URL, 0, testRecord())
			if got := errs.KindOf(err); got != tt.wantKind || (err == nil) != (tt.wantKind == errs.KindUnknown) {
				t.Fatalf("Deliver = %v (kind %v), want kind %v", err, got, tt.wantKind)
			}
			if err != nil && errorReason(err) != tt.wantReason {
				t.Errorf("reason = %q, want %q", errorReason(err), tt.wantReason)
			}
			reqs := srv.Requests()
			if len(reqs) != tt.wantReqs {
				t.Fatalf("webhook requests = %d, want %d", len(reqs), tt.wantReqs)
			}
			start := newFakeClock().Now()
			var waited time.Duration
			for i, r := range reqs {
				if r.Verified != nil {
					t.Errorf("request %d signature check: %v", i+1, r.Verified)
				}
				if want := strconv.Itoa(i + 1); r.Attempt != want {
					t.Errorf("request %d attempt header = %q, want %q", i+1, r.Attempt, want)
				}
				// Each attempt is signed with the time it was sent.
				if want := strconv.FormatInt(start.Add(waited).Unix(), 10); r.Timestamp != want {
					t.Errorf("request %d timestamp = %s, want %s", i+1, r.Timestamp, want)
				}
				if i < len(tt.wantSleeps) {
					waited += tt.wantSleeps[i]
				}
			}
			if diff := cmp.Diff(tt.wantSleeps, clk.Sleeps()); diff != "" {
				t.Errorf("backoff waits (-want +got):\n%s", diff)
			}
			outcome := "delivered"
			if err != nil {
				outcome = "failed"
			}
			if n := deliveries(t, reg, KindWebhook, outcome); n != 1 {
				t.Errorf("%s webhook metric = %v, want 1", outcome, n)
			}
		})
	}
}

func TestWebhookNetworkErrorsRetried(t *testing.T) {
	dead := httptest.NewServer(http.NotFoundHandler())
	url := dead.URL
	dead.Close() // nothing listens there any more
	clk := newFakeClock()
	w, _ := newWriter(t, Config{Now: clk.Now, Sleep: clk.Sleep, MaxAttempts: 3}, nil, nil)
	err := w.Deliver(context.Background(), url+"/hook?secret=s3cret", 0, testRecord())
	if !errs.Is(err, errs.KindUnavailable) {
		t.Fatalf("Deliver to a closed port = %v, want unavailable", err)
	}
	if got := len(clk.Sleeps()); got != 2 {
		t.Errorf("waits = %d, want 2 (3 attempts)", got)
	}
	if s := err.Error(); strings.Contains(s, "s3cret") {
		t.Errorf("error %q leaks the URL's query", s)
	}
}

func TestWebhookAttemptTimeout(t *testing.T) {
	clk := newFakeClock()
	srv := newHookServer(t, clk, func(n int, w http.ResponseWriter, r *http.Request) {
		if n == 1 {
			<-r.Context().Done() // hang until the client gives up
			return
		}
		w.WriteHeader(http.StatusOK)
	})
	w, _ := newWriter(t, Config{Now: clk.Now, Sleep: clk.Sleep, WebhookTimeout: 100 * time.Millisecond}, nil, nil)
	if err := w.Deliver(context.Background(), srv.URL, 0, testRecord()); err != nil {
		t.Fatalf("Deliver: %v", err)
	}
	if got := len(srv.Requests()); got != 2 {
		t.Errorf("webhook requests = %d, want 2 (a timed-out attempt, then a retry)", got)
	}
}

func TestWebhookStopsWhenContextEnds(t *testing.T) {
	clk := newFakeClock()
	srv := newHookServer(t, clk, status(500))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	clk.onWait = func(int) error { cancel(); return nil }
	w, _ := newWriter(t, Config{Now: clk.Now, Sleep: clk.Sleep}, nil, nil)
	err := w.Deliver(ctx, srv.URL, 0, testRecord())
	if !errors.Is(err, context.Canceled) {
		t.Errorf("Deliver after cancel = %v, want context.Canceled", err)
	}
	if got := len(srv.Requests()); got != 1 {
		t.Errorf("webhook requests = %d, want 1", got)
	}
}

func TestVerify(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	ts := strconv.FormatInt(now.Unix(), 10)
	body := []byte(`{"version":"1.0"}`)
	good := Sign(testKey, ts, body)
	tests := []struct {
		name      string
		key       []byte
		ts        string
		body      []byte
		sig       string
		now       time.Time
		tolerance time.Duration
		ok        bool
	}{
		{"good", testKey, ts, body, good, now, 5 * time.Minute, true},
		{"good, no time check", testKey, ts, body, good, now.Add(time.Hour), 0, true},
		{"within tolerance", testKey, ts, body, good, now.Add(299 * time.Second), 5 * time.Minute, true},
		{"wrong key", []byte("another key of 32 bytes........."), ts, body, good, now, 5 * time.Minute, false},
		{"tampered body", testKey, ts, []byte(`{"version":"2.0"}`), good, now, 5 * time.Minute, false},
		{"other timestamp", testKey, ts + "1", body, good, now, 5 * time.Minute, false},
		{"replayed later", testKey, ts, body, good, now.Add(6 * time.Minute), 5 * time.Minute, false},
		{"from the future", testKey, ts, body, good, now.Add(-6 * time.Minute), 5 * time.Minute, false},
		{"no prefix", testKey, ts, body, good[len("sha256="):], now, 5 * time.Minute, false},
		{"empty", testKey, ts, body, "", now, 5 * time.Minute, false},
	}
	for _, tt := range tests {
		err := Verify(tt.key, tt.ts, tt.body, tt.sig, tt.now, tt.tolerance)
		if (err == nil) != tt.ok {
			t.Errorf("%s: Verify = %v, want ok=%v", tt.name, err, tt.ok)
		}
	}
	// The signature is HMAC-SHA256 over "timestamp.body", in hex, with a
	// prefix (the value computed independently with Python's hmac module).
	if got, want := Sign([]byte("key"), "1", []byte("body")), "sha256=91b5374b153842ad05b2c4eab9349b8321b14703165bd3fb8b034dfb8be98ae5"; got != want {
		t.Errorf("Sign = %q, want %q", got, want)
	}
}
