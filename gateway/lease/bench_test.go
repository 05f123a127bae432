package lease

import (
	"fmt"
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
