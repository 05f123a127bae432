package errs

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"connectrpc.com/connect"
)

func TestKindsAndWrapping(t *testing.T) {
	cause := errors.New("disk on fire")
	err := fmt.Errorf("saving: %w", Unavailable("store: %w", cause))
	if !Is(err, KindUnavailable) || !errors.Is(err, cause) {
		t.Fatalf("kind %v, wraps cause %v", KindOf(err), errors.Is(err, cause))
	}
	if KindOf(errors.New("plain")) != KindUnknown || Is(nil, KindUnknown) {
		t.Fatal("plain errors and nil have no kind")
	}
	inv := Invalid("memory_mb", "memory_mb %d is outside %d-%d", 64, 128, 10240)
	if !IsInvalid(inv) || inv.Field != "memory_mb" || inv.Reason != "invalid_memory_mb" || inv.Fault != FaultCaller {
		t.Fatalf("invalid: %+v", inv)
	}
}

func TestConnectRoundTrip(t *testing.T) {
	tests := []struct {
		err  error
		code connect.Code
		kind Kind
	}{
		{Invalid("name", "bad name"), connect.CodeInvalidArgument, KindInvalidArgument},
		{NotFound("function x"), connect.CodeNotFound, KindNotFound},
		{Conflict("changed"), connect.CodeAborted, KindConflict},
		{Throttled(250*time.Millisecond, "rate exceeded"), connect.CodeResourceExhausted, KindThrottled},
		{New(KindResourceExhausted, "host full"), connect.CodeResourceExhausted, KindResourceExhausted},
		{New(KindPermissionDenied, "no"), connect.CodePermissionDenied, KindPermissionDenied},
		{Unavailable("agent lost"), connect.CodeUnavailable, KindUnavailable},
		{errors.New("bug"), connect.CodeInternal, KindInternal},
		{context.DeadlineExceeded, connect.CodeDeadlineExceeded, KindDeadlineExceeded},
	}
	for _, tc := range tests {
		ce := ToConnect(tc.err)
		if ce.Code() != tc.code {
			t.Errorf("%v: code %v, want %v", tc.err, ce.Code(), tc.code)
		}
		back := FromConnect(ce)
		if KindOf(back) != tc.kind {
			t.Errorf("%v: back to kind %v, want %v", tc.err, KindOf(back), tc.kind)
		}
	}
	th := FromConnect(ToConnect(Throttled(250*time.Millisecond, "rate exceeded")))
	var e *Error
	if !errors.As(th, &e) || e.Retry != 250*time.Millisecond || e.Reason != "throttled" {
		t.Fatalf("throttle lost its retry hint or reason: %+v", e)
	}
	inv := FromConnect(ToConnect(Invalid("timeout_seconds", "too long")))
	if !errors.As(inv, &e) || e.Field != "timeout_seconds" {
		t.Fatalf("invalid lost its field: %+v", e)
	}
	if ToConnect(nil) != nil {
		t.Fatal("ToConnect(nil) != nil")
	}
}
