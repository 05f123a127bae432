package budget

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"skiff.dev/skiff/gateway/store"
	"skiff.dev/skiff/internal/errs"
)

type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func openJS(t *testing.T) jetstream.JetStream {
	t.Helper()
	st, err := store.Open(context.Background(), store.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	return st.JetStream()
}

func newService(t *testing.T, js jetstream.JetStream, holder string, now func() time.Time) *Service {
	t.Helper()
	s, err := New(context.Background(), js, holder, Config{Expiry: 3 * time.Second, Interval: time.Second, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func acquire(t *testing.T, s *Service, scope string, limit int64) bool {
	t.Helper()
	ok, err := s.Acquire(context.Background(), scope, limit)
	if err != nil {
		t.Fatalf("%s: Acquire: %v", s.holder, err)
	}
	return ok
}

// TestExactAcrossGateways: three gateways admit concurrently against one
// limit, saturating it; at no moment do more than the limit run, and
// every gateway gets a fair part (a gateway refused makes the others
// shrink at their next renewals).
func TestExactAcrossGateways(t *testing.T) {
	const limit = 10
	// Renewals every 100 ms: a refused gateway gets its fair part within
	// two of them.
	peak, admitted := saturate(t, 3, limit, Config{Expiry: 500 * time.Millisecond, Interval: 100 * time.Millisecond},
		30, 2*time.Second, 200*time.Microsecond, time.Millisecond)
	if peak > limit {
		t.Fatalf("%d invocations ran at once, limit %d", peak, limit)
	}
	total := admitted[0] + admitted[1] + admitted[2]
	for i, n := range admitted {
		if n < total/10 {
			t.Errorf("gateway %d admitted %d of %d, want at least a tenth", i, n, total)
		}
	}
	t.Logf("peak %d of %d; admitted %v", peak, limit, admitted)
}

// saturate runs gateways Services on one bucket (renewing as cfg says)
// and workers clients spread over them, each acquiring a slot of one
// scope with the limit, holding it for hold (the invocation's work) and
// backing off for backoff when refused, until d passed. It returns the
// most slots held at once and the admissions per gateway.
func saturate(t *testing.T, gateways int, limit int64, cfg Config, workers int, d, hold, backoff time.Duration) (int64, []int64) {
	t.Helper()
	js := openJS(t)
	var gws []*Service
	for i := range gateways {
		g, err := New(context.Background(), js, fmt.Sprintf("gw-%d", i), cfg)
		if err != nil {
			t.Fatal(err)
		}
		gws = append(gws, g)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var bg sync.WaitGroup
	for _, g := range gws {
		bg.Add(1)
		go func() { defer bg.Done(); _ = g.Run(ctx) }()
	}
	var (
		running, peak atomic.Int64
		admitted      = make([]atomic.Int64, gateways)
		wg            sync.WaitGroup
	)
	deadline := time.Now().Add(d)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			g := gws[w%gateways]
			for time.Now().Before(deadline) {
				ok, err := g.Acquire(context.Background(), "fn.f", limit)
				if err != nil {
					t.Error(err)
					return
				}
				if !ok {
					time.Sleep(backoff) // a throttled client backs off
					continue
				}
				n := running.Add(1)
				for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
				}
				admitted[w%gateways].Add(1)
				time.Sleep(hold) // the invocation's work
				running.Add(-1)
				g.Release("fn.f")
			}
		}()
	}
	wg.Wait()
	cancel()
	bg.Wait()
	out := make([]int64, gateways)
	for i := range admitted {
		out[i] = admitted[i].Load()
	}
	return peak.Load(), out
}

// TestDeadGatewayShareReturns: a gateway holding the whole limit dies; the
// other is throttled until the share expires, then gets it; the dead one's
// fence stops it admitting under its expired share if it comes back.
func TestDeadGatewayShareReturns(t *testing.T) {
	js := openJS(t)
	clk := &clock{now: time.Unix(1_000_000, 0)}
	a := newService(t, js, "gw-a", clk.Now)
	b := newService(t, js, "gw-b", clk.Now)
	const limit = 4
	for i := range limit {
		if !acquire(t, a, "acct", limit) {
			t.Fatalf("a's acquisition %d refused", i)
		}
	}
	if acquire(t, a, "acct", limit) {
		t.Fatal("a admitted above the limit")
	}
	if acquire(t, b, "acct", limit) {
		t.Fatal("b admitted while a holds the whole limit")
	}
	// a dies holding its share. Within the expiry b stays throttled...
	clk.Advance(2 * time.Second)
	if acquire(t, b, "acct", limit) {
		t.Fatal("b admitted before a's share expired")
	}
	// ...after it, b takes the freed slots.
	clk.Advance(1500 * time.Millisecond)
	for i := range limit {
		if !acquire(t, b, "acct", limit) {
			t.Fatalf("b's acquisition %d after a's share expired refused", i)
		}
	}
	// a wakes up: its share expired (fenced), and b holds everything.
	if ok := acquire(t, a, "acct", limit); ok {
		t.Fatal("a admitted under its expired share while b holds the limit")
	}
}

// TestIdleShareIsGivenBack: renewals shrink an idle gateway's share to
// the headroom and, once idle for an expiry, to nothing, so another
// gateway can use the whole limit.
func TestIdleShareIsGivenBack(t *testing.T) {
	js := openJS(t)
	clk := &clock{now: time.Unix(1_000_000, 0)}
	a := newService(t, js, "gw-a", clk.Now)
	b := newService(t, js, "gw-b", clk.Now)
	const limit = 16
	for range 12 {
		if !acquire(t, a, "fn.g", limit) {
			t.Fatal("a refused below the limit")
		}
	}
	for range 12 {
		a.Release("fn.g")
	}
	clk.Advance(time.Second)
	if err := a.Renew(context.Background()); err != nil {
		t.Fatal(err)
	}
	if share, _ := a.Share("fn.g"); share != headroom(limit) {
		t.Fatalf("a's share after a renewal with nothing in flight: %d, want the headroom %d", share, headroom(limit))
	}
	clk.Advance(3 * time.Second)
	if err := a.Renew(context.Background()); err != nil {
		t.Fatal(err)
	}
	if share, _ := a.Share("fn.g"); share != 0 {
		t.Fatalf("a's share after an expiry idle: %d, want 0", share)
	}
	for i := range limit {
		if !acquire(t, b, "fn.g", limit) {
			t.Fatalf("b's acquisition %d refused though a gave its share back", i)
		}
	}
}

// TestRenewKeepsInFlight: a renewal never shrinks a share below what is in
// flight, and a lowered limit is never exceeded by new admissions.
func TestRenewKeepsInFlight(t *testing.T) {
	js := openJS(t)
	clk := &clock{now: time.Unix(1_000_000, 0)}
	a := newService(t, js, "gw-a", clk.Now)
	for range 8 {
		if !acquire(t, a, "fn.h", 8) {
			t.Fatal("refused below the limit")
		}
	}
	clk.Advance(time.Second)
	if err := a.Renew(context.Background()); err != nil {
		t.Fatal(err)
	}
	if share, inflight := a.Share("fn.h"); share < inflight || inflight != 8 {
		t.Fatalf("share %d, in flight %d after a renewal: want share ≥ in flight = 8", share, inflight)
	}
	// The reservation drops to 4: nothing more is admitted until fewer
	// than 4 run.
	if acquire(t, a, "fn.h", 4) {
		t.Fatal("admitted above the lowered limit")
	}
	for range 5 {
		a.Release("fn.h")
	}
	if !acquire(t, a, "fn.h", 4) {
		t.Fatal("refused with 3 in flight under a limit of 4")
	}
}

func TestConfigValidation(t *testing.T) {
	js := openJS(t)
	if _, err := New(context.Background(), js, "", Config{}); !errs.IsInvalid(err) {
		t.Fatalf("empty holder: %v", err)
	}
	if _, err := New(context.Background(), js, "gw", Config{Expiry: time.Second, Interval: 600 * time.Millisecond}); !errs.IsInvalid(err) {
		t.Fatalf("interval above half the expiry: %v", err)
	}
	if _, err := New(context.Background(), js, "gw", Config{Expiry: -time.Second}); !errs.IsInvalid(err) {
		t.Fatalf("negative expiry: %v", err)
	}
}

// TestExactSmallLimitUnderContention: two gateways, a limit of 2 and
// clients that keep both saturated with invocations that last a while (so
// shares shrink and grow while slots are in use): at no moment do more
// than 2 run. A renewal that shrinks a share must not let the gateway
// admit, while the write is in flight, beyond the share it stores.
func TestExactSmallLimitUnderContention(t *testing.T) {
	const limit = 2
	peak, admitted := saturate(t, 2, limit, Config{Expiry: 600 * time.Millisecond, Interval: 200 * time.Millisecond},
		8, 3*time.Second, 20*time.Millisecond, 2*time.Millisecond)
	t.Logf("peak %d of %d; admitted %v", peak, limit, admitted)
	if peak > limit {
		t.Fatalf("%d invocations ran at once, limit %d", peak, limit)
	}
}
