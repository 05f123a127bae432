package destinations

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/protobuf/testing/protocmp"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

var testKey = []byte("0123456789abcdef0123456789abcdef")

// fakeQueues is a QueueSender made of funcs; unset funcs succeed.
type fakeQueues struct {
	send   func(ctx context.Context, req *skiffv1.SendMessageRequest) (*skiffv1.SendMessageResponse, error)
	exists func(ctx context.Context, name string) error
}

func (f *fakeQueues) Send(ctx context.Context, req *skiffv1.SendMessageRequest) (*skiffv1.SendMessageResponse, error) {
	if f.send == nil {
		return &skiffv1.SendMessageResponse{MessageId: "m"}, nil
	}
	return f.send(ctx, req)
}

func (f *fakeQueues) Exists(ctx context.Context, name string) error {
	if f.exists == nil {
		return nil
	}
	return f.exists(ctx, name)
}

// fakeFunctions is an AsyncInvoker made of funcs; unset funcs succeed.
type fakeFunctions struct {
	invoke func(ctx context.Context, function string, payload []byte, depth int) error
	exists func(ctx context.Context, name string) error
}

func (f *fakeFunctions) InvokeAsync(ctx context.Context, function string, payload []byte, depth int) error {
	if f.invoke == nil {
		return nil
	}
	return f.invoke(ctx, function, payload, depth)
}

func (f *fakeFunctions) Exists(ctx context.Context, name string) error {
	if f.exists == nil {
		return nil
	}
	return f.exists(ctx, name)
}

var (
	_ QueueSender  = (*fakeQueues)(nil)
	_ AsyncInvoker = (*fakeFunctions)(nil)
)

func existsOnly(names ...string) func(context.Context, string) error {
	return func(_ context.Context, name string) error {
		for _, n := range names {
			if n == name {
				return nil
			}
		}
		return errs.NotFound("%q does not exist", name)
	}
}

func newWriter(t *testing.T, cfg Config, q QueueSender, fn AsyncInvoker) (*Writer, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	if cfg.SigningKey == nil {
		cfg.SigningKey = testKey
	}
	cfg.Registry = reg
	w, err := New(cfg, q, fn)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return w, reg
}

func testRecord() *Record {
	return &Record{
		Version:   RecordVersion,
		Timestamp: "2024-05-01T10:00:00.000Z",
		RequestContext: RequestContext{
			RequestID:              "req-1",
			FunctionArn:            "arn:aws:lambda:local:000000000000:function:src:$LATEST",
			Condition:              ConditionSuccess,
			ApproximateInvokeCount: 1,
		},
		RequestPayload:  json.RawMessage(`{"in":1}`),
		ResponseContext: ResponseContext{StatusCode: 200, ExecutedVersion: "$LATEST"},
		ResponsePayload: json.RawMessage(`{"out":2}`),
	}
}

func TestNewConfig(t *testing.T) {
	tests := []struct {
		name    string
		cfg     Config
		wantErr string
	}{
		{name: "no key", cfg: Config{}, wantErr: "signing key is 0 bytes"},
		{name: "short key", cfg: Config{SigningKey: []byte("short")}, wantErr: "signing key is 5 bytes"},
		{name: "negative depth", cfg: Config{SigningKey: testKey, MaxDepth: -1}, wantErr: "negative"},
		{name: "defaults", cfg: Config{SigningKey: testKey}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w, err := New(tt.cfg, nil, nil)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("New error = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			c := w.cfg
			if c.MaxDepth != DefaultMaxDepth || c.MaxAttempts != DefaultMaxAttempts || c.BaseDelay != DefaultBaseDelay || c.MaxDelay != DefaultMaxDelay || c.WebhookTimeout != DefaultWebhookTimeout {
				t.Errorf("defaults: got depth %d attempts %d base %s max %s timeout %s", c.MaxDepth, c.MaxAttempts, c.BaseDelay, c.MaxDelay, c.WebhookTimeout)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	q := &fakeQueues{exists: existsOnly("orders", "events.fifo")}
	fn := &fakeFunctions{exists: existsOnly("next")}
	w, _ := newWriter(t, Config{}, q, fn)
	tests := []struct {
		target   string
		wantKind errs.Kind // KindUnknown: no error
	}{
		{"queue:orders", errs.KindUnknown},
		{"queue:events.fifo", errs.KindUnknown},
		{"queue:missing", errs.KindNotFound},
		{"function:next", errs.KindUnknown},
		{"function:missing", errs.KindNotFound},
		{"https://hooks.example.com/x", errs.KindUnknown},
		{"http://127.0.0.1:1/x", errs.KindUnknown},
		{"http://hooks.example.com/x", errs.KindInvalidArgument},
		{"queue:bad name", errs.KindInvalidArgument},
		{"nowhere", errs.KindInvalidArgument},
		{"", errs.KindInvalidArgument},
	}
	for _, tt := range tests {
		err := w.Validate(context.Background(), tt.target)
		if tt.wantKind == errs.KindUnknown {
			if err != nil {
				t.Errorf("Validate(%q) = %v, want nil", tt.target, err)
			}
			continue
		}
		if got := errs.KindOf(err); got != tt.wantKind {
			t.Errorf("Validate(%q) = %v (kind %v), want kind %v", tt.target, err, got, tt.wantKind)
		}
		if tt.wantKind == errs.KindNotFound && errorReason(err) != "destination_not_found" {
			t.Errorf("Validate(%q) reason = %q, want destination_not_found", tt.target, errorReason(err))
		}
	}

	// A failure that is not "not found" passes through with its kind.
	q.exists = func(context.Context, string) error { return errs.Unavailable("storage is down") }
	if err := w.Validate(context.Background(), "queue:orders"); !errs.Is(err, errs.KindUnavailable) {
		t.Errorf("Validate with storage down = %v, want unavailable", err)
	}

	// Without a queue sender or async invoker those targets are refused.
	bare, _ := newWriter(t, Config{}, nil, nil)
	for _, target := range []string{"queue:orders", "function:next"} {
		if err := bare.Validate(context.Background(), target); !errs.IsInvalid(err) {
			t.Errorf("Validate(%q) without a backend = %v, want invalid_argument", target, err)
		}
	}
}

func TestDeliverQueue(t *testing.T) {
	rec := testRecord()
	body, err := rec.Encode()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		queue string
		rec   func() *Record
		want  *skiffv1.SendMessageRequest
	}{
		{
			name:  "standard",
			queue: "orders",
			rec:   testRecord,
			want:  &skiffv1.SendMessageRequest{Queue: "orders", Body: string(body)},
		},
		{
			name:  "fifo",
			queue: "orders.fifo",
			rec:   testRecord,
			want: &skiffv1.SendMessageRequest{
				Queue: "orders.fifo", Body: string(body),
				MessageGroupId:         "arn:aws:lambda:local:000000000000:function:src:$LATEST",
				MessageDeduplicationId: "req-1:Success",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []*skiffv1.SendMessageRequest
			q := &fakeQueues{send: func(_ context.Context, req *skiffv1.SendMessageRequest) (*skiffv1.SendMessageResponse, error) {
				got = append(got, req)
				return &skiffv1.SendMessageResponse{MessageId: "m1"}, nil
			}}
			w, reg := newWriter(t, Config{}, q, nil)
			if err := w.Deliver(context.Background(), "queue:"+tt.queue, 0, tt.rec()); err != nil {
				t.Fatalf("Deliver: %v", err)
			}
			if diff := cmp.Diff([]*skiffv1.SendMessageRequest{tt.want}, got, protocmp.Transform()); diff != "" {
				t.Errorf("sent messages (-want +got):\n%s", diff)
			}
			if n := deliveries(t, reg, KindQueue, "delivered"); n != 1 {
				t.Errorf("delivered queue records metric = %v, want 1", n)
			}
			if n := histogramCount(t, reg, "skiff_destination_delivery_duration_seconds"); n != 1 {
				t.Errorf("delivery duration observations = %d, want 1", n)
			}
		})
	}
}

func TestDeliverQueueErrorKeepsKind(t *testing.T) {
	q := &fakeQueues{send: func(context.Context, *skiffv1.SendMessageRequest) (*skiffv1.SendMessageResponse, error) {
		return nil, errs.Invalid("body", "message is 300000 bytes, over the queue's maximum of 262144")
	}}
	w, reg := newWriter(t, Config{}, q, nil)
	err := w.Deliver(context.Background(), "queue:small", 0, testRecord())
	if !errs.IsInvalid(err) || !strings.Contains(err.Error(), `destination queue "small"`) {
		t.Errorf("Deliver = %v, want the queue's invalid_argument error wrapped with the queue name", err)
	}
	if n := deliveries(t, reg, KindQueue, "failed"); n != 1 {
		t.Errorf("failed queue records metric = %v, want 1", n)
	}
}

func TestDeliverFunctionAndDepthLimit(t *testing.T) {
	type call struct {
		function string
		payload  string
		depth    int
	}
	var (
		mu    sync.Mutex
		calls []call
	)
	fn := &fakeFunctions{invoke: func(_ context.Context, function string, payload []byte, depth int) error {
		mu.Lock()
		defer mu.Unlock()
		calls = append(calls, call{function, string(payload), depth})
		return nil
	}}
	var sent int
	q := &fakeQueues{send: func(context.Context, *skiffv1.SendMessageRequest) (*skiffv1.SendMessageResponse, error) {
		sent++
		return &skiffv1.SendMessageResponse{}, nil
	}}
	w, reg := newWriter(t, Config{MaxDepth: 3}, q, fn)
	rec := testRecord()
	body, _ := rec.Encode()

	for depth := range 3 {
		if err := w.Deliver(context.Background(), "function:next", depth, rec); err != nil {
			t.Fatalf("Deliver at depth %d: %v", depth, err)
		}
	}
	want := []call{{"next", string(body), 1}, {"next", string(body), 2}, {"next", string(body), 3}}
	if diff := cmp.Diff(want, calls, cmp.AllowUnexported(call{})); diff != "" {
		t.Errorf("async invokes (-want +got):\n%s", diff)
	}

	// At the limit a function target is refused; queues still take the record.
	for _, depth := range []int{3, 10} {
		err := w.Deliver(context.Background(), "function:next", depth, rec)
		if !errs.Is(err, errs.KindFailedPrecondition) || errorReason(err) != "destination_depth_exceeded" {
			t.Errorf("Deliver at depth %d = %v, want failed_precondition destination_depth_exceeded", depth, err)
		}
	}
	if len(calls) != 3 {
		t.Errorf("async invokes after refusals = %d, want 3", len(calls))
	}
	if err := w.Deliver(context.Background(), "queue:sink", 3, rec); err != nil || sent != 1 {
		t.Errorf("queue Deliver at the depth limit = %v (sent %d), want delivered", err, sent)
	}
	if n := deliveries(t, reg, KindFunction, "depth_exceeded"); n != 2 {
		t.Errorf("depth_exceeded metric = %v, want 2", n)
	}
	if n := deliveries(t, reg, KindFunction, "delivered"); n != 3 {
		t.Errorf("delivered function records metric = %v, want 3", n)
	}

	// The invoker's error is returned with its kind.
	fn.invoke = func(context.Context, string, []byte, int) error { return errs.NotFound("function gone") }
	if err := w.Deliver(context.Background(), "function:next", 0, rec); !errs.IsNotFound(err) {
		t.Errorf("Deliver to a deleted function = %v, want not_found", err)
	}
}

func TestDeliverBadInput(t *testing.T) {
	w, reg := newWriter(t, Config{}, &fakeQueues{}, nil)
	tests := []struct {
		name   string
		target string
		depth  int
		rec    *Record
		kind   errs.Kind
	}{
		{"bad target", "nowhere", 0, testRecord(), errs.KindInvalidArgument},
		{"nil record", "queue:q", 0, nil, errs.KindInvalidArgument},
		{"negative depth", "queue:q", -1, testRecord(), errs.KindInvalidArgument},
		{"no async invoker", "function:f", 0, testRecord(), errs.KindInvalidArgument},
	}
	for _, tt := range tests {
		if err := w.Deliver(context.Background(), tt.target, tt.depth, tt.rec); errs.KindOf(err) != tt.kind {
			t.Errorf("%s: Deliver = %v, want kind %v", tt.name, err, tt.kind)
		}
	}
	if n := deliveries(t, reg, "invalid", "failed"); n != 1 {
		t.Errorf("invalid target metric = %v, want 1", n)
	}
}

func TestFifoID(t *testing.T) {
	tests := []struct {
		in, fallback string
		want         string // "hash": a 64-character sha256 hex of in
	}{
		{"abc:Success", "", "abc:Success"},
		{"", "fallback", "fallback"},
		{strings.Repeat("x", 128), "", strings.Repeat("x", 128)},
		{strings.Repeat("x", 129), "", "hash"},
		{"has space", "", "hash"},
		{"caf\u00e9", "", "hash"},
	}
	for _, tt := range tests {
		got := fifoID(tt.in, tt.fallback)
		want := tt.want
		if want == "hash" {
			sum := sha256.Sum256([]byte(tt.in))
			want = hex.EncodeToString(sum[:])
		}
		if got != want {
			t.Errorf("fifoID(%q) = %q, want %q", truncate(tt.in, 20), got, want)
		}
	}
}

// metric finds the metric family name in reg and the series whose labels
// are exactly labels (name, value pairs); nil when there is none.
func metric(t *testing.T, reg *prometheus.Registry, name string, labels ...string) *dto.Metric {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatalf("gathering metrics: %v", err)
	}
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
	series:
		for _, m := range f.GetMetric() {
			if len(m.GetLabel())*2 != len(labels) {
				continue
			}
			for i, l := range m.GetLabel() {
				if l.GetName() != labels[2*i] || l.GetValue() != labels[2*i+1] {
					continue series
				}
			}
			return m
		}
	}
	return nil
}

// deliveries is the value of skiff_destination_deliveries_total{kind,outcome}.
func deliveries(t *testing.T, reg *prometheus.Registry, kind, outcome string) float64 {
	t.Helper()
	return metric(t, reg, "skiff_destination_deliveries_total", "kind", kind, "outcome", outcome).GetCounter().GetValue()
}

// webhookAttempts is the value of skiff_destination_webhook_attempts_total{outcome}.
func webhookAttempts(t *testing.T, reg *prometheus.Registry, outcome string) float64 {
	t.Helper()
	return metric(t, reg, "skiff_destination_webhook_attempts_total", "outcome", outcome).GetCounter().GetValue()
}

func histogramCount(t *testing.T, reg *prometheus.Registry, name string) uint64 {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatalf("gathering metrics: %v", err)
	}
	var n uint64
	for _, f := range fams {
		if f.GetName() == name {
			for _, m := range f.GetMetric() {
				n += m.GetHistogram().GetSampleCount()
			}
		}
	}
	return n
}

// TestDeliverJSON: a stream batch's OnFailure record goes to a queue as is
// (FIFO queues deduplicate it by request id and content); function
// targets are refused, since the record is not an invocation record.
func TestDeliverJSON(t *testing.T) {
	var sent []*skiffv1.SendMessageRequest
	q := &fakeQueues{send: func(_ context.Context, req *skiffv1.SendMessageRequest) (*skiffv1.SendMessageResponse, error) {
		sent = append(sent, req)
		return &skiffv1.SendMessageResponse{MessageId: "m"}, nil
	}}
	w, _ := newWriter(t, Config{SigningKey: testKey}, q, &fakeFunctions{})
	body := []byte(`{"KinesisBatchInfo":{"shardId":"shardId-000000000000","batchSize":1}}`)
	ctx := context.Background()
	if err := w.DeliverJSON(ctx, "queue:failed", "req-1", body); err != nil {
		t.Fatal(err)
	}
	if err := w.DeliverJSON(ctx, "queue:failed.fifo", "req-1", body); err != nil {
		t.Fatal(err)
	}
	if len(sent) != 2 || sent[0].Body != string(body) || sent[0].MessageGroupId != "" ||
		sent[1].MessageGroupId == "" || sent[1].MessageDeduplicationId == "" {
		t.Fatalf("sent %v, want the body as is, with group and dedup ids on the FIFO queue", sent)
	}
	if err := w.DeliverJSON(ctx, "function:other", "req-1", body); !errs.IsInvalid(err) {
		t.Fatalf("function target: got %v, want InvalidArgument", err)
	}
	if len(sent) != 2 {
		t.Fatal("a refused target sent something")
	}
}
