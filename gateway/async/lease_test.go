package async

import (
	"context"
	"fmt"
	"testing"
	"time"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/lease"
)

// TestTakeoverFencesStaleAck runs two pools under the real leasing
// service: when the first stops heartbeating, the second takes the queue
// over at a new epoch, and the first poller's acknowledgement of the event
// it was running is refused; the event is processed by the new holder.
func TestTakeoverFencesStaleAck(t *testing.T) {
	js := openJS(t, "")
	svc, _ := newService(t, js, Config{SharedQueues: 1})
	t0 := time.Date(2026, 1, 2, 0, 0, 0, 0, time.UTC)
	clk := &clock{t: t0}
	ls, err := lease.New(testCtx(t), js, lease.Config{Expiry: 3 * time.Second, Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	ctx := testCtx(t)
	res := Resource(SharedSubject(0))
	if err := ls.SetDesired(ctx, res, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.PutEventConfig(ctx, "fn", &skiffv1.EventInvokeConfig{OnSuccess: "queue:ok"}); err != nil {
		t.Fatal(err)
	}

	entered, release := make(chan struct{}), make(chan struct{})
	invA := &fakeInvoker{fn: func(n int, _ string, _ []byte, rid string) (*skiffv1.InvokeResponse, error) {
		close(entered)
		<-release
		return &skiffv1.InvokeResponse{StatusCode: 200}, nil
	}}
	destA, destB := &fakeDest{}, &fakeDest{}
	poolA := svc.NewPool(invA, destA, nil, ls)
	t.Cleanup(poolA.Close)
	kA := ls.NewKeeper("gw-a/async", 4, IsResource, poolA.Gained, poolA.Lost)
	if err := kA.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	if got := poolA.Polling(); len(got) != 1 {
		t.Fatalf("pool A polls %v, want the shared queue", got)
	}
	if err := svc.Accept(ctx, "fn", []byte("{}"), "rid-takeover"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-entered:
	case <-ctx.Done():
		t.Fatal("pool A never invoked the event")
	}
	epochA := kA.Held()[0].Epoch

	// A stops heartbeating; after the expiry B takes the queue over.
	clk.Set(t0.Add(4 * time.Second))
	invB := &fakeInvoker{}
	poolB := svc.NewPool(invB, destB, nil, ls)
	t.Cleanup(poolB.Close)
	kB := ls.NewKeeper("gw-b/async", 4, IsResource, poolB.Gained, poolB.Lost)
	if err := kB.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	held := kB.Held()
	if len(held) != 1 || held[0].Epoch <= epochA {
		t.Fatalf("B holds %v, want the queue at an epoch above %d", held, epochA)
	}

	// A's invocation ends: its ack is fenced, B processes the event.
	close(release)
	waitFor(t, "B's success record", 10*time.Second, func() bool { return len(destB.Records()) == 1 })
	if r := destA.Records(); len(r) != 0 {
		t.Errorf("the stale holder delivered %+v", r)
	}
	if got := poolA.Polling(); len(got) != 0 {
		t.Errorf("pool A still polls %v after its lease was taken", got)
	}
	if n := len(invB.Calls()); n != 1 {
		t.Errorf("B invoked %d times, want 1", n)
	}
	waitFor(t, "the queue to drain", 10*time.Second, func() bool { return len(streamMsgs(t, svc, SharedSubject(0))) == 0 })
}

// TestPoolRunDrainsThenReleases: Run feeds the pool from a real keeper;
// when its context ends the pool stops, and the leases are released so
// another gateway can take over at once.
func TestPoolRunDrainsThenReleases(t *testing.T) {
	js := openJS(t, "")
	svc, reg := newService(t, js, Config{SharedQueues: 2})
	ls, err := lease.New(testCtx(t), js, lease.Config{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := testCtx(t)
	for i := range 2 {
		if err := ls.SetDesired(ctx, Resource(SharedSubject(i)), 2); err != nil {
			t.Fatal(err)
		}
	}
	inv := &fakeInvoker{}
	p := svc.NewPool(inv, nil, nil, ls)
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- p.Run(runCtx, ls.NewKeeper("gw/async", 8, IsResource, p.Gained, p.Lost), 5*time.Second)
	}()
	waitFor(t, "both queues polled", 10*time.Second, func() bool { return len(p.Polling()) == 2 })
	if got := counterValue(t, reg, "skiff_async_poller_assignments", nil); got != 2 {
		t.Errorf("assignments gauge %v, want 2", got)
	}
	for i := range 20 {
		if err := svc.Accept(ctx, fmt.Sprintf("fn%d", i), nil, fmt.Sprintf("rid-%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "all events", 10*time.Second, func() bool { return len(inv.Calls()) == 20 })
	stop()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	leases, err := ls.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range leases {
		if l.Holder == "gw/async" && !l.Free(time.Now()) {
			t.Errorf("lease %v still held after Run returned", l)
		}
	}
	if got := counterValue(t, reg, "skiff_async_poller_assignments", nil); got != 0 {
		t.Errorf("assignments gauge %v after Run, want 0", got)
	}
}
