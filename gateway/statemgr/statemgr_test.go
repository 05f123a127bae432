package statemgr

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/async"
	"skiff.dev/skiff/gateway/lease"
	"skiff.dev/skiff/gateway/store"
)

func testCtx(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// fakeFunctions lists functions from a map, a page at a time.
type fakeFunctions struct {
	mu  sync.Mutex
	fns map[string]*skiffv1.Function // guarded by mu
}

func (f *fakeFunctions) set(name string, reserved *int32) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fns[name] = &skiffv1.Function{Name: name, ReservedConcurrency: reserved}
}

func (f *fakeFunctions) ListFunctions(_ context.Context, after string, limit int) ([]*skiffv1.Function, string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var names []string
	for n := range f.fns {
		if n > after {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	next := ""
	if len(names) > limit {
		names = names[:limit]
		next = names[limit-1]
	}
	out := make([]*skiffv1.Function, 0, len(names))
	for _, n := range names {
		out = append(out, f.fns[n])
	}
	return out, next, nil
}

// fakeLeases keeps the desired state in a map.
type fakeLeases struct {
	mu   sync.Mutex
	want map[string]int // guarded by mu
	sets int            // guarded by mu
}

func (l *fakeLeases) SetDesired(_ context.Context, r string, n int) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.want[r] = n
	l.sets++
	return nil
}

func (l *fakeLeases) RemoveResource(_ context.Context, r string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.want, r)
	return nil
}

func (l *fakeLeases) Resources(context.Context) (map[string]int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[string]int{}
	for k, v := range l.want {
		out[k] = v
	}
	return out, nil
}

func (l *fakeLeases) snapshot() (map[string]int, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[string]int{}
	for k, v := range l.want {
		out[k] = v
	}
	return out, l.sets
}

func setup(t *testing.T) (*async.Service, *fakeFunctions, *fakeLeases, *Manager) {
	t.Helper()
	st, err := store.Open(testCtx(t), store.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	svc, err := async.New(testCtx(t), st.JetStream(), async.Config{SharedQueues: 2})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() })
	fns := &fakeFunctions{fns: map[string]*skiffv1.Function{}}
	ls := &fakeLeases{want: map[string]int{}}
	m, err := New(Config{BacklogPerSlot: 10, MaxSlots: 4, Registry: prometheus.NewRegistry()}, svc, fns, ls)
	if err != nil {
		t.Fatal(err)
	}
	return svc, fns, ls, m
}

func reconcile(t *testing.T, m *Manager) {
	t.Helper()
	if err := m.Reconcile(testCtx(t)); err != nil {
		t.Fatalf("Reconcile: %v", err)
	}
}

func accept(t *testing.T, svc *async.Service, fn string, n int, tag string) {
	t.Helper()
	for i := range n {
		if err := svc.Accept(testCtx(t), fn, []byte("{}"), fmt.Sprintf("%s-%d", tag, i)); err != nil {
			t.Fatal(err)
		}
	}
}

func stats(t *testing.T, svc *async.Service) map[string]uint64 {
	t.Helper()
	qs, err := svc.Queues(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]uint64{}
	for _, q := range qs {
		out[q.Subject] = q.Backlog
	}
	return out
}

func TestIdleQueuesGetRedundantPollers(t *testing.T) {
	_, _, ls, m := setup(t)
	reconcile(t, m)
	got, sets := ls.snapshot()
	want := map[string]int{"async:async.shared.0": 2, "async:async.shared.1": 2}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("desired (-want +got):\n%s", diff)
	}
	reconcile(t, m)
	if _, again := ls.snapshot(); again != sets {
		t.Errorf("a second round with nothing changed wrote %d times, want 0", again-sets)
	}
}

func TestBacklogScalesPollers(t *testing.T) {
	svc, _, ls, m := setup(t)
	fn := "busy"
	subj := svc.QueueFor(fn)
	for _, tc := range []struct {
		add  int
		want int
	}{
		{0, 2}, {5, 3}, {10, 4}, {100, 4}, // min 2, +1 per 10 events, max 4
	} {
		accept(t, svc, fn, tc.add, fmt.Sprintf("b%d", tc.add))
		reconcile(t, m)
		got, _ := ls.snapshot()
		if got[async.Resource(subj)] != tc.want {
			t.Errorf("after %d more events: %d slots, want %d", tc.add, got[async.Resource(subj)], tc.want)
		}
	}
}

// TestDedicatedQueueMove: a function whose reserved concurrency reaches
// the threshold gets a dedicated queue; events already in the shared
// queue stay there (nothing lost or duplicated), new ones go to the
// dedicated queue, and a drained dedicated queue is retired after the
// function moves back.
func TestDedicatedQueueMove(t *testing.T) {
	svc, fns, ls, m := setup(t)
	big := int32(100)
	fns.set("hot", &big)
	fns.set("cold", nil)
	shared := svc.QueueFor("hot")
	accept(t, svc, "hot", 3, "before")
	reconcile(t, m)
	if got := svc.QueueFor("hot"); got != "async.fn.hot" {
		t.Fatalf("route of hot = %q, want async.fn.hot", got)
	}
	if got := svc.QueueFor("cold"); got == "async.fn.cold" {
		t.Fatalf("cold got a dedicated queue")
	}
	accept(t, svc, "hot", 2, "after")
	st := stats(t, svc)
	if st[shared] != 3 || st["async.fn.hot"] != 2 {
		t.Errorf("backlog shared %d, dedicated %d; want 3 and 2", st[shared], st["async.fn.hot"])
	}
	reconcile(t, m)
	got, _ := ls.snapshot()
	if got["async:async.fn.hot"] != 3 {
		t.Errorf("dedicated queue slots %d, want 3 (min 2 + backlog)", got["async:async.fn.hot"])
	}

	// The reservation drops: new events go back to the shared queue, the
	// dedicated one keeps its pollers until it is drained.
	small := int32(5)
	fns.set("hot", &small)
	reconcile(t, m)
	if got := svc.QueueFor("hot"); got != shared {
		t.Fatalf("route of hot after the drop = %q, want %q", got, shared)
	}
	got, _ = ls.snapshot()
	if _, ok := got["async:async.fn.hot"]; !ok {
		t.Fatalf("the dedicated queue lost its pollers while it holds events: %v", got)
	}
	// Drain the dedicated queue with a pool, then it is retired.
	inv := &countInvoker{}
	p := svc.NewPool(inv, nil, nil, nil)
	defer p.Close()
	p.Gained(lease.Lease{Resource: "async:async.fn.hot", Holder: "t", Epoch: 1})
	deadline := time.Now().Add(10 * time.Second)
	for stats(t, svc)["async.fn.hot"] != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the dedicated queue did not drain")
		}
		time.Sleep(10 * time.Millisecond)
	}
	p.Close()
	reconcile(t, m)
	got, _ = ls.snapshot()
	if _, ok := got["async:async.fn.hot"]; ok {
		t.Errorf("a drained, unrouted dedicated queue still has pollers: %v", got)
	}
	if _, ok := stats(t, svc)["async.fn.hot"]; ok {
		t.Errorf("the retired dedicated queue is still listed")
	}
	if st := stats(t, svc); st[shared] != 3 {
		t.Errorf("shared backlog %d, want the 3 events accepted before the move", st[shared])
	}
}

type countInvoker struct {
	mu sync.Mutex
	n  int
}

func (c *countInvoker) InvokeSync(_ context.Context, fn string, _ []byte, rid string) (*skiffv1.InvokeResponse, error) {
	c.mu.Lock()
	c.n++
	c.mu.Unlock()
	return &skiffv1.InvokeResponse{StatusCode: 200}, nil
}

func TestConfigDefaults(t *testing.T) {
	for _, tc := range []struct {
		cfg Config
		ok  bool
	}{
		{Config{}, true},
		{Config{MinSlots: 3, MaxSlots: 2}, false},
		{Config{DedicatedThreshold: -1}, false},
		{Config{BacklogPerSlot: -5}, false},
	} {
		_, err := New(tc.cfg, &async.Service{}, &fakeFunctions{}, &fakeLeases{})
		if (err == nil) != tc.ok {
			t.Errorf("New(%+v): %v, want ok %v", tc.cfg, err, tc.ok)
		}
	}
}
