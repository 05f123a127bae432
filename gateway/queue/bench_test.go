package queue

import (
	"testing"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
)

// BenchmarkSend measures a durable SendMessage (the engine's default sync).
func BenchmarkSend(b *testing.B) {
	e := newEnv(b)
	e.create(b, "q", nil)
	req := &skiffv1.SendMessageRequest{Queue: "q", Body: "benchmark message body of a modest size"}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := e.m.Send(testCtx(b), req); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSendReceiveDelete measures one message's whole life: send,
// receive, delete.
func BenchmarkSendReceiveDelete(b *testing.B) {
	e := newEnv(b)
	e.create(b, "q", nil)
	req := &skiffv1.SendMessageRequest{Queue: "q", Body: "benchmark message body of a modest size"}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := e.m.Send(testCtx(b), req); err != nil {
			b.Fatal(err)
		}
		msgs := receive(b, e.m, "q", 1)
		if len(msgs) != 1 {
			b.Fatalf("received %d messages, want 1", len(msgs))
		}
		if err := e.m.Delete(testCtx(b), "q", msgs[0].GetReceiptHandle()); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReceiveBatch10 measures receiving and batch-deleting 10 at a time.
func BenchmarkReceiveBatch10(b *testing.B) {
	e := newEnv(b)
	e.create(b, "q", nil)
	var entries []*skiffv1.SendMessageBatchEntry
	for i := range 10 {
		entries = append(entries, &skiffv1.SendMessageBatchEntry{Id: itoa(i), Body: "benchmark message"})
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := e.m.SendBatch(testCtx(b), &skiffv1.SendMessageBatchRequest{Queue: "q", Entries: entries}); err != nil {
			b.Fatal(err)
		}
		msgs := receive(b, e.m, "q", 10)
		var del []*skiffv1.DeleteMessageBatchEntry
		for i, m := range msgs {
			del = append(del, &skiffv1.DeleteMessageBatchEntry{Id: itoa(i), ReceiptHandle: m.GetReceiptHandle()})
		}
		if len(del) == 0 {
			b.Fatal("received nothing")
		}
		if _, err := e.m.DeleteBatch(testCtx(b), &skiffv1.DeleteMessageBatchRequest{Queue: "q", Entries: del}); err != nil {
			b.Fatal(err)
		}
	}
}
