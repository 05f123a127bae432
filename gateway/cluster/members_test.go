package cluster

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/testing/protocmp"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gossip"
	"skiff.dev/skiff/internal/errs"
)

func startNode(t *testing.T, mn *gossip.MemNetwork, name string, tags gossip.Tags) *gossip.Node {
	t.Helper()
	n, err := gossip.New(gossip.Config{Name: name, Transport: mn.NewTransport(), Tags: tags, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	t.Cleanup(func() { _ = n.Shutdown() })
	return n
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestMembersAndHosts lists a real gossip cluster (memberlist on the
// in-memory network): a gateway and two agents, one reporting capacity,
// the other draining.
func TestMembersAndHosts(t *testing.T) {
	mn := gossip.NewMemNetwork()
	gw := startNode(t, mn, "gw-1", gossip.Tags{Role: gossip.RoleGateway, Version: "v1", Zone: "z1", RPCAddr: "10.0.0.1:7070"})
	a1 := startNode(t, mn, "agent-1", gossip.Tags{Role: gossip.RoleAgent, Version: "v1", Zone: "z1", Rack: "r1", RPCAddr: "10.0.0.2:7071"})
	a2 := startNode(t, mn, "agent-2", gossip.Tags{Role: gossip.RoleAgent, Version: "v1", Zone: "z2", Rack: "r9", RPCAddr: "10.0.0.3:7071"})
	for _, n := range []*gossip.Node{a1, a2} {
		if _, err := n.Join([]string{gw.Addr()}); err != nil {
			t.Fatal(err)
		}
	}
	if err := a1.SetCapacity(gossip.Capacity{MemoryTotalMB: 8192, MemoryFreeMB: 6144, CPUTotalMilli: 4000, CPUFreeMilli: 2500, Sandboxes: 5, Busy: 2, Idle: 3, Load: 0.375}); err != nil {
		t.Fatal(err)
	}
	a2.SetDraining(true)
	waitFor(t, "the gateway to see both agents' updates", func() bool {
		m1, ok1 := gw.Member("agent-1")
		m2, ok2 := gw.Member("agent-2")
		return ok1 && ok2 && m1.Capacity != nil && m2.Draining
	})

	h, err := New(Config{Tokens: &TokenStore{}, Members: gw})
	if err != nil {
		t.Fatal(err)
	}
	ctx := testCtx(t)
	members, err := h.ListMembers(ctx, connect.NewRequest(&skiffv1.ListMembersRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	wantMembers := []*skiffv1.Member{
		{Name: "agent-1", Role: "agent", Address: a1.Addr(), RpcAddress: "10.0.0.2:7071", State: "alive", Zone: "z1", Rack: "r1", Version: "v1"},
		{Name: "agent-2", Role: "agent", Address: a2.Addr(), RpcAddress: "10.0.0.3:7071", State: "alive", Zone: "z2", Rack: "r9", Version: "v1", Draining: true},
		{Name: "gw-1", Role: "gateway", Address: gw.Addr(), RpcAddress: "10.0.0.1:7070", State: "alive", Zone: "z1", Version: "v1"},
	}
	if d := cmp.Diff(wantMembers, members.Msg.GetMembers(), protocmp.Transform()); d != "" {
		t.Errorf("ListMembers (-want +got):\n%s", d)
	}

	hosts, err := h.ListHosts(ctx, connect.NewRequest(&skiffv1.ListHostsRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	wantHosts := []*skiffv1.Host{
		{Name: "agent-1", RpcAddress: "10.0.0.2:7071", State: "alive", Zone: "z1", Rack: "r1", Version: "v1", Reported: true,
			MemoryTotalMb: 8192, MemoryFreeMb: 6144, CpuTotalMilli: 4000, CpuFreeMilli: 2500, Sandboxes: 5, Busy: 2, Idle: 3, Load: 0.375},
		{Name: "agent-2", RpcAddress: "10.0.0.3:7071", State: "alive", Zone: "z2", Rack: "r9", Version: "v1", Draining: true},
	}
	if d := cmp.Diff(wantHosts, hosts.Msg.GetHosts(), protocmp.Transform()); d != "" {
		t.Errorf("ListHosts (-want +got):\n%s", d)
	}

	// A stopped agent is listed dead once gossip detects it.
	if err := a2.Shutdown(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "agent-2 to be declared dead", func() bool {
		m, _ := gw.Member("agent-2")
		return m.State == gossip.StateDead
	})
	hosts, _ = h.ListHosts(ctx, connect.NewRequest(&skiffv1.ListHostsRequest{}))
	if got := hosts.Msg.GetHosts()[1]; got.GetName() != "agent-2" || got.GetState() != "dead" {
		t.Errorf("after its shutdown agent-2 is %v, want dead", got)
	}

	noGossip, _ := New(Config{Tokens: &TokenStore{}})
	_, err = noGossip.ListMembers(ctx, connect.NewRequest(&skiffv1.ListMembersRequest{}))
	wantErr(t, "ListMembers without gossip", err, errs.KindFailedPrecondition, "no_membership")
	_, err = noGossip.ListHosts(ctx, connect.NewRequest(&skiffv1.ListHostsRequest{}))
	wantErr(t, "ListHosts without gossip", err, errs.KindFailedPrecondition, "no_membership")
}

// staticSandboxes is a SandboxSource with fixed answers.
type staticSandboxes struct {
	list        []*skiffv1.PlacedSandbox
	unreachable []string
}

func (s staticSandboxes) Sandboxes(context.Context) ([]*skiffv1.PlacedSandbox, []string, error) {
	return s.list, s.unreachable, nil
}

func placed(host, id, fn string) *skiffv1.PlacedSandbox {
	return &skiffv1.PlacedSandbox{Host: host, Sandbox: &skiffv1.SandboxInfo{Id: id, FunctionName: fn, ConfigKey: fn + "-k", State: "idle", MemoryMb: 128, Invocations: 3}}
}

func TestListSandboxes(t *testing.T) {
	src := staticSandboxes{
		list:        []*skiffv1.PlacedSandbox{placed("b", "s3", "hello"), placed("a", "s2", "resize"), placed("a", "s1", "hello"), placed("b", "s4", "resize")},
		unreachable: []string{"d", "c"},
	}
	h, err := New(Config{Tokens: &TokenStore{}, Sandboxes: src})
	if err != nil {
		t.Fatal(err)
	}
	ctx := testCtx(t)
	ids := func(r *skiffv1.ListSandboxesRequest) ([]string, []string) {
		t.Helper()
		resp, err := h.ListSandboxes(ctx, connect.NewRequest(r))
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, s := range resp.Msg.GetSandboxes() {
			out = append(out, s.GetHost()+"/"+s.GetSandbox().GetId())
		}
		return out, resp.Msg.GetUnreachableHosts()
	}
	tests := []struct {
		req             *skiffv1.ListSandboxesRequest
		want, wantUnrch []string
	}{
		{&skiffv1.ListSandboxesRequest{}, []string{"a/s1", "a/s2", "b/s3", "b/s4"}, []string{"c", "d"}},
		{&skiffv1.ListSandboxesRequest{FunctionName: "resize"}, []string{"a/s2", "b/s4"}, []string{"c", "d"}},
		{&skiffv1.ListSandboxesRequest{Host: "b"}, []string{"b/s3", "b/s4"}, nil},
		{&skiffv1.ListSandboxesRequest{Host: "c"}, nil, []string{"c"}},
	}
	for _, tt := range tests {
		got, unrch := ids(tt.req)
		if d := cmp.Diff(tt.want, got); d != "" {
			t.Errorf("%v: sandboxes (-want +got):\n%s", tt.req, d)
		}
		if d := cmp.Diff(tt.wantUnrch, unrch); d != "" {
			t.Errorf("%v: unreachable (-want +got):\n%s", tt.req, d)
		}
	}
	long := make([]byte, maxFilter+1)
	for i := range long {
		long[i] = 'a'
	}
	_, err = h.ListSandboxes(ctx, connect.NewRequest(&skiffv1.ListSandboxesRequest{FunctionName: string(long)}))
	wantErr(t, "long function filter", err, errs.KindInvalidArgument, "invalid_function_name")

	none, _ := New(Config{Tokens: &TokenStore{}})
	_, err = none.ListSandboxes(ctx, connect.NewRequest(&skiffv1.ListSandboxesRequest{}))
	wantErr(t, "no source", err, errs.KindFailedPrecondition, "no_sandbox_source")
}
