package destinations

import (
	"context"
	"testing"
	"time"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/queue"
	"skiff.dev/skiff/gateway/store"
	"skiff.dev/skiff/internal/errs"
)

// TestRealQueueDestination delivers records to gateway/queue on a real
// embedded JetStream: what the queue stores is the encoded record, a missing
// queue is refused at validation, and on a FIFO queue a record delivered twice
// (at-least-once processing) is stored once.
func TestRealQueueDestination(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := store.Open(ctx, store.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatalf("store.Open: %v", err)
	}
	t.Cleanup(func() { _ = st.Close() })
	qm, err := queue.New(ctx, st.JetStream(), queue.Config{})
	if err != nil {
		t.Fatalf("queue.New: %v", err)
	}
	t.Cleanup(func() { _ = qm.Close() })
	for _, req := range []*skiffv1.CreateQueueRequest{
		{Name: "records"},
		{Name: "records.fifo", Config: &skiffv1.QueueConfig{Fifo: true}},
	} {
		if _, err := qm.Create(ctx, req); err != nil {
			t.Fatalf("creating queue %s: %v", req.Name, err)
		}
	}
	w, _ := newWriter(t, Config{}, qm, nil)

	for _, target := range []string{"queue:records", "queue:records.fifo"} {
		if err := w.Validate(ctx, target); err != nil {
			t.Errorf("Validate(%q) = %v, want nil", target, err)
		}
	}
	if err := w.Validate(ctx, "queue:missing"); !errs.IsNotFound(err) {
		t.Errorf("Validate(queue:missing) = %v, want not_found", err)
	}

	rec := testRecord()
	want, err := rec.Encode()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"records", "records.fifo"} {
		for range 2 {
			if err := w.Deliver(ctx, "queue:"+name, 0, rec); err != nil {
				t.Fatalf("Deliver to %s: %v", name, err)
			}
		}
		wantN := int64(2)
		if name == "records.fifo" {
			wantN = 1 // deduplicated by request id and condition
		}
		attrs, err := qm.Attributes(ctx, name)
		if err != nil {
			t.Fatalf("Attributes of %s: %v", name, err)
		}
		if got := attrs.GetApproximateMessages() + attrs.GetApproximateMessagesNotVisible() + attrs.GetApproximateMessagesDelayed(); got != wantN {
			t.Errorf("%s holds %d messages, want %d", name, got, wantN)
		}
		wait := int32(5)
		msgs, err := qm.Receive(ctx, &skiffv1.ReceiveMessageRequest{Queue: name, MaxMessages: 1, WaitSeconds: &wait})
		if err != nil {
			t.Fatalf("Receive from %s: %v", name, err)
		}
		if len(msgs) != 1 {
			t.Fatalf("Receive from %s returned %d messages, want 1", name, len(msgs))
		}
		for _, m := range msgs {
			if m.GetBody() != string(want) {
				t.Errorf("%s message body = %s, want %s", name, m.GetBody(), want)
			}
		}
	}
}
