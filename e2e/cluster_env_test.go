package e2e

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/encoding/protojson"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/gateway/store/natstest"
	"skiff.dev/skiff/internal/testutil"
)

// The multi-host cluster of the e2e tests (issue 5): every process real,
// every host a network namespace on one bridge (netns_hosts_test.go).
//
//	host0: nats-0, gateway gw0     host3: agent agent0 (sandboxes 10.231.0.0/22)
//	host1: nats-1, gateway gw1     host4: agent agent1 (sandboxes 10.232.0.0/22)
//	host2: nats-2                  host5: agent agent2 (sandboxes 10.233.0.0/22)
//
// The gateways share the 3-node NATS cluster (R3), gossip with the agents
// (encrypted with a cluster key), and serve the API on <host>:7070 (the
// test reaches it over the bridge) and the cluster listener (joins, code)
// on <host>:7443. The CA comes from `skiff ca init`, the agents join with
// a token from `skiff token create`. Processes die with the test (parent
// death signal) and are stopped gracefully at its end.

// Ports of the cluster's processes; every host has its own address.
const (
	apiPort     = 7070
	clusterPort = 7443
	gossipPort  = 7946
	agentPort   = 7071
)

// clusterEnv is a running cluster.
type clusterEnv struct {
	t       *testing.T
	bin     string
	dir     string
	hn      *hostNet
	nats    *natstest.Cluster
	caDir   string
	keyFile string
	gws     []*gateway
	agents  []*agentNode
	token   string // the join token the agents joined with
	// short is a join token made with the shortest lifetime at the start:
	// the last subtest finds it expired.
	short        *skiffv1.CreateJoinTokenResponse
	shortCreated time.Time
}

// gateway is a `skiff gateway` process (its API through the embedded dev:
// client, metric, stop, kill).
type gateway struct {
	*dev
	name    string
	host    *host
	args    []string
	cluster skiffv1connect.ClusterServiceClient
}

// agentNode is a `skiff agent` process.
type agentNode struct {
	name    string
	host    *host
	dataDir string
	args    []string
	zone    string

	mu   sync.Mutex
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
}

func hostPort(h *host, port int) string { return net.JoinHostPort(h.addr.String(), fmt.Sprint(port)) }

// newClusterEnv starts the cluster and waits until every member sees every
// other alive and every agent has reported its capacity.
func newClusterEnv(t *testing.T) *clusterEnv {
	t.Helper()
	testutil.RequirePrivileged(t)
	e := &clusterEnv{t: t, bin: skiffBinary(t), dir: t.TempDir()}
	start := time.Now()
	e.hn = newHostNet(t, 6)
	e.nats = startNATS(t, e.hn)
	natsReady := time.Since(start)

	e.caDir = filepath.Join(e.dir, "ca")
	if out, err := e.cli("ca", "init", "--dir", e.caDir); err != nil {
		t.Fatalf("skiff ca init: %v\n%s", err, out)
	}
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	e.keyFile = filepath.Join(e.dir, "gossip.key")
	if err := os.WriteFile(e.keyFile, []byte(base64.StdEncoding.EncodeToString(key)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	// Stop everything at the end, agents first (they drain), then the
	// gateways, in parallel. Registered before the processes start, so
	// it runs after their own cleanups (which only report output).
	t.Cleanup(e.stopAll)

	for i := range 2 {
		h := e.hn.hosts[i]
		other := e.hn.hosts[1-i]
		g := &gateway{name: fmt.Sprintf("gw%d", i), host: h}
		g.args = []string{"gateway", "--data-dir", filepath.Join(e.dir, g.name), "--name", g.name,
			"--listen", hostPort(h, apiPort), "--ca-dir", e.caDir, "--cluster-listen", hostPort(h, clusterPort),
			"--gossip-bind", hostPort(h, gossipPort), "--gossip-join", hostPort(other, gossipPort),
			"--gossip-key-file", e.keyFile, "--nats", strings.Join(e.nats.URLs(), ","),
			"--async-retry-delay", "1s", "--log-level", "debug"}
		e.gws = append(e.gws, g)
	}
	// One after the other: the first creates the streams and buckets.
	for _, g := range e.gws {
		e.startGateway(g)
	}
	gwsReady := time.Since(start)

	out, err := e.cli("token", "create", "--ttl", "1h", "--description", "e2e agents")
	if err != nil {
		t.Fatalf("skiff token create: %v\n%s", err, out)
	}
	e.token = strings.TrimSpace(out)
	short, err := e.cli("-o", "json", "token", "create", "--ttl", "1m", "--description", "e2e expiring")
	if err != nil {
		t.Fatalf("skiff token create --ttl 1m: %v\n%s", err, short)
	}
	e.short = &skiffv1.CreateJoinTokenResponse{}
	if err := protojson.Unmarshal([]byte(short), e.short); err != nil || e.short.GetToken() == "" || e.short.GetId() == "" {
		t.Fatalf("skiff token create -o json: %v\n%s", err, short)
	}
	e.shortCreated = time.Now()

	var joins []string
	for _, g := range e.gws {
		joins = append(joins, hostPort(g.host, gossipPort))
	}
	for i := range 3 {
		h := e.hn.hosts[3+i]
		a := &agentNode{name: fmt.Sprintf("agent%d", i), host: h, dataDir: filepath.Join(e.dir, fmt.Sprintf("agent%d", i)), zone: fmt.Sprintf("zone-%d", i)}
		// Agents join through different gateways, which also serve them
		// code.
		gw := e.gws[i%2]
		a.args = []string{"agent", "--data-dir", a.dataDir, "--name", a.name,
			"--listen", hostPort(h, agentPort), "--gossip-bind", hostPort(h, gossipPort),
			"--gossip-join", strings.Join(joins, ","), "--gossip-key-file", e.keyFile,
			"--join", e.token, "--gateway", "https://" + hostPort(gw.host, clusterPort),
			"--zone", a.zone, "--sandbox-subnet", fmt.Sprintf("10.%d.0.0/22", 231+i),
			"--sandbox-memory", "6144", "--log-level", "info"}
		e.agents = append(e.agents, a)
	}
	var wg sync.WaitGroup
	for _, a := range e.agents {
		wg.Add(1)
		go func() { defer wg.Done(); e.startAgent(a) }()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	e.waitMembers(60*time.Second, "the whole cluster", func(g *gateway, m map[string]*skiffv1.Member) bool {
		if len(m) != 5 {
			return false
		}
		for _, mm := range m {
			if mm.GetState() != "alive" {
				return false
			}
		}
		return true
	})
	for _, g := range e.gws {
		waitFor(t, 30*time.Second, g.name+" sees every agent's capacity", func() bool {
			hs, err := g.cluster.ListHosts(context.Background(), connect.NewRequest(&skiffv1.ListHostsRequest{}))
			if err != nil || len(hs.Msg.GetHosts()) != 3 {
				return false
			}
			for _, h := range hs.Msg.GetHosts() {
				if !h.GetReported() {
					return false
				}
			}
			return true
		})
	}
	t.Logf("cluster up in %v: NATS cluster in %v, gateways in %v, 3 agents joined and gossiping",
		time.Since(start).Round(time.Millisecond), natsReady.Round(time.Millisecond), (gwsReady - natsReady).Round(time.Millisecond))
	return e
}

// cli runs the skiff CLI against gw0 (the first gateway) with its admin
// key, from the test's namespace, and returns its standard output (and
// standard error on failure).
func (e *clusterEnv) cli(args ...string) (string, error) {
	return e.cliOn(nil, args...)
}

func (e *clusterEnv) cliOn(g *gateway, args ...string) (string, error) {
	if g == nil && len(e.gws) > 0 {
		g = e.gws[0]
	}
	if g != nil {
		args = append([]string{"--endpoint", "http://" + g.addr, "--api-key", g.key}, args...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, e.bin, args...)
	cmd.Env = append(os.Environ(), "SKIFF_DATA_DIR="+filepath.Join(e.dir, "cli"))
	var stdout, stderr syncBuffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String() + stderr.String(), err
	}
	return stdout.String(), nil
}

// spawn starts the skiff binary with args inside host h; the process is
// killed if the test process dies.
func (e *clusterEnv) spawn(h *host, out *syncBuffer, args []string) (*exec.Cmd, chan struct{}) {
	e.t.Helper()
	cmd := exec.Command(e.bin, args...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := h.start(cmd); err != nil {
		e.t.Fatalf("starting %s on %s: %v", args[0], h.name, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	return cmd, done
}

// startGateway starts (or restarts) g and waits until it serves.
func (e *clusterEnv) startGateway(g *gateway) {
	t := e.t
	t.Helper()
	d := &dev{t: t, dataDir: g.args[2], addr: hostPort(g.host, apiPort), out: &syncBuffer{}}
	d.cmd, d.done = e.spawn(g.host, d.out, g.args)
	g.dev = d
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("%s output (last lines):\n%s", g.name, lastLines(d.out.String(), 80))
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		if key, err := os.ReadFile(filepath.Join(d.dataDir, "admin.key")); err == nil && len(key) > 0 && strings.Contains(d.out.String(), "listening on") {
			d.key = strings.TrimSpace(string(key))
			break
		}
		select {
		case <-d.done:
			t.Fatalf("%s exited early: %v\n%s", g.name, d.cmd.ProcessState, d.out.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not start within 60s:\n%s", g.name, d.out.String())
		}
	}
	g.cluster = skiffv1connect.NewClusterServiceClient(httpClient(), "http://"+d.addr, connect.WithInterceptors(bearer(d.key)))
}

var agentListening = regexp.MustCompile(`listening on https://\S+`)

// startAgent starts (or restarts) a and waits until it serves.
func (e *clusterEnv) startAgent(a *agentNode) {
	t := e.t
	out := &syncBuffer{}
	cmd, done := e.spawn(a.host, out, a.args)
	a.mu.Lock()
	a.cmd, a.out, a.done = cmd, out, done
	a.mu.Unlock()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("%s output (last lines):\n%s", a.name, lastLines(out.String(), 80))
		}
	})
	deadline := time.After(60 * time.Second)
	for !agentListening.MatchString(out.String()) {
		select {
		case <-done:
			t.Errorf("%s exited early: %v\n%s", a.name, cmd.ProcessState, out.String())
			return
		case <-deadline:
			t.Errorf("%s did not start within 60s:\n%s", a.name, out.String())
			return
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// kill ends the agent with SIGKILL, as a crash would.
func (a *agentNode) kill() {
	a.mu.Lock()
	cmd, done := a.cmd, a.done
	a.mu.Unlock()
	_ = cmd.Process.Kill() // our own child, by PID
	<-done
}

// stop drains the agent (SIGTERM) and waits for it, killing it after 30 s.
func (a *agentNode) stop() {
	a.mu.Lock()
	cmd, done := a.cmd, a.done
	a.mu.Unlock()
	if cmd == nil {
		return
	}
	select {
	case <-done:
		return
	default:
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}

func (e *clusterEnv) stopAll() {
	var wg sync.WaitGroup
	for _, a := range e.agents {
		wg.Add(1)
		go func() { defer wg.Done(); a.stop() }()
	}
	wg.Wait()
	for _, g := range e.gws {
		if g.dev == nil {
			continue
		}
		wg.Add(1)
		go func() { defer wg.Done(); g.stop() }()
	}
	wg.Wait()
}

// members is g's view of the cluster, by name.
func (g *gateway) members(ctx context.Context) (map[string]*skiffv1.Member, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	resp, err := g.cluster.ListMembers(ctx, connect.NewRequest(&skiffv1.ListMembersRequest{}))
	if err != nil {
		return nil, err
	}
	m := map[string]*skiffv1.Member{}
	for _, mm := range resp.Msg.GetMembers() {
		m[mm.GetName()] = mm
	}
	return m, nil
}

// memberState is name's state in g's view ("" when unknown or g fails).
func (g *gateway) memberState(name string) string {
	m, err := g.members(context.Background())
	if err != nil || m[name] == nil {
		return ""
	}
	return m[name].GetState()
}

// sandboxes lists the cluster's sandboxes through g (of fn when set).
func (g *gateway) sandboxes(t *testing.T, fn string) *skiffv1.ListSandboxesResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := g.cluster.ListSandboxes(ctx, connect.NewRequest(&skiffv1.ListSandboxesRequest{FunctionName: fn}))
	if err != nil {
		t.Fatalf("listing sandboxes through %s: %v", g.name, err)
	}
	return resp.Msg
}

// waitMembers waits until cond holds for every live gateway's view.
func (e *clusterEnv) waitMembers(timeout time.Duration, what string, cond func(g *gateway, m map[string]*skiffv1.Member) bool) {
	e.t.Helper()
	waitFor(e.t, timeout, what, func() bool {
		for _, g := range e.gws {
			if g.dev == nil || g.exited() {
				continue
			}
			m, err := g.members(context.Background())
			if err != nil || !cond(g, m) {
				return false
			}
		}
		return true
	})
}

// exited reports whether the gateway process has ended.
func (d *dev) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// live are the gateways still running.
func (e *clusterEnv) live() []*gateway {
	var out []*gateway
	for _, g := range e.gws {
		if g.dev != nil && !g.exited() {
			out = append(out, g)
		}
	}
	return out
}

// metricSum sums every sample of a metric family on g (0 when absent).
func (g *gateway) metricSum(t *testing.T, name string) float64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+g.addr+"/metrics", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("metrics of %s: %v", g.name, err)
	}
	defer resp.Body.Close()
	all, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		t.Fatalf("metrics of %s: %v", g.name, err)
	}
	var sum float64
	for _, line := range strings.Split(string(all), "\n") {
		if !strings.HasPrefix(line, name) {
			continue
		}
		rest := line[len(name):]
		if rest == "" || (rest[0] != ' ' && rest[0] != '{') {
			continue
		}
		f := strings.Fields(line)
		var v float64
		if _, err := fmt.Sscan(f[len(f)-1], &v); err == nil {
			sum += v
		}
	}
	return sum
}

// lastLines is the end of s, at most n lines.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// settled waits until every live gateway serves function name at the
// revision gw0 (where the test writes) has: gateways read functions from
// a watched cache of the shared store, so a function just created or
// changed through one gateway is unknown or stale on another for a moment.
func (e *clusterEnv) settled(t *testing.T, name string) {
	t.Helper()
	get := func(g *gateway) uint64 {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		resp, err := g.client("connect", "").fn.GetFunction(ctx, connect.NewRequest(&skiffv1.GetFunctionRequest{Name: name}))
		if err != nil {
			return 0
		}
		return resp.Msg.GetFunction().GetRevision()
	}
	want := get(e.gws[0])
	if want == 0 {
		t.Fatalf("function %s not found through gw0", name)
	}
	waitFor(t, 10*time.Second, "every gateway serving function "+name+" at its last revision", func() bool {
		for _, g := range e.live() {
			if get(g) != want {
				return false
			}
		}
		return true
	})
}
