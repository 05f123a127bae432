package lease

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
)

// recorder collects a keeper's callbacks.
type recorder struct {
	mu           sync.Mutex
	gained, lost []Lease // guarded by mu
	gainedc      chan Lease
	lostc        chan Lease
}

func newRecorder() *recorder {
	return &recorder{gainedc: make(chan Lease, 100), lostc: make(chan Lease, 100)}
}

func (r *recorder) onGained(l Lease) {
	r.mu.Lock()
	r.gained = append(r.gained, l)
	r.mu.Unlock()
	r.gainedc <- l
}

func (r *recorder) onLost(l Lease) {
	r.mu.Lock()
	r.lost = append(r.lost, l)
	r.mu.Unlock()
	r.lostc <- l
}

// take returns and clears what was recorded.
func (r *recorder) take() (gained, lost []Lease) {
	r.mu.Lock()
	defer r.mu.Unlock()
	gained, lost = r.gained, r.lost
	r.gained, r.lost = nil, nil
	for range len(gained) {
		<-r.gainedc
	}
	for range len(lost) {
		<-r.lostc
	}
	return gained, lost
}

func (r *recorder) keeper(s *Service, holder string, max int, match func(string) bool) *Keeper {
	return s.NewKeeper(holder, max, match, r.onGained, r.onLost)
}

func mustTick(t testing.TB, k *Keeper) {
	t.Helper()
	if err := k.Tick(testCtx(t)); err != nil {
		t.Fatalf("%s: Tick: %v", k.Holder(), err)
	}
}

// TestKeeperTakeover: a holder that stops heartbeating loses its slot
// within the expiry, another keeper takes it over with a higher epoch, the
// old holder's fenced side effects are rejected, and it reports the loss
// at its next tick.
func TestKeeperTakeover(t *testing.T) {
	e := newEnv(t)
	reg := prometheus.NewRegistry()
	sa := newService(t, e.js, e.clk, reg)
	sb := newService(t, e.js, e.clk, reg)
	mustSetDesired(t, sa, "async:q", 1)
	ra, rb := newRecorder(), newRecorder()
	ka, kb := ra.keeper(sa, "gw-a", 4, nil), rb.keeper(sb, "gw-b", 4, nil)
	interval := sa.Interval()

	mustTick(t, ka)
	mustTick(t, kb)
	gained, lost := ra.take()
	if diff := cmp.Diff([]slotView{{"async:q", 0, "gw-a", 1}}, views(gained)); diff != "" || len(lost) != 0 {
		t.Fatalf("A's first tick: gained (-want +got):\n%s lost %v", diff, views(lost))
	}
	if g, l := rb.take(); len(g)+len(l) != 0 {
		t.Fatalf("B's first tick: gained %v lost %v, want nothing", views(g), views(l))
	}
	aLease := gained[0]

	// Both tick for a while: A keeps its slot, B gets nothing.
	for range 5 {
		e.clk.Advance(interval)
		mustTick(t, ka)
		mustTick(t, kb)
	}
	if g, l := ra.take(); len(g)+len(l) != 0 {
		t.Fatalf("A while alive: gained %v lost %v, want nothing", views(g), views(l))
	}
	if g, _ := rb.take(); len(g) != 0 {
		t.Fatalf("B while A is alive: gained %v, want nothing", views(g))
	}
	if err := sa.Check(testCtx(t), aLease); err != nil {
		t.Fatalf("A's Check while alive: %v", err)
	}

	// A stops heartbeating (a hung or dead poller). B ticks every interval.
	lastBeat := e.clk.Now()
	var bLease Lease
	for step := 1; ; step++ {
		e.clk.Advance(interval)
		mustTick(t, kb)
		if g, _ := rb.take(); len(g) == 1 {
			bLease = g[0]
			break
		}
		if step > 10 {
			t.Fatalf("B never took the slot over")
		}
	}
	if took := e.clk.Now().Sub(lastBeat); took > sa.Expiry() {
		t.Fatalf("takeover %v after the last heartbeat, want within the expiry %v", took, sa.Expiry())
	}
	if bLease.Epoch <= aLease.Epoch || bLease.Holder != "gw-b" {
		t.Fatalf("B's lease %v, want holder gw-b with an epoch above %d", bLease, aLease.Epoch)
	}
	// A's ack with the stale epoch is rejected even before A notices.
	wantLost(t, "A's Check after the takeover", sa.Check(testCtx(t), aLease))

	// A wakes up: its next tick reports the loss and it does not get the
	// slot back.
	mustTick(t, ka)
	gained, lost = ra.take()
	if len(gained) != 0 || len(lost) != 1 || lost[0].Key() != aLease.Key() {
		t.Fatalf("A's tick after the takeover: gained %v lost %v, want just %s lost", views(gained), views(lost), aLease.Key())
	}
	if len(ka.Held()) != 0 {
		t.Fatalf("A still holds %v", views(ka.Held()))
	}
	if diff := cmp.Diff([]slotView{{"async:q", 0, "gw-b", bLease.Epoch}}, views(kb.Held())); diff != "" {
		t.Fatalf("B holds (-want +got):\n%s", diff)
	}
	for name, want := range map[string]float64{
		"skiff_lease_takeovers_total":  1,
		"skiff_lease_losses_total":     1,
		"skiff_lease_assignments_held": 1,
	} {
		if got := gather(t, reg, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
}

// TestKeeperLossWithinOneInterval: when heartbeats fail (the engine is
// gone), the keeper keeps the lease while it would survive until the next
// tick and reports it lost before it expires.
func TestKeeperLossWithinOneInterval(t *testing.T) {
	st := openStore(t)
	clk := newClock()
	s := newService(t, st.JetStream(), clk, nil)
	mustSetDesired(t, s, "q", 1)
	r := newRecorder()
	k := r.keeper(s, "gw", 1, nil)
	mustTick(t, k)
	gained, _ := r.take()
	if len(gained) != 1 {
		t.Fatalf("gained %v, want one lease", views(gained))
	}
	expires := gained[0].Expires

	if err := st.Close(); err != nil {
		t.Fatalf("closing the store: %v", err)
	}
	ctx, cancel := context.WithTimeout(testCtx(t), 10*time.Second)
	defer cancel()
	var lostAt time.Time
	for range 5 {
		clk.Advance(s.Interval())
		_ = k.Tick(ctx) // acquisition fails too: the engine is gone
		if _, lost := r.take(); len(lost) == 1 {
			lostAt = clk.Now()
			break
		}
	}
	if lostAt.IsZero() {
		t.Fatalf("the keeper never reported the lease lost")
	}
	if !lostAt.Before(expires) {
		t.Fatalf("reported lost at %v, want before the expiry %v", lostAt, expires)
	}
	if lostAt.Add(s.Interval()).Before(expires) {
		t.Fatalf("reported lost at %v, earlier than needed (it would live until %v)", lostAt, expires)
	}
	if len(k.Held()) != 0 {
		t.Fatalf("still held: %v", views(k.Held()))
	}
}

func TestKeeperMaxAndMatch(t *testing.T) {
	e := newEnv(t)
	s := e.service(t)
	for _, r := range []string{"async:a", "async:b", "async:c", "esm:x"} {
		mustSetDesired(t, s, r, 1)
	}
	var wantAsync atomic.Bool
	wantAsync.Store(true)
	isAsync := func(r string) bool { return wantAsync.Load() && len(r) > 6 && r[:6] == "async:" }
	r1, r2 := newRecorder(), newRecorder()
	k1 := r1.keeper(s, "k1", 2, isAsync)
	k2 := r2.keeper(s, "k2", 5, isAsync)

	mustTick(t, k1)
	mustTick(t, k2)
	if g, _ := r1.take(); len(g) != 2 {
		t.Fatalf("k1 (max 2) gained %v, want 2 leases", views(g))
	}
	g2, _ := r2.take()
	if len(g2) != 1 || g2[0].Resource == "esm:x" {
		t.Fatalf("k2 gained %v, want the one async resource left", views(g2))
	}
	// Ticking again changes nothing.
	e.clk.Advance(s.Interval())
	mustTick(t, k1)
	mustTick(t, k2)
	for _, r := range []*recorder{r1, r2} {
		if g, l := r.take(); len(g)+len(l) != 0 {
			t.Fatalf("steady tick: gained %v lost %v, want nothing", views(g), views(l))
		}
	}

	// The match turns false (the mapping was disabled): the keepers release
	// their slots at once and report them lost.
	wantAsync.Store(false)
	mustTick(t, k1)
	if _, l := r1.take(); len(l) != 2 {
		t.Fatalf("k1 after unmatching: lost %v, want 2", views(l))
	}
	for _, l := range mustList(t, s) {
		if l.Resource != g2[0].Resource && l.Holder != "" {
			t.Fatalf("%v still held after release", l)
		}
	}
	// Released slots are free without waiting for the expiry.
	got := mustAcquire(t, s, "other", 10, func(r string) bool { return r != g2[0].Resource })
	if len(got) != 3 {
		t.Fatalf("after the release another holder got %v, want 3 leases", views(got))
	}
}

func TestKeeperDroppedSlot(t *testing.T) {
	e := newEnv(t)
	s := e.service(t)
	mustSetDesired(t, s, "q", 2)
	ra, rb := newRecorder(), newRecorder()
	ka, kb := ra.keeper(s, "a", 1, nil), rb.keeper(s, "b", 1, nil)
	mustTick(t, ka)
	mustTick(t, kb)
	_, _ = ra.take()
	gb, _ := rb.take()
	if len(gb) != 1 || gb[0].Slot != 1 {
		t.Fatalf("b gained %v, want slot 1", views(gb))
	}
	mustSetDesired(t, s, "q", 1)
	e.clk.Advance(s.Interval())
	mustTick(t, ka)
	mustTick(t, kb)
	if g, l := ra.take(); len(g)+len(l) != 0 {
		t.Fatalf("a: gained %v lost %v, want nothing", views(g), views(l))
	}
	if g, l := rb.take(); len(g) != 0 || len(l) != 1 {
		t.Fatalf("b: gained %v lost %v, want slot 1 lost", views(g), views(l))
	}
	if err := s.RemoveResource(testCtx(t), "q"); err != nil {
		t.Fatalf("RemoveResource: %v", err)
	}
	mustTick(t, ka)
	if _, l := ra.take(); len(l) != 1 {
		t.Fatalf("a after removal: lost %v, want 1", views(l))
	}
}

func TestKeeperInvalid(t *testing.T) {
	s := newEnv(t).service(t)
	for _, k := range []*Keeper{s.NewKeeper("", 1, nil, nil, nil), s.NewKeeper("h", 0, nil, nil, nil)} {
		if err := k.Tick(testCtx(t)); err == nil {
			t.Errorf("Tick of keeper %q max %d: got nil, want an error", k.holder, k.max)
		}
		if err := k.Run(testCtx(t)); err == nil {
			t.Errorf("Run of keeper %q max %d: got nil, want an error", k.holder, k.max)
		}
	}
}

// TestKeeperRun runs a keeper on the real clock: it gains a slot, and when
// stopped releases it so another holder takes over at once.
func TestKeeperRun(t *testing.T) {
	st := openStore(t)
	s, err := New(testCtx(t), st.JetStream(), Config{Expiry: time.Second})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	mustSetDesired(t, s, "q", 1)
	r := newRecorder()
	k := r.keeper(s, "runner", 1, nil)
	ctx, cancel := context.WithCancel(testCtx(t))
	done := make(chan error, 1)
	go func() { done <- k.Run(ctx) }()

	var gained Lease
	select {
	case gained = <-r.gainedc:
	case <-time.After(10 * time.Second):
		t.Fatalf("Run gained nothing within 10s")
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("Run did not return after cancel")
	}
	select {
	case l := <-r.lostc:
		if l.Key() != gained.Key() {
			t.Fatalf("lost %v, want %v", l, gained)
		}
	default:
		t.Fatalf("Run returned without reporting %v lost", gained)
	}
	next := mustAcquireOne(t, s, "other", "q")
	if next.Epoch <= gained.Epoch {
		t.Fatalf("next epoch %d, want above %d", next.Epoch, gained.Epoch)
	}
}

// TestKeeperReclaimsPreviousIncarnation: a holder dies holding slots and
// restarts under the same name; its new keeper's first tick takes every
// slot back at once (no waiting for the expiry), each with a new epoch
// that fences the dead incarnation, while other holders' slots and slots
// the match rejects stay as they are.
func TestKeeperReclaimsPreviousIncarnation(t *testing.T) {
	e := newEnv(t)
	reg := prometheus.NewRegistry()
	s := newService(t, e.js, e.clk, reg)
	for _, r := range []string{"async:a", "async:b", "async:c", "other:x"} {
		mustSetDesired(t, s, r, 1)
	}
	rOld, rOther := newRecorder(), newRecorder()
	old := rOld.keeper(s, "gw-1", 10, func(r string) bool { return r != "async:c" })
	other := rOther.keeper(s, "gw-2", 1, func(r string) bool { return r == "async:c" })
	mustTick(t, old)
	mustTick(t, other)
	gainedOld, _ := rOld.take()
	if len(gainedOld) != 3 {
		t.Fatalf("first incarnation gained %v, want async:a, async:b and other:x", views(gainedOld))
	}
	rOther.take()

	// The process dies without releasing; a moment later it restarts
	// under the same holder name, this time polling only async:*.
	e.clk.Advance(s.Interval() / 2)
	rNew := newRecorder()
	restarted := rNew.keeper(s, "gw-1", 10, func(r string) bool { return r != "async:c" && r != "other:x" })
	mustTick(t, restarted)
	gained, lost := rNew.take()
	if len(lost) != 0 {
		t.Fatalf("restarted keeper lost %v", views(lost))
	}
	byKey := map[string]Lease{}
	for _, l := range gainedOld {
		byKey[l.Key()] = l
	}
	var got []string
	for _, l := range gained {
		got = append(got, l.Resource)
		prev := byKey[l.Key()]
		if l.Holder != "gw-1" || l.Epoch != prev.Epoch+1 {
			t.Errorf("reclaimed %v, want holder gw-1 with epoch %d", l, prev.Epoch+1)
		}
		wantLost(t, "the dead incarnation's Check of "+l.Resource, s.Check(testCtx(t), prev))
		if err := s.Check(testCtx(t), l); err != nil {
			t.Errorf("Check of the reclaimed %v: %v", l, err)
		}
	}
	if diff := cmp.Diff([]string{"async:a", "async:b"}, got); diff != "" {
		t.Fatalf("reclaimed at once (-want +got):\n%s", diff)
	}
	// other:x is not reclaimed (the match rejects it) and still belongs to
	// the dead incarnation until it expires; async:c stays gw-2's.
	leases, err := s.List(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range leases {
		switch l.Resource {
		case "other:x":
			if l.Holder != "gw-1" || l.Epoch != byKey[l.Key()].Epoch {
				t.Errorf("other:x changed to %v", l)
			}
		case "async:c":
			if l.Holder != "gw-2" {
				t.Errorf("async:c changed to %v", l)
			}
		}
	}
	// Later ticks do not reclaim again: the slots are simply held.
	e.clk.Advance(s.Interval())
	mustTick(t, restarted)
	if g, l := rNew.take(); len(g)+len(l) != 0 {
		t.Fatalf("second tick: gained %v lost %v, want nothing", views(g), views(l))
	}
}

// TestKeeperTakesOverDeadHolder: a holder reported dead (gossip's failure
// detection) loses its live slots to another keeper at once, with a new
// epoch that fences it; holders not reported dead keep theirs.
func TestKeeperTakesOverDeadHolder(t *testing.T) {
	e := newEnv(t)
	sa := newService(t, e.js, e.clk, nil)
	dead := map[string]bool{}
	var mu sync.Mutex
	sb, err := New(testCtx(t), e.js, Config{Now: e.clk.Now, Dead: func(h string) bool {
		mu.Lock()
		defer mu.Unlock()
		return dead[h]
	}})
	if err != nil {
		t.Fatal(err)
	}
	mustSetDesired(t, sa, "async:q", 1)
	ra, rb := newRecorder(), newRecorder()
	ka, kb := ra.keeper(sa, "gw-a/async", 4, nil), rb.keeper(sb, "gw-b/async", 4, nil)
	mustTick(t, ka)
	gained, _ := ra.take()
	if len(gained) != 1 {
		t.Fatalf("a gained %v", views(gained))
	}
	mustTick(t, kb)
	if g, _ := rb.take(); len(g) != 0 {
		t.Fatalf("b took %v from a live holder", views(g))
	}
	mu.Lock()
	dead["gw-a/async"] = true
	mu.Unlock()
	mustTick(t, kb) // no clock advance: a's slot has not expired
	g, _ := rb.take()
	if len(g) != 1 || g[0].Epoch <= gained[0].Epoch {
		t.Fatalf("b after a was reported dead: gained %v, want a's slot with a higher epoch", views(g))
	}
	wantLost(t, "a's Check after the takeover", sa.Check(testCtx(t), gained[0]))
}

// TestKickTicksAtOnce: a running keeper whose interval is long takes a
// dead holder's slot as soon as the service is kicked, not at its next
// interval.
func TestKickTicksAtOnce(t *testing.T) {
	e := newEnv(t)
	var dead atomic.Bool
	s, err := New(testCtx(t), e.js, Config{Expiry: time.Hour, Dead: func(h string) bool { return dead.Load() && h == "gw-a/async" }})
	if err != nil {
		t.Fatal(err)
	}
	mustSetDesired(t, s, "async:q", 1)
	if got := mustAcquire(t, s, "gw-a/async", 1, nil); len(got) != 1 {
		t.Fatalf("a acquired %v", views(got))
	}
	rb := newRecorder()
	kb := rb.keeper(s, "gw-b/async", 4, nil)
	ctx, cancel := context.WithCancel(testCtx(t))
	done := make(chan error, 1)
	go func() { done <- kb.Run(ctx) }()
	defer func() { cancel(); <-done }()
	// Once the first tick ran (nothing free), the next is 20 minutes away.
	for deadline := time.Now().Add(10 * time.Second); kb.ticks.Load() == 0; {
		if time.Now().After(deadline) {
			t.Fatal("the keeper never ticked")
		}
		time.Sleep(time.Millisecond) // polling a condition, with a deadline
	}
	if g, _ := rb.take(); len(g) != 0 {
		t.Fatalf("b gained %v from a live holder", views(g))
	}
	dead.Store(true)
	s.Kick()
	select {
	case l := <-rb.gainedc:
		if l.Resource != "async:q" || l.Holder != "gw-b/async" {
			t.Fatalf("gained %v", l)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the kicked keeper did not take the dead holder's slot")
	}
}
