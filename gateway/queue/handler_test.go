package queue

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/internal/errs"
)

func serve(t *testing.T, m *Manager) (string, *http.Client) {
	t.Helper()
	mux := http.NewServeMux()
	mux.Handle(skiffv1connect.NewQueueServiceHandler(m.Handler(), connect.WithInterceptors(errs.Interceptor())))
	srv := httptest.NewUnstartedServer(mux)
	srv.Config.Protocols = new(http.Protocols)
	srv.Config.Protocols.SetHTTP1(true)
	srv.Config.Protocols.SetUnencryptedHTTP2(true)
	srv.Start()
	t.Cleanup(srv.Close)
	tr := &http.Transport{Protocols: new(http.Protocols)}
	tr.Protocols.SetUnencryptedHTTP2(true)
	t.Cleanup(tr.CloseIdleConnections)
	return srv.URL, &http.Client{Transport: tr}
}

func TestHandlerOverConnectAndGRPC(t *testing.T) {
	for _, p := range []struct {
		name string
		opts []connect.ClientOption
	}{{"connect", nil}, {"grpc", []connect.ClientOption{connect.WithGRPC()}}} {
		t.Run(p.name, func(t *testing.T) {
			e := newEnv(t)
			url, hc := serve(t, e.m)
			c := skiffv1connect.NewQueueServiceClient(hc, url, p.opts...)
			ctx := testCtx(t)

			_, err := c.CreateQueue(ctx, connect.NewRequest(&skiffv1.CreateQueueRequest{Name: "dlq"}))
			if err != nil {
				t.Fatalf("CreateQueue(dlq): %v", err)
			}
			cq, err := c.CreateQueue(ctx, connect.NewRequest(&skiffv1.CreateQueueRequest{Name: "q", Config: &skiffv1.QueueConfig{
				RedrivePolicy: &skiffv1.RedrivePolicy{DeadLetterQueue: "dlq", MaxReceiveCount: 1},
			}}))
			if err != nil || cq.Msg.GetQueue().GetArn() != "arn:aws:sqs:local:000000000000:q" {
				t.Fatalf("CreateQueue(q): %v, %v", cq, err)
			}
			_, err = c.CreateQueue(ctx, connect.NewRequest(&skiffv1.CreateQueueRequest{Name: "bad", Config: &skiffv1.QueueConfig{DelaySeconds: i32(1000)}}))
			if connect.CodeOf(err) != connect.CodeInvalidArgument || errs.FromConnect(err).(*errs.Error).Field != "config.delay_seconds" {
				t.Fatalf("CreateQueue with a bad delay: got %v, want InvalidArgument on config.delay_seconds", err)
			}
			list, err := c.ListQueues(ctx, connect.NewRequest(&skiffv1.ListQueuesRequest{}))
			if err != nil || len(list.Msg.GetQueues()) != 2 {
				t.Fatalf("ListQueues: %v, %v", list, err)
			}
			if _, err := c.SendMessage(ctx, connect.NewRequest(&skiffv1.SendMessageRequest{Queue: "q", Body: "one"})); err != nil {
				t.Fatalf("SendMessage: %v", err)
			}
			sb, err := c.SendMessageBatch(ctx, connect.NewRequest(&skiffv1.SendMessageBatchRequest{Queue: "q", Entries: []*skiffv1.SendMessageBatchEntry{
				{Id: "1", Body: "two"}, {Id: "2", Body: "three"},
			}}))
			if err != nil || len(sb.Msg.GetSuccessful()) != 2 {
				t.Fatalf("SendMessageBatch: %v, %v", sb, err)
			}
			rc, err := c.ReceiveMessage(ctx, connect.NewRequest(&skiffv1.ReceiveMessageRequest{Queue: "q", MaxMessages: 10}))
			if err != nil || len(rc.Msg.GetMessages()) != 3 {
				t.Fatalf("ReceiveMessage: %v, %v", rc, err)
			}
			msgs := rc.Msg.GetMessages()
			if _, err := c.DeleteMessage(ctx, connect.NewRequest(&skiffv1.DeleteMessageRequest{Queue: "q", ReceiptHandle: msgs[0].GetReceiptHandle()})); err != nil {
				t.Fatalf("DeleteMessage: %v", err)
			}
			db, err := c.DeleteMessageBatch(ctx, connect.NewRequest(&skiffv1.DeleteMessageBatchRequest{Queue: "q", Entries: []*skiffv1.DeleteMessageBatchEntry{
				{Id: "a", ReceiptHandle: msgs[1].GetReceiptHandle()},
			}}))
			if err != nil || len(db.Msg.GetSuccessful()) != 1 {
				t.Fatalf("DeleteMessageBatch: %v, %v", db, err)
			}
			if _, err := c.ChangeMessageVisibility(ctx, connect.NewRequest(&skiffv1.ChangeMessageVisibilityRequest{Queue: "q", ReceiptHandle: msgs[2].GetReceiptHandle(), VisibilityTimeoutSeconds: 0})); err != nil {
				t.Fatalf("ChangeMessageVisibility: %v", err)
			}
			// Received once already: the next receive moves it to the DLQ.
			rc, err = c.ReceiveMessage(ctx, connect.NewRequest(&skiffv1.ReceiveMessageRequest{Queue: "q", MaxMessages: 10}))
			if err != nil || len(rc.Msg.GetMessages()) != 0 {
				t.Fatalf("ReceiveMessage after max receives: %v, %v", rc, err)
			}
			at, err := c.GetQueueAttributes(ctx, connect.NewRequest(&skiffv1.GetQueueAttributesRequest{Name: "dlq"}))
			if err != nil || at.Msg.GetApproximateMessages() != 1 {
				t.Fatalf("GetQueueAttributes(dlq): %v, %v", at, err)
			}
			_, err = c.DeleteQueue(ctx, connect.NewRequest(&skiffv1.DeleteQueueRequest{Name: "dlq"}))
			if connect.CodeOf(err) != connect.CodeFailedPrecondition {
				t.Fatalf("DeleteQueue(dlq in use): got %v, want FailedPrecondition", err)
			}
			rd, err := c.RedriveQueue(ctx, connect.NewRequest(&skiffv1.RedriveQueueRequest{DeadLetterQueue: "dlq"}))
			if err != nil || rd.Msg.GetMoved() != 1 {
				t.Fatalf("RedriveQueue: %v, %v", rd, err)
			}
			if _, err := c.PurgeQueue(ctx, connect.NewRequest(&skiffv1.PurgeQueueRequest{Name: "q"})); err != nil {
				t.Fatalf("PurgeQueue: %v", err)
			}
			at, err = c.GetQueueAttributes(ctx, connect.NewRequest(&skiffv1.GetQueueAttributesRequest{Name: "q"}))
			if err != nil || at.Msg.GetApproximateMessages() != 0 {
				t.Fatalf("GetQueueAttributes(q) after purge: %v, %v", at, err)
			}
			if _, err := c.DeleteQueue(ctx, connect.NewRequest(&skiffv1.DeleteQueueRequest{Name: "q"})); err != nil {
				t.Fatalf("DeleteQueue(q): %v", err)
			}
			_, err = c.SendMessage(ctx, connect.NewRequest(&skiffv1.SendMessageRequest{Queue: "q", Body: "x"}))
			if connect.CodeOf(err) != connect.CodeNotFound {
				t.Fatalf("SendMessage to a deleted queue: got %v, want NotFound", err)
			}
		})
	}
}

func TestMetrics(t *testing.T) {
	e := newEnv(t)
	reg := prometheus.NewRegistry()
	m, err := New(testCtx(t), e.st.JetStream(), Config{Now: e.clock.Now, Registry: reg, SweepInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	if _, err := m.Create(testCtx(t), &skiffv1.CreateQueueRequest{Name: "q"}); err != nil {
		t.Fatal(err)
	}
	for _, b := range []string{"a", "b", "c"} {
		sendReq(t, m, &skiffv1.SendMessageRequest{Queue: "q", Body: b})
	}
	receive(t, m, "q", 1)
	e.clock.Advance(7 * time.Second)
	for _, tt := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"skiff_queue_messages", map[string]string{"queue": "q", "state": "visible"}, 2},
		{"skiff_queue_messages", map[string]string{"queue": "q", "state": "in_flight"}, 1},
		{"skiff_queue_messages", map[string]string{"queue": "q", "state": "delayed"}, 0},
		{"skiff_queue_oldest_message_age_seconds", map[string]string{"queue": "q"}, 7},
		{"skiff_queue_messages_sent_total", map[string]string{"queue": "q"}, 3},
		{"skiff_queue_messages_received_total", map[string]string{"queue": "q"}, 1},
	} {
		got, ok := gathered(t, reg, tt.name, tt.labels)
		if !ok || got != tt.want {
			t.Errorf("%s%v: got %v (found %v), want %v", tt.name, tt.labels, got, ok, tt.want)
		}
	}
}

// gathered returns the value of one series.
func gathered(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) (float64, bool) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("Gather: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	series:
		for _, m := range mf.GetMetric() {
			if len(m.GetLabel()) != len(labels) {
				continue
			}
			for _, l := range m.GetLabel() {
				if labels[l.GetName()] != l.GetValue() {
					continue series
				}
			}
			if m.GetGauge() != nil {
				return m.GetGauge().GetValue(), true
			}
			return m.GetCounter().GetValue(), true
		}
	}
	return 0, false
}

func TestLongPollCanceled(t *testing.T) {
	e := newEnv(t)
	e.create(t, "q", nil)
	ctx, cancel := context.WithCancel(testCtx(t))
	done := make(chan error, 1)
	go func() {
		_, err := e.m.Receive(ctx, &skiffv1.ReceiveMessageRequest{Queue: "q", WaitSeconds: i32(20)})
		done <- err
	}()
	cancel()
	select {
	case err := <-done:
		wantKind(t, "canceled long poll", err, errs.KindCanceled)
	case <-time.After(10 * time.Second):
		t.Fatal("canceled long poll did not return")
	}
}

// TestFIFOConcurrentTwoManagers checks, with receivers on two gateways at
// once, that each group is delivered in order, every message once, and
// never with two batches of a group in flight.
func TestFIFOConcurrentTwoManagers(t *testing.T) {
	e := newEnv(t)
	other := e.manager(t)
	e.create(t, "q.fifo", &skiffv1.QueueConfig{Fifo: true, ContentBasedDeduplication: true})
	groups := []string{"g0", "g1", "g2"}
	const per = 30
	for i := range per {
		for _, g := range groups {
			sendReq(t, e.m, &skiffv1.SendMessageRequest{Queue: "q.fifo", Body: g + "-" + itoa(i), MessageGroupId: g})
		}
	}
	eventually(t, "the second manager sees every message", func() bool {
		a, err := other.Attributes(testCtx(t), "q.fifo")
		return err == nil && a.GetApproximateMessages() == int64(per*len(groups))
	})
	var mu sync.Mutex
	holder := map[string]int{} // group -> receiver holding a batch of it
	order := map[string][]string{}
	var wg sync.WaitGroup
	for w := range 6 {
		m := e.m
		if w%2 == 1 {
			m = other
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			idle := 0
			for idle < 20 {
				msgs, err := m.Receive(testCtx(t), &skiffv1.ReceiveMessageRequest{Queue: "q.fifo", MaxMessages: 4, WaitSeconds: i32(0)})
				if err != nil {
					t.Errorf("Receive: %v", err)
					return
				}
				if len(msgs) == 0 {
					idle++
					time.Sleep(time.Millisecond) // pacing an idle worker, not synchronisation
					continue
				}
				idle = 0
				last := map[string]int{}
				mu.Lock()
				for i, msg := range msgs {
					g := msg.GetAttributes()["MessageGroupId"]
					if h, ok := holder[g]; ok && h != w+1 {
						t.Errorf("group %s delivered to receiver %d while receiver %d holds a batch", g, w+1, h)
					}
					holder[g] = w + 1
					order[g] = append(order[g], msg.GetBody())
					last[g] = i
				}
				mu.Unlock()
				for i, msg := range msgs {
					g := msg.GetAttributes()["MessageGroupId"]
					if last[g] == i {
						mu.Lock()
						delete(holder, g)
						mu.Unlock()
					}
					if err := m.Delete(testCtx(t), "q.fifo", msg.GetReceiptHandle()); err != nil {
						t.Errorf("Delete: %v", err)
					}
				}
			}
		}()
	}
	wg.Wait()
	for _, g := range groups {
		var want []string
		for i := range per {
			want = append(want, g+"-"+itoa(i))
		}
		if got := order[g]; strings.Join(got, ",") != strings.Join(want, ",") {
			t.Errorf("group %s order:\n got %v\nwant %v", g, got, want)
		}
	}
}

func itoa(i int) string { return strconv.Itoa(i) }
