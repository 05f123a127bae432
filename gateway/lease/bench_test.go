package lease

import (
	"fmt"
	"skiff.dev/skiff/gateway/store"
	"testing"
)

// BenchmarkCheck measures the fencing check a poller makes before each ack.
func BenchmarkCheck(b *testing.B) {
	e := newEnv(b)
	s := e.service(b)
	mustSetDesired(b, s, "q", 1)
	l := mustAcquireOne(b, s, "A", "q")
	ctx := testCtx(b)
	for b.Loop() {
		if err := s.Check(ctx, l); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkHeartbeat measures one heartbeat (a read and a compare-and-set).
func BenchmarkHeartbeat(b *testing.B) {
	e := newEnv(b)
	s := e.service(b)
	mustSetDesired(b, s, "q", 1)
	l := mustAcquireOne(b, s, "A", "q")
	ctx := testCtx(b)
	for b.Loop() {
		var err error
		if l, err = s.Heartbeat(ctx, l); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAcquireNothingFree measures a keeper tick's acquisition pass
// over 100 resources that are all held (the steady state).
func BenchmarkAcquireNothingFree(b *testing.B) {
	e := newEnv(b)
	s := e.service(b)
	for i := range 100 {
		r := fmt.Sprintf("async:q%d", i)
		mustSetDesired(b, s, r, 1)
		mustAcquireOne(b, s, "A", r)
	}
	ctx := testCtx(b)
	for b.Loop() {
		got, err := s.Acquire(ctx, "B", 1, nil)
		if err != nil || len(got) != 0 {
			b.Fatalf("got %v, %v", got, err)
		}
	}
}

// BenchmarkKeeperTick50: one keeper tick renewing 50 held leases (a
// stream of 10 shards at parallelization 5) on a store that fsyncs every
// write, as `--async-durability always` makes it.
func BenchmarkKeeperTick50(b *testing.B) {
	st, err := store.Open(testCtx(b), store.Config{DataDir: b.TempDir(), SyncAlways: true})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = st.Close() })
	s, err := New(testCtx(b), st.JetStream(), Config{})
	if err != nil {
		b.Fatal(err)
	}
	for i := range 50 {
		mustSetDesired(b, s, fmt.Sprintf("stream:m:%d", i), 1)
	}
	k := s.NewKeeper("gw/streams", 64, nil, nil, nil)
	if err := k.Tick(testCtx(b)); err != nil || len(k.Held()) != 50 {
		b.Fatalf("first tick: %v, holding %d", err, len(k.Held()))
	}
	b.ResetTimer()
	for b.Loop() {
		if err := k.Tick(testCtx(b)); err != nil {
			b.Fatal(err)
		}
	}
}
