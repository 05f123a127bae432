package store

import (
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

func testCtx(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// openStore opens a Store on dir (a fresh temp dir when empty) and closes
// it at the end of the test.
func openStore(t testing.TB, cfg Config) *Store {
	t.Helper()
	if cfg.DataDir == "" {
		cfg.DataDir = t.TempDir()
	}
	s, err := Open(testCtx(t), cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

// secondHandle is another Store on the same embedded server, with its own
// connection and caches: what a second gateway sees.
func secondHandle(t testing.TB, s *Store) *Store {
	t.Helper()
	s2 := &Store{cfg: s.cfg, log: s.log, srv: s.srv, fns: newFunctionCache(), keys: newKeyIndex()}
	if err := s2.attach(testCtx(t)); err != nil {
		t.Fatalf("attaching a second handle: %v", err)
	}
	t.Cleanup(func() {
		for _, w := range s2.watchers {
			w.stop()
		}
		s2.nc.Close()
	})
	return s2
}

// eventually polls cond until it holds or 10 s pass.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not true after 10s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func wantKind(t testing.TB, what string, err error, want errs.Kind) {
	t.Helper()
	if got := errs.KindOf(err); got != want {
		t.Fatalf("%s: got error %v (kind %v), want kind %v", what, err, got, want)
	}
}

func TestOpenRejectsBadConfig(t *testing.T) {
	tests := []struct {
		name  string
		cfg   Config
		field string
	}{
		{"no data dir", Config{}, "data_dir"},
		{"negative max age", Config{DataDir: t.TempDir(), LogMaxAge: -time.Second}, "log_max_age"},
		{"negative max bytes", Config{DataDir: t.TempDir(), LogMaxBytes: -1}, "log_max_bytes"},
		{"bad listen addr", Config{DataDir: t.TempDir(), ListenAddr: "localhost"}, "listen_addr"},
		{"bad listen port", Config{DataDir: t.TempDir(), ListenAddr: "127.0.0.1:99999"}, "listen_addr"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := Open(testCtx(t), tt.cfg)
			if err == nil {
				s.Close()
				t.Fatal("Open succeeded, want an error")
			}
			var e *errs.Error
			if !errors.As(err, &e) || e.Kind != errs.KindInvalidArgument || e.Field != tt.field {
				t.Fatalf("got %v, want InvalidArgument on field %s", err, tt.field)
			}
		})
	}
}

func TestNoListenerByDefault(t *testing.T) {
	s := openStore(t, Config{})
	if addr := s.srv.Addr(); addr != nil {
		t.Fatalf("server listens on %v, want no listener", addr)
	}
}

func TestListenAddr(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	s := openStore(t, Config{ListenAddr: addr})
	if _, err := s.CreateFunction(testCtx(t), &skiffv1.Function{Name: "viatcp"}); err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect("nats://" + addr)
	if err != nil {
		t.Fatalf("connecting over tcp to %s: %v", addr, err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	kv, err := js.KeyValue(testCtx(t), bucketFunctions)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Get(testCtx(t), "viatcp"); err != nil {
		t.Fatalf("reading over tcp: %v", err)
	}
}

// fixture writes one of everything.
type fixture struct {
	fn     *skiffv1.Function
	digest string
	zip    []byte
	hash   []byte
}

func writeFixture(t testing.TB, s *Store) fixture {
	t.Helper()
	ctx := testCtx(t)
	var f fixture
	var err error
	f.fn, err = s.CreateFunction(ctx, &skiffv1.Function{Name: "durable", Config: &skiffv1.FunctionConfig{MemoryMb: 256}})
	if err != nil {
		t.Fatal(err)
	}
	f.zip = []byte("PK fake zip for durability")
	if f.digest, err = s.PutCode(ctx, f.zip); err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256([]byte("secret"))
	f.hash = h[:]
	if err := s.PutKey(ctx, Key{ID: "k1", SecretHash: f.hash, Admin: true}); err != nil {
		t.Fatal(err)
	}
	if err := s.AppendLog(ctx, LogEntry{Function: "durable", RequestID: "r1", Text: "START\nREPORT\n"}); err != nil {
		t.Fatal(err)
	}
	return f
}

func checkFixture(t testing.TB, s *Store, f fixture) {
	t.Helper()
	ctx := testCtx(t)
	fn, err := s.GetFunction(ctx, "durable")
	if err != nil {
		t.Fatalf("GetFunction after reopen: %v", err)
	}
	if fn.Revision != f.fn.Revision || fn.GetConfig().GetMemoryMb() != 256 {
		t.Fatalf("function after reopen: got revision %d memory %d, want %d and 256", fn.Revision, fn.GetConfig().GetMemoryMb(), f.fn.Revision)
	}
	zip, err := s.FetchCode(ctx, f.digest)
	if err != nil || string(zip) != string(f.zip) {
		t.Fatalf("FetchCode after reopen: got %q, %v, want %q", zip, err, f.zip)
	}
	if k, err := s.KeyBySecretHash(ctx, f.hash); err != nil || k.ID != "k1" {
		t.Fatalf("KeyBySecretHash after reopen: got %+v, %v, want k1", k, err)
	}
	var got []LogEntry
	if err := s.ReadLogs(ctx, "durable", 10, false, func(e LogEntry) error { got = append(got, e); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].RequestID != "r1" {
		t.Fatalf("logs after reopen: got %+v, want one entry r1", got)
	}
	// The reopened store still writes, at revisions after the old ones.
	fn.Config.MemoryMb = 512
	up, err := s.UpdateFunction(ctx, fn)
	if err != nil {
		t.Fatalf("UpdateFunction after reopen: %v", err)
	}
	if up.Revision <= f.fn.Revision {
		t.Fatalf("revision after reopen: got %d, want > %d", up.Revision, f.fn.Revision)
	}
}

func TestReopenAfterClose(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(testCtx(t), Config{DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	f := writeFixture(t, s)
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	checkFixture(t, openStore(t, Config{DataDir: dir}), f)
}

// crashChildEnv makes TestCrashChild a helper process: it opens the store
// in that directory, writes the fixture, says so and waits to be killed.
const crashChildEnv = "SKIFF_STORE_CRASH_CHILD_DIR"

func TestCrashChild(t *testing.T) {
	dir := os.Getenv(crashChildEnv)
	if dir == "" {
		t.Skip("helper process for TestCrashRecovery")
	}
	s, err := Open(testCtx(t), Config{DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	f := writeFixture(t, s)
	fmt.Printf("written %d\n", f.fn.Revision)
	select {} // killed by the parent
}

// TestCrashRecovery kills a process holding the store with SIGKILL right
// after its writes were acknowledged, then reopens the directory.
func TestCrashRecovery(t *testing.T) {
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+dir)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if strings.HasPrefix(sc.Text(), "written ") {
				lines <- sc.Text()
				return
			}
		}
		close(lines)
	}()
	var line string
	select {
	case l, ok := <-lines:
		if !ok {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatal("helper process ended without writing")
		}
		line = l
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatal("helper process did not write within 60s")
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	var rev uint64
	fmt.Sscanf(line, "written %d", &rev)

	s := openStore(t, Config{DataDir: dir})
	h := sha256.Sum256([]byte("secret"))
	zip := []byte("PK fake zip for durability")
	d := sha256.Sum256(zip)
	checkFixture(t, s, fixture{
		fn:     &skiffv1.Function{Name: "durable", Revision: rev},
		digest: fmt.Sprintf("%x", d),
		zip:    zip,
		hash:   h[:],
	})
}

func TestLogStreamRetentionConfig(t *testing.T) {
	dir := t.TempDir()
	ctx := testCtx(t)
	tests := []struct {
		name             string
		cfg              Config
		wantAge          time.Duration
		wantBytes        int64
		wantSyncInterval bool
	}{
		{"defaults", Config{DataDir: dir}, 7 * 24 * time.Hour, 1 << 30, false},
		{"reopened with other limits", Config{DataDir: dir, LogMaxAge: time.Hour, LogMaxBytes: 1 << 20, SyncAlways: true}, time.Hour, 1 << 20, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := Open(ctx, tt.cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			st, err := s.js.Stream(ctx, streamLogs)
			if err != nil {
				t.Fatal(err)
			}
			info, err := st.Info(ctx)
			if err != nil {
				t.Fatal(err)
			}
			c := info.Config
			if c.MaxAge != tt.wantAge || c.MaxBytes != tt.wantBytes {
				t.Errorf("LOGS limits: got max age %v, max bytes %d; want %v, %d", c.MaxAge, c.MaxBytes, tt.wantAge, tt.wantBytes)
			}
			if c.Storage != jetstream.FileStorage || c.Discard != jetstream.DiscardOld || c.Retention != jetstream.LimitsPolicy {
				t.Errorf("LOGS policy: got storage %v discard %v retention %v, want file, old, limits", c.Storage, c.Discard, c.Retention)
			}
			if got := s.srv.JetStreamConfig().SyncAlways; got != tt.wantSyncInterval {
				t.Errorf("SyncAlways: got %v, want %v", got, tt.wantSyncInterval)
			}
		})
	}
}

func TestDataDirLocked(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(testCtx(t), Config{DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	_, err = Open(testCtx(t), Config{DataDir: dir})
	wantKind(t, "opening a data dir in use", err, errs.KindUnavailable)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(testCtx(t), Config{DataDir: dir})
	if err != nil {
		t.Fatalf("opening after Close: %v", err)
	}
	s2.Close()
}
