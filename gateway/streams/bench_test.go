package streams

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/kinesis"
	"skiff.dev/skiff/gateway/lease"
	"skiff.dev/skiff/gateway/store"
)

// nopInvoker answers every invoke with success and counts the calls.
type nopInvoker struct{ calls atomic.Int64 }

func (n *nopInvoker) InvokeSync(context.Context, string, []byte, string) (*skiffv1.InvokeResponse, error) {
	n.calls.Add(1)
	return &skiffv1.InvokeResponse{StatusCode: 200}, nil
}

// BenchmarkPipeline measures the pollers alone (a no-op invoker, real
// JetStream storage, checkpoints and leases): each iteration writes a
// backlog of 20,000 100-byte records to a stream of 1 shard (or 40,000 to
// 8 shards) and times a mapping (batch 100) until it has checkpointed
// every record.
func BenchmarkPipeline(b *testing.B) {
	for _, sync := range []bool{false, true} {
		for _, shards := range []int{1, 8} {
			b.Run(fmt.Sprintf("shards=%d/sync_always=%v", shards, sync), func(b *testing.B) {
				benchPipeline(b, shards, sync)
			})
		}
	}
}

func benchPipeline(b *testing.B, shards int, syncAlways bool) {
	perShard := 20000
	if shards > 1 {
		perShard = 5000
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	st, err := store.Open(ctx, store.Config{DataDir: b.TempDir(), SyncAlways: syncAlways})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = st.Close() })
	data, err := kinesis.New(ctx, st.JetStream(), kinesis.Config{})
	if err != nil {
		b.Fatal(err)
	}
	ls, err := lease.New(ctx, st.JetStream(), lease.Config{Interval: 100 * time.Millisecond})
	if err != nil {
		b.Fatal(err)
	}
	e := &env{st: st, data: data, ls: ls, now: time.Now, dest: &fakeDest{}}
	inv := &nopInvoker{}
	g := e.gateway(b, "bench", inv)
	payload := make([]byte, 100)
	var total time.Duration
	records := 0
	for i := 0; b.Loop(); i++ {
		name := fmt.Sprintf("b%d", i)
		e.createStream(b, name, shards)
		for lo := 0; lo < perShard*shards; lo += 500 {
			req := &skiffv1.PutRecordsRequest{Stream: name}
			for j := range 500 {
				req.Records = append(req.Records, &skiffv1.PutRecordsEntry{PartitionKey: fmt.Sprint(lo + j), Data: payload})
			}
			if _, err := data.PutRecords(ctx, req); err != nil {
				b.Fatal(err)
			}
		}
		before := counterValue(b, g.s.met.records)
		start := time.Now()
		e.putMapping(b, mapping(name, "f"))
		want := before + float64(perShard*shards)
		for counterValue(b, g.s.met.records) < want {
			if ctx.Err() != nil {
				b.Fatalf("%v of %v records processed", counterValue(b, g.s.met.records)-before, perShard*shards)
			}
			time.Sleep(time.Millisecond)
		}
		total += time.Since(start)
		records += perShard * shards
	}
	b.ReportMetric(float64(records)/total.Seconds(), "records/s")
	b.ReportMetric(0, "ns/op")
}
