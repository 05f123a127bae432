package agentserver

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/gossip"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/pki"
	"skiff.dev/skiff/internal/testutil"
	"skiff.dev/skiff/vmm/jail"
)

func TestMain(m *testing.M) {
	if jail.IsInit() {
		jail.InitMain()
	}
	code := m.Run()
	testutil.RemoveSkiffBinary()
	os.Exit(code)
}

// cluster is a test CA with a gateway identity (the in-test code server
// and the AgentService client) and agents' certificate directories.
type cluster struct {
	t     *testing.T
	caDir string
	ca    *pki.CA
	gwDir string // the gateway's node certificate
}

func newCluster(t *testing.T) *cluster {
	t.Helper()
	c := &cluster{t: t, caDir: filepath.Join(t.TempDir(), "ca"), gwDir: filepath.Join(t.TempDir(), "gw")}
	if err := pki.InitCA(c.caDir); err != nil {
		t.Fatal(err)
	}
	ca, err := pki.LoadCA(c.caDir)
	if err != nil {
		t.Fatal(err)
	}
	c.ca = ca
	if err := ca.IssueNode(c.gwDir, "gw-1", []string{"127.0.0.1"}, time.Hour); err != nil {
		t.Fatal(err)
	}
	return c
}

// agentDataDir returns a data dir whose tls/ holds a certificate of the
// cluster for name at 127.0.0.1.
func (c *cluster) agentDataDir(name string) string {
	c.t.Helper()
	dir := c.t.TempDir()
	if err := c.ca.IssueNode(filepath.Join(dir, "tls"), name, []string{"127.0.0.1"}, time.Hour); err != nil {
		c.t.Fatal(err)
	}
	return dir
}

// agentClient calls an agent's AgentService over mTLS with the gateway's
// certificate.
func (c *cluster) agentClient(addr string) skiffv1connect.AgentServiceClient {
	c.t.Helper()
	tc, err := pki.LoadClientTLS(c.gwDir)
	if err != nil {
		c.t.Fatal(err)
	}
	return agentClientTLS(c.t, addr, tc)
}

func agentClientTLS(t *testing.T, addr string, tc *tls.Config) skiffv1connect.AgentServiceClient {
	tr := &http.Transport{TLSClientConfig: tc, ForceAttemptHTTP2: true}
	t.Cleanup(tr.CloseIdleConnections)
	return skiffv1connect.NewAgentServiceClient(&http.Client{Transport: tr}, "https://"+addr)
}

// codeServer is the gateway side of CodeService, in the test: it serves
// archives by digest in small chunks, only to clients with a cluster
// certificate.
type codeServer struct {
	skiffv1connect.UnimplementedCodeServiceHandler
	zips  map[string][]byte
	chunk int
	calls atomic.Int32
	// lie, when set, changes what is sent (for the fetcher's checks).
	lie func(size int64, b []byte) (int64, []byte)
}

func (s *codeServer) GetCode(_ context.Context, req *connect.Request[skiffv1.GetCodeRequest], st *connect.ServerStream[skiffv1.GetCodeResponse]) error {
	s.calls.Add(1)
	b, ok := s.zips[req.Msg.GetCodeSha256()]
	if !ok {
		return errs.ToConnect(errs.NotFound("code %s not found", req.Msg.GetCodeSha256()))
	}
	size := int64(len(b))
	if s.lie != nil {
		size, b = s.lie(size, b)
	}
	first := true
	for first || len(b) > 0 {
		n := min(s.chunk, len(b))
		msg := &skiffv1.GetCodeResponse{Chunk: b[:n]}
		if first {
			msg.Size = size
			first = false
		}
		if err := st.Send(msg); err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

// serveCode starts a CodeService over mTLS on 127.0.0.1 and returns its
// URL.
func (c *cluster) serveCode(s *codeServer) string {
	c.t.Helper()
	tc, err := pki.LoadServerTLS(c.gwDir)
	if err != nil {
		c.t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		c.t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle(skiffv1connect.NewCodeServiceHandler(s))
	srv := &http.Server{Handler: mux, TLSConfig: tc, ReadHeaderTimeout: 5 * time.Second,
		ErrorLog: slog.NewLogLogger(slog.DiscardHandler, slog.LevelError)}
	go func() { _ = srv.ServeTLS(ln, "", "") }()
	c.t.Cleanup(func() { _ = srv.Close() })
	return "https://" + ln.Addr().String()
}

// testFunction is the aws-lambda-go test function and its digest.
func testFunction(t *testing.T) ([]byte, string) {
	zip := testutil.FunctionZip(t, "testfn")
	sum := sha256.Sum256(zip)
	return zip, hex.EncodeToString(sum[:])
}

// testSubnet is a random /24 in 10.180.0.0/14: other packages' tests run
// at once and use other ranges.
func testSubnet() netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(180 + rand.IntN(4)), byte(rand.IntN(256)), 0}), 24)
}

// running is an agent started by startAgent.
type running struct {
	addrs  Addrs
	cancel context.CancelFunc
	abort  chan struct{}
	done   chan error
	once   sync.Once
}

// wait returns Run's result, failing the test after timeout.
func (r *running) wait(t *testing.T, timeout time.Duration) error {
	t.Helper()
	select {
	case err := <-r.done:
		r.done <- err
		return err
	case <-time.After(timeout):
		t.Fatalf("agent did not stop within %s", timeout)
		return nil
	}
}

// startAgent runs an agent in this process until the test ends.
func startAgent(t *testing.T, cfg Config) *running {
	t.Helper()
	testutil.RequirePrivileged(t)
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:0"
	}
	if cfg.GossipBind == "" {
		cfg.GossipBind = "127.0.0.1:0"
	}
	if cfg.SandboxMemoryMB == 0 {
		cfg.SandboxMemoryMB = 1024
	}
	if !cfg.SandboxSubnet.IsValid() {
		cfg.SandboxSubnet = testSubnet()
	}
	if cfg.Logger == nil && os.Getenv("SKIFF_TEST_LOG") != "" {
		cfg.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{cancel: cancel, abort: make(chan struct{}), done: make(chan error, 1)}
	cfg.Abort = r.abort
	ready := make(chan Addrs, 1)
	cfg.Ready = func(a Addrs) { ready <- a }
	go func() { r.done <- Run(ctx, cfg) }()
	t.Cleanup(func() {
		r.once.Do(func() { close(r.abort) })
		cancel()
		_ = r.wait(t, time.Minute)
	})
	select {
	case r.addrs = <-ready:
	case err := <-r.done:
		r.done <- err
		t.Fatalf("agent stopped while starting: %v", err)
	case <-time.After(time.Minute):
		t.Fatal("agent did not start within a minute")
	}
	return r
}

func invokeReq(digest, key, payload string) *connect.Request[skiffv1.AgentInvokeRequest] {
	return connect.NewRequest(&skiffv1.AgentInvokeRequest{
		Spec: &skiffv1.SandboxSpec{FunctionName: "fn", ConfigKey: key, CodeSha256: digest,
			MemoryMb: 128, TimeoutSeconds: 30},
		RequestId: "req-" + strconv.FormatUint(rand.Uint64(), 16),
		Payload:   []byte(payload),
		WantLog:   true,
	})
}

// waitFor polls cond every 10 ms until it holds, failing after timeout.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		ok, err := cond()
		if ok {
			return
		}
		last = err
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s (last error: %v)", what, timeout, last)
		}
		<-tick.C
	}
}

// reasonOf returns the errs reason and kind an RPC error carries.
func reasonOf(err error) (errs.Kind, string) {
	var e *errs.Error
	if errors.As(errs.FromConnect(err), &e) {
		return e.Kind, e.Reason
	}
	return errs.KindUnknown, ""
}

// watcher records a gossip node's events.
type watcher struct {
	mu     sync.Mutex
	cond   *sync.Cond
	events []gossip.Event
}

func watch(n *gossip.Node) *watcher {
	w := &watcher{}
	w.cond = sync.NewCond(&w.mu)
	go func() {
		for ev := range n.Events() {
			w.mu.Lock()
			w.events = append(w.events, ev)
			w.cond.Broadcast()
			w.mu.Unlock()
		}
	}()
	return w
}

// until returns the member of the first event (since the watch began)
// for which pred holds, failing the test after timeout.
func (w *watcher) until(t *testing.T, timeout time.Duration, what string, pred func(gossip.Member) bool) gossip.Member {
	t.Helper()
	expired := false
	timer := time.AfterFunc(timeout, func() {
		w.mu.Lock()
		expired = true
		w.cond.Broadcast()
		w.mu.Unlock()
	})
	defer timer.Stop()
	w.mu.Lock()
	defer w.mu.Unlock()
	for i := 0; ; {
		for ; i < len(w.events); i++ {
			if ev := w.events[i]; ev.Type != gossip.EventMessage && pred(ev.Member) {
				return ev.Member
			}
		}
		if expired {
			t.Fatalf("%s: not seen within %s in %d gossip events", what, timeout, len(w.events))
		}
		w.cond.Wait()
	}
}
