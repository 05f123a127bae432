package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"skiff.dev/skiff/internal/gatewayserver"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/internal/errs"
)

// fakeServer is a gateway stand-in: the generated handlers over small fakes
// that record what the CLI sent, served by httptest over HTTP/1.1 and h2c.
type fakeServer struct {
	url string
	fn  *fakeFunctions
	inv *fakeInvoke
	key *fakeKeys
	log *fakeLogs
	q   *fakeQueues
	esm *fakeESM
	st  *fakeStreams
}

func newFakeServer(t *testing.T) *fakeServer {
	t.Helper()
	s := &fakeServer{fn: &fakeFunctions{}, inv: &fakeInvoke{}, key: &fakeKeys{}, log: &fakeLogs{}, q: &fakeQueues{}, esm: &fakeESM{}, st: newFakeStreams()}
	opts := connect.WithInterceptors(errs.Interceptor())
	mux := http.NewServeMux()
	mux.Handle(skiffv1connect.NewFunctionServiceHandler(s.fn, opts))
	mux.Handle(skiffv1connect.NewInvokeServiceHandler(s.inv, opts))
	mux.Handle(skiffv1connect.NewKeyServiceHandler(s.key, opts))
	mux.Handle(skiffv1connect.NewLogServiceHandler(s.log, opts))
	mux.Handle(skiffv1connect.NewQueueServiceHandler(s.q, opts))
	mux.Handle(skiffv1connect.NewEventSourceServiceHandler(s.esm, opts))
	mux.Handle(skiffv1connect.NewStreamServiceHandler(s.st, opts))
	srv := httptest.NewUnstartedServer(mux)
	srv.Config.Protocols = new(http.Protocols)
	srv.Config.Protocols.SetHTTP1(true)
	srv.Config.Protocols.SetUnencryptedHTTP2(true)
	srv.Start()
	t.Cleanup(srv.Close)
	s.url = srv.URL
	return s
}

// calls records requests by procedure, with the headers they came with.
type calls struct {
	mu     sync.Mutex
	reqs   []any         // guarded by mu
	heads  []http.Header // guarded by mu
	procs  []string      // guarded by mu
	protos []string      // guarded by mu
}

func (c *calls) record(proc string, h http.Header, peerProto string, msg any) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.procs = append(c.procs, proc)
	c.heads = append(c.heads, h.Clone())
	c.reqs = append(c.reqs, msg)
	c.protos = append(c.protos, peerProto)
}

func (c *calls) last(t *testing.T) (string, http.Header, any) {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.reqs) == 0 {
		t.Fatal("the server got no request")
	}
	n := len(c.reqs) - 1
	return c.procs[n], c.heads[n], c.reqs[n]
}

func (c *calls) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.reqs)
}

func (c *calls) protocols() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.protos...)
}

// upload is what an UploadFunction call carried.
type upload struct {
	header *skiffv1.UploadFunctionRequest_Header
	chunks [][]byte
	order  []string // "header" or "chunk", in arrival order
}

func (u *upload) data() []byte { return bytes.Join(u.chunks, nil) }

type fakeFunctions struct {
	skiffv1connect.UnimplementedFunctionServiceHandler
	calls
	// pages, when set, are the pages ListFunctions returns, keyed by token.
	pages map[string]*skiffv1.ListFunctionsResponse
	// fail, when set, is returned by every call.
	fail error
}

func fnFor(name string) *skiffv1.Function {
	return &skiffv1.Function{Name: name, Arn: "arn:skiff:lambda:local:000000000000:function:" + name,
		Config:  &skiffv1.FunctionConfig{Runtime: "provided", Handler: "bootstrap", MemoryMb: 128, TimeoutSeconds: 3, EphemeralStorageMb: 512},
		Version: "$LATEST", CodeSize: 42}
}

func (f *fakeFunctions) CreateFunction(_ context.Context, r *connect.Request[skiffv1.CreateFunctionRequest]) (*connect.Response[skiffv1.CreateFunctionResponse], error) {
	f.record("CreateFunction", r.Header(), r.Peer().Protocol, r.Msg)
	if f.fail != nil {
		return nil, f.fail
	}
	fn := fnFor(r.Msg.GetName())
	fn.Config = r.Msg.GetConfig()
	return connect.NewResponse(&skiffv1.CreateFunctionResponse{Function: fn}), nil
}

func (f *fakeFunctions) UploadFunction(_ context.Context, s *connect.ClientStream[skiffv1.UploadFunctionRequest]) (*connect.Response[skiffv1.UploadFunctionResponse], error) {
	u := &upload{}
	if f.fail != nil {
		// Refuse after the header, without reading the rest, as a server
		// that rejects the upload early does.
		if s.Receive() {
			u.header = s.Msg().GetHeader()
		}
		f.record("UploadFunction", s.RequestHeader(), s.Peer().Protocol, u)
		return nil, f.fail
	}
	for s.Receive() {
		switch p := s.Msg().GetPart().(type) {
		case *skiffv1.UploadFunctionRequest_Header_:
			u.header = p.Header
			u.order = append(u.order, "header")
		case *skiffv1.UploadFunctionRequest_Chunk:
			u.chunks = append(u.chunks, p.Chunk)
			u.order = append(u.order, "chunk")
		}
	}
	if err := s.Err(); err != nil {
		return nil, err
	}
	f.record("UploadFunction", s.RequestHeader(), s.Peer().Protocol, u)
	fn := fnFor(u.header.GetName())
	fn.CodeSize = int64(len(u.data()))
	return connect.NewResponse(&skiffv1.UploadFunctionResponse{Function: fn}), nil
}

func (f *fakeFunctions) GetFunction(_ context.Context, r *connect.Request[skiffv1.GetFunctionRequest]) (*connect.Response[skiffv1.GetFunctionResponse], error) {
	f.record("GetFunction", r.Header(), r.Peer().Protocol, r.Msg)
	if f.fail != nil {
		return nil, f.fail
	}
	if r.Msg.GetName() == "missing" {
		return nil, errs.NotFound("function %q not found", r.Msg.GetName())
	}
	fn := fnFor(r.Msg.GetName())
	fn.Config.Environment = map[string]string{"B": "2", "A": "1"}
	rc := int32(7)
	fn.ReservedConcurrency = &rc
	return connect.NewResponse(&skiffv1.GetFunctionResponse{Function: fn}), nil
}

func (f *fakeFunctions) ListFunctions(_ context.Context, r *connect.Request[skiffv1.ListFunctionsRequest]) (*connect.Response[skiffv1.ListFunctionsResponse], error) {
	f.record("ListFunctions", r.Header(), r.Peer().Protocol, r.Msg)
	page, ok := f.pages[r.Msg.GetPageToken()]
	if !ok {
		return nil, errs.Invalid("page_token", "unknown page token %q", r.Msg.GetPageToken())
	}
	return connect.NewResponse(page), nil
}

func (f *fakeFunctions) UpdateFunctionCode(_ context.Context, r *connect.Request[skiffv1.UpdateFunctionCodeRequest]) (*connect.Response[skiffv1.UpdateFunctionCodeResponse], error) {
	f.record("UpdateFunctionCode", r.Header(), r.Peer().Protocol, r.Msg)
	return connect.NewResponse(&skiffv1.UpdateFunctionCodeResponse{Function: fnFor(r.Msg.GetName())}), nil
}

func (f *fakeFunctions) UpdateFunctionConfiguration(_ context.Context, r *connect.Request[skiffv1.UpdateFunctionConfigurationRequest]) (*connect.Response[skiffv1.UpdateFunctionConfigurationResponse], error) {
	f.record("UpdateFunctionConfiguration", r.Header(), r.Peer().Protocol, r.Msg)
	if f.fail != nil {
		return nil, f.fail
	}
	return connect.NewResponse(&skiffv1.UpdateFunctionConfigurationResponse{Function: fnFor(r.Msg.GetName())}), nil
}

func (f *fakeFunctions) DeleteFunction(_ context.Context, r *connect.Request[skiffv1.DeleteFunctionRequest]) (*connect.Response[skiffv1.DeleteFunctionResponse], error) {
	f.record("DeleteFunction", r.Header(), r.Peer().Protocol, r.Msg)
	return connect.NewResponse(&skiffv1.DeleteFunctionResponse{}), nil
}

func (f *fakeFunctions) PutFunctionConcurrency(_ context.Context, r *connect.Request[skiffv1.PutFunctionConcurrencyRequest]) (*connect.Response[skiffv1.PutFunctionConcurrencyResponse], error) {
	f.record("PutFunctionConcurrency", r.Header(), r.Peer().Protocol, r.Msg)
	return connect.NewResponse(&skiffv1.PutFunctionConcurrencyResponse{ReservedConcurrentExecutions: r.Msg.GetReservedConcurrentExecutions()}), nil
}

func (f *fakeFunctions) DeleteFunctionConcurrency(_ context.Context, r *connect.Request[skiffv1.DeleteFunctionConcurrencyRequest]) (*connect.Response[skiffv1.DeleteFunctionConcurrencyResponse], error) {
	f.record("DeleteFunctionConcurrency", r.Header(), r.Peer().Protocol, r.Msg)
	return connect.NewResponse(&skiffv1.DeleteFunctionConcurrencyResponse{}), nil
}

type fakeInvoke struct {
	skiffv1connect.UnimplementedInvokeServiceHandler
	calls
	// respond makes the response; by default the payload is echoed.
	respond func(*skiffv1.InvokeRequest) (*skiffv1.InvokeResponse, error)
}

func (f *fakeInvoke) Invoke(_ context.Context, r *connect.Request[skiffv1.InvokeRequest]) (*connect.Response[skiffv1.InvokeResponse], error) {
	f.record("Invoke", r.Header(), r.Peer().Protocol, r.Msg)
	if f.respond != nil {
		resp, err := f.respond(r.Msg)
		if err != nil {
			return nil, err
		}
		return connect.NewResponse(resp), nil
	}
	return connect.NewResponse(&skiffv1.InvokeResponse{StatusCode: 200, Payload: r.Msg.GetPayload(), RequestId: "req-1"}), nil
}

type fakeKeys struct {
	skiffv1connect.UnimplementedKeyServiceHandler
	calls
}

func (f *fakeKeys) CreateKey(_ context.Context, r *connect.Request[skiffv1.CreateKeyRequest]) (*connect.Response[skiffv1.CreateKeyResponse], error) {
	f.record("CreateKey", r.Header(), r.Peer().Protocol, r.Msg)
	return connect.NewResponse(&skiffv1.CreateKeyResponse{
		Key:    &skiffv1.ApiKey{Id: "key-1", Description: r.Msg.GetDescription(), Admin: r.Msg.GetAdmin(), InvokeFunctions: r.Msg.GetInvokeFunctions()},
		Secret: "sk_secret_value",
	}), nil
}

func (f *fakeKeys) ListKeys(_ context.Context, r *connect.Request[skiffv1.ListKeysRequest]) (*connect.Response[skiffv1.ListKeysResponse], error) {
	f.record("ListKeys", r.Header(), r.Peer().Protocol, r.Msg)
	return connect.NewResponse(&skiffv1.ListKeysResponse{Keys: []*skiffv1.ApiKey{
		{Id: "key-admin", Admin: true, Created: "2026-01-01T00:00:00Z", Description: "first"},
		{Id: "key-2", InvokeFunctions: []string{"a", "b"}, Created: "2026-01-02T00:00:00Z"},
	}}), nil
}

func (f *fakeKeys) RevokeKey(_ context.Context, r *connect.Request[skiffv1.RevokeKeyRequest]) (*connect.Response[skiffv1.RevokeKeyResponse], error) {
	f.record("RevokeKey", r.Header(), r.Peer().Protocol, r.Msg)
	if r.Msg.GetId() == "nope" {
		return nil, errs.NotFound("key %q not found", r.Msg.GetId())
	}
	return connect.NewResponse(&skiffv1.RevokeKeyResponse{}), nil
}

type fakeLogs struct {
	skiffv1connect.UnimplementedLogServiceHandler
	calls
	// lines are sent first; with follow, the stream then stays open until
	// the client goes away, after signalling following.
	lines     []string
	following chan struct{}
}

func (f *fakeLogs) TailLogs(ctx context.Context, r *connect.Request[skiffv1.TailLogsRequest], s *connect.ServerStream[skiffv1.TailLogsResponse]) error {
	f.record("TailLogs", r.Header(), r.Peer().Protocol, r.Msg)
	if r.Msg.GetFunctionName() == "missing" {
		return errs.NotFound("function %q not found", r.Msg.GetFunctionName())
	}
	for _, l := range f.lines {
		if err := s.Send(&skiffv1.TailLogsResponse{Text: l}); err != nil {
			return err
		}
	}
	if r.Msg.GetFollow() {
		if f.following != nil {
			close(f.following)
		}
		<-ctx.Done()
		return ctx.Err()
	}
	return nil
}

// result is what one CLI run produced.
type result struct {
	stdout, stderr string
	code           int
	err            error
}

// cli runs the command line in-process with test dependencies.
type cli struct {
	t        *testing.T
	env      map[string]string
	stdin    string
	terminal bool
	home     string
	// onStdout, when set, sees stdout after every write.
	onStdout func(string)
	dev      func(context.Context, devConfig) error
	gateway  func(context.Context, gatewayserver.ClusterConfig) error
}

func newCLI(t *testing.T, s *fakeServer) *cli {
	c := &cli{t: t, env: map[string]string{envAPIKey: "test-key"}, home: t.TempDir()}
	if s != nil {
		c.env[envEndpoint] = s.url
	}
	return c
}

func (c *cli) run(args ...string) result {
	c.t.Helper()
	return c.runCtx(c.t.Context(), args...)
}

func (c *cli) runCtx(ctx context.Context, args ...string) result {
	c.t.Helper()
	var stderr bytes.Buffer
	stdout := &hookWriter{hook: c.onStdout}
	d := deps{
		stdin:      strings.NewReader(c.stdin),
		getenv:     func(k string) string { return c.env[k] },
		homeDir:    func() (string, error) { return c.home, nil },
		isTerminal: func(w io.Writer) bool { return c.terminal },
		devRun: func(ctx context.Context, cfg devConfig) error {
			if c.dev == nil {
				return errors.New("no dev server in this test")
			}
			return c.dev(ctx, cfg)
		},
		gatewayRun: func(ctx context.Context, cfg gatewayserver.ClusterConfig) error {
			if c.gateway == nil {
				return errors.New("no gateway in this test")
			}
			return c.gateway(ctx, cfg)
		},
		streamPoll: time.Millisecond,
	}
	err := runWith(ctx, d, args, stdout, &stderr)
	code := report(ctx, &stderr, err)
	return result{stdout: stdout.String(), stderr: stderr.String(), code: code, err: err}
}

// protocols are the RPC protocols every client path is tested over.
var protocols = []string{"connect", "grpc"}

// hookWriter is a buffer that reports its content after every write.
type hookWriter struct {
	mu   sync.Mutex
	buf  bytes.Buffer // guarded by mu
	hook func(string)
}

func (w *hookWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	n, err := w.buf.Write(b)
	s := w.buf.String()
	w.mu.Unlock()
	if w.hook != nil {
		w.hook(s)
	}
	return n, err
}

func (w *hookWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}
