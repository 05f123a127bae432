package router

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gossip"
	"skiff.dev/skiff/internal/errs"
)

// fakeMembers is a gossip view for the router's logic tests.
type fakeMembers struct {
	mu      sync.Mutex
	members []gossip.Member
	suspect []string
}

func (f *fakeMembers) Members() []gossip.Member {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]gossip.Member(nil), f.members...)
}

func (f *fakeMembers) MarkSuspect(name string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.suspect = append(f.suspect, name)
	for i := range f.members {
		if f.members[i].Name == name {
			f.members[i].State = gossip.StateSuspect
		}
	}
	return true
}

// hostAgent answers Invoke with a fixed error or a response naming itself.
type hostAgent struct {
	name    string
	err     error
	mu      sync.Mutex
	invokes int
	retires int
}

func (a *hostAgent) Invoke(context.Context, *connect.Request[skiffv1.AgentInvokeRequest]) (*connect.Response[skiffv1.AgentInvokeResponse], error) {
	a.mu.Lock()
	a.invokes++
	a.mu.Unlock()
	if a.err != nil {
		return nil, a.err
	}
	return connect.NewResponse(&skiffv1.AgentInvokeResponse{Payload: []byte(a.name)}), nil
}

func (a *hostAgent) Retire(context.Context, *connect.Request[skiffv1.RetireRequest]) (*connect.Response[skiffv1.RetireResponse], error) {
	a.mu.Lock()
	a.retires++
	a.mu.Unlock()
	return connect.NewResponse(&skiffv1.RetireResponse{}), a.err
}

func agentMember(t *testing.T, name string, freeMB int64, warm map[string]int) gossip.Member {
	t.Helper()
	s, err := gossip.Summarize(gossip.Capacity{MemoryTotalMB: 4096, MemoryFreeMB: freeMB, WarmIdle: warm}, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	return gossip.Member{Name: name, State: gossip.StateAlive, Capacity: s,
		Tags: gossip.Tags{Role: gossip.RoleAgent, RPCAddr: name + ":7071"}}
}

func newTestCluster(t *testing.T, members *fakeMembers, agents map[string]*hostAgent) *Cluster {
	t.Helper()
	c, err := NewCluster(ClusterConfig{Members: members, Dial: func(addr string) Agent {
		a, ok := agents[strings.TrimSuffix(addr, ":7071")]
		if !ok {
			t.Fatalf("dialled unknown address %s", addr)
		}
		return a
	}})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func invokeReq(key string) *skiffv1.AgentInvokeRequest {
	return &skiffv1.AgentInvokeRequest{Spec: &skiffv1.SandboxSpec{FunctionName: "f", ConfigKey: key, MemoryMb: 128}}
}

// TestClusterWarmFirst: the host holding a warm sandbox of the version
// gets the invocation; gateways and members without an RPC address are
// never chosen.
func TestClusterWarmFirst(t *testing.T) {
	members := &fakeMembers{members: []gossip.Member{
		agentMember(t, "a", 2048, nil),
		agentMember(t, "b", 2048, map[string]int{"k1": 2}),
		agentMember(t, "c", 2048, nil),
		{Name: "gw", State: gossip.StateAlive, Tags: gossip.Tags{Role: gossip.RoleGateway, RPCAddr: "gw:7071"}},
	}}
	agents := map[string]*hostAgent{"a": {name: "a"}, "b": {name: "b"}, "c": {name: "c"}}
	c := newTestCluster(t, members, agents)
	for range 10 {
		resp, err := c.Invoke(context.Background(), invokeReq("k1"))
		if err != nil {
			t.Fatal(err)
		}
		if string(resp.Payload) != "b" {
			t.Fatalf("warm invoke ran on %s, want b (the host with the warm sandbox)", resp.Payload)
		}
	}
}

// TestClusterRefusalsPlaceElsewhere: a draining or full agent refuses and
// the invocation runs on another host; an unreachable agent is marked
// suspect and skipped.
func TestClusterRefusalsPlaceElsewhere(t *testing.T) {
	dialErr := connect.NewError(connect.CodeUnavailable, &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connection refused")})
	for _, tc := range []struct {
		name    string
		err     error
		suspect bool
	}{
		{"draining", errs.ToConnect(errs.Unavailable("agent a is draining").WithReason("draining")), false},
		{"full", errs.ToConnect(errs.New(errs.KindResourceExhausted, "host full").WithReason("host_full")), false},
		{"unreachable", dialErr, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			members := &fakeMembers{members: []gossip.Member{
				agentMember(t, "a", 2048, map[string]int{"k1": 1}), // placement's first choice
				agentMember(t, "b", 1024, nil),
			}}
			agents := map[string]*hostAgent{"a": {name: "a", err: tc.err}, "b": {name: "b"}}
			c := newTestCluster(t, members, agents)
			resp, err := c.Invoke(context.Background(), invokeReq("k1"))
			if err != nil {
				t.Fatal(err)
			}
			if string(resp.Payload) != "b" || agents["a"].invokes != 1 {
				t.Fatalf("ran on %s after a's refusal (a tried %d times), want b after one try of a", resp.Payload, agents["a"].invokes)
			}
			if got := len(members.suspect) > 0; got != tc.suspect {
				t.Fatalf("suspects %v, want suspect marked: %v", members.suspect, tc.suspect)
			}
		})
	}
}

// TestClusterLostMidInvoke: the transport breaking while the agent runs
// the invocation fails it with Unavailable naming the host (it may have
// run: no blind retry), and the host becomes suspect.
func TestClusterLostMidInvoke(t *testing.T) {
	members := &fakeMembers{members: []gossip.Member{agentMember(t, "a", 2048, nil)}}
	agents := map[string]*hostAgent{"a": {name: "a", err: connect.NewError(connect.CodeUnavailable, errors.New("unexpected EOF"))}}
	c := newTestCluster(t, members, agents)
	_, err := c.Invoke(context.Background(), invokeReq("k1"))
	var e *errs.Error
	if !errors.As(err, &e) || e.Kind != errs.KindUnavailable || e.Reason != "agent_lost" || !strings.Contains(err.Error(), "agent a") {
		t.Fatalf("err = %v, want Unavailable agent_lost naming agent a", err)
	}
	if agents["a"].invokes != 1 || len(members.suspect) != 1 {
		t.Fatalf("a invoked %d times, suspects %v; want once and a suspect", agents["a"].invokes, members.suspect)
	}
}

// TestClusterNoAgents: an empty cluster is Unavailable, every refusal is
// the last refusal's error, and a function error from an agent is passed
// through unchanged.
func TestClusterNoAgents(t *testing.T) {
	c := newTestCluster(t, &fakeMembers{}, nil)
	if _, err := c.Invoke(context.Background(), invokeReq("k")); !errs.Is(err, errs.KindUnavailable) {
		t.Fatalf("no agents: %v, want Unavailable", err)
	}
	members := &fakeMembers{members: []gossip.Member{agentMember(t, "a", 2048, nil), agentMember(t, "b", 2048, nil)}}
	draining := errs.ToConnect(errs.Unavailable("draining").WithReason("draining"))
	agents := map[string]*hostAgent{"a": {name: "a", err: draining}, "b": {name: "b", err: draining}}
	c = newTestCluster(t, members, agents)
	if _, err := c.Invoke(context.Background(), invokeReq("k")); err == nil || agents["a"].invokes != 1 || agents["b"].invokes != 1 {
		t.Fatalf("all draining: err %v, tries a=%d b=%d; want an error after one try each", err, agents["a"].invokes, agents["b"].invokes)
	}
	agents = map[string]*hostAgent{"a": {name: "a", err: errs.ToConnect(errs.Invalid("payload", "bad"))}, "b": {name: "b"}}
	members = &fakeMembers{members: []gossip.Member{agentMember(t, "a", 2048, nil)}}
	c = newTestCluster(t, members, agents)
	if _, err := c.Invoke(context.Background(), invokeReq("k")); !errs.IsInvalid(err) {
		t.Fatalf("agent's invalid argument came back as %v", err)
	}
}

// TestClusterRetireBroadcast: Retire reaches every live agent.
func TestClusterRetireBroadcast(t *testing.T) {
	members := &fakeMembers{members: []gossip.Member{agentMember(t, "a", 1, nil), agentMember(t, "b", 1, nil)}}
	dead := agentMember(t, "c", 1, nil)
	dead.State = gossip.StateDead
	members.members = append(members.members, dead)
	agents := map[string]*hostAgent{"a": {name: "a"}, "b": {name: "b"}, "c": {name: "c"}}
	c := newTestCluster(t, members, agents)
	if err := c.Retire(context.Background(), "f", "k"); err != nil {
		t.Fatal(err)
	}
	if agents["a"].retires != 1 || agents["b"].retires != 1 || agents["c"].retires != 0 {
		t.Fatalf("retires a=%d b=%d c(dead)=%d, want 1 1 0", agents["a"].retires, agents["b"].retires, agents["c"].retires)
	}
}

// warmAgent refuses warm-only requests (its warm sandbox is gone) and
// runs cold ones.
type warmAgent struct {
	hostAgent
	warmOnly []bool
}

func (a *warmAgent) Invoke(ctx context.Context, req *connect.Request[skiffv1.AgentInvokeRequest]) (*connect.Response[skiffv1.AgentInvokeResponse], error) {
	a.mu.Lock()
	a.warmOnly = append(a.warmOnly, req.Msg.GetWarmOnly())
	a.mu.Unlock()
	if req.Msg.GetWarmOnly() {
		return nil, errs.ToConnect(errs.New(errs.KindFailedPrecondition, "no idle sandbox").WithReason("no_warm_sandbox"))
	}
	return a.hostAgent.Invoke(ctx, req)
}

// TestClusterStaleWarmView: the gossiped warm sandbox is gone when the
// claim arrives; the invocation is placed again as a cold start, and the
// miss does not use up an attempt.
func TestClusterStaleWarmView(t *testing.T) {
	members := &fakeMembers{members: []gossip.Member{agentMember(t, "a", 2048, map[string]int{"k1": 1})}}
	a := &warmAgent{hostAgent: hostAgent{name: "a"}}
	c, err := NewCluster(ClusterConfig{Members: members, Attempts: 1, Dial: func(string) Agent { return a }})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Invoke(context.Background(), invokeReq("k1"))
	if err != nil {
		t.Fatal(err)
	}
	if string(resp.Payload) != "a" || len(a.warmOnly) != 2 || !a.warmOnly[0] || a.warmOnly[1] {
		t.Fatalf("ran on %s with warm-only flags %v, want a warm claim refused then a cold start on a", resp.Payload, a.warmOnly)
	}
}

// blockingAgent runs until its context ends.
type blockingAgent struct {
	hostAgent
	started chan struct{}
}

func (a *blockingAgent) Invoke(ctx context.Context, _ *connect.Request[skiffv1.AgentInvokeRequest]) (*connect.Response[skiffv1.AgentInvokeResponse], error) {
	a.started <- struct{}{}
	<-ctx.Done()
	return nil, connect.NewError(connect.CodeCanceled, ctx.Err())
}

// TestClusterHostFailedFailsInFlight: when gossip declares the host of a
// running invocation dead, the invocation fails at once with Unavailable
// naming the host, instead of waiting for the transport to notice.
func TestClusterHostFailedFailsInFlight(t *testing.T) {
	members := &fakeMembers{members: []gossip.Member{agentMember(t, "a", 2048, nil)}}
	a := &blockingAgent{hostAgent: hostAgent{name: "a"}, started: make(chan struct{}, 1)}
	c, err := NewCluster(ClusterConfig{Members: members, Dial: func(string) Agent { return a }})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := c.Invoke(context.Background(), invokeReq("k1"))
		done <- err
	}()
	<-a.started
	c.HostFailed("b") // another host: nothing happens
	c.HostFailed("a")
	err = <-done
	var e *errs.Error
	if !errors.As(err, &e) || e.Kind != errs.KindUnavailable || e.Reason != "agent_lost" || !strings.Contains(err.Error(), "agent a") {
		t.Fatalf("invocation on a failed host: %v, want Unavailable agent_lost naming agent a", err)
	}
}

// coldAgent answers every invocation as a cold start on itself.
type coldAgent struct{ hostAgent }

func (a *coldAgent) Invoke(ctx context.Context, req *connect.Request[skiffv1.AgentInvokeRequest]) (*connect.Response[skiffv1.AgentInvokeResponse], error) {
	resp, err := a.hostAgent.Invoke(ctx, req)
	if err == nil {
		resp.Msg.ColdStart = true
	}
	return resp, err
}

// TestClusterSpreadsColdStarts: a function's cold starts spread evenly
// over hosts and zones (one per host before any gets a second), and stop
// counting after the spread window.
func TestClusterSpreadsColdStarts(t *testing.T) {
	var members []gossip.Member
	agents := map[string]*coldAgent{}
	for i, zone := range []string{"z1", "z1", "z2", "z2"} {
		name := fmt.Sprintf("h%d", i)
		m := agentMember(t, name, 4096, nil)
		m.Tags.Zone = zone
		members = append(members, m)
		agents[name] = &coldAgent{hostAgent{name: name}}
	}
	now := time.Unix(1_000_000, 0)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	c, err := NewCluster(ClusterConfig{Members: &fakeMembers{members: members}, Now: clock, SpreadWindow: time.Minute,
		Dial: func(addr string) Agent { return agents[strings.TrimSuffix(addr, ":7071")] }})
	if err != nil {
		t.Fatal(err)
	}
	count := map[string]int{}
	for range 8 {
		resp, err := c.Invoke(context.Background(), invokeReq("k"))
		if err != nil {
			t.Fatal(err)
		}
		count[string(resp.Payload)]++
	}
	for name, n := range count {
		if n != 2 {
			t.Fatalf("cold starts per host %v, want 2 each (%s has %d)", count, name, n)
		}
	}
	if c.sandboxes("f")["h0"] != 2 {
		t.Fatalf("recent starts on h0: %v", c.sandboxes("f"))
	}
	mu.Lock()
	now = now.Add(2 * time.Minute)
	mu.Unlock()
	if got := c.sandboxes("f"); len(got) != 0 {
		t.Fatalf("starts after the window: %v, want none", got)
	}
}

// TestClusterSpreadsConcurrentColdStarts: invocations of a new function
// arriving together spread over the hosts (the gossiped view does not
// show them yet): each running invocation counts on its host.
func TestClusterSpreadsConcurrentColdStarts(t *testing.T) {
	var members []gossip.Member
	agents := map[string]*blockingAgent{}
	for i := range 3 {
		name := fmt.Sprintf("h%d", i)
		members = append(members, agentMember(t, name, 4096, nil))
		agents[name] = &blockingAgent{hostAgent: hostAgent{name: name}, started: make(chan struct{}, 100)}
	}
	c, err := NewCluster(ClusterConfig{Members: &fakeMembers{members: members},
		Dial: func(addr string) Agent { return agents[strings.TrimSuffix(addr, ":7071")] }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for i := range 9 {
		wg.Go(func() { _, _ = c.Invoke(ctx, invokeReq("k")) })
		// Wait until it runs on some host before the next arrives.
		deadline := time.Now().Add(5 * time.Second)
		for {
			n := 0
			for _, a := range agents {
				n += len(a.started)
			}
			if n == i+1 && c.total() == i+1 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("invocation never started")
			}
			time.Sleep(time.Millisecond)
		}
	}
	for name, a := range agents {
		if n := len(a.started); n != 3 {
			t.Errorf("host %s runs %d of 9 concurrent invocations, want 3", name, n)
		}
	}
	cancel()
	wg.Wait()
}

// total counts the invocations running now.
func (c *Cluster) total() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, hosts := range c.pending {
		for _, k := range hosts {
			n += k
		}
	}
	return n
}

// versionedMembers counts Members calls and has a settable version.
type versionedMembers struct {
	fakeMembers
	version atomic.Uint64
	calls   atomic.Int64
}

func (v *versionedMembers) Members() []gossip.Member {
	v.calls.Add(1)
	return v.fakeMembers.Members()
}

func (v *versionedMembers) Version() uint64 { return v.version.Load() }

// TestClusterReusesHostsOfOneVersion: the placement hosts are rebuilt only
// when the member view's version moves.
func TestClusterReusesHostsOfOneVersion(t *testing.T) {
	m := &versionedMembers{}
	m.members = []gossip.Member{agentMember(t, "a", 2048, nil)}
	a := &hostAgent{name: "a"}
	c, err := NewCluster(ClusterConfig{Members: m, Dial: func(string) Agent { return a }})
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		if _, err := c.Invoke(context.Background(), invokeReq("k")); err != nil {
			t.Fatal(err)
		}
	}
	if n := m.calls.Load(); n != 1 {
		t.Fatalf("member view read %d times for one version, want 1", n)
	}
	m.version.Add(1)
	if _, err := c.Invoke(context.Background(), invokeReq("k")); err != nil {
		t.Fatal(err)
	}
	if n := m.calls.Load(); n != 2 {
		t.Fatalf("member view read %d times after it changed, want 2", n)
	}
}
