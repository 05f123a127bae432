package errs

import (
	"context"
	"errors"
	"strconv"

	"connectrpc.com/connect"
)

var toCode = map[Kind]connect.Code{
	KindUnknown:            connect.CodeUnknown,
	KindInvalidArgument:    connect.CodeInvalidArgument,
	KindNotFound:           connect.CodeNotFound,
	KindAlreadyExists:      connect.CodeAlreadyExists,
	KindConflict:           connect.CodeAborted,
	KindThrottled:          connect.CodeResourceExhausted,
	KindResourceExhausted:  connect.CodeResourceExhausted,
	KindUnauthenticated:    connect.CodeUnauthenticated,
	KindPermissionDenied:   connect.CodePermissionDenied,
	KindUnavailable:        connect.CodeUnavailable,
	KindDeadlineExceeded:   connect.CodeDeadlineExceeded,
	KindCanceled:           connect.CodeCanceled,
	KindInternal:           connect.CodeInternal,
	KindFailedPrecondition: connect.CodeFailedPrecondition,
}

// Metadata keys carried on RPC errors.
const (
	HeaderReason     = "Skiff-Error-Reason"
	HeaderField      = "Skiff-Error-Field"
	HeaderRetryAfter = "Retry-After-Ms"
)

// ToConnect maps err to a *connect.Error with the stable reason, the field
// and the retry hint in its metadata. Context errors map to Canceled and
// DeadlineExceeded; anything without a kind becomes Internal.
func ToConnect(err error) *connect.Error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		return ce
	}
	var e *Error
	if !errors.As(err, &e) {
		switch {
		case errors.Is(err, context.Canceled):
			return connect.NewError(connect.CodeCanceled, err)
		case errors.Is(err, context.DeadlineExceeded):
			return connect.NewError(connect.CodeDeadlineExceeded, err)
		}
		return connect.NewError(connect.CodeInternal, err)
	}
	out := connect.NewError(toCode[e.Kind], err)
	if e.Reason != "" {
		out.Meta().Set(HeaderReason, e.Reason)
	}
	if e.Field != "" {
		out.Meta().Set(HeaderField, e.Field)
	}
	if e.Retry > 0 {
		out.Meta().Set(HeaderRetryAfter, strconv.FormatInt(e.Retry.Milliseconds(), 10))
	}
	return out
}

// FromConnect turns an error received from a Connect call back into an
// *Error with the kind, reason, field and retry hint it was sent with.
func FromConnect(err error) error {
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return err
	}
	kind := KindUnknown
	for k, c := range toCode {
		if c == ce.Code() && k != KindResourceExhausted && k != KindThrottled {
			kind = k
		}
	}
	reason := ce.Meta().Get(HeaderReason)
	if ce.Code() == connect.CodeResourceExhausted {
		kind = KindResourceExhausted
		if reason == "throttled" {
			kind = KindThrottled
		}
	}
	if ce.Code() == connect.CodeAborted {
		kind = KindConflict
	}
	e := &Error{Kind: kind, Fault: defaultFault(kind), Reason: reason, Field: ce.Meta().Get(HeaderField), err: errors.New(ce.Message())}
	if ms, perr := strconv.ParseInt(ce.Meta().Get(HeaderRetryAfter), 10, 64); perr == nil {
		e.Retry = msDuration(ms)
	}
	return e
}

// Interceptor returns a Connect interceptor that maps handler errors with
// ToConnect, so handlers return plain errors of this package.
func Interceptor() connect.Interceptor { return interceptor{} }

type interceptor struct{}

func (interceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		resp, err := next(ctx, req)
		if err != nil {
			return nil, ToConnect(err)
		}
		return resp, nil
	}
}

func (interceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (interceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		if err := next(ctx, conn); err != nil {
			return ToConnect(err)
		}
		return nil
	}
}
