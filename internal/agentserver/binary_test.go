package agentserver

import (
	"bytes"
	"context"
	"encoding/base64"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gossip"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/testutil"
)

// skiffBinary builds cmd/skiff once per test run.
func skiffBinary(t *testing.T) string { return testutil.SkiffBinary(t) }

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// agentProc is a running `skiff agent` process.
type agentProc struct {
	cmd     *exec.Cmd
	out     *syncBuffer
	done    chan struct{}
	rpc     string
	dataDir string
}

var listeningRE = regexp.MustCompile(`listening on https://(\S+) `)

// startAgentBinary starts `skiff agent` with args after the data dir and
// waits until it serves.
func startAgentBinary(t *testing.T, dataDir string, args ...string) *agentProc {
	t.Helper()
	testutil.RequirePrivileged(t)
	p := &agentProc{out: &syncBuffer{}, done: make(chan struct{}), dataDir: dataDir}
	p.cmd = exec.Command(skiffBinary(t), append([]string{"agent", "--data-dir", dataDir}, args...)...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Kill() // our own child, by PID
			<-p.done
		}
		if t.Failed() {
			t.Logf("skiff agent output:\n%s", p.out.String())
		}
	})
	deadline := time.After(60 * time.Second)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		if m := listeningRE.FindStringSubmatch(p.out.String()); m != nil {
			p.rpc = m[1]
			return p
		}
		select {
		case <-p.done:
			t.Fatalf("skiff agent exited early: %v\n%s", p.cmd.ProcessState, p.out.String())
		case <-deadline:
			t.Fatalf("skiff agent did not start within 60s:\n%s", p.out.String())
		case <-tick.C:
		}
	}
}

// exitCode waits for the process to exit and returns its code.
func (p *agentProc) exitCode(t *testing.T, timeout time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
		return p.cmd.ProcessState.ExitCode()
	case <-time.After(timeout):
		t.Fatalf("skiff agent did not exit within %s", timeout)
		return -1
	}
}

// TestBinarySIGTERM runs the real `skiff agent`: a function through
// AgentService over mTLS, its capacity in another gossip member's view
// (the cluster key read from a base64 file), then SIGTERM: new invocations
// are refused with "draining", the in-flight one finishes, exit status 0.
func TestBinarySIGTERM(t *testing.T) {
	testutil.RequirePrivileged(t)
	c := newCluster(t)
	zip, digest := testFunction(t)
	gw := c.serveCode(&codeServer{zips: map[string][]byte{digest: zip}, chunk: 256 << 10})
	key := bytes.Repeat([]byte{3}, 16)
	keyFile := filepath.Join(t.TempDir(), "gossip.key")
	if err := os.WriteFile(keyFile, []byte(base64.StdEncoding.EncodeToString(key)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	peer, err := gossip.New(gossip.Config{Name: "gw-1", BindAddr: "127.0.0.1", Key: key, Tags: gossip.Tags{Role: gossip.RoleGateway}})
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Shutdown()
	events := watch(peer)

	dir := c.agentDataDir("agent-b")
	p := startAgentBinary(t, dir, "--listen", "127.0.0.1:0", "--name", "agent-b", "--gateway", gw,
		"--gossip-bind", "127.0.0.1:0", "--gossip-join", peer.Addr(), "--gossip-key-file", keyFile,
		"--zone", "z2", "--sandbox-memory", "1024", "--sandbox-subnet", testSubnet().String(), "--keep-alive", "1m",
		"--log-level", "debug")
	cl := c.agentClient(p.rpc)
	resp, err := cl.Invoke(context.Background(), invokeReq(digest, "k1", `{"x":1}`))
	if err != nil {
		t.Fatal(err)
	}
	if string(resp.Msg.GetPayload()) != `{"x":1}` || resp.Msg.GetHost() != "agent-b" {
		t.Fatalf("invoke: %s on %q", resp.Msg.GetPayload(), resp.Msg.GetHost())
	}
	m := events.until(t, 10*time.Second, "the agent's warm sandbox in gossip", func(m gossip.Member) bool {
		return m.Name == "agent-b" && m.Capacity != nil && m.Capacity.WarmIdle("k1") == 1
	})
	if m.Tags.RPCAddr != p.rpc || m.Tags.Zone != "z2" || m.Capacity.MemoryTotalMB != 1024 || !m.Capacity.HasCode(digest) {
		t.Errorf("gossip view of the agent: tags %+v capacity %+v code %v", m.Tags, *m.Capacity, m.Capacity.HasCode(digest))
	}

	slow := make(chan error, 1)
	var slowResp *connect.Response[skiffv1.AgentInvokeResponse]
	go func() {
		var err error
		slowResp, err = cl.Invoke(context.Background(), invokeReq(digest, "k1", `{"action":"sleep","sleep":"2s"}`))
		slow <- err
	}()
	ctl, err := ControlClient(dir)
	if err != nil {
		t.Fatal(err)
	}
	status := func() *skiffv1.StatusResponse {
		st, err := ctl.Status(context.Background(), connect.NewRequest(&skiffv1.StatusRequest{}))
		if err != nil {
			return &skiffv1.StatusResponse{}
		}
		return st.Msg
	}
	waitFor(t, 60*time.Second, "the slow invocation in flight", func() (bool, error) { return status().GetInFlight() == 1, nil })
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "draining after SIGTERM", func() (bool, error) { return status().GetDraining(), nil })
	if st := status(); st.GetInFlight() != 1 {
		t.Fatalf("%d in flight once draining, want the slow invocation still running", st.GetInFlight())
	}
	_, err = cl.Invoke(context.Background(), invokeReq(digest, "k1", `{}`))
	if kind, reason := reasonOf(err); kind != errs.KindUnavailable || reason != "draining" {
		t.Fatalf("invoke while draining: %v (kind %v reason %q), want Unavailable draining", err, kind, reason)
	}
	events.until(t, 10*time.Second, "the agent flagged draining in gossip", func(m gossip.Member) bool {
		return m.Name == "agent-b" && m.Draining
	})
	if err := <-slow; err != nil {
		t.Fatalf("in-flight invocation during the drain: %v", err)
	}
	if got := string(slowResp.Msg.GetPayload()); got != `{"slept":"2s"}` {
		t.Errorf("in-flight invocation answered %s", got)
	}
	if code := p.exitCode(t, 30*time.Second); code != 0 {
		t.Fatalf("exit status %d after a drain, want 0", code)
	}
	events.until(t, 10*time.Second, "the agent left the cluster", func(m gossip.Member) bool {
		return m.Name == "agent-b" && m.State == gossip.StateLeft
	})
}

// TestBinaryDrainCommand: `skiff agent drain` drains the agent on the data
// dir through its control socket and returns once it exited (status 0).
func TestBinaryDrainCommand(t *testing.T) {
	testutil.RequirePrivileged(t)
	c := newCluster(t)
	zip, digest := testFunction(t)
	gw := c.serveCode(&codeServer{zips: map[string][]byte{digest: zip}, chunk: 1 << 20})
	dir := c.agentDataDir("agent-c")
	p := startAgentBinary(t, dir, "--listen", "127.0.0.1:0", "--name", "agent-c", "--gateway", gw,
		"--gossip-bind", "127.0.0.1:0", "--sandbox-memory", "512", "--sandbox-subnet", testSubnet().String())
	if _, err := c.agentClient(p.rpc).Invoke(context.Background(), invokeReq(digest, "k1", `{}`)); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(dir, ControlSocket)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket: %v mode %v, want 0600", err, fi.Mode())
	}
	// A second agent on the same data dir is refused.
	second := exec.Command(skiffBinary(t), "agent", "--data-dir", dir, "--listen", "127.0.0.1:0", "--name", "agent-c",
		"--gateway", gw, "--gossip-bind", "127.0.0.1:0", "--sandbox-subnet", testSubnet().String())
	out, err := second.CombinedOutput()
	if err == nil || !bytes.Contains(out, []byte("another agent is running on this data dir")) {
		t.Errorf("second agent on one data dir: %v\n%s", err, out)
	}

	drain := exec.Command(skiffBinary(t), "agent", "drain", "--data-dir", dir, "--timeout", "1m")
	out, err = drain.CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("agent drained and stopped")) {
		t.Fatalf("skiff agent drain: %v\n%s", err, out)
	}
	if code := p.exitCode(t, 10*time.Second); code != 0 {
		t.Fatalf("agent exit status %d after drain, want 0", code)
	}
}

// TestBinarySecondSIGTERM: a second SIGTERM ends a drain at once: the
// in-flight invocation fails and the exit status says the drain was cut
// short.
func TestBinarySecondSIGTERM(t *testing.T) {
	testutil.RequirePrivileged(t)
	c := newCluster(t)
	zip, digest := testFunction(t)
	gw := c.serveCode(&codeServer{zips: map[string][]byte{digest: zip}, chunk: 1 << 20})
	dir := c.agentDataDir("agent-d")
	p := startAgentBinary(t, dir, "--listen", "127.0.0.1:0", "--name", "agent-d", "--gateway", gw,
		"--gossip-bind", "127.0.0.1:0", "--sandbox-memory", "512", "--sandbox-subnet", testSubnet().String())
	slow := make(chan error, 1)
	go func() {
		_, err := c.agentClient(p.rpc).Invoke(context.Background(), invokeReq(digest, "k1", `{"action":"sleep","sleep":"60s"}`))
		slow <- err
	}()
	ctl, err := ControlClient(dir)
	if err != nil {
		t.Fatal(err)
	}
	status := func() *skiffv1.StatusResponse {
		st, err := ctl.Status(context.Background(), connect.NewRequest(&skiffv1.StatusRequest{}))
		if err != nil {
			return &skiffv1.StatusResponse{}
		}
		return st.Msg
	}
	waitFor(t, 60*time.Second, "the slow invocation running", func() (bool, error) {
		st := status()
		return len(st.GetSandboxes()) == 1 && st.GetSandboxes()[0].GetState() == "busy", nil
	})
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "draining after SIGTERM", func() (bool, error) { return status().GetDraining(), nil })
	start := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := p.exitCode(t, 30*time.Second); code == 0 {
		t.Errorf("exit status 0 after an aborted drain")
	}
	t.Logf("second SIGTERM to exit: %s", time.Since(start).Round(time.Millisecond))
	if !bytes.Contains([]byte(p.out.String()), []byte("drain cut short")) {
		t.Errorf("output does not say the drain was cut short:\n%s", p.out.String())
	}
	select {
	case err := <-slow:
		if err == nil {
			t.Error("the in-flight invocation succeeded although the drain was aborted")
		}
	case <-time.After(30 * time.Second):
		t.Error("the in-flight invocation did not end")
	}
}
