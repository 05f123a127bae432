package frontend

import (
	"archive/zip"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/testutil"
)

// fakeStore is an in-memory Store. writes counts every mutation except
// log appends, so tests can assert that bad input changed nothing.
type fakeStore struct {
	mu      sync.Mutex
	fns     map[string]*skiffv1.Function // guarded by mu
	rev     uint64                       // guarded by mu
	code    map[string][]byte            // guarded by mu
	keys    map[string]Key               // guarded by mu
	logs    []LogEntry                   // guarded by mu
	writes  int                          // guarded by mu
	readArg []any                        // guarded by mu: last ReadLogs arguments

	// appendLog, when set, replaces AppendLog's default.
	appendLog func(ctx context.Context, e LogEntry) error
}

var _ Store = (*fakeStore)(nil)

func newFakeStore() *fakeStore {
	return &fakeStore{fns: map[string]*skiffv1.Function{}, code: map[string][]byte{}, keys: map[string]Key{}}
}

func (s *fakeStore) writeCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.writes
}

func (s *fakeStore) CreateFunction(_ context.Context, fn *skiffv1.Function) (*skiffv1.Function, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.fns[fn.Name]; ok {
		return nil, errs.New(errs.KindAlreadyExists, "function %s already exists", fn.Name)
	}
	s.writes++
	s.rev++
	c := proto.Clone(fn).(*skiffv1.Function)
	c.Revision = s.rev
	s.fns[fn.Name] = c
	return proto.Clone(c).(*skiffv1.Function), nil
}

// GetFunction returns the stored pointer, as the real store's cache may:
// the front end must not mutate it.
func (s *fakeStore) GetFunction(_ context.Context, name string) (*skiffv1.Function, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fn, ok := s.fns[name]
	if !ok {
		return nil, errs.NotFound("function %s not found", name)
	}
	return fn, nil
}

func (s *fakeStore) UpdateFunction(_ context.Context, fn *skiffv1.Function) (*skiffv1.Function, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	cur, ok := s.fns[fn.Name]
	if !ok {
		return nil, errs.NotFound("function %s not found", fn.Name)
	}
	if cur.Revision != fn.Revision {
		return nil, errs.Conflict("function %s was changed concurrently (revision %d, now %d)", fn.Name, fn.Revision, cur.Revision)
	}
	s.writes++
	s.rev++
	c := proto.Clone(fn).(*skiffv1.Function)
	c.Revision = s.rev
	s.fns[fn.Name] = c
	return proto.Clone(c).(*skiffv1.Function), nil
}

func (s *fakeStore) DeleteFunction(_ context.Context, name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.fns[name]; !ok {
		return errs.NotFound("function %s not found", name)
	}
	s.writes++
	delete(s.fns, name)
	return nil
}

func (s *fakeStore) ListFunctions(_ context.Context, after string, limit int) ([]*skiffv1.Function, string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var names []string
	for n := range s.fns {
		if n > after {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	next := ""
	if limit > 0 && len(names) > limit {
		names = names[:limit]
		next = names[limit-1]
	}
	out := make([]*skiffv1.Function, 0, len(names))
	for _, n := range names {
		out = append(out, s.fns[n])
	}
	return out, next, nil
}

func (s *fakeStore) SumReserved(context.Context) (int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var sum int64
	for _, fn := range s.fns {
		sum += int64(fn.GetReservedConcurrency())
	}
	return sum, nil
}

func (s *fakeStore) PutCode(_ context.Context, zip []byte) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.writes++
	h := sha256.Sum256(zip)
	sum := hex.EncodeToString(h[:])
	s.code[sum] = bytes.Clone(zip)
	return sum, nil
}

func (s *fakeStore) PutKey(_ context.Context, k Key) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.writes++
	s.keys[k.ID] = k
	return nil
}

func (s *fakeStore) KeyBySecretHash(_ context.Context, hash []byte) (Key, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, k := range s.keys {
		if bytes.Equal(k.SecretHash, hash) {
			return k, nil
		}
	}
	return Key{}, errs.NotFound("API key not found")
}

func (s *fakeStore) ListKeys(context.Context) ([]Key, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Key
	for _, k := range s.keys {
		out = append(out, k)
	}
	slices.SortFunc(out, func(a, b Key) int { return a.Created.Compare(b.Created) })
	return out, nil
}

func (s *fakeStore) DeleteKey(_ context.Context, id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.keys[id]; !ok {
		return errs.NotFound("API key %s not found", id)
	}
	s.writes++
	delete(s.keys, id)
	return nil
}

func (s *fakeStore) AppendLog(ctx context.Context, e LogEntry) error {
	if s.appendLog != nil {
		return s.appendLog(ctx, e)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.logs = append(s.logs, e)
	return nil
}

func (s *fakeStore) setLogs(l []LogEntry) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.logs = l
}

func (s *fakeStore) readLogsArgs() []any {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.readArg
}

func (s *fakeStore) logEntries() []LogEntry {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.logs)
}

// ReadLogs sends the last entries of the function and, with follow, waits
// for the caller to go away.
func (s *fakeStore) ReadLogs(ctx context.Context, function string, last int, follow bool, fn func(LogEntry) error) error {
	s.mu.Lock()
	s.readArg = []any{function, last, follow}
	var mine []LogEntry
	for _, e := range s.logs {
		if e.Function == function {
			mine = append(mine, e)
		}
	}
	s.mu.Unlock()
	if len(mine) > last {
		mine = mine[len(mine)-last:]
	}
	for _, e := range mine {
		if err := fn(e); err != nil {
			return err
		}
	}
	if follow {
		<-ctx.Done()
		return ctx.Err()
	}
	return nil
}

type retireCall struct{ function, keep string }

// fakeRouter is a Router whose Invoke is a func field (echo by default).
type fakeRouter struct {
	mu      sync.Mutex
	invoke  func(ctx context.Context, req *skiffv1.AgentInvokeRequest) (*skiffv1.AgentInvokeResponse, error) // guarded by mu
	calls   []*skiffv1.AgentInvokeRequest                                                                    // guarded by mu
	retires []retireCall                                                                                     // guarded by mu
}

func (r *fakeRouter) setInvoke(fn func(ctx context.Context, req *skiffv1.AgentInvokeRequest) (*skiffv1.AgentInvokeResponse, error)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.invoke = fn
}

func (r *fakeRouter) call(i int) *skiffv1.AgentInvokeRequest {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.calls[i]
}

var _ Router = (*fakeRouter)(nil)

func (r *fakeRouter) Invoke(ctx context.Context, req *skiffv1.AgentInvokeRequest) (*skiffv1.AgentInvokeResponse, error) {
	r.mu.Lock()
	r.calls = append(r.calls, req)
	invoke := r.invoke
	r.mu.Unlock()
	if invoke != nil {
		return invoke(ctx, req)
	}
	return &skiffv1.AgentInvokeResponse{Payload: req.Payload, Log: "START RequestId: " + req.RequestId + "\nEND\n"}, nil
}

func (r *fakeRouter) Retire(_ context.Context, function, keep string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.retires = append(r.retires, retireCall{function, keep})
	return nil
}

func (r *fakeRouter) callCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.calls)
}

func (r *fakeRouter) retireCalls() []retireCall {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.retires)
}

// blocker makes a router Invoke that signals entry and waits for release.
type blocker struct {
	entered chan string
	release chan struct{}
	once    sync.Once
}

// newBlocker returns a blocker that releases everything when the test
// ends, so a failing test does not leave the server waiting.
func newBlocker(t *testing.T) *blocker {
	b := &blocker{entered: make(chan string, 100), release: make(chan struct{})}
	t.Cleanup(b.unblock)
	return b
}

func (b *blocker) unblock() { b.once.Do(func() { close(b.release) }) }

func (b *blocker) invoke(ctx context.Context, req *skiffv1.AgentInvokeRequest) (*skiffv1.AgentInvokeResponse, error) {
	b.entered <- req.Spec.FunctionName
	select {
	case <-b.release:
		return &skiffv1.AgentInvokeResponse{Payload: req.Payload}, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// waitEntered waits until n invocations are inside the router.
func (b *blocker) waitEntered(t *testing.T, n int) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for i := 0; i < n; i++ {
		select {
		case <-b.entered:
		case <-deadline:
			t.Fatalf("only %d of %d invocations reached the router", i, n)
		}
	}
}

// testValidate is a small ValidateCode: a zip, with an executable bootstrap.
func testValidate(b []byte) (bool, error) {
	zr, err := zip.NewReader(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		return false, errors.New("code is not a zip archive")
	}
	for _, f := range zr.File {
		if f.Name == "bootstrap" && f.Mode()&0o111 != 0 {
			return true, nil
		}
	}
	return false, nil
}

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// env is a front end served over HTTP/2 cleartext on loopback.
type env struct {
	f     *Frontend
	st    *fakeStore
	rt    *fakeRouter
	reg   *prometheus.Registry
	url   string
	hc    *http.Client
	admin string
}

func newEnv(t testing.TB, cfg Config) *env {
	t.Helper()
	e := &env{st: newFakeStore(), rt: &fakeRouter{}, reg: prometheus.NewRegistry()}
	if cfg.ValidateCode == nil {
		cfg.ValidateCode = testValidate
	}
	if cfg.Now == nil {
		cfg.Now = func() time.Time { return t0 }
	}
	cfg.Registry = e.reg
	f, err := New(cfg, e.st, e.rt)
	if err != nil {
		t.Fatal(err)
	}
	e.f = f
	t.Cleanup(func() { f.Close() })
	secret, created, err := f.EnsureAdminKey(context.Background(), filepath.Join(t.TempDir(), "data", "admin.key"))
	if err != nil || !created {
		t.Fatalf("EnsureAdminKey: created %v, err %v", created, err)
	}
	e.admin = secret

	mux := http.NewServeMux()
	f.Mount(mux)
	srv := httptest.NewUnstartedServer(mux)
	srv.Config.Protocols = new(http.Protocols)
	srv.Config.Protocols.SetHTTP1(true)
	srv.Config.Protocols.SetUnencryptedHTTP2(true)
	srv.Start()
	t.Cleanup(srv.Close)
	e.url = srv.URL
	tr := &http.Transport{Protocols: new(http.Protocols)}
	tr.Protocols.SetUnencryptedHTTP2(true)
	t.Cleanup(tr.CloseIdleConnections)
	e.hc = &http.Client{Transport: tr}
	return e
}

// clients are the four service clients with one key and protocol.
type clients struct {
	fn   skiffv1connect.FunctionServiceClient
	inv  skiffv1connect.InvokeServiceClient
	keys skiffv1connect.KeyServiceClient
	logs skiffv1connect.LogServiceClient
}

func (e *env) clients(key string, opts ...connect.ClientOption) clients {
	opts = append(slices.Clone(opts), connect.WithInterceptors(bearerAuth(key)))
	return clients{
		fn:   skiffv1connect.NewFunctionServiceClient(e.hc, e.url, opts...),
		inv:  skiffv1connect.NewInvokeServiceClient(e.hc, e.url, opts...),
		keys: skiffv1connect.NewKeyServiceClient(e.hc, e.url, opts...),
		logs: skiffv1connect.NewLogServiceClient(e.hc, e.url, opts...),
	}
}

// bearerAuth sets the Authorization header (none when empty).
type bearerAuth string

func (b bearerAuth) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if b != "" {
			req.Header().Set("Authorization", "Bearer "+string(b))
		}
		return next(ctx, req)
	}
}

func (b bearerAuth) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		if b != "" {
			conn.RequestHeader().Set("Authorization", "Bearer "+string(b))
		}
		return conn
	}
}

func (b bearerAuth) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

// protocols are the wire protocols every RPC is tested over.
var protocols = []struct {
	name string
	opts []connect.ClientOption
}{
	{"connect", nil},
	{"grpc", []connect.ClientOption{connect.WithGRPC()}},
}

// forEachProtocol runs test over both protocols, each with a fresh env.
func forEachProtocol(t *testing.T, cfg Config, test func(t *testing.T, e *env, c clients, opts []connect.ClientOption)) {
	for _, p := range protocols {
		t.Run(p.name, func(t *testing.T) {
			e := newEnv(t, cfg)
			test(t, e, e.clients(e.admin, p.opts...), p.opts)
		})
	}
}

// wantCode asserts err is a Connect error with code.
func wantCode(t *testing.T, err error, code connect.Code) *connect.Error {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want %v", code)
	}
	var ce *connect.Error
	if !errors.As(err, &ce) {
		t.Fatalf("got error %v (%T), want a connect error %v", err, err, code)
	}
	if ce.Code() != code {
		t.Fatalf("got code %v (%v), want %v", ce.Code(), ce.Message(), code)
	}
	return ce
}

// wantInvalid asserts err is InvalidArgument naming field.
func wantInvalid(t *testing.T, err error, field string) *connect.Error {
	t.Helper()
	ce := wantCode(t, err, connect.CodeInvalidArgument)
	if got := ce.Meta().Get(errs.HeaderField); got != field {
		t.Fatalf("got field %q (%v), want %q", got, ce.Message(), field)
	}
	return ce
}

// bootstrapZip is a valid function archive; tag makes distinct archives.
func bootstrapZip(t testing.TB, tag string) []byte {
	t.Helper()
	return testutil.ZipFiles(t, map[string]testutil.ZipEntry{
		"bootstrap": {Data: []byte("#!/bin/sh\n# " + tag + "\n"), Mode: 0o755},
	})
}

// mustCreate creates a function with the default configuration.
func mustCreate(t testing.TB, c clients, name string, cfg *skiffv1.FunctionConfig) *skiffv1.Function {
	t.Helper()
	resp, err := c.fn.CreateFunction(context.Background(), connect.NewRequest(&skiffv1.CreateFunctionRequest{
		Name: name, Config: cfg, ZipFile: bootstrapZip(t, name),
	}))
	if err != nil {
		t.Fatalf("creating %s: %v", name, err)
	}
	return resp.Msg.Function
}

func mustReserve(t testing.TB, c clients, name string, n int32) {
	t.Helper()
	if _, err := c.fn.PutFunctionConcurrency(context.Background(), connect.NewRequest(&skiffv1.PutFunctionConcurrencyRequest{
		Name: name, ReservedConcurrentExecutions: n,
	})); err != nil {
		t.Fatalf("reserving %d for %s: %v", n, name, err)
	}
}

func invokeReq(name string, payload string) *connect.Request[skiffv1.InvokeRequest] {
	return connect.NewRequest(&skiffv1.InvokeRequest{FunctionName: name, Payload: []byte(payload)})
}
