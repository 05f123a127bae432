package lease

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"skiff.dev/skiff/gateway/store"
	"skiff.dev/skiff/internal/errs"
)

func testCtx(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// clock is an injected clock that only moves when told to.
type clock struct {
	mu sync.Mutex
	t  time.Time // guarded by mu
}

func newClock() *clock { return &clock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// openStore opens an embedded NATS store in a temp dir, closed at the end
// of the test.
func openStore(t testing.TB) *store.Store {
	t.Helper()
	st, err := store.Open(testCtx(t), store.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatalf("store.Open: %v", err)
	}
	t.Cleanup(func() {
		if err := st.Close(); err != nil {
			t.Errorf("store Close: %v", err)
		}
	})
	return st
}

func newService(t testing.TB, js jetstream.JetStream, clk *clock, reg prometheus.Registerer) *Service {
	t.Helper()
	s, err := New(testCtx(t), js, Config{Now: clk.Now, Registry: reg})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return s
}

// env is one store and one clock shared by any number of Services (one
// per simulated gateway).
type env struct {
	js  jetstream.JetStream
	clk *clock
}

func newEnv(t testing.TB) *env {
	return &env{js: openStore(t).JetStream(), clk: newClock()}
}

func (e *env) service(t testing.TB) *Service { return newService(t, e.js, e.clk, nil) }

func mustSetDesired(t testing.TB, s *Service, resource string, n int) {
	t.Helper()
	if err := s.SetDesired(testCtx(t), resource, n); err != nil {
		t.Fatalf("SetDesired(%q, %d): %v", resource, n, err)
	}
}

func mustAcquire(t testing.TB, s *Service, holder string, max int, match func(string) bool) []Lease {
	t.Helper()
	got, err := s.Acquire(testCtx(t), holder, max, match)
	if err != nil {
		t.Fatalf("Acquire(%q, %d): %v", holder, max, err)
	}
	return got
}

func mustAcquireOne(t testing.TB, s *Service, holder, resource string) Lease {
	t.Helper()
	got := mustAcquire(t, s, holder, 1, func(r string) bool { return r == resource })
	if len(got) != 1 {
		t.Fatalf("Acquire(%q) on %q: got %d leases, want 1", holder, resource, len(got))
	}
	return got[0]
}

func mustList(t testing.TB, s *Service) []Lease {
	t.Helper()
	ls, err := s.List(testCtx(t))
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	return ls
}

// slotView is a comparable summary of a lease.
type slotView struct {
	Resource string
	Slot     int
	Holder   string
	Epoch    uint64
}

func views(ls []Lease) []slotView {
	out := make([]slotView, 0, len(ls))
	for _, l := range ls {
		out = append(out, slotView{l.Resource, l.Slot, l.Holder, l.Epoch})
	}
	return out
}

func wantLost(t testing.TB, what string, err error) {
	t.Helper()
	if !IsLost(err) {
		t.Fatalf("%s: got %v, want a %s error", what, err, ReasonLost)
	}
	if k := errs.KindOf(err); k != errs.KindFailedPrecondition {
		t.Fatalf("%s: got kind %v, want %v", what, k, errs.KindFailedPrecondition)
	}
}

func TestConfigValidate(t *testing.T) {
	js := openStore(t).JetStream()
	for _, tc := range []struct {
		name  string
		cfg   Config
		field string
	}{
		{"negative expiry", Config{Expiry: -time.Second}, "expiry"},
		{"negative interval", Config{Interval: -time.Second}, "interval"},
		{"interval equals expiry", Config{Expiry: time.Second, Interval: time.Second}, "interval"},
		{"interval above default expiry", Config{Interval: 5 * time.Second}, "interval"},
		{"ok defaults", Config{}, ""},
		{"ok explicit", Config{Expiry: time.Second, Interval: 100 * time.Millisecond}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := New(testCtx(t), js, tc.cfg)
			if tc.field == "" {
				if err != nil {
					t.Fatalf("New: %v", err)
				}
				wantExpiry := tc.cfg.Expiry
				if wantExpiry == 0 {
					wantExpiry = DefaultExpiry
				}
				if s.Expiry() != wantExpiry || s.Interval() >= s.Expiry() || s.Interval() <= 0 {
					t.Fatalf("got expiry %v interval %v, want expiry %v and 0 < interval < expiry", s.Expiry(), s.Interval(), wantExpiry)
				}
				return
			}
			var e *errs.Error
			if !errs.IsInvalid(err) || !errors.As(err, &e) || e.Field != tc.field {
				t.Fatalf("New: got %v, want invalid %q", err, tc.field)
			}
		})
	}
}

func TestKeys(t *testing.T) {
	resources := []string{"async:async.shared.0", "async:async.shared.1", "esm:6f1c2a3e-0b7d-4c1e-9a55-0e2d7c1b9f00", "a.b", "a", "x y/z*>"}
	seen := map[string]string{}
	for _, r := range resources {
		for slot := range 3 {
			l := Lease{Resource: r, Slot: slot}
			key := l.Key()
			if strings.ContainsAny(key, ":* >") {
				t.Errorf("Key(%q, %d) = %q: not a valid KV key", r, slot, key)
			}
			if prev, dup := seen[key]; dup {
				t.Errorf("Key(%q, %d) = %q, same as %s", r, slot, key, prev)
			}
			seen[key] = fmt.Sprintf("%q[%d]", r, slot)
			gotR, gotSlot, ok := parseSlotKey(key)
			if !ok || gotR != r || gotSlot != slot {
				t.Errorf("parseSlotKey(%q) = %q, %d, %v; want %q, %d, true", key, gotR, gotSlot, ok, r, slot)
			}
		}
	}
}

func TestSetDesiredAndResources(t *testing.T) {
	e := newEnv(t)
	s := e.service(t)
	ctx := testCtx(t)

	steps := []struct {
		name string
		do   func() error
		want map[string]int
	}{
		{"empty", func() error { return nil }, map[string]int{}},
		{"add two", func() error {
			if err := s.SetDesired(ctx, "async:q0", 2); err != nil {
				return err
			}
			return s.SetDesired(ctx, "esm:m1", 1)
		}, map[string]int{"async:q0": 2, "esm:m1": 1}},
		{"grow", func() error { return s.SetDesired(ctx, "esm:m1", 4) }, map[string]int{"async:q0": 2, "esm:m1": 4}},
		{"same again", func() error { return s.SetDesired(ctx, "esm:m1", 4) }, map[string]int{"async:q0": 2, "esm:m1": 4}},
		{"to zero", func() error { return s.SetDesired(ctx, "async:q0", 0) }, map[string]int{"async:q0": 0, "esm:m1": 4}},
		{"remove", func() error { return s.RemoveResource(ctx, "async:q0") }, map[string]int{"esm:m1": 4}},
		{"remove unknown", func() error { return s.RemoveResource(ctx, "nope") }, map[string]int{"esm:m1": 4}},
	}
	for _, st := range steps {
		if err := st.do(); err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		got, err := s.Resources(ctx)
		if err != nil {
			t.Fatalf("%s: Resources: %v", st.name, err)
		}
		if diff := cmp.Diff(st.want, got); diff != "" {
			t.Fatalf("%s: Resources (-want +got):\n%s", st.name, diff)
		}
	}

	// Bad input is refused and changes nothing.
	for _, tc := range []struct {
		name     string
		resource string
		slots    int
		field    string
	}{
		{"empty resource", "", 1, "resource"},
		{"long resource", strings.Repeat("r", MaxResourceLen+1), 1, "resource"},
		{"negative slots", "esm:m1", -1, "slots"},
		{"too many slots", "esm:m1", MaxSlots + 1, "slots"},
	} {
		err := s.SetDesired(ctx, tc.resource, tc.slots)
		var ee *errs.Error
		if !errors.As(err, &ee) || ee.Kind != errs.KindInvalidArgument || ee.Field != tc.field {
			t.Errorf("%s: SetDesired: got %v, want invalid %q", tc.name, err, tc.field)
		}
	}
	if err := s.RemoveResource(ctx, ""); !errs.IsInvalid(err) {
		t.Errorf("RemoveResource(\"\"): got %v, want invalid", err)
	}
	got, _ := s.Resources(ctx)
	if diff := cmp.Diff(map[string]int{"esm:m1": 4}, got); diff != "" {
		t.Fatalf("after bad input, Resources (-want +got):\n%s", diff)
	}
}

func TestAcquire(t *testing.T) {
	e := newEnv(t)
	s := e.service(t)
	mustSetDesired(t, s, "r1", 2)
	mustSetDesired(t, s, "r2", 1)
	now := e.clk.Now()

	a := mustAcquire(t, s, "A", 10, nil)
	sortLeases(a)
	if diff := cmp.Diff([]slotView{{"r1", 0, "A", 1}, {"r2", 0, "A", 1}}, views(a)); diff != "" {
		t.Fatalf("A's leases (-want +got):\n%s", diff)
	}
	for _, l := range a {
		if !l.Expires.Equal(now.Add(DefaultExpiry)) {
			t.Errorf("%v expires %v, want %v", l, l.Expires, now.Add(DefaultExpiry))
		}
		if l.Revision == 0 {
			t.Errorf("%v has no revision", l)
		}
	}
	// One slot per resource per holder: A gets nothing more.
	if got := mustAcquire(t, s, "A", 10, nil); len(got) != 0 {
		t.Fatalf("A again: got %v, want nothing", views(got))
	}
	// A holder that matches only r2 finds it taken.
	if got := mustAcquire(t, s, "D", 10, func(r string) bool { return r == "r2" }); len(got) != 0 {
		t.Fatalf("D (r2 only): got %v, want nothing", views(got))
	}
	b := mustAcquire(t, s, "B", 10, nil)
	if diff := cmp.Diff([]slotView{{"r1", 1, "B", 1}}, views(b)); diff != "" {
		t.Fatalf("B's leases (-want +got):\n%s", diff)
	}
	if got := mustAcquire(t, s, "C", 10, nil); len(got) != 0 {
		t.Fatalf("C: got %v, want nothing (all slots held)", views(got))
	}
	want := []slotView{{"r1", 0, "A", 1}, {"r1", 1, "B", 1}, {"r2", 0, "A", 1}}
	if diff := cmp.Diff(want, views(mustList(t, s))); diff != "" {
		t.Fatalf("List (-want +got):\n%s", diff)
	}

	// max bounds one call.
	mustSetDesired(t, s, "m1", 1)
	mustSetDesired(t, s, "m2", 1)
	mustSetDesired(t, s, "m3", 1)
	if got := mustAcquire(t, s, "E", 2, nil); len(got) != 2 {
		t.Fatalf("E with max 2: got %d leases, want 2", len(got))
	}

	for _, tc := range []struct {
		name, holder, field string
		max                 int
	}{
		{"no holder", "", "holder", 1},
		{"max 0", "F", "max", 0},
	} {
		_, err := s.Acquire(testCtx(t), tc.holder, tc.max, nil)
		var ee *errs.Error
		if !errors.As(err, &ee) || ee.Field != tc.field {
			t.Errorf("%s: got %v, want invalid %q", tc.name, err, tc.field)
		}
	}
}

// TestAcquireConcurrent races holders on separate Services (separate
// gateways) for the same slots, round after round of expiry: no slot is
// ever held by two of them.
func TestAcquireConcurrent(t *testing.T) {
	e := newEnv(t)
	const holders = 8
	svcs := make([]*Service, holders)
	for i := range svcs {
		svcs[i] = e.service(t)
	}
	slots := map[string]int{"async:q": 3, "esm:m": 2}
	total := 0
	for r, n := range slots {
		mustSetDesired(t, svcs[0], r, n)
		total += n
	}
	for round := 1; round <= 4; round++ {
		var mu sync.Mutex
		owner := map[string]string{} // key → holder; guarded by mu
		var problems []string        // guarded by mu
		var wg sync.WaitGroup
		for i := range holders {
			wg.Go(func() {
				holder := fmt.Sprintf("h%d", i)
				got, err := svcs[i].Acquire(testCtx(t), holder, 10, nil)
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					problems = append(problems, fmt.Sprintf("%s: Acquire: %v", holder, err))
					return
				}
				for _, l := range got {
					if prev, dup := owner[l.Key()]; dup {
						problems = append(problems, fmt.Sprintf("%s acquired by %s and %s", l.Key(), prev, holder))
					}
					owner[l.Key()] = holder
					if l.Epoch != uint64(round) {
						problems = append(problems, fmt.Sprintf("%v has epoch %d, want %d", l, l.Epoch, round))
					}
				}
			})
		}
		wg.Wait()
		for _, p := range problems {
			t.Errorf("round %d: %s", round, p)
		}
		if len(owner) != total {
			t.Fatalf("round %d: %d slots acquired, want %d", round, len(owner), total)
		}
		for _, l := range mustList(t, svcs[0]) {
			if owner[l.Key()] != l.Holder {
				t.Errorf("round %d: stored holder of %s is %q, acquirer was %q", round, l.Key(), l.Holder, owner[l.Key()])
			}
		}
		e.clk.Advance(DefaultExpiry) // everything expires: next round is all takeovers
	}
}

func TestTakeoverAfterExpiry(t *testing.T) {
	e := newEnv(t)
	reg := prometheus.NewRegistry()
	sa := newService(t, e.js, e.clk, reg)
	sb := newService(t, e.js, e.clk, reg) // a second gateway, same registry: shares metrics
	ctx := testCtx(t)
	mustSetDesired(t, sa, "async:q", 1)

	a := mustAcquireOne(t, sa, "A", "async:q")
	e.clk.Advance(2 * time.Second)
	if got := mustAcquire(t, sb, "B", 1, nil); len(got) != 0 {
		t.Fatalf("B before expiry: got %v, want nothing", views(got))
	}
	a, err := sa.Heartbeat(ctx, a)
	if err != nil {
		t.Fatalf("Heartbeat: %v", err)
	}
	if want := e.clk.Now().Add(DefaultExpiry); !a.Expires.Equal(want) {
		t.Fatalf("after heartbeat expires %v, want %v", a.Expires, want)
	}
	e.clk.Advance(2 * time.Second) // 4 s after acquiring, 2 s after the heartbeat
	if got := mustAcquire(t, sb, "B", 1, nil); len(got) != 0 {
		t.Fatalf("B after the heartbeat: got %v, want nothing", views(got))
	}
	if err := sa.Check(ctx, a); err != nil {
		t.Fatalf("A's Check while held: %v", err)
	}
	e.clk.Advance(time.Second) // exactly the expiry after the heartbeat: expired
	if err := sa.Check(ctx, a); !IsLost(err) {
		t.Fatalf("A's Check at expiry: got %v, want lost", err)
	}
	b := mustAcquireOne(t, sb, "B", "async:q")
	if b.Epoch <= a.Epoch {
		t.Fatalf("takeover epoch %d, want above %d", b.Epoch, a.Epoch)
	}
	_, err = sa.Heartbeat(ctx, a)
	wantLost(t, "A's Heartbeat after takeover", err)
	wantLost(t, "A's Check after takeover", sa.Check(ctx, a))
	if err := sb.Check(ctx, b); err != nil {
		t.Fatalf("B's Check: %v", err)
	}
	// A's late release does not touch B's slot.
	if err := sa.Release(ctx, a); err != nil {
		t.Fatalf("A's Release after takeover: %v", err)
	}
	if diff := cmp.Diff([]slotView{{"async:q", 0, "B", b.Epoch}}, views(mustList(t, sa))); diff != "" {
		t.Fatalf("List after A's release (-want +got):\n%s", diff)
	}
	for name, want := range map[string]float64{
		"skiff_lease_acquisitions_total": 2,
		"skiff_lease_takeovers_total":    1,
	} {
		if got := gather(t, reg, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
}

// gather returns the value of a metric (the sum over its series whose
// labels include the given name=value pairs).
func gather(t testing.TB, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("Gather: %v", err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	series:
		for _, m := range mf.GetMetric() {
			have := map[string]string{}
			for _, lp := range m.GetLabel() {
				have[lp.GetName()] = lp.GetValue()
			}
			for i := 0; i+1 < len(labels); i += 2 {
				if have[labels[i]] != labels[i+1] {
					continue series
				}
			}
			sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return sum
}

// TestFencing checks Heartbeat and Check against every way a lease can be
// lost.
func TestFencing(t *testing.T) {
	e := newEnv(t)
	s := e.service(t)
	ctx := testCtx(t)
	for _, tc := range []struct {
		name string
		// setup acquires on resource r and returns the lease to test.
		setup func(t *testing.T, r string) Lease
		lost  bool
	}{
		{"held", func(t *testing.T, r string) Lease { return mustAcquireOne(t, s, "A", r) }, false},
		{"held after heartbeat", func(t *testing.T, r string) Lease {
			l := mustAcquireOne(t, s, "A", r)
			e.clk.Advance(time.Second)
			l, err := s.Heartbeat(ctx, l)
			if err != nil {
				t.Fatalf("Heartbeat: %v", err)
			}
			return l
		}, false},
		{"old copy after heartbeat", func(t *testing.T, r string) Lease {
			// A copy from before a heartbeat is the same holder and epoch.
			l := mustAcquireOne(t, s, "A", r)
			if _, err := s.Heartbeat(ctx, l); err != nil {
				t.Fatalf("Heartbeat: %v", err)
			}
			return l
		}, false},
		{"stale epoch", func(t *testing.T, r string) Lease {
			old := mustAcquireOne(t, s, "A", r)
			if err := s.Release(ctx, old); err != nil {
				t.Fatalf("Release: %v", err)
			}
			if l := mustAcquireOne(t, s, "A", r); l.Epoch <= old.Epoch {
				t.Fatalf("re-acquired epoch %d, want above %d", l.Epoch, old.Epoch)
			}
			return old
		}, true},
		{"other holder", func(t *testing.T, r string) Lease {
			l := mustAcquireOne(t, s, "A", r)
			l.Holder = "B"
			return l
		}, true},
		{"expired, not taken", func(t *testing.T, r string) Lease {
			l := mustAcquireOne(t, s, "A", r)
			e.clk.Advance(DefaultExpiry)
			return l
		}, true},
		{"expired and taken", func(t *testing.T, r string) Lease {
			l := mustAcquireOne(t, s, "A", r)
			e.clk.Advance(DefaultExpiry + time.Millisecond)
			mustAcquireOne(t, s, "B", r)
			return l
		}, true},
		{"released", func(t *testing.T, r string) Lease {
			l := mustAcquireOne(t, s, "A", r)
			if err := s.Release(ctx, l); err != nil {
				t.Fatalf("Release: %v", err)
			}
			return l
		}, true},
		{"resource removed", func(t *testing.T, r string) Lease {
			l := mustAcquireOne(t, s, "A", r)
			if err := s.RemoveResource(ctx, r); err != nil {
				t.Fatalf("RemoveResource: %v", err)
			}
			return l
		}, true},
		{"slot dropped by shrinking", func(t *testing.T, r string) Lease {
			mustSetDesired(t, s, r, 2)
			mustAcquireOne(t, s, "A", r)
			l := mustAcquireOne(t, s, "B", r)
			if l.Slot != 1 {
				t.Fatalf("B got slot %d, want 1", l.Slot)
			}
			mustSetDesired(t, s, r, 1)
			return l
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := "fence:" + strings.ReplaceAll(tc.name, " ", "-")
			mustSetDesired(t, s, r, 1)
			l := tc.setup(t, r)
			checkErr := s.Check(ctx, l)
			_, hbErr := s.Heartbeat(ctx, l)
			if tc.lost {
				wantLost(t, "Check", checkErr)
				wantLost(t, "Heartbeat", hbErr)
				return
			}
			if checkErr != nil || hbErr != nil {
				t.Fatalf("Check: %v, Heartbeat: %v; want both nil", checkErr, hbErr)
			}
		})
	}

	for _, tc := range []struct {
		name  string
		l     Lease
		field string
	}{
		{"no resource", Lease{Holder: "A", Epoch: 1}, "resource"},
		{"no holder", Lease{Resource: "r", Epoch: 1}, "holder"},
		{"no epoch", Lease{Resource: "r", Holder: "A"}, "epoch"},
		{"negative slot", Lease{Resource: "r", Holder: "A", Epoch: 1, Slot: -1}, "slot"},
	} {
		for name, err := range map[string]error{
			"Check":   s.Check(ctx, tc.l),
			"Release": s.Release(ctx, tc.l),
		} {
			var ee *errs.Error
			if !errors.As(err, &ee) || ee.Field != tc.field {
				t.Errorf("%s %s: got %v, want invalid %q", name, tc.name, err, tc.field)
			}
		}
	}
}

func TestReleaseHandsOver(t *testing.T) {
	e := newEnv(t)
	s := e.service(t)
	ctx := testCtx(t)
	mustSetDesired(t, s, "q", 1)
	a := mustAcquireOne(t, s, "A", "q")
	if got := mustAcquire(t, s, "B", 1, nil); len(got) != 0 {
		t.Fatalf("B while A holds: got %v", views(got))
	}
	if err := s.Release(ctx, a); err != nil {
		t.Fatalf("Release: %v", err)
	}
	if err := s.Release(ctx, a); err != nil {
		t.Fatalf("second Release: %v", err)
	}
	// No waiting for the expiry after a release.
	b := mustAcquireOne(t, s, "B", "q")
	if b.Epoch != a.Epoch+1 {
		t.Fatalf("B's epoch %d, want %d", b.Epoch, a.Epoch+1)
	}
}

// TestEpochsOnlyGrow: shrinking, regrowing, removing and re-adding a
// resource never hands out an epoch a former holder had.
func TestEpochsOnlyGrow(t *testing.T) {
	e := newEnv(t)
	s := e.service(t)
	ctx := testCtx(t)
	mustSetDesired(t, s, "q", 2)
	a := mustAcquireOne(t, s, "A", "q")
	b := mustAcquireOne(t, s, "B", "q")
	if a.Slot != 0 || b.Slot != 1 {
		t.Fatalf("slots A=%d B=%d, want 0 and 1", a.Slot, b.Slot)
	}
	mustSetDesired(t, s, "q", 1)
	if _, err := s.Heartbeat(ctx, b); !IsLost(err) {
		t.Fatalf("B's heartbeat after shrinking: got %v, want lost", err)
	}
	if diff := cmp.Diff([]slotView{{"q", 0, "A", a.Epoch}}, views(mustList(t, s))); diff != "" {
		t.Fatalf("List after shrinking (-want +got):\n%s", diff)
	}
	mustSetDesired(t, s, "q", 2)
	c := mustAcquireOne(t, s, "C", "q")
	if c.Slot != 1 || c.Epoch <= b.Epoch {
		t.Fatalf("C got slot %d epoch %d, want slot 1 with an epoch above %d", c.Slot, c.Epoch, b.Epoch)
	}
	if _, err := s.Heartbeat(ctx, b); !IsLost(err) {
		t.Fatalf("B's old lease after regrowing: got %v, want lost", err)
	}

	if err := s.RemoveResource(ctx, "q"); err != nil {
		t.Fatalf("RemoveResource: %v", err)
	}
	if got := mustList(t, s); len(got) != 0 {
		t.Fatalf("List after removing: got %v, want nothing", views(got))
	}
	if got := mustAcquire(t, s, "D", 5, nil); len(got) != 0 {
		t.Fatalf("Acquire after removing: got %v, want nothing", views(got))
	}
	mustSetDesired(t, s, "q", 2)
	d := mustAcquireOne(t, s, "A", "q")
	f := mustAcquireOne(t, s, "C", "q")
	if d.Epoch <= a.Epoch || f.Epoch <= c.Epoch {
		t.Fatalf("epochs after re-adding: %d and %d, want above %d and %d", d.Epoch, f.Epoch, a.Epoch, c.Epoch)
	}
	if err := s.Check(ctx, a); !IsLost(err) {
		t.Fatalf("A's lease from before the removal: got %v, want lost", err)
	}
}

func TestSweep(t *testing.T) {
	e := newEnv(t)
	reg := prometheus.NewRegistry()
	s := newService(t, e.js, e.clk, reg)
	ctx := testCtx(t)
	mustSetDesired(t, s, "q", 3)
	a := mustAcquireOne(t, s, "A", "q")
	b := mustAcquireOne(t, s, "B", "q")
	// An orphan: a slot above the desired count (left by a race with a
	// shrink) and one of a resource that is gone.
	for _, l := range []Lease{{Resource: "q", Slot: 7, Holder: "X", Epoch: 1, Expires: e.clk.Now().Add(time.Hour)}, {Resource: "gone", Slot: 0, Holder: "X", Epoch: 1}} {
		if _, err := s.kv.Put(ctx, l.Key(), encodeSlot(l)); err != nil {
			t.Fatalf("Put: %v", err)
		}
	}
	e.clk.Advance(2 * time.Second)
	a, err := s.Heartbeat(ctx, a)
	if err != nil {
		t.Fatalf("Heartbeat: %v", err)
	}
	e.clk.Advance(time.Second) // B expired, A not
	freed, err := s.Sweep(ctx)
	if err != nil {
		t.Fatalf("Sweep: %v", err)
	}
	if freed != 1 {
		t.Fatalf("Sweep freed %d, want 1", freed)
	}
	want := []slotView{{"q", 0, "A", a.Epoch}, {"q", 1, "", b.Epoch}}
	if diff := cmp.Diff(want, views(mustList(t, s))); diff != "" {
		t.Fatalf("List after Sweep (-want +got):\n%s", diff)
	}
	wantLost(t, "B's Check after Sweep", s.Check(ctx, b))
	for name, want := range map[string]float64{
		"skiff_lease_expired_total": 1,
		"skiff_lease_sweeps_total":  1,
	} {
		if got := gather(t, reg, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	held := gather(t, reg, "skiff_lease_slots", "state", "held")
	free := gather(t, reg, "skiff_lease_slots", "state", "free")
	if held != 1 || free != 2 {
		t.Errorf("slots held=%v free=%v, want 1 and 2", held, free)
	}
	// Nothing more to do on a second pass.
	if freed, err := s.Sweep(ctx); err != nil || freed != 0 {
		t.Fatalf("second Sweep: freed %d, %v; want 0, nil", freed, err)
	}
	c := mustAcquireOne(t, s, "C", "q")
	if c.Slot != 1 || c.Epoch != b.Epoch+1 {
		t.Fatalf("C got slot %d epoch %d, want slot 1 epoch %d", c.Slot, c.Epoch, b.Epoch+1)
	}
}
