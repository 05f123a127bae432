package kinesis

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/store"
	"skiff.dev/skiff/internal/errs"
)

// clock is an injected clock tests move by hand.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock() *clock { return &clock{now: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)} }

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

func testCtx(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	t.Cleanup(cancel)
	return ctx
}

type env struct {
	st    *store.Store
	s     *Store
	clock *clock
}

func newEnv(t testing.TB) *env {
	t.Helper()
	e := &env{clock: newClock()}
	st, err := store.Open(testCtx(t), store.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatalf("store.Open: %v", err)
	}
	t.Cleanup(func() { _ = st.Close() })
	e.st = st
	e.s = e.store(t)
	return e
}

// store opens another Store on the env's JetStream (another gateway).
func (e *env) store(t testing.TB) *Store {
	t.Helper()
	s, err := New(testCtx(t), e.st.JetStream(), Config{Now: e.clock.Now})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

func (e *env) create(t testing.TB, name string, shards int) *skiffv1.StreamDescription {
	t.Helper()
	d, err := e.s.CreateStream(testCtx(t), &skiffv1.CreateStreamRequest{Name: name, ShardCount: int32(shards)})
	if err != nil {
		t.Fatalf("CreateStream(%s, %d): %v", name, shards, err)
	}
	return d
}

func (e *env) put(t testing.TB, stream, pk, data string) *skiffv1.PutRecordResponse {
	t.Helper()
	return e.putVia(t, e.s, stream, pk, data)
}

func (e *env) putVia(t testing.TB, s *Store, stream, pk, data string) *skiffv1.PutRecordResponse {
	t.Helper()
	r, err := s.PutRecord(testCtx(t), &skiffv1.PutRecordRequest{Stream: stream, PartitionKey: pk, Data: []byte(data)})
	if err != nil {
		t.Fatalf("PutRecord(%s, %s): %v", stream, pk, err)
	}
	return r
}

func (e *env) shards(t testing.TB, stream string) map[string]*skiffv1.Shard {
	t.Helper()
	list, err := e.s.Shards(testCtx(t), stream)
	if err != nil {
		t.Fatalf("Shards(%s): %v", stream, err)
	}
	out := map[string]*skiffv1.Shard{}
	for _, s := range list {
		out[s.GetShardId()] = s
	}
	return out
}

// readAll reads a shard from after to its current end (or shard end).
func (e *env) readAll(t testing.TB, s *Store, stream, shard string, after uint64) ([]StoredRecord, bool) {
	t.Helper()
	var out []StoredRecord
	for {
		recs, end, err := s.Read(testCtx(t), stream, shard, after, 1000)
		if err != nil {
			t.Fatalf("Read(%s, %s, %d): %v", stream, shard, after, err)
		}
		out = append(out, recs...)
		if end || len(recs) == 0 {
			return out, end
		}
		after = recs[len(recs)-1].Seq
	}
}

func wantInvalid(t testing.TB, what string, err error, field string) {
	t.Helper()
	var e *errs.Error
	if !errs.IsInvalid(err) || !errors.As(err, &e) || e.Field != field {
		t.Fatalf("%s: got error %v (field %q), want InvalidArgument on field %q", what, err, fieldOf(err), field)
	}
}

func wantKind(t testing.TB, what string, err error, kind errs.Kind) {
	t.Helper()
	if got := errs.KindOf(err); err == nil || got != kind {
		t.Fatalf("%s: got error %v (kind %v), want kind %v", what, err, got, kind)
	}
}

func fieldOf(err error) string {
	var e *errs.Error
	if errors.As(err, &e) {
		return e.Field
	}
	return ""
}

// eventually polls cond until it holds or 10 s pass.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not true after 10s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}
