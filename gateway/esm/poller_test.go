package esm

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

func TestSuccessDeletesEveryMessage(t *testing.T) {
	e := newEnv(t, testConfig())
	m := e.create(t, &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders", BatchSize: proto.Int32(4)})
	sent := e.q.send("orders", "body", 25)
	e.run(t)
	eventually(t, "all 25 messages deleted", func() bool { _, _, d := e.q.counts("orders"); return d == 25 })
	if got, want := joinIDs(e.q.deletedIDs("orders")), joinIDs(sent); got != want {
		t.Fatalf("deleted ids: got %s, want %s", got, want)
	}
	calls := e.inv.callList()
	if got, want := joinIDs(ids(calls)), joinIDs(sent); got != want {
		t.Fatalf("invoked ids: got %s, want %s (each once)", got, want)
	}
	reqIDs := map[string]bool{}
	for _, c := range calls {
		if c.function != "worker" {
			t.Fatalf("invoked %q, want worker", c.function)
		}
		if len(c.ids) < 1 || len(c.ids) > 4 {
			t.Fatalf("batch of %d records, want 1-4", len(c.ids))
		}
		if !validUUID(c.requestID) || reqIDs[c.requestID] {
			t.Fatalf("request id %q: want a fresh UUID per batch", c.requestID)
		}
		reqIDs[c.requestID] = true
	}
	if _, ok := e.ls.desiredOf(ResourcePrefix + m.GetUuid()); !ok {
		t.Fatalf("no lease resource for mapping %s", m.GetUuid())
	}
}

func TestEventFieldsFromRealReceive(t *testing.T) {
	e := newEnv(t, testConfig())
	var mu sync.Mutex
	var got []byte
	e.inv.fn = func(_ context.Context, _ string, payload []byte) (*skiffv1.InvokeResponse, error) {
		mu.Lock()
		got = payload
		mu.Unlock()
		return &skiffv1.InvokeResponse{StatusCode: 200}, nil
	}
	e.create(t, &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders", BatchSize: proto.Int32(1)})
	e.q.send("orders", "x", 1)
	e.run(t)
	eventually(t, "the message deleted", func() bool { _, _, d := e.q.counts("orders"); return d == 1 })
	mu.Lock()
	defer mu.Unlock()
	ev, err := decodeEvent(got)
	if err != nil || len(ev.Records) != 1 {
		t.Fatalf("event %s: %v, want one record", got, err)
	}
	r := ev.Records[0]
	if r.EventSource != "aws:sqs" || r.EventSourceARN != "arn:aws:sqs:test-1:123456789012:orders" || r.AWSRegion != "test-1" ||
		r.Body != "x-0" || r.Attributes["ApproximateReceiveCount"] != "1" || r.Attributes["SenderId"] != "123456789012" || r.MD5OfBody == "" {
		t.Fatalf("record: got %+v, want aws:sqs, the queue's ARN, region test-1, body x-0, receive count 1, sender 123456789012, an md5", r)
	}
}

func TestFunctionErrorDeletesNothing(t *testing.T) {
	e := newEnv(t, testConfig())
	e.inv.fn = func(context.Context, string, []byte) (*skiffv1.InvokeResponse, error) {
		return &skiffv1.InvokeResponse{StatusCode: 200, FunctionError: "Unhandled", Payload: []byte(`{"errorMessage":"boom"}`)}, nil
	}
	e.create(t, &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders", BatchSize: proto.Int32(10)})
	e.q.send("orders", "b", 5)
	e.run(t)
	eventually(t, "all 5 in flight", func() bool { v, f, _ := e.q.counts("orders"); return v == 0 && f == 5 })
	// Messages stay in flight (until the visibility timeout) and are not
	// deleted; after the timeout they are received and invoked again.
	e.q.expire("orders")
	eventually(t, "a second delivery", func() bool { return len(ids(e.inv.callList())) >= 10 })
	if _, _, d := e.q.counts("orders"); d != 0 {
		t.Fatalf("deleted %d messages after function errors, want 0", d)
	}
	if vc := e.q.visChanges("orders"); len(vc) != 0 {
		t.Fatalf("visibility changed after a function error: %v, want none (the visibility timeout decides)", vc)
	}
}

func TestReportBatchItemFailures(t *testing.T) {
	tests := []struct {
		name     string
		types    []string
		response func(ids []string) string
		deleted  func(ids []string) []string
	}{
		{
			"partial", []string{"ReportBatchItemFailures"},
			func(ids []string) string {
				return fmt.Sprintf(`{"batchItemFailures":[{"itemIdentifier":%q},{"itemIdentifier":%q}]}`, ids[1], ids[3])
			},
			func(ids []string) []string { return []string{ids[0], ids[2], ids[4]} },
		},
		{
			"empty list is success", []string{"ReportBatchItemFailures"},
			func([]string) string { return `{"batchItemFailures":[]}` },
			func(ids []string) []string { return ids },
		},
		{
			"invalid response fails the batch", []string{"ReportBatchItemFailures"},
			func([]string) string { return `{"batchItemFailures":[{"itemIdentifier":"not-in-batch"}]}` },
			func([]string) []string { return nil },
		},
		{
			"unparsable response fails the batch", []string{"ReportBatchItemFailures"},
			func([]string) string { return `{"batchItemFailures":` },
			func([]string) []string { return nil },
		},
		{
			"ignored without the response type", nil,
			func(ids []string) string {
				return fmt.Sprintf(`{"batchItemFailures":[{"itemIdentifier":%q}]}`, ids[0])
			},
			func(ids []string) []string { return ids },
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, testConfig())
			sent := e.q.send("orders", "b", 5)
			e.inv.fn = func(context.Context, string, []byte) (*skiffv1.InvokeResponse, error) {
				return &skiffv1.InvokeResponse{StatusCode: 200, Payload: []byte(tt.response(sent))}, nil
			}
			e.create(t, &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders", BatchSize: proto.Int32(5), FunctionResponseTypes: tt.types})
			e.run(t)
			wantDeleted := tt.deleted(sent)
			eventually(t, "the batch settled", func() bool {
				v, f, d := e.q.counts("orders")
				return v == 0 && f+d == 5 && d == len(wantDeleted) && len(e.inv.callList()) == 1
			})
			if got, want := joinIDs(e.q.deletedIDs("orders")), joinIDs(wantDeleted); got != want {
				t.Fatalf("deleted: got %s, want %s", got, want)
			}
			if calls := e.inv.callList(); len(calls) != 1 || len(calls[0].ids) != 5 {
				t.Fatalf("invokes: got %d, want one batch of 5", len(calls))
			}
			// The kept ones come back after the visibility timeout.
			if len(wantDeleted) < 5 {
				e.q.expire("orders")
				eventually(t, "the failed items delivered again", func() bool { return len(e.inv.callList()) == 2 })
				if got, want := joinIDs(e.inv.callList()[1].ids), joinIDs(without(sent, wantDeleted)); got != want {
					t.Fatalf("second delivery: got %s, want only the failed items %s", got, want)
				}
			}
		})
	}
}

func without(all, drop []string) []string {
	d := map[string]bool{}
	for _, x := range drop {
		d[x] = true
	}
	var out []string
	for _, x := range all {
		if !d[x] {
			out = append(out, x)
		}
	}
	return out
}

func TestThrottleBacksOffAndRetries(t *testing.T) {
	cfg := testConfig()
	cfg.Backoff = 2 * time.Second // the visibility change is in whole seconds
	cfg.MaxBackoff = 2 * time.Second
	var waits []time.Duration
	var mu sync.Mutex
	release := make(chan time.Time)
	cfg.After = func(d time.Duration) <-chan time.Time {
		if d == 2*time.Second {
			mu.Lock()
			waits = append(waits, d)
			mu.Unlock()
			return release
		}
		return time.After(d)
	}
	e := newEnv(t, cfg)
	var n int
	e.inv.fn = func(context.Context, string, []byte) (*skiffv1.InvokeResponse, error) {
		mu.Lock()
		defer mu.Unlock()
		n++
		if n == 1 {
			return nil, errs.Throttled(time.Second, "function worker is at its reserved concurrency")
		}
		return &skiffv1.InvokeResponse{StatusCode: 200}, nil
	}
	e.create(t, &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders", BatchSize: proto.Int32(3)})
	sent := e.q.send("orders", "b", 3)
	e.run(t)
	// The throttled batch is made visible again after the backoff and the
	// poller waits the backoff.
	eventually(t, "the poller backing off", func() bool { mu.Lock(); defer mu.Unlock(); return len(waits) == 1 })
	vc := e.q.visChanges("orders")
	if len(vc) != 3 {
		t.Fatalf("visibility changes: got %v, want 3 (the batch)", vc)
	}
	for _, c := range vc {
		if c.d != 2*time.Second {
			t.Fatalf("visibility change %v, want 2s (the backoff)", c)
		}
	}
	if _, _, d := e.q.counts("orders"); d != 0 {
		t.Fatalf("deleted %d while throttled, want 0", d)
	}
	// The visibility timeout of 2 s passes and the backoff ends.
	e.q.expire("orders")
	release <- time.Now()
	eventually(t, "all deleted after the retry", func() bool { _, _, d := e.q.counts("orders"); return d == 3 })
	if got, want := joinIDs(e.q.deletedIDs("orders")), joinIDs(sent); got != want {
		t.Fatalf("deleted: got %s, want %s", got, want)
	}
}

func TestMaximumConcurrencyBoundsInvokes(t *testing.T) {
	tests := []struct {
		name string
		conc *int32
		want int
	}{
		{"maximum concurrency 3", proto.Int32(3), 3},
		{"unbounded uses the gateway's bound", nil, 5},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig()
			cfg.UnboundedConcurrency = 5
			e := newEnv(t, cfg)
			gate := make(chan struct{})
			e.inv.fn = func(ctx context.Context, _ string, _ []byte) (*skiffv1.InvokeResponse, error) {
				select {
				case <-gate:
				case <-ctx.Done():
					return nil, ctx.Err()
				}
				return &skiffv1.InvokeResponse{StatusCode: 200}, nil
			}
			e.create(t, &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders", BatchSize: proto.Int32(1), MaximumConcurrency: tt.conc})
			e.q.send("orders", "b", 40)
			e.run(t)
			eventually(t, fmt.Sprintf("%d invokes running", tt.want), func() bool { return e.inv.peakConcurrency() == tt.want })
			// Held at the bound: nothing more is received while all run.
			v1, _, _ := e.q.counts("orders")
			if v1 != 40-tt.want {
				t.Fatalf("visible while %d invokes block: got %d, want %d (no receive beyond the bound)", tt.want, v1, 40-tt.want)
			}
			close(gate)
			eventually(t, "all 40 deleted", func() bool { _, _, d := e.q.counts("orders"); return d == 40 })
			if p := e.inv.peakConcurrency(); p != tt.want {
				t.Fatalf("peak concurrent invokes: got %d, want %d", p, tt.want)
			}
		})
	}
}

func TestSlotsShareTheConcurrency(t *testing.T) {
	cfg := testConfig()
	cfg.ConcurrencyPerSlot = 4
	e := newEnv(t, cfg)
	tests := []struct {
		conc      int32
		slots     int
		shares    []int
		beyondOne int // the share of slot index slots (being dropped)
	}{
		{2, 1, []int{2}, 0},
		{4, 1, []int{4}, 0},
		{5, 2, []int{3, 2}, 0},
		{10, 3, []int{4, 3, 3}, 0},
		{1000, 250, nil, 0},
	}
	for _, tt := range tests {
		m := &skiffv1.EventSourceMapping{MaximumConcurrency: proto.Int32(tt.conc)}
		if got := e.s.slotCount(m); got != tt.slots {
			t.Errorf("concurrency %d: got %d slots, want %d", tt.conc, got, tt.slots)
		}
		sum := 0
		for i := range tt.slots {
			sh := e.s.share(m, i)
			if tt.shares != nil && sh != tt.shares[i] {
				t.Errorf("concurrency %d slot %d: got share %d, want %d", tt.conc, i, sh, tt.shares[i])
			}
			sum += sh
		}
		if sum != int(tt.conc) {
			t.Errorf("concurrency %d: shares add up to %d", tt.conc, sum)
		}
		if sh := e.s.share(m, tt.slots); sh != 0 {
			t.Errorf("concurrency %d: slot beyond the count has share %d, want 0", tt.conc, sh)
		}
	}

	// Three slots of a mapping with concurrency 10: at most 10 invokes in
	// all, each slot at most its share.
	gate := make(chan struct{})
	e.inv.fn = func(ctx context.Context, _ string, _ []byte) (*skiffv1.InvokeResponse, error) {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		return &skiffv1.InvokeResponse{StatusCode: 200}, nil
	}
	m := e.create(t, &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders", BatchSize: proto.Int32(1), MaximumConcurrency: proto.Int32(10)})
	e.q.send("orders", "b", 30)
	e.run(t)
	eventually(t, "10 invokes running", func() bool { return e.inv.peakConcurrency() == 10 })
	if n, _ := e.ls.desiredOf(ResourcePrefix + m.GetUuid()); n != 3 {
		t.Fatalf("desired slots: got %d, want 3", n)
	}
	if got := len(e.s.Held()); got != 3 {
		t.Fatalf("held slots: got %d, want 3", got)
	}
	close(gate)
	eventually(t, "all 30 deleted", func() bool { _, _, d := e.q.counts("orders"); return d == 30 })
	if p := e.inv.peakConcurrency(); p != 10 {
		t.Fatalf("peak concurrent invokes: got %d, want 10", p)
	}
}

func TestDisableStopsPollingAndDeleteRemovesTheResource(t *testing.T) {
	e := newEnv(t, testConfig())
	m := e.create(t, &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders", BatchSize: proto.Int32(1)})
	res := ResourcePrefix + m.GetUuid()
	e.run(t)
	e.q.send("orders", "a", 3)
	eventually(t, "3 deleted", func() bool { _, _, d := e.q.counts("orders"); return d == 3 })

	if _, err := e.s.Update(testCtx(t), m.GetUuid(), &skiffv1.EventSourceMapping{Enabled: proto.Bool(false)}, nil); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the resource removed and no poller running", func() bool {
		_, ok := e.ls.desiredOf(res)
		return !ok && len(e.s.Held()) == 0 && metricValue(e.s.met.pollers) == 0
	})
	// Pollers are gone: no receive happens any more.
	r := e.q.receiveCount()
	e.q.send("orders", "b", 2)
	calls := len(e.inv.callList())
	if got := e.q.receiveCount(); got != r {
		t.Fatalf("receives after disabling: got %d, want %d", got, r)
	}
	if v, _, _ := e.q.counts("orders"); v != 2 {
		t.Fatalf("visible after sending to a disabled mapping: got %d, want 2", v)
	}
	if _, err := e.s.Update(testCtx(t), m.GetUuid(), &skiffv1.EventSourceMapping{Enabled: proto.Bool(true)}, []string{"enabled"}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "polling resumes", func() bool { _, _, d := e.q.counts("orders"); return d == 5 })
	if got := len(e.inv.callList()); got != calls+2 {
		t.Fatalf("invokes: got %d, want %d", got, calls+2)
	}

	if err := e.s.Delete(testCtx(t), m.GetUuid()); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the resource removed after delete", func() bool {
		_, ok := e.ls.desiredOf(res)
		return !ok && e.ls.wasRemoved(res) && len(e.s.Held()) == 0
	})
}

func TestLostLeaseFencesDeletes(t *testing.T) {
	e := newEnv(t, testConfig())
	entered := make(chan struct{}, 1)
	proceed := make(chan struct{})
	e.inv.fn = func(ctx context.Context, _ string, _ []byte) (*skiffv1.InvokeResponse, error) {
		entered <- struct{}{}
		<-proceed
		return &skiffv1.InvokeResponse{StatusCode: 200}, nil
	}
	m := e.create(t, &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders", BatchSize: proto.Int32(2)})
	e.q.send("orders", "a", 2)
	e.run(t)
	<-entered
	// Another holder took the slot over while the batch ran.
	e.ls.fence(ResourcePrefix + m.GetUuid())
	close(proceed)
	eventually(t, "the fenced slot stopped", func() bool { return len(e.s.Held()) == 0 })
	if _, f, d := e.q.counts("orders"); d != 0 || f != 2 {
		t.Fatalf("after a fenced batch: %d deleted, %d in flight; want 0 deleted, 2 in flight", d, f)
	}
	if got := metricValue(e.s.met.fenced); got != 1 {
		t.Fatalf("fenced batches metric: got %v, want 1", got)
	}
}

func TestBatchingWindow(t *testing.T) {
	e := newEnv(t, testConfig())
	e.create(t, &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders", BatchSize: proto.Int32(100), MaximumBatchingWindowSeconds: proto.Int32(1)})
	e.q.send("orders", "a", 15)
	start := time.Now()
	e.run(t)
	// More arrive inside the window and join the same batch.
	eventually(t, "the first receives", func() bool { v, _, _ := e.q.counts("orders"); return v == 0 })
	e.q.send("orders", "b", 7)
	eventually(t, "one batch invoked", func() bool { return len(e.inv.callList()) >= 1 })
	if el := time.Since(start); el < time.Second {
		t.Fatalf("invoked after %v, want the 1 s window to pass first", el)
	}
	calls := e.inv.callList()
	if len(calls[0].ids) != 22 {
		t.Fatalf("first batch: got %d records, want 22 (15 + 7 within the window)", len(calls[0].ids))
	}
	eventually(t, "22 deleted", func() bool { _, _, d := e.q.counts("orders"); return d == 22 })

	// A full batch does not wait for the window (one poller, so that two
	// do not split the messages between their batches).
	cfg := testConfig()
	cfg.UnboundedConcurrency = 1
	e2 := newEnv(t, cfg)
	e2.create(t, &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders", BatchSize: proto.Int32(20), MaximumBatchingWindowSeconds: proto.Int32(300)})
	e2.q.send("orders", "a", 45)
	e2.run(t)
	eventually(t, "two full batches", func() bool { return len(e2.inv.callList()) >= 2 })
	for _, c := range e2.inv.callList()[:2] {
		if len(c.ids) != 20 {
			t.Fatalf("batch of %d, want 20 (full)", len(c.ids))
		}
	}
}

func TestPayloadLimitSplitsBatches(t *testing.T) {
	cfg := testConfig()
	cfg.MaxPayload = maxMessageEstimate * 3
	e := newEnv(t, cfg)
	e.create(t, &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders", BatchSize: proto.Int32(10)})
	// Ten messages of 200 KB of quotes (escaped to 400 KB): a batch of ten
	// would be 4 MB.
	big := make([]byte, 200<<10)
	for i := range big {
		big[i] = '"'
	}
	e.q.mu.Lock()
	for i := range 10 {
		e.q.nextID++
		e.q.queues["orders"].visible = append(e.q.queues["orders"].visible, &fakeMsg{id: fmt.Sprintf("big-%d", i), body: string(big)})
	}
	e.q.notifyLocked()
	e.q.mu.Unlock()
	var mu sync.Mutex
	maxLen := 0
	e.inv.fn = func(_ context.Context, _ string, p []byte) (*skiffv1.InvokeResponse, error) {
		mu.Lock()
		maxLen = max(maxLen, len(p))
		mu.Unlock()
		return &skiffv1.InvokeResponse{StatusCode: 200}, nil
	}
	e.run(t)
	eventually(t, "all 10 deleted", func() bool { _, _, d := e.q.counts("orders"); return d == 10 })
	mu.Lock()
	defer mu.Unlock()
	if maxLen > cfg.MaxPayload {
		t.Fatalf("largest event %d bytes, over the %d-byte limit", maxLen, cfg.MaxPayload)
	}
	if n := len(e.inv.callList()); n < 4 {
		t.Fatalf("invokes: got %d, want at least 4 (at most 2 records of 400 KB fit 780 KB)", n)
	}
}

func TestReceiveErrorsBackOff(t *testing.T) {
	e := newEnv(t, testConfig())
	e.q.mu.Lock()
	e.q.receiveErr = errs.Unavailable("queue engine down")
	e.q.mu.Unlock()
	e.create(t, &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders"})
	e.run(t)
	eventually(t, "a few failed receives", func() bool { return e.q.receiveCount() >= 3 })
	e.q.mu.Lock()
	e.q.receiveErr = nil
	e.q.mu.Unlock()
	e.q.send("orders", "a", 2)
	eventually(t, "delivered once the queue is back", func() bool { _, _, d := e.q.counts("orders"); return d == 2 })
}

func TestRunTwiceRefused(t *testing.T) {
	e := newEnv(t, testConfig())
	e.run(t)
	eventually(t, "running", func() bool { e.s.mu.Lock(); defer e.s.mu.Unlock(); return e.s.running })
	wantKind(t, "second Run", e.s.Run(testCtx(t)), errs.KindFailedPrecondition)
}

func TestStoredMappingsSurviveRestartAndDrivePollers(t *testing.T) {
	e := newEnv(t, testConfig())
	m := e.create(t, &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders", BatchSize: proto.Int32(2)})
	// A second Service on the same bucket (another gateway, or this one
	// restarted) sees the mapping and polls it.
	s2, err := newService(testCtx(t), e.st.JetStream(), testConfig(), e.q, e.fns, e.inv, e.ls, "gw-2")
	if err != nil {
		t.Fatal(err)
	}
	got, err := s2.Get(testCtx(t), m.GetUuid())
	if err != nil || got.GetRevision() != m.GetRevision() {
		t.Fatalf("Get from a second service: got %v, %v; want revision %d", got, err, m.GetRevision())
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s2.Run(ctx) }()
	e.q.send("orders", "a", 4)
	eventually(t, "4 deleted by the second service", func() bool { _, _, d := e.q.counts("orders"); return d == 4 })
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	if n := len(s2.Held()); n != 0 {
		t.Fatalf("slots held after Run returned: %d, want 0", n)
	}
}
