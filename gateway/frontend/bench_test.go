package frontend

import (
	"context"
	"sort"
	"testing"
	"time"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
)

// BenchmarkInvoke measures the front end's share of a warm invoke: a
// Connect (or gRPC) client over HTTP/2 cleartext on loopback to a router
// that answers at once. It reports the p50 and p99 per call.
func BenchmarkInvoke(b *testing.B) {
	for _, p := range protocols {
		b.Run(p.name, func(b *testing.B) {
			e := newEnv(b, Config{})
			c := e.clients(e.admin, p.opts...)
			mustCreate(b, c, "echo", nil)
			req := invokeReq("echo", `{"hello":"world"}`)
			ctx := context.Background()
			if _, err := c.inv.Invoke(ctx, req); err != nil {
				b.Fatal(err)
			}
			lat := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for range b.N {
				start := time.Now()
				if _, err := c.inv.Invoke(ctx, req); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(start))
			}
			b.StopTimer()
			reportPercentiles(b, lat)
		})
	}
}

// BenchmarkInvokeInProcess measures the invoke path without the transport:
// validation, lookup, spec cache, admission, metrics and log hand-off.
func BenchmarkInvokeInProcess(b *testing.B) {
	e := newEnv(b, Config{})
	mustCreate(b, e.clients(e.admin, connect.WithGRPC()), "echo", nil)
	m := &skiffv1.InvokeRequest{FunctionName: "echo", Payload: []byte(`{"hello":"world"}`)}
	ctx := context.Background()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := e.f.invoke(ctx, m, ""); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func reportPercentiles(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		return
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
}
