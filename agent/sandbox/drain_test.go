package sandbox

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"skiff.dev/skiff/agent/placement"
	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

// TestDrain: after Drain new invocations fail with Unavailable "draining"
// (warm sandbox or not), the in-flight one finishes, and WaitIdle returns
// once it did.
func TestDrain(t *testing.T) {
	m, _, _ := newTestManager(t, 1024)
	invoke(t, m, spec("fn", "k1", 10), `{}`) // a warm sandbox
	if err := m.WaitIdle(context.Background()); err != nil {
		t.Fatalf("WaitIdle with nothing in flight: %v", err)
	}
	slow := make(chan *skiffv1.AgentInvokeResponse, 1)
	go func() { slow <- invoke(t, m, spec("fn", "k2", 10), `{"action":"sleep","sleep":"1s"}`) }()
	deadline := time.Now().Add(10 * time.Second)
	for m.InFlight() != 1 {
		if time.Now().After(deadline) {
			t.Fatal("the slow invocation never started")
		}
		time.Sleep(time.Millisecond) // polling a condition, with a deadline
	}
	m.Drain()
	if !m.Draining() {
		t.Error("Draining() false after Drain")
	}
	for _, key := range []string{"k1", "k3"} { // warm and cold
		_, err := m.Invoke(context.Background(), &skiffv1.AgentInvokeRequest{Spec: spec("fn", key, 10), RequestId: "r-" + key})
		var e *errs.Error
		if !errs.Is(err, errs.KindUnavailable) || !errors.As(err, &e) || e.Reason != "draining" {
			t.Errorf("invoke %s while draining: %v, want Unavailable draining", key, err)
		}
	}
	// WaitIdle honours its context while the invocation runs.
	short, cancel := context.WithTimeout(context.Background(), time.Millisecond)
	defer cancel()
	if err := m.WaitIdle(short); err == nil {
		t.Error("WaitIdle returned nil while an invocation was in flight")
	}
	if err := m.WaitIdle(context.Background()); err != nil {
		t.Fatal(err)
	}
	if m.InFlight() != 0 {
		t.Errorf("%d in flight after WaitIdle", m.InFlight())
	}
	select {
	case r := <-slow:
		if string(r.GetPayload()) != `{"slept":"1s"}` {
			t.Errorf("in-flight invocation answered %s", r.GetPayload())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the in-flight invocation did not return")
	}
}

// TestOnChange: every state change is reported.
func TestOnChange(t *testing.T) {
	var n atomic.Int64
	m, err := New(Config{Launcher: &procLauncher{}, Code: testCode(t), Ledger: placement.NewLedger(512), Host: "test",
		OnChange: func() { n.Add(1) }})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close(context.Background())
	invoke(t, m, spec("fn", "k1", 10), `{}`)
	// starting, initializing, busy, idle
	if got := n.Load(); got < 4 {
		t.Errorf("%d changes reported for a cold invocation, want at least 4", got)
	}
	before := n.Load()
	m.Retire("fn", "")
	if n.Load() <= before {
		t.Error("retiring the idle sandbox reported no change")
	}
}

// TestWarmOnly: a warm-only invocation runs on an idle sandbox of its
// config key and, with none, is refused with reason no_warm_sandbox
// without starting one.
func TestWarmOnly(t *testing.T) {
	m, _, _ := newTestManager(t, 1024)
	_, err := m.Invoke(context.Background(), &skiffv1.AgentInvokeRequest{Spec: spec("fn", "k1", 10), RequestId: "r-cold", WarmOnly: true})
	var e *errs.Error
	if !errs.Is(err, errs.KindFailedPrecondition) || !errors.As(err, &e) || e.Reason != "no_warm_sandbox" {
		t.Fatalf("warm-only with nothing idle: %v, want FailedPrecondition no_warm_sandbox", err)
	}
	if n := len(m.Sandboxes()); n != 0 {
		t.Fatalf("%d sandboxes after a refused warm-only invocation, want none started", n)
	}
	invoke(t, m, spec("fn", "k1", 10), `{}`) // a warm sandbox
	resp, err := m.Invoke(context.Background(), &skiffv1.AgentInvokeRequest{Spec: spec("fn", "k1", 10), RequestId: "r-warm", WarmOnly: true, Payload: []byte(`{}`)})
	if err != nil {
		t.Fatalf("warm-only with an idle sandbox: %v", err)
	}
	if resp.GetFunctionError() != "" {
		t.Fatalf("warm-only invocation failed: %s", resp.GetPayload())
	}
}
