package store

import (
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

func newFn(name string, memory int32) *skiffv1.Function {
	return &skiffv1.Function{
		Name:   name,
		Config: &skiffv1.FunctionConfig{Runtime: "provided", MemoryMb: memory, Environment: map[string]string{"A": "1"}},
	}
}

func TestFunctionLifecycle(t *testing.T) {
	s := openStore(t, Config{})
	ctx := testCtx(t)

	created, err := s.CreateFunction(ctx, newFn("hello", 128))
	if err != nil {
		t.Fatalf("CreateFunction: %v", err)
	}
	if created.Revision == 0 {
		t.Fatal("CreateFunction: got revision 0, want it set")
	}
	_, err = s.CreateFunction(ctx, newFn("hello", 256))
	wantKind(t, "creating an existing function", err, errs.KindAlreadyExists)

	got, err := s.GetFunction(ctx, "hello")
	if err != nil {
		t.Fatalf("GetFunction: %v", err)
	}
	if diff := cmp.Diff(created, got, protocmp.Transform()); diff != "" {
		t.Fatalf("GetFunction (-created +got):\n%s", diff)
	}
	// Returned messages are the caller's: mutating one changes nothing stored.
	got.Config.MemoryMb = 9999
	again, _ := s.GetFunction(ctx, "hello")
	if again.Config.MemoryMb != 128 {
		t.Fatalf("after mutating a returned function: got memory %d from the cache, want 128", again.Config.MemoryMb)
	}

	upd := proto.CloneOf(created)
	upd.Config.MemoryMb = 512
	updated, err := s.UpdateFunction(ctx, upd)
	if err != nil {
		t.Fatalf("UpdateFunction: %v", err)
	}
	if updated.Revision <= created.Revision || updated.Config.MemoryMb != 512 {
		t.Fatalf("UpdateFunction: got revision %d memory %d, want revision > %d and memory 512", updated.Revision, updated.Config.MemoryMb, created.Revision)
	}
	// Read-your-writes: the cache has the update the moment it returns.
	if got, _ := s.GetFunction(ctx, "hello"); got.Revision != updated.Revision || got.Config.MemoryMb != 512 {
		t.Fatalf("GetFunction after update: got revision %d memory %d, want %d, 512", got.Revision, got.Config.MemoryMb, updated.Revision)
	}

	// A stale revision conflicts and names both revisions.
	_, err = s.UpdateFunction(ctx, created)
	wantKind(t, "updating from a stale revision", err, errs.KindConflict)
	wantMsg := fmt.Sprintf("function hello was changed concurrently (revision %d, now %d)", created.Revision, updated.Revision)
	if err.Error() != wantMsg {
		t.Fatalf("conflict message: got %q, want %q", err, wantMsg)
	}
	noRev := proto.CloneOf(updated)
	noRev.Revision = 0
	_, err = s.UpdateFunction(ctx, noRev)
	wantKind(t, "updating without a revision", err, errs.KindInvalidArgument)

	_, err = s.UpdateFunction(ctx, &skiffv1.Function{Name: "missing", Revision: 3})
	wantKind(t, "updating a missing function", err, errs.KindNotFound)

	if err := s.DeleteFunction(ctx, "hello"); err != nil {
		t.Fatalf("DeleteFunction: %v", err)
	}
	_, err = s.GetFunction(ctx, "hello")
	wantKind(t, "getting a deleted function", err, errs.KindNotFound)
	wantKind(t, "deleting a deleted function", s.DeleteFunction(ctx, "hello"), errs.KindNotFound)
	_, err = s.UpdateFunction(ctx, updated)
	wantKind(t, "updating a deleted function", err, errs.KindNotFound)

	// The name can be taken again, at a newer revision.
	re, err := s.CreateFunction(ctx, newFn("hello", 1024))
	if err != nil {
		t.Fatalf("re-creating a deleted function: %v", err)
	}
	if got, err := s.GetFunction(ctx, "hello"); err != nil || got.Config.MemoryMb != 1024 || got.Revision != re.Revision {
		t.Fatalf("GetFunction after re-create: got %v, %v; want memory 1024 revision %d", got, err, re.Revision)
	}
}

func TestFunctionNamesValidated(t *testing.T) {
	s := openStore(t, Config{})
	ctx := testCtx(t)
	bad := []string{"", "a.b", "a*", "a>", "a b", "é", "../x", strings.Repeat("x", 65), "a/b"}
	for _, name := range bad {
		t.Run(fmt.Sprintf("%q", name), func(t *testing.T) {
			_, err := s.CreateFunction(ctx, &skiffv1.Function{Name: name})
			wantKind(t, "CreateFunction", err, errs.KindInvalidArgument)
			_, err = s.GetFunction(ctx, name)
			wantKind(t, "GetFunction", err, errs.KindInvalidArgument)
			_, err = s.UpdateFunction(ctx, &skiffv1.Function{Name: name, Revision: 1})
			wantKind(t, "UpdateFunction", err, errs.KindInvalidArgument)
			wantKind(t, "DeleteFunction", s.DeleteFunction(ctx, name), errs.KindInvalidArgument)
			wantKind(t, "AppendLog", s.AppendLog(ctx, LogEntry{Function: name}), errs.KindInvalidArgument)
			wantKind(t, "ReadLogs", s.ReadLogs(ctx, name, 1, false, func(LogEntry) error { return nil }), errs.KindInvalidArgument)
			if name != "" {
				_, _, err = s.ListFunctions(ctx, name, 10)
				wantKind(t, "ListFunctions", err, errs.KindInvalidArgument)
			}
		})
	}
	_, err := s.CreateFunction(ctx, nil)
	wantKind(t, "CreateFunction(nil)", err, errs.KindInvalidArgument)
	if _, err := s.CreateFunction(ctx, &skiffv1.Function{Name: "Az09-_" + strings.Repeat("x", 58)}); err != nil {
		t.Fatalf("a valid 64-character name: %v", err)
	}
}

func TestListFunctionsPaging(t *testing.T) {
	s := openStore(t, Config{})
	ctx := testCtx(t)
	var want []string
	for i := 0; i < 25; i++ {
		name := fmt.Sprintf("fn-%02d", (i*7)%25) // created out of order
		if _, err := s.CreateFunction(ctx, newFn(name, 128)); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 25; i++ {
		want = append(want, fmt.Sprintf("fn-%02d", i))
	}
	if err := s.DeleteFunction(ctx, "fn-03"); err != nil {
		t.Fatal(err)
	}
	want = append(want[:3], want[4:]...)

	tests := []struct {
		limit     int
		wantPages int
	}{{10, 3}, {8, 3}, {24, 1}, {100, 1}, {0, 1}, {1, 24}}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("limit %d", tt.limit), func(t *testing.T) {
			var got []string
			after, pages := "", 0
			for {
				fns, next, err := s.ListFunctions(ctx, after, tt.limit)
				if err != nil {
					t.Fatal(err)
				}
				pages++
				for _, fn := range fns {
					got = append(got, fn.Name)
				}
				if next == "" {
					break
				}
				if next != fns[len(fns)-1].Name {
					t.Fatalf("next: got %q, want the last name %q", next, fns[len(fns)-1].Name)
				}
				after = next
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Fatalf("names (-want +got):\n%s", diff)
			}
			if pages != tt.wantPages {
				t.Fatalf("pages: got %d, want %d", pages, tt.wantPages)
			}
		})
	}
	fns, next, err := s.ListFunctions(ctx, "fn-24", 10)
	if err != nil || len(fns) != 0 || next != "" {
		t.Fatalf("listing past the end: got %d functions, next %q, %v; want none", len(fns), next, err)
	}
}

// TestConcurrentUpdatesExactlyOneWins races many updates from one revision.
func TestConcurrentUpdatesExactlyOneWins(t *testing.T) {
	s := openStore(t, Config{})
	s2 := secondHandle(t, s) // half the writers come through another "gateway"
	ctx := testCtx(t)
	base, err := s.CreateFunction(ctx, newFn("race", 128))
	if err != nil {
		t.Fatal(err)
	}
	const writers = 32
	var (
		wg        sync.WaitGroup
		mu        sync.Mutex
		winners   []*skiffv1.Function
		conflicts int
		others    []error
	)
	start := make(chan struct{})
	for i := 0; i < writers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h := s
			if i%2 == 1 {
				h = s2
			}
			fn := proto.CloneOf(base)
			fn.Config.Description = fmt.Sprintf("writer %d", i)
			<-start
			got, err := h.UpdateFunction(ctx, fn)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				winners = append(winners, got)
			case errs.IsConflict(err):
				conflicts++
			default:
				others = append(others, err)
			}
		}()
	}
	close(start)
	wg.Wait()
	if len(others) > 0 {
		t.Fatalf("unexpected errors: %v", others)
	}
	if len(winners) != 1 || conflicts != writers-1 {
		t.Fatalf("got %d winners and %d conflicts, want 1 and %d", len(winners), conflicts, writers-1)
	}
	for _, h := range []*Store{s, s2} {
		h := h
		eventually(t, "both handles see the winner", func() bool {
			got, err := h.GetFunction(ctx, "race")
			return err == nil && got.Revision == winners[0].Revision && got.Config.Description == winners[0].Config.Description
		})
	}
}

// TestNoLostUpdate runs read-modify-write loops that retry on conflict; every
// increment must survive.
func TestNoLostUpdate(t *testing.T) {
	s := openStore(t, Config{})
	s2 := secondHandle(t, s)
	ctx := testCtx(t)
	if _, err := s.CreateFunction(ctx, newFn("counter", 0)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the other handle sees the function", func() bool {
		_, err := s2.GetFunction(ctx, "counter")
		return err == nil
	})
	const writers, increments = 8, 10
	var wg sync.WaitGroup
	errc := make(chan error, writers)
	for i := 0; i < writers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h := s
			if i%2 == 1 {
				h = s2
			}
			for n := 0; n < increments; {
				fn, err := h.GetFunction(ctx, "counter")
				if err != nil {
					errc <- err
					return
				}
				fn.Config.MemoryMb++
				_, err = h.UpdateFunction(ctx, fn)
				if errs.IsConflict(err) {
					continue
				}
				if err != nil {
					errc <- err
					return
				}
				n++
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	// The record itself: every increment is there.
	e, err := s.functionsKV.Get(ctx, "counter")
	if err != nil {
		t.Fatal(err)
	}
	stored, err := decodeFunction(e.Value(), e.Revision())
	if err != nil {
		t.Fatal(err)
	}
	if stored.Config.MemoryMb != writers*increments {
		t.Fatalf("stored counter: got %d, want %d (lost updates)", stored.Config.MemoryMb, writers*increments)
	}
	// Both caches converge on it (the last write may have come through
	// either handle).
	for _, h := range []*Store{s, s2} {
		eventually(t, "caches converge", func() bool {
			got, err := h.GetFunction(ctx, "counter")
			return err == nil && got.Revision == e.Revision() && got.Config.MemoryMb == writers*increments
		})
	}
}

// TestWatcherSeesOtherWriters checks that writes through another handle
// reach this handle's cache, and that the cache never goes back in revision.
func TestWatcherSeesOtherWriters(t *testing.T) {
	s := openStore(t, Config{})
	other := secondHandle(t, s)
	ctx := testCtx(t)

	fn, err := other.CreateFunction(ctx, newFn("remote", 128))
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "create seen through the watcher", func() bool {
		got, err := s.GetFunction(ctx, "remote")
		return err == nil && got.Revision == fn.Revision
	})
	rc := int32(5)
	fn.ReservedConcurrency = &rc
	fn, err = other.UpdateFunction(ctx, fn)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "update seen through the watcher", func() bool {
		sum, _ := s.SumReserved(ctx)
		return sum == 5
	})
	if err := other.DeleteFunction(ctx, "remote"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "delete seen through the watcher", func() bool {
		_, err := s.GetFunction(ctx, "remote")
		return errs.IsNotFound(err)
	})

	// Out-of-order delivery: an older revision never replaces a newer one.
	c := newFunctionCache()
	c.apply("f", newFn("f", 256), 10)
	if c.apply("f", newFn("f", 128), 9) {
		t.Fatal("cache applied revision 9 over 10")
	}
	c.apply("f", nil, 12)
	if c.apply("f", newFn("f", 128), 11) {
		t.Fatal("cache resurrected a function deleted at revision 12 with revision 11")
	}
	if _, _, ok := c.get("f"); ok {
		t.Fatal("deleted function still in cache")
	}
}

func TestSumReserved(t *testing.T) {
	s := openStore(t, Config{})
	ctx := testCtx(t)
	for i, rc := range []int32{0, 10, 0, 25} {
		fn := newFn(fmt.Sprintf("f%d", i), 128)
		if i != 0 { // f0 has none set; f2 has 0 reserved explicitly
			v := rc
			fn.ReservedConcurrency = &v
		}
		if _, err := s.CreateFunction(ctx, fn); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := s.SumReserved(ctx); err != nil || got != 35 {
		t.Fatalf("SumReserved: got %d, %v; want 35", got, err)
	}
	if err := s.DeleteFunction(ctx, "f3"); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.SumReserved(ctx); got != 10 {
		t.Fatalf("SumReserved after delete: got %d, want 10", got)
	}
}

// TestGetFunctionNotYetWatched: a function this gateway's watch has not
// delivered yet (created through another gateway a moment ago) is read
// from the bucket instead of being reported missing; one this gateway
// saw deleted is missing without asking.
func TestGetFunctionNotYetWatched(t *testing.T) {
	s := openStore(t, Config{})
	ctx := testCtx(t)
	created, err := s.CreateFunction(ctx, newFn("elsewhere", 128))
	if err != nil {
		t.Fatal(err)
	}
	// Forget it, as a gateway whose watch is behind would not know it.
	s.fns.mu.Lock()
	delete(s.fns.entries, "elsewhere")
	s.fns.mu.Unlock()
	got, err := s.GetFunction(ctx, "elsewhere")
	if err != nil {
		t.Fatalf("GetFunction of a function the cache has not seen: %v", err)
	}
	if got.GetRevision() != created.GetRevision() {
		t.Fatalf("revision %d, want %d", got.GetRevision(), created.GetRevision())
	}
	if _, err := s.GetFunction(ctx, "never-created"); !errs.IsNotFound(err) {
		t.Fatalf("GetFunction of a missing function: %v, want NotFound", err)
	}
	if err := s.DeleteFunction(ctx, "elsewhere"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetFunction(ctx, "elsewhere"); !errs.IsNotFound(err) {
		t.Fatalf("GetFunction after delete: %v, want NotFound", err)
	}
}
