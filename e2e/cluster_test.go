package e2e

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/encoding/protojson"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/gateway/lease"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/pki"
)

// TestCluster runs the multi-host tests of issue 5 on one cluster
// (cluster_env_test.go: 3 agents and 2 gateways in their own network
// namespaces, a 3-node NATS cluster), subtest after subtest: each leaves
// the cluster working for the next.
func TestCluster(t *testing.T) {
	e := newClusterEnv(t)
	steps := []struct {
		name string
		fn   func(t *testing.T, e *clusterEnv)
	}{
		{"Placement", testClusterPlacement},
		{"ConcurrencyAcrossGateways", testClusterConcurrency},
		{"MTLS", testClusterMTLS},
		{"AgentKill", testClusterAgentKill},
		{"Partition", testClusterPartition},
		{"GatewayKill", testClusterGatewayKill},
	}
	for _, s := range steps {
		if !t.Run(s.name, func(t *testing.T) { s.fn(t, e) }) {
			break // later steps assume the cluster this one left
		}
	}
	// The expired token needs only a live gateway (and the minute the
	// steps take).
	t.Run("ExpiredToken", func(t *testing.T) { testClusterExpiredToken(t, e) })
}

// sandboxesByHost counts sandboxes per host.
func sandboxesByHost(l *skiffv1.ListSandboxesResponse) map[string]int {
	m := map[string]int{}
	for _, p := range l.GetSandboxes() {
		m[p.GetHost()]++
	}
	return m
}

// invocationsOf sums the invocations of the listed sandboxes, per sandbox
// id.
func invocationsOf(l *skiffv1.ListSandboxesResponse) map[string]int64 {
	m := map[string]int64{}
	for _, p := range l.GetSandboxes() {
		m[p.GetSandbox().GetId()] = p.GetSandbox().GetInvocations()
	}
	return m
}

// waitGossipSettled waits until every live gateway's gossiped view of the
// agents matches what the agents report: the same sandboxes, none busy.
// Warm placement works from that view.
func (e *clusterEnv) waitGossipSettled(t *testing.T) {
	t.Helper()
	waitFor(t, 20*time.Second, "the gateways' gossiped capacity matching the agents' sandboxes", func() bool {
		for _, g := range e.live() {
			list := g.sandboxes(t, "")
			if len(list.GetUnreachableHosts()) > 0 {
				return false
			}
			want := sandboxesByHost(list)
			hs, err := g.cluster.ListHosts(context.Background(), connect.NewRequest(&skiffv1.ListHostsRequest{}))
			if err != nil {
				return false
			}
			for _, h := range hs.Msg.GetHosts() {
				if h.GetState() != "alive" {
					continue
				}
				if int(h.GetSandboxes()) != want[h.GetName()] || h.GetBusy() != 0 || int(h.GetIdle()) != want[h.GetName()] {
					return false
				}
			}
		}
		return true
	})
}

// testClusterPlacement: 30 concurrent invokes (through both gateways) of a
// function that sleeps spread across the 3 agents; a warm invoke goes to
// the agent that holds the warm idle sandbox, through either gateway.
func testClusterPlacement(t *testing.T, e *clusterEnv) {
	c0 := e.gws[0].client("connect", "")
	createFunction(t, c0, "spread", &skiffv1.FunctionConfig{TimeoutSeconds: 30})
	e.settled(t, "spread")
	const n = 30
	var wg sync.WaitGroup
	errc := make(chan error, n)
	start := time.Now()
	for i := range n {
		c := e.gws[i%2].client("connect", "")
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := invoke(context.Background(), c, "spread", `{"action":"sleep","sleep":"1500ms"}`)
			if err == nil && (r.FunctionError != "" || string(r.Payload) != `{"slept":"1500ms"}`) {
				err = fmt.Errorf("function error %q payload %s", r.FunctionError, r.Payload)
			}
			errc <- err
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		if err != nil {
			t.Fatalf("concurrent invoke: %v", err)
		}
	}
	took := time.Since(start)
	list := e.gws[1].sandboxes(t, "spread")
	per := sandboxesByHost(list)
	total := 0
	for _, a := range e.agents {
		total += per[a.name]
		if per[a.name] == 0 {
			t.Errorf("agent %s got no sandbox of the 30 concurrent invokes: %v", a.name, per)
		}
	}
	t.Logf("%d concurrent invokes in %v: sandboxes per agent %v", n, took.Round(time.Millisecond), per)
	if total < n/2 {
		t.Errorf("%d sandboxes for %d concurrent 1.5 s invokes, want most of them cold and concurrent", total, n)
	}
	// The CLI shows the same placement.
	out, err := e.cliOn(e.gws[1], "sandboxes", "--function", "spread")
	if err != nil {
		t.Fatalf("skiff sandboxes: %v\n%s", err, out)
	}
	for _, a := range e.agents {
		if got := strings.Count(out, a.name+" "); got != per[a.name] {
			t.Errorf("skiff sandboxes lists %d sandboxes on %s, ListSandboxes %d:\n%s", got, a.name, per[a.name], out)
		}
	}

	// Warm: with the gossiped view up to date, more invokes reuse the
	// idle sandboxes (no new sandbox), through either gateway.
	e.waitGossipSettled(t)
	before := invocationsOf(list)
	warmBefore := e.gws[0].metricSum(t, `skiff_router_placements_total{rule="warm"}`) + e.gws[1].metricSum(t, `skiff_router_placements_total{rule="warm"}`)
	for i := range 4 {
		mustInvoke(t, e.gws[i%2].client("connect", ""), "spread", `{"n":1}`)
	}
	after := invocationsOf(e.gws[0].sandboxes(t, "spread"))
	if len(after) != len(before) {
		t.Errorf("%d sandboxes after 4 warm invokes, %d before: the warm invokes started new ones", len(after), len(before))
	}
	var more int64
	for id, n := range after {
		if _, ok := before[id]; !ok {
			t.Errorf("new sandbox %s after the warm invokes", id)
		}
		more += n - before[id]
	}
	if more != 4 {
		t.Errorf("the idle sandboxes ran %d more invocations, want the 4 warm invokes", more)
	}
	warmAfter := e.gws[0].metricSum(t, `skiff_router_placements_total{rule="warm"}`) + e.gws[1].metricSum(t, `skiff_router_placements_total{rule="warm"}`)
	if warmAfter-warmBefore != 4 {
		t.Errorf("%v warm placements for the 4 warm invokes, want 4", warmAfter-warmBefore)
	}

	// One sandbox of its own: a function's second invoke, through the
	// other gateway, goes to the agent holding its one warm sandbox
	// (placement would otherwise spread it to another host).
	createFunction(t, c0, "single", nil)
	e.settled(t, "single")
	mustInvoke(t, c0, "single", `{"first":true}`)
	first := e.gws[0].sandboxes(t, "single").GetSandboxes()
	if len(first) != 1 {
		t.Fatalf("%d sandboxes after one invoke, want 1", len(first))
	}
	e.waitGossipSettled(t)
	for i := range 3 {
		mustInvoke(t, e.gws[1-i%2].client("connect", ""), "single", `{"again":true}`)
	}
	again := e.gws[1].sandboxes(t, "single").GetSandboxes()
	if len(again) != 1 || again[0].GetHost() != first[0].GetHost() || again[0].GetSandbox().GetId() != first[0].GetSandbox().GetId() || again[0].GetSandbox().GetInvocations() != 4 {
		t.Fatalf("after 3 warm invokes: %v, want the one sandbox %s on %s with 4 invocations", again, first[0].GetSandbox().GetId(), first[0].GetHost())
	}
	t.Logf("warm invokes reused the idle sandboxes (function single: sandbox %s on %s, 4 invocations)", first[0].GetSandbox().GetId(), first[0].GetHost())
}

// testClusterConcurrency: a function with reserved concurrency 2, invoked
// by 8 clients at once through both gateways, never runs more than 2
// invocations at once; the others are throttled (ResourceExhausted,
// reason "throttled"). What runs is measured where the function runs: it
// connects to a TCP server of the test (on host2) and waits for its
// reply, and the server counts the connections it holds, from the
// function's request until the reply, so its count never exceeds the
// invocations running.
func testClusterConcurrency(t *testing.T, e *clusterEnv) {
	const port = 9000
	h := e.hn.hosts[2]
	ln, err := h.listen(port)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var cur, peak, served atomic.Int64
	var srvWG sync.WaitGroup
	srvWG.Add(1)
	go func() {
		defer srvWG.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			srvWG.Add(1)
			go func() {
				defer srvWG.Done()
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				if _, err := io.Copy(io.Discard, c); err != nil {
					return
				}
				n := cur.Add(1)
				for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
				}
				// The function's work: it waits for the reply meanwhile.
				time.Sleep(250 * time.Millisecond)
				cur.Add(-1)
				served.Add(1)
				_, _ = c.Write([]byte("ok"))
			}()
		}
	}()
	defer srvWG.Wait()
	defer ln.Close()

	addr := hostPort(h, port)
	c0 := e.gws[0].client("connect", "")
	createFunction(t, c0, "limited", &skiffv1.FunctionConfig{TimeoutSeconds: 10, NetworkAllow: []string{h.addr.String() + "/32:" + fmt.Sprint(port)}})
	if _, err := c0.fn.PutFunctionConcurrency(context.Background(), connect.NewRequest(&skiffv1.PutFunctionConcurrencyRequest{Name: "limited", ReservedConcurrentExecutions: 2})); err != nil {
		t.Fatal(err)
	}
	e.settled(t, "limited")
	payload := fmt.Sprintf(`{"action":"tcp","addr":%q,"size":1}`, addr)
	// The function reaches the server (and its sandboxes exist) before
	// the load.
	r := mustInvoke(t, c0, "limited", payload)
	if string(r.Payload) != `{"error":"","reply":"ok"}` {
		t.Fatalf("the function could not reach the test's server: %s", r.Payload)
	}

	const workers = 8
	type tally struct{ ok, throttled int }
	var (
		mu     sync.Mutex
		per    = map[string]*tally{}
		others []string
	)
	for _, g := range e.gws {
		per[g.name] = &tally{}
	}
	// Also sample the gateways' admitted counts: their sum stays ≤ 2.
	samplerDone := make(chan struct{})
	var maxAdmitted float64
	stop := time.Now().Add(5 * time.Second)
	go func() {
		defer close(samplerDone)
		for time.Now().Before(stop) {
			var sum float64
			for _, g := range e.gws {
				sum += g.metricSum(t, `skiff_function_concurrent_executions{function="limited"}`)
			}
			maxAdmitted = max(maxAdmitted, sum)
			time.Sleep(20 * time.Millisecond)
		}
	}()
	var wg sync.WaitGroup
	for i := range workers {
		g := e.gws[i%2]
		c := g.client("connect", "")
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stop) {
				r, err := invoke(context.Background(), c, "limited", payload)
				mu.Lock()
				var ce *connect.Error
				switch {
				case err == nil && string(r.Payload) == `{"error":"","reply":"ok"}`:
					per[g.name].ok++
				case err == nil:
					others = append(others, fmt.Sprintf("%s: function error %q payload %s", g.name, r.FunctionError, r.Payload))
				case errors.As(err, &ce) && ce.Code() == connect.CodeResourceExhausted && ce.Meta().Get(errs.HeaderReason) == "throttled":
					per[g.name].throttled++
				default:
					others = append(others, fmt.Sprintf("%s: %v", g.name, err))
				}
				mu.Unlock()
				if err != nil {
					time.Sleep(25 * time.Millisecond) // a client's pause after a throttle
				}
			}
		}()
	}
	wg.Wait()
	<-samplerDone
	if len(others) > 0 {
		t.Errorf("%d invokes failed other than throttled, first: %s", len(others), others[0])
	}
	ok, throttled := 0, 0
	for _, n := range per {
		ok += n.ok
		throttled += n.throttled
	}
	t.Logf("reserved concurrency 2, %d clients through 2 gateways for 5 s: at most %d running at once (the function's server), %v admitted at once (gateways' gauges, sampled); %d succeeded, %d throttled; gw0 %+v, gw1 %+v",
		workers, peak.Load(), maxAdmitted, ok, throttled, *per["gw0"], *per["gw1"])
	if p := peak.Load(); p > 2 {
		t.Errorf("%d invocations ran at once, over the reserved concurrency of 2", p)
	} else if p < 2 {
		t.Errorf("at most %d invocation ran at once with 8 clients, want the reserved 2 used", p)
	}
	if maxAdmitted > 2 {
		t.Errorf("the gateways admitted %v invocations at once, over the reserved 2", maxAdmitted)
	}
	if ok == 0 || throttled == 0 {
		t.Errorf("%d succeeded and %d throttled: want both", ok, throttled)
	}
	if int64(ok)+1 != served.Load() {
		t.Errorf("the server served %d invocations, the clients saw %d succeed (and 1 before)", served.Load(), ok)
	}
}

// testClusterMTLS: an agent's AgentService accepts only clients with a
// certificate of the cluster CA; join tokens that are revoked (or
// malformed) are refused, and the agent gets no certificate.
func testClusterMTLS(t *testing.T, e *clusterEnv) {
	a := e.agents[0]
	url := "https://" + hostPort(a.host, agentPort)
	status := func(cfg *tls.Config) (*skiffv1.StatusResponse, error) {
		tr := &http.Transport{TLSClientConfig: cfg, Protocols: new(http.Protocols)}
		tr.Protocols.SetHTTP2(true)
		defer tr.CloseIdleConnections()
		cl := skiffv1connect.NewAgentServiceClient(&http.Client{Transport: tr, Timeout: 5 * time.Second}, url)
		resp, err := cl.Status(context.Background(), connect.NewRequest(&skiffv1.StatusRequest{}))
		if err != nil {
			return nil, err
		}
		return resp.Msg, nil
	}
	ca, err := pki.LoadCA(e.caDir)
	if err != nil {
		t.Fatal(err)
	}
	// A certificate of the cluster CA is accepted.
	good := filepath.Join(t.TempDir(), "good")
	if err := ca.IssueNode(good, "e2e-client", []string{"127.0.0.1"}, time.Hour); err != nil {
		t.Fatal(err)
	}
	goodTLS, err := pki.LoadClientTLS(good)
	if err != nil {
		t.Fatal(err)
	}
	st, err := status(goodTLS)
	if err != nil || st.GetHost() != a.name {
		t.Fatalf("Status with a cluster certificate: %v (host %q), want %s's status", err, st.GetHost(), a.name)
	}
	// No client certificate: refused.
	noCert := &tls.Config{RootCAs: goodTLS.RootCAs, MinVersion: tls.VersionTLS12}
	if _, err := status(noCert); err == nil {
		t.Errorf("Status without a client certificate succeeded, want it refused")
	}
	if err := tlsRefusal(hostPort(a.host, agentPort), noCert); err != nil {
		t.Error(err)
	}
	// A certificate of another CA: refused.
	otherCA := filepath.Join(t.TempDir(), "other-ca")
	if err := pki.InitCA(otherCA); err != nil {
		t.Fatal(err)
	}
	other, err := pki.LoadCA(otherCA)
	if err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(t.TempDir(), "bad")
	if err := other.IssueNode(bad, "e2e-intruder", []string{"127.0.0.1"}, time.Hour); err != nil {
		t.Fatal(err)
	}
	badTLS, err := pki.LoadClientTLS(bad)
	if err != nil {
		t.Fatal(err)
	}
	badTLS.RootCAs = goodTLS.RootCAs // it trusts the agent; the agent must not trust it
	if _, err := status(badTLS); err == nil {
		t.Errorf("Status with another CA's certificate succeeded, want it refused")
	}
	if err := tlsRefusal(hostPort(a.host, agentPort), badTLS); err != nil {
		t.Error(err)
	}

	// A revoked join token is refused.
	out, err := e.cli("-o", "json", "token", "create", "--ttl", "10m", "--description", "e2e revoked")
	if err != nil {
		t.Fatalf("skiff token create: %v\n%s", err, out)
	}
	var tok skiffv1.CreateJoinTokenResponse
	if err := protojson.Unmarshal([]byte(out), &tok); err != nil {
		t.Fatal(err)
	}
	if out, err := e.cliOn(e.gws[1], "token", "revoke", tok.GetId()); err != nil {
		t.Fatalf("skiff token revoke: %v\n%s", err, out)
	}
	e.refusedJoin(t, tok.GetToken(), "was revoked")
	// So is a malformed one.
	e.refusedJoin(t, "skiff-not-a-token", "malformed")
}

// tlsRefusal checks, on a raw TLS connection, that the server at addr
// refuses the client configuration cfg with a certificate alert (in TLS
// 1.3 the client learns it on its first read after the handshake).
func tlsRefusal(addr string, cfg *tls.Config) error {
	cfg = cfg.Clone()
	cfg.NextProtos = []string{"h2"}
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 3 * time.Second}, "tcp", addr, cfg)
	if err == nil {
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
		_, err = conn.Read(make([]byte, 1))
	}
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		return fmt.Errorf("TLS to %s with %d client certificates: %v, want a certificate alert", addr, len(cfg.Certificates), err)
	}
	return nil
}

// refusedJoin runs an agent that joins with token and checks that the
// join is refused (the error saying want) and that the agent got no
// certificate.
func (e *clusterEnv) refusedJoin(t *testing.T, token, want string) {
	t.Helper()
	e.refusedJoinVia(t, e.gws[0], token, want)
}

func (e *clusterEnv) refusedJoinVia(t *testing.T, g *gateway, token, want string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "intruder")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, e.bin, "agent", "--data-dir", dir, "--name", "intruder",
		"--listen", "127.0.0.1:0", "--gossip-bind", "127.0.0.1:0", "--join", token,
		"--gateway", "https://"+hostPort(g.host, clusterPort), "--sandbox-subnet", "10.239.0.0/22")
	out, err := cmd.CombinedOutput()
	if err == nil || ctx.Err() != nil {
		t.Fatalf("agent joining with a bad token: %v, want it refused\n%s", err, out)
	}
	if !strings.Contains(string(out), want) {
		t.Errorf("agent joining with a bad token: output does not say %q:\n%s", want, out)
	}
	if _, err := os.Stat(filepath.Join(dir, "tls")); err == nil {
		if ents, _ := os.ReadDir(filepath.Join(dir, "tls")); len(ents) > 0 {
			t.Errorf("a refused agent has TLS material: %v", ents)
		}
	}
	t.Logf("join refused: %s", lastLines(strings.TrimSpace(string(out)), 1))
}

// testClusterExpiredToken: the join token made with the shortest
// lifetime (1 minute) when the cluster started is refused once expired.
func testClusterExpiredToken(t *testing.T, e *clusterEnv) {
	if wait := time.Until(e.shortCreated.Add(time.Minute + time.Second)); wait > 0 {
		t.Logf("waiting %v for the 1-minute join token to expire", wait.Round(time.Millisecond))
		time.Sleep(wait)
	}
	out, err := e.cliOn(e.live()[0], "token", "list")
	if err != nil {
		t.Fatalf("skiff token list: %v\n%s", err, out)
	}
	found := false
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) > 1 && f[0] == e.short.GetId() {
			found = true
			if f[1] != "expired" {
				t.Errorf("token %s listed %q, want expired:\n%s", e.short.GetId(), f[1], out)
			}
		}
	}
	if !found {
		t.Errorf("token %s not listed:\n%s", e.short.GetId(), out)
	}
	e.refusedJoinVia(t, e.live()[0], e.short.GetToken(), "expired")
}

// loadResult is one synchronous invoke of a load.
type loadResult struct {
	gw  int       // index of the gateway it went through
	at  time.Time // when its answer came
	err error
}

// runLoad invokes fn with payload from workers clients (alternating over
// gws) until stop is closed; the returned function waits for them and
// returns every result.
func runLoad(gws []*gateway, fn, payload string, workers int, stop <-chan struct{}) func() []loadResult {
	var (
		mu  sync.Mutex
		out []loadResult
		wg  sync.WaitGroup
	)
	for i := range workers {
		gi := i % len(gws)
		c := gws[gi].client("connect", "")
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				r, err := invoke(ctx, c, fn, payload)
				cancel()
				if err == nil && r.FunctionError != "" {
					err = fmt.Errorf("function error %q: %s", r.FunctionError, r.Payload)
				}
				mu.Lock()
				out = append(out, loadResult{gw: gi, at: time.Now(), err: err})
				mu.Unlock()
				if err != nil {
					time.Sleep(20 * time.Millisecond) // a client's pause after an error
				}
			}
		}()
	}
	return func() []loadResult {
		wg.Wait()
		mu.Lock()
		defer mu.Unlock()
		return out
	}
}

// watchState polls g's view until member name is in state want, and
// sends the time it saw it (the zero time after timeout).
func watchState(g *gateway, name, want string, timeout time.Duration) <-chan time.Time {
	ch := make(chan time.Time, 1)
	go func() {
		deadline := time.Now().Add(timeout)
		for time.Now().Before(deadline) {
			if g.memberState(name) == want {
				ch <- time.Now()
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		ch <- time.Time{}
	}()
	return ch
}

// waitStates waits for name to reach want in every gateway's view and
// returns when each saw it (failing the test after timeout).
func waitStates(t *testing.T, gws []*gateway, name, want string, timeout time.Duration) []time.Time {
	t.Helper()
	chs := make([]<-chan time.Time, len(gws))
	for i, g := range gws {
		chs[i] = watchState(g, name, want, timeout)
	}
	out := make([]time.Time, len(gws))
	for i, ch := range chs {
		out[i] = <-ch
		if out[i].IsZero() {
			t.Fatalf("%s does not see %s %s after %v (it sees %q)", gws[i].name, name, want, timeout, gws[i].memberState(name))
		}
	}
	return out
}

// namesHost reports whether err is an invocation error that names the
// lost host: reason agent_lost, or the host's name in the message.
func namesHost(err error, host string) bool {
	var ce *connect.Error
	return errors.As(err, &ce) && (ce.Meta().Get(errs.HeaderReason) == "agent_lost" || strings.Contains(ce.Message(), host))
}

// testClusterAgentKill: kill -9 of an agent under load (sync invokes and
// async events through both gateways). The invocations that were running
// on it fail naming it, and errors stop within 1 s of the gateways'
// detection (their member lists show it dead); invocations keep
// succeeding on the other agents; every async event accepted during the
// kill completes (its OnSuccess record). The agent then restarts and
// rejoins.
func testClusterAgentKill(t *testing.T, e *clusterEnv) {
	victim := e.agents[1]
	c0 := e.gws[0].client("connect", "")
	// Sync invokes of busy, async events of busyev (their sandboxes tell
	// them apart).
	createFunction(t, c0, "busy", &skiffv1.FunctionConfig{TimeoutSeconds: 30})
	createFunction(t, c0, "busyev", &skiffv1.FunctionConfig{TimeoutSeconds: 30})
	createQueue(t, c0, "busy-ok", nil)
	putEventConfig(t, c0, "busyev", &skiffv1.EventInvokeConfig{OnSuccess: "queue:busy-ok"})
	e.settled(t, "busy")
	e.settled(t, "busyev")

	stop := make(chan struct{})
	wait := runLoad(e.gws, "busy", `{"action":"sleep","sleep":"300ms"}`, 6, stop)
	stopped := false
	defer func() {
		if !stopped {
			close(stop)
			wait()
		}
	}()
	// Async events, one every 20 ms, alternating gateways.
	var (
		amu       sync.Mutex
		accepted  []string
		asyncErrs []string
	)
	asyncStop := make(chan struct{})
	asyncDone := make(chan struct{})
	go func() {
		defer close(asyncDone)
		cs := []clients{e.gws[0].client("connect", ""), e.gws[1].client("connect", "")}
		for i := 0; ; i++ {
			select {
			case <-asyncStop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			rid := fmt.Sprintf("kill-%04d", i)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			r, err := invokeAsync(ctx, cs[i%2], "busyev", rid, []byte(`{"action":"sleep","sleep":"100ms"}`))
			cancel()
			amu.Lock()
			if err == nil && r.StatusCode == 202 && r.RequestId == rid {
				accepted = append(accepted, rid)
			} else {
				asyncErrs = append(asyncErrs, fmt.Sprintf("%s: %v", rid, err))
			}
			amu.Unlock()
		}
	}()

	// Kill it while it runs synchronous invocations.
	waitFor(t, 30*time.Second, victim.name+" running synchronous invocations of the load", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		resp, err := e.gws[0].cluster.ListSandboxes(ctx, connect.NewRequest(&skiffv1.ListSandboxesRequest{FunctionName: "busy", Host: victim.name}))
		if err != nil {
			return false
		}
		busy := 0
		for _, s := range resp.Msg.GetSandboxes() {
			if s.GetSandbox().GetState() == "busy" {
				busy++
			}
		}
		return busy >= 1
	})
	killed := time.Now()
	victim.kill()
	detected := waitStates(t, e.gws, victim.name, "dead", 10*time.Second)
	for time.Since(killed) < 2*time.Second {
		time.Sleep(50 * time.Millisecond) // async events sent after the kill too
	}
	close(asyncStop)
	<-asyncDone
	last := detected[0]
	if detected[1].After(last) {
		last = detected[1]
	}
	for time.Since(last) < 3*time.Second {
		time.Sleep(50 * time.Millisecond) // the load runs on
	}
	close(stop)
	stopped = true
	results := wait()

	var lostErrs, after int
	var lastErr time.Time
	for _, r := range results {
		if r.err == nil {
			if r.at.After(detected[r.gw]) {
				after++
			}
			continue
		}
		if !namesHost(r.err, victim.name) {
			t.Errorf("invoke through %s failed without naming the lost host %s: %v", e.gws[r.gw].name, victim.name, r.err)
			continue
		}
		lostErrs++
		if r.at.After(lastErr) {
			lastErr = r.at
		}
		if r.at.After(detected[r.gw].Add(time.Second)) {
			t.Errorf("invoke through %s failed %v after the gateway saw %s dead, want errors to stop within 1 s: %v",
				e.gws[r.gw].name, r.at.Sub(detected[r.gw]).Round(time.Millisecond), victim.name, r.err)
		}
	}
	if lostErrs == 0 {
		t.Errorf("no invocation failed naming %s although it ran some when killed", victim.name)
	}
	if after < 10 {
		t.Errorf("only %d invocations succeeded after the detection, want the load to go on on the other agents", after)
	}
	amu.Lock()
	if len(asyncErrs) > 0 {
		t.Errorf("%d async accepts failed, first: %s", len(asyncErrs), asyncErrs[0])
	}
	want := slices.Clone(accepted)
	amu.Unlock()
	var firstErr error
	for _, r := range results {
		if r.err != nil {
			firstErr = r.err
			break
		}
	}
	t.Logf("kill -9 %s: detected dead by gw0 after %v, gw1 after %v; %d invocations, %d failed naming it (last %v after the kill; e.g. %v), %d succeeded after the detection",
		victim.name, detected[0].Sub(killed).Round(time.Millisecond), detected[1].Sub(killed).Round(time.Millisecond),
		len(results), lostErrs, lastErr.Sub(killed).Round(time.Millisecond), firstErr, after)

	drainStart := time.Now()
	count, recs := drainRecords(t, c0, "busy-ok", 4, 60*time.Second, func(count map[string]int) bool {
		for _, id := range want {
			if count[id] == 0 {
				return false
			}
		}
		return true
	})
	dups := 0
	for _, n := range count {
		dups += n - 1
	}
	for _, r := range recs {
		if r.RequestContext.Condition != "Success" {
			t.Errorf("record of %s: condition %q, want Success", r.RequestContext.RequestID, r.RequestContext.Condition)
			break
		}
	}
	t.Logf("all %d async events accepted around the kill completed (records drained in %v; %d duplicates)", len(want), time.Since(drainStart).Round(time.Millisecond), dups)

	// The agent restarts (same data dir and certificate) and rejoins.
	restart := time.Now()
	e.startAgent(victim)
	if t.Failed() {
		t.FailNow()
	}
	back := waitStates(t, e.gws, victim.name, "alive", 30*time.Second)
	t.Logf("%s restarted and alive again in gw0's view after %v, gw1's after %v", victim.name,
		back[0].Sub(restart).Round(time.Millisecond), back[1].Sub(restart).Round(time.Millisecond))
}

// testClusterPartition: an agent cut off the network (its host's bridge
// port down) is declared dead and invocations avoid it; healed, it
// rejoins with the sandboxes it had (none duplicated, none lost) and takes
// work again.
func testClusterPartition(t *testing.T, e *clusterEnv) {
	victim := e.agents[2]
	e.waitGossipSettled(t)
	list := e.gws[0].sandboxes(t, "")
	before := map[string]int64{}
	for _, p := range list.GetSandboxes() {
		if p.GetHost() == victim.name {
			before[p.GetSandbox().GetId()] = p.GetSandbox().GetInvocations()
		}
	}
	if len(before) == 0 {
		t.Fatalf("%s has no sandbox before the partition: %v", victim.name, sandboxesByHost(list))
	}

	if err := victim.host.partition(); err != nil {
		t.Fatal(err)
	}
	cut := time.Now()
	healed := false
	defer func() {
		if !healed {
			_ = victim.host.heal()
		}
	}()
	detected := waitStates(t, e.gws, victim.name, "dead", 10*time.Second)
	t.Logf("%s partitioned: dead in gw0's view after %v, gw1's after %v", victim.name,
		detected[0].Sub(cut).Round(time.Millisecond), detected[1].Sub(cut).Round(time.Millisecond))

	// Invocations avoid it: a load through both gateways for 5 s (longer
	// than gossip keeps talking to a dead member) all succeeds.
	stop := make(chan struct{})
	wait := runLoad(e.gws, "spread", `{"action":"sleep","sleep":"200ms"}`, 6, stop)
	for time.Since(detected[0]) < 5*time.Second {
		time.Sleep(50 * time.Millisecond) // the load runs
	}
	close(stop)
	results := wait()
	for _, r := range results {
		if r.err != nil {
			t.Errorf("invoke through %s during the partition: %v", e.gws[r.gw].name, r.err)
		}
	}
	t.Logf("%d invocations during the partition, all on the other agents", len(results))

	if err := victim.host.heal(); err != nil {
		t.Fatal(err)
	}
	healed = true
	healedAt := time.Now()
	back := waitStates(t, e.gws, victim.name, "alive", 30*time.Second)
	t.Logf("%s healed: alive again in gw0's view after %v, gw1's after %v", victim.name,
		back[0].Sub(healedAt).Round(time.Millisecond), back[1].Sub(healedAt).Round(time.Millisecond))

	// Its sandboxes are the ones it had, untouched by the invocations
	// during the partition, and no sandbox is listed twice.
	for _, g := range e.gws {
		var l *skiffv1.ListSandboxesResponse
		waitFor(t, 10*time.Second, g.name+" reaching every agent", func() bool {
			l = g.sandboxes(t, "")
			return len(l.GetUnreachableHosts()) == 0 && sandboxesByHost(l)[victim.name] > 0
		})
		seen := map[string]string{}
		got := map[string]int64{}
		for _, p := range l.GetSandboxes() {
			id := p.GetSandbox().GetId()
			if h, dup := seen[id]; dup {
				t.Errorf("%s lists sandbox %s twice (%s and %s)", g.name, id, h, p.GetHost())
			}
			seen[id] = p.GetHost()
			if p.GetHost() == victim.name {
				got[id] = p.GetSandbox().GetInvocations()
			}
		}
		if !maps.Equal(got, before) {
			t.Errorf("%s's sandboxes after the partition (through %s): %v, before: %v", victim.name, g.name, got, before)
		}
		m, err := g.members(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if len(m) != 5 {
			t.Errorf("%s sees %d members after the heal, want 5: %v", g.name, len(m), slices.Collect(maps.Keys(m)))
		}
	}

	// It takes work again: a new function's concurrent invokes spread to
	// every agent.
	createFunction(t, e.gws[0].client("connect", ""), "after", nil)
	e.settled(t, "after")
	e.waitGossipSettled(t)
	var wg sync.WaitGroup
	errc := make(chan error, 9)
	for i := range 9 {
		c := e.gws[i%2].client("connect", "")
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := invoke(context.Background(), c, "after", `{"action":"sleep","sleep":"1s"}`)
			errc <- err
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		if err != nil {
			t.Errorf("invoke after the heal: %v", err)
		}
	}
	per := sandboxesByHost(e.gws[1].sandboxes(t, "after"))
	if per[victim.name] == 0 {
		hs, _ := e.gws[0].cluster.ListHosts(context.Background(), connect.NewRequest(&skiffv1.ListHostsRequest{}))
		t.Errorf("the healed %s got none of 9 concurrent invokes: %v; hosts: %v", victim.name, per, hs.Msg.GetHosts())
	}
	t.Logf("after the heal, 9 concurrent invokes of a new function: %v", per)
}

// leaseSlot is a lease slot as the leasing service reads it.
type leaseSlot = lease.Lease

// heldBy reports whether gateway gw holds the slot now (holders are
// "<gateway>/<purpose>").
func heldBy(s leaseSlot, gw string, now time.Time) bool {
	return strings.HasPrefix(s.Holder, gw+"/") && !s.Free(now)
}

// leaseSlots reads every lease slot (by key) from the cluster's storage.
func leaseSlots(ctx context.Context, ls *lease.Service) (map[string]leaseSlot, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	all, err := ls.List(ctx)
	if err != nil {
		return nil, err
	}
	out := make(map[string]leaseSlot, len(all))
	for _, l := range all {
		out[l.Key()] = l
	}
	return out, nil
}

// testClusterGatewayKill: kill -9 of the gateway holding the pollers'
// leases (async queues and a stream mapping's shards) while it processes
// async events it accepted: the other gateway takes every one of its
// leases over within 3 s (gossip declares it dead, and a dead holder's
// leases are taken at once), processes the stream's new records, and
// every event the killed gateway accepted completes.
func testClusterGatewayKill(t *testing.T, e *clusterEnv) {
	ctx := context.Background()
	js := natsClient(t, e.nats)
	kv, err := lease.New(ctx, js, lease.Config{})
	if err != nil {
		t.Fatal(err)
	}
	c0 := e.gws[0].client("connect", "")
	createFunction(t, c0, "gk", &skiffv1.FunctionConfig{TimeoutSeconds: 30})
	createQueue(t, c0, "gk-ok", nil)
	putEventConfig(t, c0, "gk", &skiffv1.EventInvokeConfig{OnSuccess: "queue:gk-ok"})
	e.settled(t, "gk")
	// Agents fetch code only from the gateway they were started with
	// (--gateway), which may be the one killed: the function's code must
	// be cached on every agent already. Every test function has the same
	// code (testfn), and function spread ran on every agent.
	fns := map[string]string{}
	for _, name := range []string{"gk", "spread"} {
		resp, err := c0.fn.GetFunction(ctx, connect.NewRequest(&skiffv1.GetFunctionRequest{Name: name}))
		if err != nil {
			t.Fatal(err)
		}
		fns[name] = resp.Msg.GetFunction().GetCodeSha256()
	}
	if fns["gk"] == "" || fns["gk"] != fns["spread"] {
		t.Fatalf("code digests %v: want gk's code to be spread's, cached on every agent", fns)
	}
	createStream(t, c0, "gks", 4)
	keys := streamKeys("gk", 20)
	createStreamMapping(t, c0, &skiffv1.EventSourceMapping{FunctionName: "gk", Stream: "gks", BatchSize: ptr[int32](10)})
	if _, err := putRound(ctx, c0, "gks", keys, 0); err != nil {
		t.Fatal(err)
	}

	// Every lane and async queue slot is held; the victim is the gateway
	// holding async slots (and the most slots).
	var slots map[string]leaseSlot
	count := func(gw, kind string, now time.Time) int {
		n := 0
		for _, s := range slots {
			if heldBy(s, gw, now) && strings.HasPrefix(s.Resource, kind) {
				n++
			}
		}
		return n
	}
	waitFor(t, 20*time.Second, "every stream lane and async queue slot held", func() bool {
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
		return lanes == 4 && held == len(slots)
	})
	now := time.Now()
	vi := 0
	if a0, a1 := count("gw0", "async", now), count("gw1", "async", now); a1 > a0 || (a1 == a0 && count("gw1", "", now) > count("gw0", "", now)) {
		vi = 1
	}
	victim, survivor := e.gws[vi], e.gws[1-vi]
	t.Logf("leases before the kill: gw0 %d (async %d, stream lanes %d), gw1 %d (async %d, stream lanes %d)",
		count("gw0", "", now), count("gw0", "async", now), count("gw0", "stream:", now),
		count("gw1", "", now), count("gw1", "async", now), count("gw1", "stream:", now))
	if count(victim.name, "", now) == 0 {
		t.Fatalf("no gateway holds a lease: %v", slots)
	}
	cs := survivor.client("connect", "")
	w := watchLogs(t, cs, "gk")

	// Async events accepted by the victim, processing when it dies.
	cv := victim.client("connect", "")
	const events = 150
	var acked []string
	var amu sync.Mutex
	var wg sync.WaitGroup
	todo := make(chan int, events)
	for i := range events {
		todo <- i
	}
	close(todo)
	for range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range todo {
				rid := fmt.Sprintf("gk-%04d", i)
				r, err := invokeAsync(ctx, cv, "gk", rid, []byte(`{"action":"sleep","sleep":"100ms"}`))
				amu.Lock()
				if err != nil || r.StatusCode != 202 {
					t.Errorf("async accept of %s by %s: %v", rid, victim.name, err)
				} else {
					acked = append(acked, rid)
				}
				amu.Unlock()
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	// Wait until its pollers are busy with them, then kill it.
	waitFor(t, 20*time.Second, victim.name+" processing the events", func() bool {
		return victim.metricSum(t, `skiff_async_attempts_total{outcome="success"}`) >= 5
	})
	if slots, err = leaseSlots(ctx, kv); err != nil {
		t.Fatal(err)
	}
	// The resources it polls (a gateway holds at most one slot of each):
	// the takeover is done when the survivor holds a slot of every one.
	theirs := map[string]bool{}
	now = time.Now()
	for _, s := range slots {
		if heldBy(s, victim.name, now) {
			theirs[s.Resource] = true
		}
	}
	killed := time.Now()
	victim.kill()
	dead := watchState(survivor, victim.name, "dead", 10*time.Second)

	var takeover time.Duration
	waitFor(t, 15*time.Second, survivor.name+" polling every resource "+victim.name+" polled", func() bool {
		cur, err := leaseSlots(ctx, kv)
		if err != nil {
			return false
		}
		now := time.Now()
		polled := map[string]bool{}
		for _, s := range cur {
			if heldBy(s, survivor.name, now) {
				polled[s.Resource] = true
			}
		}
		for r := range theirs {
			if !polled[r] {
				return false
			}
		}
		takeover = time.Since(killed)
		return true
	})
	seenDead := <-dead
	if seenDead.IsZero() {
		t.Errorf("%s never saw %s dead", survivor.name, victim.name)
	}
	lanes := 0
	for r := range theirs {
		if strings.HasPrefix(r, "stream:") {
			lanes++
		}
	}
	t.Logf("kill -9 %s polling %d resources (%d stream lanes): %s saw it dead after %v and held a lease of every one after %v",
		victim.name, len(theirs), lanes, survivor.name, seenDead.Sub(killed).Round(time.Millisecond), takeover.Round(time.Millisecond))
	if takeover > 3*time.Second {
		t.Errorf("leases taken over %v after the kill, want within 3 s", takeover.Round(time.Millisecond))
	}

	// The stream goes on through the survivor.
	for n := 1; n <= 3; n++ {
		if _, err := putRound(ctx, cs, "gks", keys, n); err != nil {
			t.Fatal(err)
		}
	}
	w.wait(t, 30*time.Second, "the records put after the kill", func(seen []seenRec) bool {
		got := map[string]bool{}
		for _, s := range seen {
			got[fmt.Sprintf("%s/%d", s.key, s.n)] = true
		}
		for _, k := range keys {
			for n := 1; n <= 3; n++ {
				if !got[fmt.Sprintf("%s/%d", k, n)] {
					return false
				}
			}
		}
		return true
	})
	streamDone := time.Since(killed)

	// Every event the victim accepted completes (those its pollers held
	// when it died come back after the queue's ack wait, 30 s).
	var missing []string
	t.Cleanup(func() {
		if t.Failed() && len(missing) > 0 {
			t.Logf("events without a record: %v", missing)
			asyncDiagnostics(t, js, missing)
			if a, err := cs.queue.GetQueueAttributes(ctx, connect.NewRequest(&skiffv1.GetQueueAttributesRequest{Name: "gk-ok"})); err == nil {
				t.Logf("queue gk-ok on %s: visible %d, not visible %d, delayed %d", survivor.name,
					a.Msg.GetApproximateMessages(), a.Msg.GetApproximateMessagesNotVisible(), a.Msg.GetApproximateMessagesDelayed())
			}
			if r, err := cs.queue.ReceiveMessage(ctx, connect.NewRequest(&skiffv1.ReceiveMessageRequest{Queue: "gk-ok", MaxMessages: 10})); err != nil {
				t.Logf("a last receive from gk-ok on %s: %v", survivor.name, err)
			} else {
				for _, m := range r.Msg.GetMessages() {
					t.Logf("a last receive from gk-ok on %s: %.300s", survivor.name, m.GetBody())
				}
			}
			for _, g := range e.gws {
				for _, line := range strings.Split(g.out.String(), "\n") {
					for _, id := range missing {
						if strings.Contains(line, id) {
							t.Logf("%s: %s", g.name, line)
						}
					}
				}
			}
		}
	})
	recs, _ := drainRecords(t, cs, "gk-ok", 4, 75*time.Second, func(count map[string]int) bool {
		missing = missing[:0]
		for _, id := range acked {
			if count[id] == 0 {
				missing = append(missing, id)
			}
		}
		return len(missing) == 0
	})
	dups := 0
	for _, n := range recs {
		dups += n - 1
	}
	t.Logf("the stream's records put after the kill processed %v after it; all %d events %s accepted completed %v after it (%d duplicates)",
		streamDone.Round(time.Millisecond), len(acked), victim.name, time.Since(killed).Round(time.Millisecond), dups)
}

// asyncDiagnostics logs where the events of ids are in storage: the
// messages of stream ASYNC holding them (a single event or a batch), with
// their consumers' state, and the messages of stream QUEUES naming them.
func asyncDiagnostics(t *testing.T, js jetstream.JetStream, ids []string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if st, err := js.Stream(ctx, "ASYNC"); err != nil {
		t.Logf("stream ASYNC: %v", err)
	} else {
		lister := st.ListConsumers(ctx)
		for ci := range lister.Info() {
			t.Logf("ASYNC consumer %s: pending %d, ack pending %d, redelivered %d, waiting %d, delivered %d, ack floor %d",
				ci.Name, ci.NumPending, ci.NumAckPending, ci.NumRedelivered, ci.NumWaiting, ci.Delivered.Stream, ci.AckFloor.Stream)
		}
		if err := lister.Err(); err != nil {
			t.Logf("listing ASYNC consumers: %v", err)
		}
	}
	for _, name := range []string{"ASYNC", "QUEUES"} {
		st, err := js.Stream(ctx, name)
		if err != nil {
			t.Logf("stream %s: %v", name, err)
			continue
		}
		info, err := st.Info(ctx)
		if err != nil {
			t.Logf("stream %s: %v", name, err)
			continue
		}
		t.Logf("stream %s: %d messages, sequences %d-%d", name, info.State.Msgs, info.State.FirstSeq, info.State.LastSeq)
		for seq := info.State.FirstSeq; seq <= info.State.LastSeq && seq > 0; seq++ {
			m, err := st.GetMsg(ctx, seq)
			if err != nil {
				continue
			}
			for _, id := range ids {
				if strings.Contains(string(m.Data), id) || strings.Contains(fmt.Sprint(m.Header), id) {
					t.Logf("stream %s seq %d subject %s holds %s: headers %v, %d bytes", name, seq, m.Subject, id, m.Header, len(m.Data))
					if name == "QUEUES" {
						queueStateDiagnostics(t, ctx, js, m.Subject, seq)
					}
				}
			}
		}
	}
}

// queueStateDiagnostics logs the receive state (KV "queuestate") of the
// queue message at seq on subject queue.<token>.m.
func queueStateDiagnostics(t *testing.T, ctx context.Context, js jetstream.JetStream, subject string, seq uint64) {
	parts := strings.Split(subject, ".")
	if len(parts) != 3 {
		return
	}
	st, err := js.Stream(ctx, "KV_queuestate")
	if err != nil {
		t.Logf("stream KV_queuestate: %v", err)
		return
	}
	key := fmt.Sprintf("$KV.queuestate.%s.%d", parts[1], seq)
	m, err := st.GetLastMsgForSubject(ctx, key)
	if err != nil {
		t.Logf("state %s: %v", key, err)
		return
	}
	t.Logf("state %s: seq %d at %v, headers %v, %s", key, m.Sequence, m.Time, m.Header, m.Data)
}
