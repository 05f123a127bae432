package queue

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/store"
	"skiff.dev/skiff/internal/errs"
)

// clock is an injected clock tests move by hand.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock() *clock { return &clock{now: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

func testCtx(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

type env struct {
	st    *store.Store
	m     *Manager
	clock *clock
	dir   string
}

// newEnv opens a store in a temp dir and a Manager on it with a fake clock.
func newEnv(t testing.TB) *env {
	t.Helper()
	e := &env{clock: newClock(), dir: t.TempDir()}
	st, err := store.Open(testCtx(t), store.Config{DataDir: e.dir})
	if err != nil {
		t.Fatalf("store.Open: %v", err)
	}
	t.Cleanup(func() { _ = st.Close() })
	e.st = st
	e.m = e.manager(t)
	return e
}

// manager opens another Manager on the env's store (a second gateway: its
// own index and watchers).
func (e *env) manager(t testing.TB) *Manager {
	t.Helper()
	m, err := New(testCtx(t), e.st.JetStream(), Config{Now: e.clock.Now, SweepInterval: time.Hour})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = m.Close() })
	return m
}

func (e *env) create(t testing.TB, name string, cfg *skiffv1.QueueConfig) *skiffv1.Queue {
	t.Helper()
	q, err := e.m.Create(testCtx(t), &skiffv1.CreateQueueRequest{Name: name, Config: cfg})
	if err != nil {
		t.Fatalf("Create(%s): %v", name, err)
	}
	return q
}

func (e *env) send(t testing.TB, queue, body string) *skiffv1.SendMessageResponse {
	t.Helper()
	return sendReq(t, e.m, &skiffv1.SendMessageRequest{Queue: queue, Body: body})
}

func sendReq(t testing.TB, m *Manager, req *skiffv1.SendMessageRequest) *skiffv1.SendMessageResponse {
	t.Helper()
	resp, err := m.Send(testCtx(t), req)
	if err != nil {
		t.Fatalf("Send(%s, %q): %v", req.GetQueue(), req.GetBody(), err)
	}
	return resp
}

// receive does a short-poll receive of up to n messages.
func receive(t testing.TB, m *Manager, queue string, n int32) []*skiffv1.Message {
	t.Helper()
	msgs, err := m.Receive(testCtx(t), &skiffv1.ReceiveMessageRequest{Queue: queue, MaxMessages: n, WaitSeconds: proto.Int32(0)})
	if err != nil {
		t.Fatalf("Receive(%s): %v", queue, err)
	}
	return msgs
}

func bodies(msgs []*skiffv1.Message) []string {
	out := make([]string, len(msgs))
	for i, m := range msgs {
		out[i] = m.GetBody()
	}
	return out
}

func wantInvalid(t testing.TB, what string, err error, field string) {
	t.Helper()
	var e *errs.Error
	if !errs.IsInvalid(err) || !asErr(err, &e) || e.Field != field {
		t.Fatalf("%s: got error %v (field %q), want InvalidArgument on field %q", what, err, fieldOf(err), field)
	}
}

func wantKind(t testing.TB, what string, err error, kind errs.Kind) {
	t.Helper()
	if got := errs.KindOf(err); err == nil || got != kind {
		t.Fatalf("%s: got error %v (kind %v), want kind %v", what, err, got, kind)
	}
}

func wantReason(t testing.TB, what string, err error, reason string) {
	t.Helper()
	var e *errs.Error
	if !asErr(err, &e) || e.Reason != reason {
		t.Fatalf("%s: got error %v, want reason %q", what, err, reason)
	}
}

func fieldOf(err error) string {
	var e *errs.Error
	if asErr(err, &e) {
		return e.Field
	}
	return ""
}

// attrs returns a queue's attribute counts.
func (e *env) attrs(t testing.TB, name string) [4]int64 {
	t.Helper()
	a, err := e.m.Attributes(testCtx(t), name)
	if err != nil {
		t.Fatalf("Attributes(%s): %v", name, err)
	}
	return [4]int64{a.GetApproximateMessages(), a.GetApproximateMessagesNotVisible(), a.GetApproximateMessagesDelayed(), a.GetOldestMessageAgeSeconds()}
}

// eventually polls cond until it holds or 10 s pass.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not true after 10s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func asErr(err error, target **errs.Error) bool { return errors.As(err, target) }

// storeOpen opens a store on dir and closes it at the end of the test.
func storeOpen(t testing.TB, dir string) (*store.Store, error) {
	t.Helper()
	st, err := store.Open(testCtx(t), store.Config{DataDir: dir})
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { _ = st.Close() })
	return st, nil
}
