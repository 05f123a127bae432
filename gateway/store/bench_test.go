package store

import (
	"fmt"
	"strings"
	"testing"
)

func BenchmarkGetFunction(b *testing.B) {
	s := openStore(b, Config{})
	ctx := testCtx(b)
	for i := 0; i < 100; i++ {
		if _, err := s.CreateFunction(ctx, newFn(fmt.Sprintf("fn-%d", i), 128)); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := s.GetFunction(ctx, "fn-42"); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkKeyBySecretHash(b *testing.B) {
	s := openStore(b, Config{})
	ctx := testCtx(b)
	if err := s.PutKey(ctx, Key{ID: "k", SecretHash: hashOf("s"), InvokeFunctions: []string{"a", "b"}}); err != nil {
		b.Fatal(err)
	}
	h := hashOf("s")
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := s.KeyBySecretHash(ctx, h); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkUpdateFunction(b *testing.B) {
	s := openStore(b, Config{})
	ctx := testCtx(b)
	fn, err := s.CreateFunction(ctx, newFn("upd", 128))
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if fn, err = s.UpdateFunction(ctx, fn); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkAppendLog(b *testing.B) {
	for _, sync := range []bool{false, true} {
		b.Run(fmt.Sprintf("sync_always=%v", sync), func(b *testing.B) {
			s := openStore(b, Config{SyncAlways: sync})
			ctx := testCtx(b)
			e := LogEntry{Function: "bench", RequestID: "8f9d3c1e-0000-4000-8000-000000000000",
				Text: "START RequestId: x\n" + strings.Repeat("a log line of a typical length\n", 10) + "END\nREPORT Duration: 1.00 ms\n"}
			b.SetBytes(int64(len(e.Text)))
			b.ReportAllocs()
			for b.Loop() {
				if err := s.AppendLog(ctx, e); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkReadLogsLast reads the last 20 entries of a function with 10,000
// entries interleaved with another function's.
func BenchmarkReadLogsLast(b *testing.B) {
	s := openStore(b, Config{})
	ctx := testCtx(b)
	for i := 0; i < 10_000; i++ {
		for _, fn := range []string{"a", "b"} {
			if err := s.AppendLog(ctx, LogEntry{Function: fn, RequestID: fmt.Sprint(i), Text: "START\nline\nEND\nREPORT\n"}); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.ReportAllocs()
	for b.Loop() {
		n := 0
		if err := s.ReadLogs(ctx, "a", 20, false, func(LogEntry) error { n++; return nil }); err != nil {
			b.Fatal(err)
		}
		if n != 20 {
			b.Fatalf("got %d entries, want 20", n)
		}
	}
}
