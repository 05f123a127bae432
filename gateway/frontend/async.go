package frontend

import (
	"context"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/async"
	"skiff.dev/skiff/internal/errs"
)

// AsyncRequestIDHeader lets a client choose the request id of an EVENT
// invoke, so that a retried accept (after a timeout, say) is stored once:
// a second accept of the same id within the dedup window answers 202 with
// the same id and stores nothing. Ids are 1-64 letters, digits, '-', '_'.
const AsyncRequestIDHeader = "Skiff-Request-Id"

// Async is the async invoke (*async.Service): the accept path and the
// event invoke configs.
type Async interface {
	// Accept stores an event durably and returns only then.
	Accept(ctx context.Context, function string, payload []byte, requestID string) error
	PutEventConfig(ctx context.Context, function string, c *skiffv1.EventInvokeConfig) (*skiffv1.EventInvokeConfig, error)
	// GetEventConfig returns errs.NotFound when none is set.
	GetEventConfig(ctx context.Context, function string) (*skiffv1.EventInvokeConfig, error)
	// DeleteEventConfig returns errs.NotFound when none is set.
	DeleteEventConfig(ctx context.Context, function string) error
}

// DestinationValidator checks that an event destination parses and exists
// (*destinations.Writer).
type DestinationValidator interface {
	Validate(ctx context.Context, target string) error
}

var _ Async = (*async.Service)(nil)

// invokeEvent accepts an EVENT invoke: it answers 202 with the request id
// once the event is stored.
func (f *Frontend) invokeEvent(ctx context.Context, m *skiffv1.InvokeRequest, rid string) (*skiffv1.InvokeResponse, error) {
	if f.cfg.Async == nil {
		return nil, errs.Invalid("invocation_type", "asynchronous invokes are not enabled on this gateway")
	}
	if m.GetLogType() == skiffv1.LogType_LOG_TYPE_TAIL {
		return nil, errs.Invalid("log_type", "log_type TAIL applies to synchronous invokes only")
	}
	if m.GetClientContext() != "" {
		return nil, errs.Invalid("client_context", "client_context applies to synchronous invokes only")
	}
	if rid == "" {
		rid = newRequestID()
	} else if !validRequestID(rid) {
		return nil, errs.Invalid("request_id", "request id %q is not 1-64 letters, digits, '-' or '_'", rid)
	}
	if _, err := f.st.GetFunction(ctx, m.GetFunctionName()); err != nil {
		return nil, err
	}
	if err := f.cfg.Async.Accept(ctx, m.GetFunctionName(), m.GetPayload(), rid); err != nil {
		return nil, err
	}
	return &skiffv1.InvokeResponse{StatusCode: 202, RequestId: rid}, nil
}

func validRequestID(s string) bool {
	if len(s) == 0 || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// InvokeSync runs one synchronous invocation with a given request id
// through the same admission and router path as Invoke, without API-key
// authentication: the entry point of the async pollers and the event
// source pollers. Throttles are errs.Throttled, a function error is a
// response with FunctionError set.
func (f *Frontend) InvokeSync(ctx context.Context, function string, payload []byte, requestID string) (*skiffv1.InvokeResponse, error) {
	if err := validateName("function_name", function); err != nil {
		return nil, err
	}
	if n := len(payload); n > f.cfg.MaxSyncPayload {
		return nil, errs.Invalid("payload", "request payload is %d bytes, over the %d-byte limit", n, f.cfg.MaxSyncPayload)
	}
	if requestID == "" {
		requestID = newRequestID()
	}
	fn, err := f.st.GetFunction(ctx, function)
	if err != nil {
		return nil, err
	}
	return f.runSync(ctx, fn, &skiffv1.InvokeRequest{FunctionName: function, Payload: payload}, requestID)
}

func (s *functionService) PutFunctionEventInvokeConfig(ctx context.Context, req *connect.Request[skiffv1.PutFunctionEventInvokeConfigRequest]) (*connect.Response[skiffv1.PutFunctionEventInvokeConfigResponse], error) {
	f := s.f
	name := req.Msg.GetFunctionName()
	if err := validateName("function_name", name); err != nil {
		return nil, err
	}
	if f.cfg.Async == nil {
		return nil, errs.New(errs.KindFailedPrecondition, "asynchronous invokes are not enabled on this gateway")
	}
	c := req.Msg.GetConfig()
	if err := async.ValidateEventConfig(c); err != nil {
		return nil, err
	}
	if _, err := f.st.GetFunction(ctx, name); err != nil {
		return nil, err
	}
	for _, t := range []struct{ field, target string }{
		{"on_success", c.GetOnSuccess()}, {"on_failure", c.GetOnFailure()}, {"dead_letter_queue", c.GetDeadLetterQueue()},
	} {
		if err := f.validateDestination(ctx, t.field, t.target); err != nil {
			return nil, err
		}
	}
	out, err := f.cfg.Async.PutEventConfig(ctx, name, c)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.PutFunctionEventInvokeConfigResponse{Config: out}), nil
}

// validateDestination checks that a destination exists; a target that
// does not parse or does not exist is an invalid field.
func (f *Frontend) validateDestination(ctx context.Context, field, target string) error {
	if target == "" {
		return nil
	}
	if f.cfg.Destinations == nil {
		return errs.Invalid(field, "%s: event destinations are not enabled on this gateway", field)
	}
	err := f.cfg.Destinations.Validate(ctx, target)
	switch {
	case err == nil:
		return nil
	case errs.IsInvalid(err), errs.IsNotFound(err):
		return errs.Invalid(field, "%s %q: %w", field, target, err)
	}
	return err
}

func (s *functionService) GetFunctionEventInvokeConfig(ctx context.Context, req *connect.Request[skiffv1.GetFunctionEventInvokeConfigRequest]) (*connect.Response[skiffv1.GetFunctionEventInvokeConfigResponse], error) {
	name := req.Msg.GetFunctionName()
	if err := s.checkEventConfigTarget(ctx, name); err != nil {
		return nil, err
	}
	c, err := s.f.cfg.Async.GetEventConfig(ctx, name)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.GetFunctionEventInvokeConfigResponse{Config: c}), nil
}

func (s *functionService) DeleteFunctionEventInvokeConfig(ctx context.Context, req *connect.Request[skiffv1.DeleteFunctionEventInvokeConfigRequest]) (*connect.Response[skiffv1.DeleteFunctionEventInvokeConfigResponse], error) {
	name := req.Msg.GetFunctionName()
	if err := s.checkEventConfigTarget(ctx, name); err != nil {
		return nil, err
	}
	if err := s.f.cfg.Async.DeleteEventConfig(ctx, name); err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.DeleteFunctionEventInvokeConfigResponse{}), nil
}

// checkEventConfigTarget checks the function of a Get or Delete of its
// event invoke config.
func (s *functionService) checkEventConfigTarget(ctx context.Context, name string) error {
	if err := validateName("function_name", name); err != nil {
		return err
	}
	if s.f.cfg.Async == nil {
		return errs.New(errs.KindFailedPrecondition, "asynchronous invokes are not enabled on this gateway")
	}
	_, err := s.f.st.GetFunction(ctx, name)
	return err
}

// deleteEventConfig removes a deleted function's event invoke config.
func (f *Frontend) deleteEventConfig(ctx context.Context, name string) {
	if f.cfg.Async == nil {
		return
	}
	if err := f.cfg.Async.DeleteEventConfig(ctx, name); err != nil && !errs.IsNotFound(err) {
		f.log.Warn("deleting the event invoke config of a deleted function", "function", name, "err", err)
	}
}
