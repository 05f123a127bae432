package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

// The tests of stream event source mappings (issue 4) against real
// `skiff dev` processes.
//
// How the tests see what the function saw: the test function's Kinesis
// handler (testdata/functions/testfn/kinesis.go) prints one line per
// record, "SEEN <shard> <sequence number> <partition key> <data>", and the
// test follows the function's logs (LogService.TailLogs). That order is
// the invocation order of every lane: the front end hands an
// invocation's log to its shipper (one goroutine, first in first out)
// before the poller gets the response and starts the lane's next batch.
// The records' data is the record's number within its partition key, and
// every PutRecords call holds at most one record per key and waits for
// the previous call, so per-key order in the stream is the order of those
// numbers.
//
// Not here: MaximumRecordAgeInSeconds (at least 60 s, and `skiff dev`
// has no clock to inject), MaximumRetryAttempts -1, ReportBatchItemFailures
// and tumbling windows: gateway/streams's tests cover them with an
// injected clock and a fake invoker.

// seenRec is one "SEEN" line of the function's logs.
type seenRec struct {
	entry int       // index of the log entry (one per invocation) in the function's log
	at    time.Time // when the invocation ended (the entry's timestamp)
	shard string
	seq   uint64
	key   string
	n     int
}

// logWatch follows a function's log and collects what its Kinesis handler
// saw.
type logWatch struct {
	mu      sync.Mutex
	seen    []seenRec
	fails   []int // batch sizes of the failed invocations
	entries int
	bad     []string
	err     error
	cancel  context.CancelFunc
	done    chan struct{}
}

// watchLogs follows fn's log from its first entry (up to 10,000 entries
// back) until the test ends or stop is called.
func watchLogs(t *testing.T, c clients, fn string) *logWatch {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w := &logWatch{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(w.done)
		st, err := c.logs.TailLogs(ctx, connect.NewRequest(&skiffv1.TailLogsRequest{FunctionName: fn, Lines: 10000, Follow: true}))
		if err != nil {
			w.fail(err)
			return
		}
		defer st.Close()
		for st.Receive() {
			at, _ := time.Parse(time.RFC3339Nano, st.Msg().GetTimestamp())
			w.add(st.Msg().GetText(), at)
		}
		if err := st.Err(); err != nil && ctx.Err() == nil {
			w.fail(err)
		}
	}()
	t.Cleanup(w.stop)
	return w
}

func (w *logWatch) stop() {
	w.cancel()
	<-w.done
}

func (w *logWatch) fail(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.err = err
}

func (w *logWatch) add(text string, at time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	entry := w.entries
	w.entries++
	for _, line := range strings.Split(text, "\n") {
		switch {
		case strings.HasPrefix(line, "SEEN "):
			f := strings.Fields(line)
			if len(f) != 5 {
				w.bad = append(w.bad, line)
				continue
			}
			seq, err1 := strconv.ParseUint(f[2], 10, 64)
			n, err2 := strconv.Atoi(f[4])
			if err1 != nil || err2 != nil {
				w.bad = append(w.bad, line)
				continue
			}
			w.seen = append(w.seen, seenRec{entry: entry, at: at, shard: f[1], seq: seq, key: f[3], n: n})
		case strings.HasPrefix(line, "FAIL "):
			n, err := strconv.Atoi(strings.TrimPrefix(line, "FAIL "))
			if err != nil {
				w.bad = append(w.bad, line)
				continue
			}
			w.fails = append(w.fails, n)
		}
	}
}

// snapshot returns what was seen so far.
func (w *logWatch) snapshot() (seen []seenRec, fails []int, entries int, err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.seen), slices.Clone(w.fails), w.entries, w.err
}

// wait waits until cond holds for the records seen so far and returns
// them; it fails the test after timeout or when the log stream broke.
func (w *logWatch) wait(t *testing.T, timeout time.Duration, what string, cond func(seen []seenRec) bool) []seenRec {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		seen, _, entries, err := w.snapshot()
		if err != nil {
			t.Fatalf("following the function's logs: %v", err)
		}
		if cond(seen) {
			w.mu.Lock()
			bad := slices.Clone(w.bad)
			w.mu.Unlock()
			if len(bad) > 0 {
				t.Errorf("%d malformed log lines, first %q", len(bad), bad[0])
			}
			if entries >= 10000 {
				t.Fatalf("the function logged %d invocations: over what TailLogs returns, the test cannot see them all", entries)
			}
			return seen
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s: %d records seen in %d log entries", timeout, what, len(seen), entries)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// uniqueSeen counts the distinct (key, n) seen.
func uniqueSeen(seen []seenRec) int {
	u := make(map[string]bool, len(seen))
	for _, s := range seen {
		u[s.key+"/"+strconv.Itoa(s.n)] = true
	}
	return len(u)
}

func createStream(t *testing.T, c clients, name string, shards int32) *skiffv1.StreamDescription {
	t.Helper()
	resp, err := c.stream.CreateStream(context.Background(), connect.NewRequest(&skiffv1.CreateStreamRequest{Name: name, ShardCount: shards}))
	if err != nil {
		t.Fatalf("creating stream %s: %v", name, err)
	}
	return resp.Msg.GetStream()
}

func listShards(t *testing.T, c clients, stream string) []*skiffv1.Shard {
	t.Helper()
	resp, err := c.stream.ListShards(context.Background(), connect.NewRequest(&skiffv1.ListShardsRequest{Stream: stream}))
	if err != nil {
		t.Fatalf("listing the shards of %s: %v", stream, err)
	}
	return resp.Msg.GetShards()
}

func createStreamMapping(t *testing.T, c clients, m *skiffv1.EventSourceMapping) *skiffv1.EventSourceMapping {
	t.Helper()
	if m.StartingPosition == "" {
		m.StartingPosition = "TRIM_HORIZON"
	}
	resp, err := c.esm.CreateEventSourceMapping(context.Background(), connect.NewRequest(&skiffv1.CreateEventSourceMappingRequest{Mapping: m}))
	if err != nil {
		t.Fatalf("creating a mapping of stream %s: %v", m.GetStream(), err)
	}
	if resp.Msg.Mapping.GetUuid() == "" || !resp.Msg.Mapping.GetEnabled() {
		t.Fatalf("mapping %+v, want an enabled mapping with a uuid", resp.Msg.Mapping)
	}
	return resp.Msg.Mapping
}

func streamKeys(prefix string, n int) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("%s-%03d", prefix, i)
	}
	return keys
}

// putRound writes record number n of every key in one PutRecords call
// (one record per key), retrying the records the call did not store, and
// returns the sequence number of every key's record.
func putRound(ctx context.Context, c clients, stream string, keys []string, n int) (map[string]string, error) {
	data := []byte(strconv.Itoa(n))
	todo := slices.Clone(keys)
	seqs := make(map[string]string, len(keys))
	for attempt := 0; len(todo) > 0; attempt++ {
		if attempt == 20 {
			return nil, fmt.Errorf("round %d: %d records still not stored after %d attempts", n, len(todo), attempt)
		}
		req := &skiffv1.PutRecordsRequest{Stream: stream}
		for _, k := range todo {
			req.Records = append(req.Records, &skiffv1.PutRecordsEntry{PartitionKey: k, Data: data})
		}
		resp, err := c.stream.PutRecords(ctx, connect.NewRequest(req))
		if err != nil {
			return nil, fmt.Errorf("round %d: %w", n, err)
		}
		var again []string
		for i, r := range resp.Msg.GetRecords() {
			if r.GetErrorCode() != "" {
				again = append(again, todo[i])
				continue
			}
			seqs[todo[i]] = r.GetSequenceNumber()
		}
		todo = again
		if len(todo) > 0 {
			time.Sleep(20 * time.Millisecond) // a per-record throttle (resharding): back off
		}
	}
	return seqs, nil
}

// checkOrder asserts that every key was seen with the numbers 0..rounds-1
// in order, each once, and with increasing sequence numbers.
func checkOrder(t *testing.T, seen []seenRec, keys []string, rounds int) {
	t.Helper()
	byKey := map[string][]seenRec{}
	for _, s := range seen {
		byKey[s.key] = append(byKey[s.key], s)
	}
	bad := 0
	for _, k := range keys {
		got := byKey[k]
		ok := len(got) == rounds
		for i := 0; ok && i < len(got); i++ {
			ok = got[i].n == i && (i == 0 || got[i].seq > got[i-1].seq)
		}
		if !ok {
			bad++
			if bad <= 3 {
				ns := make([]int, len(got))
				for i, s := range got {
					ns[i] = s.n
				}
				t.Errorf("key %s: seen %d records in the order %v, want 0..%d once each, in order", k, len(got), ns, rounds-1)
			}
		}
		delete(byKey, k)
	}
	if bad > 0 {
		t.Errorf("%d of %d keys seen out of order, with gaps or with duplicates", bad, len(keys))
	}
	if len(byKey) > 0 {
		t.Errorf("records of %d unknown keys seen", len(byKey))
	}
}

// putRoundParallel is putRound with the keys split in calls of up to 500
// (PutRecords's limit) that run at once: each call still holds at most one
// record per key, and a key's next record waits for this round.
func putRoundParallel(ctx context.Context, c clients, stream string, keys []string, n int) error {
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	for lo := 0; lo < len(keys); lo += 500 {
		chunk := keys[lo:min(lo+500, len(keys))]
		wg.Go(func() {
			if _, err := putRound(ctx, c, stream, chunk, n); err != nil {
				mu.Lock()
				first = errors.Join(first, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return first
}

// TestStreamOrder: the 10 shards × 10,000 records (100,000, of
// 1,000 partition keys), half written before the mapping is created (a
// backlog, processed in full batches: its rate is the processing rate) and
// half while it runs; the function sees every record once and every key's
// records in order, with ParallelizationFactor 1 and 5. Measured on the
// 2-core test machine (shared, -race): each case writes at 4,000-13,000
// records/s (PutRecords calls of 500 keys, two at once) and the pollers
// process the backlog at 5,000-12,000 records/s (the test function decodes
// and logs every record, and the test follows the log); a case takes
// 15-30 s, the test 40-50 s. When other work keeps the disk busy the
// writes, fsynced one by one (skiff dev's default durability), drop to
// 2,000-3,000 records/s and the test takes up to 2 minutes.
func TestStreamOrder(t *testing.T) {
	const (
		shards  = 10
		nkeys   = 1000
		rounds  = 100 // records per key: 100,000 in all
		backlog = 50  // rounds written before the mapping
	)
	d := startDev(t, "")
	c := d.client("connect", "")
	for _, pf := range []int32{1, 5} {
		t.Run(fmt.Sprintf("parallelization %d", pf), func(t *testing.T) {
			name := fmt.Sprintf("order-pf%d", pf)
			createFunction(t, c, name, nil)
			createStream(t, c, name, shards)
			w := watchLogs(t, c, name)
			keys := streamKeys("k", nkeys)
			began := time.Now()
			for r := range backlog {
				if err := putRoundParallel(context.Background(), c, name, keys, r); err != nil {
					t.Fatal(err)
				}
			}
			wrote := time.Since(began)
			start := time.Now()
			// With 50 lanes (parallelization 5) the records written while the
			// mapping runs would reach each lane a few at a time and make
			// over 10,000 small invocations, more than the test can follow
			// in the log: a 1 s batching window keeps the batches full.
			window := int32(0)
			if pf > 1 {
				window = 1
			}
			createStreamMapping(t, c, &skiffv1.EventSourceMapping{
				FunctionName: name, Stream: name, BatchSize: ptr[int32](100), ParallelizationFactor: ptr(pf),
				MaximumBatchingWindowSeconds: ptr(window),
			})
			for r := backlog; r < rounds; r++ {
				if err := putRoundParallel(context.Background(), c, name, keys, r); err != nil {
					t.Fatal(err)
				}
			}
			produced := time.Since(start)
			seen := w.wait(t, 60*time.Second, "every record", func(seen []seenRec) bool { return len(seen) >= nkeys*rounds })
			took := time.Since(start)
			checkOrder(t, seen, keys, rounds)
			if t.Failed() {
				// Say so when leases were lost: a lane taken back from its
				// checkpoint processes its last batch again.
				t.Logf("lease losses: %v (skiff_lease_losses_total), stream pollers fenced: %v", d.metric(t, "skiff_lease_losses_total"), d.metric(t, "skiff_streams_fenced_total"))
			}
			_, _, entries, _ := w.snapshot()
			shardsSeen := map[string]bool{}
			var backlogDone time.Time // when the last backlog record was processed
			for _, s := range seen {
				shardsSeen[s.shard] = true
				if s.n < backlog && s.at.After(backlogDone) {
					backlogDone = s.at
				}
			}
			if len(shardsSeen) != shards {
				t.Errorf("records seen from %d shards, want %d", len(shardsSeen), shards)
			}
			if n := d.metric(t, "skiff_log_entries_dropped_total"); n > 0 {
				t.Errorf("%v function logs dropped: the test may miss records", n)
			}
			bl := backlogDone.Sub(start)
			t.Logf("parallelization %d: %d records of %d keys in %d shards in %d invocations; backlog of %d written in %v (%.0f records/s) and processed in %v (%.0f records/s, lease and cold starts included); the other %d written in %v while processed, all processed %v after the mapping was created",
				pf, len(seen), nkeys, shards, entries, nkeys*backlog, wrote.Round(time.Millisecond), float64(nkeys*backlog)/wrote.Seconds(), bl.Round(time.Millisecond), float64(nkeys*backlog)/bl.Seconds(),
				nkeys*(rounds-backlog), produced.Round(time.Millisecond), took.Round(time.Millisecond))
		})
	}
}

// kinesisFailure is Lambda's OnFailure record of a stream batch.
type kinesisFailure struct {
	RequestContext struct {
		RequestID              string `json:"requestId"`
		FunctionArn            string `json:"functionArn"`
		Condition              string `json:"condition"`
		ApproximateInvokeCount int    `json:"approximateInvokeCount"`
	} `json:"requestContext"`
	ResponseContext struct {
		StatusCode      int    `json:"statusCode"`
		ExecutedVersion string `json:"executedVersion"`
		FunctionError   string `json:"functionError"`
	} `json:"responseContext"`
	Version          string `json:"version"`
	Timestamp        string `json:"timestamp"`
	KinesisBatchInfo struct {
		ShardID                         string `json:"shardId"`
		StartSequenceNumber             string `json:"startSequenceNumber"`
		EndSequenceNumber               string `json:"endSequenceNumber"`
		ApproximateArrivalOfFirstRecord string `json:"approximateArrivalOfFirstRecord"`
		ApproximateArrivalOfLastRecord  string `json:"approximateArrivalOfLastRecord"`
		BatchSize                       int    `json:"batchSize"`
		StreamArn                       string `json:"streamArn"`
	} `json:"KinesisBatchInfo"`
}

// bisectFailures is the sizes of the failing invokes of a batch of n with
// a poison record at index p, bisected down to the poison record alone,
// which then fails 1+retries times.
func bisectFailures(n, p, retries int) []int {
	var out []int
	lo, hi := 0, n
	for hi-lo > 1 {
		out = append(out, hi-lo)
		half := (hi - lo) / 2
		if p < lo+half {
			hi = lo + half
		} else {
			lo += half
		}
	}
	for range 1 + retries {
		out = append(out, 1)
	}
	return out
}

// TestStreamBisect: a batch of 100 records with one poison record (the
// function fails every batch holding it), BisectBatchOnFunctionError and
// MaximumRetryAttempts 2: the batch is halved down to the poison record,
// which alone is tried three times and then reaches OnFailure as a batch
// of 1; every other record is processed exactly once.
func TestStreamBisect(t *testing.T) {
	const (
		total  = 100
		poison = 37
	)
	d := startDev(t, "")
	c := d.client("connect", "")
	ctx := context.Background()
	createFunction(t, c, "bisector", nil)
	createStream(t, c, "bisect", 1)
	createQueue(t, c, "bisect-failed", nil)
	w := watchLogs(t, c, "bisector")

	// All 100 records first, so the first batch holds them all.
	req := &skiffv1.PutRecordsRequest{Stream: "bisect"}
	for i := range total {
		data := strconv.Itoa(i)
		if i == poison {
			data = "poison"
		}
		req.Records = append(req.Records, &skiffv1.PutRecordsEntry{PartitionKey: fmt.Sprintf("b-%03d", i), Data: []byte(data)})
	}
	resp, err := c.stream.PutRecords(ctx, connect.NewRequest(req))
	if err != nil || resp.Msg.GetFailedRecordCount() != 0 {
		t.Fatalf("putting the records: %v (failed %d)", err, resp.Msg.GetFailedRecordCount())
	}
	// Where the poison record is in the shard's order.
	type put struct {
		seq uint64
		i   int
	}
	var puts []put
	for i, r := range resp.Msg.GetRecords() {
		seq, err := strconv.ParseUint(r.GetSequenceNumber(), 10, 64)
		if err != nil {
			t.Fatalf("record %d: sequence number %q: %v", i, r.GetSequenceNumber(), err)
		}
		puts = append(puts, put{seq, i})
	}
	slices.SortFunc(puts, func(a, b put) int { return int(a.seq) - int(b.seq) })
	at := slices.IndexFunc(puts, func(p put) bool { return p.i == poison })
	poisonSeq := resp.Msg.GetRecords()[poison].GetSequenceNumber()
	bisections0 := max(0, d.metric(t, "skiff_streams_bisections_total"))

	start := time.Now()
	createStreamMapping(t, c, &skiffv1.EventSourceMapping{
		FunctionName: "bisector", Stream: "bisect", BatchSize: ptr[int32](total),
		BisectBatchOnFunctionError: true, MaximumRetryAttempts: ptr[int32](2), OnFailure: "queue:bisect-failed",
	})
	_, recs := drainStreamFailures(t, c, "bisect-failed", 30*time.Second, 1)
	took := time.Since(start)
	seen := w.wait(t, 10*time.Second, "the 99 good records", func(seen []seenRec) bool { return len(seen) >= total-1 })

	f := recs[0]
	bi := f.KinesisBatchInfo
	if bi.BatchSize != 1 || bi.StartSequenceNumber != poisonSeq || bi.EndSequenceNumber != poisonSeq {
		t.Errorf("OnFailure batch: size %d, sequence numbers %s-%s, want the poison record %s alone", bi.BatchSize, bi.StartSequenceNumber, bi.EndSequenceNumber, poisonSeq)
	}
	if f.RequestContext.Condition != "RetryAttemptsExhausted" || f.RequestContext.ApproximateInvokeCount != 3 || f.ResponseContext.FunctionError != "Unhandled" {
		t.Errorf("OnFailure record: condition %q, approximateInvokeCount %d, function error %q, want RetryAttemptsExhausted, 3 (1 + 2 retries), Unhandled",
			f.RequestContext.Condition, f.RequestContext.ApproximateInvokeCount, f.ResponseContext.FunctionError)
	}
	if bi.ShardID != "shardId-000000000000" || !strings.HasSuffix(bi.StreamArn, ":stream/bisect") || !strings.HasSuffix(f.RequestContext.FunctionArn, ":function:bisector") {
		t.Errorf("OnFailure record: shard %q stream %q function %q", bi.ShardID, bi.StreamArn, f.RequestContext.FunctionArn)
	}
	// Every good record exactly once.
	got := map[int]int{}
	for _, s := range seen {
		got[s.n]++
	}
	for i := range total {
		if want := map[bool]int{true: 0, false: 1}[i == poison]; got[i] != want {
			t.Errorf("record %d seen %d times, want %d", i, got[i], want)
		}
	}
	if len(seen) != total-1 {
		t.Errorf("%d records seen, want %d", len(seen), total-1)
	}
	_, fails, _, _ := w.snapshot()
	if want := bisectFailures(total, at, 2); !slices.Equal(fails, want) {
		t.Errorf("failed invokes of batches of %v, want %v (halving down to the poison record at %d, then 3 attempts)", fails, want, at)
	}
	if got, want := d.metric(t, "skiff_streams_bisections_total")-bisections0, float64(len(bisectFailures(total, at, 2))-3); got != want {
		t.Errorf("bisections: got %v, want %v", got, want)
	}
	if n := d.metric(t, `skiff_streams_records_skipped_total{condition="RetryAttemptsExhausted"}`); n != 1 {
		t.Errorf("records skipped: got %v, want 1", n)
	}
	// Nothing else reaches OnFailure.
	if a := queueAttrs(t, c, "bisect-failed"); !queueEmpty(a) {
		t.Errorf("OnFailure queue holds %d more messages, want none", a.ApproximateMessages+a.ApproximateMessagesNotVisible)
	}
	t.Logf("poison record at %d of %d isolated in %d failed invokes %v; OnFailure record after %v", at, total, len(fails), fails, took.Round(time.Millisecond))
}

// drainStreamFailures receives (and deletes) OnFailure records from queue
// until it holds n, failing after timeout.
func drainStreamFailures(t *testing.T, c clients, queue string, timeout time.Duration, n int) ([]string, []kinesisFailure) {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(timeout)
	var bodies []string
	var recs []kinesisFailure
	for len(recs) < n {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %d OnFailure records in %s: got %d", timeout, n, queue, len(recs))
		}
		resp, err := c.queue.ReceiveMessage(ctx, connect.NewRequest(&skiffv1.ReceiveMessageRequest{Queue: queue, MaxMessages: 10, WaitSeconds: ptr[int32](1)}))
		if err != nil {
			t.Fatalf("receiving from %s: %v", queue, err)
		}
		for _, m := range resp.Msg.Messages {
			var r kinesisFailure
			if err := json.Unmarshal([]byte(m.Body), &r); err != nil {
				t.Fatalf("OnFailure record %.200q is not JSON: %v", m.Body, err)
			}
			bodies = append(bodies, m.Body)
			recs = append(recs, r)
			if _, err := c.queue.DeleteMessage(ctx, connect.NewRequest(&skiffv1.DeleteMessageRequest{Queue: queue, ReceiptHandle: m.ReceiptHandle})); err != nil {
				t.Fatal(err)
			}
		}
	}
	return bodies, recs
}

// midHashKey is the hash key splitting a shard's range in halves.
func midHashKey(t *testing.T, sh *skiffv1.Shard) string {
	t.Helper()
	lo, ok1 := new(big.Int).SetString(sh.GetStartingHashKey(), 10)
	hi, ok2 := new(big.Int).SetString(sh.GetEndingHashKey(), 10)
	if !ok1 || !ok2 {
		t.Fatalf("shard %s: hash key range %q-%q", sh.GetShardId(), sh.GetStartingHashKey(), sh.GetEndingHashKey())
	}
	mid := new(big.Int).Add(lo, hi)
	mid.Add(mid, big.NewInt(1))
	return mid.Rsh(mid, 1).String()
}

// TestStreamResharding: a producer writes while one shard is split and
// two others are merged; every record is processed once, every key in
// order across the split and the merge, and no child shard's record is
// processed before its parents' last.
func TestStreamResharding(t *testing.T) {
	const (
		nkeys  = 100
		rounds = 80 // 8,000 records
	)
	d := startDev(t, "")
	c := d.client("connect", "")
	ctx := context.Background()
	createFunction(t, c, "resharder", nil)
	createStream(t, c, "reshard", 4)
	w := watchLogs(t, c, "resharder")
	keys := streamKeys("r", nkeys)
	createStreamMapping(t, c, &skiffv1.EventSourceMapping{
		FunctionName: "resharder", Stream: "reshard", BatchSize: ptr[int32](50), ParallelizationFactor: ptr[int32](2),
	})

	start := time.Now()
	var round atomic.Int64
	prodErr := make(chan error, 1)
	go func() {
		for r := range rounds {
			if _, err := putRound(ctx, c, "reshard", keys, r); err != nil {
				prodErr <- err
				return
			}
			round.Store(int64(r + 1))
			time.Sleep(20 * time.Millisecond) // a steady producer, not a burst
		}
		prodErr <- nil
	}()
	waitRound := func(r int64) {
		waitFor(t, 30*time.Second, fmt.Sprintf("the producer's round %d", r), func() bool { return round.Load() >= r })
	}

	shards := listShards(t, c, "reshard")
	waitRound(20)
	if _, err := c.stream.SplitShard(ctx, connect.NewRequest(&skiffv1.SplitShardRequest{
		Stream: "reshard", ShardToSplit: shards[0].GetShardId(), NewStartingHashKey: midHashKey(t, shards[0]),
	})); err != nil {
		t.Fatalf("splitting %s: %v", shards[0].GetShardId(), err)
	}
	splitAt := round.Load()
	waitRound(45)
	if _, err := c.stream.MergeShards(ctx, connect.NewRequest(&skiffv1.MergeShardsRequest{
		Stream: "reshard", ShardToMerge: shards[2].GetShardId(), AdjacentShardToMerge: shards[3].GetShardId(),
	})); err != nil {
		t.Fatalf("merging %s and %s: %v", shards[2].GetShardId(), shards[3].GetShardId(), err)
	}
	mergeAt := round.Load()
	if err := <-prodErr; err != nil {
		t.Fatalf("producer: %v", err)
	}
	produced := time.Since(start)
	seen := w.wait(t, 45*time.Second, "every record", func(seen []seenRec) bool { return len(seen) >= nkeys*rounds })
	took := time.Since(start)
	checkOrder(t, seen, keys, rounds)

	// Lineage: 4 parents, 2 children of the split, 1 of the merge.
	shards = listShards(t, c, "reshard")
	if len(shards) != 7 {
		t.Fatalf("%d shards after a split and a merge of 4, want 7: %v", len(shards), shards)
	}
	first, last, count := map[string]int{}, map[string]int{}, map[string]int{}
	for _, s := range seen {
		if _, ok := first[s.shard]; !ok {
			first[s.shard] = s.entry
		}
		last[s.shard] = s.entry
		count[s.shard]++
	}
	children := 0
	for _, sh := range shards {
		id := sh.GetShardId()
		if count[id] == 0 {
			t.Errorf("shard %s (parent %q, adjacent parent %q): no record processed, want some (the producer wrote to every shard)", id, sh.GetParentShardId(), sh.GetAdjacentParentShardId())
			continue
		}
		for _, p := range []string{sh.GetParentShardId(), sh.GetAdjacentParentShardId()} {
			if p == "" {
				continue
			}
			children++
			if first[id] <= last[p] {
				t.Errorf("child shard %s: first record processed in log entry %d, before its parent %s's last (entry %d)", id, first[id], p, last[p])
			}
		}
	}
	if children != 4 {
		t.Errorf("%d parent links, want 4 (2 children of the split, 1 child with 2 parents)", children)
	}
	// Keys whose order crossed a boundary.
	crossed := 0
	byKey := map[string]map[string]bool{}
	for _, s := range seen {
		if byKey[s.key] == nil {
			byKey[s.key] = map[string]bool{}
		}
		byKey[s.key][s.shard] = true
	}
	for _, sh := range byKey {
		if len(sh) > 1 {
			crossed++
		}
	}
	if crossed == 0 {
		t.Errorf("no key's records were in two shards: the resharding was not exercised")
	}
	t.Logf("%d records, split at round %d and merge at round %d of %d; written in %v, all processed after %v (%.0f records/s); %d keys in order across a boundary; records per shard %v",
		len(seen), splitAt, mergeAt, rounds, produced.Round(time.Millisecond), took.Round(time.Millisecond), float64(len(seen))/took.Seconds(), crossed, count)
}

// TestStreamPollerDeath kills `skiff dev` with SIGKILL while its pollers
// hold the shard leases and the function is mid-stream, restarts it on
// the same data dir and checks that processing resumes from the
// checkpoints: every record is processed, and records are processed again
// only from each shard's last uncheckpointed batch.
func TestStreamPollerDeath(t *testing.T) {
	const (
		shards = 10
		nkeys  = 100
		rounds = 50 // 5,000 records
		batch  = 25
		killAt = 1500 // records seen before the kill
	)
	dataDir := t.TempDir()
	d := startDev(t, dataDir)
	c := d.client("connect", "")
	// A slow function (100 ms a batch) keeps every lane busy when the
	// kill comes.
	createFunction(t, c, "survivor", &skiffv1.FunctionConfig{Environment: map[string]string{"KINESIS_SLEEP": "100ms"}})
	createStream(t, c, "survive", shards)
	keys := streamKeys("s", nkeys)
	for r := range rounds {
		if _, err := putRound(context.Background(), c, "survive", keys, r); err != nil {
			t.Fatal(err)
		}
	}
	w := watchLogs(t, c, "survivor")
	createStreamMapping(t, c, &skiffv1.EventSourceMapping{FunctionName: "survivor", Stream: "survive", BatchSize: ptr[int32](batch)})
	w.wait(t, 30*time.Second, fmt.Sprintf("%d records before the kill", killAt), func(seen []seenRec) bool { return len(seen) >= killAt })
	if held := d.metric(t, "skiff_streams_pollers"); held != shards {
		t.Errorf("pollers before the kill: %v, want %d (one per shard)", held, shards)
	}
	w.stop()
	d.kill()
	killed := time.Now()
	before, _, _, _ := w.snapshot()

	d2 := startDev(t, dataDir)
	ready := time.Since(killed)
	c2 := d2.client("connect", "")
	w2 := watchLogs(t, c2, "survivor")
	waitFor(t, 20*time.Second, "every lane taken over", func() bool {
		return d2.metric(t, "skiff_streams_lease_takeovers_total") >= shards
	})
	takeover := time.Since(killed)
	// A SIGKILL drops the log entries the killed process had not shipped
	// yet, while their batches may already be checkpointed: those records
	// are processed but never appear in the log. Allow at most one batch
	// per shard to be missing that way, and wait until the count settles.
	total := nkeys * rounds
	seen := w2.wait(t, 40*time.Second, "every record but the killed process's unshipped logs", func(seen []seenRec) bool {
		return uniqueSeen(seen) >= total-shards*batch
	})
	for last, stable := uniqueSeen(seen), time.Now(); uniqueSeen(seen) < total && time.Since(stable) < 3*time.Second; {
		time.Sleep(100 * time.Millisecond)
		seen, _, _, _ = w2.snapshot()
		if n := uniqueSeen(seen); n != last {
			last, stable = n, time.Now()
		}
	}
	done := time.Since(killed)
	// Records missing from the log: at most one batch per shard.
	seenIDs := map[string]bool{}
	for _, s := range seen {
		seenIDs[fmt.Sprintf("%s/%d", s.key, s.n)] = true
	}
	missing := 0
	lost := map[string]bool{}
	for _, k := range keys {
		for n := range rounds {
			if id := fmt.Sprintf("%s/%d", k, n); !seenIDs[id] {
				lost[id] = true
				missing++
			}
		}
	}
	if missing > shards*batch {
		t.Fatalf("%d records never appeared in the log, more than one batch per shard (%d) could lose to the kill", missing, shards*batch)
	}
	if missing > 0 {
		t.Logf("%d records processed by the killed process without their log entries shipped", missing)
	}

	// Every record, at least once; per key the numbers go up, except for
	// one step back where the restarted process repeats the uncheckpointed
	// batch.
	byKey := map[string][]int{}
	count := map[string]int{}
	for _, s := range seen {
		byKey[s.key] = append(byKey[s.key], s.n)
		count[fmt.Sprintf("%s/%d", s.key, s.n)]++
	}
	for _, k := range keys {
		ns := byKey[k]
		back := 0
		next := 0 // the lowest number not yet seen
		skipLost := func() {
			for lost[fmt.Sprintf("%s/%d", k, next)] {
				next++
			}
		}
		for i, n := range ns {
			skipLost()
			if n > next {
				t.Errorf("key %s: %d seen before %d (order %v)", k, n, next, ns)
				break
			}
			if n == next {
				next++
			}
			if i > 0 && n <= ns[i-1] {
				back++
			}
		}
		skipLost()
		if next != rounds {
			t.Errorf("key %s: records up to %d seen, want %d", k, next, rounds)
		}
		if back > 1 {
			t.Errorf("key %s: went back %d times (%v), want at most once (the restart)", k, back, ns)
		}
	}
	dupsPerShard := map[string]int{}
	dups := 0
	counted := map[string]bool{}
	for _, s := range seen {
		id := fmt.Sprintf("%s/%d", s.key, s.n)
		if count[id] > 1 && counted[id] {
			dupsPerShard[s.shard]++
			dups++
		}
		counted[id] = true
	}
	for sh, n := range dupsPerShard {
		if n > batch {
			t.Errorf("shard %s: %d records processed again, want at most one batch (%d)", sh, n, batch)
		}
	}
	// The restarted process has the same holder name (host and data dir):
	// its keeper's first tick reclaims the dead process's leases at once,
	// with new epochs, without waiting for them to expire; then each lane
	// claims its checkpoint. So the takeover is the restart plus one tick.
	if limit := ready + time.Second; takeover > limit {
		t.Errorf("lanes taken over %v after the kill, want within %v (restart %v, then the first keeper tick reclaims them; 1 s slack)", takeover, limit, ready)
	}
	t.Logf("killed after %d records seen; restarted in %v; every lane taken over %v after the kill (%v after the restart); all %d records processed %v after the kill; %d records processed twice %v",
		len(before), ready.Round(time.Millisecond), takeover.Round(time.Millisecond), (takeover - ready).Round(time.Millisecond), nkeys*rounds, done.Round(time.Millisecond), dups, dupsPerShard)
}

// TestStreamBadInput: out-of-range stream and mapping settings and
// oversized records get InvalidArgument naming the field, through the
// real stack and both protocols, and change nothing.
func TestStreamBadInput(t *testing.T) {
	d := startDev(t, "")
	ctx := context.Background()
	for _, proto := range protocols {
		t.Run(proto, func(t *testing.T) {
			c := d.client(proto, "")
			stream, fn := "bad-"+proto, "badfn-"+proto
			createStream(t, c, stream, 1)
			createFunction(t, c, fn, nil)

			t.Run("streams", func(t *testing.T) {
				for _, tc := range []struct {
					name, field, msg string
					call             func() error
				}{
					{"no shards", "shard_count", "shard count", func() error {
						_, err := c.stream.CreateStream(ctx, connect.NewRequest(&skiffv1.CreateStreamRequest{Name: "s0-" + proto, ShardCount: 0}))
						return err
					}},
					{"65 shards", "shard_count", "shard count", func() error {
						_, err := c.stream.CreateStream(ctx, connect.NewRequest(&skiffv1.CreateStreamRequest{Name: "s65-" + proto, ShardCount: 65}))
						return err
					}},
					{"bad name", "name", "stream name", func() error {
						_, err := c.stream.CreateStream(ctx, connect.NewRequest(&skiffv1.CreateStreamRequest{Name: "no/slash", ShardCount: 1}))
						return err
					}},
					{"record over 1 MiB", "data", "data", func() error {
						_, err := c.stream.PutRecord(ctx, connect.NewRequest(&skiffv1.PutRecordRequest{Stream: stream, PartitionKey: "k", Data: make([]byte, 1<<20+1)}))
						return err
					}},
					{"empty partition key", "partition_key", "partition key", func() error {
						_, err := c.stream.PutRecord(ctx, connect.NewRequest(&skiffv1.PutRecordRequest{Stream: stream, Data: []byte("x")}))
						return err
					}},
					{"partition key over 256", "partition_key", "partition key", func() error {
						_, err := c.stream.PutRecord(ctx, connect.NewRequest(&skiffv1.PutRecordRequest{Stream: stream, PartitionKey: strings.Repeat("k", 257), Data: []byte("x")}))
						return err
					}},
					{"explicit hash key over 2^128", "explicit_hash_key", "", func() error {
						_, err := c.stream.PutRecord(ctx, connect.NewRequest(&skiffv1.PutRecordRequest{Stream: stream, PartitionKey: "k", Data: []byte("x"),
							ExplicitHashKey: new(big.Int).Lsh(big.NewInt(1), 128).String()}))
						return err
					}},
					{"oversized record in a batch", "records[1].data", "data", func() error {
						_, err := c.stream.PutRecords(ctx, connect.NewRequest(&skiffv1.PutRecordsRequest{Stream: stream, Records: []*skiffv1.PutRecordsEntry{
							{PartitionKey: "k", Data: []byte("x")}, {PartitionKey: "k", Data: make([]byte, 1<<20+1)}}}))
						return err
					}},
					{"501 records", "records", "records", func() error {
						recs := make([]*skiffv1.PutRecordsEntry, 501)
						for i := range recs {
							recs[i] = &skiffv1.PutRecordsEntry{PartitionKey: "k", Data: []byte("x")}
						}
						_, err := c.stream.PutRecords(ctx, connect.NewRequest(&skiffv1.PutRecordsRequest{Stream: stream, Records: recs}))
						return err
					}},
					{"records over 5 MiB", "records", "bytes", func() error {
						recs := make([]*skiffv1.PutRecordsEntry, 6)
						for i := range recs {
							recs[i] = &skiffv1.PutRecordsEntry{PartitionKey: "k", Data: make([]byte, 1<<20-16)}
						}
						_, err := c.stream.PutRecords(ctx, connect.NewRequest(&skiffv1.PutRecordsRequest{Stream: stream, Records: recs}))
						return err
					}},
				} {
					t.Run(tc.name, func(t *testing.T) {
						wantFieldError(t, tc.call(), tc.field, tc.msg)
					})
				}
				// Nothing was stored or created.
				it, err := c.stream.GetShardIterator(ctx, connect.NewRequest(&skiffv1.GetShardIteratorRequest{
					Stream: stream, ShardId: "shardId-000000000000", Type: skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_TRIM_HORIZON}))
				if err != nil {
					t.Fatal(err)
				}
				recs, err := c.stream.GetRecords(ctx, connect.NewRequest(&skiffv1.GetRecordsRequest{ShardIterator: it.Msg.GetShardIterator()}))
				if err != nil {
					t.Fatal(err)
				}
				if n := len(recs.Msg.GetRecords()); n != 0 {
					t.Errorf("stream %s holds %d records after refused puts, want 0", stream, n)
				}
				list, err := c.stream.ListStreams(ctx, connect.NewRequest(&skiffv1.ListStreamsRequest{}))
				if err != nil {
					t.Fatal(err)
				}
				for _, n := range list.Msg.GetNames() {
					if strings.HasPrefix(n, "s0-") || strings.HasPrefix(n, "s65-") {
						t.Errorf("stream %s exists after a refused create", n)
					}
				}
			})

			t.Run("mappings", func(t *testing.T) {
				base := func() *skiffv1.EventSourceMapping {
					return &skiffv1.EventSourceMapping{FunctionName: fn, Stream: stream, StartingPosition: "TRIM_HORIZON"}
				}
				with := func(f func(m *skiffv1.EventSourceMapping)) *skiffv1.EventSourceMapping {
					m := base()
					f(m)
					return m
				}
				for _, tc := range []struct {
					name, field string
					m           *skiffv1.EventSourceMapping
				}{
					{"parallelization 0", "parallelization_factor", with(func(m *skiffv1.EventSourceMapping) { m.ParallelizationFactor = ptr[int32](0) })},
					{"parallelization 11", "parallelization_factor", with(func(m *skiffv1.EventSourceMapping) { m.ParallelizationFactor = ptr[int32](11) })},
					{"batch size 0", "batch_size", with(func(m *skiffv1.EventSourceMapping) { m.BatchSize = ptr[int32](0) })},
					{"batch size 10001", "batch_size", with(func(m *skiffv1.EventSourceMapping) { m.BatchSize = ptr[int32](10001) })},
					{"batching window 301", "maximum_batching_window_seconds", with(func(m *skiffv1.EventSourceMapping) { m.MaximumBatchingWindowSeconds = ptr[int32](301) })},
					{"retries -2", "maximum_retry_attempts", with(func(m *skiffv1.EventSourceMapping) { m.MaximumRetryAttempts = ptr[int32](-2) })},
					{"retries 10001", "maximum_retry_attempts", with(func(m *skiffv1.EventSourceMapping) { m.MaximumRetryAttempts = ptr[int32](10001) })},
					{"record age 59", "maximum_record_age_seconds", with(func(m *skiffv1.EventSourceMapping) { m.MaximumRecordAgeSeconds = ptr[int32](59) })},
					{"record age 604801", "maximum_record_age_seconds", with(func(m *skiffv1.EventSourceMapping) { m.MaximumRecordAgeSeconds = ptr[int32](604801) })},
					{"tumbling window 901", "tumbling_window_seconds", with(func(m *skiffv1.EventSourceMapping) { m.TumblingWindowSeconds = 901 })},
					{"no starting position", "starting_position", with(func(m *skiffv1.EventSourceMapping) { m.StartingPosition = "" })},
					{"bad starting position", "starting_position", with(func(m *skiffv1.EventSourceMapping) { m.StartingPosition = "EARLIEST" })},
					{"AT_TIMESTAMP without a timestamp", "starting_position_timestamp", with(func(m *skiffv1.EventSourceMapping) { m.StartingPosition = "AT_TIMESTAMP" })},
					{"missing stream", "stream", with(func(m *skiffv1.EventSourceMapping) { m.Stream = "no-such-stream" })},
					{"queue and stream", "stream", with(func(m *skiffv1.EventSourceMapping) { m.Queue = "q" })},
					{"maximum concurrency", "maximum_concurrency", with(func(m *skiffv1.EventSourceMapping) { m.MaximumConcurrency = ptr[int32](5) })},
					{"bad on-failure target", "on_failure", with(func(m *skiffv1.EventSourceMapping) { m.OnFailure = "sqs:nope" })},
					{"missing on-failure queue", "on_failure", with(func(m *skiffv1.EventSourceMapping) { m.OnFailure = "queue:nope" })},
					// Its message says "function response type".
					{"bad response type", "function_response_types", with(func(m *skiffv1.EventSourceMapping) { m.FunctionResponseTypes = []string{"Everything"} })},
				} {
					t.Run(tc.name, func(t *testing.T) {
						_, err := c.esm.CreateEventSourceMapping(ctx, connect.NewRequest(&skiffv1.CreateEventSourceMappingRequest{Mapping: tc.m}))
						msg := tc.field
						if tc.field == "function_response_types" {
							msg = "function response type"
						}
						wantFieldError(t, err, tc.field, msg)
					})
				}
				list, err := c.esm.ListEventSourceMappings(ctx, connect.NewRequest(&skiffv1.ListEventSourceMappingsRequest{FunctionName: fn}))
				if err != nil {
					t.Fatal(err)
				}
				if n := len(list.Msg.GetMappings()); n != 0 {
					t.Errorf("%d mappings of %s after refused creates, want 0", n, fn)
				}
			})
		})
	}
}

// wantFieldError checks for InvalidArgument naming field in its metadata
// and containing msg in its message.
func wantFieldError(t *testing.T, err error, field, msg string) {
	t.Helper()
	var ce *connect.Error
	if !errors.As(err, &ce) {
		t.Fatalf("got error %v, want InvalidArgument", err)
	}
	if ce.Code() != connect.CodeInvalidArgument {
		t.Errorf("got code %v (%v), want InvalidArgument", ce.Code(), err)
	}
	if got := ce.Meta().Get(errs.HeaderField); got != field {
		t.Errorf("error %q names field %q, want %q", ce.Message(), got, field)
	}
	if !strings.Contains(ce.Message(), msg) {
		t.Errorf("error message %q, want it to mention %q", ce.Message(), msg)
	}
}
