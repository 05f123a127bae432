package kinesis

import (
	"bytes"
	"fmt"
	"math/big"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

func TestHashKeyRouting(t *testing.T) {
	e := newEnv(t)
	e.create(t, "four", 4)
	pow := func(n uint) string { return new(big.Int).Lsh(big.NewInt(1), n).String() }
	max128 := new(big.Int).Sub(new(big.Int).Lsh(big.NewInt(1), 128), big.NewInt(1)).String()
	half := pow(127)
	halfMinus := new(big.Int).Sub(new(big.Int).Lsh(big.NewInt(1), 127), big.NewInt(1)).String()
	for _, tc := range []struct {
		pk, explicit string
		md5hex       string // the partition key's MD5, checked against md5Key
		want         string
	}{
		{pk: "a", md5hex: "0cc175b9c0f1b6a831c399e269772661", want: "shardId-000000000000"},
		{pk: "hello", md5hex: "5d41402abc4b2a76b9719d911017c592", want: "shardId-000000000001"},
		{pk: "abc", md5hex: "900150983cd24fb0d6963f7d28e17f72", want: "shardId-000000000002"},
		{pk: "The quick brown fox jumps over the lazy dog", md5hex: "9e107d9d372bb6826bd81d3542a419d6", want: "shardId-000000000002"},
		{pk: "message digest", md5hex: "f96b697d7cb7938d525a2f31aaf161d0", want: "shardId-000000000003"},
		{pk: "a", explicit: "0", want: "shardId-000000000000"},
		{pk: "a", explicit: halfMinus, want: "shardId-000000000001"},
		{pk: "a", explicit: half, want: "shardId-000000000002"},
		{pk: "a", explicit: max128, want: "shardId-000000000003"},
	} {
		t.Run(tc.pk+"/"+tc.explicit, func(t *testing.T) {
			if tc.md5hex != "" {
				want, _ := new(big.Int).SetString(tc.md5hex, 16)
				if got := md5Key(tc.pk).String(); got != want.String() {
					t.Fatalf("md5Key(%q) = %s, want %s", tc.pk, got, want)
				}
			}
			r, err := e.s.PutRecord(testCtx(t), &skiffv1.PutRecordRequest{Stream: "four", PartitionKey: tc.pk, ExplicitHashKey: tc.explicit, Data: []byte("x")})
			if err != nil {
				t.Fatalf("PutRecord: %v", err)
			}
			if r.GetShardId() != tc.want {
				t.Fatalf("got shard %s, want %s", r.GetShardId(), tc.want)
			}
		})
	}
}

func TestUniformRanges(t *testing.T) {
	e := newEnv(t)
	d := e.create(t, "three", 3)
	got := [][2]string{}
	for _, s := range d.GetShards() {
		got = append(got, [2]string{s.GetStartingHashKey(), s.GetEndingHashKey()})
	}
	// Kinesis's ranges for a 3-shard stream.
	want := [][2]string{
		{"0", "113427455640312821154458202477256070484"},
		{"113427455640312821154458202477256070485", "226854911280625642308916404954512140969"},
		{"226854911280625642308916404954512140970", "340282366920938463463374607431768211455"},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("ranges (-want +got):\n%s", diff)
	}
	if d.GetArn() != "arn:aws:kinesis:local:000000000000:stream/three" || d.GetRetentionPeriodHours() != 24 || d.GetStatus() != "ACTIVE" {
		t.Fatalf("description: got %v", d)
	}
}

func TestPerShardOrder(t *testing.T) {
	e := newEnv(t)
	e.create(t, "ord", 4)
	const keys, perKey = 20, 50
	var wg sync.WaitGroup
	errc := make(chan error, keys)
	for k := range keys {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perKey {
				// Sequential per key: each put returns before the next.
				_, err := e.s.PutRecords(testCtx(t), &skiffv1.PutRecordsRequest{Stream: "ord", Records: []*skiffv1.PutRecordsEntry{
					{PartitionKey: fmt.Sprintf("key-%d", k), Data: []byte(strconv.Itoa(i))},
				}})
				if err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatalf("PutRecords: %v", err)
	}
	seen := map[string][]int{}
	shardOfKey := map[string]string{}
	total := 0
	for id := range e.shards(t, "ord") {
		recs, end := e.readAll(t, e.s, "ord", id, 0)
		if end {
			t.Fatalf("shard %s reports shard end while open", id)
		}
		var last uint64
		for _, r := range recs {
			if r.Seq <= last {
				t.Fatalf("shard %s: sequence %d after %d", id, r.Seq, last)
			}
			last = r.Seq
			if s, ok := shardOfKey[r.PartitionKey]; ok && s != id {
				t.Fatalf("key %s in shards %s and %s", r.PartitionKey, s, id)
			}
			shardOfKey[r.PartitionKey] = id
			n, _ := strconv.Atoi(string(r.Data))
			seen[r.PartitionKey] = append(seen[r.PartitionKey], n)
			if r.ShardID != id || r.SequenceNumber != strconv.FormatUint(r.Seq, 10) || !r.Arrival.Equal(e.clock.Now()) {
				t.Fatalf("record fields: got %+v", r)
			}
		}
		total += len(recs)
	}
	if total != keys*perKey {
		t.Fatalf("read %d records, want %d", total, keys*perKey)
	}
	for k, got := range seen {
		for i, n := range got {
			if n != i {
				t.Fatalf("key %s: record %d is %d, want %d (order broken)", k, i, n, i)
			}
		}
	}
}

func TestIterators(t *testing.T) {
	e := newEnv(t)
	e.create(t, "it", 1)
	const sh = "shardId-000000000000"
	var seqs []string
	for i := range 5 {
		seqs = append(seqs, e.put(t, "it", "k", fmt.Sprintf("r%d", i)).GetSequenceNumber())
		e.clock.Advance(time.Minute)
	}
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	iter := func(typ skiffv1.ShardIteratorType, seq, ts string) string {
		t.Helper()
		it, err := e.s.GetShardIterator(testCtx(t), &skiffv1.GetShardIteratorRequest{Stream: "it", ShardId: sh, Type: typ, StartingSequenceNumber: seq, Timestamp: ts})
		if err != nil {
			t.Fatalf("GetShardIterator(%v, %q, %q): %v", typ, seq, ts, err)
		}
		return it
	}
	data := func(it string, limit int32) ([]string, *skiffv1.GetRecordsResponse) {
		t.Helper()
		r, err := e.s.GetRecords(testCtx(t), &skiffv1.GetRecordsRequest{ShardIterator: it, Limit: limit})
		if err != nil {
			t.Fatalf("GetRecords: %v", err)
		}
		var out []string
		for _, rec := range r.GetRecords() {
			out = append(out, string(rec.GetData()))
		}
		return out, r
	}
	for _, tc := range []struct {
		name    string
		typ     skiffv1.ShardIteratorType
		seq, ts string
		want    []string
	}{
		{"trim horizon", skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_TRIM_HORIZON, "", "", []string{"r0", "r1", "r2", "r3", "r4"}},
		{"latest", skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_LATEST, "", "", nil},
		{"at sequence", skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AT_SEQUENCE_NUMBER, seqs[2], "", []string{"r2", "r3", "r4"}},
		{"after sequence", skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AFTER_SEQUENCE_NUMBER, seqs[2], "", []string{"r3", "r4"}},
		{"at timestamp exact", skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AT_TIMESTAMP, "", t0.Add(time.Minute).Format(time.RFC3339), []string{"r1", "r2", "r3", "r4"}},
		{"at timestamp between", skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AT_TIMESTAMP, "", t0.Add(150 * time.Second).Format(time.RFC3339), []string{"r3", "r4"}},
		{"at timestamp before", skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AT_TIMESTAMP, "", t0.Add(-time.Hour).Format(time.RFC3339), []string{"r0", "r1", "r2", "r3", "r4"}},
		{"at timestamp after", skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AT_TIMESTAMP, "", t0.Add(time.Hour).Format(time.RFC3339), nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, r := data(iter(tc.typ, tc.seq, tc.ts), 0)
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Fatalf("records (-want +got):\n%s", diff)
			}
			if r.GetNextShardIterator() == "" || r.GetMillisBehindLatest() != 0 {
				t.Fatalf("open shard caught up: got next %q, millis behind %d", r.GetNextShardIterator(), r.GetMillisBehindLatest())
			}
		})
	}

	// Paging with next iterators, and millis behind latest while behind.
	it := iter(skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_TRIM_HORIZON, "", "")
	got, r := data(it, 2)
	if diff := cmp.Diff([]string{"r0", "r1"}, got); diff != "" {
		t.Fatalf("first page (-want +got):\n%s", diff)
	}
	// r1 arrived at t0+1m, now is t0+5m.
	if r.GetMillisBehindLatest() != 4*60*1000 {
		t.Fatalf("millis behind latest: got %d, want %d", r.GetMillisBehindLatest(), 4*60*1000)
	}
	if r.GetRecords()[0].GetApproximateArrivalTimestamp() != "2026-01-02T03:04:05.000Z" || r.GetRecords()[0].GetPartitionKey() != "k" {
		t.Fatalf("record 0: got %v", r.GetRecords()[0])
	}
	latest := iter(skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_LATEST, "", "")
	got, r = data(r.GetNextShardIterator(), 0)
	if diff := cmp.Diff([]string{"r2", "r3", "r4"}, got); diff != "" {
		t.Fatalf("second page (-want +got):\n%s", diff)
	}
	e.put(t, "it", "k", "r5")
	if got, _ := data(r.GetNextShardIterator(), 0); !cmp.Equal(got, []string{"r5"}) {
		t.Fatalf("after a new record: got %v, want [r5]", got)
	}
	if got, _ := data(latest, 0); !cmp.Equal(got, []string{"r5"}) {
		t.Fatalf("LATEST after a new record: got %v, want [r5]", got)
	}

	// Iterators expire after 5 minutes.
	e.clock.Advance(IteratorLifetime + time.Second)
	_, err := e.s.GetRecords(testCtx(t), &skiffv1.GetRecordsRequest{ShardIterator: latest})
	wantKind(t, "GetRecords with an expired iterator", err, errs.KindFailedPrecondition)
	_, err = e.s.GetRecords(testCtx(t), &skiffv1.GetRecordsRequest{ShardIterator: "not-a-token"})
	wantInvalid(t, "GetRecords with a malformed iterator", err, "shard_iterator")

	// Go API positions.
	for _, tc := range []struct {
		pos  string
		ts   time.Time
		want uint64
	}{
		{TrimHorizon, time.Time{}, mustSeq(t, seqs[0]) - 1},
		{Latest, time.Time{}, mustSeq(t, seqs[4]) + 1}, // r5
		{AtTimestamp, t0.Add(2 * time.Minute), mustSeq(t, seqs[2]) - 1},
	} {
		got, err := e.s.SeqAt(testCtx(t), "it", sh, tc.pos, tc.ts)
		if err != nil || got != tc.want {
			t.Fatalf("SeqAt(%s, %v): got %d, %v; want %d", tc.pos, tc.ts, got, err, tc.want)
		}
	}
}

func mustSeq(t testing.TB, s string) uint64 {
	t.Helper()
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		t.Fatalf("sequence number %q: %v", s, err)
	}
	return n
}

func TestSplitMergeScaleLineage(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	e.create(t, "rs", 2)
	const s0, s1 = "shardId-000000000000", "shardId-000000000001"
	before := e.put(t, "rs", "a", "before") // md5("a") routes to shard 0
	if before.GetShardId() != s0 {
		t.Fatalf("record before split went to %s, want %s", before.GetShardId(), s0)
	}
	stale := e.store(t) // another gateway, its map cached before the split
	if r := e.putVia(t, stale, "rs", "a", "stale-before"); r.GetShardId() != s0 {
		t.Fatalf("record before split went to %s, want %s", r.GetShardId(), s0)
	}
	quarter := new(big.Int).Lsh(big.NewInt(1), 126).String()
	if err := e.s.SplitShard(ctx, &skiffv1.SplitShardRequest{Stream: "rs", ShardToSplit: s0, NewStartingHashKey: quarter}); err != nil {
		t.Fatalf("SplitShard: %v", err)
	}
	sh := e.shards(t, "rs")
	p := sh[s0]
	if p.GetOpen() || p.GetEndingSequenceNumber() == "" || mustSeq(t, p.GetEndingSequenceNumber()) < mustSeq(t, before.GetSequenceNumber()) {
		t.Fatalf("split parent: got %v, want closed with ending sequence ≥ %s", p, before.GetSequenceNumber())
	}
	c2, c3 := sh["shardId-000000000002"], sh["shardId-000000000003"]
	quarterMinus := new(big.Int).Sub(new(big.Int).Lsh(big.NewInt(1), 126), big.NewInt(1)).String()
	halfMinus := new(big.Int).Sub(new(big.Int).Lsh(big.NewInt(1), 127), big.NewInt(1)).String()
	for _, tc := range []struct {
		got                     *skiffv1.Shard
		parent, adj, start, end string
	}{
		{c2, s0, "", "0", quarterMinus},
		{c3, s0, "", quarter, halfMinus},
	} {
		if tc.got == nil || !tc.got.GetOpen() || tc.got.GetParentShardId() != tc.parent || tc.got.GetAdjacentParentShardId() != tc.adj ||
			tc.got.GetStartingHashKey() != tc.start || tc.got.GetEndingHashKey() != tc.end ||
			mustSeq(t, tc.got.GetStartingSequenceNumber()) <= mustSeq(t, p.GetEndingSequenceNumber()) {
			t.Fatalf("split child: got %v, want open, parent %s, range [%s, %s], starting after %s", tc.got, tc.parent, tc.start, tc.end, p.GetEndingSequenceNumber())
		}
	}
	after := e.putVia(t, stale, "rs", "a", "after")
	if after.GetShardId() != "shardId-000000000002" || mustSeq(t, after.GetSequenceNumber()) <= mustSeq(t, p.GetEndingSequenceNumber()) {
		t.Fatalf("record written after the split through a gateway with the old map: got %v, want the child shardId-000000000002", after)
	}
	// The parent ends: GetRecords at its end has no next iterator and names the children.
	it, err := e.s.GetShardIterator(ctx, &skiffv1.GetShardIteratorRequest{Stream: "rs", ShardId: s0, Type: skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_TRIM_HORIZON})
	if err != nil {
		t.Fatalf("GetShardIterator: %v", err)
	}
	r, err := e.s.GetRecords(ctx, &skiffv1.GetRecordsRequest{ShardIterator: it})
	if err != nil {
		t.Fatalf("GetRecords: %v", err)
	}
	if len(r.GetRecords()) != 2 || string(r.GetRecords()[0].GetData()) != "before" || r.GetNextShardIterator() != "" ||
		!cmp.Equal(r.GetChildShards(), []string{"shardId-000000000002", "shardId-000000000003"}) {
		t.Fatalf("GetRecords at the parent's end: got %v", r)
	}
	recs, end, err := e.s.Read(ctx, "rs", s0, mustSeq(t, r.GetRecords()[1].GetSequenceNumber()), 10)
	if err != nil || len(recs) != 0 || !end {
		t.Fatalf("Read after the parent's last record: got %d records, end %v, %v; want 0, true", len(recs), end, err)
	}

	// Merge the two children back: parent is shard_to_merge, adjacent the other.
	if err := e.s.MergeShards(ctx, &skiffv1.MergeShardsRequest{Stream: "rs", ShardToMerge: "shardId-000000000003", AdjacentShardToMerge: "shardId-000000000002"}); err != nil {
		t.Fatalf("MergeShards: %v", err)
	}
	sh = e.shards(t, "rs")
	m := sh["shardId-000000000004"]
	if m == nil || !m.GetOpen() || m.GetParentShardId() != "shardId-000000000003" || m.GetAdjacentParentShardId() != "shardId-000000000002" ||
		m.GetStartingHashKey() != "0" || m.GetEndingHashKey() != halfMinus || sh["shardId-000000000002"].GetOpen() || sh["shardId-000000000003"].GetOpen() {
		t.Fatalf("merge: got child %v", m)
	}

	// Scale 2 -> 4 -> 3 -> 2 -> 1: uniform ranges each time, lineage through splits and merges.
	for _, target := range []int{4, 3, 2, 1} {
		cur, got, err := e.s.UpdateShardCount(ctx, "rs", target)
		if err != nil {
			t.Fatalf("UpdateShardCount(%d): %v", target, err)
		}
		if got != target {
			t.Fatalf("UpdateShardCount(%d): got %d open shards (from %d)", target, got, cur)
		}
		sh = e.shards(t, "rs")
		var open []*skiffv1.Shard
		for _, s := range sh {
			if s.GetOpen() {
				open = append(open, s)
			}
			if s.GetParentShardId() != "" && sh[s.GetParentShardId()].GetOpen() {
				t.Fatalf("shard %s has an open parent %s", s.GetShardId(), s.GetParentShardId())
			}
		}
		ranges := map[string]string{}
		for _, s := range open {
			ranges[s.GetStartingHashKey()] = s.GetEndingHashKey()
		}
		for i := range target {
			start, end := uniformBound(i, target), maxHashKey
			if i < target-1 {
				end = uniformBound(i+1, target).dec()
			}
			if ranges[start.String()] != end.String() {
				t.Fatalf("after scaling to %d: no open shard [%s, %s]; open: %v", target, start, end, ranges)
			}
		}
	}
	// Every record is still readable from the shard it was stored in.
	recs, _ = e.readAll(t, e.s, "rs", "shardId-000000000002", 0)
	if len(recs) != 1 || string(recs[0].Data) != "after" {
		t.Fatalf("child shard records: got %v", recs)
	}
	_, _, err = e.s.UpdateShardCount(ctx, "rs", 3)
	wantInvalid(t, "UpdateShardCount(3) from 1 (over double)", err, "target_shard_count")
}

func TestWritesRacingReshardsNeverLandInClosedParents(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	e.create(t, "race", 2)
	other := e.store(t) // a second gateway writing with its own cached map
	type acked struct{ shard, seq, data string }
	var mu sync.Mutex
	var got []acked
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var n atomic.Int64
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := e.s
			if w%2 == 1 {
				s = other
			}
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				var entries []*skiffv1.PutRecordsEntry
				for j := range 10 {
					entries = append(entries, &skiffv1.PutRecordsEntry{PartitionKey: fmt.Sprintf("k%d-%d", w, (i*10+j)%37), Data: fmt.Appendf(nil, "%d/%d/%d", w, i, j)})
				}
				r, err := s.PutRecords(ctx, &skiffv1.PutRecordsRequest{Stream: "race", Records: entries})
				if err != nil {
					t.Errorf("PutRecords: %v", err)
					return
				}
				mu.Lock()
				for j, res := range r.GetRecords() {
					if res.GetErrorCode() != "" {
						t.Errorf("record failed: %v", res)
						continue
					}
					got = append(got, acked{res.GetShardId(), res.GetSequenceNumber(), string(entries[j].GetData())})
				}
				mu.Unlock()
				n.Add(10)
			}
		}()
	}
	// Reshard repeatedly while the writers run.
	waitWrites := func(k int64) { eventually(t, "writes progress", func() bool { return n.Load() >= k }) }
	for round, target := range []int{4, 2, 3, 6, 3, 2, 1, 2} {
		waitWrites(int64((round + 1) * 200))
		if _, _, err := e.s.UpdateShardCount(ctx, "race", target); err != nil {
			t.Fatalf("UpdateShardCount(%d): %v", target, err)
		}
	}
	waitWrites(n.Load() + 200)
	close(stop)
	wg.Wait()

	shards := e.shards(t, "race")
	stored := map[string]string{} // seq -> shard
	for id, sh := range shards {
		recs, end := e.readAll(t, e.s, "race", id, 0)
		if end != !sh.GetOpen() {
			t.Fatalf("shard %s: shard end %v, open %v", id, end, sh.GetOpen())
		}
		for _, r := range recs {
			if !sh.GetOpen() && r.Seq > mustSeq(t, sh.GetEndingSequenceNumber()) {
				t.Fatalf("closed shard %s holds record %d after its ending sequence %s", id, r.Seq, sh.GetEndingSequenceNumber())
			}
			if r.Seq < mustSeq(t, sh.GetStartingSequenceNumber()) {
				t.Fatalf("shard %s holds record %d before its starting sequence %s", id, r.Seq, sh.GetStartingSequenceNumber())
			}
			stored[r.SequenceNumber] = id
		}
	}
	if len(stored) != len(got) {
		t.Fatalf("stored %d records, acknowledged %d", len(stored), len(got))
	}
	for _, a := range got {
		if stored[a.seq] != a.shard {
			t.Fatalf("record %s (%s) acknowledged in shard %s, stored in %q", a.seq, a.data, a.shard, stored[a.seq])
		}
	}
	t.Logf("%d records across %d shards while resharding 8 times", len(got), len(shards))
}

func TestRetention(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	if _, err := e.s.CreateStream(ctx, &skiffv1.CreateStreamRequest{Name: "ret", ShardCount: 1, RetentionPeriodHours: 1}); err != nil {
		t.Fatalf("CreateStream: %v", err)
	}
	st, _ := e.s.state(ctx, "ret")
	info, err := e.st.JetStream().Stream(ctx, st.jsName())
	if err != nil || info.CachedInfo().Config.MaxAge != time.Hour {
		t.Fatalf("engine retention: got %v, %v; want MaxAge 1h", info.CachedInfo().Config.MaxAge, err)
	}
	e.put(t, "ret", "k", "old")
	e.clock.Advance(59 * time.Minute)
	e.put(t, "ret", "k", "young")
	const sh = "shardId-000000000000"
	if recs, _ := e.readAll(t, e.s, "ret", sh, 0); len(recs) != 2 {
		t.Fatalf("before expiry: got %d records, want 2", len(recs))
	}
	e.clock.Advance(2 * time.Minute)
	recs, _ := e.readAll(t, e.s, "ret", sh, 0)
	if len(recs) != 1 || string(recs[0].Data) != "young" {
		t.Fatalf("after the first record's retention: got %v, want only young", recs)
	}
	it, err := e.s.GetShardIterator(ctx, &skiffv1.GetShardIteratorRequest{Stream: "ret", ShardId: sh, Type: skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_TRIM_HORIZON})
	if err != nil {
		t.Fatalf("GetShardIterator: %v", err)
	}
	r, err := e.s.GetRecords(ctx, &skiffv1.GetRecordsRequest{ShardIterator: it})
	if err != nil || len(r.GetRecords()) != 1 || string(r.GetRecords()[0].GetData()) != "young" {
		t.Fatalf("GetRecords after expiry: got %v, %v", r, err)
	}
	e.clock.Advance(time.Hour)
	if recs, _ := e.readAll(t, e.s, "ret", sh, 0); len(recs) != 0 {
		t.Fatalf("after every record's retention: got %d records, want 0", len(recs))
	}
}

func TestPerRecordErrors(t *testing.T) {
	e := newEnv(t)
	e.create(t, "pre", 2)
	real := e.s.publish
	e.s.publish = func(m *nats.Msg) (jetstream.PubAckFuture, error) {
		if _, pk, _, _ := decodeEnvelope(m.Data); pk == "fail" {
			return nil, fmt.Errorf("injected engine failure")
		}
		return real(m)
	}
	r, err := e.s.PutRecords(testCtx(t), &skiffv1.PutRecordsRequest{Stream: "pre", Records: []*skiffv1.PutRecordsEntry{
		{PartitionKey: "ok1", Data: []byte("1")}, {PartitionKey: "fail", Data: []byte("2")}, {PartitionKey: "ok2", Data: []byte("3")},
	}})
	if err != nil {
		t.Fatalf("PutRecords: %v", err)
	}
	if r.GetFailedRecordCount() != 1 || len(r.GetRecords()) != 3 {
		t.Fatalf("got %v, want 3 results with 1 failure", r)
	}
	for i, res := range r.GetRecords() {
		failed := res.GetErrorCode() != ""
		if failed != (i == 1) || (failed && (res.GetErrorCode() != "InternalFailure" || res.GetShardId() != "" || !strings.Contains(res.GetErrorMessage(), "injected"))) ||
			(!failed && (res.GetShardId() == "" || res.GetSequenceNumber() == "")) {
			t.Fatalf("result %d: got %v", i, res)
		}
	}
	total := 0
	for id := range e.shards(t, "pre") {
		recs, _ := e.readAll(t, e.s, "pre", id, 0)
		total += len(recs)
	}
	if total != 2 {
		t.Fatalf("stored %d records, want 2", total)
	}
}

func TestBadInputChangesNothing(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	e.create(t, "good", 2)
	const s0 = "shardId-000000000000"
	e.put(t, "good", "k", "x")
	if err := e.s.MergeShards(ctx, &skiffv1.MergeShardsRequest{Stream: "good", ShardToMerge: s0, AdjacentShardToMerge: "shardId-000000000001"}); err != nil {
		t.Fatalf("MergeShards: %v", err)
	}
	// Now shard 2 is open [0, max]; 0 and 1 are closed.
	snapshot := func() string {
		d, err := e.s.DescribeStream(ctx, "good")
		if err != nil {
			t.Fatalf("DescribeStream: %v", err)
		}
		return fmt.Sprint(d.GetShards())
	}
	before := snapshot()
	big := bytes.Repeat([]byte("x"), e.s.MaxData()+1)
	entries := func(n int, mod func(*skiffv1.PutRecordsEntry)) []*skiffv1.PutRecordsEntry {
		out := make([]*skiffv1.PutRecordsEntry, n)
		for i := range out {
			out[i] = &skiffv1.PutRecordsEntry{PartitionKey: "k", Data: []byte("d")}
		}
		if mod != nil {
			mod(out[n-1])
		}
		return out
	}
	for _, tc := range []struct {
		name  string
		call  func() error
		field string
		kind  errs.Kind
	}{
		{"empty name", func() error {
			_, err := e.s.CreateStream(ctx, &skiffv1.CreateStreamRequest{Name: "", ShardCount: 1})
			return err
		}, "name", 0},
		{"long name", func() error {
			_, err := e.s.CreateStream(ctx, &skiffv1.CreateStreamRequest{Name: strings.Repeat("a", 129), ShardCount: 1})
			return err
		}, "name", 0},
		{"bad character", func() error {
			_, err := e.s.CreateStream(ctx, &skiffv1.CreateStreamRequest{Name: "a/b", ShardCount: 1})
			return err
		}, "name", 0},
		{"zero shards", func() error {
			_, err := e.s.CreateStream(ctx, &skiffv1.CreateStreamRequest{Name: "n", ShardCount: 0})
			return err
		}, "shard_count", 0},
		{"65 shards", func() error {
			_, err := e.s.CreateStream(ctx, &skiffv1.CreateStreamRequest{Name: "n", ShardCount: 65})
			return err
		}, "shard_count", 0},
		{"retention", func() error {
			_, err := e.s.CreateStream(ctx, &skiffv1.CreateStreamRequest{Name: "n", ShardCount: 1, RetentionPeriodHours: 8761})
			return err
		}, "retention_period_hours", 0},
		{"exists", func() error {
			_, err := e.s.CreateStream(ctx, &skiffv1.CreateStreamRequest{Name: "good", ShardCount: 1})
			return err
		}, "", errs.KindAlreadyExists},
		{"empty partition key", func() error {
			_, err := e.s.PutRecord(ctx, &skiffv1.PutRecordRequest{Stream: "good", Data: []byte("x")})
			return err
		}, "partition_key", 0},
		{"long partition key", func() error {
			_, err := e.s.PutRecord(ctx, &skiffv1.PutRecordRequest{Stream: "good", PartitionKey: strings.Repeat("p", 257)})
			return err
		}, "partition_key", 0},
		{"oversized data", func() error {
			_, err := e.s.PutRecord(ctx, &skiffv1.PutRecordRequest{Stream: "good", PartitionKey: "k", Data: big})
			return err
		}, "data", 0},
		{"explicit hash key 2^128", func() error {
			_, err := e.s.PutRecord(ctx, &skiffv1.PutRecordRequest{Stream: "good", PartitionKey: "k", ExplicitHashKey: "340282366920938463463374607431768211456"})
			return err
		}, "explicit_hash_key", 0},
		{"explicit hash key negative", func() error {
			_, err := e.s.PutRecord(ctx, &skiffv1.PutRecordRequest{Stream: "good", PartitionKey: "k", ExplicitHashKey: "-1"})
			return err
		}, "explicit_hash_key", 0},
		{"no such stream", func() error {
			_, err := e.s.PutRecord(ctx, &skiffv1.PutRecordRequest{Stream: "nope", PartitionKey: "k"})
			return err
		}, "", errs.KindNotFound},
		{"no records", func() error { _, err := e.s.PutRecords(ctx, &skiffv1.PutRecordsRequest{Stream: "good"}); return err }, "records", 0},
		{"501 records", func() error {
			_, err := e.s.PutRecords(ctx, &skiffv1.PutRecordsRequest{Stream: "good", Records: entries(501, nil)})
			return err
		}, "records", 0},
		{"over 5 MiB", func() error {
			_, err := e.s.PutRecords(ctx, &skiffv1.PutRecordsRequest{Stream: "good", Records: entries(6, func(p *skiffv1.PutRecordsEntry) {})})
			if err != nil {
				return err
			}
			return nil
		}, "", -1},
		{"one bad entry", func() error {
			_, err := e.s.PutRecords(ctx, &skiffv1.PutRecordsRequest{Stream: "good", Records: entries(3, func(p *skiffv1.PutRecordsEntry) { p.PartitionKey = "" })})
			return err
		}, "records[2].partition_key", 0},
		{"split closed", func() error {
			return e.s.SplitShard(ctx, &skiffv1.SplitShardRequest{Stream: "good", ShardToSplit: s0, NewStartingHashKey: "5"})
		}, "shard_to_split", 0},
		{"split unknown", func() error {
			return e.s.SplitShard(ctx, &skiffv1.SplitShardRequest{Stream: "good", ShardToSplit: "shardId-000000000099", NewStartingHashKey: "5"})
		}, "", errs.KindNotFound},
		{"split at start", func() error {
			return e.s.SplitShard(ctx, &skiffv1.SplitShardRequest{Stream: "good", ShardToSplit: "shardId-000000000002", NewStartingHashKey: "0"})
		}, "new_starting_hash_key", 0},
		{"split bad key", func() error {
			return e.s.SplitShard(ctx, &skiffv1.SplitShardRequest{Stream: "good", ShardToSplit: "shardId-000000000002", NewStartingHashKey: "1e5"})
		}, "new_starting_hash_key", 0},
		{"merge closed", func() error {
			return e.s.MergeShards(ctx, &skiffv1.MergeShardsRequest{Stream: "good", ShardToMerge: "shardId-000000000002", AdjacentShardToMerge: s0})
		}, "adjacent_shard_to_merge", 0},
		{"merge self", func() error {
			return e.s.MergeShards(ctx, &skiffv1.MergeShardsRequest{Stream: "good", ShardToMerge: "shardId-000000000002", AdjacentShardToMerge: "shardId-000000000002"})
		}, "adjacent_shard_to_merge", 0},
		{"scale to 0", func() error { _, _, err := e.s.UpdateShardCount(ctx, "good", 0); return err }, "target_shard_count", 0},
		{"scale to 65", func() error { _, _, err := e.s.UpdateShardCount(ctx, "good", 65); return err }, "target_shard_count", 0},
		{"scale over double", func() error { _, _, err := e.s.UpdateShardCount(ctx, "good", 3); return err }, "target_shard_count", 0},
		{"iterator type", func() error {
			_, err := e.s.GetShardIterator(ctx, &skiffv1.GetShardIteratorRequest{Stream: "good", ShardId: s0})
			return err
		}, "type", 0},
		{"iterator sequence of another shard", func() error {
			_, err := e.s.GetShardIterator(ctx, &skiffv1.GetShardIteratorRequest{Stream: "good", ShardId: "shardId-000000000002",
				Type: skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AT_SEQUENCE_NUMBER, StartingSequenceNumber: "2"})
			return err
		}, "starting_sequence_number", 0},
		{"iterator timestamp", func() error {
			_, err := e.s.GetShardIterator(ctx, &skiffv1.GetShardIteratorRequest{Stream: "good", ShardId: s0,
				Type: skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AT_TIMESTAMP, Timestamp: "yesterday"})
			return err
		}, "timestamp", 0},
		{"get records limit", func() error {
			_, err := e.s.GetRecords(ctx, &skiffv1.GetRecordsRequest{ShardIterator: "x", Limit: 10001})
			return err
		}, "limit", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			switch {
			case tc.kind == -1:
				// Not an error case by itself (6 small records); covered below.
			case tc.kind != 0:
				wantKind(t, tc.name, err, tc.kind)
			default:
				wantInvalid(t, tc.name, err, tc.field)
			}
		})
	}
	// 5 MiB in total over several records.
	huge := bytes.Repeat([]byte("y"), e.s.MaxData())
	var many []*skiffv1.PutRecordsEntry
	for range 6 {
		many = append(many, &skiffv1.PutRecordsEntry{PartitionKey: "k", Data: huge})
	}
	_, err := e.s.PutRecords(ctx, &skiffv1.PutRecordsRequest{Stream: "good", Records: many})
	wantInvalid(t, "PutRecords over 5 MiB", err, "records")

	if after := snapshot(); after != before {
		t.Fatalf("shards changed by bad input:\nbefore %s\nafter  %s", before, after)
	}
	names, err := e.s.ListStreams(ctx)
	if err != nil || !cmp.Equal(names, []string{"good"}) {
		t.Fatalf("ListStreams: got %v, %v; want [good]", names, err)
	}
	total := 0
	for id := range e.shards(t, "good") {
		recs, _ := e.readAll(t, e.s, "good", id, 0)
		total += len(recs)
	}
	// The first record, plus the 6 small ones of the "over 5 MiB" row which is valid.
	if total != 7 {
		t.Fatalf("stored %d records, want 7", total)
	}

	// The largest record accepted round-trips.
	r, err := e.s.PutRecord(ctx, &skiffv1.PutRecordRequest{Stream: "good", PartitionKey: strings.Repeat("p", 256), Data: huge})
	if err != nil {
		t.Fatalf("PutRecord of %d bytes: %v", len(huge), err)
	}
	recs, _, err := e.s.Read(ctx, "good", r.GetShardId(), mustSeq(t, r.GetSequenceNumber())-1, 1)
	if err != nil || len(recs) != 1 || !bytes.Equal(recs[0].Data, huge) {
		t.Fatalf("reading the largest record: %d records, %v", len(recs), err)
	}
}

func TestDeleteAndRecreate(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	e.create(t, "del", 1)
	const sh = "shardId-000000000000"
	e.put(t, "del", "k", "old")
	it, err := e.s.GetShardIterator(ctx, &skiffv1.GetShardIteratorRequest{Stream: "del", ShardId: sh, Type: skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_TRIM_HORIZON})
	if err != nil {
		t.Fatalf("GetShardIterator: %v", err)
	}
	other := e.store(t)
	if _, _, err := other.Read(ctx, "del", sh, 0, 10); err != nil { // cache it in the other gateway
		t.Fatalf("Read: %v", err)
	}
	if err := e.s.DeleteStream(ctx, "del"); err != nil {
		t.Fatalf("DeleteStream: %v", err)
	}
	wantKind(t, "DeleteStream again", e.s.DeleteStream(ctx, "del"), errs.KindNotFound)
	wantKind(t, "Exists", e.s.Exists(ctx, "del"), errs.KindNotFound)
	_, _, err = other.Read(ctx, "del", sh, 0, 10)
	wantKind(t, "Read on another gateway", err, errs.KindNotFound)
	_, err = other.PutRecord(ctx, &skiffv1.PutRecordRequest{Stream: "del", PartitionKey: "k", Data: []byte("x")})
	wantKind(t, "PutRecord on another gateway", err, errs.KindNotFound)
	if _, err := e.st.JetStream().Stream(ctx, streamPrefix); err == nil {
		t.Fatalf("a KINESIS_ stream is left")
	}
	e.create(t, "del", 1)
	if err := other.Exists(ctx, "del"); err != nil {
		t.Fatalf("Exists after re-create: %v", err)
	}
	if recs, _ := e.readAll(t, other, "del", sh, 0); len(recs) != 0 {
		t.Fatalf("re-created stream has %d old records", len(recs))
	}
	_, err = e.s.GetRecords(ctx, &skiffv1.GetRecordsRequest{ShardIterator: it})
	wantKind(t, "GetRecords with an iterator of the deleted stream", err, errs.KindNotFound)
	r, err := other.PutRecord(ctx, &skiffv1.PutRecordRequest{Stream: "del", PartitionKey: "k", Data: []byte("new")})
	if err != nil {
		t.Fatalf("PutRecord through a gateway that cached the old stream: %v", err)
	}
	if recs, _ := e.readAll(t, e.s, "del", r.GetShardId(), 0); len(recs) != 1 || string(recs[0].Data) != "new" {
		t.Fatalf("re-created stream: got %v", recs)
	}
}

func TestWatch(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t)
	e.create(t, "w", 1)
	ch, err := e.s.Watch(ctx, "w")
	if err != nil {
		t.Fatalf("Watch: %v", err)
	}
	wait := func(what string) {
		t.Helper()
		select {
		case <-ch:
		case <-time.After(5 * time.Second):
			t.Fatalf("no signal after %s", what)
		}
	}
	e.put(t, "w", "k", "x")
	wait("a put")
	if _, _, err := e.s.UpdateShardCount(ctx, "w", 2); err != nil {
		t.Fatalf("UpdateShardCount: %v", err)
	}
	wait("a reshard")
}
