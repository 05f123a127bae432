package esm

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"

	"connectrpc.com/connect"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/internal/errs"
)

// serve mounts the handler behind errs.Interceptor on an h2c test server
// and returns a client speaking opts' protocol.
func serve(t *testing.T, s *Service, opts ...connect.ClientOption) skiffv1connect.EventSourceServiceClient {
	t.Helper()
	mux := http.NewServeMux()
	mux.Handle(skiffv1connect.NewEventSourceServiceHandler(s.Handler(), connect.WithInterceptors(errs.Interceptor())))
	srv := httptest.NewUnstartedServer(mux)
	srv.Config.Protocols = new(http.Protocols)
	srv.Config.Protocols.SetHTTP1(true)
	srv.Config.Protocols.SetUnencryptedHTTP2(true)
	srv.Start()
	t.Cleanup(srv.Close)
	tr := &http.Transport{Protocols: new(http.Protocols)}
	tr.Protocols.SetUnencryptedHTTP2(true)
	t.Cleanup(tr.CloseIdleConnections)
	return skiffv1connect.NewEventSourceServiceClient(&http.Client{Transport: tr}, srv.URL, opts...)
}

var protocols = []struct {
	name string
	opts []connect.ClientOption
}{
	{"connect", nil},
	{"grpc", []connect.ClientOption{connect.WithGRPC()}},
}

// wantRPCErr checks an RPC error's code and field.
func wantRPCErr(t *testing.T, what string, err error, code connect.Code, field string) {
	t.Helper()
	var ce *connect.Error
	if !errors.As(err, &ce) {
		t.Fatalf("%s: got %v, want a connect error with code %v", what, err, code)
	}
	if ce.Code() != code {
		t.Fatalf("%s: got code %v (%v), want %v", what, ce.Code(), err, code)
	}
	if got := ce.Meta().Get(errs.HeaderField); got != field {
		t.Fatalf("%s: got field %q (%v), want %q", what, got, err, field)
	}
}

func TestCRUDOverRPC(t *testing.T) {
	for _, p := range protocols {
		t.Run(p.name, func(t *testing.T) {
			e := newEnv(t, testConfig())
			c := serve(t, e.s, p.opts...)
			ctx := testCtx(t)

			cr, err := c.CreateEventSourceMapping(ctx, connect.NewRequest(&skiffv1.CreateEventSourceMappingRequest{
				Mapping: &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders"},
			}))
			if err != nil {
				t.Fatalf("Create: %v", err)
			}
			m := cr.Msg.GetMapping()
			if !validUUID(m.GetUuid()) || m.GetRevision() == 0 || m.GetLastModified() == "" {
				t.Fatalf("created mapping lacks uuid, revision or last_modified: %v", m)
			}
			want := &skiffv1.EventSourceMapping{
				Uuid: m.GetUuid(), FunctionName: "worker", Queue: "orders",
				BatchSize: proto.Int32(10), MaximumBatchingWindowSeconds: proto.Int32(0), Enabled: proto.Bool(true),
				State: "Enabled", LastModified: m.GetLastModified(), Revision: m.GetRevision(),
			}
			if d := cmp.Diff(want, m, protocmp.Transform()); d != "" {
				t.Fatalf("created mapping (-want +got):\n%s", d)
			}

			gr, err := c.GetEventSourceMapping(ctx, connect.NewRequest(&skiffv1.GetEventSourceMappingRequest{Uuid: m.GetUuid()}))
			if err != nil {
				t.Fatalf("Get: %v", err)
			}
			if d := cmp.Diff(want, gr.Msg.GetMapping(), protocmp.Transform()); d != "" {
				t.Fatalf("got mapping (-want +got):\n%s", d)
			}

			// A second mapping, then list with and without filters.
			cr2, err := c.CreateEventSourceMapping(ctx, connect.NewRequest(&skiffv1.CreateEventSourceMappingRequest{
				Mapping: &skiffv1.EventSourceMapping{FunctionName: "other-worker", Queue: "orders", BatchSize: proto.Int32(500),
					MaximumBatchingWindowSeconds: proto.Int32(5), MaximumConcurrency: proto.Int32(7),
					FunctionResponseTypes: []string{"ReportBatchItemFailures", "ReportBatchItemFailures"}, Enabled: proto.Bool(false)},
			}))
			if err != nil {
				t.Fatalf("Create second: %v", err)
			}
			m2 := cr2.Msg.GetMapping()
			if m2.GetState() != "Disabled" || m2.GetBatchSize() != 500 || m2.GetMaximumConcurrency() != 7 || len(m2.GetFunctionResponseTypes()) != 1 {
				t.Fatalf("second mapping: got %v, want Disabled, batch 500, concurrency 7, one response type", m2)
			}
			for _, tt := range []struct {
				fn, queue string
				want      []string
			}{
				{"", "", []string{m2.GetUuid(), m.GetUuid()}}, // ordered by function name
				{"worker", "", []string{m.GetUuid()}},
				{"", "orders", []string{m2.GetUuid(), m.GetUuid()}},
				{"", "other", nil},
				{"other-worker", "orders", []string{m2.GetUuid()}},
			} {
				lr, err := c.ListEventSourceMappings(ctx, connect.NewRequest(&skiffv1.ListEventSourceMappingsRequest{FunctionName: tt.fn, Queue: tt.queue}))
				if err != nil {
					t.Fatalf("List(%q, %q): %v", tt.fn, tt.queue, err)
				}
				var got []string
				for _, x := range lr.Msg.GetMappings() {
					got = append(got, x.GetUuid())
				}
				if d := cmp.Diff(tt.want, got); d != "" {
					t.Fatalf("List(%q, %q) uuids (-want +got):\n%s", tt.fn, tt.queue, d)
				}
			}

			// Update with a mask: clearing maximum_concurrency, enabling.
			ur, err := c.UpdateEventSourceMapping(ctx, connect.NewRequest(&skiffv1.UpdateEventSourceMappingRequest{
				Uuid:       m2.GetUuid(),
				Mapping:    &skiffv1.EventSourceMapping{Enabled: proto.Bool(true), BatchSize: proto.Int32(10)},
				UpdateMask: []string{"maximum_concurrency", "enabled"},
			}))
			if err != nil {
				t.Fatalf("Update: %v", err)
			}
			u := ur.Msg.GetMapping()
			if u.MaximumConcurrency != nil || u.GetState() != "Enabled" || u.GetBatchSize() != 500 || u.GetRevision() <= m2.GetRevision() {
				t.Fatalf("updated mapping: got %v, want no maximum_concurrency, Enabled, batch 500 (not in the mask), a newer revision", u)
			}
			// Update without a mask: the set fields.
			ur, err = c.UpdateEventSourceMapping(ctx, connect.NewRequest(&skiffv1.UpdateEventSourceMappingRequest{
				Uuid:    m2.GetUuid(),
				Mapping: &skiffv1.EventSourceMapping{MaximumBatchingWindowSeconds: proto.Int32(300), MaximumConcurrency: proto.Int32(1000)},
			}))
			if err != nil {
				t.Fatalf("Update without mask: %v", err)
			}
			if u := ur.Msg.GetMapping(); u.GetMaximumBatchingWindowSeconds() != 300 || u.GetMaximumConcurrency() != 1000 || u.GetBatchSize() != 500 {
				t.Fatalf("updated mapping: got %v, want window 300, concurrency 1000, batch 500", u)
			}
			// A stale revision is a conflict.
			_, err = c.UpdateEventSourceMapping(ctx, connect.NewRequest(&skiffv1.UpdateEventSourceMappingRequest{
				Uuid:    m2.GetUuid(),
				Mapping: &skiffv1.EventSourceMapping{BatchSize: proto.Int32(20), Revision: m2.GetRevision()},
			}))
			wantRPCErr(t, "update at a stale revision", err, connect.CodeAborted, "")

			// Delete, then it is gone.
			if _, err := c.DeleteEventSourceMapping(ctx, connect.NewRequest(&skiffv1.DeleteEventSourceMappingRequest{Uuid: m.GetUuid()})); err != nil {
				t.Fatalf("Delete: %v", err)
			}
			_, err = c.GetEventSourceMapping(ctx, connect.NewRequest(&skiffv1.GetEventSourceMappingRequest{Uuid: m.GetUuid()}))
			wantRPCErr(t, "get after delete", err, connect.CodeNotFound, "")
			_, err = c.DeleteEventSourceMapping(ctx, connect.NewRequest(&skiffv1.DeleteEventSourceMappingRequest{Uuid: m.GetUuid()}))
			wantRPCErr(t, "delete twice", err, connect.CodeNotFound, "")
			// The pair can be mapped again once deleted.
			if _, err := e.s.Create(ctx, &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders"}); err != nil {
				t.Fatalf("re-creating a deleted pair: %v", err)
			}
		})
	}
}

func TestBadInputChangesNothing(t *testing.T) {
	e := newEnv(t, testConfig())
	ctx := testCtx(t)
	base := e.create(t, &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders", BatchSize: proto.Int32(5)})
	i32 := proto.Int32
	mk := func(f func(m *skiffv1.EventSourceMapping)) *skiffv1.EventSourceMapping {
		m := &skiffv1.EventSourceMapping{FunctionName: "other-worker", Queue: "other"}
		f(m)
		return m
	}
	creates := []struct {
		name  string
		m     *skiffv1.EventSourceMapping
		code  connect.Code
		field string
	}{
		{"no mapping", nil, connect.CodeInvalidArgument, "mapping"},
		{"uuid set", mk(func(m *skiffv1.EventSourceMapping) { m.Uuid = newUUID() }), connect.CodeInvalidArgument, "uuid"},
		{"no function", mk(func(m *skiffv1.EventSourceMapping) { m.FunctionName = "" }), connect.CodeInvalidArgument, "function_name"},
		{"bad function name", mk(func(m *skiffv1.EventSourceMapping) { m.FunctionName = "a/b" }), connect.CodeInvalidArgument, "function_name"},
		{"missing function", mk(func(m *skiffv1.EventSourceMapping) { m.FunctionName = "ghost" }), connect.CodeNotFound, ""},
		{"no queue", mk(func(m *skiffv1.EventSourceMapping) { m.Queue = "" }), connect.CodeInvalidArgument, "queue"},
		{"bad queue name", mk(func(m *skiffv1.EventSourceMapping) { m.Queue = "a.b" }), connect.CodeInvalidArgument, "queue"},
		{"missing queue", mk(func(m *skiffv1.EventSourceMapping) { m.Queue = "ghost" }), connect.CodeInvalidArgument, "queue"},
		{"batch 0", mk(func(m *skiffv1.EventSourceMapping) { m.BatchSize = i32(0) }), connect.CodeInvalidArgument, "batch_size"},
		{"batch 10001", mk(func(m *skiffv1.EventSourceMapping) { m.BatchSize = i32(10001); m.MaximumBatchingWindowSeconds = i32(1) }), connect.CodeInvalidArgument, "batch_size"},
		{"batch 11 without window", mk(func(m *skiffv1.EventSourceMapping) { m.BatchSize = i32(11) }), connect.CodeInvalidArgument, "batch_size"},
		{"window -1", mk(func(m *skiffv1.EventSourceMapping) { m.MaximumBatchingWindowSeconds = i32(-1) }), connect.CodeInvalidArgument, "maximum_batching_window_seconds"},
		{"window 301", mk(func(m *skiffv1.EventSourceMapping) { m.MaximumBatchingWindowSeconds = i32(301) }), connect.CodeInvalidArgument, "maximum_batching_window_seconds"},
		{"fifo batch 11", mk(func(m *skiffv1.EventSourceMapping) {
			m.Queue = "jobs.fifo"
			m.BatchSize = i32(11)
			m.MaximumBatchingWindowSeconds = i32(0)
		}), connect.CodeInvalidArgument, "batch_size"},
		{"fifo window", mk(func(m *skiffv1.EventSourceMapping) { m.Queue = "jobs.fifo"; m.MaximumBatchingWindowSeconds = i32(1) }), connect.CodeInvalidArgument, "maximum_batching_window_seconds"},
		{"concurrency 1", mk(func(m *skiffv1.EventSourceMapping) { m.MaximumConcurrency = i32(1) }), connect.CodeInvalidArgument, "maximum_concurrency"},
		{"concurrency 1001", mk(func(m *skiffv1.EventSourceMapping) { m.MaximumConcurrency = i32(1001) }), connect.CodeInvalidArgument, "maximum_concurrency"},
		{"response type", mk(func(m *skiffv1.EventSourceMapping) { m.FunctionResponseTypes = []string{"ReportBatchItemFailure"} }), connect.CodeInvalidArgument, "function_response_types"},
		{"duplicate pair", &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders"}, connect.CodeAlreadyExists, ""},
	}
	ids := []string{base.GetUuid()}
	updates := []struct {
		name  string
		uuid  string
		m     *skiffv1.EventSourceMapping
		mask  []string
		code  connect.Code
		field string
	}{
		{"no uuid", "", &skiffv1.EventSourceMapping{BatchSize: i32(3)}, nil, connect.CodeInvalidArgument, "uuid"},
		{"bad uuid", "nope", &skiffv1.EventSourceMapping{BatchSize: i32(3)}, nil, connect.CodeInvalidArgument, "uuid"},
		{"unknown uuid", newUUID(), &skiffv1.EventSourceMapping{BatchSize: i32(3)}, nil, connect.CodeNotFound, ""},
		{"no mapping", base.GetUuid(), nil, nil, connect.CodeInvalidArgument, "mapping"},
		{"nothing set", base.GetUuid(), &skiffv1.EventSourceMapping{}, nil, connect.CodeInvalidArgument, "mapping"},
		{"queue in mask", base.GetUuid(), &skiffv1.EventSourceMapping{Queue: "other"}, []string{"queue"}, connect.CodeInvalidArgument, "update_mask"},
		{"queue set", base.GetUuid(), &skiffv1.EventSourceMapping{Queue: "other"}, nil, connect.CodeInvalidArgument, "queue"},
		{"unknown mask field", base.GetUuid(), &skiffv1.EventSourceMapping{BatchSize: i32(3)}, []string{"batchsize"}, connect.CodeInvalidArgument, "update_mask"},
		{"other uuid in mapping", base.GetUuid(), &skiffv1.EventSourceMapping{Uuid: newUUID(), BatchSize: i32(3)}, nil, connect.CodeInvalidArgument, "mapping.uuid"},
		{"batch out of range", base.GetUuid(), &skiffv1.EventSourceMapping{BatchSize: i32(20000)}, nil, connect.CodeInvalidArgument, "batch_size"},
		{"batch over 10, window 0", base.GetUuid(), &skiffv1.EventSourceMapping{BatchSize: i32(11)}, nil, connect.CodeInvalidArgument, "batch_size"},
		{"clearing batch to default in mask is fine but window -1 is not", base.GetUuid(), &skiffv1.EventSourceMapping{MaximumBatchingWindowSeconds: i32(-1)}, []string{"batch_size", "maximum_batching_window_seconds"}, connect.CodeInvalidArgument, "maximum_batching_window_seconds"},
		{"concurrency 0", base.GetUuid(), &skiffv1.EventSourceMapping{MaximumConcurrency: i32(0)}, nil, connect.CodeInvalidArgument, "maximum_concurrency"},
		{"response type", base.GetUuid(), &skiffv1.EventSourceMapping{FunctionResponseTypes: []string{"x"}}, nil, connect.CodeInvalidArgument, "function_response_types"},
		{"missing function", base.GetUuid(), &skiffv1.EventSourceMapping{FunctionName: "ghost"}, nil, connect.CodeNotFound, ""},
		{"bad function name", base.GetUuid(), &skiffv1.EventSourceMapping{FunctionName: "bad name"}, nil, connect.CodeInvalidArgument, "function_name"},
	}
	for _, p := range protocols {
		t.Run(p.name, func(t *testing.T) {
			c := serve(t, e.s, p.opts...)
			before := snapshot(t, e)
			for _, tt := range creates {
				_, err := c.CreateEventSourceMapping(ctx, connect.NewRequest(&skiffv1.CreateEventSourceMappingRequest{Mapping: tt.m}))
				wantRPCErr(t, "create: "+tt.name, err, tt.code, tt.field)
			}
			for _, tt := range updates {
				_, err := c.UpdateEventSourceMapping(ctx, connect.NewRequest(&skiffv1.UpdateEventSourceMappingRequest{Uuid: tt.uuid, Mapping: tt.m, UpdateMask: tt.mask}))
				wantRPCErr(t, "update: "+tt.name, err, tt.code, tt.field)
			}
			for _, bad := range []string{"", "x", "../" + ids[0][3:]} {
				_, err := c.GetEventSourceMapping(ctx, connect.NewRequest(&skiffv1.GetEventSourceMappingRequest{Uuid: bad}))
				wantRPCErr(t, "get "+bad, err, connect.CodeInvalidArgument, "uuid")
				_, err = c.DeleteEventSourceMapping(ctx, connect.NewRequest(&skiffv1.DeleteEventSourceMappingRequest{Uuid: bad}))
				wantRPCErr(t, "delete "+bad, err, connect.CodeInvalidArgument, "uuid")
			}
			_, err := c.ListEventSourceMappings(ctx, connect.NewRequest(&skiffv1.ListEventSourceMappingsRequest{FunctionName: "no such/name"}))
			wantRPCErr(t, "list with a bad function filter", err, connect.CodeInvalidArgument, "function_name")
			if d := cmp.Diff(before, snapshot(t, e), protocmp.Transform()); d != "" {
				t.Fatalf("bad input changed the stored mappings (-before +after):\n%s", d)
			}
		})
	}
}

// snapshot lists every stored mapping.
func snapshot(t *testing.T, e *env) []*skiffv1.EventSourceMapping {
	t.Helper()
	all, err := e.s.List(testCtx(t), "", "")
	if err != nil {
		t.Fatal(err)
	}
	return all
}

func TestUpdateFunctionNameAndUniqueness(t *testing.T) {
	e := newEnv(t, testConfig())
	ctx := testCtx(t)
	a := e.create(t, &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders"})
	e.create(t, &skiffv1.EventSourceMapping{FunctionName: "other-worker", Queue: "orders"})
	_, err := e.s.Update(ctx, a.GetUuid(), &skiffv1.EventSourceMapping{FunctionName: "other-worker"}, nil)
	wantKind(t, "moving a mapping onto an existing pair", err, errs.KindAlreadyExists)
	// Setting the function to the one it has is no conflict with itself.
	u, err := e.s.Update(ctx, a.GetUuid(), &skiffv1.EventSourceMapping{FunctionName: "worker", BatchSize: proto.Int32(2)}, nil)
	if err != nil {
		t.Fatalf("updating with the same function: %v", err)
	}
	if u.GetBatchSize() != 2 || u.GetFunctionName() != "worker" {
		t.Fatalf("got %v, want batch 2 for worker", u)
	}
	e.fns.names["third"] = true
	u, err = e.s.Update(ctx, a.GetUuid(), &skiffv1.EventSourceMapping{FunctionName: "third"}, []string{"function_name"})
	if err != nil || u.GetFunctionName() != "third" {
		t.Fatalf("moving to another function: got %v, %v; want function third", u, err)
	}
}
