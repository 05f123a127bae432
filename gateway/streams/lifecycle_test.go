package streams

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
)

func TestReshardingUnderLoad(t *testing.T) {
	const keys = 20
	e := newEnv(t, nil)
	e.createStream(t, "reshard", 2)
	inv := &fakeInvoker{}
	m := mapping("reshard", "fn")
	m.ParallelizationFactor = proto.Int32(2)
	m.BatchSize = proto.Int32(10)
	e.putMapping(t, m)
	e.gateway(t, "gw-1/streams", inv)

	var written atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			for k := range keys {
				e.put(t, "reshard", fmt.Sprintf("key-%d", k), fmt.Sprintf("key-%d/%d", k, i))
				written.Add(1)
			}
		}
	})
	ctx := testCtx(t)
	waitWritten := func(n int64) {
		eventually(t, "producers wrote", func() bool { return written.Load() >= n })
	}
	waitWritten(200)
	if _, _, err := e.data.UpdateShardCount(ctx, "reshard", 4); err != nil {
		t.Fatalf("UpdateShardCount(4): %v", err)
	}
	waitWritten(600)
	shards, err := e.data.Shards(ctx, "reshard")
	if err != nil {
		t.Fatal(err)
	}
	var open []*skiffv1.Shard
	for _, sh := range shards {
		if sh.GetOpen() {
			open = append(open, sh)
		}
	}
	if err := e.data.MergeShards(ctx, &skiffv1.MergeShardsRequest{Stream: "reshard", ShardToMerge: open[0].GetShardId(), AdjacentShardToMerge: open[1].GetShardId()}); err != nil {
		t.Fatalf("MergeShards: %v", err)
	}
	waitWritten(1000)
	close(stop)
	wg.Wait()
	total := int(written.Load())
	eventually(t, "every record processed", func() bool { return distinct(inv.succeeded()) == total })
	checkOrder(t, inv.succeeded(), keys, total/keys)

	// Children start only after their parents' end: the first call with a
	// child's records comes after the last call with each parent's.
	shards, err = e.data.Shards(ctx, "reshard")
	if err != nil {
		t.Fatal(err)
	}
	first, last := map[string]int{}, map[string]int{}
	for _, c := range inv.callList() {
		for _, r := range c.Records {
			if _, ok := first[r.Shard]; !ok {
				first[r.Shard] = c.N
			}
			last[r.Shard] = c.N
		}
	}
	checked := 0
	for _, sh := range shards {
		f, ok := first[sh.GetShardId()]
		if !ok {
			continue
		}
		for _, parent := range []string{sh.GetParentShardId(), sh.GetAdjacentParentShardId()} {
			if l, ok := last[parent]; ok {
				checked++
				if f <= l {
					t.Fatalf("child %s started at call %d, before its parent %s ended at call %d", sh.GetShardId(), f, parent, l)
				}
			}
		}
	}
	if checked < 3 {
		t.Fatalf("checked %d parent/child pairs, want at least 3", checked)
	}
}

func TestPollerDeathTakeover(t *testing.T) {
	e := newEnvExpiry(t, nil, 900*time.Millisecond)
	e.createStream(t, "death", 1)
	for i := range 50 {
		e.put(t, "death", "k", fmt.Sprintf("k/%d", i))
	}
	m := mapping("death", "fn")
	m.BatchSize = proto.Int32(10)
	id := e.putMapping(t, m)

	var n atomic.Int32
	blocked := make(chan struct{})
	release := make(chan struct{})
	invA := &fakeInvoker{respond: func(c call) (*skiffv1.InvokeResponse, error) {
		if n.Add(1) == 3 {
			close(blocked)
			<-release // the process "dies" during its third batch
			return nil, context.Canceled
		}
		return nil, nil
	}}
	a := e.gateway(t, "gw-a/streams", invA)
	<-blocked
	a.s.mu.Lock()
	var old *poller
	for _, p := range a.s.pollers {
		old = p
	}
	a.s.mu.Unlock()
	if old == nil {
		t.Fatal("gateway a runs no poller")
	}
	killed := time.Now()
	close(release)
	a.crash(t)

	invB := &fakeInvoker{}
	b := e.gateway(t, "gw-b/streams", invB)
	eventually(t, "b took over", func() bool { return len(invB.callList()) > 0 })
	takeover := time.Since(killed)
	if takeover > e.ls.Expiry()+2*e.ls.Interval()+time.Second {
		t.Fatalf("takeover took %v, want within the lease expiry %v (+ intervals)", takeover, e.ls.Expiry())
	}
	t.Logf("takeover after a kill: %v", takeover)
	eventually(t, "b processed the rest", func() bool { return len(invB.succeeded()) >= 30 })

	// B started at A's last checkpoint (after two batches): the only
	// duplicates are A's uncheckpointed third batch.
	got := invB.succeeded()
	if got[0].Data != "k/20" {
		t.Fatalf("b started at %s, want k/20", got[0].Data)
	}
	seenA := map[string]bool{}
	for _, c := range invA.callList() {
		for _, r := range c.Records {
			seenA[r.Data] = true
		}
	}
	var dups []string
	for _, r := range got {
		if seenA[r.Data] {
			dups = append(dups, r.Data)
		}
	}
	if len(dups) != 10 || dups[0] != "k/20" || dups[9] != "k/29" {
		t.Fatalf("got duplicates %v, want exactly A's third batch k/20-k/29", dups)
	}
	checkOrder(t, append(invA.succeeded(), got...), 1, 50)
	if v := counterValue(t, b.s.met.takeovers); v != 1 {
		t.Fatalf("got %v takeovers, want 1", v)
	}

	// The stale holder's checkpoint write is rejected.
	_, err := b.s.cps.commit(testCtx(t), old.lane, Checkpoint{Seq: 1 << 40, Epoch: old.lease.Epoch, Holder: old.lease.Holder}, old.fence)
	if !IsStale(err) {
		t.Fatalf("stale holder's checkpoint: got %v, want a stale error", err)
	}
	cps, err := b.s.cps.mapping(testCtx(t), id)
	if err != nil {
		t.Fatal(err)
	}
	for k, cp := range cps {
		if cp.Seq == 1<<40 || cp.Holder != "gw-b/streams" {
			t.Fatalf("checkpoint %s = %+v, want b's", k, cp)
		}
	}
}

func TestStreamDeletedDisablesMapping(t *testing.T) {
	e := newEnv(t, nil)
	e.createStream(t, "gone", 2)
	inv := &fakeInvoker{}
	id := e.putMapping(t, mapping("gone", "fn"))
	g := e.gateway(t, "gw-1/streams", inv)
	eventually(t, "lanes held", func() bool { return len(g.s.Held()) == 2 })
	if err := e.data.DeleteStream(testCtx(t), "gone"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "mapping disabled", func() bool { return !e.getMapping(t, id).GetEnabled() })
	eventually(t, "lanes dropped", func() bool { return len(g.s.Held()) == 0 })
	eventually(t, "resources removed", func() bool {
		rs, err := e.ls.Resources(testCtx(t))
		if err != nil {
			return false
		}
		for r := range rs {
			if strings.HasPrefix(r, ResourcePrefix) {
				return false
			}
		}
		return true
	})
}

func TestDisableAndDeleteMapping(t *testing.T) {
	e := newEnv(t, nil)
	e.createStream(t, "toggle", 1)
	inv := &fakeInvoker{}
	m := mapping("toggle", "fn")
	id := e.putMapping(t, m)
	g := e.gateway(t, "gw-1/streams", inv)
	e.put(t, "toggle", "k", "k/0")
	eventually(t, "processed", func() bool { return len(inv.succeeded()) == 1 })
	m.Enabled = proto.Bool(false)
	e.putMapping(t, m)
	eventually(t, "lanes dropped", func() bool { return len(g.s.Held()) == 0 })
	e.put(t, "toggle", "k", "k/1")
	m.Enabled = proto.Bool(true)
	e.putMapping(t, m)
	eventually(t, "resumed from the checkpoint", func() bool { return len(inv.succeeded()) == 2 })
	checkOrder(t, inv.succeeded(), 1, 2)
	if err := e.esmKV(t).Delete(testCtx(t), id); err != nil {
		t.Fatal(err)
	}
	eventually(t, "checkpoints purged", func() bool {
		cps, err := g.s.cps.mapping(testCtx(t), id)
		return err == nil && len(cps) == 0 && len(g.s.Held()) == 0
	})
}

func TestLatestStartsAtMappingCreation(t *testing.T) {
	e := newEnv(t, nil)
	e.createStream(t, "latest", 1)
	e.put(t, "latest", "k", "old/0")
	inv := &fakeInvoker{}
	m := mapping("latest", "fn")
	m.StartingPosition = "LATEST"
	e.putMapping(t, m)
	g := e.gateway(t, "gw-1/streams", inv)
	eventually(t, "lane held", func() bool { return len(g.s.Held()) == 1 })
	e.put(t, "latest", "k", "new/0")
	eventually(t, "new record processed", func() bool { return len(inv.succeeded()) == 1 })
	if got := inv.succeeded()[0].Data; got != "new/0" {
		t.Fatalf("got %s, want new/0 only", got)
	}
}

func TestTumblingWindow(t *testing.T) {
	clk := &clock{now: time.Date(2026, 3, 4, 5, 6, 0, 0, time.UTC)}
	e := newEnv(t, clk.Now)
	e.createStream(t, "win", 1)
	var mu sync.Mutex
	var events []map[string]any
	inv := &fakeInvoker{respond: func(c call) (*skiffv1.InvokeResponse, error) {
		mu.Lock()
		defer mu.Unlock()
		events = append(events, c.Event)
		count := 0.0
		if st, ok := c.Event["state"].(map[string]any); ok {
			count, _ = st["count"].(float64)
		}
		count += float64(len(c.Records))
		return &skiffv1.InvokeResponse{StatusCode: 200, Payload: fmt.Appendf(nil, `{"state":{"count":%v}}`, count)}, nil
	}}
	m := mapping("win", "fn")
	m.TumblingWindowSeconds = 60
	m.BatchSize = proto.Int32(2)
	e.putMapping(t, m)
	for i := range 5 {
		e.put(t, "win", "k", fmt.Sprintf("k/%d", i))
	}
	e.gateway(t, "gw-1/streams", inv)
	eventually(t, "records processed", func() bool { return len(inv.succeeded()) == 5 })
	clk.Advance(time.Minute)
	eventually(t, "final invoke", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(events) > 0 && events[len(events)-1]["isFinalInvokeForWindow"] == true
	})
	mu.Lock()
	defer mu.Unlock()
	final := events[len(events)-1]
	st, _ := final["state"].(map[string]any)
	if st["count"] != 5.0 {
		t.Fatalf("final invoke state %v, want count 5", final["state"])
	}
	w, _ := final["window"].(map[string]any)
	if w["start"] != "2026-03-04T05:06:00Z" || w["end"] != "2026-03-04T05:07:00Z" || final["shardId"] == "" || final["isWindowTerminatedEarly"] != false {
		t.Fatalf("final event %v: want window 05:06-05:07, a shard id, not terminated early", final)
	}
	if recs, _ := final["Records"].([]any); len(recs) != 0 {
		t.Fatalf("final invoke has %d records, want 0", len(recs))
	}
	if first := events[0]; first["isFinalInvokeForWindow"] != false {
		t.Fatalf("first event %v: want isFinalInvokeForWindow false", first)
	}
}
