package async

import (
	"context"
	"fmt"
	"sort"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"skiff.dev/skiff/gateway/store"
)

// BenchmarkAccept measures the async accept (group commit: concurrent
// accepts stored as one message, each acknowledged after its group is
// stored) against JetStream's own
// synchronous publish on a plain stream, for both durability settings,
// with parallel clients. It reports events/s and the p50/p99 latency.
func BenchmarkAccept(b *testing.B) {
	for _, d := range []Durability{DurabilityAlways, DurabilityInterval} {
		for _, mode := range []string{"accept", "raw-jetstream"} {
			b.Run(fmt.Sprintf("%s/%s", d, mode), func(b *testing.B) {
				ctx := context.Background()
				st, err := store.Open(ctx, store.Config{DataDir: b.TempDir(), SyncAlways: d.SyncAlways()})
				if err != nil {
					b.Fatal(err)
				}
				defer st.Close()
				js := st.JetStream()
				var publish func(i int64) error
				if mode == "accept" {
					s, err := New(ctx, js, Config{})
					if err != nil {
						b.Fatal(err)
					}
					defer s.Close()
					payload := []byte(`{"bench":true}`)
					publish = func(i int64) error { return s.Accept(ctx, "fn", payload, fmt.Sprintf("rid-%d", i)) }
				} else {
					if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "RAW", Subjects: []string{"raw"}, Storage: jetstream.FileStorage}); err != nil {
						b.Fatal(err)
					}
					payload := []byte(`{"bench":true}`)
					publish = func(int64) error { _, err := js.Publish(ctx, "raw", payload); return err }
				}
				var n atomic.Int64
				lat := make(chan []time.Duration, 64)
				b.SetParallelism(8)
				b.ResetTimer()
				start := time.Now()
				b.RunParallel(func(pb *testing.PB) {
					var mine []time.Duration
					for pb.Next() {
						t := time.Now()
						if err := publish(n.Add(1)); err != nil {
							b.Error(err)
							return
						}
						mine = append(mine, time.Since(t))
					}
					lat <- mine
				})
				elapsed := time.Since(start)
				close(lat)
				var all []time.Duration
				for l := range lat {
					all = append(all, l...)
				}
				sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
				if len(all) > 0 {
					b.ReportMetric(float64(len(all))/elapsed.Seconds(), "events/s")
					b.ReportMetric(float64(all[len(all)/2].Microseconds()), "p50-µs")
					b.ReportMetric(float64(all[len(all)*99/100].Microseconds()), "p99-µs")
				}
			})
		}
	}
}
