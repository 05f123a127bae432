package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

// The reliability tests of async invoke, customer queues and event source
// mappings (issue 3), against real `skiff dev` processes.

// asyncRecord is Lambda's invocation record as a destination receives it.
type asyncRecord struct {
	Version        string `json:"version"`
	Timestamp      string `json:"timestamp"`
	RequestContext struct {
		RequestID              string `json:"requestId"`
		FunctionArn            string `json:"functionArn"`
		Condition              string `json:"condition"`
		ApproximateInvokeCount int    `json:"approximateInvokeCount"`
	} `json:"requestContext"`
	RequestPayload  json.RawMessage `json:"requestPayload"`
	ResponseContext struct {
		StatusCode      int    `json:"statusCode"`
		ExecutedVersion string `json:"executedVersion"`
		FunctionError   string `json:"functionError"`
	} `json:"responseContext"`
	ResponsePayload json.RawMessage `json:"responsePayload"`
}

// invokeAsync sends an EVENT invoke; rid, when set, is the client's
// request id (the Skiff-Request-Id header).
func invokeAsync(ctx context.Context, c clients, name, rid string, payload []byte) (*skiffv1.InvokeResponse, error) {
	req := connect.NewRequest(&skiffv1.InvokeRequest{
		FunctionName: name, Payload: payload, InvocationType: skiffv1.InvocationType_INVOCATION_TYPE_EVENT,
	})
	if rid != "" {
		req.Header().Set("Skiff-Request-Id", rid)
	}
	resp, err := c.invoke.Invoke(ctx, req)
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}

func mustInvokeAsync(t *testing.T, c clients, name, rid, payload string) string {
	t.Helper()
	r, err := invokeAsync(context.Background(), c, name, rid, []byte(payload))
	if err != nil {
		t.Fatalf("async invoke of %s with %.80s: %v", name, payload, err)
	}
	if r.StatusCode != 202 || r.RequestId == "" || (rid != "" && r.RequestId != rid) {
		t.Fatalf("async invoke of %s: status %d request id %q, want 202 and %q", name, r.StatusCode, r.RequestId, rid)
	}
	return r.RequestId
}

func createQueue(t *testing.T, c clients, name string, cfg *skiffv1.QueueConfig) {
	t.Helper()
	if _, err := c.queue.CreateQueue(context.Background(), connect.NewRequest(&skiffv1.CreateQueueRequest{Name: name, Config: cfg})); err != nil {
		t.Fatalf("creating queue %s: %v", name, err)
	}
}

func putEventConfig(t *testing.T, c clients, fn string, cfg *skiffv1.EventInvokeConfig) {
	t.Helper()
	if _, err := c.fn.PutFunctionEventInvokeConfig(context.Background(), connect.NewRequest(&skiffv1.PutFunctionEventInvokeConfigRequest{
		FunctionName: fn, Config: cfg,
	})); err != nil {
		t.Fatalf("putting the event invoke config of %s: %v", fn, err)
	}
}

func queueAttrs(t *testing.T, c clients, name string) *skiffv1.GetQueueAttributesResponse {
	t.Helper()
	resp, err := c.queue.GetQueueAttributes(context.Background(), connect.NewRequest(&skiffv1.GetQueueAttributesRequest{Name: name}))
	if err != nil {
		t.Fatalf("attributes of queue %s: %v", name, err)
	}
	return resp.Msg
}

// queueEmpty reports whether a queue holds no message in any state.
func queueEmpty(a *skiffv1.GetQueueAttributesResponse) bool {
	return a.ApproximateMessages == 0 && a.ApproximateMessagesNotVisible == 0 && a.ApproximateMessagesDelayed == 0
}

// recordSink collects the invocation records of a destination queue.
type recordSink struct {
	mu     sync.Mutex
	count  map[string]int // request id → records
	recs   []asyncRecord
	errors []string
}

func (s *recordSink) snapshot() (map[string]int, []asyncRecord) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := make(map[string]int, len(s.count))
	for k, v := range s.count {
		m[k] = v
	}
	return m, append([]asyncRecord(nil), s.recs...)
}

// drainRecords receives (and deletes) the records of queue with workers
// concurrent receivers until done holds for the records so far, or fails
// the test after timeout. It returns the records per request id and all
// records.
func drainRecords(t *testing.T, c clients, queue string, workers int, timeout time.Duration, done func(count map[string]int) bool) (map[string]int, []asyncRecord) {
	t.Helper()
	sink := &recordSink{count: map[string]int{}}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				resp, err := c.queue.ReceiveMessage(ctx, connect.NewRequest(&skiffv1.ReceiveMessageRequest{
					Queue: queue, MaxMessages: 10, WaitSeconds: ptr[int32](1),
				}))
				if err != nil {
					if ctx.Err() == nil {
						sink.mu.Lock()
						sink.errors = append(sink.errors, err.Error())
						sink.mu.Unlock()
						time.Sleep(50 * time.Millisecond) // back off a failing receive
					}
					continue
				}
				var del []*skiffv1.DeleteMessageBatchEntry
				sink.mu.Lock()
				for i, m := range resp.Msg.Messages {
					var r asyncRecord
					if err := json.Unmarshal([]byte(m.Body), &r); err != nil {
						sink.errors = append(sink.errors, fmt.Sprintf("record %.200q is not JSON: %v", m.Body, err))
					}
					sink.count[r.RequestContext.RequestID]++
					sink.recs = append(sink.recs, r)
					del = append(del, &skiffv1.DeleteMessageBatchEntry{Id: fmt.Sprint(i), ReceiptHandle: m.ReceiptHandle})
				}
				sink.mu.Unlock()
				if len(del) > 0 {
					_, _ = c.queue.DeleteMessageBatch(context.WithoutCancel(ctx), connect.NewRequest(&skiffv1.DeleteMessageBatchRequest{Queue: queue, Entries: del}))
				}
			}
		}()
	}
	defer func() { cancel(); wg.Wait() }()
	deadline := time.Now().Add(timeout)
	for {
		count, recs := sink.snapshot()
		if done(count) {
			sink.mu.Lock()
			defer sink.mu.Unlock()
			if len(sink.errors) > 0 {
				t.Errorf("draining %s: %d errors, first: %s", queue, len(sink.errors), sink.errors[0])
			}
			return count, recs
		}
		if time.Now().After(deadline) {
			sink.mu.Lock()
			errs := append([]string(nil), sink.errors...)
			sink.mu.Unlock()
			t.Fatalf("timed out after %v draining queue %s: %d records of %d request ids so far (receive errors: %d %v)", timeout, queue, len(recs), len(count), len(errs), first(errs))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func first(s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[0]
}

func ptr[T any](v T) *T { return &v }

// TestAsyncKillDuringLoad kills `skiff dev` with SIGKILL during an async
// load of 10,000 events (durability always, an echoing function whose
// OnSuccess destination is a queue), restarts it on the same data dir and
// proves through the OnSuccess queue that every event whose accept was
// acknowledged (202) is processed at least once. The events the server
// had not acknowledged when it died are not sent again; the rest of the
// load goes to the restarted server. On the 2-core test machine the whole
// test takes 20-50 s (75 s with the machine otherwise loaded): accepts run
// at 500-5000 events/s and events in flight at the kill come back after
// the async consumer's ack wait (30 s).
func TestAsyncKillDuringLoad(t *testing.T) {
	const (
		total   = 10000
		killAt  = 4000 // acknowledged accepts before the kill
		workers = 32
	)
	dataDir := t.TempDir()
	flags := []string{"--async-durability", "always"}
	d := startDev(t, dataDir, flags...)
	c := d.client("connect", "")
	createFunction(t, c, "echo", nil)
	createQueue(t, c, "echo-ok", nil)
	putEventConfig(t, c, "echo", &skiffv1.EventInvokeConfig{OnSuccess: "queue:echo-ok"})

	rid := func(i int) string { return fmt.Sprintf("ev-%05d", i) }
	todo := make(chan int, total)
	for i := range total {
		todo <- i
	}
	close(todo)
	var (
		mu       sync.Mutex
		acked    = map[string]bool{}
		inFlight []string // sent when the server died: unacknowledged
		failures []string // errors before the kill
		nAcked   atomic.Int64
		killed   atomic.Bool
	)
	// load sends the events left in todo to cl until they run out or the
	// server is killed.
	load := func(cl clients) {
		var wg sync.WaitGroup
		for range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for !killed.Load() {
					i, ok := <-todo
					if !ok {
						return
					}
					ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
					r, err := invokeAsync(ctx, cl, "echo", rid(i), fmt.Appendf(nil, `{"i":%d}`, i))
					cancel()
					mu.Lock()
					switch {
					case err == nil && r.StatusCode == 202 && r.RequestId == rid(i):
						acked[rid(i)] = true
						nAcked.Add(1)
					case killed.Load():
						inFlight = append(inFlight, rid(i))
					case err != nil:
						failures = append(failures, err.Error())
					default:
						failures = append(failures, fmt.Sprintf("accept of %s: status %d id %q", rid(i), r.StatusCode, r.RequestId))
					}
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
	}

	start := time.Now()
	var killedAfter time.Duration
	killerDone := make(chan struct{})
	go func() {
		defer close(killerDone)
		for nAcked.Load() < killAt && time.Since(start) < 60*time.Second {
			time.Sleep(time.Millisecond)
		}
		killed.Store(true)
		killedAfter = time.Since(start)
		d.kill()
	}()
	load(c)
	<-killerDone
	mu.Lock()
	phase1 := len(acked)
	mu.Unlock()
	if phase1 < killAt {
		t.Fatalf("only %d accepts acknowledged in %v before the kill, want %d", phase1, killedAfter, killAt)
	}
	t.Logf("phase 1: %d accepts acknowledged in %v (%.0f events/s, durability always), %d in flight at the kill",
		phase1, killedAfter.Round(time.Millisecond), float64(phase1)/killedAfter.Seconds(), len(inFlight))

	restart := time.Now()
	d2 := startDev(t, dataDir, flags...)
	c2 := d2.client("connect", "")
	t.Logf("restarted in %v", time.Since(restart).Round(time.Millisecond))
	killed.Store(false)
	start2 := time.Now()
	load(c2)
	mu.Lock()
	phase2 := len(acked) - phase1
	if len(failures) > 0 {
		t.Errorf("%d accepts failed while the server was up, first: %s", len(failures), failures[0])
	}
	want := make(map[string]bool, len(acked))
	for id := range acked {
		want[id] = true
	}
	mu.Unlock()
	t.Logf("phase 2: %d accepts acknowledged by the restarted server in %v", phase2, time.Since(start2).Round(time.Millisecond))

	drainStart := time.Now()
	count, recs := drainRecords(t, c2, "echo-ok", 4, 75*time.Second, func(count map[string]int) bool {
		for id := range want {
			if count[id] == 0 {
				return false
			}
		}
		return true
	})
	dups, unacked := 0, 0
	for id, n := range count {
		dups += n - 1
		if !want[id] {
			unacked++
		}
	}
	for _, r := range recs {
		if r.RequestContext.Condition != "Success" || r.ResponseContext.FunctionError != "" {
			t.Errorf("record of %s: condition %q function error %q, want Success", r.RequestContext.RequestID, r.RequestContext.Condition, r.ResponseContext.FunctionError)
			break
		}
		var in, out struct{ I *int }
		if json.Unmarshal(r.RequestPayload, &in) != nil || json.Unmarshal(r.ResponsePayload, &out) != nil || in.I == nil || out.I == nil ||
			*in.I != *out.I || rid(*in.I) != r.RequestContext.RequestID {
			t.Errorf("record of %s: request payload %s response payload %s, want the echo of its event", r.RequestContext.RequestID, r.RequestPayload, r.ResponsePayload)
			break
		}
	}
	t.Logf("all %d acknowledged events processed (drained in %v, %v since the start): %d records, %d duplicates, %d records of events sent but not acknowledged",
		len(want), time.Since(drainStart).Round(time.Millisecond), time.Since(start).Round(time.Millisecond), len(recs), dups, unacked)
}

// TestAsyncRetries: a function that fails twice then succeeds is invoked
// exactly 3 times with MaximumRetryAttempts 2; with 0 a failing event goes
// to OnFailure after one attempt.
func TestAsyncRetries(t *testing.T) {
	d := startDev(t, "", "--async-retry-delay", "1s")
	c := d.client("connect", "")
	attempts := func(outcome string) float64 {
		return max(0, d.metric(t, `skiff_async_attempts_total{outcome="`+outcome+`"}`))
	}

	t.Run("fails twice then succeeds", func(t *testing.T) {
		createFunction(t, c, "flaky", nil)
		createQueue(t, c, "flaky-ok", nil)
		createQueue(t, c, "flaky-failed", nil)
		putEventConfig(t, c, "flaky", &skiffv1.EventInvokeConfig{
			MaximumRetryAttempts: ptr[int32](2), OnSuccess: "queue:flaky-ok", OnFailure: "queue:flaky-failed",
		})
		retried0, success0, failed0 := attempts("retried"), attempts("success"), attempts("failed")
		start := time.Now()
		rid := mustInvokeAsync(t, c, "flaky", "flaky-1", `{"action":"failtimes","times":2}`)
		_, recs := drainRecords(t, c, "flaky-ok", 1, 30*time.Second, func(count map[string]int) bool { return count[rid] > 0 })
		took := time.Since(start)
		if len(recs) != 1 {
			t.Fatalf("got %d success records, want 1: %+v", len(recs), recs)
		}
		r := recs[0]
		if r.RequestContext.RequestID != rid || r.RequestContext.Condition != "Success" || r.RequestContext.ApproximateInvokeCount != 3 {
			t.Errorf("success record: request id %q condition %q approximateInvokeCount %d, want %q Success 3",
				r.RequestContext.RequestID, r.RequestContext.Condition, r.RequestContext.ApproximateInvokeCount, rid)
		}
		if string(r.ResponsePayload) != `{"attempts":3}` {
			t.Errorf("response payload %s, want {\"attempts\":3} (the function counted its invocations)", r.ResponsePayload)
		}
		// The outcome is counted before the record is sent.
		if got := attempts("retried") - retried0; got != 2 {
			t.Errorf("retried attempts: got %v, want 2", got)
		}
		if got := attempts("success") - success0; got != 1 {
			t.Errorf("successful attempts: got %v, want 1", got)
		}
		if got := attempts("failed") - failed0; got != 0 {
			t.Errorf("failed events: got %v, want 0", got)
		}
		// Backoff 1 s then 2 s.
		if took < 3*time.Second {
			t.Errorf("success after %v, want at least the 1 s + 2 s of backoff", took)
		}
		if a := queueAttrs(t, c, "flaky-failed"); !queueEmpty(a) {
			t.Errorf("OnFailure queue holds %d/%d messages, want none", a.ApproximateMessages, a.ApproximateMessagesNotVisible)
		}
		t.Logf("3 attempts and the success record in %v", took.Round(time.Millisecond))
	})

	t.Run("no retries", func(t *testing.T) {
		createFunction(t, c, "once", nil)
		createQueue(t, c, "once-ok", nil)
		createQueue(t, c, "once-failed", nil)
		putEventConfig(t, c, "once", &skiffv1.EventInvokeConfig{
			MaximumRetryAttempts: ptr[int32](0), OnSuccess: "queue:once-ok", OnFailure: "queue:once-failed",
		})
		retried0, failed0 := attempts("retried"), attempts("failed")
		rid := mustInvokeAsync(t, c, "once", "", `{"action":"error","message":"nope"}`)
		_, recs := drainRecords(t, c, "once-failed", 1, 20*time.Second, func(count map[string]int) bool { return count[rid] > 0 })
		if len(recs) != 1 {
			t.Fatalf("got %d failure records, want 1: %+v", len(recs), recs)
		}
		r := recs[0]
		if r.RequestContext.RequestID != rid || r.RequestContext.Condition != "RetriesExhausted" || r.RequestContext.ApproximateInvokeCount != 1 {
			t.Errorf("failure record: request id %q condition %q approximateInvokeCount %d, want %q RetriesExhausted 1",
				r.RequestContext.RequestID, r.RequestContext.Condition, r.RequestContext.ApproximateInvokeCount, rid)
		}
		if r.ResponseContext.FunctionError != "Unhandled" || !strings.Contains(string(r.ResponsePayload), "nope") || string(r.RequestPayload) != `{"action":"error","message":"nope"}` {
			t.Errorf("failure record: function error %q response %s request %s", r.ResponseContext.FunctionError, r.ResponsePayload, r.RequestPayload)
		}
		if got := attempts("retried") - retried0; got != 0 {
			t.Errorf("retried attempts: got %v, want 0", got)
		}
		if got := attempts("failed") - failed0; got != 1 {
			t.Errorf("failed events: got %v, want 1", got)
		}
		if a := queueAttrs(t, c, "once-ok"); !queueEmpty(a) {
			t.Errorf("OnSuccess queue holds %d/%d messages, want none", a.ApproximateMessages, a.ApproximateMessagesNotVisible)
		}
	})
}

// TestAsyncEventAgeExceeded: an event of a function that can never run
// (reserved concurrency 0: every attempt is throttled, which uses no
// attempt) waits until it is older than MaximumEventAgeSeconds (60 s, the
// smallest allowed) and then goes to OnFailure with the condition
// EventAgeExceeded, never invoked. It runs in parallel with the other
// parallel tests: it mostly waits.
func TestAsyncEventAgeExceeded(t *testing.T) {
	t.Parallel()
	const maxAge = 60
	d := startDev(t, "")
	c := d.client("connect", "")
	createFunction(t, c, "never", nil)
	if _, err := c.fn.PutFunctionConcurrency(context.Background(), connect.NewRequest(&skiffv1.PutFunctionConcurrencyRequest{Name: "never", ReservedConcurrentExecutions: 0})); err != nil {
		t.Fatal(err)
	}
	createQueue(t, c, "never-ok", nil)
	createQueue(t, c, "never-failed", nil)
	putEventConfig(t, c, "never", &skiffv1.EventInvokeConfig{MaximumEventAgeSeconds: ptr[int32](maxAge), OnSuccess: "queue:never-ok", OnFailure: "queue:never-failed"})

	start := time.Now()
	rid := mustInvokeAsync(t, c, "never", "too-old-1", `{"marker":"old"}`)
	_, recs := drainRecords(t, c, "never-failed", 1, (maxAge+45)*time.Second, func(count map[string]int) bool { return count[rid] > 0 })
	waited := time.Since(start)
	if len(recs) != 1 {
		t.Fatalf("%d failure records, want 1: %+v", len(recs), recs)
	}
	r := recs[0]
	if r.RequestContext.RequestID != rid || r.RequestContext.Condition != "EventAgeExceeded" || r.RequestContext.ApproximateInvokeCount != 0 ||
		!strings.HasSuffix(r.RequestContext.FunctionArn, ":function:never:$LATEST") || string(r.RequestPayload) != `{"marker":"old"}` {
		t.Errorf("record %+v, want EventAgeExceeded of %s with 0 invokes and the original payload", r, rid)
	}
	if waited < maxAge*time.Second {
		t.Errorf("the record came after %v, before the event was %d s old", waited, maxAge)
	}
	if a := queueAttrs(t, c, "never-ok"); !queueEmpty(a) {
		t.Errorf("OnSuccess queue holds %d messages, want none: the event was invoked", a.ApproximateMessages)
	}
	// (metric answers -1 for a series that does not exist: none counted.)
	for _, outcome := range []string{"success", "failed", "retried"} {
		if n := d.metric(t, `skiff_async_attempts_total{outcome="`+outcome+`"}`); n > 0 {
			t.Errorf("%v invocations ended %s, want none", n, outcome)
		}
	}
	if n := d.metric(t, `skiff_agent_cold_starts_total{function="never"}`); n > 0 {
		t.Errorf("%v sandboxes started, want none: the function must never run", n)
	}
	throttled := d.metric(t, `skiff_async_attempts_total{outcome="throttled"}`)
	if throttled < 2 {
		t.Errorf("%v throttled attempts, want the event retried while it waited", throttled)
	}
	t.Logf("EventAgeExceeded record after %v, %v throttled attempts", waited.Round(time.Millisecond), throttled)
}

// TestAsyncThrottledNeverFails: with reserved concurrency 1, 100 async
// events all succeed; throttles make them wait, never fail, and use no
// attempt.
func TestAsyncThrottledNeverFails(t *testing.T) {
	const n = 100
	d := startDev(t, "")
	c := d.client("connect", "")
	createFunction(t, c, "single", nil)
	if _, err := c.fn.PutFunctionConcurrency(context.Background(), connect.NewRequest(&skiffv1.PutFunctionConcurrencyRequest{Name: "single", ReservedConcurrentExecutions: 1})); err != nil {
		t.Fatal(err)
	}
	createQueue(t, c, "single-ok", nil)
	createQueue(t, c, "single-failed", nil)
	putEventConfig(t, c, "single", &skiffv1.EventInvokeConfig{OnSuccess: "queue:single-ok", OnFailure: "queue:single-failed"})

	start := time.Now()
	ids := make([]string, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ids[i] = fmt.Sprintf("single-%03d", i)
			if _, err := invokeAsync(context.Background(), c, "single", ids[i], []byte(`{"action":"sleep","sleep":"20ms"}`)); err != nil {
				t.Errorf("accept %d: %v", i, err)
			}
		}()
	}
	wg.Wait()
	count, recs := drainRecords(t, c, "single-ok", 2, 90*time.Second, func(count map[string]int) bool {
		for _, id := range ids {
			if count[id] == 0 {
				return false
			}
		}
		return true
	})
	for _, r := range recs {
		if r.RequestContext.Condition != "Success" || r.RequestContext.ApproximateInvokeCount != 1 {
			t.Errorf("record of %s: condition %q approximateInvokeCount %d, want Success 1 (throttles use no attempt)",
				r.RequestContext.RequestID, r.RequestContext.Condition, r.RequestContext.ApproximateInvokeCount)
		}
	}
	if a := queueAttrs(t, c, "single-failed"); !queueEmpty(a) {
		t.Errorf("OnFailure queue holds %d/%d messages, want none", a.ApproximateMessages, a.ApproximateMessagesNotVisible)
	}
	if f := d.metric(t, `skiff_async_attempts_total{outcome="failed"}`); f > 0 {
		t.Errorf("%v events failed, want 0", f)
	}
	throttled := d.metric(t, `skiff_async_attempts_total{outcome="throttled"}`)
	if throttled <= 0 {
		t.Errorf("no throttled attempts counted: the test did not exercise throttling")
	}
	t.Logf("%d events processed in %v (%d records for %d ids), %v throttled attempts put back",
		n, time.Since(start).Round(time.Millisecond), len(recs), len(count), throttled)
}

// TestQueueMappingBatchItemFailures: a queue event source mapping with
// ReportBatchItemFailures deletes the messages the function processed and
// retries only the reported ones; a poison message reaches the queue's
// dead-letter queue after its maximum receives.
func TestQueueMappingBatchItemFailures(t *testing.T) {
	const good = 20
	d := startDev(t, "")
	c := d.client("connect", "")
	ctx := context.Background()
	createFunction(t, c, "batcher", nil)
	createQueue(t, c, "src-dlq", nil)
	createQueue(t, c, "src", &skiffv1.QueueConfig{
		VisibilityTimeoutSeconds: ptr[int32](1),
		RedrivePolicy:            &skiffv1.RedrivePolicy{DeadLetterQueue: "src-dlq", MaxReceiveCount: 2},
	})
	for i := range good {
		if _, err := c.queue.SendMessage(ctx, connect.NewRequest(&skiffv1.SendMessageRequest{Queue: "src", Body: fmt.Sprintf("good %d", i)})); err != nil {
			t.Fatal(err)
		}
	}
	poison, err := c.queue.SendMessage(ctx, connect.NewRequest(&skiffv1.SendMessageRequest{Queue: "src", Body: "poison pill"}))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	m, err := c.esm.CreateEventSourceMapping(ctx, connect.NewRequest(&skiffv1.CreateEventSourceMappingRequest{Mapping: &skiffv1.EventSourceMapping{
		FunctionName: "batcher", Queue: "src", BatchSize: ptr[int32](10),
		FunctionResponseTypes: []string{"ReportBatchItemFailures"},
	}}))
	if err != nil {
		t.Fatal(err)
	}
	if m.Msg.Mapping.GetState() != "Enabled" || m.Msg.Mapping.GetUuid() == "" {
		t.Fatalf("mapping %+v, want an enabled mapping with a uuid", m.Msg.Mapping)
	}

	waitFor(t, 30*time.Second, "the poison message to reach the dead-letter queue", func() bool {
		a := queueAttrs(t, c, "src-dlq")
		return a.ApproximateMessages+a.ApproximateMessagesNotVisible+a.ApproximateMessagesDelayed >= 1
	})
	t.Logf("poison message dead-lettered after %v", time.Since(start).Round(time.Millisecond))
	// The move to the dead-letter queue and the last good batch's deletes
	// land at about the same time: wait for the source queue to settle.
	waitFor(t, 10*time.Second, "the source queue to be empty", func() bool { return queueEmpty(queueAttrs(t, c, "src")) })
	got, err := c.queue.ReceiveMessage(ctx, connect.NewRequest(&skiffv1.ReceiveMessageRequest{Queue: "src-dlq", MaxMessages: 10, WaitSeconds: ptr[int32](1)}))
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Msg.Messages) != 1 || got.Msg.Messages[0].Body != "poison pill" || got.Msg.Messages[0].MessageId != poison.Msg.MessageId {
		t.Fatalf("dead-letter queue holds %+v, want only the poison message %s", got.Msg.Messages, poison.Msg.MessageId)
	}
	// Every good message was processed once and deleted; the poison one
	// was reported failed by both of its invocations.
	if n := d.metric(t, "skiff_esm_messages_deleted_total"); n != good {
		t.Errorf("messages deleted: got %v, want %d", n, good)
	}
	if n := d.metric(t, "skiff_esm_messages_failed_total"); n != 2 {
		t.Errorf("messages failed: got %v, want 2 (the poison message, once per receive)", n)
	}
	if n := d.metric(t, "skiff_esm_delete_errors_total"); n > 0 {
		t.Errorf("delete errors: %v, want 0", n)
	}
}

// TestAsyncBadInput: invalid async input through the real stack gets a
// clear error and changes nothing.
func TestAsyncBadInput(t *testing.T) {
	d := startDev(t, "")
	ctx := context.Background()
	for _, proto := range protocols {
		t.Run(proto, func(t *testing.T) {
			c := d.client(proto, "")
			fn, okQueue := "bad-"+proto, "bad-ok-"+proto
			createFunction(t, c, fn, nil)
			createQueue(t, c, okQueue, nil)
			putEventConfig(t, c, fn, &skiffv1.EventInvokeConfig{OnSuccess: "queue:" + okQueue})
			received := func() float64 { return max(0, d.metric(t, "skiff_async_events_received_total")) }

			t.Run("oversized payload", func(t *testing.T) {
				before := received()
				big := fmt.Appendf(nil, `{"pad":%q}`, strings.Repeat("x", 1<<20))
				_, err := invokeAsync(ctx, c, fn, "too-big-"+proto, big)
				wantError(t, err, connect.CodeInvalidArgument, "payload")
				// A marker event after it: once its record is in, the
				// oversized one would have been processed too.
				rid := mustInvokeAsync(t, c, fn, "", `{"marker":true}`)
				count, _ := drainRecords(t, c, okQueue, 1, 20*time.Second, func(count map[string]int) bool { return count[rid] > 0 })
				if len(count) != 1 {
					t.Errorf("OnSuccess records for %v, want only the marker %s", count, rid)
				}
				if got := received() - before; got != 1 {
					t.Errorf("events stored: got %v, want 1 (the marker)", got)
				}
			})

			t.Run("event invoke config", func(t *testing.T) {
				for _, tc := range []struct {
					name  string
					cfg   *skiffv1.EventInvokeConfig
					code  connect.Code
					field string
				}{
					{"missing success queue", &skiffv1.EventInvokeConfig{OnSuccess: "queue:nope"}, connect.CodeInvalidArgument, "on_success"},
					{"missing failure queue", &skiffv1.EventInvokeConfig{OnFailure: "queue:nope"}, connect.CodeInvalidArgument, "on_failure"},
					{"missing failure function", &skiffv1.EventInvokeConfig{OnFailure: "function:nope"}, connect.CodeInvalidArgument, "on_failure"},
					{"missing dead-letter queue", &skiffv1.EventInvokeConfig{DeadLetterQueue: "queue:nope"}, connect.CodeInvalidArgument, "dead_letter_queue"},
					{"malformed destination", &skiffv1.EventInvokeConfig{OnSuccess: "sqs:nope"}, connect.CodeInvalidArgument, "on_success"},
					{"max retries 3", &skiffv1.EventInvokeConfig{MaximumRetryAttempts: ptr[int32](3)}, connect.CodeInvalidArgument, "maximum_retry_attempts"},
					{"max retries -1", &skiffv1.EventInvokeConfig{MaximumRetryAttempts: ptr[int32](-1)}, connect.CodeInvalidArgument, "maximum_retry_attempts"},
					{"max age 30", &skiffv1.EventInvokeConfig{MaximumEventAgeSeconds: ptr[int32](30)}, connect.CodeInvalidArgument, "maximum_event_age_seconds"},
					{"max age 21601", &skiffv1.EventInvokeConfig{MaximumEventAgeSeconds: ptr[int32](21601)}, connect.CodeInvalidArgument, "maximum_event_age_seconds"},
				} {
					t.Run(tc.name, func(t *testing.T) {
						_, err := c.fn.PutFunctionEventInvokeConfig(ctx, connect.NewRequest(&skiffv1.PutFunctionEventInvokeConfigRequest{FunctionName: fn, Config: tc.cfg}))
						wantError(t, err, tc.code, tc.field)
						got, err := c.fn.GetFunctionEventInvokeConfig(ctx, connect.NewRequest(&skiffv1.GetFunctionEventInvokeConfigRequest{FunctionName: fn}))
						if err != nil {
							t.Fatal(err)
						}
						if g := got.Msg.Config; g.GetOnSuccess() != "queue:"+okQueue || g.GetOnFailure() != "" || g.GetDeadLetterQueue() != "" || g.MaximumRetryAttempts != nil || g.MaximumEventAgeSeconds != nil {
							t.Errorf("config after a refused put: %+v, want the previous one unchanged", g)
						}
					})
				}
				_, err := c.fn.PutFunctionEventInvokeConfig(ctx, connect.NewRequest(&skiffv1.PutFunctionEventInvokeConfigRequest{
					FunctionName: "no-such-function", Config: &skiffv1.EventInvokeConfig{}}))
				wantError(t, err, connect.CodeNotFound, "")
			})
		})
	}
}

// wantError checks an error's code and, when field is set, that it names
// the field (the Skiff-Error-Field metadata and the message).
func wantError(t *testing.T, err error, code connect.Code, field string) {
	t.Helper()
	var ce *connect.Error
	if !errorsAs(err, &ce) {
		t.Fatalf("got error %v, want %v", err, code)
	}
	if ce.Code() != code {
		t.Errorf("got code %v (%v), want %v", ce.Code(), err, code)
	}
	if field != "" && (ce.Meta().Get(errs.HeaderField) != field || !strings.Contains(ce.Message(), field)) {
		t.Errorf("error %q field %q, want it to name %q", ce.Message(), ce.Meta().Get(errs.HeaderField), field)
	}
}
