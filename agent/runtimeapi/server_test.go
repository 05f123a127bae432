package runtimeapi

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// env is a Server on real loopback TCP and a fake runtime talking to it.
type env struct {
	s    *Server
	base string // http://127.0.0.1:port/2018-06-01/runtime/
	c    *http.Client
}

func newEnv(t testing.TB, cfg Config) *env {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(cfg)
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	tr := &http.Transport{MaxIdleConnsPerHost: 4}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := <-served; err != nil {
			t.Errorf("Serve returned %v, want nil after Close", err)
		}
		tr.CloseIdleConnections()
	})
	return &env{s: s, base: "http://" + l.Addr().String() + prefix, c: &http.Client{Transport: tr}}
}

type reply struct {
	status int
	header http.Header
	body   string
}

func (e *env) do(t testing.TB, method, path string, header http.Header, body io.Reader) reply {
	t.Helper()
	req, err := http.NewRequest(method, e.base+path, body)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := e.c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading body: %v", method, path, err)
	}
	return reply{resp.StatusCode, resp.Header, string(b)}
}

func (e *env) next(t testing.TB) reply {
	t.Helper()
	r := e.do(t, http.MethodGet, "invocation/next", nil, nil)
	if r.status != http.StatusOK {
		t.Fatalf("GET next: status %d (%s), want 200", r.status, r.body)
	}
	return r
}

func (e *env) post(t testing.TB, path string, header http.Header, body string) reply {
	t.Helper()
	return e.do(t, http.MethodPost, path, header, strings.NewReader(body))
}

type invokeOutcome struct {
	res Result
	err error
}

// invokeAsync runs Invoke in the background.
func (e *env) invokeAsync(ctx context.Context, inv Invocation) <-chan invokeOutcome {
	ch := make(chan invokeOutcome, 1)
	go func() {
		res, err := e.s.Invoke(ctx, inv)
		ch <- invokeOutcome{res, err}
	}()
	return ch
}

func wait[T any](t testing.TB, ch <-chan T) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(10 * time.Second):
		t.Fatal("timed out waiting")
	}
	var zero T
	return zero
}

// waitFor waits, with a deadline, until cond holds.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func (s *Server) isPolling() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.polling
}

func (s *Server) currentState() state {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state
}

func testInvocation(id string) Invocation {
	return Invocation{RequestID: id, Deadline: time.Now().Add(time.Minute), Payload: []byte(`{"n":1}`)}
}

func TestNextHeaders(t *testing.T) {
	deadline := time.UnixMilli(1_900_000_000_123)
	tests := []struct {
		name   string
		inv    Invocation
		want   map[string]string // header → value; "" means absent
		parked bool              // the runtime polls before Invoke
	}{
		{
			name: "all fields",
			inv: Invocation{
				RequestID: "8476a536-e9f4-11e8-9739-2dfe598c3fcd", FunctionARN: "arn:aws:lambda:us-east-1:123456789012:function:fn",
				TraceID:       "Root=1-5bef4de7-ad49b0e87f6ef6c87fc2e700;Parent=9a9197af755a6419;Sampled=1",
				ClientContext: `{"client":{"installation_id":"x"}}`, CognitoIdentity: `{"cognitoIdentityId":"id"}`,
				Deadline: deadline, Payload: []byte(`{"hello":"world"}`),
			},
			want: map[string]string{
				hdrRequestID:       "8476a536-e9f4-11e8-9739-2dfe598c3fcd",
				hdrDeadline:        "1900000000123",
				hdrFunctionARN:     "arn:aws:lambda:us-east-1:123456789012:function:fn",
				hdrTraceID:         "Root=1-5bef4de7-ad49b0e87f6ef6c87fc2e700;Parent=9a9197af755a6419;Sampled=1",
				hdrClientContext:   `{"client":{"installation_id":"x"}}`,
				hdrCognitoIdentity: `{"cognitoIdentityId":"id"}`,
				"Content-Type":     "application/json",
				"Content-Length":   "17",
			},
		},
		{
			name:   "minimal, runtime already parked",
			inv:    Invocation{RequestID: "r2", Deadline: deadline, FunctionARN: "arn:fn"},
			parked: true,
			want: map[string]string{
				hdrRequestID: "r2", hdrDeadline: "1900000000123", hdrFunctionARN: "arn:fn",
				hdrTraceID: "", hdrClientContext: "", hdrCognitoIdentity: "", "Content-Length": "0",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, Config{})
			var got reply
			var out <-chan invokeOutcome
			if tt.parked {
				nextDone := make(chan reply, 1)
				go func() { nextDone <- e.next(t) }()
				waitFor(t, "the runtime is parked in /next", e.s.isPolling)
				out = e.invokeAsync(context.Background(), tt.inv)
				got = wait(t, nextDone)
			} else {
				out = e.invokeAsync(context.Background(), tt.inv)
				got = e.next(t)
			}
			for k, v := range tt.want {
				if g := got.header.Get(k); g != v {
					t.Errorf("header %s: got %q, want %q", k, g, v)
				}
			}
			if got.body != string(tt.inv.Payload) {
				t.Errorf("body: got %q, want %q", got.body, tt.inv.Payload)
			}
			if ms, _ := strconv.ParseInt(got.header.Get(hdrDeadline), 10, 64); !time.UnixMilli(ms).Equal(tt.inv.Deadline) {
				t.Errorf("deadline: got %v, want %v", time.UnixMilli(ms), tt.inv.Deadline)
			}
			r := e.post(t, "invocation/"+tt.inv.RequestID+"/response", nil, `"done"`)
			if r.status != http.StatusAccepted || r.body != bodyAccepted {
				t.Errorf("POST response: got %d %s, want 202 %s", r.status, r.body, bodyAccepted)
			}
			o := wait(t, out)
			if o.err != nil {
				t.Fatalf("Invoke: %v", o.err)
			}
			if diff := cmp.Diff(Result{Payload: []byte(`"done"`)}, o.res); diff != "" {
				t.Errorf("Result (-want +got):\n%s", diff)
			}
		})
	}
}

func TestSurface(t *testing.T) {
	tests := []struct {
		method, path string
		wantStatus   int
		wantBody     string
		wantAllow    string
	}{
		{http.MethodGet, "/", 404, bodyNotFound, ""},
		{http.MethodGet, "/2018-06-01/runtime/", 404, bodyNotFound, ""},
		{http.MethodGet, "/2018-06-01/runtime/invocation/", 404, bodyNotFound, ""},
		{http.MethodGet, "/2018-06-01/runtime/invocation/next/", 404, bodyNotFound, ""},
		{http.MethodPost, "/2018-06-01/runtime/invocation/id/other", 404, bodyNotFound, ""},
		{http.MethodPost, "/2018-06-01/runtime/invocation//response", 404, bodyNotFound, ""},
		{http.MethodPost, "/2018-06-01/runtime/invocation/id", 404, bodyNotFound, ""},
		{http.MethodGet, "/2018-06-01/runtime/initerror", 404, bodyNotFound, ""},
		{http.MethodGet, "/2020-01-01/extension/register", 404, bodyNotFound, ""},
		{http.MethodPost, "/2018-06-01/runtime/invocation/next", 405, bodyMethod, "GET"},
		{http.MethodPut, "/2018-06-01/runtime/invocation/next", 405, bodyMethod, "GET"},
		{http.MethodGet, "/2018-06-01/runtime/init/error", 405, bodyMethod, "POST"},
		{http.MethodGet, "/2018-06-01/runtime/invocation/id/response", 405, bodyMethod, "POST"},
		{http.MethodDelete, "/2018-06-01/runtime/invocation/id/error", 405, bodyMethod, "POST"},
		{http.MethodPost, "/2018-06-01/runtime/invocation/unknown/response", 400, bodyInvalidID, ""},
		{http.MethodPost, "/2018-06-01/runtime/invocation/unknown/error", 400, bodyInvalidID, ""},
	}
	e := newEnv(t, Config{})
	root := strings.TrimSuffix(e.base, prefix)
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			req, _ := http.NewRequest(tt.method, root+tt.path, strings.NewReader("{}"))
			resp, err := e.c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tt.wantStatus || string(b) != tt.wantBody {
				t.Errorf("got %d %s, want %d %s", resp.StatusCode, b, tt.wantStatus, tt.wantBody)
			}
			if got := resp.Header.Get("Allow"); got != tt.wantAllow {
				t.Errorf("Allow: got %q, want %q", got, tt.wantAllow)
			}
			if got := resp.Header.Get("Content-Type"); got != "application/json" {
				t.Errorf("Content-Type: got %q, want application/json", got)
			}
		})
	}
}

func TestInvocationError(t *testing.T) {
	tests := []struct {
		name     string
		header   string
		body     string
		wantType string
	}{
		{"header wins", "Runtime.ExitError", `{"errorType":"errorString","errorMessage":"boom"}`, "Runtime.ExitError"},
		{"type from body", "", `{"errorType":"errorString","errorMessage":"boom"}`, "errorString"},
		{"body not json", "", `boom`, "Unhandled"},
		{"empty body", "", ``, "Unhandled"},
		{"body without type", "", `{"errorMessage":"boom"}`, "Unhandled"},
		{"big x-ray cause header", "", `{"errorType":"E"}`, "E"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, Config{})
			out := e.invokeAsync(context.Background(), testInvocation("id-1"))
			e.next(t)
			h := http.Header{}
			if tt.header != "" {
				h.Set(hdrErrorType, tt.header)
			}
			if strings.HasPrefix(tt.name, "big") { // as aws-lambda-go may send
				h.Set("Lambda-Runtime-Function-Xray-Error-Cause", strings.Repeat("c", 1<<20-1))
			}
			r := e.post(t, "invocation/id-1/error", h, tt.body)
			if r.status != http.StatusAccepted || r.body != bodyAccepted {
				t.Errorf("POST error: got %d %s, want 202", r.status, r.body)
			}
			o := wait(t, out)
			want := Result{Failed: true, ErrorType: tt.wantType, Payload: []byte(tt.body)}
			if o.err != nil {
				t.Fatalf("Invoke: %v", o.err)
			}
			if diff := cmp.Diff(want, o.res); diff != "" {
				t.Errorf("Result (-want +got):\n%s", diff)
			}
			// The id is now stale.
			if r := e.post(t, "invocation/id-1/response", nil, "x"); r.status != http.StatusBadRequest || r.body != bodyInvalidID {
				t.Errorf("late response: got %d %s, want 400 %s", r.status, r.body, bodyInvalidID)
			}
		})
	}
}

func TestErrorBodyTooLarge(t *testing.T) {
	e := newEnv(t, Config{})
	out := e.invokeAsync(context.Background(), testInvocation("id"))
	e.next(t)
	r := e.post(t, "invocation/id/error", nil, strings.Repeat("x", MaxErrorBytes+1))
	if r.status != http.StatusRequestEntityTooLarge {
		t.Errorf("oversized error body: got %d, want 413", r.status)
	}
	// The invocation still runs; a proper error completes it.
	r = e.post(t, "invocation/id/error", nil, `{"errorType":"E"}`)
	if r.status != http.StatusAccepted {
		t.Errorf("POST error: got %d, want 202", r.status)
	}
	if o := wait(t, out); o.err != nil || o.res.ErrorType != "E" {
		t.Errorf("Invoke: got %+v, %v; want ErrorType E", o.res, o.err)
	}
}

func TestInitError(t *testing.T) {
	tests := []struct {
		name, header, body, wantType string
		wantMsg                      string
	}{
		{"typed", "Runtime.ExitError", `{"errorMessage":"exit status 1","errorType":"Runtime.ExitError"}`, "Runtime.ExitError", "exit status 1"},
		{"type from body", "", `{"errorMessage":"no handler","errorType":"Runtime.NoSuchHandler"}`, "Runtime.NoSuchHandler", "no handler"},
		{"untyped", "", `oops`, "Unhandled", "Unhandled"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, Config{})
			waited := make(chan error, 1)
			go func() { waited <- e.s.WaitInit(context.Background()) }()
			h := http.Header{}
			if tt.header != "" {
				h.Set(hdrErrorType, tt.header)
			}
			if r := e.post(t, "init/error", h, tt.body); r.status != http.StatusAccepted || r.body != bodyAccepted {
				t.Errorf("POST init/error: got %d %s, want 202", r.status, r.body)
			}
			err := wait(t, waited)
			var ie *InitError
			if !errors.As(err, &ie) {
				t.Fatalf("WaitInit: got %v, want *InitError", err)
			}
			if ie.Type != tt.wantType || string(ie.Payload) != tt.body {
				t.Errorf("InitError: got %q %q, want %q %q", ie.Type, ie.Payload, tt.wantType, tt.body)
			}
			if !strings.Contains(ie.Error(), tt.wantType) || !strings.Contains(ie.Error(), tt.wantMsg) {
				t.Errorf("Error(): got %q, want it to mention %q and %q", ie.Error(), tt.wantType, tt.wantMsg)
			}
			// Once failed, the runtime can neither fail again nor ask for work.
			if r := e.post(t, "init/error", nil, "again"); r.status != http.StatusForbidden {
				t.Errorf("second init/error: got %d, want 403", r.status)
			}
			if r := e.do(t, http.MethodGet, "invocation/next", nil, nil); r.status != http.StatusForbidden {
				t.Errorf("next after init error: got %d, want 403", r.status)
			}
			if err := e.s.WaitInit(context.Background()); !errors.As(err, &ie) {
				t.Errorf("WaitInit again: got %v, want *InitError", err)
			}
		})
	}
}

func TestWaitInit(t *testing.T) {
	e := newEnv(t, Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := e.s.WaitInit(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitInit before /next: got %v, want deadline exceeded", err)
	}
	waited := make(chan error, 1)
	go func() { waited <- e.s.WaitInit(context.Background()) }()
	out := e.invokeAsync(context.Background(), testInvocation("a"))
	e.next(t)
	if err := wait(t, waited); err != nil {
		t.Errorf("WaitInit after /next: got %v, want nil", err)
	}
	// Init error after init is refused.
	if r := e.post(t, "init/error", nil, "late"); r.status != http.StatusForbidden {
		t.Errorf("init/error after /next: got %d, want 403", r.status)
	}
	e.post(t, "invocation/a/response", nil, "ok")
	if o := wait(t, out); o.err != nil {
		t.Error(o.err)
	}
}

func TestResponseTooLarge(t *testing.T) {
	const limit = 1000
	tests := []struct {
		name    string
		limit   int64
		size    int
		chunked bool
		tooBig  bool
	}{
		{"at the limit", limit, limit, false, false},
		{"at the limit, chunked", limit, limit, true, false},
		{"one over", limit, limit + 1, false, true},
		{"one over, chunked", limit, limit + 1, true, true},
		{"far over, chunked", limit, 100 * limit, true, true},
		{"6 MB default limit", 0, 6_000_000, true, false},
		{"default limit + 1", 0, DefaultMaxResponseBytes + 1, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, Config{MaxResponseBytes: tt.limit})
			max := tt.limit
			if max == 0 {
				max = DefaultMaxResponseBytes
			}
			for round := range 2 { // the sandbox stays usable after a 413
				id := fmt.Sprint("id-", round)
				out := e.invokeAsync(context.Background(), testInvocation(id))
				e.next(t)
				payload := bytes.Repeat([]byte("x"), tt.size)
				var body io.Reader = bytes.NewReader(payload)
				if tt.chunked {
					body = io.MultiReader(body) // hides the length
				}
				r := e.do(t, http.MethodPost, "invocation/"+id+"/response", nil, body)
				o := wait(t, out)
				if !tt.tooBig {
					if r.status != http.StatusAccepted || o.err != nil || !bytes.Equal(o.res.Payload, payload) || o.res.Failed {
						t.Fatalf("got %d, err %v, %d bytes, failed %v; want 202 and the payload", r.status, o.err, len(o.res.Payload), o.res.Failed)
					}
					continue
				}
				wantReply := fmt.Sprintf(`{"errorMessage":"Exceeded maximum allowed payload size (%d bytes).","errorType":"RequestEntityTooLarge"}`, max)
				if r.status != http.StatusRequestEntityTooLarge || r.body != wantReply {
					t.Errorf("reply: got %d %s, want 413 %s", r.status, r.body, wantReply)
				}
				if !errors.Is(o.err, ErrResponseTooLarge) {
					t.Errorf("Invoke error: got %v, want ErrResponseTooLarge", o.err)
				}
				want := Result{Failed: true, ErrorType: "Function.ResponseSizeTooLarge", Payload: []byte(fmt.Sprintf(
					`{"errorMessage":"Response payload size exceeded maximum allowed payload size (%d bytes).","errorType":"Function.ResponseSizeTooLarge"}`, max))}
				if diff := cmp.Diff(want, o.res); diff != "" {
					t.Errorf("Result (-want +got):\n%s", diff)
				}
			}
		})
	}
	t.Run("default is Lambda's", func(t *testing.T) {
		want := `{"errorMessage":"Response payload size exceeded maximum allowed payload size (6291556 bytes).","errorType":"Function.ResponseSizeTooLarge"}`
		e := newEnv(t, Config{})
		out := e.invokeAsync(context.Background(), testInvocation("x"))
		e.next(t)
		e.do(t, http.MethodPost, "invocation/x/response", nil, bytes.NewReader(make([]byte, 6291557)))
		if o := wait(t, out); string(o.res.Payload) != want {
			t.Errorf("got %s, want %s", o.res.Payload, want)
		}
	})
}

func TestTrailerError(t *testing.T) {
	e := newEnv(t, Config{})
	out := e.invokeAsync(context.Background(), testInvocation("t"))
	e.next(t)
	req, _ := http.NewRequest(http.MethodPost, e.base+"invocation/t/response", io.MultiReader(strings.NewReader("partial")))
	req.Trailer = http.Header{hdrErrorType: {"Runtime.StreamError"}, hdrErrorBody: {"eyJlcnJvclR5cGUiOiJSdW50aW1lLlN0cmVhbUVycm9yIn0="}}
	resp, err := e.c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Errorf("status: got %d, want 202", resp.StatusCode)
	}
	o := wait(t, out)
	want := Result{Failed: true, ErrorType: "Runtime.StreamError", Payload: []byte(`{"errorType":"Runtime.StreamError"}`)}
	if diff := cmp.Diff(want, o.res); diff != "" || o.err != nil {
		t.Errorf("Result (-want +got):\n%s err %v", diff, o.err)
	}
}

func TestConcurrentMisuse(t *testing.T) {
	e := newEnv(t, Config{})

	// A second /next while one is parked is refused; the parked one still
	// gets the invocation.
	first := make(chan reply, 1)
	go func() { first <- e.next(t) }()
	waitFor(t, "the runtime is parked in /next", e.s.isPolling)
	if r := e.do(t, http.MethodGet, "invocation/next", nil, nil); r.status != http.StatusForbidden || r.body != bodyPolling {
		t.Errorf("second parked /next: got %d %s, want 403 %s", r.status, r.body, bodyPolling)
	}
	out := e.invokeAsync(context.Background(), testInvocation("one"))
	if got := wait(t, first).header.Get(hdrRequestID); got != "one" {
		t.Errorf("parked /next got request %q, want one", got)
	}

	// /next while the invocation runs is refused.
	if r := e.do(t, http.MethodGet, "invocation/next", nil, nil); r.status != http.StatusForbidden || r.body != bodyBusy {
		t.Errorf("/next during an invocation: got %d %s, want 403 %s", r.status, r.body, bodyBusy)
	}
	// A second Invoke is refused.
	if _, err := e.s.Invoke(context.Background(), testInvocation("two")); !errors.Is(err, ErrBusy) {
		t.Errorf("concurrent Invoke: got %v, want ErrBusy", err)
	}
	// A response for another id is refused, and the right one accepted.
	if r := e.post(t, "invocation/two/response", nil, "x"); r.status != http.StatusBadRequest {
		t.Errorf("response for a wrong id: got %d, want 400", r.status)
	}
	if r := e.post(t, "invocation/one/response", nil, "ok"); r.status != http.StatusAccepted {
		t.Errorf("response: got %d, want 202", r.status)
	}
	if o := wait(t, out); o.err != nil || string(o.res.Payload) != "ok" {
		t.Errorf("Invoke: got %q, %v; want ok", o.res.Payload, o.err)
	}
	// Two posts for the same id: only one wins.
	out = e.invokeAsync(context.Background(), testInvocation("three"))
	e.next(t)
	var wg sync.WaitGroup
	statuses := make([]int, 8)
	for i := range statuses {
		wg.Go(func() { statuses[i] = e.post(t, "invocation/three/response", nil, fmt.Sprint(i)).status })
	}
	wg.Wait()
	accepted := 0
	for _, s := range statuses {
		switch s {
		case http.StatusAccepted:
			accepted++
		case http.StatusBadRequest:
		default:
			t.Errorf("racing response: got status %d, want 202 or 400", s)
		}
	}
	if accepted != 1 {
		t.Errorf("racing responses: %d accepted, want 1", accepted)
	}
	if o := wait(t, out); o.err != nil {
		t.Error(o.err)
	}
}

func TestInvokeAbandoned(t *testing.T) {
	t.Run("while queued", func(t *testing.T) {
		e := newEnv(t, Config{})
		ctx, cancel := context.WithCancel(context.Background())
		out := e.invokeAsync(ctx, testInvocation("gone"))
		waitFor(t, "the invocation is queued", func() bool { return e.s.currentState() == stateQueued })
		cancel()
		if o := wait(t, out); !errors.Is(o.err, context.Canceled) || !errors.Is(o.err, ErrNotDelivered) {
			t.Fatalf("Invoke: got %v, want context.Canceled and ErrNotDelivered", o.err)
		}
		// The runtime then gets the next invocation, not the abandoned one.
		out = e.invokeAsync(context.Background(), testInvocation("next"))
		if got := e.next(t).header.Get(hdrRequestID); got != "next" {
			t.Errorf("/next got %q, want next", got)
		}
		e.post(t, "invocation/next/response", nil, "ok")
		if o := wait(t, out); o.err != nil || string(o.res.Payload) != "ok" {
			t.Errorf("Invoke: got %q, %v", o.res.Payload, o.err)
		}
	})
	t.Run("while running", func(t *testing.T) {
		e := newEnv(t, Config{})
		ctx, cancel := context.WithCancel(context.Background())
		out := e.invokeAsync(ctx, testInvocation("slow"))
		e.next(t)
		cancel()
		if o := wait(t, out); !errors.Is(o.err, context.Canceled) || errors.Is(o.err, ErrNotDelivered) {
			t.Fatalf("Invoke: got %v, want context.Canceled, delivered", o.err)
		}
		if r := e.post(t, "invocation/slow/response", nil, "late"); r.status != http.StatusBadRequest || r.body != bodyInvalidID {
			t.Errorf("late response: got %d %s, want 400 %s", r.status, r.body, bodyInvalidID)
		}
		out = e.invokeAsync(context.Background(), testInvocation("fresh"))
		e.next(t)
		e.post(t, "invocation/fresh/response", nil, "ok")
		if o := wait(t, out); o.err != nil || string(o.res.Payload) != "ok" {
			t.Errorf("Invoke after abandonment: got %q, %v", o.res.Payload, o.err)
		}
	})
}

func TestInvokeInvalid(t *testing.T) {
	e := newEnv(t, Config{})
	for _, inv := range []Invocation{
		{Deadline: time.Now()},
		{RequestID: "a/b", Deadline: time.Now()},
		{RequestID: "a"},
	} {
		if _, err := e.s.Invoke(context.Background(), inv); err == nil {
			t.Errorf("Invoke(%+v): got nil error, want invalid", inv)
		}
	}
}

func TestClose(t *testing.T) {
	e := newEnv(t, Config{})
	parked := make(chan int, 1)
	go func() {
		resp, err := e.c.Get(e.base + "invocation/next")
		if err != nil {
			parked <- -1
			return
		}
		resp.Body.Close()
		parked <- resp.StatusCode
	}()
	waitFor(t, "the runtime is parked", e.s.isPolling)
	out := e.invokeAsync(context.Background(), Invocation{RequestID: "x", Deadline: time.Now()})
	waitFor(t, "the invocation ran", func() bool { return e.s.currentState() == stateRunning })
	waited := make(chan error, 1)
	if err := e.s.Close(); err != nil {
		t.Fatal(err)
	}
	go func() { waited <- e.s.WaitInit(context.Background()) }()
	if o := wait(t, out); !errors.Is(o.err, ErrClosed) {
		t.Errorf("Invoke: got %v, want ErrClosed", o.err)
	}
	if err := wait(t, waited); err != nil && !errors.Is(err, ErrClosed) {
		t.Errorf("WaitInit after Close: got %v", err)
	}
	wait(t, parked)
	if _, err := e.s.Invoke(context.Background(), testInvocation("y")); !errors.Is(err, ErrClosed) {
		t.Errorf("Invoke after Close: got %v, want ErrClosed", err)
	}
}
