package agentserver

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"skiff.dev/skiff/gossip"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/pki"
)

func fieldOf(err error) string {
	var e *errs.Error
	if errors.As(err, &e) {
		return e.Field
	}
	return ""
}

// TestRunRejectsBadConfig: each bad input names its field, and nothing is
// created.
func TestRunRejectsBadConfig(t *testing.T) {
	good := func() Config {
		return Config{DataDir: filepath.Join(t.TempDir(), "d"), Gateway: "https://gw:7443", Name: "a1"}
	}
	cases := map[string]func(*Config){
		"data_dir":       func(c *Config) { c.DataDir = "" },
		"listen":         func(c *Config) { c.Listen = "nope" },
		"advertise":      func(c *Config) { c.Advertise = "1.2.3.4" },
		"gossip_bind":    func(c *Config) { c.GossipBind = "127.0.0.1:99999" },
		"gossip_join":    func(c *Config) { c.GossipJoin = []string{"host-without-port"} },
		"gossip_key":     func(c *Config) { c.GossipKey = []byte("short") },
		"gateway":        func(c *Config) { c.Gateway = "http://gw:7443" },
		"name":           func(c *Config) { c.Name = "-bad name" },
		"zone":           func(c *Config) { c.Zone = strings.Repeat("z", 65) },
		"sandbox_memory": func(c *Config) { c.SandboxMemoryMB = -1 },
	}
	for field, mutate := range cases {
		cfg := good()
		mutate(&cfg)
		err := Run(context.Background(), cfg)
		if err == nil || fieldOf(err) != field {
			t.Errorf("%s: %v (field %q), want an error naming %s", field, err, fieldOf(err), field)
		}
		if cfg.DataDir != "" {
			if _, serr := os.Stat(cfg.DataDir); !os.IsNotExist(serr) {
				t.Errorf("%s: the data dir was created", field)
			}
		}
	}
	cfg := good()
	cfg.Gateway = ""
	if err := Run(context.Background(), cfg); fieldOf(err) != "gateway" {
		t.Errorf("no gateway and no code source: %v", err)
	}
}

// TestRunWithoutCertificate: no TLS material and no join token is a clear
// error naming --join, before anything starts.
func TestRunWithoutCertificate(t *testing.T) {
	dir := t.TempDir()
	err := Run(context.Background(), Config{DataDir: dir, Gateway: "https://127.0.0.1:1", Name: "a1", Listen: "127.0.0.1:0"})
	if err == nil || fieldOf(err) != "join" || !strings.Contains(err.Error(), "--join") {
		t.Fatalf("Run without a certificate: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, ControlSocket)); !os.IsNotExist(err) {
		t.Errorf("control socket created: %v", err)
	}
}

// TestControlSocket: a stale socket file is replaced; a long path is an
// error naming the data dir.
func TestControlSocket(t *testing.T) {
	dir := t.TempDir()
	path, err := controlPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	stale, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close() // the file stays, nobody answers: a crashed agent's
	ln, err := listenControl(path)
	if err != nil {
		t.Fatalf("over a stale socket: %v", err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode: %v %v", fi.Mode(), err)
	}
	if _, err := listenControl(path); err == nil || !strings.Contains(err.Error(), "another agent") {
		t.Errorf("second listener on a live socket: %v", err)
	}
	ln.Close()
	if _, err := controlPath("/" + strings.Repeat("d", 120)); fieldOf(err) != "data_dir" {
		t.Errorf("long path: %v", err)
	}
}

// fakeCapacity counts what publishCapacity reads and writes.
type fakeCapacity struct {
	mu      sync.Mutex
	version int
	reports []int
	changes chan struct{}
	got     chan int
}

func (f *fakeCapacity) Capacity() gossip.Capacity {
	f.mu.Lock()
	defer f.mu.Unlock()
	return gossip.Capacity{Sandboxes: f.version}
}

func (f *fakeCapacity) Changes() <-chan struct{} { return f.changes }

func (f *fakeCapacity) SetCapacity(c gossip.Capacity) error {
	f.mu.Lock()
	f.reports = append(f.reports, c.Sandboxes)
	f.mu.Unlock()
	f.got <- c.Sandboxes
	return nil
}

func (f *fakeCapacity) set(v int) {
	f.mu.Lock()
	f.version = v
	f.mu.Unlock()
	select {
	case f.changes <- struct{}{}:
	default:
	}
}

// TestPublishCapacity: a report at start and after changes, always of
// the latest capacity, and bursts coalesced to at most one report per gap.
func TestPublishCapacity(t *testing.T) {
	f := &fakeCapacity{changes: make(chan struct{}, 1), got: make(chan int, 1000)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	const gap = 50 * time.Millisecond
	go func() {
		publishCapacity(ctx, f, f, gap, time.Hour, slog.New(slog.DiscardHandler))
		close(done)
	}()
	next := func() int {
		select {
		case v := <-f.got:
			return v
		case <-time.After(10 * time.Second):
			t.Fatal("no capacity report")
			return 0
		}
	}
	if v := next(); v != 0 {
		t.Fatalf("first report %d, want 0", v)
	}
	f.set(1)
	if v := next(); v != 1 {
		t.Fatalf("report after a change: %d, want 1", v)
	}
	// A burst of changes for 10 gaps: at most ~11 reports, the last one
	// of the final value.
	start := time.Now()
	i := 1
	for time.Since(start) < 10*gap {
		i++
		f.set(i)
	}
	waitFor(t, 10*time.Second, "the final value reported", func() (bool, error) {
		f.mu.Lock()
		defer f.mu.Unlock()
		return f.reports[len(f.reports)-1] == i, nil
	})
	cancel()
	<-done
	f.mu.Lock()
	n := len(f.reports) - 2
	f.mu.Unlock()
	if elapsed := time.Since(start); n > int(elapsed/gap)+2 {
		t.Errorf("%d reports for %d changes in %s, want at most one per %s", n, i-1, elapsed, gap)
	}
	if i < 100 {
		t.Logf("only %d changes in the burst", i-1)
	}
}

// TestGatewayCodeChecks: the fetcher refuses what does not add up.
func TestGatewayCodeChecks(t *testing.T) {
	c := newCluster(t)
	node := filepath.Join(t.TempDir(), "node")
	if err := c.ca.IssueNode(node, "agent-1", []string{"127.0.0.1"}, time.Hour); err != nil {
		t.Fatal(err)
	}
	clientTLS, err := pki.LoadClientTLS(node)
	if err != nil {
		t.Fatal(err)
	}
	code := bytes.Repeat([]byte("zip!"), 100_000)
	sum := sha256.Sum256(code)
	digest := hex.EncodeToString(sum[:])
	srv := &codeServer{zips: map[string][]byte{digest: code}, chunk: 64 << 10}
	g := NewGatewayCode(c.serveCode(srv), clientTLS)

	got, err := g.FetchCode(context.Background(), digest)
	if err != nil || !bytes.Equal(got, code) {
		t.Fatalf("fetch: %d bytes, %v", len(got), err)
	}
	if _, err := g.FetchCode(context.Background(), strings.Repeat("0", 64)); !errs.IsNotFound(err) {
		t.Errorf("unknown digest: %v, want not found", err)
	}
	for name, lie := range map[string]func(int64, []byte) (int64, []byte){
		"more than announced": func(n int64, b []byte) (int64, []byte) { return n - 1, b },
		"less than announced": func(n int64, b []byte) (int64, []byte) { return n, b[:len(b)-1] },
		"over the limit":      func(n int64, b []byte) (int64, []byte) { return MaxCodeBytes + 1, b },
		"other bytes":         func(n int64, b []byte) (int64, []byte) { return n, bytes.ToUpper(b) },
	} {
		srv.lie = lie
		if _, err := g.FetchCode(context.Background(), digest); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	srv.lie = nil

	// The configured gateway is down: the code comes from another one
	// gossip knows; its NotFound is final (gateways share storage).
	down := "https://127.0.0.1:1"
	g2 := NewGatewayCode(down, clientTLS)
	if _, err := g2.FetchCode(context.Background(), digest); err == nil {
		t.Fatal("fetch from a gateway that is down succeeded")
	}
	g2.SetGateways(func() []string { return []string{down, c.serveCode(srv)} })
	if got, err := g2.FetchCode(context.Background(), digest); err != nil || !bytes.Equal(got, code) {
		t.Fatalf("fetch with the configured gateway down: %d bytes, %v", len(got), err)
	}
	if _, err := g2.FetchCode(context.Background(), strings.Repeat("0", 64)); !errs.IsNotFound(err) {
		t.Errorf("unknown digest through the fallback: %v, want not found", err)
	}

	// A fetcher without a cluster certificate gets nothing.
	noCert := clientTLS.Clone()
	noCert.Certificates = nil
	if _, err := NewGatewayCode(c.serveCode(srv), noCert).FetchCode(context.Background(), digest); err == nil {
		t.Error("fetch without a client certificate succeeded")
	}
}

// fakeRejoiner is a gossip member whose view the test sets.
type fakeRejoiner struct {
	mu      sync.Mutex
	members []gossip.Member
	joins   [][]string
	onJoin  func() // run on each Join, e.g. to make the gateway alive
}

func (f *fakeRejoiner) Members() []gossip.Member {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]gossip.Member(nil), f.members...)
}

func (f *fakeRejoiner) Join(addrs []string) (int, error) {
	f.mu.Lock()
	f.joins = append(f.joins, append([]string(nil), addrs...))
	on := f.onJoin
	f.mu.Unlock()
	if on != nil {
		on()
	}
	return len(addrs), nil
}

func (f *fakeRejoiner) setGateway(s gossip.State) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.members = []gossip.Member{
		{Name: "a1", Tags: gossip.Tags{Role: gossip.RoleAgent}, State: gossip.StateAlive},
		{Name: "gw", Tags: gossip.Tags{Role: gossip.RoleGateway}, State: s},
	}
}

func (f *fakeRejoiner) joined() [][]string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([][]string(nil), f.joins...)
}

// TestRejoinLoop: an agent that sees a gateway alive never rejoins; one
// that sees every gateway dead (a healed partition) joins again through
// the seeds that answer, and stops once a gateway is alive.
func TestRejoinLoop(t *testing.T) {
	up, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	go func() {
		for {
			c, err := up.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	down, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	downAddr := down.Addr().String()
	down.Close() // nothing listens there: the dial is refused

	f := &fakeRejoiner{}
	f.setGateway(gossip.StateAlive)
	seeds := []string{downAddr, up.Addr().String()}
	ctx := context.Background()
	log := slog.New(slog.DiscardHandler)
	round := func() bool { return rejoinOnce(ctx, f, seeds, time.Second, log) }

	// A live gateway: rounds without a join.
	for range 10 {
		if round() {
			t.Fatalf("joined %v while a gateway was alive", f.joined())
		}
	}
	if j := f.joined(); len(j) > 0 {
		t.Fatalf("joined %v while a gateway was alive", j)
	}

	// Every gateway dead: it joins through the seed that answers, and the
	// join makes the gateway alive again.
	f.mu.Lock()
	f.onJoin = func() { f.setGateway(gossip.StateAlive) }
	f.mu.Unlock()
	f.setGateway(gossip.StateDead)
	if !round() {
		t.Fatal("no rejoin with every gateway dead")
	}
	if j := f.joined(); len(j) != 1 || len(j[0]) != 1 || j[0][0] != up.Addr().String() {
		t.Fatalf("rejoined through %v, want once, only through the seed that answers (%s)", j, up.Addr())
	}
	// Alive again: no more joins.
	for range 10 {
		round()
	}
	if j := f.joined(); len(j) != 1 {
		t.Fatalf("joined %d times, want once: %v", len(j), j)
	}
}
