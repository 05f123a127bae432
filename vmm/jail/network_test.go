package jail_test

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"
	"github.com/google/go-cmp/cmp"
	"github.com/google/nftables"

	"skiff.dev/skiff/ebpf"
	"skiff.dev/skiff/internal/testutil"
	"skiff.dev/skiff/netns"
	"skiff.dev/skiff/netns/nettest"
	"skiff.dev/skiff/vmm/jail"
)

// inetBlock is this package's stand-in internet (the agent's tests use
// another block: test packages run at once).
var inetBlock = netip.MustParsePrefix("198.51.100.0/28")

// randomSubnet is a /24 in 10.216.0.0/13, with a tag to go with it.
func randomSubnet() (netip.Prefix, string) {
	p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(216 + rand.IntN(8)), byte(rand.IntN(256)), 0}), 24)
	return p, fmt.Sprintf("j%03x", rand.IntN(0x1000))
}

// newNetManager starts a Manager with networking on subnet, closed and
// reclaimed at the end of the test, and waits for its pool to fill.
func newNetManager(t testing.TB, poolSize int, net jail.NetConfig) (*jail.Manager, jail.Config) {
	t.Helper()
	testutil.RequirePrivileged(t)
	runDir, err := os.MkdirTemp("", "skiff-jail-net-")
	if err != nil {
		t.Fatal(err)
	}
	cfg := jail.Config{
		RunDir:     runDir,
		CgroupName: fmt.Sprintf("skiff-jailnet-%d-%d", os.Getpid(), time.Now().UnixNano()%1e6),
		PoolSize:   poolSize,
		Net:        &net,
	}
	m, err := jail.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Errorf("closing manager: %v", err)
		}
		removeCgroupParents(t, cfg.CgroupName)
		os.RemoveAll(runDir)
	})
	waitPool(t, m, poolSize)
	return m, cfg
}

// egress is a network spec with egress and the given allow and deny rules.
func egress(t testing.TB, allow, deny []string) *jail.NetSpec {
	t.Helper()
	p := ebpf.Policy{Egress: true}
	for _, list := range []struct {
		in  []string
		out *[]ebpf.Rule
	}{{allow, &p.Allow}, {deny, &p.Deny}} {
		for _, s := range list.in {
			r, err := ebpf.ParseRule(s)
			if err != nil {
				t.Fatal(err)
			}
			*list.out = append(*list.out, r)
		}
	}
	return &jail.NetSpec{Policy: p}
}

// runNet runs the probe's network checks in a sandbox with network n and
// returns each check's result and the sandbox's counters (nil without
// network).
func runNet(t testing.TB, m *jail.Manager, id string, n *jail.NetSpec, checks ...string) (map[string]string, *ebpf.Counters) {
	t.Helper()
	out, err := os.CreateTemp(t.TempDir(), "out")
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	s, err := m.Start(jail.Spec{
		ID: id, CodeDir: probe(t), Argv: append([]string{"/var/task/probe", "net"}, checks...),
		MemoryMB: 128, Stdout: out, Stderr: out, Network: n,
	})
	if err != nil {
		t.Fatalf("start %s: %v", id, err)
	}
	defer s.Close()
	waitDone(t, s)
	var c *ebpf.Counters
	if n != nil {
		got, err := s.NetCounters()
		if err != nil {
			t.Fatalf("counters of %s: %v", id, err)
		}
		c = &got
	}
	b, err := os.ReadFile(out.Name())
	if err != nil {
		t.Fatal(err)
	}
	res := map[string]string{}
	for line := range strings.Lines(string(b)) {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), ": "); ok {
			res[k] = v
		}
	}
	return res, c
}

// blocked says whether a check's result is a failure to reach.
func blocked(res string) bool { return !strings.HasPrefix(res, "ok") }

func TestNetworkPolicy(t *testing.T) {
	testutil.RequirePrivileged(t)
	subnet, tag := randomSubnet()
	inet := nettest.New(t, inetBlock, subnet)
	// A resolver on a host address: reachable on port 53 only.
	resolver := inet.Host
	dns := inet.ListenHostUDP(t, 53) == nil
	if !dns {
		t.Log("port 53 on the test link is taken: the resolver check is skipped")
		resolver = inet.Server
	}
	hostSvc := inet.ListenHost(t)
	for _, mode := range poolModes {
		t.Run(mode.name, func(t *testing.T) {
			m, _ := newNetManager(t, mode.size, jail.NetConfig{Tag: tag, Subnet: subnet, Resolver: resolver})
			testNetworkPolicy(t, m, inet, hostSvc, dns, resolver)
		})
	}
}

func testNetworkPolicy(t *testing.T, m *jail.Manager, inet *nettest.Inet, hostSvc netip.AddrPort, dns bool, resolver netip.Addr) {
	// B serves TCP and UDP echo. (Not even the host reaches it: the policy
	// drops B's replies to the host side of its veth, an address in the
	// sandbox subnet.)
	bOut, err := os.CreateTemp(t.TempDir(), "b")
	if err != nil {
		t.Fatal(err)
	}
	b, err := m.Start(jail.Spec{ID: "b", CodeDir: probe(t), Argv: []string{"/var/task/probe", "serve", "7000"},
		MemoryMB: 128, Stdout: bOut, Stderr: bOut, Network: egress(t, nil, nil)})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	bAddr := b.Veth().Block().Peer
	waitFor(t, "sandbox b to serve", func() bool {
		out, _ := os.ReadFile(bOut.Name())
		return strings.Contains(string(out), "listening")
	})

	hostLo, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hostLo.Close()
	nettest.ServeTCP(hostLo, func(c net.Conn) { c.Write([]byte("host loopback")) })

	checks := map[string]string{ // check → want ("" = blocked)
		"tcp=" + inet.Addr(nettest.TCPPort):             "ok got 5",
		"udp=" + inet.Addr(nettest.UDPPort):             "ok hello",
		"ping=" + inet.Server.String():                  "ok pong",
		"tcp=" + bAddr.String() + ":7000":               "",
		"udp=" + bAddr.String() + ":7000":               "",
		"ping=" + bAddr.String():                        "",
		"tcp=" + hostSvc.String():                       "",
		"ping=" + inet.Host.String():                    "",
		"tcp=" + hostLo.Addr().String():                 "",
		"tcp=" + nettest.Metadata.String() + ":80":      "",
		"ping=" + nettest.Metadata.String():             "",
		"tcp=" + b.Veth().Block().Host.String() + ":22": "",
		"ifaces": "ok lo,eth0",
	}
	if dns {
		checks["udp="+resolver.String()+":53"] = "ok hello"
	}
	var list []string
	for c := range checks {
		list = append(list, c)
	}
	res, counters := runNet(t, m, "a", egress(t, nil, nil), list...)
	for c, want := range checks {
		got := res[c]
		if want == "" && !blocked(got) || want != "" && got != want {
			t.Errorf("a: %s: got %q, want %s", c, got, orBlocked(want))
		}
	}
	for _, r := range []ebpf.Reason{ebpf.ReasonSandbox, ebpf.ReasonHost, ebpf.ReasonMetadata} {
		if counters.Drops[r] == 0 {
			t.Errorf("a: no drops counted for reason %s: %+v", r, counters)
		}
	}
	if counters.BytesOut == 0 || counters.BytesIn == 0 || counters.PacketsOut == 0 {
		t.Errorf("a: counters %+v: want traffic both ways", counters)
	}

	// The metadata address is routed: allowed, it answers (so the drop
	// above is the policy's).
	res, counters = runNet(t, m, "c", egress(t, []string{nettest.Metadata.String() + "/32:80"}, nil), "tcp="+nettest.Metadata.String()+":80")
	if got := res["tcp="+nettest.Metadata.String()+":80"]; got != "ok metadata" {
		t.Errorf("c (metadata allowed): got %q, want ok metadata", got)
	}
	if counters.Drops[ebpf.ReasonMetadata] != 0 {
		t.Errorf("c: metadata drops %d, want 0", counters.Drops[ebpf.ReasonMetadata])
	}

	// A deny rule closes one port of an otherwise reachable server.
	res, counters = runNet(t, m, "e", egress(t, nil, []string{inet.Server.String() + ":" + fmt.Sprint(nettest.UDPPort)}),
		"udp="+inet.Addr(nettest.UDPPort), "tcp="+inet.Addr(nettest.TCPPort))
	if got := res["udp="+inet.Addr(nettest.UDPPort)]; !blocked(got) {
		t.Errorf("e: denied udp: got %q, want blocked", got)
	}
	if got := res["tcp="+inet.Addr(nettest.TCPPort)]; got != "ok got 5" {
		t.Errorf("e: tcp: got %q, want ok got 5", got)
	}
	if counters.Drops[ebpf.ReasonDenied] == 0 {
		t.Errorf("e: no drops counted for reason denied: %+v", counters)
	}

	// Network none: loopback only.
	res, _ = runNet(t, m, "d", nil, "tcp="+inet.Addr(nettest.TCPPort), "udp="+inet.Addr(nettest.UDPPort), "ping="+inet.Server.String(), "ifaces")
	if d := cmp.Diff(map[string]string{"ifaces": "ok lo"}, filterOK(res)); d != "" {
		t.Errorf("d (none): reachable (-want +got):\n%s\nall: %v", d, res)
	}

	// The resolver is in /etc/resolv.conf.
	out, _ := runSh(t, m, jail.Spec{ID: "resolv", Network: egress(t, nil, nil)}, "cat /etc/resolv.conf")
	if !strings.Contains(out, "nameserver "+resolver.String()) {
		t.Errorf("resolv.conf: got %q, want nameserver %s", out, resolver)
	}
}

func orBlocked(want string) string {
	if want == "" {
		return "blocked"
	}
	return want
}

func filterOK(res map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range res {
		if !blocked(v) {
			out[k] = v
		}
	}
	return out
}

// TestNetworkCounters checks the byte counters against what a sandbox
// sent to a server: within 1% of what the kernel counted on the link to
// the server (headers and retransmissions included), and above the
// payload by no more than headers and an occasional retransmission (5%).
func TestNetworkCounters(t *testing.T) {
	testutil.RequirePrivileged(t)
	subnet, tag := randomSubnet()
	inet := nettest.New(t, inetBlock, subnet)
	m, _ := newNetManager(t, 1, jail.NetConfig{Tag: tag, Subnet: subnet})
	for _, size := range []int{1 << 20, 8 << 20} {
		check := fmt.Sprintf("tcp=%s/%d", inet.Addr(nettest.TCPPort), size)
		wire0 := inet.WireBytes(t)
		res, c := runNet(t, m, fmt.Sprintf("count-%d", size), egress(t, nil, nil), check)
		wire := inet.WireBytes(t) - wire0
		if got, want := res[check], fmt.Sprintf("ok got %d", size); got != want {
			t.Fatalf("%s: got %q, want %q", check, got, want)
		}
		if got := <-inet.Received; got != int64(size) {
			t.Errorf("server received %d bytes, want %d", got, size)
		}
		ratio, wireRatio := float64(c.BytesOut)/float64(size), float64(c.BytesOut)/float64(wire)
		t.Logf("sent %d bytes: counted out %d (%.4f of the payload, %.4f of the wire's %d), in %d, packets out %d in %d",
			size, c.BytesOut, ratio, wireRatio, wire, c.BytesIn, c.PacketsOut, c.PacketsIn)
		if wireRatio < 0.99 || wireRatio > 1.01 {
			t.Errorf("counted %d bytes out, the link to the server carried %d: ratio %.4f, want within 1%%", c.BytesOut, wire, wireRatio)
		}
		if ratio < 1 || ratio > 1.05 {
			t.Errorf("sent %d bytes, counted %d out: ratio %.4f, want within [1, 1.05]", size, c.BytesOut, ratio)
		}
		if c.BytesIn == 0 || c.BytesIn > uint64(size)/20 {
			t.Errorf("counted %d bytes in for acks and a short reply to %d bytes sent", c.BytesIn, size)
		}
	}
}

// tcxLinks lists the ifindexes of the TCX links attached in the kernel.
func tcxLinks(t testing.TB) map[uint32]int {
	t.Helper()
	out := map[uint32]int{}
	var it link.Iterator
	defer it.Close()
	for it.Next() {
		info, err := it.Link.Info()
		if err != nil || info.Type != link.TCXType {
			continue
		}
		if tcx := info.TCX(); tcx != nil {
			out[tcx.Ifindex]++
		}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// nftRules counts the rules of an nftables table (-1: no table).
func nftRules(t testing.TB, table string) int {
	t.Helper()
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	tb, err := c.ListTableOfFamily(table, nftables.TableFamilyIPv4)
	if err != nil {
		return -1
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyIPv4)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, ch := range chains {
		if ch.Table.Name != tb.Name {
			continue
		}
		rules, err := c.GetRules(tb, ch)
		if err != nil {
			t.Fatal(err)
		}
		n += len(rules)
	}
	return n
}

// TestNetworkChurn creates and destroys 500 sandboxes with egress: no
// links, namespaces, eBPF links or rules are left, and every address
// block is reused.
func TestNetworkChurn(t *testing.T) {
	testutil.RequirePrivileged(t)
	subnet, tag := randomSubnet()
	// A /24 holds 64 blocks: 500 sandboxes reuse each one several times.
	m, cfg := newNetManager(t, jail.DefaultPoolSize, jail.NetConfig{Tag: tag, Subnet: subnet})
	n := m.Network()
	rules := nftRules(t, n.Table())
	if rules <= 0 {
		t.Fatalf("nftables table %s: %d rules", n.Table(), rules)
	}
	_, nsBefore := fdCounts(t)
	ifindexes := map[uint32]bool{}
	const total = 500
	t0 := time.Now()
	for i := range total {
		s, err := m.Start(jail.Spec{ID: fmt.Sprintf("churn-%d", i), CodeDir: probe(t), Argv: []string{"/var/task/probe", "net", "ifaces"},
			MemoryMB: 64, Network: egress(t, nil, nil)})
		if err != nil {
			t.Fatalf("start %d: %v", i, err)
		}
		ifindexes[uint32(s.Veth().HostIndex())] = true
		if err := s.Close(); err != nil {
			t.Fatalf("close %d: %v", i, err)
		}
	}
	t.Logf("%d sandboxes started and closed in %v; %d pool hits", total, time.Since(t0), m.Stats().PoolHits)
	if !n.WaitReleased(30 * time.Second) {
		t.Fatal("veths of closed sandboxes not released within 30 s")
	}
	// Pre-started inits hold a veth each; the pool may still be refilling
	// (a veth exists before its init counts as idle), so wait for it to
	// settle before comparing.
	var links []string
	var idle int
	settled := func() bool {
		var err error
		if links, err = n.Links(); err != nil {
			t.Fatal(err)
		}
		idle = m.Stats().PoolIdleNet
		return len(links) == idle
	}
	deadline := time.Now().Add(20 * time.Second)
	for !settled() && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if len(links) != idle {
		t.Errorf("links left: got %d (%v), want %d (the pool's)", len(links), links, idle)
	}
	for ifx, c := range tcxLinks(t) {
		if ifindexes[ifx] {
			t.Errorf("%d tcx links left on interface %d of a closed sandbox", c, ifx)
		}
	}
	if got := nftRules(t, n.Table()); got != rules {
		t.Errorf("nftables rules: got %d, want %d", got, rules)
	}
	waitFor(t, "netns descriptors to be back", func() bool { _, ns := fdCounts(t); return ns <= nsBefore })

	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if links, _ := n.Links(); len(links) != 0 {
		t.Errorf("links after Close: %v", links)
	}
	if got := nftRules(t, n.Table()); got != -1 {
		t.Errorf("nftables table %s after Close: %d rules, want none", n.Table(), got)
	}
	_ = cfg
}

const netCrashEnv = "SKIFF_JAIL_NET_CRASH_HELPER"

// TestNetCrashHelper is the agent of TestNetworkCrashReclaim, run in a
// child process: it starts sandboxes with egress, prints their links and
// waits to be killed.
func TestNetCrashHelper(t *testing.T) {
	env := os.Getenv(netCrashEnv)
	if env == "" {
		t.Skip("helper process of TestNetworkCrashReclaim")
	}
	f := strings.Split(env, ",")
	m, err := jail.New(jail.Config{RunDir: f[0], CgroupName: f[1], PoolSize: 2,
		Net: &jail.NetConfig{Tag: f[2], Subnet: netip.MustParsePrefix(f[3])}})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if _, err := m.Start(jail.Spec{ID: fmt.Sprintf("crash-%d", i), CodeDir: t.TempDir(), Argv: []string{"/bin/sleep", "600"},
			MemoryMB: 64, Network: egress(t, nil, nil)}); err != nil {
			t.Fatal(err)
		}
	}
	waitPool(t, m, 2)
	links, _ := m.Network().Links()
	fmt.Printf("links %s\n", strings.Join(links, " "))
	select {}
}

// TestNetworkCrashReclaim kills (-9) an agent with sandboxes with egress
// and a pool of inits with veths: the next run reclaims its links, rules
// and cgroups, and its own Close leaves nothing.
func TestNetworkCrashReclaim(t *testing.T) {
	testutil.RequirePrivileged(t)
	runDir, err := os.MkdirTemp("", "skiff-jail-netcrash-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(runDir)
	cgName := fmt.Sprintf("skiff-jailnetcrash-%d", os.Getpid())
	defer removeCgroupParents(t, cgName)
	subnet, tag := randomSubnet()

	cmd := exec.Command(os.Args[0], "-test.run=^TestNetCrashHelper$")
	cmd.Env = append(os.Environ(), netCrashEnv+"="+strings.Join([]string{runDir, cgName, tag, subnet.String()}, ","))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	line := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if rest, ok := strings.CutPrefix(sc.Text(), "links "); ok {
				line <- rest
			}
		}
		close(line)
	}()
	var links []string
	select {
	case l, ok := <-line:
		if !ok {
			t.Fatal("helper exited without reporting its links")
		}
		links = strings.Fields(l)
	case <-time.After(60 * time.Second):
		t.Fatal("helper did not report its links")
	}
	if len(links) != 5 {
		t.Fatalf("helper's links: got %v, want 3 sandboxes' and 2 pre-started inits'", links)
	}
	if err := cmd.Process.Kill(); err != nil { // SIGKILL
		t.Fatal(err)
	}
	cmd.Wait()
	table := netns.TablePrefix + tag
	if got := nftRules(t, table); got <= 0 {
		t.Fatalf("the crashed run's nftables table: %d rules, want its rules left behind", got)
	}

	m, err := jail.New(jail.Config{RunDir: runDir, CgroupName: cgName, Net: &jail.NetConfig{Tag: tag, Subnet: subnet}})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Reclaim(); err != nil {
		t.Fatal(err)
	}
	n := m.Network()
	waitFor(t, "the crashed run's links to go", func() bool { l, _ := n.Links(); return len(l) == 0 })
	for _, p := range cgroupParents(t, cgName) {
		entries, _ := os.ReadDir(p)
		for _, e := range entries {
			if e.IsDir() {
				t.Errorf("cgroup %s/%s left after Reclaim", p, e.Name())
			}
		}
	}
	// The manager works, then leaves nothing.
	if s, err := m.Start(jail.Spec{ID: "after", CodeDir: t.TempDir(), Argv: []string{"/bin/true"}, MemoryMB: 64, Network: egress(t, nil, nil)}); err != nil {
		t.Errorf("start after reclaim: %v", err)
	} else {
		s.Close()
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if l, _ := n.Links(); len(l) != 0 {
		t.Errorf("links after Close: %v", l)
	}
	if got := nftRules(t, table); got != -1 {
		t.Errorf("nftables table after Close: %d rules, want none", got)
	}
}

// BenchmarkStartNetwork compares cold starts (Start, and Start→process
// running) with network none and egress, a pre-started init ready for
// each (as BenchmarkStart's "pool"). egress-rules has allow/deny rules of
// its own: Start replaces the default policy the init was given, paying
// the kernel's TCX detach and attach (RCU grace periods).
func BenchmarkStartNetwork(b *testing.B) {
	subnet, tag := randomSubnet()
	m, cfg := newNetManager(b, jail.DefaultPoolSize, jail.NetConfig{Tag: tag, Subnet: subnet})
	code := probe(b)
	for _, bc := range []struct {
		name string
		net  *jail.NetSpec
	}{{"none", nil}, {"egress", egress(b, nil, nil)}, {"egress-rules", egress(b, []string{"10.1.0.0/16:443"}, nil)}} {
		b.Run(bc.name, func(b *testing.B) {
			// Warm the pool's mix for this kind.
			for i := range 2 * jail.DefaultPoolSize {
				s, _, _ := startNet(b, m, code, fmt.Sprintf("warm-%s-%d", bc.name, i), bc.net)
				s.Close()
			}
			var starts, readies []time.Duration
			i := 0
			for b.Loop() {
				b.StopTimer()
				waitPool(b, m, cfg.PoolSize)
				b.StartTimer()
				s, st, ready := startNet(b, m, code, fmt.Sprintf("bench-%s-%d", bc.name, i), bc.net)
				b.StopTimer()
				s.Close()
				b.StartTimer()
				starts, readies = append(starts, st), append(readies, ready)
				i++
			}
			b.ReportMetric(float64(percentile(starts, .5).Microseconds())/1000, "start-p50-ms")
			b.ReportMetric(float64(percentile(starts, .99).Microseconds())/1000, "start-p99-ms")
			b.ReportMetric(float64(percentile(readies, .5).Microseconds())/1000, "running-p50-ms")
			b.ReportMetric(float64(percentile(readies, .99).Microseconds())/1000, "running-p99-ms")
		})
	}
}

func startNet(t testing.TB, m *jail.Manager, code, id string, n *jail.NetSpec) (*jail.Sandbox, time.Duration, time.Duration) {
	t0 := time.Now()
	s, err := m.Start(jail.Spec{
		ID: id, CodeDir: code, Argv: []string{"/var/task/probe", "connect", "127.0.0.1:9001"},
		MemoryMB: 128, ListenAddr: "127.0.0.1:9001", Network: n,
	})
	if err != nil {
		t.Fatal(err)
	}
	started := time.Since(t0)
	c, err := s.Listener().Accept()
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	return s, started, time.Since(t0)
}

// TestNetworkPoolMix checks that pre-started inits come with veths (and
// the default policy) while Starts want egress, and that the mix follows
// Starts without network, never holding more inits than the pool's size.
func TestNetworkPoolMix(t *testing.T) {
	subnet, tag := randomSubnet()
	const size = 2
	m, _ := newNetManager(t, size, jail.NetConfig{Tag: tag, Subnet: subnet})
	if st := m.Stats(); st.PoolIdle != size || st.PoolIdleNet != size {
		t.Fatalf("full pool: %+v, want %d inits with veths", st, size)
	}
	start := func(id string, n *jail.NetSpec) {
		t.Helper()
		s, err := m.Start(jail.Spec{ID: id, CodeDir: t.TempDir(), Argv: []string{"/bin/true"}, MemoryMB: 64, Network: n})
		if err != nil {
			t.Fatal(err)
		}
		if (s.Veth() != nil) != (n != nil) {
			t.Errorf("%s: veth %v with network %v", id, s.Veth(), n)
		}
		s.Close()
		if st := m.Stats(); st.PoolIdle > size {
			t.Errorf("after %s: %d idle inits, more than the pool's %d", id, st.PoolIdle, size)
		}
	}
	hits := m.Stats().PoolHits
	start("egress-1", egress(t, nil, nil))
	if st := m.Stats(); st.PoolHits != hits+1 {
		t.Errorf("egress start: stats %+v, want a pool hit", st)
	}
	// Network none cannot use an init with a veth: a miss, and the pool
	// moves towards inits without.
	for i := range size {
		start(fmt.Sprintf("none-%d", i), nil)
	}
	waitFor(t, "the pool to hold inits without veths", func() bool { st := m.Stats(); return st.PoolIdle == size && st.PoolIdleNet == 0 })
	hits = m.Stats().PoolHits
	start("none-hit", nil)
	if st := m.Stats(); st.PoolHits != hits+1 {
		t.Errorf("none start with plain inits: stats %+v, want a pool hit", st)
	}
	// Egress takes a plain init and adds the veth itself; a custom policy
	// replaces the default one.
	start("egress-2", egress(t, nil, []string{"192.0.2.0/24"}))
	waitPool(t, m, size)
}
