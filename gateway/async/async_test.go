package async

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/destinations"
	"skiff.dev/skiff/internal/errs"
)

func TestParseDurability(t *testing.T) {
	for _, tc := range []struct {
		in       string
		want     Durability
		sync, ok bool
	}{
		{"", DurabilityAlways, true, true},
		{"always", DurabilityAlways, true, true},
		{"interval", DurabilityInterval, false, true},
		{"never", "", false, false},
	} {
		got, err := ParseDurability(tc.in)
		if (err == nil) != tc.ok || got != tc.want || (err == nil && got.SyncAlways() != tc.sync) {
			t.Errorf("ParseDurability(%q) = %q, %v; want %q (sync %v), ok %v", tc.in, got, err, tc.want, tc.sync, tc.ok)
		}
	}
}

func TestResourceNames(t *testing.T) {
	for _, tc := range []struct {
		res, subj string
		ok        bool
	}{
		{Resource(SharedSubject(3)), "async.shared.3", true},
		{Resource(DedicatedSubject("fn")), "async.fn.fn", true},
		{"esm:1234", "", false},
		{"async:", "", false},
		{"async:other.x", "", false},
	} {
		got, ok := SubjectOf(tc.res)
		if got != tc.subj || ok != tc.ok || IsResource(tc.res) != tc.ok {
			t.Errorf("SubjectOf(%q) = %q, %v; want %q, %v", tc.res, got, ok, tc.subj, tc.ok)
		}
	}
}

func TestAcceptStoresDedupsAndLimits(t *testing.T) {
	clk := &clock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	s, reg := newService(t, openJS(t, ""), Config{MaxPayload: 100, Now: clk.Now})
	ctx := testCtx(t)
	subj := s.QueueFor("fn")
	if !strings.HasPrefix(subj, SharedPrefix) {
		t.Fatalf("QueueFor = %q, want a shared queue", subj)
	}
	if err := s.Accept(ctx, "fn", []byte(`{"a":1}`), "rid-1"); err != nil {
		t.Fatal(err)
	}
	// A client retry of the same request id is stored once.
	if err := s.Accept(ctx, "fn", []byte(`{"a":1}`), "rid-1"); err != nil {
		t.Fatal(err)
	}
	if err := s.Accept(ctx, "fn", bytes.Repeat([]byte("x"), 101), "rid-2"); !errs.IsInvalid(err) || !strings.Contains(err.Error(), "101 bytes") {
		t.Errorf("oversized accept: got %v, want invalid payload", err)
	}
	if got, want := streamMsgs(t, s, subj), []string{"rid-1"}; !cmp.Equal(got, want) {
		t.Errorf("stored events %v, want %v", got, want)
	}
	m, err := s.stream.GetMsg(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	for h, want := range map[string]string{
		HeaderRequestID: "rid-1", HeaderFunction: "fn", HeaderAttempt: "0", HeaderDepth: "0",
		HeaderAccepted: "2026-01-02T03:04:05Z", HeaderNotBefore: "",
	} {
		if got := m.Header.Get(h); got != want {
			t.Errorf("header %s = %q, want %q", h, got, want)
		}
	}
	if got := counterValue(t, reg, "skiff_async_events_received_total", nil); got != 1 {
		t.Errorf("received = %v, want 1", got)
	}
}

func TestEventConfigValidation(t *testing.T) {
	i := func(n int32) *int32 { return &n }
	for _, tc := range []struct {
		name  string
		c     *skiffv1.EventInvokeConfig
		field string // "" means valid
	}{
		{"empty", &skiffv1.EventInvokeConfig{}, ""},
		{"full", &skiffv1.EventInvokeConfig{MaximumRetryAttempts: i(0), MaximumEventAgeSeconds: i(60), OnSuccess: "queue:q", OnFailure: "https://example.com/h", DeadLetterQueue: "queue:dlq"}, ""},
		{"max", &skiffv1.EventInvokeConfig{MaximumRetryAttempts: i(2), MaximumEventAgeSeconds: i(21600), OnFailure: "function:other"}, ""},
		{"nil", nil, "config"},
		{"retries negative", &skiffv1.EventInvokeConfig{MaximumRetryAttempts: i(-1)}, "maximum_retry_attempts"},
		{"retries 3", &skiffv1.EventInvokeConfig{MaximumRetryAttempts: i(3)}, "maximum_retry_attempts"},
		{"age 59", &skiffv1.EventInvokeConfig{MaximumEventAgeSeconds: i(59)}, "maximum_event_age_seconds"},
		{"age 21601", &skiffv1.EventInvokeConfig{MaximumEventAgeSeconds: i(21601)}, "maximum_event_age_seconds"},
		{"success no kind", &skiffv1.EventInvokeConfig{OnSuccess: "q"}, "on_success"},
		{"failure empty name", &skiffv1.EventInvokeConfig{OnFailure: "queue:"}, "on_failure"},
		{"failure ftp", &skiffv1.EventInvokeConfig{OnFailure: "ftp://x"}, "on_failure"},
		{"dlq function", &skiffv1.EventInvokeConfig{DeadLetterQueue: "function:f"}, "dead_letter_queue"},
		{"dlq bare", &skiffv1.EventInvokeConfig{DeadLetterQueue: "dlq"}, "dead_letter_queue"},
		{"target too long", &skiffv1.EventInvokeConfig{OnSuccess: "https://x/" + strings.Repeat("a", 2048)}, "on_success"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := ValidateEventConfig(tc.c)
			if tc.field == "" {
				if err != nil {
					t.Fatalf("got %v, want valid", err)
				}
				return
			}
			var e *errs.Error
			if !errs.IsInvalid(err) || !asErr(err, &e) || e.Field != tc.field {
				t.Fatalf("got %v, want invalid %s", err, tc.field)
			}
		})
	}
}

func asErr(err error, e **errs.Error) bool {
	x, ok := err.(*errs.Error)
	*e = x
	return ok
}

func TestEventConfigStoredAndShared(t *testing.T) {
	clk := &clock{t: time.Date(2026, 1, 2, 0, 0, 0, 0, time.UTC)}
	js := openJS(t, "")
	s1, _ := newService(t, js, Config{Now: clk.Now})
	ctx := testCtx(t)
	if _, err := s1.GetEventConfig(ctx, "fn"); !errs.IsNotFound(err) {
		t.Fatalf("get before put: got %v, want not found", err)
	}
	two := int32(1)
	in := &skiffv1.EventInvokeConfig{MaximumRetryAttempts: &two, OnFailure: "queue:f", DeadLetterQueue: "queue:d"}
	out, err := s1.PutEventConfig(ctx, "fn", in)
	if err != nil {
		t.Fatal(err)
	}
	want := proto.Clone(in).(*skiffv1.EventInvokeConfig)
	want.LastModified = "2026-01-02T00:00:00Z"
	if diff := cmp.Diff(want, out, protocmp.Transform()); diff != "" {
		t.Errorf("put (-want +got):\n%s", diff)
	}
	// A second gateway sees it (read from the bucket).
	s2, _ := newService(t, js, Config{Now: clk.Now})
	got, err := s2.GetEventConfig(ctx, "fn")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got, protocmp.Transform()); diff != "" {
		t.Errorf("second gateway (-want +got):\n%s", diff)
	}
	if p := s2.policyFor("fn"); p.maxRetries != 1 || p.maxAge != DefaultMaxEventAge || p.onFailure != "queue:f" || p.dlq != "d" {
		t.Errorf("policy = %+v", p)
	}
	if err := s1.DeleteEventConfig(ctx, "fn"); err != nil {
		t.Fatal(err)
	}
	if _, err := s1.GetEventConfig(ctx, "fn"); !errs.IsNotFound(err) {
		t.Errorf("get after delete: got %v, want not found", err)
	}
	if err := s1.DeleteEventConfig(ctx, "fn"); !errs.IsNotFound(err) {
		t.Errorf("second delete: got %v, want not found", err)
	}
	waitFor(t, "the second gateway to see the delete", 10*time.Second, func() bool {
		_, err := s2.GetEventConfig(ctx, "fn")
		return errs.IsNotFound(err)
	})
	if p := s2.policyFor("fn"); p.maxRetries != DefaultMaxRetries || p.onFailure != "" {
		t.Errorf("policy after delete = %+v, want defaults", p)
	}
}

// fnError is a failed invocation's response.
func fnError(msg string) *skiffv1.InvokeResponse {
	b, _ := json.Marshal(map[string]string{"errorMessage": msg, "errorType": "errorString"})
	return &skiffv1.InvokeResponse{StatusCode: 200, FunctionError: "Unhandled", Payload: b, ExecutedVersion: "$LATEST"}
}

func ptr(n int32) *int32 { return &n }

// TestRetriesThenSuccess: a function that fails twice then succeeds is
// invoked exactly 3 times with MaximumRetryAttempts 2, always with the
// same request id, and its success record says 3 invokes.
func TestRetriesThenSuccess(t *testing.T) {
	s, reg := newService(t, openJS(t, ""), Config{RetryDelay: 20 * time.Millisecond})
	ctx := testCtx(t)
	if _, err := s.PutEventConfig(ctx, "fn", &skiffv1.EventInvokeConfig{MaximumRetryAttempts: ptr(2), OnSuccess: "queue:ok", OnFailure: "queue:bad"}); err != nil {
		t.Fatal(err)
	}
	inv := &fakeInvoker{fn: func(n int, _ string, p []byte, rid string) (*skiffv1.InvokeResponse, error) {
		if n <= 2 {
			return fnError("boom"), nil
		}
		return &skiffv1.InvokeResponse{StatusCode: 200, Payload: []byte(`"done"`), ExecutedVersion: "$LATEST"}, nil
	}}
	dest := &fakeDest{}
	startPool(t, s, inv, dest, &fakeDLQ{}, &fakeFence{})
	if err := s.Accept(ctx, "fn", []byte(`{"k":"v"}`), "rid-retry"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the success record", 10*time.Second, func() bool { return len(dest.Records()) > 0 })
	calls := inv.Calls()
	if len(calls) != 3 {
		t.Fatalf("invoked %d times, want 3: %v", len(calls), calls)
	}
	for _, c := range calls {
		if c.rid != "rid-retry" || c.payload != `{"k":"v"}` || c.function != "fn" {
			t.Errorf("call %+v, want fn with rid-retry and the original payload", c)
		}
	}
	recs := dest.Records()
	if len(recs) != 1 {
		t.Fatalf("%d records, want 1: %+v", len(recs), recs)
	}
	r := recs[0]
	if r.target != "queue:ok" || r.rec.RequestContext.Condition != destinations.ConditionSuccess ||
		r.rec.RequestContext.ApproximateInvokeCount != 3 || r.rec.RequestContext.RequestID != "rid-retry" ||
		string(r.rec.ResponsePayload) != `"done"` || string(r.rec.RequestPayload) != `{"k":"v"}` ||
		r.rec.RequestContext.FunctionArn != "arn:aws:lambda:local:000000000000:function:fn:$LATEST" {
		t.Errorf("record %+v", r)
	}
	if got := counterValue(t, reg, "skiff_async_attempts_total", map[string]string{"outcome": "retried"}); got != 2 {
		t.Errorf("retried = %v, want 2", got)
	}
	waitFor(t, "the queue to drain", 10*time.Second, func() bool { return len(streamMsgs(t, s, s.QueueFor("fn"))) == 0 })
}

// TestFailureConditions covers where failed events go.
func TestFailureConditions(t *testing.T) {
	for _, tc := range []struct {
		name        string
		cfg         *skiffv1.EventInvokeConfig
		wantInvokes int
		wantRecord  string // target of the failure record; "" none
		wantDLQ     bool
		wantDropped string // dropped reason label; "" none
	}{
		{name: "no retries to on_failure", cfg: &skiffv1.EventInvokeConfig{MaximumRetryAttempts: ptr(0), OnFailure: "function:handler"}, wantInvokes: 1, wantRecord: "function:handler"},
		{name: "one retry to dlq", cfg: &skiffv1.EventInvokeConfig{MaximumRetryAttempts: ptr(1), DeadLetterQueue: "queue:dead"}, wantInvokes: 2, wantDLQ: true},
		{name: "on_failure wins over dlq", cfg: &skiffv1.EventInvokeConfig{MaximumRetryAttempts: ptr(0), OnFailure: "queue:f", DeadLetterQueue: "queue:dead"}, wantInvokes: 1, wantRecord: "queue:f"},
		{name: "nowhere: dropped", cfg: &skiffv1.EventInvokeConfig{MaximumRetryAttempts: ptr(0)}, wantInvokes: 1, wantDropped: destinations.ConditionRetriesExhausted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, reg := newService(t, openJS(t, ""), Config{RetryDelay: 10 * time.Millisecond})
			ctx := testCtx(t)
			if _, err := s.PutEventConfig(ctx, "fn", tc.cfg); err != nil {
				t.Fatal(err)
			}
			inv := &fakeInvoker{fn: func(int, string, []byte, string) (*skiffv1.InvokeResponse, error) { return fnError("always"), nil }}
			dest, dlq := &fakeDest{}, &fakeDLQ{}
			startPool(t, s, inv, dest, dlq, &fakeFence{})
			if err := s.Accept(ctx, "fn", []byte(`{"n":1}`), "rid-f"); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "the event to be done", 10*time.Second, func() bool { return len(streamMsgs(t, s, s.QueueFor("fn"))) == 0 })
			if got := len(inv.Calls()); got != tc.wantInvokes {
				t.Errorf("invoked %d times, want %d", got, tc.wantInvokes)
			}
			recs := dest.Records()
			if tc.wantRecord == "" && len(recs) != 0 || tc.wantRecord != "" && len(recs) != 1 {
				t.Fatalf("records %+v, want one to %q", recs, tc.wantRecord)
			}
			if tc.wantRecord != "" {
				rc := recs[0].rec
				if recs[0].target != tc.wantRecord || rc.RequestContext.Condition != destinations.ConditionRetriesExhausted ||
					rc.RequestContext.ApproximateInvokeCount != tc.wantInvokes || rc.ResponseContext.FunctionError != "Unhandled" ||
					!strings.Contains(string(rc.ResponsePayload), "always") {
					t.Errorf("record %+v", recs[0])
				}
			}
			dl := dlq.Sent()
			if tc.wantDLQ {
				want := []deadLetter{{queue: "dead", body: `{"n":1}`, attrs: map[string]string{"RequestID": "rid-f", "ErrorCode": "200", "ErrorMessage": "always"}}}
				if diff := cmp.Diff(want, dl, cmp.AllowUnexported(deadLetter{})); diff != "" {
					t.Errorf("dead letters (-want +got):\n%s", diff)
				}
			} else if len(dl) != 0 {
				t.Errorf("dead letters %+v, want none", dl)
			}
			if tc.wantDropped != "" {
				if got := counterValue(t, reg, "skiff_async_events_dropped_total", map[string]string{"reason": tc.wantDropped}); got != 1 {
					t.Errorf("dropped = %v, want 1", got)
				}
			}
		})
	}
}

// TestEventAgeExceeded: an event older than the maximum age is never
// invoked and its record says EventAgeExceeded.
func TestEventAgeExceeded(t *testing.T) {
	t0 := time.Date(2026, 1, 2, 0, 0, 0, 0, time.UTC)
	clk := &clock{t: t0}
	s, _ := newService(t, openJS(t, ""), Config{Now: clk.Now})
	ctx := testCtx(t)
	if _, err := s.PutEventConfig(ctx, "fn", &skiffv1.EventInvokeConfig{MaximumEventAgeSeconds: ptr(60), OnFailure: "queue:old"}); err != nil {
		t.Fatal(err)
	}
	if err := s.Accept(ctx, "fn", []byte(`{}`), "rid-old"); err != nil {
		t.Fatal(err)
	}
	clk.Set(t0.Add(61 * time.Second))
	inv, dest := &fakeInvoker{}, &fakeDest{}
	startPool(t, s, inv, dest, nil, &fakeFence{})
	waitFor(t, "the failure record", 10*time.Second, func() bool { return len(dest.Records()) > 0 })
	if n := len(inv.Calls()); n != 0 {
		t.Errorf("invoked %d times, want 0", n)
	}
	r := dest.Records()[0]
	if r.target != "queue:old" || r.rec.RequestContext.Condition != destinations.ConditionEventAgeExceeded || r.rec.RequestContext.ApproximateInvokeCount != 0 {
		t.Errorf("record %+v, want EventAgeExceeded with 0 invokes to queue:old", r)
	}
}

// TestThrottlesWaitWithoutUsingAttempts: throttled and platform errors
// are retried however often it takes, and never count as attempts.
func TestThrottlesWaitWithoutUsingAttempts(t *testing.T) {
	s, reg := newService(t, openJS(t, ""), Config{PlatformBase: time.Millisecond, PlatformMax: 5 * time.Millisecond})
	ctx := testCtx(t)
	if _, err := s.PutEventConfig(ctx, "fn", &skiffv1.EventInvokeConfig{MaximumRetryAttempts: ptr(0), OnSuccess: "queue:ok", OnFailure: "queue:bad"}); err != nil {
		t.Fatal(err)
	}
	inv := &fakeInvoker{fn: func(n int, _ string, _ []byte, _ string) (*skiffv1.InvokeResponse, error) {
		switch {
		case n <= 4:
			return nil, errs.Throttled(time.Millisecond, "rate exceeded")
		case n <= 6:
			return nil, errs.Unavailable("agent lost")
		}
		return &skiffv1.InvokeResponse{StatusCode: 200}, nil
	}}
	dest := &fakeDest{}
	startPool(t, s, inv, dest, nil, &fakeFence{})
	if err := s.Accept(ctx, "fn", nil, "rid-t"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the success record", 10*time.Second, func() bool { return len(dest.Records()) > 0 })
	if n := len(inv.Calls()); n != 7 {
		t.Errorf("invoked %d times, want 7", n)
	}
	if r := dest.Records(); len(r) != 1 || r[0].target != "queue:ok" || r[0].rec.RequestContext.ApproximateInvokeCount != 1 {
		t.Errorf("records %+v, want one success", r)
	}
	if got := counterValue(t, reg, "skiff_async_attempts_total", map[string]string{"outcome": "throttled"}); got != 4 {
		t.Errorf("throttled = %v, want 4", got)
	}
}

// TestManyEventsAllProcessed: every accepted event is invoked, with
// concurrency, across the shared queues.
func TestManyEventsAllProcessed(t *testing.T) {
	s, _ := newService(t, openJS(t, ""), Config{SharedQueues: 3})
	ctx := testCtx(t)
	inv := &fakeInvoker{}
	startPool(t, s, inv, nil, nil, &fakeFence{})
	const n = 300
	for i := range n {
		if err := s.Accept(ctx, fmt.Sprintf("fn%d", i%7), []byte("{}"), fmt.Sprintf("rid-%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "all events", 20*time.Second, func() bool { return len(inv.Calls()) >= n })
	seen := map[string]bool{}
	for _, c := range inv.Calls() {
		seen[c.rid] = true
	}
	if len(seen) != n {
		t.Errorf("%d distinct request ids invoked, want %d", len(seen), n)
	}
}

// TestFenceCheckFailing: a poller that cannot check its lease (the store
// does not answer) does not acknowledge, but keeps its lease and keeps
// polling: once the check answers again the event is processed.
func TestFenceCheckFailing(t *testing.T) {
	s, _ := newService(t, openJS(t, ""), Config{SharedQueues: 1})
	ctx := testCtx(t)
	if _, err := s.PutEventConfig(ctx, "fn", &skiffv1.EventInvokeConfig{OnSuccess: "queue:ok"}); err != nil {
		t.Fatal(err)
	}
	fence := &fakeFence{}
	fence.failing.Store(true)
	inv, dest := &fakeInvoker{}, &fakeDest{}
	p := startPool(t, s, inv, dest, nil, fence)
	if err := s.Accept(ctx, "fn", []byte("{}"), "rid-unchecked"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a failed fence check", 10*time.Second, func() bool { return fence.checks.Load() > 0 })
	if r := dest.Records(); len(r) != 0 {
		t.Fatalf("records %+v, want none while the lease cannot be checked", r)
	}
	if n := len(p.Polling()); n != 1 {
		t.Fatalf("polling %d queues after a failed check, want 1 (the lease is still held)", n)
	}
	fence.failing.Store(false)
	waitFor(t, "the event processed once the check answers", 30*time.Second, func() bool { return len(dest.Records()) == 1 })
}

// TestFencedAck: a poller whose lease is gone does not acknowledge: the
// event stays stored, nothing is delivered and the poller stops.
func TestFencedAck(t *testing.T) {
	s, _ := newService(t, openJS(t, ""), Config{SharedQueues: 1})
	ctx := testCtx(t)
	if _, err := s.PutEventConfig(ctx, "fn", &skiffv1.EventInvokeConfig{OnSuccess: "queue:ok"}); err != nil {
		t.Fatal(err)
	}
	fence := &fakeFence{}
	fence.lost.Store(true)
	inv, dest := &fakeInvoker{}, &fakeDest{}
	p := startPool(t, s, inv, dest, nil, fence)
	if err := s.Accept(ctx, "fn", []byte("{}"), "rid-fenced"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the poller to stop", 10*time.Second, func() bool { return len(p.Polling()) == 0 })
	if n := len(inv.Calls()); n != 1 {
		t.Errorf("invoked %d times, want 1", n)
	}
	if r := dest.Records(); len(r) != 0 {
		t.Errorf("records %+v, want none from a poller without its lease", r)
	}
	if got := streamMsgs(t, s, SharedSubject(0)); !cmp.Equal(got, []string{"rid-fenced"}) {
		t.Errorf("stored %v, want the unacknowledged event", got)
	}
	// The next holder processes it.
	fence.lost.Store(false)
	startPool(t, s, inv, dest, nil, fence)
	deadline := time.Now().Add(10 * time.Second)
	for len(dest.Records()) != 1 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if len(dest.Records()) != 1 {
		c, _ := s.ensureConsumer(ctx, SharedSubject(0))
		ci, _ := c.Info(ctx)
		t.Fatalf("the new holder got no record: %d invokes; consumer pending %d, ack pending %d, redelivered %d, waiting pulls %d", len(inv.Calls()), ci.NumPending, ci.NumAckPending, ci.NumRedelivered, ci.NumWaiting)
	}
}

type recordingSender struct{ reqs []*skiffv1.SendMessageRequest }

func (r *recordingSender) Send(_ context.Context, req *skiffv1.SendMessageRequest) (*skiffv1.SendMessageResponse, error) {
	r.reqs = append(r.reqs, req)
	return &skiffv1.SendMessageResponse{MessageId: "m"}, nil
}

func TestQueueDLQ(t *testing.T) {
	attrs := map[string]string{"RequestID": "rid", "ErrorCode": "200", "ErrorMessage": "boom"}
	for _, tc := range []struct {
		name, queue string
		body        []byte
		want        *skiffv1.SendMessageRequest
	}{
		{"text", "dlq", []byte(`{"a":1}`), &skiffv1.SendMessageRequest{Queue: "dlq", Body: `{"a":1}`, MessageAttributes: map[string]*skiffv1.MessageAttribute{
			"RequestID": {DataType: "String", StringValue: "rid"}, "ErrorCode": {DataType: "Number", StringValue: "200"}, "ErrorMessage": {DataType: "String", StringValue: "boom"},
		}}},
		{"binary fifo", "dlq.fifo", []byte{0xff, 0x00}, &skiffv1.SendMessageRequest{Queue: "dlq.fifo", Body: "/wA=", MessageGroupId: "dead-letters", MessageDeduplicationId: "rid",
			MessageAttributes: map[string]*skiffv1.MessageAttribute{
				"RequestID": {DataType: "String", StringValue: "rid"}, "ErrorCode": {DataType: "Number", StringValue: "200"}, "ErrorMessage": {DataType: "String", StringValue: "boom"},
				"ContentEncoding": {DataType: "String", StringValue: "base64"},
			}}},
		{"empty", "dlq", nil, &skiffv1.SendMessageRequest{Queue: "dlq", Body: "null", MessageAttributes: map[string]*skiffv1.MessageAttribute{
			"RequestID": {DataType: "String", StringValue: "rid"}, "ErrorCode": {DataType: "Number", StringValue: "200"}, "ErrorMessage": {DataType: "String", StringValue: "boom"},
		}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &recordingSender{}
			if err := (QueueDLQ{s}).Send(context.Background(), tc.queue, tc.body, attrs); err != nil {
				t.Fatal(err)
			}
			if len(s.reqs) != 1 {
				t.Fatalf("%d sends, want 1", len(s.reqs))
			}
			if diff := cmp.Diff(tc.want, s.reqs[0], protocmp.Transform()); diff != "" {
				t.Errorf("request (-want +got):\n%s", diff)
			}
		})
	}
}
