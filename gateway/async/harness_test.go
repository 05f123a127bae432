package async

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/destinations"
	"skiff.dev/skiff/gateway/lease"
	"skiff.dev/skiff/gateway/store"
	"skiff.dev/skiff/internal/errs"
)

func testCtx(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// openJS opens a real embedded store in dir (a temp dir when empty).
func openJS(t testing.TB, dir string) jetstream.JetStream {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	st, err := store.Open(testCtx(t), store.Config{DataDir: dir})
	if err != nil {
		t.Fatalf("store.Open: %v", err)
	}
	t.Cleanup(func() { st.Close() })
	return st.JetStream()
}

// clock is a settable clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

func newService(t testing.TB, js jetstream.JetStream, cfg Config) (*Service, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	cfg.Registry = reg
	s, err := New(testCtx(t), js, cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s, reg
}

// fakeInvoker is a SyncInvoker whose behaviour is a func; it records calls.
type fakeInvoker struct {
	fn func(n int, function string, payload []byte, rid string) (*skiffv1.InvokeResponse, error)

	mu    sync.Mutex
	calls []invokeCall // guarded by mu
}

type invokeCall struct {
	function, rid, payload string
}

func (f *fakeInvoker) InvokeSync(_ context.Context, function string, payload []byte, rid string) (*skiffv1.InvokeResponse, error) {
	f.mu.Lock()
	f.calls = append(f.calls, invokeCall{function, rid, string(payload)})
	n := len(f.calls)
	f.mu.Unlock()
	if f.fn == nil {
		return &skiffv1.InvokeResponse{StatusCode: 200, Payload: payload, ExecutedVersion: "$LATEST", RequestId: rid}, nil
	}
	return f.fn(n, function, payload, rid)
}

func (f *fakeInvoker) Calls() []invokeCall {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]invokeCall(nil), f.calls...)
}

// fakeDest records delivered records.
type fakeDest struct {
	err error

	mu   sync.Mutex
	recs []delivered // guarded by mu
}

type delivered struct {
	target string
	depth  int
	rec    destinations.Record
}

func (d *fakeDest) Deliver(_ context.Context, target string, depth int, rec *destinations.Record) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.recs = append(d.recs, delivered{target, depth, *rec})
	return d.err
}

func (d *fakeDest) Records() []delivered {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]delivered(nil), d.recs...)
}

// fakeDLQ records dead letters.
type fakeDLQ struct {
	mu   sync.Mutex
	sent []deadLetter // guarded by mu
}

type deadLetter struct {
	queue string
	body  string
	attrs map[string]string
}

func (q *fakeDLQ) Send(_ context.Context, queue string, body []byte, attrs map[string]string) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.sent = append(q.sent, deadLetter{queue, string(body), attrs})
	return nil
}

func (q *fakeDLQ) Sent() []deadLetter {
	q.mu.Lock()
	defer q.mu.Unlock()
	return append([]deadLetter(nil), q.sent...)
}

// fakeFence holds or loses every lease, or cannot check them (the store
// does not answer).
type fakeFence struct {
	lost    atomic.Bool
	failing atomic.Bool
	checks  atomic.Int64
}

func (f *fakeFence) Check(_ context.Context, l lease.Lease) error {
	f.checks.Add(1)
	if f.lost.Load() {
		return errs.New(errs.KindFailedPrecondition, "lease lost").WithReason(lease.ReasonLost)
	}
	if f.failing.Load() {
		return errs.Unavailable("reading the lease: context deadline exceeded")
	}
	return nil
}

// startPool starts a pool polling every shared queue under fake leases.
func startPool(t *testing.T, s *Service, inv SyncInvoker, dest Destinations, dlq DLQ, fence Fence) *Pool {
	t.Helper()
	p := s.NewPool(inv, dest, dlq, fence)
	for i := range s.cfg.SharedQueues {
		p.Gained(lease.Lease{Resource: Resource(SharedSubject(i)), Slot: 0, Holder: "test", Epoch: 1})
	}
	t.Cleanup(p.Close)
	return p
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func counterValue(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if matches(m, labels) {
				switch {
				case m.Counter != nil:
					return m.GetCounter().GetValue()
				case m.Gauge != nil:
					return m.GetGauge().GetValue()
				case m.Histogram != nil:
					return float64(m.GetHistogram().GetSampleCount())
				}
			}
		}
	}
	return 0
}

func matches(m *dto.Metric, labels map[string]string) bool {
	n := 0
	for _, lp := range m.GetLabel() {
		if v, ok := labels[lp.GetName()]; ok {
			if v != lp.GetValue() {
				return false
			}
			n++
		}
	}
	return n == len(labels)
}

// streamMsgs returns the request ids of the events stored on subject,
// those of batch messages included.
func streamMsgs(t *testing.T, s *Service, subject string) []string {
	t.Helper()
	ctx := testCtx(t)
	var out []string
	seq := uint64(1)
	for {
		m, err := s.stream.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(subject))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return out
		}
		if err != nil {
			t.Fatalf("GetMsg: %v", err)
		}
		if m.Header.Get(HeaderBatch) != "" {
			evs, err := decodeBatch(m.Data)
			if err != nil {
				t.Fatalf("batch message %d: %v", m.Sequence, err)
			}
			for _, ev := range evs {
				out = append(out, ev.requestID)
			}
		} else {
			out = append(out, m.Header.Get(HeaderRequestID))
		}
		seq = m.Sequence + 1
	}
}
