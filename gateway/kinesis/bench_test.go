package kinesis

import (
	"fmt"
	"testing"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
)

// BenchmarkPutRecords stores batches of 500 100-byte records into one shard.
func BenchmarkPutRecords(b *testing.B) {
	e := newEnv(b)
	e.create(b, "b", 1)
	entries := make([]*skiffv1.PutRecordsEntry, 500)
	for i := range entries {
		entries[i] = &skiffv1.PutRecordsEntry{PartitionKey: fmt.Sprint(i), Data: make([]byte, 100)}
	}
	b.ResetTimer()
	for b.Loop() {
		if _, err := e.s.PutRecords(testCtx(b), &skiffv1.PutRecordsRequest{Stream: "b", Records: entries}); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N*500)/b.Elapsed().Seconds(), "records/s")
}

// BenchmarkRead reads one shard in batches of 100 100-byte records.
func BenchmarkRead(b *testing.B) {
	e := newEnv(b)
	e.create(b, "b", 1)
	entries := make([]*skiffv1.PutRecordsEntry, 500)
	for i := range entries {
		entries[i] = &skiffv1.PutRecordsEntry{PartitionKey: fmt.Sprint(i), Data: make([]byte, 100)}
	}
	for range 100 {
		if _, err := e.s.PutRecords(testCtx(b), &skiffv1.PutRecordsRequest{Stream: "b", Records: entries}); err != nil {
			b.Fatal(err)
		}
	}
	const sh = "shardId-000000000000"
	var after uint64
	n := 0
	b.ResetTimer()
	for b.Loop() {
		recs, _, err := e.s.Read(testCtx(b), "b", sh, after, 100)
		if err != nil {
			b.Fatal(err)
		}
		if len(recs) == 0 {
			after = 0
			continue
		}
		after = recs[len(recs)-1].Seq
		n += len(recs)
	}
	b.ReportMetric(float64(n)/b.Elapsed().Seconds(), "records/s")
}
