package esm

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/lease"
	"skiff.dev/skiff/gateway/queue"
	"skiff.dev/skiff/gateway/store"
)

// realEnv is the real queue manager and leasing service on one embedded
// NATS, with a fake invoker.
type realEnv struct {
	st  *store.Store
	q   *queue.Manager
	ls  *lease.Service
	fns *fakeFunctions
}

func newRealEnv(t *testing.T) *realEnv {
	t.Helper()
	ctx := testCtx(t)
	st := openStore(t)
	q, err := queue.New(ctx, st.JetStream(), queue.Config{Region: "test-1", AccountID: "123456789012"})
	if err != nil {
		t.Fatalf("queue.New: %v", err)
	}
	t.Cleanup(func() { q.Close() })
	ls, err := lease.New(ctx, st.JetStream(), lease.Config{Expiry: 900 * time.Millisecond})
	if err != nil {
		t.Fatalf("lease.New: %v", err)
	}
	return &realEnv{st: st, q: q, ls: ls, fns: newFakeFunctions("worker")}
}

func (e *realEnv) service(t *testing.T, holder string, inv Invoker) *Service {
	t.Helper()
	cfg := testConfig()
	s, err := New(testCtx(t), e.st.JetStream(), cfg, e.q, e.fns, inv, e.ls, holder)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// runUntil runs s until the returned stop is called (or the test ends).
func runUntil(t *testing.T, s *Service) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run: %v", err)
				}
			case <-time.After(15 * time.Second):
				t.Errorf("Run did not return 15s after its context ended")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

func (e *realEnv) createQueue(t *testing.T, name string, cfg *skiffv1.QueueConfig) {
	t.Helper()
	if _, err := e.q.Create(testCtx(t), &skiffv1.CreateQueueRequest{Name: name, Config: cfg}); err != nil {
		t.Fatalf("creating queue %s: %v", name, err)
	}
}

func (e *realEnv) send(t *testing.T, queueName, body string) string {
	t.Helper()
	r, err := e.q.Send(testCtx(t), &skiffv1.SendMessageRequest{Queue: queueName, Body: body,
		MessageAttributes: map[string]*skiffv1.MessageAttribute{"kind": {DataType: "String", StringValue: "test"}}})
	if err != nil {
		t.Fatalf("sending to %s: %v", queueName, err)
	}
	return r.GetMessageId()
}

func (e *realEnv) depth(t *testing.T, name string) (visible, inflight int64) {
	t.Helper()
	a, err := e.q.Attributes(testCtx(t), name)
	if err != nil {
		t.Fatalf("attributes of %s: %v", name, err)
	}
	return a.GetApproximateMessages() + a.GetApproximateMessagesDelayed(), a.GetApproximateMessagesNotVisible()
}

// TestRealQueuePartialFailuresAndPoisonToDLQ runs a mapping with
// ReportBatchItemFailures over the real gateway/queue and gateway/lease:
// good messages are deleted once processed, the one the function keeps
// failing is retried after the visibility timeout and reaches the
// dead-letter queue after max receives.
func TestRealQueuePartialFailuresAndPoisonToDLQ(t *testing.T) {
	e := newRealEnv(t)
	e.createQueue(t, "orders-dlq", nil)
	e.createQueue(t, "orders", &skiffv1.QueueConfig{
		VisibilityTimeoutSeconds: proto.Int32(1),
		RedrivePolicy:            &skiffv1.RedrivePolicy{DeadLetterQueue: "orders-dlq", MaxReceiveCount: 3},
	})
	var mu sync.Mutex
	invoked := map[string]int{} // body → invokes
	var receiveCounts []string  // ApproximateReceiveCount of the poison message
	inv := &fakeInvoker{fn: func(_ context.Context, _ string, payload []byte) (*skiffv1.InvokeResponse, error) {
		ev, err := decodeEvent(payload)
		if err != nil {
			return nil, err
		}
		var failures []map[string]string
		mu.Lock()
		defer mu.Unlock()
		for _, r := range ev.Records {
			invoked[r.Body]++
			if r.EventSourceARN != "arn:aws:sqs:test-1:123456789012:orders" || r.MessageAttributes["kind"].StringValue == nil || *r.MessageAttributes["kind"].StringValue != "test" {
				return nil, fmt.Errorf("record %+v: want the queue's ARN and the kind attribute", r)
			}
			if strings.HasPrefix(r.Body, "poison") {
				failures = append(failures, map[string]string{"itemIdentifier": r.MessageID})
				receiveCounts = append(receiveCounts, r.Attributes["ApproximateReceiveCount"])
			}
		}
		out, _ := json.Marshal(map[string]any{"batchItemFailures": failures})
		return &skiffv1.InvokeResponse{StatusCode: 200, Payload: out}, nil
	}}
	s := e.service(t, "gw-1", inv)
	if _, err := s.Create(testCtx(t), &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders", BatchSize: proto.Int32(10),
		FunctionResponseTypes: []string{"ReportBatchItemFailures"}}); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		e.send(t, "orders", fmt.Sprintf("good-%d", i))
	}
	e.send(t, "orders", "poison-0")
	runUntil(t, s)

	eventually(t, "the poison message in the dead-letter queue and the source empty", func() bool {
		v, f := e.depth(t, "orders")
		dv, _ := e.depth(t, "orders-dlq")
		return v == 0 && f == 0 && dv == 1
	})
	mu.Lock()
	defer mu.Unlock()
	for i := range 20 {
		if n := invoked[fmt.Sprintf("good-%d", i)]; n != 1 {
			t.Errorf("good-%d invoked %d times, want 1 (only reported items are retried)", i, n)
		}
	}
	if n := invoked["poison-0"]; n != 3 {
		t.Errorf("poison invoked %d times, want 3 (max receive count)", n)
	}
	if got := strings.Join(receiveCounts, ","); got != "1,2,3" {
		t.Errorf("ApproximateReceiveCount of the poison message: got %s, want 1,2,3", got)
	}
	msgs, err := e.q.Receive(testCtx(t), &skiffv1.ReceiveMessageRequest{Queue: "orders-dlq", MaxMessages: 10})
	if err != nil || len(msgs) != 1 || msgs[0].GetBody() != "poison-0" {
		t.Fatalf("dead-letter queue: got %v, %v; want the poison message", msgs, err)
	}
}

// TestRealLeaseTakeover: two gateways run the same mapping's single slot;
// when the holder stops, the other takes the slot over and processes.
func TestRealLeaseTakeover(t *testing.T) {
	e := newRealEnv(t)
	e.createQueue(t, "orders", &skiffv1.QueueConfig{VisibilityTimeoutSeconds: proto.Int32(5)})
	inv1, inv2 := &fakeInvoker{}, &fakeInvoker{}
	s1 := e.service(t, "gw-1", inv1)
	s2 := e.service(t, "gw-2", inv2)
	m, err := s1.Create(testCtx(t), &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders", BatchSize: proto.Int32(1)})
	if err != nil {
		t.Fatal(err)
	}
	stop1 := runUntil(t, s1)
	eventually(t, "gw-1 holds the slot", func() bool { return len(s1.Held()) == 1 })
	stop2 := runUntil(t, s2)
	defer stop2()
	e.send(t, "orders", "first")
	eventually(t, "first processed", func() bool { v, f := e.depth(t, "orders"); return v == 0 && f == 0 })
	if len(inv1.callList()) != 1 || len(inv2.callList()) != 0 {
		t.Fatalf("invokes: gw-1 %d, gw-2 %d; want 1 and 0 (one slot, held by gw-1)", len(inv1.callList()), len(inv2.callList()))
	}
	if len(s2.Held()) != 0 {
		t.Fatalf("gw-2 holds %v, want nothing", s2.Held())
	}
	leases, err := e.ls.List(testCtx(t))
	if err != nil || len(leases) != 1 || leases[0].Resource != ResourcePrefix+m.GetUuid() || leases[0].Holder != "gw-1" {
		t.Fatalf("leases: got %v, %v; want one slot of esm:%s held by gw-1", leases, err, m.GetUuid())
	}

	stop1()
	eventually(t, "gw-2 holds the slot", func() bool { return len(s2.Held()) == 1 })
	e.send(t, "orders", "second")
	eventually(t, "second processed by gw-2", func() bool { return len(inv2.callList()) == 1 })
	if got := inv2.callList()[0].bodies; len(got) != 1 || got[0] != "second" {
		t.Fatalf("gw-2 invoked with %v, want [second]", got)
	}

	// Deleting the mapping removes its lease resource.
	if err := s2.Delete(testCtx(t), m.GetUuid()); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the lease resource gone", func() bool {
		res, err := e.ls.Resources(testCtx(t))
		_, ok := res[ResourcePrefix+m.GetUuid()]
		return err == nil && !ok && len(s2.Held()) == 0
	})
}
