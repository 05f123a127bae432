package queue

import (
	"context"
	"sync"
	"testing"

	"github.com/nats-io/nats.go/jetstream"
)

// laggingReplica is the stream as a replica that has not yet applied the
// newest messages answers direct gets: "not found" for the first read of
// every sequence (the real stream answers every later one).
type laggingReplica struct {
	jetstream.Stream

	mu   sync.Mutex
	seen map[uint64]bool // guarded by mu
	lags int             // guarded by mu: reads answered "not found"
}

func (l *laggingReplica) GetMsg(ctx context.Context, seq uint64, opts ...jetstream.GetMsgOpt) (*jetstream.RawStreamMsg, error) {
	l.mu.Lock()
	first := !l.seen[seq]
	l.seen[seq] = true
	if first {
		l.lags++
	}
	l.mu.Unlock()
	if first {
		return nil, jetstream.ErrMsgNotFound
	}
	return l.Stream.GetMsg(ctx, seq, opts...)
}

func (l *laggingReplica) Lags() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lags
}

// TestReceiveAfterLaggingReplica: a claim whose direct get meets a replica
// that has not applied the message yet (on a cluster, a receive right after
// the send it was woken by) still receives the message: the not-found is
// confirmed by the stream leader. Before, the claim took the message for
// deleted, dropped its state and the index forgot it for good, while the
// message stayed in the stream (an OnSuccess record lost in e2e
// TestCluster/GatewayKill). A message really deleted from the stream still
// counts as gone.
func TestReceiveAfterLaggingReplica(t *testing.T) {
	e := newEnv(t)
	e.create(t, "lag", nil)
	lag := &laggingReplica{Stream: e.m.stream, seen: map[uint64]bool{}}
	e.m.stream = lag

	e.send(t, "lag", "one")
	got := receive(t, e.m, "lag", 10)
	if lag.Lags() != 1 {
		t.Fatalf("the replica answered %d reads not found, want 1", lag.Lags())
	}
	if len(got) != 1 || got[0].GetBody() != "one" {
		t.Fatalf("receive after a lagging read: %v, want [one]", bodies(got))
	}
	if err := e.m.Delete(testCtx(t), "lag", got[0].GetReceiptHandle()); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if a := e.attrs(t, "lag"); a[0] != 0 || a[1] != 0 {
		t.Fatalf("attributes after the delete: %v, want an empty queue", a)
	}

	// Deleted from the stream behind the index's back: gone for the
	// leader too, so the claim drops it.
	resp := e.send(t, "lag", "two")
	info, err := e.m.stream.Info(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := e.m.stream.DeleteMsg(testCtx(t), info.State.LastSeq); err != nil {
		t.Fatalf("DeleteMsg: %v", err)
	}
	if got := receive(t, e.m, "lag", 10); len(got) != 0 {
		t.Fatalf("receive of a deleted message (id %s): %v, want none", resp.GetMessageId(), bodies(got))
	}
	if a := e.attrs(t, "lag"); a[0] != 0 || a[1] != 0 {
		t.Fatalf("attributes after the deleted message was dropped: %v, want an empty queue", a)
	}
}
