package agent

import (
	"context"
	"errors"
	"slices"
	"testing"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

// TestCapacityAndDrain: Capacity follows the ledger, the sandboxes and the
// code cache; Changes fires on changes; the Drain RPC refuses new
// invocations with reason "draining" and Status shows it.
func TestCapacityAndDrain(t *testing.T) {
	a, digest := newAgent(t, "skiff-capacitytest")
	c := a.Capacity()
	if c.MemoryTotalMB != 2048 || c.MemoryFreeMB != 2048 || c.Sandboxes != 0 || c.CPUTotalMilli <= 0 || len(c.CodeDigests) != 0 {
		t.Fatalf("capacity of an empty agent: %+v", c)
	}
	drainChanges(a)
	a.invoke(t, spec("fn", "k1", digest), `{}`)
	select {
	case <-a.Changes():
	default:
		t.Error("no change signalled after an invocation")
	}
	c = a.Capacity()
	if c.Sandboxes != 1 || c.Idle != 1 || c.Busy != 0 || c.WarmIdle["k1"] != 1 || c.MemoryFreeMB != 2048-128 || !slices.Contains(c.CodeDigests, digest) {
		t.Errorf("capacity after one invocation: %+v", c)
	}

	resp, err := a.Drain(context.Background(), connect.NewRequest(&skiffv1.DrainRequest{Wait: true}))
	if err != nil || resp.Msg.GetInFlight() != 0 {
		t.Fatalf("drain: %v in flight %d", err, resp.Msg.GetInFlight())
	}
	select {
	case <-a.DrainStarted():
	default:
		t.Error("DrainStarted not closed after Drain")
	}
	_, err = a.Invoke(context.Background(), connect.NewRequest(&skiffv1.AgentInvokeRequest{Spec: spec("fn", "k1", digest), RequestId: "r"}))
	var e *errs.Error
	if !errors.As(err, &e) || e.Kind != errs.KindUnavailable || e.Reason != "draining" {
		t.Errorf("invoke after drain: %v, want Unavailable draining", err)
	}
	st, err := a.Status(context.Background(), connect.NewRequest(&skiffv1.StatusRequest{}))
	if err != nil || !st.Msg.GetDraining() {
		t.Errorf("status after drain: %v draining=%v", err, st.Msg.GetDraining())
	}
	a.StartDrain() // idempotent
}

func drainChanges(a *Agent) {
	for {
		select {
		case <-a.Changes():
		default:
			return
		}
	}
}
