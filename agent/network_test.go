package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"regexp"
	"strconv"
	"testing"

	"connectrpc.com/connect"
	"github.com/google/nftables"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/testutil"
	"skiff.dev/skiff/netns/nettest"
)

// testSubnet is a random /24 in 10.232.0.0/13: test packages run at once
// on one host, each agent needs its own sandbox subnet.
func testSubnet() netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(232 + rand.IntN(8)), byte(rand.IntN(256)), 0}), 24)
}

// inetBlock is this package's stand-in internet (vmm/jail uses another).
var inetBlock = netip.MustParsePrefix("198.51.100.16/28")

var skiffLineRE = regexp.MustCompile(`(?m)^SKIFF RequestId: (\S+)\tNetwork Out: (\d+) bytes\tNetwork In: (\d+) bytes\tNetwork Drops: (\d+)$`)

// TestNetworkInvoke runs the real aws-lambda-go function in jails with
// network egress and none: it reaches a server only with egress, the
// bytes it sends are reported (response, log line, metrics) within 1%,
// a metadata drop is counted, and bad rules are refused.
func TestNetworkInvoke(t *testing.T) {
	testutil.RequirePrivileged(t)
	zip := testutil.FunctionZip(t, "testfn")
	sum := sha256.Sum256(zip)
	digest := hex.EncodeToString(sum[:])
	subnet := testSubnet()
	inet := nettest.New(t, inetBlock, subnet)
	reg := prometheus.NewRegistry()
	a, err := New(Config{DataDir: t.TempDir(), MemoryMB: 2048, Code: zipFetcher{digest: zip}, CgroupName: "skiff-nettest",
		NetworkSubnet: subnet, Registry: reg})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			_ = a.Close(context.Background())
		}
	})

	withNet := func(key, network string, allow, deny []string) *skiffv1.SandboxSpec {
		s := spec("net", key, digest)
		s.Network, s.NetworkAllow, s.NetworkDeny = network, allow, deny
		return s
	}
	type result struct {
		Reply, Error string
	}
	call := func(s *skiffv1.SandboxSpec, id, addr string, size int) (*skiffv1.AgentInvokeResponse, result) {
		t.Helper()
		payload := fmt.Sprintf(`{"action":"tcp","addr":%q,"size":%d}`, addr, size)
		resp, err := a.Invoke(context.Background(), connect.NewRequest(&skiffv1.AgentInvokeRequest{Spec: s, RequestId: id, Payload: []byte(payload), WantLog: true}))
		if err != nil {
			t.Fatalf("invoke %s: %v", id, err)
		}
		var r result
		if err := json.Unmarshal(resp.Msg.Payload, &r); err != nil {
			t.Fatalf("invoke %s: payload %s: %v", id, resp.Msg.Payload, err)
		}
		return resp.Msg, r
	}

	const size = 4 << 20
	server := inet.Addr(nettest.TCPPort)
	egress := withNet("egress", "egress", nil, nil)
	for i := range 2 { // cold, then warm
		id := "egress-" + strconv.Itoa(i)
		wire0 := inet.WireBytes(t)
		resp, r := call(egress, id, server, size)
		wire := inet.WireBytes(t) - wire0
		if want := fmt.Sprintf("got %d", size); r.Reply != want || r.Error != "" {
			t.Fatalf("%s: reply %q error %q, want %q", id, r.Reply, r.Error, want)
		}
		// Within 1% of what the link to the server carried (headers and
		// retransmissions included), and of the payload plus headers.
		if ratio := float64(resp.NetworkBytesOut) / float64(wire); ratio < 0.99 || ratio > 1.01 {
			t.Errorf("%s: network bytes out %d, the link carried %d: ratio %.4f, want within 1%%", id, resp.NetworkBytesOut, wire, ratio)
		}
		if ratio := float64(resp.NetworkBytesOut) / size; ratio < 1 || ratio > 1.05 {
			t.Errorf("%s: network bytes out %d for %d sent: ratio %.4f, want within [1, 1.05]", id, resp.NetworkBytesOut, size, ratio)
		}
		t.Logf("%s: sent %d, counted %d out (%.4f), wire %d; %d in", id, size, resp.NetworkBytesOut, float64(resp.NetworkBytesOut)/size, wire, resp.NetworkBytesIn)
		if resp.NetworkBytesIn == 0 {
			t.Errorf("%s: no bytes in", id)
		}
		m := skiffLineRE.FindStringSubmatch(resp.Log)
		if m == nil || m[1] != id || m[2] != strconv.FormatInt(resp.NetworkBytesOut, 10) || m[3] != strconv.FormatInt(resp.NetworkBytesIn, 10) {
			t.Errorf("%s: SKIFF line %q does not match the response (%d out, %d in); log:\n%s", id, m, resp.NetworkBytesOut, resp.NetworkBytesIn, resp.Log)
		}
		if i == 1 && resp.ColdStart {
			t.Errorf("%s: second invoke was a cold start", id)
		}
	}
	if got := counterValue(t, reg, "skiff_sandbox_network_bytes_total", "direction", "out"); got < 2*size {
		t.Errorf("skiff_sandbox_network_bytes_total{direction=out}: got %v, want at least %d", got, 2*size)
	}

	// The metadata service: dropped, counted.
	resp, r := call(egress, "metadata", nettest.Metadata.String()+":80", 5)
	if r.Error == "" {
		t.Errorf("metadata: reached (reply %q)", r.Reply)
	}
	if m := skiffLineRE.FindStringSubmatch(resp.Log); m == nil || m[4] == "0" {
		t.Errorf("metadata: SKIFF line %q, want drops; log:\n%s", m, resp.Log)
	}
	if got := counterValue(t, reg, "skiff_sandbox_network_drops_total", "reason", "metadata"); got < 1 {
		t.Errorf("skiff_sandbox_network_drops_total{reason=metadata}: got %v, want at least 1", got)
	}

	// Network none: nothing reachable, no network line, never the egress
	// sandbox.
	resp, r = call(withNet("none", "none", nil, nil), "none", server, 5)
	if r.Error == "" {
		t.Errorf("none: reached the server (reply %q)", r.Reply)
	}
	if resp.NetworkBytesOut != 0 || skiffLineRE.MatchString(resp.Log) {
		t.Errorf("none: bytes out %d, log:\n%s", resp.NetworkBytesOut, resp.Log)
	}
	for _, s := range a.mgr.Sandboxes() {
		if s.ID == resp.SandboxId && s.ConfigKey != "none" {
			t.Errorf("none ran on sandbox %s of config %s", s.ID, s.ConfigKey)
		}
	}

	// A deny rule is enforced.
	_, r = call(withNet("deny", "egress", nil, []string{inet.Server.String() + "/32"}), "deny", server, 5)
	if r.Error == "" {
		t.Errorf("deny: reached the server (reply %q)", r.Reply)
	}

	// Bad settings are refused.
	for _, s := range []*skiffv1.SandboxSpec{
		withNet("bad1", "egress", []string{"not-a-cidr"}, nil),
		withNet("bad2", "sometimes", nil, nil),
		withNet("bad3", "none", []string{"10.0.0.0/8"}, nil),
	} {
		_, err := a.Invoke(context.Background(), connect.NewRequest(&skiffv1.AgentInvokeRequest{Spec: s, RequestId: "bad", Payload: []byte("{}")}))
		if !errs.IsInvalid(err) {
			t.Errorf("network %q allow %v: got %v, want InvalidArgument", s.Network, s.NetworkAllow, err)
		}
	}
	closed = true
	checkNetworkGone(t, a)
}

// TestNetworkInvoke's end: Close leaves no links and no nftables table.
func checkNetworkGone(t *testing.T, a *Agent) {
	t.Helper()
	n := a.jail.Network()
	if err := a.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if links, err := n.Links(); err != nil || len(links) != 0 {
		t.Errorf("links after Close: %v (%v)", links, err)
	}
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.ListTableOfFamily(n.Table(), nftables.TableFamilyIPv4); err == nil {
		t.Errorf("nftables table %s left after Close", n.Table())
	}
}

// counterValue reads one labelled counter from reg.
func counterValue(t *testing.T, reg *prometheus.Registry, name, label, value string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if labelIs(m, label, value) {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

func labelIs(m *dto.Metric, name, value string) bool {
	for _, l := range m.GetLabel() {
		if l.GetName() == name && l.GetValue() == value {
			return true
		}
	}
	return false
}
