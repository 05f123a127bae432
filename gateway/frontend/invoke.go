package frontend

import (
	"context"
	"encoding/base64"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/uuid"
)

const (
	// logTailBytes is how much of the log a TAIL invoke returns.
	logTailBytes = 4096
	// maxClientContext is Lambda's limit on the base64 client context.
	maxClientContext = 3583
	// RequestIDHeader carries the invocation's request id on the response.
	RequestIDHeader = "X-Amz-Request-Id"
)

// invokeService implements skiffv1connect.InvokeServiceHandler.
type invokeService struct{ f *Frontend }

var _ skiffv1connect.InvokeServiceHandler = (*invokeService)(nil)

func (s *invokeService) Invoke(ctx context.Context, req *connect.Request[skiffv1.InvokeRequest]) (*connect.Response[skiffv1.InvokeResponse], error) {
	out, err := s.f.invoke(ctx, req.Msg, req.Header().Get(AsyncRequestIDHeader))
	if err != nil {
		return nil, err
	}
	resp := connect.NewResponse(out)
	resp.Header().Set(RequestIDHeader, out.RequestId)
	return resp, nil
}

// cachedSpec is the sandbox spec of one stored revision of a function.
type cachedSpec struct {
	fn       *skiffv1.Function // the record it was built from
	revision uint64
	code     string
	modified string
	spec     *skiffv1.SandboxSpec
}

// specFor returns the sandbox spec of fn, built (and its config key
// hashed) once per stored revision. The spec is shared by concurrent
// invokes: nobody may mutate it.
func (f *Frontend) specFor(st *fnState, fn *skiffv1.Function) *skiffv1.SandboxSpec {
	if c := st.spec.Load(); c != nil && (c.fn == fn || c.revision == fn.GetRevision() && c.code == fn.GetCodeSha256() && c.modified == fn.GetLastModified()) {
		return c.spec
	}
	cfg := fn.GetConfig()
	env := make(map[string]string, len(cfg.GetEnvironment()))
	for k, v := range cfg.GetEnvironment() {
		env[k] = v
	}
	spec := &skiffv1.SandboxSpec{
		FunctionName:       fn.GetName(),
		FunctionArn:        f.arn(fn.GetName()),
		Version:            latest,
		ConfigKey:          configKey(fn),
		CodeSha256:         fn.GetCodeSha256(),
		Runtime:            cfg.GetRuntime(),
		Handler:            cfg.GetHandler(),
		MemoryMb:           cfg.GetMemoryMb(),
		TimeoutSeconds:     cfg.GetTimeoutSeconds(),
		EphemeralStorageMb: cfg.GetEphemeralStorageMb(),
		Environment:        env,
		Network:            cfg.GetNetwork(),
		NetworkAllow:       cfg.GetNetworkAllow(),
		NetworkDeny:        cfg.GetNetworkDeny(),
	}
	if spec.Network == "" { // stored before network settings existed
		spec.Network = NetworkEgress
	}
	st.spec.Store(&cachedSpec{fn: fn, revision: fn.GetRevision(), code: fn.GetCodeSha256(), modified: fn.GetLastModified(), spec: spec})
	return spec
}

// invoke validates an invoke and runs it synchronously or, for EVENT,
// accepts it into the async queues. asyncID is the client's request id of
// an EVENT invoke ("" for a new one).
func (f *Frontend) invoke(ctx context.Context, m *skiffv1.InvokeRequest, asyncID string) (*skiffv1.InvokeResponse, error) {
	name := m.GetFunctionName()
	if err := validateName("function_name", name); err != nil {
		return nil, err
	}
	if q := m.GetQualifier(); q != "" && q != latest {
		return nil, errs.NotFound("function %s has no version or alias %q: only $LATEST exists", name, q)
	}
	if n := len(m.GetPayload()); n > f.cfg.MaxSyncPayload {
		return nil, errs.Invalid("payload", "request payload is %d bytes, over the %d-byte limit", n, f.cfg.MaxSyncPayload)
	}
	switch m.GetInvocationType() {
	case skiffv1.InvocationType_INVOCATION_TYPE_UNSPECIFIED, skiffv1.InvocationType_INVOCATION_TYPE_REQUEST_RESPONSE, skiffv1.InvocationType_INVOCATION_TYPE_DRY_RUN:
		if asyncID != "" {
			return nil, errs.Invalid("request_id", "the %s header applies to EVENT invokes only", AsyncRequestIDHeader)
		}
	case skiffv1.InvocationType_INVOCATION_TYPE_EVENT:
		return f.invokeEvent(ctx, m, asyncID)
	default:
		return nil, errs.Invalid("invocation_type", "invocation_type %d is not supported: use REQUEST_RESPONSE, EVENT or DRY_RUN", m.GetInvocationType())
	}
	switch m.GetLogType() {
	case skiffv1.LogType_LOG_TYPE_UNSPECIFIED, skiffv1.LogType_LOG_TYPE_NONE, skiffv1.LogType_LOG_TYPE_TAIL:
	default:
		return nil, errs.Invalid("log_type", "log_type %d is not supported: use NONE or TAIL", m.GetLogType())
	}
	if n := len(m.GetClientContext()); n > maxClientContext {
		return nil, errs.Invalid("client_context", "client_context is %d bytes, over the %d-byte limit", n, maxClientContext)
	}
	fn, err := f.st.GetFunction(ctx, name)
	if err != nil {
		return nil, err
	}
	rid := newRequestID()
	if m.GetInvocationType() == skiffv1.InvocationType_INVOCATION_TYPE_DRY_RUN {
		return &skiffv1.InvokeResponse{StatusCode: 204, ExecutedVersion: latest, RequestId: rid}, nil
	}
	return f.runSync(ctx, fn, m, rid)
}

// runSync is the synchronous invoke path after validation: admit, run on
// the router, account, ship the log.
func (f *Frontend) runSync(ctx context.Context, fn *skiffv1.Function, m *skiffv1.InvokeRequest, rid string) (*skiffv1.InvokeResponse, error) {
	name := fn.GetName()
	st := f.state(name)
	spec := f.specFor(st, fn)
	t, err := f.adm.admit(ctx, name, st, fn.ReservedConcurrency)
	if err != nil {
		if errs.IsThrottled(err) {
			st.m.throttled.Inc()
			st.m.throttles.Inc()
		}
		return nil, err
	}
	f.met.concurrent.Inc()
	st.m.concurrent.Inc()
	start := f.now()
	out, err := f.rt.Invoke(ctx, &skiffv1.AgentInvokeRequest{
		Spec:          spec,
		RequestId:     rid,
		Payload:       m.GetPayload(),
		ClientContext: m.GetClientContext(),
		WantLog:       true,
	})
	elapsed := f.now().Sub(start)
	f.adm.release(t)
	f.met.concurrent.Dec()
	st.m.concurrent.Dec()
	st.m.duration.Observe(elapsed.Seconds())
	if err != nil {
		st.m.failed.Inc()
		st.m.errors.Inc()
		return nil, err
	}
	if out.GetFunctionError() != "" {
		st.m.failed.Inc()
		st.m.errors.Inc()
	} else {
		st.m.succeeded.Inc()
	}
	if out.GetColdStart() {
		st.m.coldStarts.Inc()
		f.met.initDuration.Observe(float64(out.GetInitDurationUs()) / 1e6)
	}
	if out.GetLog() != "" {
		f.ship.enqueue(LogEntry{Function: name, RequestID: rid, Time: f.now(), Text: out.GetLog()})
	}
	resp := &skiffv1.InvokeResponse{
		StatusCode:      200,
		Payload:         out.GetPayload(),
		FunctionError:   out.GetFunctionError(),
		ExecutedVersion: latest,
		RequestId:       rid,
	}
	if m.GetLogType() == skiffv1.LogType_LOG_TYPE_TAIL {
		resp.LogResult = logTail(out.GetLog())
	}
	return resp, nil
}

// logTail returns the base64 of the last 4 KB of a log.
func logTail(log string) string {
	if len(log) > logTailBytes {
		log = log[len(log)-logTailBytes:]
	}
	return base64.StdEncoding.EncodeToString([]byte(log))
}

// newRequestID returns a random (version 4) UUID.
func newRequestID() string { return uuid.New() }
