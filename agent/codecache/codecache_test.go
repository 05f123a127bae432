package codecache

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"skiff.dev/skiff/internal/archive"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/testutil"
)

// fetcher is a fake Fetcher.
type fetcher struct {
	fetch func(ctx context.Context, digest string) ([]byte, error)
	calls atomic.Int32
}

func (f *fetcher) FetchCode(ctx context.Context, digest string) ([]byte, error) {
	f.calls.Add(1)
	return f.fetch(ctx, digest)
}

// store serves fixed blobs by their digest.
func store(blobs ...[]byte) *fetcher {
	m := map[string][]byte{}
	for _, b := range blobs {
		m[digestOf(b)] = b
	}
	return &fetcher{fetch: func(_ context.Context, d string) ([]byte, error) {
		b, ok := m[d]
		if !ok {
			return nil, errs.NotFound("code %s not found", d)
		}
		return b, nil
	}}
}

func digestOf(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func codeZip(t testing.TB, content string) []byte {
	return testutil.ZipFiles(t, map[string]testutil.ZipEntry{
		"bootstrap":    {Data: []byte("#!/bin/sh\n" + content), Mode: 0o755},
		"lib/data.txt": {Data: []byte(content)},
	})
}

func newCache(t testing.TB, f Fetcher) (*Cache, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "code")
	c, err := New(dir, f, archive.Limits{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return c, dir
}

// tree lists a directory: path → mode and, for files, content.
func tree(t testing.TB, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		v := fmt.Sprintf("%v", fi.Mode())
		if fi.Mode().IsRegular() {
			b, _ := os.ReadFile(p)
			v += " " + string(b)
		}
		out[rel] = v
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestGet(t *testing.T) {
	code := codeZip(t, "v1")
	d := digestOf(code)
	f := store(code)
	c, cacheDir := newCache(t, f)
	if c.Has(d) {
		t.Fatal("Has before Get: got true")
	}
	got, err := c.Get(context.Background(), d)
	if err != nil {
		t.Fatalf("Get: %v", err)
	}
	if want := filepath.Join(cacheDir, d); got != want {
		t.Errorf("dir: got %s, want %s", got, want)
	}
	want := map[string]string{
		".":            "dr-xr-xr-x",
		"bootstrap":    "-r-xr-xr-x #!/bin/sh\nv1",
		"lib":          "dr-xr-xr-x",
		"lib/data.txt": "-r--r--r-- v1",
	}
	if diff := cmp.Diff(want, tree(t, got)); diff != "" {
		t.Errorf("unpacked tree (-want +got):\n%s", diff)
	}
	if fi, _ := os.Stat(cacheDir); fi.Mode().Perm() != 0o755 {
		t.Errorf("cache dir mode: got %v, want 0755", fi.Mode().Perm())
	}
	if !c.Has(d) {
		t.Error("Has after Get: got false")
	}
	// A second Get does not fetch again.
	if again, err := c.Get(context.Background(), d); err != nil || again != got {
		t.Errorf("second Get: got %s, %v; want %s", again, err, got)
	}
	if n := f.calls.Load(); n != 1 {
		t.Errorf("fetches: got %d, want 1", n)
	}
	// A new cache over the same directory finds it.
	c2, err := New(cacheDir, f, archive.Limits{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{d}, c2.Digests()); diff != "" {
		t.Errorf("Digests (-want +got):\n%s", diff)
	}
}

func TestGetErrors(t *testing.T) {
	good := codeZip(t, "good")
	bad := testutil.ZipFiles(t, map[string]testutil.ZipEntry{"../evil": {Data: []byte("x")}})
	tests := []struct {
		name      string
		digest    string
		fetch     func(context.Context, string) ([]byte, error)
		wantKind  errs.Kind
		wantFetch bool
	}{
		{"not hex", "../../etc/passwd", nil, errs.KindInvalidArgument, false},
		{"upper case", fmt.Sprintf("%X", sha256.Sum256(good)), nil, errs.KindInvalidArgument, false},
		{"short", digestOf(good)[:10], nil, errs.KindInvalidArgument, false},
		{"hash mismatch", digestOf(good), func(context.Context, string) ([]byte, error) { return codeZip(t, "tampered"), nil }, errs.KindInternal, true},
		{"fetch fails", digestOf(good), func(context.Context, string) ([]byte, error) { return nil, errs.NotFound("no such code") }, errs.KindNotFound, true},
		{"hostile archive", digestOf(bad), func(context.Context, string) ([]byte, error) { return bad, nil }, errs.KindInvalidArgument, true},
		{"not a zip", digestOf([]byte("hello")), func(context.Context, string) ([]byte, error) { return []byte("hello"), nil }, errs.KindInvalidArgument, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := &fetcher{fetch: tt.fetch}
			c, dir := newCache(t, f)
			_, err := c.Get(context.Background(), tt.digest)
			if errs.KindOf(err) != tt.wantKind {
				t.Errorf("Get: got %v (kind %v), want kind %v", err, errs.KindOf(err), tt.wantKind)
			}
			if got := f.calls.Load() > 0; got != tt.wantFetch {
				t.Errorf("fetched: got %v, want %v", got, tt.wantFetch)
			}
			if c.Has(tt.digest) || len(c.Digests()) != 0 {
				t.Error("failed Get left code in the cache")
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Errorf("failed Get left %d entries in the cache dir", len(ents))
			}
		})
	}
}

func TestGetRetriesAfterFailure(t *testing.T) {
	code := codeZip(t, "x")
	var fail atomic.Bool
	fail.Store(true)
	f := &fetcher{fetch: func(context.Context, string) ([]byte, error) {
		if fail.Load() {
			return nil, errs.Unavailable("store down")
		}
		return code, nil
	}}
	c, _ := newCache(t, f)
	if _, err := c.Get(context.Background(), digestOf(code)); !errs.Is(err, errs.KindUnavailable) {
		t.Fatalf("Get: got %v, want unavailable", err)
	}
	fail.Store(false)
	if _, err := c.Get(context.Background(), digestOf(code)); err != nil {
		t.Fatalf("Get after the store came back: %v", err)
	}
}

func (c *Cache) waiters(d string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if fl, ok := c.flights[d]; ok {
		return fl.waiters
	}
	return 0
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestSingleflight(t *testing.T) {
	code := codeZip(t, "shared")
	d := digestOf(code)
	release := make(chan struct{})
	f := &fetcher{fetch: func(ctx context.Context, _ string) ([]byte, error) {
		select {
		case <-release:
			return code, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}}
	c, _ := newCache(t, f)
	const n = 16
	var wg sync.WaitGroup
	dirs := make([]string, n)
	errsOut := make([]error, n)
	for i := range n {
		wg.Go(func() { dirs[i], errsOut[i] = c.Get(context.Background(), d) })
	}
	waitFor(t, "all Gets wait on one flight", func() bool { return c.waiters(d) == n })
	close(release)
	wg.Wait()
	for i := range n {
		if errsOut[i] != nil || dirs[i] != dirs[0] {
			t.Errorf("Get %d: got %s, %v; want %s", i, dirs[i], errsOut[i], dirs[0])
		}
	}
	if got := f.calls.Load(); got != 1 {
		t.Errorf("fetches: got %d, want 1", got)
	}
}

func TestCancel(t *testing.T) {
	code := codeZip(t, "c")
	d := digestOf(code)
	release := make(chan struct{})
	fetchCanceled := make(chan struct{}, 4)
	f := &fetcher{fetch: func(ctx context.Context, _ string) ([]byte, error) {
		select {
		case <-release:
			return code, nil
		case <-ctx.Done():
			fetchCanceled <- struct{}{}
			return nil, ctx.Err()
		}
	}}
	c, _ := newCache(t, f)

	// One waiter leaving does not cancel the work for the others.
	ctx1, cancel1 := context.WithCancel(context.Background())
	got1 := make(chan error, 1)
	go func() { _, err := c.Get(ctx1, d); got1 <- err }()
	got2 := make(chan error, 1)
	go func() { _, err := c.Get(context.Background(), d); got2 <- err }()
	waitFor(t, "two waiters", func() bool { return c.waiters(d) == 2 })
	cancel1()
	if err := <-got1; !errors.Is(err, context.Canceled) {
		t.Errorf("canceled Get: got %v, want context.Canceled", err)
	}
	close(release)
	if err := <-got2; err != nil {
		t.Errorf("other Get: got %v, want success", err)
	}
	if len(fetchCanceled) != 0 {
		t.Error("the fetch was canceled while a waiter remained")
	}

	// When every waiter leaves, the fetch is canceled, and a later Get
	// starts afresh.
	code2 := codeZip(t, "c2")
	d2 := digestOf(code2)
	block := make(chan struct{})
	f.fetch = func(ctx context.Context, _ string) ([]byte, error) {
		select {
		case <-block:
			return code2, nil
		case <-ctx.Done():
			fetchCanceled <- struct{}{}
			return nil, ctx.Err()
		}
	}
	ctx3, cancel3 := context.WithCancel(context.Background())
	got3 := make(chan error, 1)
	go func() { _, err := c.Get(ctx3, d2); got3 <- err }()
	waitFor(t, "one waiter", func() bool { return c.waiters(d2) == 1 })
	cancel3()
	if err := <-got3; !errors.Is(err, context.Canceled) {
		t.Errorf("canceled Get: got %v", err)
	}
	select {
	case <-fetchCanceled:
	case <-time.After(10 * time.Second):
		t.Fatal("the fetch was not canceled when its last waiter left")
	}
	close(block)
	if _, err := c.Get(context.Background(), d2); err != nil {
		t.Errorf("Get after a canceled flight: %v", err)
	}
}

func TestCrashLeftovers(t *testing.T) {
	code := codeZip(t, "kept")
	d := digestOf(code)
	c, dir := newCache(t, store(code))
	if _, err := c.Get(context.Background(), d); err != nil {
		t.Fatal(err)
	}
	// A crash mid-extraction leaves a temporary, possibly read-only already.
	leftover := filepath.Join(dir, tmpPrefix+d+"-123")
	if err := os.MkdirAll(filepath.Join(leftover, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(leftover, "sub", "f"), []byte("half"), 0o444); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{filepath.Join(leftover, "sub"), leftover} {
		if err := os.Chmod(p, 0o555); err != nil {
			t.Fatal(err)
		}
	}
	// And stray non-digest names are not code.
	if err := os.Mkdir(filepath.Join(dir, "not-a-digest"), 0o755); err != nil {
		t.Fatal(err)
	}
	c2, err := New(dir, store(code), archive.Limits{}, nil)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if _, err := os.Lstat(leftover); !os.IsNotExist(err) {
		t.Errorf("leftover temporary still there: %v", err)
	}
	if diff := cmp.Diff([]string{d}, c2.Digests()); diff != "" {
		t.Errorf("Digests (-want +got):\n%s", diff)
	}
	if !c2.Has(d) {
		t.Error("unpacked code lost by New")
	}
}

func TestRemove(t *testing.T) {
	a, b := codeZip(t, "a"), codeZip(t, "b")
	c, dir := newCache(t, store(a, b))
	for _, z := range [][]byte{a, b} {
		if _, err := c.Get(context.Background(), digestOf(z)); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Remove(digestOf(a)); err != nil {
		t.Fatalf("Remove: %v", err)
	}
	if c.Has(digestOf(a)) {
		t.Error("Has after Remove: got true")
	}
	if diff := cmp.Diff([]string{digestOf(b)}, c.Digests()); diff != "" {
		t.Errorf("Digests (-want +got):\n%s", diff)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("cache dir has %d entries after Remove, want 1", len(ents))
	}
	if err := c.Remove(digestOf(a)); err != nil {
		t.Errorf("Remove of absent code: got %v, want nil", err)
	}
	if err := c.Remove("../x"); !errs.IsInvalid(err) {
		t.Errorf("Remove of a bad digest: got %v, want invalid", err)
	}
	// Removed code comes back on the next Get.
	if _, err := c.Get(context.Background(), digestOf(a)); err != nil || !c.Has(digestOf(a)) {
		t.Errorf("Get after Remove: %v", err)
	}
}

// TestSandboxUserCanRead checks that an unprivileged user (as the sandbox
// runs) can read and execute the code, and cannot write it.
func TestSandboxUserCanRead(t *testing.T) {
	testutil.RequirePrivileged(t)
	code := codeZip(t, "echo ran")
	c, dir := newCache(t, store(code))
	got, err := c.Get(context.Background(), digestOf(code))
	if err != nil {
		t.Fatal(err)
	}
	// Let the unprivileged user reach the cache (t.TempDir is 0700).
	// Only the two directories the testing package made: t.TempDir() and
	// its per-test parent.
	for _, p := range []string{filepath.Dir(dir), filepath.Dir(filepath.Dir(dir))} {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	const nobody = 65534
	run := func(name string, args ...string) (string, error) {
		cmd := exec.Command(name, args...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := run(filepath.Join(got, "bootstrap")); err != nil || out != "ran\n" {
		t.Errorf("running bootstrap as nobody: got %q, %v; want \"ran\"", out, err)
	}
	if out, err := run("/bin/cat", filepath.Join(got, "lib", "data.txt")); err != nil || out != "echo ran" {
		t.Errorf("reading as nobody: got %q, %v", out, err)
	}
	if _, err := run("/bin/sh", "-c", "echo x > "+filepath.Join(got, "lib", "new")); err == nil {
		t.Error("nobody could write into the code directory")
	}
}
