//go:build linux && (386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64)

package ebpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"runtime"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/testutil"
)

// Program return codes as BPF_PROG_TEST_RUN reports them.
const (
	verdictPass = uint32(0xffffffff) // TC_ACT_UNSPEC / TCX_NEXT
	verdictDrop = uint32(2)          // TC_ACT_SHOT / TCX_DROP
)

// pkt describes a test packet.
type pkt struct {
	ethType  uint16 // default IPv4
	proto    uint8  // IPPROTO_*; default TCP
	dst      string
	dport    uint16
	fragOff  uint16 // IPv4 fragment offset in 8-byte units
	moreFrag bool
	payload  int
	ihl      uint8 // default 5
	truncate int   // bytes to keep after the Ethernet header, when > 0
}

// bytes builds Ethernet + IPv4 + TCP/UDP/ICMP headers + payload.
func (p pkt) bytes() []byte {
	eth := make([]byte, 14)
	copy(eth[0:6], []byte{0x02, 0, 0, 0, 0, 1})
	copy(eth[6:12], []byte{0x02, 0, 0, 0, 0, 2})
	et := p.ethType
	if et == 0 {
		et = unix.ETH_P_IP
	}
	binary.BigEndian.PutUint16(eth[12:], et)
	switch et {
	case unix.ETH_P_ARP:
		arp := make([]byte, 28)
		binary.BigEndian.PutUint16(arp[0:], 1)      // ethernet
		binary.BigEndian.PutUint16(arp[2:], 0x0800) // ipv4
		arp[4], arp[5] = 6, 4
		binary.BigEndian.PutUint16(arp[6:], 1) // request
		return append(eth, arp...)
	case unix.ETH_P_IPV6:
		ip6 := make([]byte, 40+8)
		ip6[0] = 0x60
		binary.BigEndian.PutUint16(ip6[4:], 8)
		ip6[6] = unix.IPPROTO_UDP
		ip6[7] = 64
		return append(eth, ip6...)
	}
	proto := p.proto
	if proto == 0 {
		proto = unix.IPPROTO_TCP
	}
	var l4 []byte
	switch proto {
	case unix.IPPROTO_TCP:
		l4 = make([]byte, 20)
		l4[12] = 5 << 4
	case unix.IPPROTO_UDP:
		l4 = make([]byte, 8)
	case unix.IPPROTO_ICMP:
		l4 = make([]byte, 8)
		l4[0] = 8 // echo request
	}
	if proto == unix.IPPROTO_TCP || proto == unix.IPPROTO_UDP {
		binary.BigEndian.PutUint16(l4[0:], 40000)
		binary.BigEndian.PutUint16(l4[2:], p.dport)
	}
	if p.fragOff != 0 {
		l4 = nil // a non-first fragment carries payload only
	}
	l4 = append(l4, make([]byte, p.payload)...)
	ihl := p.ihl
	if ihl == 0 {
		ihl = 5
	}
	ip := make([]byte, max(20, int(ihl)*4))
	ip[0] = 4<<4 | ihl
	binary.BigEndian.PutUint16(ip[2:], uint16(len(ip)+len(l4)))
	frag := p.fragOff
	if p.moreFrag {
		frag |= 0x2000
	}
	binary.BigEndian.PutUint16(ip[6:], frag)
	ip[8] = 64
	ip[9] = proto
	src := netip.MustParseAddr("10.200.7.2").As4()
	copy(ip[12:16], src[:])
	dst := netip.MustParseAddr(p.dst).As4()
	copy(ip[16:20], dst[:])
	out := append(append(eth, ip...), l4...)
	if p.truncate > 0 {
		out = out[:14+p.truncate]
	}
	return out
}

// skbContext is the prefix of struct __sk_buff that BPF_PROG_TEST_RUN lets
// a caller set, up to ifindex.
type skbContext struct {
	Len, PktType, Mark, QueueMapping, Protocol, VlanPresent, VlanTCI, VlanProto, Priority, IngressIfindex, Ifindex uint32
}

// runProg runs prog on data as if it arrived on ifindex (1: loopback,
// which exists in every network namespace) and returns its verdict.
func runProg(t testing.TB, prog *ebpf.Program, ifindex int, data []byte) uint32 {
	t.Helper()
	ret, err := runProgErr(prog, ifindex, data)
	if err != nil {
		t.Fatal(err)
	}
	return ret
}

func runProgErr(prog *ebpf.Program, ifindex int, data []byte) (uint32, error) {
	ret, err := prog.Run(&ebpf.RunOptions{Data: data, Context: skbContext{Ifindex: uint32(ifindex)}})
	if err != nil {
		return 0, fmt.Errorf("BPF_PROG_TEST_RUN: %w", err)
	}
	return ret, nil
}

// storePolicy writes p for ifindex into m's maps without attaching
// anything: the test-run tests drive the programs directly.
func storePolicy(t testing.TB, m *Manager, ifindex int, p Policy) *Attachment {
	t.Helper()
	a, err := storePolicyErr(m, ifindex, p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

func storePolicyErr(m *Manager, ifindex int, p Policy) (*Attachment, error) {
	entries, err := buildEntries(p)
	if err != nil {
		return nil, err
	}
	a := &Attachment{m: m, ifindex: ifindex}
	m.mu.Lock()
	m.atts[ifindex] = a
	m.mu.Unlock()
	a.mu.Lock()
	err = a.storeMapsLocked(p.Egress, entries)
	a.mu.Unlock()
	if err != nil {
		return nil, errors.Join(err, a.Close())
	}
	return a, nil
}

func newManager(t testing.TB) *Manager {
	t.Helper()
	m, err := New(slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Errorf("Manager.Close: %v", err)
		}
	})
	return m
}

func mustRules(t testing.TB, ss ...string) []Rule {
	t.Helper()
	var out []Rule
	for _, s := range ss {
		r, err := ParseRule(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

var testGlobal = Global{
	SandboxSubnet: netip.MustParsePrefix("10.200.0.0/16"),
	HostAddrs:     []netip.Addr{netip.MustParseAddr("10.200.0.1"), netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("2001:db8::1")},
	HostServices:  []netip.AddrPort{netip.MustParseAddrPort("10.200.0.1:53")},
}

type progCase struct {
	name string
	pkt  pkt
	want Reason // 0: pass
}

func TestProgramPolicy(t *testing.T) {
	testutil.RequirePrivileged(t)
	m := newManager(t)
	if err := m.SetGlobal(testGlobal); err != nil {
		t.Fatal(err)
	}
	const tcp, udp, icmp = unix.IPPROTO_TCP, unix.IPPROTO_UDP, unix.IPPROTO_ICMP

	rich := Policy{
		Egress: true,
		Allow: mustRules(t,
			"10.200.5.0/24:8080",   // opens part of the sandbox subnet: at least as specific as it
			"10.0.0.0/8:9000-9100", // broad: opens private 10/8 but not other sandboxes
			"192.168.1.0/24:5432",
			"172.16.0.0/12",
			"169.254.10.10:80",
			"198.51.100.1/32:8443", // one host address, exactly
			"0.0.0.0/0:7000",       // too broad to open sandboxes or host addresses
		),
		Deny: mustRules(t, "1.1.1.1", "8.8.8.0/24:53", "8.8.0.0/16:1000-2000"),
	}
	groups := []struct {
		name   string
		policy *Policy // nil: no policy stored at all
		cases  []progCase
	}{
		{name: "rich", policy: &rich, cases: []progCase{
			{"public tcp", pkt{dst: "1.0.0.1", dport: 443, payload: 100}, 0},
			{"public udp", pkt{proto: udp, dst: "1.0.0.1", dport: 53}, 0},
			{"public icmp", pkt{proto: icmp, dst: "1.0.0.1"}, 0},
			{"arp", pkt{ethType: unix.ETH_P_ARP}, 0},
			{"ipv6", pkt{ethType: unix.ETH_P_IPV6}, ReasonNotAllowed},
			{"other ethertype", pkt{ethType: 0x88cc, dst: "1.0.0.1"}, ReasonNotAllowed},
			{"deny all ports tcp", pkt{dst: "1.1.1.1", dport: 443}, ReasonDenied},
			{"deny all ports icmp", pkt{proto: icmp, dst: "1.1.1.1"}, ReasonDenied},
			{"deny port udp", pkt{proto: udp, dst: "8.8.8.8", dport: 53}, ReasonDenied},
			{"deny port other port", pkt{proto: udp, dst: "8.8.8.8", dport: 54}, 0},
			{"deny port not icmp", pkt{proto: icmp, dst: "8.8.8.8"}, 0},
			{"deny covering range inherited", pkt{dst: "8.8.8.8", dport: 1500}, ReasonDenied},
			{"deny range", pkt{dst: "8.8.9.9", dport: 1000}, ReasonDenied},
			{"deny range end", pkt{dst: "8.8.9.9", dport: 2000}, ReasonDenied},
			{"deny range past end", pkt{dst: "8.8.9.9", dport: 2001}, 0},
			{"deny first fragment", pkt{proto: udp, dst: "8.8.8.8", dport: 53, moreFrag: true}, ReasonDenied},
			{"deny port rule skips later fragment", pkt{proto: udp, dst: "8.8.8.8", fragOff: 100}, 0},
			{"other sandbox", pkt{dst: "10.200.3.4", dport: 80}, ReasonSandbox},
			{"other sandbox udp", pkt{proto: udp, dst: "10.200.3.4", dport: 53}, ReasonSandbox},
			{"other sandbox icmp", pkt{proto: icmp, dst: "10.200.3.4"}, ReasonSandbox},
			{"other sandbox allowed exactly", pkt{dst: "10.200.5.7", dport: 8080}, 0},
			{"other sandbox allowed wrong port", pkt{dst: "10.200.5.7", dport: 8081}, ReasonSandbox},
			{"other sandbox port rule not icmp", pkt{proto: icmp, dst: "10.200.5.7"}, ReasonSandbox},
			{"other sandbox broad allow ignored", pkt{dst: "10.200.3.4", dport: 9050}, ReasonSandbox},
			{"other sandbox 0/0 allow ignored", pkt{dst: "10.200.3.4", dport: 7000}, ReasonSandbox},
			{"host address", pkt{dst: "10.200.0.1", dport: 22}, ReasonHost},
			{"host address icmp", pkt{proto: icmp, dst: "10.200.0.1"}, ReasonHost},
			{"host service udp", pkt{proto: udp, dst: "10.200.0.1", dport: 53}, 0},
			{"host service tcp", pkt{dst: "10.200.0.1", dport: 53}, 0},
			{"host service later fragment", pkt{proto: udp, dst: "10.200.0.1", fragOff: 10}, ReasonHost},
			{"public host address", pkt{dst: "198.51.100.1", dport: 443}, ReasonHost},
			{"public host address allowed /32", pkt{dst: "198.51.100.1", dport: 8443}, 0},
			{"host address 0/0 allow ignored", pkt{dst: "10.200.0.1", dport: 7000}, ReasonHost},
			{"metadata", pkt{dst: "169.254.169.254", dport: 80}, ReasonMetadata},
			{"metadata udp", pkt{proto: udp, dst: "169.254.169.254", dport: 80}, ReasonMetadata},
			{"metadata allowed", pkt{dst: "169.254.10.10", dport: 80}, 0},
			{"metadata allowed wrong port", pkt{dst: "169.254.10.10", dport: 81}, ReasonMetadata},
			{"metadata via 0/0 allow", pkt{dst: "169.254.169.254", dport: 7000}, 0},
			{"private allowed port", pkt{dst: "192.168.1.5", dport: 5432}, 0},
			{"private allowed wrong port", pkt{dst: "192.168.1.5", dport: 5433}, ReasonPrivate},
			{"private allowed other net", pkt{dst: "192.168.2.5", dport: 5432}, ReasonPrivate},
			{"private allowed all ports", pkt{dst: "172.20.0.1", dport: 1}, 0},
			{"private allowed all ports icmp", pkt{proto: icmp, dst: "172.20.0.1"}, 0},
			{"private broad allow", pkt{dst: "10.1.2.3", dport: 9050}, 0},
			{"private broad allow wrong port", pkt{dst: "10.1.2.3", dport: 8999}, ReasonPrivate},
			{"private port rule skips later fragment", pkt{dst: "10.1.2.3", fragOff: 100}, ReasonPrivate},
			{"public later fragment", pkt{dst: "1.0.0.1", fragOff: 100, payload: 64}, 0},
			{"ip options", pkt{dst: "1.0.0.1", dport: 443, ihl: 8}, 0},
			{"ip options deny port", pkt{proto: udp, dst: "8.8.8.8", dport: 53, ihl: 15}, ReasonDenied},
			{"bad ihl", pkt{dst: "1.0.0.1", dport: 443, ihl: 3}, ReasonMalformed},
			{"ip options past the end", pkt{dst: "1.0.0.1", dport: 443, ihl: 15, truncate: 20}, ReasonMalformed},
			{"truncated tcp header", pkt{dst: "1.0.0.1", dport: 443, truncate: 21}, ReasonMalformed},
		}},
		{name: "no rules", policy: &Policy{Egress: true}, cases: privateCases()},
		{name: "egress off", policy: &Policy{Egress: false, Allow: mustRules(t, "0.0.0.0/0")}, cases: []progCase{
			{"public", pkt{dst: "1.0.0.1", dport: 443}, ReasonNotAllowed},
			{"arp", pkt{ethType: unix.ETH_P_ARP}, ReasonNotAllowed},
		}},
		{name: "no policy", cases: []progCase{
			{"public", pkt{dst: "1.0.0.1", dport: 443}, ReasonNotAllowed},
		}},
	}
	for _, g := range groups {
		t.Run(g.name, func(t *testing.T) {
			if g.policy == nil {
				for _, c := range g.cases {
					if got := runProg(t, m.objs.SandboxIngress, 1, c.pkt.bytes()); got != verdictDrop {
						t.Errorf("%s: verdict %#x, want drop %#x", c.name, got, verdictDrop)
					}
				}
				return
			}
			a := storePolicy(t, m, 1, *g.policy)
			defer a.Close()
			want := Counters{Drops: map[Reason]uint64{}}
			for _, c := range g.cases {
				data := c.pkt.bytes()
				got, err := runProgErr(m.objs.SandboxIngress, 1, data)
				if err != nil {
					t.Fatalf("%s: %v", c.name, err)
				}
				if c.want == 0 {
					want.BytesOut += uint64(len(data) - 14)
					want.PacketsOut++
					if got != verdictPass {
						t.Errorf("%s: verdict %#x, want pass %#x", c.name, got, verdictPass)
					}
				} else {
					want.Drops[c.want]++
					if got != verdictDrop {
						t.Errorf("%s: verdict %#x, want drop %#x (%v)", c.name, got, verdictDrop, c.want)
					}
				}
				// Counters pin the reason of each drop.
				cnt, err := a.Counters()
				if err != nil {
					t.Fatal(err)
				}
				if diff := cmp.Diff(want, cnt); diff != "" {
					t.Fatalf("%s: counters (-want +got):\n%s", c.name, diff)
				}
			}
			// The egress program counts packets to the sandbox and passes them.
			data := pkt{dst: "10.200.7.2", dport: 40000, payload: 1000}.bytes()
			for range 3 {
				if got := runProg(t, m.objs.SandboxEgress, 1, data); got != verdictPass {
					t.Errorf("egress program verdict %#x, want pass %#x", got, verdictPass)
				}
			}
			want.BytesIn, want.PacketsIn = 3*uint64(len(data)-14), 3
			cnt, err := a.Counters()
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(want, cnt); diff != "" {
				t.Errorf("counters after egress (-want +got):\n%s", diff)
			}
		})
	}
}

// privateCases: every special range drops (with its reason) when no rule
// allows it; the documentation ranges tests use as the internet pass.
func privateCases() []progCase {
	var cs []progCase
	for _, s := range specialRanges {
		p := netip.MustParsePrefix(s.prefix)
		dst := p.Addr().Next()
		if p.Contains(netip.MustParseAddr("10.200.0.1")) {
			dst = netip.MustParseAddr("10.3.2.1") // outside the sandbox subnet
		}
		cs = append(cs, progCase{"special " + s.prefix, pkt{dst: dst.String(), dport: 80}, s.reason})
	}
	for _, d := range []string{"192.0.2.1", "198.51.100.7", "203.0.113.10", "100.128.0.1", "172.32.0.1", "11.0.0.1", "223.255.255.254"} {
		cs = append(cs, progCase{"public " + d, pkt{dst: d, dport: 80}, 0})
	}
	return append(cs, progCase{"broadcast", pkt{proto: unix.IPPROTO_UDP, dst: "255.255.255.255", dport: 67}, ReasonPrivate})
}

// TestProgramKeysByIfindex: policies and counters of two interfaces are
// independent. Runs in a throwaway network namespace holding a dummy link,
// so BPF_PROG_TEST_RUN can run the program as if on that link.
func TestProgramKeysByIfindex(t *testing.T) {
	testutil.RequirePrivileged(t)
	m := newManager(t)
	if err := m.SetGlobal(testGlobal); err != nil {
		t.Fatal(err)
	}
	loRules, dummyRules := mustRules(t, "1.0.0.0/8"), mustRules(t, "10.0.0.0/8")
	errc := make(chan error, 1)
	go func() {
		// The thread never leaves the new namespace; Go discards it when
		// this goroutine ends locked.
		runtime.LockOSThread()
		errc <- func() error {
			if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
				return fmt.Errorf("unshare: %w", err)
			}
			h, err := netlink.NewHandle()
			if err != nil {
				return err
			}
			defer h.Close()
			// A veth, not a dummy: CI kernels may lack the dummy driver.
			if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "dummy0"}, PeerName: "dummy1"}); err != nil {
				return fmt.Errorf("adding veth: %w", err)
			}
			l, err := h.LinkByName("dummy0")
			if err != nil {
				return err
			}
			dummy := l.Attrs().Index
			if dummy == 1 {
				return fmt.Errorf("dummy got ifindex 1")
			}
			lo, err := storePolicyErr(m, 1, Policy{Egress: true, Deny: loRules})
			if err != nil {
				return err
			}
			defer lo.Close()
			du, err := storePolicyErr(m, dummy, Policy{Egress: true, Allow: dummyRules})
			if err != nil {
				return err
			}
			defer du.Close()
			run := func(ifindex int, dst string) (uint32, error) {
				return runProgErr(m.objs.SandboxIngress, ifindex, pkt{dst: dst, dport: 80}.bytes())
			}
			for _, c := range []struct {
				ifindex int
				dst     string
				want    uint32
			}{
				{1, "1.0.0.1", verdictDrop},
				{dummy, "1.0.0.1", verdictPass},
				{1, "10.1.1.1", verdictDrop},
				{dummy, "10.1.1.1", verdictPass},
			} {
				if got, err := run(c.ifindex, c.dst); err != nil || got != c.want {
					return fmt.Errorf("ifindex %d to %s: verdict %#x (%v), want %#x", c.ifindex, c.dst, got, err, c.want)
				}
			}
			cl, err := lo.Counters()
			if err != nil {
				return err
			}
			cd, err := du.Counters()
			if err != nil {
				return err
			}
			if cl.PacketsOut != 0 || cl.Drops[ReasonDenied] != 1 || cl.Drops[ReasonPrivate] != 1 {
				return fmt.Errorf("loopback counters %+v, want 0 out, 1 denied, 1 private", cl)
			}
			if cd.PacketsOut != 2 || len(cd.Drops) != 0 {
				return fmt.Errorf("dummy counters %+v, want 2 out, no drops", cd)
			}
			// Closing one leaves the other's policy in place.
			if err := du.Close(); err != nil {
				return err
			}
			if got, err := run(dummy, "1.0.0.1"); err != nil || got != verdictDrop {
				return fmt.Errorf("after Close, dummy verdict %#x (%v), want drop (no policy)", got, err)
			}
			if got, err := run(1, "1.0.0.1"); err != nil || got != verdictDrop {
				return fmt.Errorf("loopback verdict %#x (%v), want drop (denied)", got, err)
			}
			if c, err := lo.Counters(); err != nil || c.Drops[ReasonDenied] != 2 {
				return fmt.Errorf("loopback counters %+v (%v), want 2 denied", c, err)
			}
			return lo.Close()
		}()
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// BenchmarkProgram reports the policy program's cost per packet.
func BenchmarkProgram(b *testing.B) {
	testutil.RequirePrivileged(b)
	m := newManager(b)
	if err := m.SetGlobal(testGlobal); err != nil {
		b.Fatal(err)
	}
	var allow, deny []string
	for i := range 50 {
		allow = append(allow, fmt.Sprintf("192.168.%d.0/24:%d", i, 5000+i))
		deny = append(deny, fmt.Sprintf("8.%d.0.0/16:%d-%d", i, 1000+i, 2000+i))
	}
	storePolicy(b, m, 1, Policy{Egress: true, Allow: mustRules(b, allow...), Deny: mustRules(b, deny...)})
	for _, c := range []struct {
		name string
		prog *ebpf.Program
		pkt  pkt
	}{
		{"ingress/pass-public-tcp", m.objs.SandboxIngress, pkt{dst: "1.0.0.1", dport: 443, payload: 1400}},
		{"ingress/pass-allowed-private", m.objs.SandboxIngress, pkt{dst: "192.168.7.9", dport: 5007, payload: 1400}},
		{"ingress/drop-denied", m.objs.SandboxIngress, pkt{dst: "8.7.1.1", dport: 1500, payload: 1400}},
		{"ingress/drop-sandbox", m.objs.SandboxIngress, pkt{dst: "10.200.3.4", dport: 80, payload: 1400}},
		{"egress/count", m.objs.SandboxEgress, pkt{dst: "10.200.7.2", dport: 40000, payload: 1400}},
	} {
		b.Run(c.name, func(b *testing.B) {
			data := c.pkt.bytes()
			const repeat = 100000
			var total float64
			for b.Loop() {
				_, d, err := c.prog.Benchmark(data, repeat, nil)
				if err != nil {
					b.Fatal(err)
				}
				total += float64(d.Nanoseconds())
			}
			b.ReportMetric(total/float64(b.N), "ns/packet")
		})
	}
}

// TestSetGlobalReplaces: a second SetGlobal replaces the first, removing
// host addresses and services no longer listed.
func TestSetGlobalReplaces(t *testing.T) {
	testutil.RequirePrivileged(t)
	m := newManager(t)
	storePolicy(t, m, 1, Policy{Egress: true})
	verdict := func(p pkt) uint32 { return runProg(t, m.objs.SandboxIngress, 1, p.bytes()) }
	if err := m.SetGlobal(testGlobal); err != nil {
		t.Fatal(err)
	}
	if got := verdict(pkt{dst: "198.51.100.1", dport: 80}); got != verdictDrop {
		t.Errorf("to host address: verdict %#x, want drop", got)
	}
	if got := verdict(pkt{dst: "10.200.3.4", dport: 80}); got != verdictDrop {
		t.Errorf("to sandbox subnet: verdict %#x, want drop", got)
	}
	if err := m.SetGlobal(Global{
		HostAddrs:    []netip.Addr{netip.MustParseAddr("198.51.100.2")},
		HostServices: []netip.AddrPort{netip.MustParseAddrPort("198.51.100.2:53")},
	}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		p    pkt
		want uint32
	}{
		{pkt{dst: "198.51.100.1", dport: 80}, verdictPass}, // no longer a host address
		{pkt{dst: "198.51.100.2", dport: 80}, verdictDrop},
		{pkt{proto: unix.IPPROTO_UDP, dst: "198.51.100.2", dport: 53}, verdictPass},
		{pkt{dst: "10.200.3.4", dport: 80}, verdictDrop}, // now just private 10/8
		{pkt{proto: unix.IPPROTO_UDP, dst: "10.200.0.1", dport: 53}, verdictDrop},
	} {
		if got := verdict(c.p); got != c.want {
			t.Errorf("to %s:%d: verdict %#x, want %#x", c.p.dst, c.p.dport, got, c.want)
		}
	}
	if n := countEntries(t, m.objs.HostAddrs); n != 1 {
		t.Errorf("host_addrs has %d entries, want 1", n)
	}
	if n := countEntries(t, m.objs.HostServices); n != 2 { // tcp and udp
		t.Errorf("host_services has %d entries, want 2", n)
	}
	for _, bad := range []Global{
		{SandboxSubnet: netip.MustParsePrefix("0.0.0.0/0")},
		{SandboxSubnet: netip.MustParsePrefix("2001:db8::/64")},
		{SandboxSubnet: netip.PrefixFrom(netip.MustParseAddr("10.1.2.3"), 16)},
		{HostServices: []netip.AddrPort{netip.MustParseAddrPort("10.0.0.1:0")}},
	} {
		if err := m.SetGlobal(bad); !errs.IsInvalid(err) {
			t.Errorf("SetGlobal(%+v) error = %v, want invalid_argument", bad, err)
		}
	}
}
