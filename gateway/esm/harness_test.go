package esm

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/store"
	"skiff.dev/skiff/internal/errs"
)

func testCtx(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// openStore opens an embedded NATS store in a temp dir for the test.
func openStore(t testing.TB) *store.Store {
	t.Helper()
	st, err := store.Open(testCtx(t), store.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatalf("store.Open: %v", err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// eventually polls cond until it holds or 15 s pass.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not true after 15s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func wantKind(t testing.TB, what string, err error, want errs.Kind) {
	t.Helper()
	if got := errs.KindOf(err); got != want {
		t.Fatalf("%s: got error %v (kind %v), want kind %v", what, err, got, want)
	}
}

// fakeFunctions is a set of function names.
type fakeFunctions struct {
	mu    sync.Mutex
	names map[string]bool // guarded by mu
}

func newFakeFunctions(names ...string) *fakeFunctions {
	f := &fakeFunctions{names: map[string]bool{}}
	for _, n := range names {
		f.names[n] = true
	}
	return f
}

func (f *fakeFunctions) Exists(_ context.Context, name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.names[name] {
		return errs.NotFound("function %s not found", name)
	}
	return nil
}

// fakeQueues is an in-memory queue service with SQS's receive, delete and
// visibility semantics, minus time: a received message stays in flight
// until it is deleted, made visible again with ChangeVisibility(0), or the
// test calls expire (the visibility timeout passing).
type fakeQueues struct {
	mu       sync.Mutex
	queues   map[string]*fakeQueue // guarded by mu
	changed  chan struct{}         // guarded by mu: closed on every send or return
	nextID   int                   // guarded by mu
	receives int                   // guarded by mu
	// receiveErr, when set, fails every Receive.
	receiveErr error // guarded by mu
}

type fakeQueue struct {
	visible  []*fakeMsg
	inflight map[string]*fakeMsg // by receipt handle
	deleted  []string            // message ids
	vis      []visChange
}

type fakeMsg struct {
	id, body string
	receipt  string
	count    int
}

type visChange struct {
	id string
	d  time.Duration
}

func newFakeQueues(names ...string) *fakeQueues {
	f := &fakeQueues{queues: map[string]*fakeQueue{}, changed: make(chan struct{})}
	for _, n := range names {
		f.queues[n] = &fakeQueue{inflight: map[string]*fakeMsg{}}
	}
	return f
}

func (f *fakeQueues) notifyLocked() {
	close(f.changed)
	f.changed = make(chan struct{})
}

// send adds n messages with bodies prefix-0, prefix-1, ... and returns
// their ids.
func (f *fakeQueues) send(queue, prefix string, n int) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	q := f.queues[queue]
	var ids []string
	for i := range n {
		f.nextID++
		m := &fakeMsg{id: fmt.Sprintf("id-%d", f.nextID), body: fmt.Sprintf("%s-%d", prefix, i)}
		q.visible = append(q.visible, m)
		ids = append(ids, m.id)
	}
	f.notifyLocked()
	return ids
}

// expire makes every in-flight message visible again.
func (f *fakeQueues) expire(queue string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	q := f.queues[queue]
	for rh, m := range q.inflight {
		delete(q.inflight, rh)
		q.visible = append(q.visible, m)
	}
	f.notifyLocked()
}

// counts returns the visible, in-flight and deleted counts of a queue.
func (f *fakeQueues) counts(queue string) (visible, inflight, deleted int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	q := f.queues[queue]
	return len(q.visible), len(q.inflight), len(q.deleted)
}

func (f *fakeQueues) deletedIDs(queue string) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string{}, f.queues[queue].deleted...)
}

func (f *fakeQueues) visChanges(queue string) []visChange {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]visChange{}, f.queues[queue].vis...)
}

func (f *fakeQueues) receiveCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.receives
}

func (f *fakeQueues) Exists(_ context.Context, name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.queues[name] == nil {
		return errs.NotFound("queue %s not found", name)
	}
	return nil
}

func (f *fakeQueues) Receive(ctx context.Context, req *skiffv1.ReceiveMessageRequest) ([]*skiffv1.Message, error) {
	if req.GetMaxMessages() < 1 || req.GetMaxMessages() > 10 {
		return nil, errs.Invalid("max_messages", "max_messages %d out of range 1-10", req.GetMaxMessages())
	}
	wait := time.Duration(req.GetWaitSeconds()) * time.Second
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		f.mu.Lock()
		f.receives++
		if err := f.receiveErr; err != nil {
			f.mu.Unlock()
			return nil, err
		}
		q := f.queues[req.GetQueue()]
		if q == nil {
			f.mu.Unlock()
			return nil, errs.NotFound("queue %s not found", req.GetQueue())
		}
		n := min(int(req.GetMaxMessages()), len(q.visible))
		if n > 0 || wait == 0 {
			var out []*skiffv1.Message
			for _, m := range q.visible[:n] {
				m.count++
				m.receipt = fmt.Sprintf("%s/r%d", m.id, m.count)
				q.inflight[m.receipt] = m
				out = append(out, &skiffv1.Message{
					MessageId:     m.id,
					ReceiptHandle: m.receipt,
					Body:          m.body,
					Attributes:    map[string]string{"ApproximateReceiveCount": fmt.Sprint(m.count), "SentTimestamp": "1700000000000"},
				})
			}
			q.visible = q.visible[n:]
			f.mu.Unlock()
			return out, nil
		}
		ch := f.changed
		f.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-timer.C:
			wait = 0
		case <-ch:
		}
	}
}

func (f *fakeQueues) Delete(_ context.Context, queue, receipt string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	q := f.queues[queue]
	m := q.inflight[receipt]
	if m == nil {
		return errs.Invalid("receipt_handle", "receipt handle %s is not in flight", receipt)
	}
	delete(q.inflight, receipt)
	q.deleted = append(q.deleted, m.id)
	return nil
}

func (f *fakeQueues) ChangeVisibility(_ context.Context, queue, receipt string, d time.Duration) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	q := f.queues[queue]
	m := q.inflight[receipt]
	if m == nil {
		return errs.Invalid("receipt_handle", "receipt handle %s is not in flight", receipt)
	}
	q.vis = append(q.vis, visChange{m.id, d})
	if d == 0 {
		delete(q.inflight, receipt)
		q.visible = append(q.visible, m)
		f.notifyLocked()
	}
	return nil
}

func (f *fakeQueues) Attributes(_ context.Context, name string) (*skiffv1.GetQueueAttributesResponse, error) {
	if err := f.Exists(context.Background(), name); err != nil {
		return nil, err
	}
	return &skiffv1.GetQueueAttributesResponse{Queue: &skiffv1.Queue{Name: name, Arn: "arn:aws:sqs:test-1:123456789012:" + name}}, nil
}

// fakeInvoker calls fn for every invoke and records the calls.
type fakeInvoker struct {
	fn func(ctx context.Context, function string, payload []byte) (*skiffv1.InvokeResponse, error)

	mu      sync.Mutex
	calls   []invokeCall // guarded by mu
	running int          // guarded by mu
	peak    int          // guarded by mu
}

type invokeCall struct {
	function  string
	requestID string
	ids       []string // message ids of the records
	bodies    []string
}

func (f *fakeInvoker) InvokeSync(ctx context.Context, function string, payload []byte, requestID string) (*skiffv1.InvokeResponse, error) {
	ev, err := decodeEvent(payload)
	if err != nil {
		return nil, err
	}
	c := invokeCall{function: function, requestID: requestID}
	for _, r := range ev.Records {
		c.ids = append(c.ids, r.MessageID)
		c.bodies = append(c.bodies, r.Body)
	}
	f.mu.Lock()
	f.calls = append(f.calls, c)
	f.running++
	f.peak = max(f.peak, f.running)
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		f.running--
		f.mu.Unlock()
	}()
	if f.fn == nil {
		return &skiffv1.InvokeResponse{StatusCode: 200, RequestId: requestID}, nil
	}
	return f.fn(ctx, function, payload)
}

func (f *fakeInvoker) callList() []invokeCall {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]invokeCall{}, f.calls...)
}

func (f *fakeInvoker) peakConcurrency() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.peak
}

// fakeLeases is an in-memory leasing service: Keep grants every slot of
// every matching resource to its one holder (a real keeper gives a holder
// one slot per resource; the fake's multi-slot grants exercise the
// per-slot shares) and takes back slots of removed or shrunk resources.
type fakeLeases struct {
	mu      sync.Mutex
	desired map[string]int  // guarded by mu
	removed []string        // guarded by mu
	lostKey map[string]bool // guarded by mu: slots whose Check fails
	epoch   uint64          // guarded by mu
	held    map[string]heldSlot
	poke    chan struct{}
}

func newFakeLeases() *fakeLeases {
	return &fakeLeases{desired: map[string]int{}, lostKey: map[string]bool{}, held: map[string]heldSlot{}, poke: make(chan struct{}, 1)}
}

func (f *fakeLeases) wake() {
	select {
	case f.poke <- struct{}{}:
	default:
	}
}

func (f *fakeLeases) SetDesired(_ context.Context, resource string, slots int) error {
	f.mu.Lock()
	f.desired[resource] = slots
	f.mu.Unlock()
	f.wake()
	return nil
}

func (f *fakeLeases) RemoveResource(_ context.Context, resource string) error {
	f.mu.Lock()
	delete(f.desired, resource)
	f.removed = append(f.removed, resource)
	f.mu.Unlock()
	f.wake()
	return nil
}

func (f *fakeLeases) Resources(context.Context) (map[string]int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[string]int{}
	for k, v := range f.desired {
		out[k] = v
	}
	return out, nil
}

func (f *fakeLeases) desiredOf(resource string) (int, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n, ok := f.desired[resource]
	return n, ok
}

func (f *fakeLeases) wasRemoved(resource string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, r := range f.removed {
		if r == resource {
			return true
		}
	}
	return false
}

// fence makes Check fail for every slot of resource from now on.
func (f *fakeLeases) fence(resource string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for k, l := range f.held {
		if l.Resource == resource {
			f.lostKey[k] = true
		}
	}
}

func (f *fakeLeases) Keep(ctx context.Context, holder string, max int, match func(string) bool, gained, lost func(heldSlot)) error {
	t := time.NewTicker(5 * time.Millisecond) // match() depends on the mappings the service watches
	defer t.Stop()
	for {
		f.mu.Lock()
		var gain, lose []heldSlot
		for k, l := range f.held {
			n, ok := f.desired[l.Resource]
			if !ok || l.Slot >= n || !match(l.Resource) {
				delete(f.held, k)
				lose = append(lose, l)
			}
		}
		for r, n := range f.desired {
			for i := 0; i < n && len(f.held) < max; i++ {
				key := fmt.Sprintf("%s/%d", r, i)
				if _, ok := f.held[key]; ok || !match(r) {
					continue
				}
				f.epoch++
				l := heldSlot{Key: key, Resource: r, Slot: i, Epoch: f.epoch}
				l.Check = func(context.Context) error {
					f.mu.Lock()
					defer f.mu.Unlock()
					if _, ok := f.held[key]; !ok || f.lostKey[key] || f.held[key].Epoch != l.Epoch {
						return errs.New(errs.KindFailedPrecondition, "lease %s lost", key).WithReason("lease_lost")
					}
					return nil
				}
				f.held[key] = l
				gain = append(gain, l)
			}
		}
		f.mu.Unlock()
		for _, l := range lose {
			lost(l)
		}
		for _, l := range gain {
			gained(l)
		}
		select {
		case <-ctx.Done():
			f.mu.Lock()
			var all []heldSlot
			for k, l := range f.held {
				all = append(all, l)
				delete(f.held, k)
			}
			f.mu.Unlock()
			for _, l := range all {
				lost(l)
			}
			return nil
		case <-t.C:
		case <-f.poke:
		}
	}
}

// env is a Service on a real embedded NATS with fake queues, functions,
// invoker and leases.
type env struct {
	s   *Service
	q   *fakeQueues
	fns *fakeFunctions
	inv *fakeInvoker
	ls  *fakeLeases
	st  *store.Store
}

func testConfig() Config {
	return Config{Region: "test-1", AccountID: "123456789012", PollWait: time.Second, Backoff: time.Millisecond, MaxBackoff: 4 * time.Millisecond}
}

func newEnv(t *testing.T, cfg Config) *env {
	t.Helper()
	e := &env{
		q:   newFakeQueues("orders", "other", "jobs.fifo"),
		fns: newFakeFunctions("worker", "other-worker"),
		inv: &fakeInvoker{},
		ls:  newFakeLeases(),
		st:  openStore(t),
	}
	s, err := newService(testCtx(t), e.st.JetStream(), cfg, e.q, e.fns, e.inv, e.ls, "gw-test")
	if err != nil {
		t.Fatalf("newService: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	e.s = s
	return e
}

// run runs the service until the test ends.
func (e *env) run(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(15 * time.Second):
			t.Errorf("Run did not return 15s after its context ended")
		}
	})
}

func (e *env) create(t *testing.T, m *skiffv1.EventSourceMapping) *skiffv1.EventSourceMapping {
	t.Helper()
	out, err := e.s.Create(testCtx(t), m)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	return out
}

// decodedEvent is the event as a function reads it.
type decodedEvent struct {
	Records []sqsRecord `json:"Records"`
}

func decodeEvent(payload []byte) (decodedEvent, error) {
	var ev decodedEvent
	err := jsonUnmarshalStrict(payload, &ev)
	return ev, err
}

func ids(calls []invokeCall) []string {
	var out []string
	for _, c := range calls {
		out = append(out, c.ids...)
	}
	return out
}

func joinIDs(s []string) string { return strings.Join(sorted(s), ",") }

// metricValue reads a counter or gauge.
func metricValue(c prometheus.Metric) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		panic(err)
	}
	if m.Counter != nil {
		return m.Counter.GetValue()
	}
	return m.Gauge.GetValue()
}

func jsonUnmarshalStrict(b []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	return d.Decode(v)
}
