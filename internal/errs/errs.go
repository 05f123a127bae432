// Package errs is skiff's one error taxonomy: a small set of kinds (not
// found, conflict, invalid argument, throttled, ...) and where a fault lies
// (the caller, the platform, or the function). Errors are plain Go errors
// wrapped with %w; the kind travels with them and is mapped to a
// connect.Code exactly once, at the RPC boundary (see ToConnect).
package errs

import (
	"errors"
	"fmt"
	"time"
)

// Kind classifies an error.
type Kind int

// The kinds of error.
const (
	KindUnknown Kind = iota
	KindInvalidArgument
	KindNotFound
	KindAlreadyExists
	KindConflict
	KindThrottled
	KindResourceExhausted
	KindUnauthenticated
	KindPermissionDenied
	KindUnavailable
	KindDeadlineExceeded
	KindCanceled
	KindInternal
	KindFailedPrecondition
)

var kindNames = map[Kind]string{
	KindUnknown:            "unknown",
	KindInvalidArgument:    "invalid_argument",
	KindNotFound:           "not_found",
	KindAlreadyExists:      "already_exists",
	KindConflict:           "conflict",
	KindThrottled:          "throttled",
	KindResourceExhausted:  "resource_exhausted",
	KindUnauthenticated:    "unauthenticated",
	KindPermissionDenied:   "permission_denied",
	KindUnavailable:        "unavailable",
	KindDeadlineExceeded:   "deadline_exceeded",
	KindCanceled:           "canceled",
	KindInternal:           "internal",
	KindFailedPrecondition: "failed_precondition",
}

func (k Kind) String() string { return kindNames[k] }

// Fault says who is to blame for an error (as the Runtime Interface
// Emulator's error classes do).
type Fault int

// Where a fault lies.
const (
	FaultUnknown Fault = iota
	FaultCaller
	FaultPlatform
	FaultFunction
)

// Error is an error with a kind, a stable machine-readable reason and an
// optional retry hint.
type Error struct {
	Kind   Kind
	Fault  Fault
	Reason string        // stable, machine-readable, e.g. "throttled"
	Field  string        // the offending input field, for InvalidArgument
	Retry  time.Duration // a retry hint, when positive
	err    error
}

func (e *Error) Error() string { return e.err.Error() }

// Unwrap returns the error wrapped with %w, if any.
func (e *Error) Unwrap() error { return errors.Unwrap(e.err) }

// New makes an error of a kind with a formatted message. A %w verb in the
// format wraps its argument.
func New(kind Kind, format string, args ...any) *Error {
	return &Error{Kind: kind, Fault: defaultFault(kind), Reason: kind.String(), err: fmt.Errorf(format, args...)}
}

func defaultFault(k Kind) Fault {
	switch k {
	case KindInvalidArgument, KindNotFound, KindAlreadyExists, KindConflict,
		KindUnauthenticated, KindPermissionDenied, KindFailedPrecondition:
		return FaultCaller
	case KindUnavailable, KindInternal, KindResourceExhausted, KindThrottled:
		return FaultPlatform
	}
	return FaultUnknown
}

// Invalid reports bad input in a named field.
func Invalid(field, format string, args ...any) *Error {
	e := New(KindInvalidArgument, format, args...)
	e.Field = field
	e.Reason = "invalid_" + field
	if field == "" {
		e.Reason = "invalid_argument"
	}
	return e
}

// NotFound reports a missing resource.
func NotFound(format string, args ...any) *Error { return New(KindNotFound, format, args...) }

// Conflict reports a lost race: a revision did not match.
func Conflict(format string, args ...any) *Error { return New(KindConflict, format, args...) }

// Throttled reports a concurrency limit hit, with a retry hint.
func Throttled(retry time.Duration, format string, args ...any) *Error {
	e := New(KindThrottled, format, args...)
	e.Reason = "throttled"
	e.Retry = retry
	return e
}

// Unavailable reports a platform component that cannot serve now.
func Unavailable(format string, args ...any) *Error { return New(KindUnavailable, format, args...) }

// Internal reports a platform bug or an unexpected failure.
func Internal(format string, args ...any) *Error { return New(KindInternal, format, args...) }

// WithReason sets the stable reason and returns e.
func (e *Error) WithReason(reason string) *Error { e.Reason = reason; return e }

// KindOf returns the kind of the first *Error in err's chain, or KindUnknown.
func KindOf(err error) Kind {
	var e *Error
	if errors.As(err, &e) {
		return e.Kind
	}
	return KindUnknown
}

// Is reports whether err's chain holds an *Error of kind k.
func Is(err error, k Kind) bool { return err != nil && KindOf(err) == k }

// IsNotFound reports whether err is a not-found error.
func IsNotFound(err error) bool { return Is(err, KindNotFound) }

// IsConflict reports whether err is a conflict error.
func IsConflict(err error) bool { return Is(err, KindConflict) }

// IsInvalid reports whether err is an invalid-argument error.
func IsInvalid(err error) bool { return Is(err, KindInvalidArgument) }

// IsThrottled reports whether err is a throttle.
func IsThrottled(err error) bool { return Is(err, KindThrottled) }

func msDuration(ms int64) time.Duration { return time.Duration(ms) * time.Millisecond }
