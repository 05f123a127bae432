package streams

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/esm"
	"skiff.dev/skiff/gateway/kinesis"
	"skiff.dev/skiff/gateway/lease"
	"skiff.dev/skiff/gateway/store"
)

func testCtx(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// eventually polls cond until it holds or 30 s pass.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not true after 30s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// clock is an injected clock tests move by hand.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// env is one NATS, one stream store and one leasing service; gateways are
// Services on them.
type env struct {
	st   *store.Store
	data *kinesis.Store
	ls   *lease.Service
	now  func() time.Time
	dest *fakeDest
}

func newEnv(t testing.TB, now func() time.Time) *env {
	t.Helper()
	return newEnvExpiry(t, now, 3*time.Second)
}

// newEnvExpiry is newEnv with a lease expiry (heartbeats every 150 ms).
func newEnvExpiry(t testing.TB, now func() time.Time, expiry time.Duration) *env {
	t.Helper()
	ctx := testCtx(t)
	st, err := store.Open(ctx, store.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatalf("store.Open: %v", err)
	}
	t.Cleanup(func() { _ = st.Close() })
	if now == nil {
		now = time.Now
	}
	data, err := kinesis.New(ctx, st.JetStream(), kinesis.Config{Now: now})
	if err != nil {
		t.Fatalf("kinesis.New: %v", err)
	}
	ls, err := lease.New(ctx, st.JetStream(), lease.Config{Expiry: expiry, Interval: 150 * time.Millisecond})
	if err != nil {
		t.Fatalf("lease.New: %v", err)
	}
	return &env{st: st, data: data, ls: ls, now: now, dest: &fakeDest{}}
}

// testLogger logs to stderr when STREAMS_TEST_LOG is set.
func testLogger() *slog.Logger {
	if os.Getenv("STREAMS_TEST_LOG") == "" {
		return nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// gateway starts a Service with holder name and runs it until the test
// ends or stop is called.
type gateway struct {
	s      *Service
	cancel context.CancelFunc
	done   chan error
}

func (e *env) gateway(t testing.TB, holder string, inv Invoker) *gateway {
	t.Helper()
	s, err := New(testCtx(t), e.st.JetStream(), Config{
		Now:               e.now,
		PollInterval:      20 * time.Millisecond,
		ShardSyncInterval: 100 * time.Millisecond,
		Backoff:           5 * time.Millisecond,
		MaxBackoff:        50 * time.Millisecond,
		RetryDelay:        time.Millisecond,
		Logger:            testLogger(),
	}, e.data, inv, e.dest, e.ls, holder)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	g := &gateway{s: s, cancel: cancel, done: make(chan error, 1)}
	go func() { g.done <- s.Run(ctx) }()
	t.Cleanup(func() { g.stop(t) })
	return g
}

func (g *gateway) stop(t testing.TB) {
	g.cancel()
	select {
	case err := <-g.done:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
		g.done <- nil
	case <-time.After(10 * time.Second):
		t.Errorf("Run did not return")
	}
	_ = g.s.Close()
}

// crash stops g without releasing its leases, as a killed process.
func (g *gateway) crash(t testing.TB) {
	g.s.mu.Lock()
	g.s.noRelease = true
	g.s.mu.Unlock()
	g.stop(t)
}

func (e *env) createStream(t testing.TB, name string, shards int) {
	t.Helper()
	if _, err := e.data.CreateStream(testCtx(t), &skiffv1.CreateStreamRequest{Name: name, ShardCount: int32(shards)}); err != nil {
		t.Fatalf("CreateStream: %v", err)
	}
}

func (e *env) put(t testing.TB, stream, pk, data string) string {
	t.Helper()
	r, err := e.data.PutRecord(testCtx(t), &skiffv1.PutRecordRequest{Stream: stream, PartitionKey: pk, Data: []byte(data)})
	if err != nil {
		t.Fatalf("PutRecord(%s, %s): %v", pk, data, err)
	}
	return r.GetSequenceNumber()
}

// mapping returns a stream mapping with the esm defaults filled in.
func mapping(stream, fn string) *skiffv1.EventSourceMapping {
	return &skiffv1.EventSourceMapping{
		FunctionName:                 fn,
		Stream:                       stream,
		StartingPosition:             esm.PositionTrimHorizon,
		BatchSize:                    proto.Int32(100),
		MaximumBatchingWindowSeconds: proto.Int32(0),
		ParallelizationFactor:        proto.Int32(1),
		MaximumRetryAttempts:         proto.Int32(-1),
		MaximumRecordAgeSeconds:      proto.Int32(-1),
		Enabled:                      proto.Bool(true),
	}
}

var uuidSeq struct {
	sync.Mutex
	n int
}

func (e *env) esmKV(t testing.TB) jetstream.KeyValue {
	t.Helper()
	kv, err := e.st.JetStream().CreateOrUpdateKeyValue(testCtx(t), jetstream.KeyValueConfig{
		Bucket: esm.Bucket, Description: "skiff event source mappings", History: 1, Storage: jetstream.FileStorage,
	})
	if err != nil {
		t.Fatalf("opening esm bucket: %v", err)
	}
	return kv
}

// putMapping stores m in the esm bucket (as gateway/esm does) and returns
// its uuid.
func (e *env) putMapping(t testing.TB, m *skiffv1.EventSourceMapping) string {
	t.Helper()
	ctx := testCtx(t)
	kv := e.esmKV(t)
	if m.Uuid == "" {
		uuidSeq.Lock()
		uuidSeq.n++
		m.Uuid = fmt.Sprintf("00000000-0000-4000-8000-%012d", uuidSeq.n)
		uuidSeq.Unlock()
	}
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, m.Uuid, b); err != nil {
		t.Fatalf("storing mapping: %v", err)
	}
	return m.Uuid
}

func (e *env) getMapping(t testing.TB, id string) *skiffv1.EventSourceMapping {
	t.Helper()
	kv := e.esmKV(t)
	ent, err := kv.Get(testCtx(t), id)
	if err != nil {
		t.Fatalf("reading mapping %s: %v", id, err)
	}
	m := &skiffv1.EventSourceMapping{}
	if err := proto.Unmarshal(ent.Value(), m); err != nil {
		t.Fatal(err)
	}
	return m
}

// seen is one record as the function saw it.
type seen struct {
	Shard, Seq, PK, Data string
}

// call is one invoke the fake saw.
type call struct {
	N       int // global order
	Records []seen
	Event   map[string]any
	Failed  bool
}

// fakeInvoker parses Kinesis events and answers with respond (nil:
// success with an empty payload).
type fakeInvoker struct {
	mu      sync.Mutex
	calls   []call
	respond func(c call) (*skiffv1.InvokeResponse, error)
}

func (f *fakeInvoker) InvokeSync(ctx context.Context, function string, payload []byte, requestID string) (*skiffv1.InvokeResponse, error) {
	var ev struct {
		Records []struct {
			Kinesis struct {
				PartitionKey   string `json:"partitionKey"`
				SequenceNumber string `json:"sequenceNumber"`
				Data           string `json:"data"`
			} `json:"kinesis"`
			EventID string `json:"eventID"`
		} `json:"Records"`
	}
	if err := json.Unmarshal(payload, &ev); err != nil {
		return nil, fmt.Errorf("bad event: %v", err)
	}
	var raw map[string]any
	_ = json.Unmarshal(payload, &raw)
	c := call{Event: raw}
	for _, r := range ev.Records {
		d, err := base64.StdEncoding.DecodeString(r.Kinesis.Data)
		if err != nil {
			return nil, fmt.Errorf("bad data: %v", err)
		}
		shard, _, _ := strings.Cut(r.EventID, ":")
		c.Records = append(c.Records, seen{Shard: shard, Seq: r.Kinesis.SequenceNumber, PK: r.Kinesis.PartitionKey, Data: string(d)})
	}
	var resp *skiffv1.InvokeResponse
	var err error
	if f.respond != nil {
		resp, err = f.respond(c)
	}
	if resp == nil && err == nil {
		resp = &skiffv1.InvokeResponse{StatusCode: 200}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	c.N = len(f.calls)
	c.Failed = err != nil || resp.GetFunctionError() != ""
	f.calls = append(f.calls, c)
	return resp, err
}

func (f *fakeInvoker) callList() []call {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]call(nil), f.calls...)
}

// succeeded returns the records of successful calls in call order.
func (f *fakeInvoker) succeeded() []seen {
	var out []seen
	for _, c := range f.callList() {
		if !c.Failed {
			out = append(out, c.Records...)
		}
	}
	return out
}

// fakeDest records OnFailure deliveries.
type fakeDest struct {
	mu     sync.Mutex
	bodies []failureRecord
}

func (f *fakeDest) DeliverJSON(_ context.Context, target, requestID string, body []byte) error {
	var r failureRecord
	if err := json.Unmarshal(body, &r); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.bodies = append(f.bodies, r)
	return nil
}

func (f *fakeDest) records() []failureRecord {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]failureRecord(nil), f.bodies...)
}

func fnError() *skiffv1.InvokeResponse {
	return &skiffv1.InvokeResponse{StatusCode: 200, FunctionError: "Unhandled", Payload: []byte(`{"errorMessage":"boom"}`)}
}
