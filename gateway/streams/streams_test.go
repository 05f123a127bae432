package streams

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/protobuf/proto"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/kinesis"
	"skiff.dev/skiff/gateway/lease"
	"skiff.dev/skiff/gateway/store"
	"skiff.dev/skiff/internal/errs"
)

// checkOrder asserts that every key's records were seen in order 0..n-1
// with no gap. A replay (at-least-once after a lease moved) restarts at or
// before the last record seen and must itself be in order; it returns how
// many records were seen again.
func checkOrder(t *testing.T, got []seen, keys, perKey int) int {
	t.Helper()
	next, high := map[string]int{}, map[string]int{}
	dups := 0
	for _, r := range got {
		k, i, ok := strings.Cut(r.Data, "/")
		if !ok || k != r.PK {
			t.Fatalf("record %+v: data is not <key>/<i>", r)
		}
		n, _ := strconv.Atoi(i)
		switch {
		case n == next[k]:
		case n < next[k]:
			// A replay from an earlier checkpoint.
		default:
			t.Fatalf("key %s: got record %d, want %d (out of order or a gap)", k, n, next[k])
		}
		if n < high[k] {
			dups++
		}
		next[k] = n + 1
		high[k] = max(high[k], n+1)
	}
	if len(high) != keys {
		t.Fatalf("got %d keys, want %d", len(high), keys)
	}
	for k, n := range high {
		if n != perKey || next[k] != perKey {
			t.Fatalf("key %s: got records up to %d (last %d), want %d", k, n, next[k], perKey)
		}
	}
	return dups
}

func TestOrderPerKey(t *testing.T) {
	const shards, keys, perKey = 4, 40, 50
	for _, p := range []int{1, 5} {
		t.Run(fmt.Sprintf("parallelization=%d", p), func(t *testing.T) {
			e := newEnv(t, nil)
			e.createStream(t, "orders", shards)
			inv := &fakeInvoker{}
			m := mapping("orders", "fn")
			m.ParallelizationFactor = proto.Int32(int32(p))
			m.BatchSize = proto.Int32(25)
			e.putMapping(t, m)
			g := e.gateway(t, "gw-1/streams", inv)
			var wg sync.WaitGroup
			for w := range 4 {
				wg.Go(func() {
					for i := range perKey {
						for k := w; k < keys; k += 4 {
							e.put(t, "orders", fmt.Sprintf("key-%d", k), fmt.Sprintf("key-%d/%d", k, i))
						}
					}
				})
			}
			wg.Wait()
			eventually(t, "every record processed", func() bool { return distinct(inv.succeeded()) == keys*perKey })
			dups := checkOrder(t, inv.succeeded(), keys, perKey)
			if fenced := counterValue(t, g.s.met.fenced); dups > 0 && fenced == 0 {
				t.Fatalf("got %d duplicates without a lost lease", dups)
			}
			if got, want := len(g.s.Held()), shards*p; got != want {
				t.Fatalf("got %d lanes held, want %d", got, want)
			}
		})
	}
}

func TestBisectPoisonRecord(t *testing.T) {
	e := newEnv(t, nil)
	e.createStream(t, "bisect", 1)
	var poisonSeq string
	for i := range 100 {
		seq := e.put(t, "bisect", "k", fmt.Sprintf("k/%d", i))
		if i == 37 {
			poisonSeq = seq
		}
	}
	inv := &fakeInvoker{respond: func(c call) (*skiffv1.InvokeResponse, error) {
		for _, r := range c.Records {
			if r.Data == "k/37" {
				return fnError(), nil
			}
		}
		return nil, nil
	}}
	m := mapping("bisect", "fn")
	m.BisectBatchOnFunctionError = true
	m.MaximumRetryAttempts = proto.Int32(2)
	m.OnFailure = "queue:dlq"
	e.putMapping(t, m)
	g := e.gateway(t, "gw-1/streams", inv)
	eventually(t, "the poison record reaches OnFailure", func() bool { return len(e.dest.records()) == 1 })
	eventually(t, "every other record processed", func() bool { return len(inv.succeeded()) >= 99 })

	rec := e.dest.records()[0]
	info := rec.KinesisBatchInfo
	if info.BatchSize != 1 || info.StartSequenceNumber != poisonSeq || info.EndSequenceNumber != poisonSeq {
		t.Fatalf("got batch info %+v, want the poison record %s alone", info, poisonSeq)
	}
	if rec.RequestContext.Condition != ConditionRetryAttemptsExhausted || rec.RequestContext.ApproximateInvokeCount != 3 {
		t.Fatalf("got request context %+v, want RetryAttemptsExhausted after 3 invokes", rec.RequestContext)
	}
	if rec.ResponseContext.FunctionError != "Unhandled" || rec.KinesisBatchInfo.ShardID == "" || !strings.HasPrefix(rec.KinesisBatchInfo.StreamArn, "arn:aws:kinesis:") {
		t.Fatalf("got record %+v, want functionError Unhandled, a shard id and a stream ARN", rec)
	}
	got := map[string]int{}
	for _, r := range inv.succeeded() {
		got[r.Data]++
	}
	for i := range 100 {
		want := 1
		if i == 37 {
			want = 0
		}
		if n := got[fmt.Sprintf("k/%d", i)]; n != want {
			t.Fatalf("record k/%d processed %d times, want %d", i, n, want)
		}
	}
	if v := counterValue(t, g.s.met.bisections); v < 6 {
		t.Fatalf("got %v bisections, want at least 6 (100 → 1)", v)
	}
	// The poller moves on: a later record is processed.
	e.put(t, "bisect", "k", "k/100")
	eventually(t, "a later record processed", func() bool { return len(inv.succeeded()) == 100 })
}

func TestMaximumRetryAttempts(t *testing.T) {
	for _, tc := range []struct {
		name      string
		retries   int32
		failFirst int // calls that fail before the function recovers
		wantSkip  bool
		wantCalls int
	}{
		{"unlimited retries until success", -1, 7, false, 8},
		{"zero retries skips at once", 0, 100, true, 1},
		{"three retries then skip", 3, 100, true, 4},
		{"recovers within the retries", 3, 2, false, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, nil)
			e.createStream(t, "retry", 1)
			for i := range 5 {
				e.put(t, "retry", "k", fmt.Sprintf("k/%d", i))
			}
			var mu sync.Mutex
			n := 0
			inv := &fakeInvoker{respond: func(c call) (*skiffv1.InvokeResponse, error) {
				mu.Lock()
				defer mu.Unlock()
				if c.Records[len(c.Records)-1].Data == "k/5" {
					return nil, nil
				}
				n++
				if n <= tc.failFirst {
					return fnError(), nil
				}
				return nil, nil
			}}
			m := mapping("retry", "fn")
			m.MaximumRetryAttempts = proto.Int32(tc.retries)
			m.OnFailure = "https://example.com/hook"
			e.putMapping(t, m)
			e.gateway(t, "gw-1/streams", inv)
			if tc.wantSkip {
				eventually(t, "OnFailure", func() bool { return len(e.dest.records()) == 1 })
				r := e.dest.records()[0]
				if r.KinesisBatchInfo.BatchSize != 5 || r.RequestContext.ApproximateInvokeCount != tc.wantCalls {
					t.Fatalf("got %+v, want a batch of 5 after %d invokes", r, tc.wantCalls)
				}
			} else {
				eventually(t, "processed", func() bool { return len(inv.succeeded()) == 5 })
			}
			// One more record: processed after the skip or success.
			e.put(t, "retry", "k", "k/5")
			eventually(t, "next record", func() bool {
				s := inv.succeeded()
				return len(s) > 0 && s[len(s)-1].Data == "k/5"
			})
			if got := len(inv.callList()); got < tc.wantCalls+1 {
				t.Fatalf("got %d calls, want at least %d", got, tc.wantCalls+1)
			}
			if !tc.wantSkip && len(e.dest.records()) != 0 {
				t.Fatalf("got %d OnFailure records, want none", len(e.dest.records()))
			}
		})
	}
}

func TestMaximumRecordAge(t *testing.T) {
	clk := &clock{now: time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)}
	e := newEnv(t, clk.Now)
	e.createStream(t, "aged", 1)
	for i := range 3 {
		e.put(t, "aged", "k", fmt.Sprintf("old/%d", i))
	}
	clk.Advance(2 * time.Minute)
	for i := range 2 {
		e.put(t, "aged", "k", fmt.Sprintf("new/%d", i))
	}
	inv := &fakeInvoker{}
	m := mapping("aged", "fn")
	m.MaximumRecordAgeSeconds = proto.Int32(60)
	m.OnFailure = "queue:dlq"
	e.putMapping(t, m)
	e.gateway(t, "gw-1/streams", inv)
	eventually(t, "fresh records processed", func() bool { return len(inv.succeeded()) == 2 })
	recs := e.dest.records()
	if len(recs) != 1 {
		t.Fatalf("got %d OnFailure records, want 1", len(recs))
	}
	r := recs[0]
	if r.RequestContext.Condition != ConditionRecordAgeExceeded || r.KinesisBatchInfo.BatchSize != 3 || r.RequestContext.ApproximateInvokeCount != 0 {
		t.Fatalf("got %+v, want the 3 old records, RecordAgeExceeded, 0 invokes", r)
	}
	for _, s := range inv.succeeded() {
		if strings.HasPrefix(s.Data, "old/") {
			t.Fatalf("expired record %s was invoked", s.Data)
		}
	}
}

func TestReportBatchItemFailures(t *testing.T) {
	e := newEnv(t, nil)
	e.createStream(t, "items", 1)
	seqs := make([]string, 10)
	for i := range 10 {
		seqs[i] = e.put(t, "items", "k", fmt.Sprintf("k/%d", i))
	}
	var mu sync.Mutex
	first := true
	inv := &fakeInvoker{respond: func(c call) (*skiffv1.InvokeResponse, error) {
		mu.Lock()
		defer mu.Unlock()
		if first {
			first = false
			// Records 5 and 7 failed: the checkpoint moves to 4.
			return &skiffv1.InvokeResponse{StatusCode: 200, Payload: []byte(fmt.Sprintf(`{"batchItemFailures":[{"itemIdentifier":%q},{"itemIdentifier":%q}]}`, seqs[7], seqs[5]))}, nil
		}
		return &skiffv1.InvokeResponse{StatusCode: 200, Payload: []byte(`{"batchItemFailures":[]}`)}, nil
	}}
	m := mapping("items", "fn")
	m.FunctionResponseTypes = []string{"ReportBatchItemFailures"}
	id := e.putMapping(t, m)
	g := e.gateway(t, "gw-1/streams", inv)
	eventually(t, "two calls", func() bool { return len(inv.callList()) >= 2 })
	calls := inv.callList()
	if len(calls[0].Records) != 10 {
		t.Fatalf("first call got %d records, want 10", len(calls[0].Records))
	}
	if got := calls[1].Records; len(got) != 5 || got[0].Data != "k/5" {
		t.Fatalf("second call got %+v, want records 5-9", got)
	}
	eventually(t, "checkpoint at the last record", func() bool {
		cps, err := g.s.cps.mapping(testCtx(t), id)
		if err != nil {
			return false
		}
		for _, cp := range cps {
			return strconv.FormatUint(cp.Seq, 10) == seqs[9]
		}
		return false
	})
}

func TestItemFailureParsing(t *testing.T) {
	recs := []Record{{SequenceNumber: "10"}, {SequenceNumber: "11"}, {SequenceNumber: "12"}}
	for _, tc := range []struct {
		payload string
		idx     int
		ok      bool
	}{
		{``, 3, true},
		{`null`, 3, true},
		{`{}`, 3, true},
		{`{"batchItemFailures":null}`, 3, true},
		{`{"batchItemFailures":[]}`, 3, true},
		{`{"batchItemFailures":[{"itemIdentifier":"12"},{"itemIdentifier":"11"}]}`, 1, true},
		{`{"batchItemFailures":[{"itemIdentifier":""}]}`, 0, false},
		{`{"batchItemFailures":[{"itemIdentifier":null}]}`, 0, false},
		{`{"batchItemFailures":[{"itemId":"11"}]}`, 0, false},
		{`{"batchItemFailures":[{"itemIdentifier":"99"}]}`, 0, false},
		{`"oops"`, 0, false},
		{`[1]`, 0, false},
	} {
		idx, ok := itemFailure([]byte(tc.payload), recs)
		if idx != tc.idx || ok != tc.ok {
			t.Errorf("itemFailure(%s): got (%d, %v), want (%d, %v)", tc.payload, idx, ok, tc.idx, tc.ok)
		}
	}
}

func TestCheckpointFencing(t *testing.T) {
	e := newEnv(t, nil)
	ctx := testCtx(t)
	cps, err := openCheckpoints(ctx, e.st.JetStream())
	if err != nil {
		t.Fatal(err)
	}
	ln := lane{uuid: "u", shard: "shardId-000000000000", n: 0}
	ok := func(context.Context) error { return nil }
	lost := func(context.Context) error { return errs.New(errs.KindFailedPrecondition, "lease lost") }
	if _, err := cps.commit(ctx, ln, Checkpoint{Seq: 10, Epoch: 2}, ok); err != nil {
		t.Fatalf("first write: %v", err)
	}
	for _, tc := range []struct {
		name  string
		cp    Checkpoint
		check fence
		stale bool
		want  uint64
	}{
		{"forward with the same epoch", Checkpoint{Seq: 20, Epoch: 2}, ok, false, 20},
		{"backward with the same epoch", Checkpoint{Seq: 15, Epoch: 2}, ok, true, 20},
		{"a lower epoch", Checkpoint{Seq: 30, Epoch: 1}, ok, true, 20},
		{"a failed lease check", Checkpoint{Seq: 30, Epoch: 2}, lost, true, 20},
		{"a higher epoch claims at the stored position", Checkpoint{Seq: 5, Epoch: 3}, ok, false, 20},
		{"the old epoch is now fenced", Checkpoint{Seq: 40, Epoch: 2}, ok, true, 20},
		{"shard end", Checkpoint{Seq: 25, Epoch: 3, Ended: true}, ok, false, 25},
		{"nothing after shard end", Checkpoint{Seq: 30, Epoch: 3}, ok, true, 25},
	} {
		_, err := cps.commit(ctx, ln, tc.cp, tc.check)
		if got := err != nil; got != tc.stale || (err != nil && !IsStale(err)) {
			t.Fatalf("%s: got error %v, want stale=%v", tc.name, err, tc.stale)
		}
		cur, _, err := cps.get(ctx, ln)
		if err != nil {
			t.Fatal(err)
		}
		if cur.Seq != tc.want {
			t.Fatalf("%s: stored sequence %d, want %d", tc.name, cur.Seq, tc.want)
		}
	}
}

// distinct counts the different records in got.
func distinct(got []seen) int {
	m := map[string]bool{}
	for _, r := range got {
		m[r.Data] = true
	}
	return len(m)
}

func counterValue(t testing.TB, c prometheus.Metric) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// TestCheckpointCommitFromCached: a commit from the checkpoint the
// writer's previous commit returned lands without reading it when nothing
// else wrote since, and otherwise sees the stored one: a higher epoch
// fences it, a move of its own epoch is not undone.
func TestCheckpointCommitFromCached(t *testing.T) {
	e := newEnv(t, nil)
	ctx := testCtx(t)
	cps, err := openCheckpoints(ctx, e.st.JetStream())
	if err != nil {
		t.Fatal(err)
	}
	ln := lane{uuid: "u", shard: "shardId-000000000000", n: 0}
	ok := func(context.Context) error { return nil }
	last, err := cps.commit(ctx, ln, Checkpoint{Seq: 10, Epoch: 2, Holder: "a"}, ok)
	if err != nil {
		t.Fatal(err)
	}
	if last, err = cps.commitFrom(ctx, ln, last, Checkpoint{Seq: 20, Epoch: 2, Holder: "a"}, ok); err != nil || last.Seq != 20 {
		t.Fatalf("from the cached checkpoint: %+v, %v; want sequence 20", last, err)
	}
	// Someone else of the same epoch (the tracker's shard end, say)
	// moves it: the cached revision is stale, the write reads again.
	if _, err := cps.commit(ctx, ln, Checkpoint{Seq: 25, Epoch: 2, Holder: "a"}, ok); err != nil {
		t.Fatal(err)
	}
	got, err := cps.commitFrom(ctx, ln, last, Checkpoint{Seq: 30, Epoch: 2, Holder: "a"}, ok)
	if err != nil || got.Seq != 30 {
		t.Fatalf("from a stale cached checkpoint: %+v, %v; want sequence 30", got, err)
	}
	// A new holder claims with a higher epoch: the old writer's cached
	// checkpoint is stale and its write is fenced.
	if _, err := cps.commit(ctx, ln, Checkpoint{Seq: 30, Epoch: 3, Holder: "b"}, ok); err != nil {
		t.Fatal(err)
	}
	if _, err := cps.commitFrom(ctx, ln, got, Checkpoint{Seq: 40, Epoch: 2, Holder: "a"}, ok); !IsStale(err) {
		t.Fatalf("old epoch from its cached checkpoint: got %v, want a stale error", err)
	}
	cur, _, err := cps.get(ctx, ln)
	if err != nil {
		t.Fatal(err)
	}
	if cur.Seq != 30 || cur.Epoch != 3 || cur.Holder != "b" {
		t.Fatalf("stored %+v, want sequence 30 at epoch 3 of b", cur)
	}
}

// TestNewMappingPolledBeforeNextKeeperTick: the tracker has the lease
// keeper acquire a new mapping's lanes at once instead of at its next
// tick (here 5 s away).
func TestNewMappingPolledBeforeNextKeeperTick(t *testing.T) {
	ctx := testCtx(t)
	st, err := store.Open(ctx, store.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	data, err := kinesis.New(ctx, st.JetStream(), kinesis.Config{})
	if err != nil {
		t.Fatal(err)
	}
	ls, err := lease.New(ctx, st.JetStream(), lease.Config{Expiry: 15 * time.Second, Interval: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{st: st, data: data, ls: ls, now: time.Now, dest: &fakeDest{}}
	inv := &fakeInvoker{}
	g := e.gateway(t, "g", inv)
	// The keeper's first tick, at Run's start, found nothing to acquire.
	e.createStream(t, "s", 2)
	e.put(t, "s", "k", "1")
	start := time.Now()
	e.putMapping(t, mapping("s", "f"))
	deadline := start.Add(2500 * time.Millisecond)
	for len(inv.succeeded()) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no batch within %v of the mapping's creation (held %v): the lanes waited for the keeper's next tick", time.Since(start), g.s.Held())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if held := g.s.Held(); len(held) != 2 {
		t.Errorf("held %v, want the 2 lanes", held)
	}
	t.Logf("first batch %v after the mapping was created", time.Since(start).Round(time.Millisecond))
}
