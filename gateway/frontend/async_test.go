package frontend

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/testing/protocmp"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/async"
	"skiff.dev/skiff/gateway/store"
	"skiff.dev/skiff/internal/errs"
)

// asyncEnv is an env whose async invoke is a real async.Service on an
// embedded store.
type asyncEnv struct {
	*env
	svc *async.Service
	js  jetstream.JetStream
}

// fakeValidator accepts the targets in ok; others do not exist.
type fakeValidator struct{ ok map[string]bool }

func (v fakeValidator) Validate(_ context.Context, target string) error {
	if v.ok[target] {
		return nil
	}
	if strings.HasPrefix(target, "queue:") || strings.HasPrefix(target, "function:") {
		return errs.NotFound("%s does not exist", target)
	}
	return errs.Invalid("destination", "%s is not a destination", target)
}

func newAsyncEnv(t *testing.T, cfg Config, acfg async.Config) *asyncEnv {
	t.Helper()
	st, err := store.Open(testContext(t), store.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	if acfg.Now == nil {
		acfg.Now = func() time.Time { return t0 }
	}
	svc, err := async.New(testContext(t), st.JetStream(), acfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() })
	cfg.Async = svc
	if cfg.Destinations == nil {
		cfg.Destinations = fakeValidator{ok: map[string]bool{"queue:ok": true, "queue:dead": true, "function:other": true, "https://hook.example/x": true}}
	}
	return &asyncEnv{env: newEnv(t, cfg), svc: svc, js: st.JetStream()}
}

// stored returns the request ids of the events stored for function.
func (e *asyncEnv) stored(t *testing.T, function string) []string {
	t.Helper()
	ctx := testContext(t)
	s, err := e.js.Stream(ctx, async.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for seq := uint64(1); ; {
		m, err := s.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(e.svc.QueueFor(function)))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		if m.Header.Get(async.HeaderFunction) == function {
			out = append(out, m.Header.Get(async.HeaderRequestID))
		}
		seq = m.Sequence + 1
	}
}

func eventReq(name, payload string) *connect.Request[skiffv1.InvokeRequest] {
	return connect.NewRequest(&skiffv1.InvokeRequest{FunctionName: name, Payload: []byte(payload), InvocationType: skiffv1.InvocationType_INVOCATION_TYPE_EVENT})
}

func TestInvokeEvent(t *testing.T) {
	for _, p := range protocols {
		t.Run(p.name, func(t *testing.T) {
			e := newAsyncEnv(t, Config{}, async.Config{MaxPayload: 1000})
			c := e.clients(e.admin, p.opts...)
			ctx := testContext(t)
			mustCreate(t, c, "fn", nil)

			resp, err := c.inv.Invoke(ctx, eventReq("fn", `{"a":1}`))
			if err != nil {
				t.Fatal(err)
			}
			rid := resp.Msg.RequestId
			if resp.Msg.StatusCode != 202 || rid == "" || resp.Header().Get(RequestIDHeader) != rid {
				t.Fatalf("response %v (header id %q), want 202 with a request id", resp.Msg, resp.Header().Get(RequestIDHeader))
			}
			if got := e.stored(t, "fn"); !cmp.Equal(got, []string{rid}) {
				t.Errorf("stored %v, want [%s]", got, rid)
			}
			if n := e.rt.callCount(); n != 0 {
				t.Errorf("the accept ran the function %d times", n)
			}

			// A client-chosen request id: a retried accept is stored once.
			for range 2 {
				req := eventReq("fn", `{"a":2}`)
				req.Header().Set(AsyncRequestIDHeader, "client-id-1")
				resp, err := c.inv.Invoke(ctx, req)
				if err != nil {
					t.Fatal(err)
				}
				if resp.Msg.RequestId != "client-id-1" || resp.Msg.StatusCode != 202 {
					t.Errorf("response %v, want 202 client-id-1", resp.Msg)
				}
			}
			if got := e.stored(t, "fn"); !cmp.Equal(got, []string{rid, "client-id-1"}) {
				t.Errorf("stored %v, want [%s client-id-1]", got, rid)
			}

			// Bad input changes nothing.
			bad := func(mut func(*connect.Request[skiffv1.InvokeRequest])) *connect.Request[skiffv1.InvokeRequest] {
				r := eventReq("fn", "{}")
				mut(r)
				return r
			}
			for _, tc := range []struct {
				name  string
				req   *connect.Request[skiffv1.InvokeRequest]
				field string
			}{
				{"oversized", eventReq("fn", string(bytes.Repeat([]byte("x"), 1001))), "payload"},
				{"tail", bad(func(r *connect.Request[skiffv1.InvokeRequest]) { r.Msg.LogType = skiffv1.LogType_LOG_TYPE_TAIL }), "log_type"},
				{"client context", bad(func(r *connect.Request[skiffv1.InvokeRequest]) { r.Msg.ClientContext = "e30=" }), "client_context"},
				{"bad request id", bad(func(r *connect.Request[skiffv1.InvokeRequest]) { r.Header().Set(AsyncRequestIDHeader, "a/b") }), "request_id"},
				{"request id on a sync invoke", func() *connect.Request[skiffv1.InvokeRequest] {
					r := invokeReq("fn", "{}")
					r.Header().Set(AsyncRequestIDHeader, "x")
					return r
				}(), "request_id"},
			} {
				_, err := c.inv.Invoke(ctx, tc.req)
				wantInvalid(t, err, tc.field)
			}
			_, err = c.inv.Invoke(ctx, eventReq("missing", "{}"))
			wantCode(t, err, connect.CodeNotFound)
			if got := e.stored(t, "fn"); len(got) != 2 {
				t.Errorf("bad input stored events: %v", got)
			}
		})
	}
}

func TestInvokeEventDisabled(t *testing.T) {
	e := newEnv(t, Config{})
	c := e.clients(e.admin)
	mustCreate(t, c, "fn", nil)
	_, err := c.inv.Invoke(testContext(t), eventReq("fn", "{}"))
	wantInvalid(t, err, "invocation_type")
	_, err = c.fn.GetFunctionEventInvokeConfig(testContext(t), connect.NewRequest(&skiffv1.GetFunctionEventInvokeConfigRequest{FunctionName: "fn"}))
	wantCode(t, err, connect.CodeFailedPrecondition)
}

func TestEventInvokeConfigRPCs(t *testing.T) {
	n := func(v int32) *int32 { return &v }
	for _, p := range protocols {
		t.Run(p.name, func(t *testing.T) {
			e := newAsyncEnv(t, Config{}, async.Config{})
			c := e.clients(e.admin, p.opts...)
			ctx := testContext(t)
			mustCreate(t, c, "fn", nil)
			put := func(name string, cfg *skiffv1.EventInvokeConfig) (*connect.Response[skiffv1.PutFunctionEventInvokeConfigResponse], error) {
				return c.fn.PutFunctionEventInvokeConfig(ctx, connect.NewRequest(&skiffv1.PutFunctionEventInvokeConfigRequest{FunctionName: name, Config: cfg}))
			}
			get := func(name string) (*skiffv1.EventInvokeConfig, error) {
				r, err := c.fn.GetFunctionEventInvokeConfig(ctx, connect.NewRequest(&skiffv1.GetFunctionEventInvokeConfigRequest{FunctionName: name}))
				if err != nil {
					return nil, err
				}
				return r.Msg.Config, nil
			}
			_, err := get("fn")
			wantCode(t, err, connect.CodeNotFound)

			good := &skiffv1.EventInvokeConfig{MaximumRetryAttempts: n(1), MaximumEventAgeSeconds: n(120), OnSuccess: "queue:ok", OnFailure: "https://hook.example/x", DeadLetterQueue: "queue:dead"}
			out, err := put("fn", good)
			if err != nil {
				t.Fatal(err)
			}
			want := &skiffv1.EventInvokeConfig{MaximumRetryAttempts: n(1), MaximumEventAgeSeconds: n(120), OnSuccess: "queue:ok", OnFailure: "https://hook.example/x", DeadLetterQueue: "queue:dead", LastModified: "2026-03-01T12:00:00Z"}
			if diff := cmp.Diff(want, out.Msg.Config, protocmp.Transform()); diff != "" {
				t.Errorf("put (-want +got):\n%s", diff)
			}
			got, err := get("fn")
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(want, got, protocmp.Transform()); diff != "" {
				t.Errorf("get (-want +got):\n%s", diff)
			}

			// Bad input is refused naming the field, and changes nothing.
			for _, tc := range []struct {
				name  string
				fn    string
				cfg   *skiffv1.EventInvokeConfig
				field string
				code  connect.Code
			}{
				{"retries 3", "fn", &skiffv1.EventInvokeConfig{MaximumRetryAttempts: n(3)}, "maximum_retry_attempts", connect.CodeInvalidArgument},
				{"age 30", "fn", &skiffv1.EventInvokeConfig{MaximumEventAgeSeconds: n(30)}, "maximum_event_age_seconds", connect.CodeInvalidArgument},
				{"missing queue", "fn", &skiffv1.EventInvokeConfig{OnFailure: "queue:nope"}, "on_failure", connect.CodeInvalidArgument},
				{"missing function", "fn", &skiffv1.EventInvokeConfig{OnSuccess: "function:nope"}, "on_success", connect.CodeInvalidArgument},
				{"bad webhook", "fn", &skiffv1.EventInvokeConfig{OnSuccess: "https://other.example/"}, "on_success", connect.CodeInvalidArgument},
				{"missing dlq", "fn", &skiffv1.EventInvokeConfig{DeadLetterQueue: "queue:nope"}, "dead_letter_queue", connect.CodeInvalidArgument},
				{"dlq not a queue", "fn", &skiffv1.EventInvokeConfig{DeadLetterQueue: "function:other"}, "dead_letter_queue", connect.CodeInvalidArgument},
				{"no config", "fn", nil, "config", connect.CodeInvalidArgument},
				{"bad name", "a/b", &skiffv1.EventInvokeConfig{}, "function_name", connect.CodeInvalidArgument},
				{"no function", "ghost", &skiffv1.EventInvokeConfig{}, "", connect.CodeNotFound},
			} {
				t.Run(tc.name, func(t *testing.T) {
					_, err := put(tc.fn, tc.cfg)
					if tc.code == connect.CodeInvalidArgument {
						wantInvalid(t, err, tc.field)
					} else {
						wantCode(t, err, tc.code)
					}
					got, err := get("fn")
					if err != nil {
						t.Fatal(err)
					}
					if diff := cmp.Diff(want, got, protocmp.Transform()); diff != "" {
						t.Errorf("config changed by bad input (-want +got):\n%s", diff)
					}
				})
			}

			// Put replaces the whole config.
			if _, err := put("fn", &skiffv1.EventInvokeConfig{MaximumRetryAttempts: n(0)}); err != nil {
				t.Fatal(err)
			}
			if got, _ := get("fn"); got.GetOnSuccess() != "" || got.GetMaximumRetryAttempts() != 0 || got.MaximumEventAgeSeconds != nil {
				t.Errorf("after a second put: %v", got)
			}

			if _, err := c.fn.DeleteFunctionEventInvokeConfig(ctx, connect.NewRequest(&skiffv1.DeleteFunctionEventInvokeConfigRequest{FunctionName: "fn"})); err != nil {
				t.Fatal(err)
			}
			_, err = get("fn")
			wantCode(t, err, connect.CodeNotFound)
			_, err = c.fn.DeleteFunctionEventInvokeConfig(ctx, connect.NewRequest(&skiffv1.DeleteFunctionEventInvokeConfigRequest{FunctionName: "fn"}))
			wantCode(t, err, connect.CodeNotFound)

			// Deleting the function deletes its config: a new function of
			// the same name starts with none.
			if _, err := put("fn", good); err != nil {
				t.Fatal(err)
			}
			if _, err := c.fn.DeleteFunction(ctx, connect.NewRequest(&skiffv1.DeleteFunctionRequest{Name: "fn"})); err != nil {
				t.Fatal(err)
			}
			mustCreate(t, c, "fn", nil)
			_, err = get("fn")
			wantCode(t, err, connect.CodeNotFound)
		})
	}
}

func TestInvokeSync(t *testing.T) {
	e := newEnv(t, Config{})
	c := e.clients(e.admin)
	ctx := testContext(t)
	mustCreate(t, c, "fn", nil)
	resp, err := e.f.InvokeSync(ctx, "fn", []byte(`{"x":1}`), "rid-sync")
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 || resp.RequestId != "rid-sync" || string(resp.Payload) != `{"x":1}` {
		t.Errorf("response %v, want 200 echo with rid-sync", resp)
	}
	if req := e.rt.call(0); req.RequestId != "rid-sync" || req.Spec.FunctionName != "fn" {
		t.Errorf("router got request id %q for %q", req.RequestId, req.Spec.FunctionName)
	}
	// Admission applies: reserved concurrency 0 throttles.
	mustReserve(t, c, "fn", 0)
	if _, err := e.f.InvokeSync(ctx, "fn", nil, "rid-2"); !errs.IsThrottled(err) {
		t.Errorf("got %v, want a throttle", err)
	}
	if _, err := e.f.InvokeSync(ctx, "ghost", nil, "rid-3"); !errs.IsNotFound(err) {
		t.Errorf("got %v, want not found", err)
	}
}
