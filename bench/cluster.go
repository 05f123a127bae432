package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/vishvananda/netlink"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/gateway/lease"
	"skiff.dev/skiff/gateway/placement"
	"skiff.dev/skiff/gossip"
	"skiff.dev/skiff/netns"
)

// The cluster section (issue 5): real `skiff gateway` and `skiff agent`
// processes (cmd/skiff, built here) and a nats-server, on one machine:
//
//	root namespace: nats-server 127.0.0.1, gateways gw0 and gw1 (API on
//	                127.0.0.1, cluster listener and gossip on the veth's
//	                root end 10.97.n.1)
//	      │ veth (10.97.n.0/30)
//	host namespace: agent0 at 10.97.n.2 (its sandboxes in 10.247.0.0/22)
//
// It measures sync invoke latency and throughput through gw0 to agent0
// against the in-process `skiff dev` (the cost of the hop), failure
// detection after a kill -9 of the agent, lease takeover after a kill -9
// of the gateway holding the pollers' leases, and placement decisions
// over 1,000 simulated agents (in this process).

// Targets of the benchmark section.
const (
	targetDetection = time.Second     // a dead member detected on a LAN
	targetLeaseOver = 3 * time.Second // a dead gateway's leases taken over
)

const (
	clusterSubnet     = "10.247.0.0/22" // agent0's sandboxes
	clusterKills      = 5               // agent kill -9 rounds
	clusterTakeovers  = 3               // gateway kill -9 rounds
	clusterShards     = 4               // shards of the takeover stream
	clusterStream     = "cluster-takeover"
	clusterRecords    = 8000 // records put before each gateway kill
	clusterAsync      = 60   // async events sent before each gateway kill
	clusterHosts      = 1000 // simulated agents of the placement phase
	clusterDecisions  = 20000
	clusterClusterTTL = "1h"
	gatewayClusterP   = 7443 // + gateway index
	gatewayGossipP    = 7946 // + gateway index
	agentRPCPort      = 7071
	agentGossipPort   = 7946
)

// clusterResult is the cluster section's outcome.
type clusterResult struct {
	hopWarm, devWarm latencies
	hopTput, devTput throughput

	detect    []time.Duration // agent kill → gw0 sees it dead
	detectAll []time.Duration // agent kill → both gateways see it dead
	rejoin    []time.Duration // agent restart → alive with capacity in both views

	takeovers []gatewayTakeover

	placement []placementCase
}

// gatewayTakeover is one gateway kill -9 round.
type gatewayTakeover struct {
	victim    string
	resources int // resources (async queues, stream lanes) the victim held a slot of
	lanes     int // of them stream lanes
	dead      time.Duration
	held      time.Duration // kill → the survivor holds a slot of every one
	takeovers float64       // the survivor's skiff_lease_takeovers_total increase
}

// benchCluster runs the cluster section.
func benchCluster(ctx context.Context, cfg config, repo string, fn *function, progress func(string)) (_ *clusterResult, err error) {
	res := &clusterResult{}
	progress(fmt.Sprintf("cluster: placement decisions over %d simulated agents", clusterHosts))
	if res.placement, err = benchPlacement(); err != nil {
		return nil, err
	}

	natsBin := filepath.Join(repo, "bin", "tools", "nats-server")
	if _, err := os.Stat(natsBin); err != nil {
		return nil, fmt.Errorf("cluster: %s is missing (make tools installs it): %w", natsBin, err)
	}
	e := &clusterEnv{cfg: cfg, progress: progress}
	defer func() { err = errors.Join(err, e.close()) }()
	if err := e.start(ctx, repo, natsBin); err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	if err := e.benchHop(ctx, fn, res); err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	if err := e.benchDetection(ctx, res); err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	if err := e.benchTakeover(ctx, fn, res); err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	return res, nil
}

// proc is a process of the cluster.
type proc struct {
	name string
	cmd  *exec.Cmd
	out  *lockedBuffer
	exit chan struct{}
}

// kill ends the process with SIGKILL, as a crash would.
func (p *proc) kill() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL) // our own child, by PID
	<-p.exit
}

// stop ends the process with SIGTERM, SIGKILL after timeout.
func (p *proc) stop(timeout time.Duration) error {
	select {
	case <-p.exit:
		return nil
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exit:
		return nil
	case <-time.After(timeout):
		p.kill()
		return fmt.Errorf("%s did not stop within %s of SIGTERM", p.name, timeout)
	}
}

// waitOutput waits until the process printed something matching re.
func (p *proc) waitOutput(ctx context.Context, re *regexp.Regexp, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for !re.MatchString(p.out.String()) {
		select {
		case <-p.exit:
			return fmt.Errorf("%s exited at start: %v\n%s", p.name, p.cmd.ProcessState, tail(p.out.String()))
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not start within %s:\n%s", p.name, timeout, tail(p.out.String()))
		}
	}
	return nil
}

// gatewayNode is a `skiff gateway` process and its API clients.
type gatewayNode struct {
	*skiff
	name    string
	args    []string
	p       *proc
	cluster skiffv1connect.ClusterServiceClient
}

// agentNode is a `skiff agent` process.
type agentNode struct {
	name    string
	dataDir string
	args    []string
	p       *proc
}

// clusterEnv is the running cluster.
type clusterEnv struct {
	cfg      config
	progress func(string)
	dir      string
	bin      string
	thread   *netns.Thread
	host     *hostLink
	nats     *proc
	natsURL  string
	gws      []*gatewayNode
	agent    *agentNode
	token    string
}

var (
	gatewayListening = regexp.MustCompile(`listening on http://\S+`)
	agentListening   = regexp.MustCompile(`listening on https://\S+`)
	natsReady        = regexp.MustCompile(`Server is ready`)
)

// start builds skiff and starts nats-server, the host namespace, the CA,
// two gateways and the agent, and waits until both gateways see all three
// members alive and the agent's capacity.
func (e *clusterEnv) start(ctx context.Context, repo, natsBin string) (err error) {
	if e.dir, err = os.MkdirTemp("", "skiff-bench-cluster-"); err != nil {
		return err
	}
	// Sandboxes run as an unprivileged user and must traverse to their code.
	if err := os.Chmod(e.dir, 0o711); err != nil {
		return err
	}
	e.progress("cluster: building cmd/skiff")
	e.bin = filepath.Join(e.dir, "skiff")
	build := exec.CommandContext(ctx, "go", "build", "-o", e.bin, "./cmd/skiff")
	build.Dir = repo
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("building skiff: %w\n%s", err, out)
	}
	if e.thread, err = netns.NewThread(); err != nil {
		return err
	}
	e.progress("cluster: nats-server, a host namespace with a veth, the CA")
	natsAddr, err := freeLoopback()
	if err != nil {
		return err
	}
	// skiff needs a max_payload of 8 MB (gateway/store checks it).
	natsConf := filepath.Join(e.dir, "nats.conf")
	conf := fmt.Sprintf("server_name: \"skiff-bench\"\nlisten: %q\nmax_payload: %d\njetstream {\n  store_dir: %q\n}\n", natsAddr, 8<<20, filepath.Join(e.dir, "nats"))
	if err := os.WriteFile(natsConf, []byte(conf), 0o600); err != nil {
		return err
	}
	if e.nats, err = e.spawn("nats-server", nil, natsBin, "-c", natsConf); err != nil {
		return err
	}
	if err := e.nats.waitOutput(ctx, natsReady, time.Minute); err != nil {
		return err
	}
	e.natsURL = "nats://" + natsAddr
	if e.host, err = newHostLink(e.thread); err != nil {
		return err
	}
	caDir := filepath.Join(e.dir, "ca")
	if out, err := exec.CommandContext(ctx, e.bin, "ca", "init", "--dir", caDir).CombinedOutput(); err != nil {
		return fmt.Errorf("skiff ca init: %w\n%s", err, out)
	}
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	keyFile := filepath.Join(e.dir, "gossip.key")
	if err := os.WriteFile(keyFile, []byte(base64.StdEncoding.EncodeToString(key)+"\n"), 0o600); err != nil {
		return err
	}
	root := e.host.root.String()
	gossipAddr := func(i int) string { return net.JoinHostPort(root, fmt.Sprint(gatewayGossipP+i)) }
	for i := range 2 {
		api, err := freeLoopback()
		if err != nil {
			return err
		}
		g := &gatewayNode{name: fmt.Sprintf("gw%d", i)}
		g.args = []string{"gateway", "--data-dir", filepath.Join(e.dir, g.name), "--name", g.name,
			"--listen", api, "--ca-dir", caDir, "--cluster-listen", net.JoinHostPort(root, fmt.Sprint(gatewayClusterP+i)),
			"--gossip-bind", gossipAddr(i), "--gossip-join", gossipAddr(1 - i), "--gossip-key-file", keyFile,
			"--nats", e.natsURL, "--nats-replicas", "1", "--async-retry-delay", "1s", "--log-level", "warn"}
		e.gws = append(e.gws, g)
	}
	// One after the other: the first creates the streams and buckets.
	for _, g := range e.gws {
		e.progress("cluster: starting " + g.name)
		if err := e.startGateway(ctx, g); err != nil {
			return err
		}
	}
	out, err := e.cli(ctx, e.gws[0], "token", "create", "--ttl", clusterClusterTTL, "--description", "bench agent")
	if err != nil {
		return fmt.Errorf("skiff token create: %w\n%s", err, out)
	}
	e.token = strings.TrimSpace(out)
	addr := e.host.addr.String()
	e.agent = &agentNode{name: "agent0", dataDir: filepath.Join(e.dir, "agent0")}
	e.agent.args = []string{"agent", "--data-dir", e.agent.dataDir, "--name", e.agent.name,
		"--listen", net.JoinHostPort(addr, fmt.Sprint(agentRPCPort)), "--gossip-bind", net.JoinHostPort(addr, fmt.Sprint(agentGossipPort)),
		"--gossip-join", gossipAddr(0) + "," + gossipAddr(1), "--gossip-key-file", keyFile,
		"--join", e.token, "--gateway", "https://" + net.JoinHostPort(root, fmt.Sprint(gatewayClusterP)),
		"--sandbox-subnet", clusterSubnet, "--sandbox-memory", "4096", "--log-level", "warn"}
	e.progress("cluster: starting agent0 in its namespace")
	if err := e.startAgent(ctx); err != nil {
		return err
	}
	_, err = e.waitAgentReady(ctx, time.Minute)
	return err
}

// spawn starts name (args) on the namespace thread, inside ns (nil: the
// root namespace); the process gets SIGKILL if this one dies.
func (e *clusterEnv) spawn(name string, ns *netns.NS, bin string, args ...string) (*proc, error) {
	p := &proc{name: name, cmd: exec.Command(bin, args...), out: &lockedBuffer{}, exit: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := e.thread.Run(ns, p.cmd.Start); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	go func() { _ = p.cmd.Wait(); close(p.exit) }()
	return p, nil
}

// startGateway starts (or restarts) g and waits until it serves.
func (e *clusterEnv) startGateway(ctx context.Context, g *gatewayNode) (err error) {
	if g.p, err = e.spawn(g.name, nil, e.bin, g.args...); err != nil {
		return err
	}
	if err := g.p.waitOutput(ctx, gatewayListening, 90*time.Second); err != nil {
		return err
	}
	dataDir, api := g.args[2], g.args[6]
	key, err := os.ReadFile(filepath.Join(dataDir, "admin.key"))
	if err != nil {
		return fmt.Errorf("%s: reading the admin key: %w", g.name, err)
	}
	g.skiff = &skiff{addr: api, key: strings.TrimSpace(string(key)), dataDir: dataDir}
	g.dial(e.cfg.acceptGzip)
	g.cluster = skiffv1connect.NewClusterServiceClient(g.httpc, "http://"+api, connect.WithInterceptors(bearer(g.key)))
	return nil
}

// startAgent starts (or restarts) the agent in the host namespace and
// waits until it serves.
func (e *clusterEnv) startAgent(ctx context.Context) (err error) {
	a := e.agent
	if a.p, err = e.spawn(a.name, e.host.ns, e.bin, a.args...); err != nil {
		return err
	}
	return a.p.waitOutput(ctx, agentListening, 90*time.Second)
}

// cli runs the skiff CLI against g and returns its standard output.
func (e *clusterEnv) cli(ctx context.Context, g *gatewayNode, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, e.bin, append([]string{"--endpoint", "http://" + g.addr, "--api-key", g.key}, args...)...)
	cmd.Env = append(os.Environ(), "SKIFF_DATA_DIR="+filepath.Join(e.dir, "cli"))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out) + stderr.String(), err
	}
	return string(out), nil
}

// members is g's view of the cluster: state by member name.
func (g *gatewayNode) members(ctx context.Context) (map[string]string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	resp, err := g.cluster.ListMembers(ctx, connect.NewRequest(&skiffv1.ListMembersRequest{}))
	if err != nil {
		return nil, err
	}
	m := map[string]string{}
	for _, mm := range resp.Msg.GetMembers() {
		m[mm.GetName()] = mm.GetState()
	}
	return m, nil
}

// reported reports whether g has the agent's gossiped capacity.
func (g *gatewayNode) reported(ctx context.Context, agent string) bool {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	resp, err := g.cluster.ListHosts(ctx, connect.NewRequest(&skiffv1.ListHostsRequest{}))
	if err != nil {
		return false
	}
	for _, h := range resp.Msg.GetHosts() {
		if h.GetName() == agent && h.GetReported() {
			return true
		}
	}
	return false
}

// waitAgentReady waits until every gateway sees all three members alive
// and the agent's capacity, and returns how long that took.
func (e *clusterEnv) waitAgentReady(ctx context.Context, timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	err := waitCond(ctx, timeout, "both gateways seeing gw0, gw1 and agent0 alive and agent0's capacity", 5*time.Millisecond, func() bool {
		for _, g := range e.gws {
			m, err := g.members(ctx)
			if err != nil || len(m) != 3 {
				return false
			}
			for _, s := range m {
				if s != "alive" {
					return false
				}
			}
			if !g.reported(ctx, e.agent.name) {
				return false
			}
		}
		return true
	})
	return time.Since(start), err
}

// waitCond polls cond every interval until it holds, for up to timeout.
func waitCond(ctx context.Context, timeout time.Duration, what string, interval time.Duration, cond func() bool) error {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("waited %s for %s", timeout, what)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(interval):
		}
	}
	return nil
}

// close stops everything the cluster started and removes it: the agent
// first (it drains and removes its sandboxes), then the gateways,
// nats-server, the namespace and its link.
func (e *clusterEnv) close() error {
	var errList []error
	if e.agent != nil && e.agent.p != nil {
		errList = append(errList, e.agent.p.stop(time.Minute))
	}
	for _, g := range e.gws {
		if g.p != nil {
			errList = append(errList, g.p.stop(time.Minute))
		}
		if g.skiff != nil && g.httpc != nil {
			g.httpc.CloseIdleConnections()
		}
	}
	if e.nats != nil {
		errList = append(errList, e.nats.stop(30*time.Second))
	}
	if e.host != nil {
		errList = append(errList, e.host.close())
	}
	if e.thread != nil {
		e.thread.Close()
	}
	if e.agent != nil {
		errList = append(errList, removeRunDir(e.agent.dataDir))
	}
	if e.dir != "" {
		errList = append(errList, os.RemoveAll(e.dir))
	}
	return errors.Join(errList...)
}

// benchHop measures warm sync invokes of the echo function through gw0
// to agent0 and in the in-process skiff dev, in alternating rounds, then
// throughput at concurrency 8 both ways.
func (e *clusterEnv) benchHop(ctx context.Context, fn *function, res *clusterResult) (err error) {
	c := e.cfg
	e.progress("cluster: starting the in-process skiff dev for comparison")
	dev, err := startSkiff(ctx, c.acceptGzip, "")
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, dev.close()) }()
	gw := e.gws[0].skiff
	const name = "echo"
	for _, s := range []*skiff{dev, gw} {
		if err := s.createFunction(ctx, name, fn); err != nil {
			return err
		}
	}
	e.progress(fmt.Sprintf("cluster: warm invokes, through the gateway and skiff dev alternating (%d warm-up, %d measured, %d rounds)", c.warmup, c.warm, c.rounds))
	hop := func() (time.Duration, error) { return gw.echo(ctx, name) }
	local := func() (time.Duration, error) { return dev.echo(ctx, name) }
	if res.hopWarm, res.devWarm, err = alternate(hop, local, c.warmup, c.warm, c.rounds); err != nil {
		return err
	}
	e.progress("cluster: throughput through the gateway")
	t, err := gw.benchThroughput(ctx, name, []int{8}, c.duration, e.progress)
	if err != nil {
		return fmt.Errorf("through the gateway: %w", err)
	}
	res.hopTput = t[0]
	e.progress("cluster: throughput of skiff dev")
	if t, err = dev.benchThroughput(ctx, name, []int{8}, c.duration, e.progress); err != nil {
		return fmt.Errorf("skiff dev: %w", err)
	}
	res.devTput = t[0]
	return nil
}

// alternate measures n sequential calls of a and of b, after warmup
// unmeasured ones each, in alternating rounds so both see the same
// machine.
func alternate(a, b func() (time.Duration, error), warmup, n, rounds int) (la, lb latencies, err error) {
	for range warmup {
		if _, err := a(); err != nil {
			return la, lb, err
		}
		if _, err := b(); err != nil {
			return la, lb, err
		}
	}
	run := func(f func() (time.Duration, error), k int, into *[]time.Duration) error {
		for range k {
			v, err := f()
			if err != nil {
				return err
			}
			*into = append(*into, v)
		}
		return nil
	}
	da := make([]time.Duration, 0, n)
	db := make([]time.Duration, 0, n)
	rounds = max(1, min(rounds, n))
	for r := range rounds {
		k := n/rounds + btoi(r < n%rounds)
		if r%2 == 0 {
			err = errors.Join(run(a, k, &da), run(b, k, &db))
		} else {
			err = errors.Join(run(b, k, &db), run(a, k, &da))
		}
		if err != nil {
			return la, lb, err
		}
	}
	return summarize(da), summarize(db), nil
}

// benchDetection kills the agent with SIGKILL clusterKills times and
// times until each gateway's ListMembers shows it dead; each time it is
// restarted on the same data dir and timed until both gateways see it
// alive with its capacity again.
func (e *clusterEnv) benchDetection(ctx context.Context, res *clusterResult) error {
	e.progress(fmt.Sprintf("cluster: agent failure detection (%d × kill -9 and restart)", clusterKills))
	for i := range clusterKills {
		killed := time.Now()
		e.agent.p.kill()
		seen := make([]time.Duration, len(e.gws))
		err := waitCond(ctx, 30*time.Second, "both gateways seeing agent0 dead", time.Millisecond, func() bool {
			done := true
			for j, g := range e.gws {
				if seen[j] > 0 {
					continue
				}
				m, err := g.members(ctx)
				if err == nil && m[e.agent.name] == "dead" {
					seen[j] = time.Since(killed)
					continue
				}
				done = false
			}
			return done
		})
		if err != nil {
			return fmt.Errorf("kill %d: %w", i+1, err)
		}
		res.detect = append(res.detect, seen[0])
		res.detectAll = append(res.detectAll, slices.Max(seen))
		if err := e.startAgent(ctx); err != nil {
			return fmt.Errorf("restarting agent0: %w", err)
		}
		d, err := e.waitAgentReady(ctx, time.Minute)
		if err != nil {
			return fmt.Errorf("after restarting agent0: %w", err)
		}
		res.rejoin = append(res.rejoin, d)
	}
	return nil
}

// leaseSlot is a lease slot as the leasing service reads it.
type leaseSlot = lease.Lease

// heldBy reports whether gateway gw holds the slot now (holders are
// "<gateway>/<purpose>").
func heldBy(s leaseSlot, gw string, now time.Time) bool {
	return strings.HasPrefix(s.Holder, gw+"/") && !s.Free(now)
}

// leaseSlots reads every lease slot from the cluster's storage.
func leaseSlots(ctx context.Context, ls *lease.Service) ([]leaseSlot, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	return ls.List(ctx)
}

// heldResources are the resources gw holds a slot of now.
func heldResources(slots []leaseSlot, gw string) map[string]bool {
	now := time.Now()
	out := map[string]bool{}
	for _, s := range slots {
		if heldBy(s, gw, now) {
			out[s.Resource] = true
		}
	}
	return out
}

// benchTakeover has the gateways poll an async queue and a 4-shard stream
// mapping (a function that sleeps 100 ms a batch, so lanes are mid-stream
// when it dies), then clusterTakeovers times: with every slot held, sends
// async events of a sleeping invoke and a backlog of records, waits until
// the gateway holding the most leases (async ones first) is processing
// them, kills it with SIGKILL and times until the survivor sees it dead
// and holds a slot of every resource it held (read from the leases
// bucket every 5 ms); then restarts it.
func (e *clusterEnv) benchTakeover(ctx context.Context, fn *function, res *clusterResult) error {
	e.progress(fmt.Sprintf("cluster: lease takeover (%d × kill -9 of the gateway holding the leases)", clusterTakeovers))
	nc, err := nats.Connect(e.natsURL, nats.Name("skiff-bench"))
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	gw := e.gws[0]
	if err := gw.createFunctionEnv(ctx, streamFunction, fn, map[string]string{"KINESIS_NOOP": "1", "KINESIS_SLEEP": "100ms"}); err != nil {
		return err
	}
	if _, err := gw.streams.CreateStream(ctx, connect.NewRequest(&skiffv1.CreateStreamRequest{Name: clusterStream, ShardCount: clusterShards})); err != nil {
		return fmt.Errorf("creating stream %s: %w", clusterStream, err)
	}
	if _, err := gw.createStreamMapping(ctx, clusterStream, "LATEST"); err != nil {
		return err
	}
	kv, err := lease.New(ctx, js, lease.Config{})
	if err != nil {
		return err
	}
	sleep := []byte(`{"action":"sleep","sleep":"200ms"}`)
	for round := range clusterTakeovers {
		// Every slot held and at least every lane; the gateways see each
		// other alive.
		var slots []leaseSlot
		if err := waitCond(ctx, time.Minute, "every stream lane and async queue slot held", 20*time.Millisecond, func() bool {
			if slots, err = leaseSlots(ctx, kv); err != nil {
				return false
			}
			now := time.Now()
			lanes, held := 0, 0
			for _, s := range slots {
				if strings.HasPrefix(s.Resource, "stream:") {
					lanes++
				}
				if heldBy(s, "gw0", now) || heldBy(s, "gw1", now) {
					held++
				}
			}
			return lanes >= clusterShards && held == len(slots)
		}); err != nil {
			return fmt.Errorf("round %d: %w", round+1, err)
		}
		if _, err := e.waitAgentReady(ctx, time.Minute); err != nil {
			return fmt.Errorf("round %d: %w", round+1, err)
		}
		// The victim: the gateway holding async slots, then the most.
		count := func(gw, kind string) int {
			n := 0
			for r := range heldResources(slots, gw) {
				if strings.HasPrefix(r, kind) {
					n++
				}
			}
			return n
		}
		vi := 0
		if a0, a1 := count("gw0", "async"), count("gw1", "async"); a1 > a0 || (a1 == a0 && count("gw1", "") > count("gw0", "")) {
			vi = 1
		}
		victim, survivor := e.gws[vi], e.gws[1-vi]
		// Work for both kinds of pollers, accepted through the survivor.
		if err := survivor.writeBacklog(ctx, clusterStream, clusterRecords); err != nil {
			return err
		}
		for i := range clusterAsync {
			if err := survivor.accept(ctx, "echo", sleep, fmt.Sprintf("cluster-%d-%04d", round, i)); err != nil {
				return err
			}
		}
		busy := "stream batches"
		want := "skiff_streams_batches_total"
		if count(victim.name, "async") > 0 {
			busy, want = "async events", "skiff_async_attempts_total"
		}
		wbase, err := victim.metric(ctx, want, "")
		if err != nil {
			return err
		}
		if err := waitCond(ctx, 30*time.Second, victim.name+" processing "+busy, 10*time.Millisecond, func() bool {
			v, err := victim.metric(ctx, want, "")
			return err == nil && v >= wbase+2
		}); err != nil {
			return fmt.Errorf("round %d: %w", round+1, err)
		}
		if slots, err = leaseSlots(ctx, kv); err != nil {
			return err
		}
		theirs := heldResources(slots, victim.name)
		if len(theirs) == 0 {
			return fmt.Errorf("round %d: %s holds no lease", round+1, victim.name)
		}
		before, err := survivor.metric(ctx, "skiff_lease_takeovers_total", "")
		if err != nil {
			return err
		}
		t := gatewayTakeover{victim: victim.name, resources: len(theirs)}
		for r := range theirs {
			if strings.HasPrefix(r, "stream:") {
				t.lanes++
			}
		}
		e.progress(fmt.Sprintf("cluster: kill -9 %s holding a slot of %d resources (%d stream lanes)", victim.name, t.resources, t.lanes))
		killed := time.Now()
		victim.p.kill()
		victim.httpc.CloseIdleConnections()
		if err := waitCond(ctx, 30*time.Second, survivor.name+" seeing "+victim.name+" dead and holding its leases", 5*time.Millisecond, func() bool {
			if t.dead == 0 {
				if m, err := survivor.members(ctx); err == nil && m[victim.name] == "dead" {
					t.dead = time.Since(killed)
				}
			}
			if t.held == 0 {
				cur, err := leaseSlots(ctx, kv)
				if err == nil {
					mine := heldResources(cur, survivor.name)
					all := true
					for r := range theirs {
						all = all && mine[r]
					}
					if all {
						t.held = time.Since(killed)
					}
				}
			}
			return t.dead > 0 && t.held > 0
		}); err != nil {
			return fmt.Errorf("round %d: %w", round+1, err)
		}
		after, err := survivor.metric(ctx, "skiff_lease_takeovers_total", "")
		if err != nil {
			return err
		}
		t.takeovers = after - before
		res.takeovers = append(res.takeovers, t)
		e.progress("cluster: restarting " + victim.name)
		if err := e.startGateway(ctx, victim); err != nil {
			return fmt.Errorf("restarting %s: %w", victim.name, err)
		}
	}
	return nil
}

// hostLink is a network namespace standing for another host, joined to
// the root namespace by a veth: root end 10.97.n.1/30, the namespace's end
// (eth0) 10.97.n.2/30, n chosen so that no route of the root namespace
// overlaps. The namespace is held only by a descriptor; close deletes the
// link (both ends) and releases it.
type hostLink struct {
	thread     *netns.Thread
	ns         *netns.NS
	link       string // the root end
	root, addr netip.Addr
}

func newHostLink(thread *netns.Thread) (_ *hostLink, err error) {
	pool, err := netns.NewPool(netns.PoolConfig{Size: 1})
	if err != nil {
		return nil, err
	}
	defer pool.Close()
	ns, err := pool.Get()
	if err != nil {
		return nil, err
	}
	var suffix [3]byte
	_, _ = rand.Read(suffix[:])
	h := &hostLink{thread: thread, ns: ns, link: "skb" + hex.EncodeToString(suffix[:])}
	defer func() {
		if err != nil {
			err = errors.Join(err, h.close())
		}
	}()
	if err := thread.Run(nil, func() error {
		routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		start := mrand.IntN(256)
		for k := range 256 {
			p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 97, byte((start + k) % 256), 0}), 30)
			if !overlaps(routes, p) {
				h.root = p.Addr().Next()
				h.addr = h.root.Next()
				return nil
			}
		}
		return errors.New("no free 10.97.n.0/30 for the host namespace's link")
	}); err != nil {
		return nil, err
	}
	if err := thread.Run(nil, func() error {
		la := netlink.NewLinkAttrs()
		la.Name = h.link
		veth := &netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerNamespace: netlink.NsFd(ns.Fd())}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("adding link %s: %w", h.link, err)
		}
		if err := netlink.AddrAdd(veth, &netlink.Addr{IPNet: ipNet(h.root, 30)}); err != nil {
			return fmt.Errorf("addressing %s: %w", h.link, err)
		}
		return netlink.LinkSetUp(veth)
	}); err != nil {
		return nil, err
	}
	if err := thread.Run(ns, func() error {
		eth, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(eth, &netlink.Addr{IPNet: ipNet(h.addr, 30)}); err != nil {
			return fmt.Errorf("addressing eth0: %w", err)
		}
		return netlink.LinkSetUp(eth)
	}); err != nil {
		return nil, err
	}
	// Both ends operationally up before the first packet.
	up := func(ns *netns.NS, name string) bool {
		ok := false
		_ = thread.Run(ns, func() error {
			l, err := netlink.LinkByName(name)
			ok = err == nil && l.Attrs().OperState == netlink.OperUp
			return nil
		})
		return ok
	}
	if err := waitCond(context.Background(), 10*time.Second, "the host link up", 5*time.Millisecond, func() bool {
		return up(nil, h.link) && up(ns, "eth0")
	}); err != nil {
		return nil, err
	}
	return h, nil
}

func overlaps(routes []netlink.Route, p netip.Prefix) bool {
	for _, r := range routes {
		if r.Dst == nil {
			continue // the default route
		}
		ra, ok := netip.AddrFromSlice(r.Dst.IP)
		ones, _ := r.Dst.Mask.Size()
		if ok && ones > 0 && netip.PrefixFrom(ra.Unmap(), ones).Overlaps(p) {
			return true
		}
	}
	return false
}

func ipNet(a netip.Addr, bits int) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, 32)}
}

// close deletes the link (its peer goes with it) and releases the
// namespace.
func (h *hostLink) close() error {
	err := h.thread.Run(nil, func() error {
		l, err := netlink.LinkByName(h.link)
		if errors.As(err, new(netlink.LinkNotFoundError)) {
			return nil
		}
		if err != nil {
			return err
		}
		return netlink.LinkDel(l)
	})
	return errors.Join(err, h.ns.Close())
}

// Placement: gateway/placement's Choose over 1,000 hosts built as
// gateway/router's Cluster builds them from gossip (name, zone, free
// memory and load of the gossiped capacity, the decoded summary as
// Contents).

// placementCase is one kind of decision's outcome.
type placementCase struct {
	name     string
	perOp    time.Duration // testing.Benchmark's mean
	allocs   int64         // per decision
	bytes    int64         // per decision
	lat      latencies     // clusterDecisions decisions timed one by one
	warmRate float64       // fraction of warm decisions
}

// placementWorld is a simulated fleet: functions with Zipf popularity,
// each host caching the code of some and holding idle sandboxes of a few.
type placementWorld struct {
	rng       *mrand.Rand
	zipf      *mrand.Zipf
	functions []string // version keys
	digests   []string
	sizes     []int64
}

func newPlacementWorld(functions int) *placementWorld {
	rng := mrand.New(mrand.NewPCG(5, 5))
	w := &placementWorld{rng: rng, zipf: mrand.NewZipf(rng, 1.1, 1, uint64(functions-1))}
	sizes := []int64{128, 256, 512, 1024}
	for i := range functions {
		w.functions = append(w.functions, fmt.Sprintf("fn-%04d:1", i))
		w.digests = append(w.digests, fmt.Sprintf("%064x", i*7919+1))
		w.sizes = append(w.sizes, sizes[rng.IntN(len(sizes))])
	}
	return w
}

func (w *placementWorld) pick() int { return int(w.zipf.Uint64()) }

// capacity is one agent's: 64 GB, some of it used, code of 40 functions
// cached, idle sandboxes of up to 12.
func (w *placementWorld) capacity() gossip.Capacity {
	c := gossip.Capacity{MemoryTotalMB: 65536, CPUTotalMilli: 32000, WarmIdle: map[string]int{}}
	used := int64(w.rng.IntN(48000))
	c.MemoryFreeMB = c.MemoryTotalMB - used
	c.CPUFreeMilli = int64(w.rng.IntN(32000))
	c.Load = w.rng.Float64()
	for range 40 {
		c.CodeDigests = append(c.CodeDigests, w.digests[w.pick()])
	}
	for range w.rng.IntN(13) {
		f := w.pick()
		c.WarmIdle[w.functions[f]] += 1 + w.rng.IntN(3)
		c.Idle++
	}
	c.Sandboxes = c.Idle + w.rng.IntN(20)
	return c
}

// benchPlacement measures Choose over clusterHosts hosts for warm, cold
// and cold-spread requests: testing.Benchmark's mean and allocations, and
// clusterDecisions decisions timed one by one.
func benchPlacement() ([]placementCase, error) {
	w := newPlacementWorld(500)
	zones := []string{"zone-a", "zone-b", "zone-c"}
	hosts := make([]placement.Host, clusterHosts)
	for i := range hosts {
		s, err := gossip.Summarize(w.capacity(), 0, 0)
		if err != nil {
			return nil, err
		}
		hosts[i] = placement.Host{Name: fmt.Sprintf("agent-%04d", i), Zone: zones[i%len(zones)], FreeMemoryMB: s.MemoryFreeMB, Load: s.Load, Contents: s}
	}
	requests := func(cold bool, spreadOver int) []placement.Request {
		reqs := make([]placement.Request, 1024)
		for i := range reqs {
			f := w.pick()
			spread := map[string]int{}
			for range spreadOver + w.rng.IntN(8) {
				spread[hosts[w.rng.IntN(len(hosts))].Name]++
			}
			fn := w.functions[f]
			if cold {
				fn = "not-warm-anywhere:1" // the digest stays: the code filter is consulted
			}
			reqs[i] = placement.Request{Function: fn, Digest: w.digests[f], MemoryMB: w.sizes[f], Sandboxes: spread}
		}
		return reqs
	}
	var out []placementCase
	for _, bc := range []struct {
		name string
		reqs []placement.Request
	}{{"warm", requests(false, 0)}, {"cold", requests(true, 0)}, {"cold-spread", requests(true, 300)}} {
		rng := mrand.New(mrand.NewPCG(3, 3))
		var failed error
		r := testing.Benchmark(func(b *testing.B) {
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				if _, err := placement.Choose(bc.reqs[i%len(bc.reqs)], hosts, rng); err != nil && failed == nil {
					failed = err
				}
			}
		})
		if failed != nil {
			return nil, fmt.Errorf("placement %s: %w", bc.name, failed)
		}
		c := placementCase{name: bc.name, perOp: time.Duration(r.NsPerOp()), allocs: r.AllocsPerOp(), bytes: r.AllocedBytesPerOp()}
		lat := make([]time.Duration, clusterDecisions)
		warm := 0
		for i := range lat {
			start := time.Now()
			d, err := placement.Choose(bc.reqs[i%len(bc.reqs)], hosts, rng)
			lat[i] = time.Since(start)
			if err != nil {
				return nil, fmt.Errorf("placement %s: %w", bc.name, err)
			}
			warm += btoi(d.Warm)
		}
		c.lat, c.warmRate = summarize(lat), float64(warm)/float64(len(lat))
		out = append(out, c)
	}
	return out, nil
}

// Report.

func durations(d []time.Duration) latencies { return summarize(d) }

func maxOf(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	return slices.Max(d)
}

func msList(d []time.Duration) string {
	parts := make([]string, len(d))
	for i, v := range d {
		parts[i] = ms(v)
	}
	return strings.Join(parts, ", ")
}

func ratioOf(a, b time.Duration) float64 {
	if b == 0 {
		return 0
	}
	return float64(a) / float64(b)
}

func (r *clusterResult) takeoverTimes() (dead, held []time.Duration) {
	for _, t := range r.takeovers {
		dead, held = append(dead, t.dead), append(held, t.held)
	}
	return dead, held
}

// writeTable writes the cluster section's tables.
func (r *clusterResult) writeTable(p func(string, ...any), c config) {
	p("")
	p("| Cluster: sync invoke | `skiff gateway` → `skiff agent` in another network namespace | `skiff dev` in-process | gateway / dev |")
	p("|---|---|---|---|")
	p("| Warm invoke p50 / p99 (sequential, n=%d each) | %s / %s | %s / %s | %.2f / %.2f |", r.hopWarm.n, ms(r.hopWarm.p50), ms(r.hopWarm.p99), ms(r.devWarm.p50), ms(r.devWarm.p99),
		ratioOf(r.hopWarm.p50, r.devWarm.p50), ratioOf(r.hopWarm.p99, r.devWarm.p99))
	p("| Warm invoke mean | %s | %s | %.2f |", ms(r.hopWarm.mean), ms(r.devWarm.mean), ratioOf(r.hopWarm.mean, r.devWarm.mean))
	tr := 0.0
	if r.devTput.perSecond > 0 {
		tr = r.hopTput.perSecond / r.devTput.perSecond
	}
	p("| Throughput, concurrency 8 (%s) | %.0f invokes/s (p50 %s, p99 %s) | %.0f invokes/s (p50 %s, p99 %s) | %.2f |", c.duration,
		r.hopTput.perSecond, ms(r.hopTput.p50), ms(r.hopTput.p99), r.devTput.perSecond, ms(r.devTput.p50), ms(r.devTput.p99), tr)
	p("")
	p("| Cluster: failures | p50 | max | samples |")
	p("|---|---|---|---|")
	row := func(label string, d []time.Duration) {
		p("| %s | %s | %s | %s |", label, ms(durations(d).p50), ms(maxOf(d)), msList(d))
	}
	row("Agent kill -9 → dead in gw0's `ListMembers`", r.detect)
	row("Agent kill -9 → dead in both gateways' views", r.detectAll)
	row("Agent restarted → alive with its capacity in both gateways' views", r.rejoin)
	dead, held := r.takeoverTimes()
	row("Gateway kill -9 → dead in the survivor's view", dead)
	row("Gateway kill -9 → the survivor holds a lease slot of every resource the killed one held", held)
	var what []string
	for _, t := range r.takeovers {
		what = append(what, fmt.Sprintf("%s: %d resources (%d stream lanes), %.0f takeovers", t.victim, t.resources, t.lanes, t.takeovers))
	}
	p("| Gateways killed (leases held; the survivor's `skiff_lease_takeovers_total` increase) | | | %s |", strings.Join(what, "; "))
	p("")
	p("| Placement decision over %d simulated agents | warm | cold | cold, function on 300 hosts |", clusterHosts)
	p("|---|---|---|---|")
	cells := func(f func(pc placementCase) string) string {
		var parts []string
		for _, pc := range r.placement {
			parts = append(parts, f(pc))
		}
		return strings.Join(parts, " | ")
	}
	p("| `placement.Choose`, mean (`testing.Benchmark`) | %s |", cells(func(pc placementCase) string { return fmt.Sprintf("%.1f µs", float64(pc.perOp)/1e3) }))
	p("| Allocations per decision | %s |", cells(func(pc placementCase) string { return fmt.Sprintf("%d (%d B)", pc.allocs, pc.bytes) }))
	p("| p50 / p99 of %d decisions timed one by one | %s |", clusterDecisions, cells(func(pc placementCase) string {
		return fmt.Sprintf("%.1f µs / %.1f µs", float64(pc.lat.p50)/1e3, float64(pc.lat.p99)/1e3)
	}))
	p("| Decisions that found a warm sandbox | %s |", cells(func(pc placementCase) string { return fmt.Sprintf("%.0f%%", 100*pc.warmRate) }))
}

// writeTargets writes the cluster section's rows of the targets table.
func (r *clusterResult) writeTargets(p func(string, ...any)) {
	md := maxOf(r.detect)
	p("| Agent failure detected (kill -9 → dead in the gateway's view), max of %d | %s | ≤ %.0f s | %s |", len(r.detect), ms(md), targetDetection.Seconds(), verdict(md > 0 && md <= targetDetection))
	_, held := r.takeoverTimes()
	mh := maxOf(held)
	p("| Gateway lease takeover (kill -9 → the survivor holds every lease), max of %d | %s | ≤ %.0f s | %s |", len(held), ms(mh), targetLeaseOver.Seconds(), verdict(mh > 0 && mh <= targetLeaseOver))
}

// writeMethod writes how the cluster section measures.
func (r *clusterResult) writeMethod(p func(string, ...any), c config) {
	p("- Cluster: `cmd/skiff` built and run as real processes on this machine: a `nats-server` (bin/tools, JetStream, on 127.0.0.1), two `skiff gateway`s (gw0, gw1) sharing it (`--nats nats://127.0.0.1:PORT --nats-replicas 1`), their API on 127.0.0.1 and their cluster listener and gossip on the root end of a veth, and one `skiff agent` (agent0, joined with a token from `skiff token create`, certificate from the `skiff ca init` CA, gossip encrypted, default LAN gossip timers) in a network namespace of its own at the veth's other end, as another host would be.")
	p("  - Sync invoke: the echo function created through gw0 and in an in-process `skiff dev`; %d sequential warm invokes of each after %d unmeasured, in %d alternating rounds (request to response through the Connect client, HTTP/1.1 keep-alive, to gw0, which places on agent0 and calls it over HTTP/2 with mutual TLS). Throughput: 8 concurrent sleeping invokes first (8 warm sandboxes), then 8 workers invoking back to back for %s, through gw0 and then `skiff dev`.", c.warm, c.warmup, c.rounds, c.duration)
	p("  - Failure detection: the agent gets SIGKILL %d times; both gateways' `ClusterService.ListMembers` are read every millisecond until it is `dead` in each; it is restarted on the same data dir each time and timed until both gateways list it alive with its capacity.", clusterKills)
	p("  - Lease takeover: a %d-shard stream with a mapping (LATEST) of a function sleeping 100 ms a batch, and async EVENT invokes of the echo function (sleeping 200 ms) on the shared queue. %d times: with every lease slot held, %d records are put and %d events accepted through the other gateway; once the victim (the gateway holding async slots, else the most slots) has processed 2 more async attempts or batches, it gets SIGKILL; the `leases` KV bucket is read every 5 ms until the survivor holds a live slot of every resource the victim held, and the survivor's `ListMembers` until the victim is `dead`. The victim is then restarted on the same data dir.", clusterShards, clusterTakeovers, clusterRecords, clusterAsync)
	p("  - Placement: `gateway/placement.Choose` in this process over %d hosts built as `gateway/router`'s Cluster builds them from gossip (zone, free memory and load of the gossiped capacity; the decoded `gossip.Summarize` summary as Contents: warm top-N and the code Bloom filter); 500 functions of Zipf popularity, each host caching the code of 40 and idle sandboxes of up to 12, 3 zones. Warm: a function likely warm somewhere; cold: warm nowhere, its code cached on some; cold-spread: the function already has sandboxes on 300 hosts. `testing.Benchmark` for the mean and allocations, then %d decisions timed one by one.", clusterHosts, clusterDecisions)
}
