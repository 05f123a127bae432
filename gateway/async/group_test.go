package async

import (
	"bytes"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats.go/jetstream"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/destinations"
	"skiff.dev/skiff/internal/errs"
)

func TestBatchEnvelopeRoundTrip(t *testing.T) {
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC)
	in := []*event{
		{requestID: "a", function: "fn", accepted: t0, depth: 0, payload: []byte(`{"x":1}`)},
		{requestID: "b-2", function: "other", accepted: t0.Add(-time.Second), depth: 3, payload: nil},
		{requestID: "c_3", function: "fn", accepted: t0.Add(time.Hour), payload: bytes.Repeat([]byte{0xff, 0}, 300)},
	}
	m := encodeBatch("async.shared.0", in)
	if got := m.Header.Get(HeaderBatch); got != "3" {
		t.Errorf("%s = %q, want 3", HeaderBatch, got)
	}
	if got := m.Header.Get(HeaderRequestIDs); got != "a,b-2,c_3" {
		t.Errorf("%s = %q", HeaderRequestIDs, got)
	}
	if got := m.Header.Get(HeaderAccepted); got != t0.Add(-time.Second).Format(time.RFC3339Nano) {
		t.Errorf("%s = %q, want the oldest accept", HeaderAccepted, got)
	}
	size := 0
	for _, e := range in {
		size += e.encodedSize()
	}
	if len(m.Data)+len(m.Header.Get(HeaderRequestIDs)) > size+1+10 {
		t.Errorf("envelope %d bytes + ids, over the %d-byte bound", len(m.Data), size)
	}
	out, err := decodeBatch(m.Data)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != len(in) {
		t.Fatalf("decoded %d events, want %d", len(out), len(in))
	}
	for i, e := range out {
		w := in[i]
		if e.requestID != w.requestID || e.function != w.function || !e.accepted.Equal(w.accepted) || e.depth != w.depth ||
			!bytes.Equal(e.payload, w.payload) || e.attempt != 0 || !e.notBefore.IsZero() {
			t.Errorf("event %d = %+v, want %+v", i, e, *w)
		}
	}
}

func TestBatchEnvelopeMalformed(t *testing.T) {
	good := encodeBatch("s", []*event{{requestID: "a", function: "fn", accepted: time.Unix(1, 0), payload: []byte("p")}}).Data
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"version", append([]byte{2}, good[1:]...)},
		{"zero events", []byte{1, 0}},
		{"count over the data", []byte{1, 100, 0}},
		{"truncated", good[:len(good)-1]},
		{"trailing", append(append([]byte(nil), good...), 0)},
		{"no request id", encodeBatch("s", []*event{{function: "fn", accepted: time.Unix(1, 0)}}).Data},
		{"no function", encodeBatch("s", []*event{{requestID: "a", accepted: time.Unix(1, 0)}}).Data},
		{"huge length", []byte{1, 1, 0xff, 0xff, 0xff, 0xff, 0x0f}},
	} {
		if evs, err := decodeBatch(tc.data); err == nil {
			t.Errorf("%s: decoded %+v, want an error", tc.name, evs)
		}
	}
}

// holdLane marks a lane's write in flight, as if a slow write were under
// way, so that accepts queue up; release writes what queued.
func holdLane(s *Service, subject string) (release func()) {
	l := s.laneFor(subject)
	l.mu.Lock()
	l.inFlight = true
	l.mu.Unlock()
	return func() {
		l.mu.Lock()
		if len(l.queued) == 0 {
			l.inFlight = false
			l.mu.Unlock()
			return
		}
		next := l.queued[0]
		l.queued = l.queued[1:]
		l.mu.Unlock()
		go s.write(l, next)
	}
}

func queuedAccepts(s *Service, subject string) int {
	l := s.laneFor(subject)
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, g := range l.queued {
		n += len(g.accepts)
	}
	return n
}

// storedMessages returns the stored messages of a subject.
func storedMessages(t *testing.T, s *Service, subject string) []*jetstream.RawStreamMsg {
	t.Helper()
	var out []*jetstream.RawStreamMsg
	for seq := uint64(1); ; {
		m, err := s.stream.GetMsg(testCtx(t), seq, jetstream.WithGetMsgSubject(subject))
		if err != nil {
			return out
		}
		out = append(out, m)
		seq = m.Sequence + 1
	}
}

// TestGroupCommit: accepts that arrive while a write is in flight are
// stored as batch messages of at most GroupEvents, each accept returning
// after its group's ack; a lone accept is stored at once as a single
// event; a second accept of an id (in flight or stored) stores nothing.
func TestGroupCommit(t *testing.T) {
	s, reg := newService(t, openJS(t, ""), Config{SharedQueues: 1, GroupEvents: 10})
	ctx := testCtx(t)
	subj := SharedSubject(0)
	release := holdLane(s, subj)

	const n = 25
	errc := make(chan error, n+1)
	for i := range n {
		go func() { errc <- s.Accept(ctx, "fn", fmt.Appendf(nil, `{"i":%d}`, i), fmt.Sprintf("g-%02d", i)) }()
	}
	waitFor(t, "the accepts to queue", 10*time.Second, func() bool { return queuedAccepts(s, subj) == n })
	// A client retry of a queued id waits for it and stores nothing.
	go func() { errc <- s.Accept(ctx, "fn", []byte(`{"i":0}`), "g-00") }()
	select {
	case err := <-errc:
		t.Fatalf("an accept returned before its group was written: %v", err)
	case <-time.After(20 * time.Millisecond):
	}
	if got := streamMsgs(t, s, subj); len(got) != 0 {
		t.Fatalf("stored %v before the write in flight ended", got)
	}
	release()
	for range n + 1 {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	msgs := storedMessages(t, s, subj)
	var sizes []string
	for _, m := range msgs {
		sizes = append(sizes, m.Header.Get(HeaderBatch))
	}
	if want := []string{"10", "10", "5"}; !cmp.Equal(sizes, want) {
		t.Errorf("batch sizes %v, want %v", sizes, want)
	}
	got := streamMsgs(t, s, subj)
	sort.Strings(got)
	if len(got) != n || got[0] != "g-00" || got[n-1] != fmt.Sprintf("g-%02d", n-1) {
		t.Errorf("stored events %v, want g-00 … g-%02d once each", got, n-1)
	}

	// Idle: a lone accept is written at once, as a single-event message.
	if err := s.Accept(ctx, "fn", []byte(`{}`), "lone"); err != nil {
		t.Fatal(err)
	}
	// And a retry of a stored id (batch or single) stores nothing.
	for _, id := range []string{"g-07", "lone"} {
		if err := s.Accept(ctx, "fn", []byte(`{}`), id); err != nil {
			t.Fatal(err)
		}
	}
	msgs = storedMessages(t, s, subj)
	if len(msgs) != 4 || msgs[3].Header.Get(HeaderRequestID) != "lone" || msgs[3].Header.Get(HeaderBatch) != "" {
		t.Errorf("%d messages, the last %v; want the lone accept as a single-event message", len(msgs), msgs[len(msgs)-1].Header)
	}
	if got := counterValue(t, reg, "skiff_async_events_received_total", nil); got != n+1 {
		t.Errorf("received = %v, want %d", got, n+1)
	}
	if got := counterValue(t, reg, "skiff_async_accept_group_events", nil); got != 4 {
		t.Errorf("groups written = %v, want 4", got)
	}
}

// TestGroupsPerQueueAndBytes: events for different queues never share a
// group, and a group stays within GroupBytes.
func TestGroupsPerQueueAndBytes(t *testing.T) {
	s, _ := newService(t, openJS(t, ""), Config{SharedQueues: 1, MaxPayload: 1000, GroupBytes: 70 << 10})
	ctx := testCtx(t)
	if err := s.SetDedicated(ctx, "big", true); err != nil {
		t.Fatal(err)
	}
	shared, dedicated := SharedSubject(0), DedicatedSubject("big")
	relShared, relDedicated := holdLane(s, shared), holdLane(s, dedicated)
	var wg sync.WaitGroup
	payload := bytes.Repeat([]byte("x"), 1000)
	const perQueue = 150 // 150 × ~1.1 KB: more than 70 KiB
	for i := range perQueue {
		for _, fn := range []string{"small", "big"} {
			wg.Go(func() {
				if err := s.Accept(ctx, fn, payload, fmt.Sprintf("%s-%d", fn, i)); err != nil {
					t.Error(err)
				}
			})
		}
	}
	waitFor(t, "the accepts to queue", 10*time.Second, func() bool {
		return queuedAccepts(s, shared) == perQueue && queuedAccepts(s, dedicated) == perQueue
	})
	relShared()
	relDedicated()
	wg.Wait()
	for _, subj := range []string{shared, dedicated} {
		msgs := storedMessages(t, s, subj)
		if len(msgs) < 2 {
			t.Errorf("%s: %d messages, want the 150 KB split in groups of at most 70 KiB", subj, len(msgs))
		}
		total := 0
		for _, m := range msgs {
			if len(m.Data) > 70<<10 {
				t.Errorf("%s: a batch of %d bytes, over GroupBytes", subj, len(m.Data))
			}
			evs, err := decodeBatch(m.Data)
			if err != nil {
				t.Fatal(err)
			}
			for _, ev := range evs {
				if want := map[string]string{shared: "small", dedicated: "big"}[subj]; ev.function != want {
					t.Errorf("%s holds an event of %s", subj, ev.function)
				}
			}
			total += len(evs)
		}
		if total != perQueue {
			t.Errorf("%s: %d events stored, want %d", subj, total, perQueue)
		}
	}
}

func TestGroupConfigValidation(t *testing.T) {
	for _, c := range []Config{
		{GroupEvents: -1},
		{GroupEvents: maxBatchEvents + 1},
		{GroupBytes: 100},               // under MaxPayload + 64 KiB
		{GroupBytes: maxGroupBytes + 1}, // over the store's message limit
		{MaxPayload: 8 << 20},           // cannot fit a group
	} {
		if err := c.setDefaults(); err == nil {
			t.Errorf("config %+v accepted", c)
		}
	}
	c := Config{MaxPayload: 6 << 20}
	if err := c.setDefaults(); err != nil || c.GroupBytes < 6<<20+64<<10 {
		t.Errorf("max payload 6 MiB: group bytes %d, err %v; want room for one event", c.GroupBytes, err)
	}
}

func TestAcceptRejectsBadRequestIDs(t *testing.T) {
	s, _ := newService(t, openJS(t, ""), Config{SharedQueues: 1})
	ctx := testCtx(t)
	for _, id := range []string{"", "a,b", "a b", strings.Repeat("x", 65), "ü"} {
		if err := s.Accept(ctx, "fn", nil, id); !errs.IsInvalid(err) || !strings.Contains(err.Error(), "request id") {
			t.Errorf("request id %q: got %v, want invalid request_id", id, err)
		}
	}
	if got := streamMsgs(t, s, SharedSubject(0)); len(got) != 0 {
		t.Errorf("stored %v", got)
	}
}

// TestDedupAcrossGatewaysAndWindow: a request id stored in a batch by one
// gateway is not stored again by another (announced), nor by the first
// within the window; after the window it is a new event.
func TestDedupAcrossGatewaysAndWindow(t *testing.T) {
	clk := &clock{t: time.Date(2026, 1, 2, 0, 0, 0, 0, time.UTC)}
	js := openJS(t, "")
	s1, _ := newService(t, js, Config{SharedQueues: 1, Now: clk.Now, DedupWindow: time.Minute})
	s2, _ := newService(t, js, Config{SharedQueues: 1, Now: clk.Now, DedupWindow: time.Minute})
	ctx := testCtx(t)
	subj := SharedSubject(0)
	release := holdLane(s1, subj)
	errc := make(chan error, 2)
	for _, id := range []string{"x1", "x2"} {
		go func() { errc <- s1.Accept(ctx, "fn", nil, id) }()
	}
	waitFor(t, "the accepts to queue", 10*time.Second, func() bool { return queuedAccepts(s1, subj) == 2 })
	release()
	for range 2 {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	if n := len(storedMessages(t, s1, subj)); n != 1 {
		t.Fatalf("%d messages, want one batch", n)
	}
	waitFor(t, "the second gateway to hear of x1 and x2", 10*time.Second, func() bool {
		s2.dedup.mu.Lock()
		defer s2.dedup.mu.Unlock()
		_, a := s2.dedup.seen["x1"]
		_, b := s2.dedup.seen["x2"]
		return a && b
	})
	for _, s := range []*Service{s2, s1} {
		if err := s.Accept(ctx, "fn", nil, "x2"); err != nil {
			t.Fatal(err)
		}
	}
	if got := streamMsgs(t, s1, subj); len(got) != 2 {
		t.Fatalf("stored %v, want x1 and x2 once", got)
	}
	clk.Set(clk.Now().Add(time.Minute + time.Second))
	if err := s2.Accept(ctx, "fn", nil, "x2"); err != nil {
		t.Fatal(err)
	}
	// Past the window it is a new event (stored as a single-event
	// message: x2 was never a JetStream message id, so JetStream's own
	// dedupe, on real time, does not apply).
	if got := streamMsgs(t, s1, subj); len(got) != 3 {
		t.Errorf("stored %v after the window, want x2 again", got)
	}
}

func TestDedupIndexBounded(t *testing.T) {
	clk := &clock{t: time.Unix(1000, 0)}
	d := newDedupIndex(time.Minute, clk.Now)
	d.max = 100
	for i := range 1000 {
		d.add([]string{fmt.Sprintf("id-%d", i)})
	}
	d.mu.Lock()
	n, live := len(d.seen), len(d.order)-d.head
	d.mu.Unlock()
	if n > 101 || live > 101 {
		t.Errorf("%d ids (%d in order) kept, want at most 100", n, live)
	}
	if _, dup := d.begin(&pendingAccept{ev: event{requestID: "id-999"}}); !dup {
		t.Error("the newest id was evicted")
	}
	clk.Set(clk.Now().Add(2 * time.Minute))
	d.add([]string{"new"})
	d.mu.Lock()
	n = len(d.seen)
	d.mu.Unlock()
	if n != 1 {
		t.Errorf("%d ids kept after the window, want 1", n)
	}
}

// TestBatchProcessing: the events of a batch message are processed with a
// single event's semantics: retries with the same request id (as messages
// of their own), throttles that wait without using attempts (handed on),
// failures to OnFailure; the batch is acknowledged once all are done.
func TestBatchProcessing(t *testing.T) {
	s, reg := newService(t, openJS(t, ""), Config{SharedQueues: 1, RetryDelay: 10 * time.Millisecond, PlatformBase: time.Millisecond, PlatformMax: 5 * time.Millisecond})
	ctx := testCtx(t)
	for _, fn := range []string{"ok", "flaky", "bad", "busy"} {
		if _, err := s.PutEventConfig(ctx, fn, &skiffv1.EventInvokeConfig{MaximumRetryAttempts: ptr(1), OnSuccess: "queue:good", OnFailure: "queue:failed"}); err != nil {
			t.Fatal(err)
		}
	}
	var mu sync.Mutex
	calls := map[string]int{}
	inv := &fakeInvoker{fn: func(_ int, fn string, _ []byte, rid string) (*skiffv1.InvokeResponse, error) {
		mu.Lock()
		calls[rid]++
		n := calls[rid]
		mu.Unlock()
		switch {
		case fn == "flaky" && n == 1, fn == "bad":
			return fnError("boom"), nil
		case fn == "busy" && n <= 3:
			return nil, errs.Throttled(time.Millisecond, "reserved concurrency")
		}
		return &skiffv1.InvokeResponse{StatusCode: 200, Payload: []byte(`"done"`), ExecutedVersion: "$LATEST"}, nil
	}}
	subj := SharedSubject(0)
	release := holdLane(s, subj)
	errc := make(chan error, 8)
	for i, fn := range []string{"ok", "flaky", "bad", "busy", "ok", "ok", "ok", "ok"} {
		go func() { errc <- s.Accept(ctx, fn, fmt.Appendf(nil, `{"i":%d}`, i), fmt.Sprintf("%s-%d", fn, i)) }()
	}
	waitFor(t, "the accepts to queue", 10*time.Second, func() bool { return queuedAccepts(s, subj) == 8 })
	release()
	for range 8 {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	if msgs := storedMessages(t, s, subj); len(msgs) != 1 || msgs[0].Header.Get(HeaderBatch) != "8" {
		t.Fatalf("want one batch of 8 stored, got %d messages", len(msgs))
	}
	dest := &fakeDest{}
	startPool(t, s, inv, dest, nil, &fakeFence{})
	waitFor(t, "8 records", 10*time.Second, func() bool { return len(dest.Records()) >= 8 })
	waitFor(t, "the queue to drain", 10*time.Second, func() bool { return len(storedMessages(t, s, subj)) == 0 })
	byID := map[string]delivered{}
	for _, r := range dest.Records() {
		id := r.rec.RequestContext.RequestID
		if _, ok := byID[id]; ok {
			t.Errorf("two records of %s", id)
		}
		byID[id] = r
	}
	for id, want := range map[string]struct {
		target, cond string
		invokes      int
	}{
		"ok-0":    {"queue:good", destinations.ConditionSuccess, 1},
		"flaky-1": {"queue:good", destinations.ConditionSuccess, 2},
		"bad-2":   {"queue:failed", destinations.ConditionRetriesExhausted, 2},
		"busy-3":  {"queue:good", destinations.ConditionSuccess, 1},
		"ok-7":    {"queue:good", destinations.ConditionSuccess, 1},
	} {
		r, ok := byID[id]
		if !ok {
			t.Errorf("no record of %s", id)
			continue
		}
		if r.target != want.target || r.rec.RequestContext.Condition != want.cond || r.rec.RequestContext.ApproximateInvokeCount != want.invokes {
			t.Errorf("record of %s: %s %s %d invokes, want %s %s %d", id, r.target, r.rec.RequestContext.Condition, r.rec.RequestContext.ApproximateInvokeCount, want.target, want.cond, want.invokes)
		}
	}
	mu.Lock()
	if calls["busy-3"] != 4 || calls["flaky-1"] != 2 || calls["bad-2"] != 2 || calls["ok-0"] != 1 {
		t.Errorf("invokes %v", calls)
	}
	mu.Unlock()
	if got := counterValue(t, reg, "skiff_async_attempts_total", map[string]string{"outcome": "throttled"}); got != 3 {
		t.Errorf("throttled = %v, want 3", got)
	}
	if got := counterValue(t, reg, "skiff_async_poller_batch_events", nil); got != 1 {
		t.Errorf("batches received = %v, want 1", got)
	}
}

// TestBatchRedeliveredWhenLeaseLost: a poller that loses its lease during
// a batch acknowledges nothing; the next holder gets the whole batch
// (at least once: the events the first one finished run again).
func TestBatchRedeliveredWhenLeaseLost(t *testing.T) {
	s, _ := newService(t, openJS(t, ""), Config{SharedQueues: 1})
	ctx := testCtx(t)
	if _, err := s.PutEventConfig(ctx, "fn", &skiffv1.EventInvokeConfig{OnSuccess: "queue:ok"}); err != nil {
		t.Fatal(err)
	}
	subj := SharedSubject(0)
	release := holdLane(s, subj)
	errc := make(chan error, 3)
	for i := range 3 {
		go func() { errc <- s.Accept(ctx, "fn", nil, fmt.Sprintf("e-%d", i)) }()
	}
	waitFor(t, "the accepts to queue", 10*time.Second, func() bool { return queuedAccepts(s, subj) == 3 })
	release()
	for range 3 {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	fence := &fakeFence{}
	gate := make(chan struct{})
	var once sync.Once
	inv := &fakeInvoker{fn: func(n int, _ string, _ []byte, rid string) (*skiffv1.InvokeResponse, error) {
		if rid == "e-2" && n <= 3 {
			once.Do(func() { <-gate })
		}
		return &skiffv1.InvokeResponse{StatusCode: 200}, nil
	}}
	dest := &fakeDest{}
	p := startPool(t, s, inv, dest, nil, fence)
	waitFor(t, "e-0 and e-1 done", 10*time.Second, func() bool { return len(dest.Records()) == 2 })
	fence.lost.Store(true)
	close(gate)
	waitFor(t, "the poller to stop", 10*time.Second, func() bool { return len(p.Polling()) == 0 })
	if n := len(storedMessages(t, s, subj)); n != 1 {
		t.Fatalf("%d messages stored, want the unacknowledged batch", n)
	}
	fence.lost.Store(false)
	startPool(t, s, inv, dest, nil, fence)
	waitFor(t, "the batch to be done", 15*time.Second, func() bool { return len(storedMessages(t, s, subj)) == 0 })
	count := map[string]int{}
	for _, r := range dest.Records() {
		count[r.rec.RequestContext.RequestID]++
	}
	if count["e-0"] != 2 || count["e-1"] != 2 || count["e-2"] != 1 {
		t.Errorf("records per event %v, want e-0 and e-1 twice (redelivered), e-2 once", count)
	}
}
