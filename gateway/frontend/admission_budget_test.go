package frontend

import (
	"context"
	"sync"
	"testing"
	"time"

	"skiff.dev/skiff/gateway/budget"
	"skiff.dev/skiff/gateway/store"
	"skiff.dev/skiff/internal/errs"
)

// TestAdmissionAcrossGateways: two gateways' admissions over one real
// budget bucket: a reserved concurrency of 2 and an unreserved pool of 3
// hold across both, a released slot is usable from either, and the
// throttle names the cluster-wide limit.
func TestAdmissionAcrossGateways(t *testing.T) {
	st, err := store.Open(context.Background(), store.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	var adms []*admission
	runCtx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() { stop(); wg.Wait() })
	for _, name := range []string{"gw-a", "gw-b"} {
		b, err := budget.New(context.Background(), st.JetStream(), name, budget.Config{})
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() { defer wg.Done(); _ = b.Run(runCtx) }()
		// Account 5, of which 2 reserved: an unreserved pool of 3.
		adms = append(adms, newAdmission(5, func(context.Context) (int64, error) { return 2, nil }, b))
	}
	ctx := context.Background()
	two := int32(2)
	stA, stB := &fnState{}, &fnState{}

	// Reserved 2: one on each gateway, the third is throttled on both.
	t1, err := adms[0].admit(ctx, "r", stA, &two)
	if err != nil {
		t.Fatal(err)
	}
	t2, err := adms[1].admit(ctx, "r", stB, &two)
	if err != nil {
		t.Fatal(err)
	}
	for i, a := range adms {
		_, err := a.admit(ctx, "r", []*fnState{stA, stB}[i], &two)
		if !errs.IsThrottled(err) {
			t.Fatalf("gateway %d: third invocation of a function reserved at 2: %v, want throttled", i, err)
		}
	}
	// a's release hands its slot back at once (b was refused, so a
	// knows the limit is contended); b's client retries and gets it.
	adms[0].release(t1)
	var t3 ticket
	deadline := time.Now().Add(5 * time.Second)
	for {
		if t3, err = adms[1].admit(ctx, "r", stB, &two); err == nil {
			break
		}
		if !errs.IsThrottled(err) || time.Now().After(deadline) {
			t.Fatalf("gateway b after a released its slot: %v", err)
		}
		time.Sleep(20 * time.Millisecond) // a throttled client's back-off
	}
	adms[1].release(t2)
	adms[1].release(t3)

	// Unreserved pool of 3 across both gateways.
	var held []ticket
	var on []int
	for i := range 3 {
		g := i % 2
		tk, err := adms[g].admit(ctx, "u", []*fnState{stA, stB}[g], nil)
		if err != nil {
			t.Fatalf("unreserved admission %d: %v", i, err)
		}
		held = append(held, tk)
		on = append(on, g)
	}
	for i, a := range adms {
		if _, err := a.admit(ctx, "u", []*fnState{stA, stB}[i], nil); !errs.IsThrottled(err) {
			t.Fatalf("gateway %d: fourth unreserved invocation with a pool of 3: %v, want throttled", i, err)
		}
	}
	for i, tk := range held {
		adms[on[i]].release(tk)
	}
	if stA.inflight.Load() != 0 || stB.inflight.Load() != 0 {
		t.Fatalf("in flight after every release: %d and %d", stA.inflight.Load(), stB.inflight.Load())
	}
}
