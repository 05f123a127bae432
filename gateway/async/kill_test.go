package async

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/destinations"
	"skiff.dev/skiff/gateway/lease"
	"skiff.dev/skiff/gateway/store"
	"skiff.dev/skiff/internal/errs"
)

// deadGateway is what a killed gateway's invocations and deliveries see:
// once killed, nothing it does reaches anyone.
type deadGateway struct{ killed atomic.Bool }

var errKilled = errors.New("the gateway was killed")

// victimInvoker runs the victim's invocations: the first ones throttle
// (their events of a batch are handed on as messages of their own), the
// others block until the kill.
type victimInvoker struct {
	throttle int64
	calls    atomic.Int64
	running  atomic.Int64
	release  chan struct{} // closed by the kill
}

func (v *victimInvoker) InvokeSync(ctx context.Context, function string, payload []byte, rid string) (*skiffv1.InvokeResponse, error) {
	if v.calls.Add(1) <= v.throttle {
		return nil, errs.Throttled(0, "throttled")
	}
	v.running.Add(1)
	select {
	case <-v.release:
	case <-ctx.Done():
	}
	return nil, errKilled
}

// deadDest is the victim's destination writer: it delivers nothing after
// the kill (a dead process writes no record).
type deadDest struct {
	dead *deadGateway
	to   *fakeDest
}

func (d deadDest) Deliver(ctx context.Context, target string, depth int, rec *destinations.Record) error {
	if d.dead.killed.Load() {
		return errKilled
	}
	return d.to.Deliver(ctx, target, depth, rec)
}

// TestGatewayKilledMidProcessing: two gateways (Services and Pools on one
// store, each with its own NATS connection) poll the same queue. The victim
// accepts events (stored as batch messages by group commit), hands some on
// after throttles, and is killed while it holds the rest mid-invocation:
// its connection closes (no ack, nak or publish gets out) and its pool is
// torn down. Every accepted event still gets its OnSuccess record, through
// the survivor once the victim's deliveries come back after the ack wait.
func TestGatewayKilledMidProcessing(t *testing.T) {
	ctx := testCtx(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	st, err := store.Open(ctx, store.Config{DataDir: t.TempDir(), ListenAddr: addr})
	if err != nil {
		t.Fatalf("store.Open: %v", err)
	}
	t.Cleanup(func() { st.Close() })
	nc, err := nats.Connect("nats://" + addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	vjs, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{SharedQueues: 1, AckWait: time.Second, Concurrency: 16, PlatformBase: 20 * time.Millisecond, PlatformMax: 100 * time.Millisecond}
	survivor, _ := newService(t, st.JetStream(), cfg)
	victim, _ := newService(t, vjs, cfg)
	if _, err := survivor.PutEventConfig(ctx, "fn", &skiffv1.EventInvokeConfig{OnSuccess: "queue:ok"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the victim seeing the event config", 10*time.Second, func() bool { return victim.policyFor("fn").onSuccess != "" })

	records := &fakeDest{}
	dead := &deadGateway{}
	vinv := &victimInvoker{throttle: 5, release: make(chan struct{})}
	vpool := victim.NewPool(vinv, deadDest{dead: dead, to: records}, nil, nil)
	vpool.Gained(lease.Lease{Resource: Resource(SharedSubject(0)), Slot: 0, Holder: "victim", Epoch: 1})
	killed := false
	kill := func() {
		if killed {
			return
		}
		killed = true
		dead.killed.Store(true)
		nc.Close() // nothing more reaches the server: no ack, no nak
		close(vinv.release)
		vpool.Close()
	}
	t.Cleanup(kill)

	// The victim accepts the events, concurrently: group commit stores
	// them as batch messages.
	const events = 120
	var wg sync.WaitGroup
	var amu sync.Mutex
	var acked []string
	for w := range 8 {
		wg.Go(func() {
			for i := w; i < events; i += 8 {
				rid := fmt.Sprintf("ev-%04d", i)
				if err := victim.Accept(ctx, "fn", []byte(`{}`), rid); err != nil {
					t.Errorf("accept %s: %v", rid, err)
					continue
				}
				amu.Lock()
				acked = append(acked, rid)
				amu.Unlock()
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	// Killed while it holds events mid-invocation (and after its
	// throttles handed events on).
	waitFor(t, "the victim invoking events", 10*time.Second, func() bool {
		return vinv.running.Load() >= 10 && vinv.calls.Load() > vinv.throttle
	})
	kill()
	t.Logf("victim killed with %d invocations running (%d invokes, the first %d throttled)", vinv.running.Load(), vinv.calls.Load(), vinv.throttle)

	// The survivor starts polling only now: everything the victim held
	// comes back to it after the ack wait.
	startPool(t, survivor, &fakeInvoker{}, records, nil, nil)
	count := func() map[string]int {
		out := map[string]int{}
		for _, r := range records.Records() {
			out[r.rec.RequestContext.RequestID]++
		}
		return out
	}
	waitFor(t, "an OnSuccess record of every accepted event", 30*time.Second, func() bool {
		got := count()
		for _, rid := range acked {
			if got[rid] == 0 {
				return false
			}
		}
		return true
	})
	dups := 0
	for _, n := range count() {
		dups += n - 1
	}
	t.Logf("all %d accepted events have a record (%d duplicates)", len(acked), dups)
}
