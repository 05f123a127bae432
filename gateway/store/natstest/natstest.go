// Package natstest runs real nats-server processes for tests: a JetStream
// cluster of separate processes (3 nodes by default) on 127.0.0.1 ports or
// on addresses the caller provides (e2e runs them inside network
// namespaces), each with its own store directory, with the means to kill
// -9, stop and restart one node. Everything is killed when the test ends.
//
// The server binary is bin/tools/nats-server under the repository root,
// installed by `make tools` and .ci/run with `go install` at the version
// go.mod pins. When it is missing a test skips, or fails when
// SKIFF_PRIVILEGED_TESTS=1 says every test must run.
package natstest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"skiff.dev/skiff/internal/testutil"
)

// BinaryPath is where the tests find nats-server, relative to the
// repository root.
const BinaryPath = "bin/tools/nats-server"

// MaxPayload is the servers' default max_payload: what skiff requires.
const MaxPayload = 8 << 20

// Standard ports, used when Config.Hosts gives each node its own address.
const (
	ClientPort  = 4222
	ClusterPort = 6222
	MonitorPort = 8222
)

// Binary returns the path of nats-server. When it is missing it skips t,
// or fails t when SKIFF_PRIVILEGED_TESTS=1.
func Binary(t testing.TB) string {
	t.Helper()
	path := filepath.Join(testutil.RepoRoot(t), BinaryPath)
	if fi, err := os.Stat(path); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
		return path
	}
	msg := fmt.Sprintf("%s is missing: run `make tools` (it installs nats-server with go install at the version in go.mod)", path)
	if os.Getenv(testutil.PrivilegedEnv) == "1" {
		t.Fatalf("%s; %s=1 forbids skipping", msg, testutil.PrivilegedEnv)
	}
	t.Skip(msg)
	return ""
}

// Config configures a Cluster.
type Config struct {
	// Nodes is the number of servers; 0 means 3. One node runs
	// JetStream without clustering.
	Nodes int
	// Hosts, when set, is each node's address (len(Hosts) == Nodes); the
	// nodes then use the standard ports. Empty means 127.0.0.1 with free
	// ports.
	Hosts []string
	// Start starts node i's process; nil means cmd.Start. e2e starts the
	// process inside a host's network namespace.
	Start func(node int, cmd *exec.Cmd) error
	// Extra is appended to every node's configuration file (authorization,
	// tls blocks).
	Extra string
	// MaxPayload is the servers' max_payload; 0 means MaxPayload.
	MaxPayload int
	// Ready bounds the wait for the cluster to form; 0 means 60 s.
	Ready time.Duration
}

// Node is one server of the cluster.
type Node struct {
	Name        string
	Host        string
	ClientPort  int
	ClusterPort int
	MonitorPort int
	StoreDir    string
	ConfigFile  string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
	out  *tail
}

// URL is the node's client URL.
func (n *Node) URL() string { return "nats://" + net.JoinHostPort(n.Host, strconv.Itoa(n.ClientPort)) }

func (n *Node) monitor() string {
	return "http://" + net.JoinHostPort(n.Host, strconv.Itoa(n.MonitorPort))
}

// Running reports whether the node's process is alive.
func (n *Node) Running() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.done == nil {
		return false
	}
	select {
	case <-n.done:
		return false
	default:
		return true
	}
}

// PID is the process id of the node's current process (0 when none ran).
func (n *Node) PID() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd == nil || n.cmd.Process == nil {
		return 0
	}
	return n.cmd.Process.Pid
}

// Output is the tail of the node's log (all its processes).
func (n *Node) Output() string { return n.out.String() }

// Cluster is a running set of nats-server processes.
type Cluster struct {
	Nodes []*Node

	t    testing.TB
	bin  string
	cfg  Config
	http *http.Client
}

// Start writes the configuration of every node, starts them and waits
// until the cluster has a JetStream meta leader that every node agrees on
// and every node reports healthy. The processes are killed when t ends.
func Start(t testing.TB, cfg Config) *Cluster {
	t.Helper()
	bin := Binary(t)
	if cfg.Nodes == 0 {
		cfg.Nodes = 3
	}
	if len(cfg.Hosts) != 0 && len(cfg.Hosts) != cfg.Nodes {
		t.Fatalf("natstest: %d hosts for %d nodes", len(cfg.Hosts), cfg.Nodes)
	}
	if cfg.Start == nil {
		cfg.Start = func(_ int, cmd *exec.Cmd) error { return cmd.Start() }
	}
	if cfg.MaxPayload == 0 {
		cfg.MaxPayload = MaxPayload
	}
	if cfg.Ready == 0 {
		cfg.Ready = 60 * time.Second
	}
	c := &Cluster{t: t, bin: bin, cfg: cfg, http: &http.Client{Timeout: 2 * time.Second}}
	dir := t.TempDir()
	for i := range cfg.Nodes {
		n := &Node{Name: fmt.Sprintf("n%d", i), out: &tail{max: 256 << 10}}
		if len(cfg.Hosts) > 0 {
			n.Host, n.ClientPort, n.ClusterPort, n.MonitorPort = cfg.Hosts[i], ClientPort, ClusterPort, MonitorPort
		} else {
			n.Host = "127.0.0.1"
			ports := freePorts(t, 3)
			n.ClientPort, n.ClusterPort, n.MonitorPort = ports[0], ports[1], ports[2]
		}
		n.StoreDir = filepath.Join(dir, n.Name, "jetstream")
		n.ConfigFile = filepath.Join(dir, n.Name, "nats.conf")
		c.Nodes = append(c.Nodes, n)
	}
	for _, n := range c.Nodes {
		if err := os.MkdirAll(n.StoreDir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(n.ConfigFile, []byte(c.config(n)), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, n := range c.Nodes {
			n.kill()
		}
		if t.Failed() {
			for _, n := range c.Nodes {
				t.Logf("nats-server %s output (tail):\n%s", n.Name, n.Output())
			}
		}
	})
	for i := range c.Nodes {
		c.start(i)
	}
	c.WaitReady(cfg.Ready)
	return c
}

func (c *Cluster) config(n *Node) string {
	var b strings.Builder
	fmt.Fprintf(&b, "server_name: %q\n", n.Name)
	fmt.Fprintf(&b, "listen: %q\n", net.JoinHostPort(n.Host, strconv.Itoa(n.ClientPort)))
	fmt.Fprintf(&b, "http: %q\n", net.JoinHostPort(n.Host, strconv.Itoa(n.MonitorPort)))
	fmt.Fprintf(&b, "max_payload: %d\n", c.cfg.MaxPayload)
	fmt.Fprintf(&b, "jetstream {\n  store_dir: %q\n  max_memory_store: %d\n  max_file_store: %d\n}\n", n.StoreDir, 256<<20, 2<<30)
	if len(c.Nodes) > 1 {
		var routes []string
		for _, o := range c.Nodes {
			if o != n {
				routes = append(routes, strconv.Quote("nats-route://"+net.JoinHostPort(o.Host, strconv.Itoa(o.ClusterPort))))
			}
		}
		fmt.Fprintf(&b, "cluster {\n  name: \"skiff-test\"\n  listen: %q\n  routes: [%s]\n}\n",
			net.JoinHostPort(n.Host, strconv.Itoa(n.ClusterPort)), strings.Join(routes, ", "))
	}
	b.WriteString(c.cfg.Extra)
	b.WriteString("\n")
	return b.String()
}

func (c *Cluster) start(i int) {
	c.t.Helper()
	n := c.Nodes[i]
	cmd := exec.Command(c.bin, "-c", n.ConfigFile)
	cmd.Stdout, cmd.Stderr = n.out, n.out
	// The server dies with the thread that started it (the test, or the
	// namespace thread in e2e).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	fmt.Fprintf(n.out, "=== natstest: starting %s\n", n.Name)
	if err := c.cfg.Start(i, cmd); err != nil {
		c.t.Fatalf("starting nats-server %s: %v", n.Name, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	n.mu.Lock()
	n.cmd, n.done = cmd, done
	n.mu.Unlock()
}

// URLs are the client URLs of every node.
func (c *Cluster) URLs() []string {
	urls := make([]string, len(c.Nodes))
	for i, n := range c.Nodes {
		urls[i] = n.URL()
	}
	return urls
}

// Kill ends node i with SIGKILL, as a crash would, and waits for it.
func (c *Cluster) Kill(i int) { c.Nodes[i].kill() }

// Stop ends node i with SIGTERM (a clean shutdown) and waits for it; it
// kills the node when it has not exited after 30 s.
func (c *Cluster) Stop(i int) {
	n := c.Nodes[i]
	n.mu.Lock()
	cmd, done := n.cmd, n.done
	n.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		n.kill()
	}
}

func (n *Node) kill() {
	n.mu.Lock()
	cmd, done := n.cmd, n.done
	n.mu.Unlock()
	if cmd == nil {
		return
	}
	select {
	case <-done:
		return
	default:
	}
	_ = cmd.Process.Kill()
	<-done
}

// Restart starts node i again (after Kill or Stop) on its store directory
// and waits until the whole cluster is healthy again.
func (c *Cluster) Restart(i int) {
	c.t.Helper()
	if c.Nodes[i].Running() {
		c.t.Fatalf("natstest: restarting %s, which is running", c.Nodes[i].Name)
	}
	c.start(i)
	c.WaitReady(c.cfg.Ready)
}

// WaitReady waits until every running node reports healthy (JetStream
// current, /healthz) and, in a cluster, all of them name the same meta
// leader, which is running. It returns the leader's name ("" for one
// node).
func (c *Cluster) WaitReady(timeout time.Duration) string {
	c.t.Helper()
	var leader string
	var last error
	deadline := time.Now().Add(timeout)
	for {
		leader, last = c.ready()
		if last == nil {
			return leader
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("natstest: cluster not ready after %v: %v", timeout, last)
		}
		for _, n := range c.Nodes {
			n.mu.Lock()
			started := n.done != nil
			n.mu.Unlock()
			if started && !n.Running() && n.exitedEarly() {
				c.t.Fatalf("natstest: nats-server %s exited:\n%s", n.Name, n.Output())
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// exitedEarly reports a process that ended by itself (not by Kill/Stop):
// a configuration error, a port in use.
func (n *Node) exitedEarly() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	ps := n.cmd.ProcessState
	if ps == nil {
		return false
	}
	ws, ok := ps.Sys().(syscall.WaitStatus)
	return ok && ws.Exited() && ws.ExitStatus() != 0
}

func (c *Cluster) ready() (string, error) {
	leader := ""
	for _, n := range c.Nodes {
		if !n.Running() {
			continue
		}
		if err := c.healthy(n); err != nil {
			return "", err
		}
		if len(c.Nodes) == 1 {
			continue
		}
		l, err := c.metaLeader(n)
		if err != nil {
			return "", err
		}
		if l == "" {
			return "", fmt.Errorf("%s sees no meta leader", n.Name)
		}
		if leader != "" && l != leader {
			return "", fmt.Errorf("%s sees meta leader %s, others %s", n.Name, l, leader)
		}
		leader = l
	}
	if len(c.Nodes) > 1 {
		if leader == "" {
			return "", fmt.Errorf("no node running")
		}
		if n := c.Node(leader); n == nil || !n.Running() {
			return "", fmt.Errorf("meta leader %s is not running", leader)
		}
	}
	return leader, nil
}

// Node returns the node called name, or nil.
func (c *Cluster) Node(name string) *Node {
	for _, n := range c.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// Index returns the index of the node called name, or -1.
func (c *Cluster) Index(name string) int {
	for i, n := range c.Nodes {
		if n.Name == name {
			return i
		}
	}
	return -1
}

func (c *Cluster) healthy(n *Node) error {
	resp, err := c.http.Get(n.monitor() + "/healthz")
	if err != nil {
		return fmt.Errorf("%s healthz: %w", n.Name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var b bytes.Buffer
		_, _ = b.ReadFrom(http.MaxBytesReader(nil, resp.Body, 4096))
		return fmt.Errorf("%s healthz: %s %s", n.Name, resp.Status, strings.TrimSpace(b.String()))
	}
	return nil
}

// MetaLeader is the JetStream meta leader as node i sees it ("" when it
// sees none).
func (c *Cluster) MetaLeader(i int) (string, error) { return c.metaLeader(c.Nodes[i]) }

func (c *Cluster) metaLeader(n *Node) (string, error) {
	resp, err := c.http.Get(n.monitor() + "/jsz")
	if err != nil {
		return "", fmt.Errorf("%s jsz: %w", n.Name, err)
	}
	defer resp.Body.Close()
	var jsz struct {
		Meta *struct {
			Leader string `json:"leader"`
		} `json:"meta_cluster"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(nil, resp.Body, 1<<20)).Decode(&jsz); err != nil {
		return "", fmt.Errorf("%s jsz: %w", n.Name, err)
	}
	if jsz.Meta == nil {
		return "", nil
	}
	return jsz.Meta.Leader, nil
}

// freePorts returns n distinct TCP ports free on 127.0.0.1 right now.
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	ports := make([]int, n)
	for i := range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports[i] = l.Addr().(*net.TCPAddr).Port
	}
	return ports
}

// tail keeps the last max bytes written to it.
type tail struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (w *tail) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.b = append(w.b, p...)
	if over := len(w.b) - w.max; over > 0 {
		w.b = append(w.b[:0], w.b[over:]...)
	}
	return len(p), nil
}

func (w *tail) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return string(w.b)
}

// Messages returns the payload of every message in stream, read one
// sequence at a time from the first to the last. Every request has its
// own short deadline and is retried for up to 30 s: a request that meets
// a leader election or a reconnect is lost, not answered, and must not
// take the caller's whole deadline.
func Messages(ctx context.Context, js jetstream.JetStream, stream string) ([][]byte, error) {
	var st jetstream.Stream
	if err := Retry(ctx, func(ctx context.Context) (err error) {
		st, err = js.Stream(ctx, stream)
		return err
	}); err != nil {
		return nil, fmt.Errorf("stream %s: %w", stream, err)
	}
	var info *jetstream.StreamInfo
	if err := Retry(ctx, func(ctx context.Context) (err error) {
		info, err = st.Info(ctx)
		return err
	}); err != nil {
		return nil, fmt.Errorf("stream %s info: %w", stream, err)
	}
	var out [][]byte
	if info.State.Msgs == 0 {
		return out, nil
	}
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq; seq++ {
		var msg *jetstream.RawStreamMsg
		err := Retry(ctx, func(ctx context.Context) (err error) {
			msg, err = st.GetMsg(ctx, seq)
			if errors.Is(err, jetstream.ErrMsgNotFound) {
				msg, err = nil, nil // deleted
			}
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("stream %s message %d: %w", stream, seq, err)
		}
		if msg != nil {
			out = append(out, msg.Data)
		}
	}
	return out, nil
}

// Retry runs fn, each call with a 5 s deadline of its own, until it
// succeeds, 30 s pass or ctx ends; it returns the last error.
func Retry(ctx context.Context, fn func(context.Context) error) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		actx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := fn(actx)
		cancel()
		if err == nil || ctx.Err() != nil || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(100 * time.Millisecond):
		}
	}
}
