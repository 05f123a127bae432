//go:build linux && (386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64)

package ebpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/testutil"
)

// newNetns creates a network namespace with IPv6 disabled and returns a
// handle to it. The creating thread stays in it and is discarded.
func newNetns(t *testing.T) netns.NsHandle {
	t.Helper()
	type result struct {
		ns  netns.NsHandle
		err error
	}
	c := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: Go discards the thread
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			c <- result{err: fmt.Errorf("unshare: %w", err)}
			return
		}
		for _, f := range []string{"all", "default"} {
			// Sysctls under /proc/sys/net follow the opening thread's netns.
			err := os.WriteFile("/proc/sys/net/ipv6/conf/"+f+"/disable_ipv6", []byte("1"), 0)
			if err != nil && !errors.Is(err, os.ErrNotExist) {
				c <- result{err: err}
				return
			}
		}
		ns, err := netns.Get()
		c <- result{ns, err}
	}()
	r := <-c
	if r.err != nil {
		t.Fatalf("creating netns: %v", r.err)
	}
	t.Cleanup(func() { r.ns.Close() })
	return r.ns
}

// inNetns runs fn on a locked thread inside ns. Sockets fn creates stay in
// ns after it returns.
func inNetns(ns netns.NsHandle, fn func() error) error {
	c := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			c <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			c <- err
			return
		}
		err = fn()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread() // else the thread dies with the goroutine
		}
		c <- err
	}()
	return <-c
}

// testNet is a sandbox namespace joined by a veth to a host namespace that
// stands in for both the host (10.99.0.1) and the internet (203.0.113.10
// and .20 on its loopback).
type testNet struct {
	host, sandbox netns.NsHandle
	hostH         *netlink.Handle
	ifindex       int // host side of the veth, in host
}

var (
	hostAddr   = netip.MustParseAddr("10.99.0.1")
	sandboxIP  = netip.MustParseAddr("10.99.0.2")
	internet   = netip.MustParseAddr("203.0.113.10")
	internetDn = netip.MustParseAddr("203.0.113.20") // denied on port 9000
)

func newTestNet(t *testing.T) *testNet {
	t.Helper()
	tn := &testNet{host: newNetns(t), sandbox: newNetns(t)}
	hostH, err := netlink.NewHandleAt(tn.host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(hostH.Close)
	sbH, err := netlink.NewHandleAt(tn.sandbox)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sbH.Close)
	tn.hostH = hostH

	must := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	addr := func(a netip.Addr, bits int) *netlink.Addr {
		return &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, 32)}}
	}
	// The peer is created directly in the sandbox namespace.
	must("adding veth", hostH.LinkAdd(&netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: "skh0"},
		PeerName:      "sks0",
		PeerNamespace: netlink.NsFd(tn.sandbox),
	}))
	hl, err := hostH.LinkByName("skh0")
	must("host veth", err)
	tn.ifindex = hl.Attrs().Index
	hlo, err := hostH.LinkByName("lo")
	must("host lo", err)
	must("host lo up", hostH.LinkSetUp(hlo))
	must("internet addr", hostH.AddrAdd(hlo, addr(internet, 32)))
	must("internet addr", hostH.AddrAdd(hlo, addr(internetDn, 32)))
	must("host addr", hostH.AddrAdd(hl, addr(hostAddr, 24)))
	must("host veth up", hostH.LinkSetUp(hl))

	sl, err := sbH.LinkByName("sks0")
	must("sandbox veth", err)
	slo, err := sbH.LinkByName("lo")
	must("sandbox lo", err)
	must("sandbox lo up", sbH.LinkSetUp(slo))
	must("sandbox addr", sbH.AddrAdd(sl, addr(sandboxIP, 32)))
	must("sandbox veth up", sbH.LinkSetUp(sl))
	must("gateway route", sbH.RouteAdd(&netlink.Route{LinkIndex: sl.Attrs().Index, Dst: addr(hostAddr, 32).IPNet, Scope: netlink.SCOPE_LINK}))
	must("default route", sbH.RouteAdd(&netlink.Route{LinkIndex: sl.Attrs().Index, Gw: hostAddr.AsSlice()}))
	return tn
}

// servers listen in the host namespace.
type servers struct {
	tcp        net.Listener // 0.0.0.0:9000: 'u' + data → 8-byte count; 'd' + 8-byte n → n bytes
	hostTCP    net.Listener // 10.99.0.1:8080, a host port sandboxes must not reach
	udpService *net.UDPConn // 10.99.0.1:5353, an allowed host service
	udpNet     *net.UDPConn // 203.0.113.10:5353
	gotService atomic.Int64 // datagrams received
	gotNet     atomic.Int64
}

func startServers(t *testing.T, ns netns.NsHandle) *servers {
	t.Helper()
	s := &servers{}
	err := inNetns(ns, func() error {
		var err error
		if s.tcp, err = net.Listen("tcp4", "0.0.0.0:9000"); err != nil {
			return err
		}
		if s.hostTCP, err = net.Listen("tcp4", "10.99.0.1:8080"); err != nil {
			return err
		}
		if s.udpService, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(hostAddr, 5353))); err != nil {
			return err
		}
		s.udpNet, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(internet, 5353)))
		return err
	})
	if err != nil {
		t.Fatalf("starting servers: %v", err)
	}
	t.Cleanup(func() {
		s.tcp.Close()
		s.hostTCP.Close()
		s.udpService.Close()
		s.udpNet.Close()
	})
	go func() {
		for {
			c, err := s.tcp.Accept()
			if err != nil {
				return
			}
			go serveTCP(c)
		}
	}()
	go func() {
		for {
			c, err := s.hostTCP.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	for _, u := range []struct {
		c   *net.UDPConn
		got *atomic.Int64
	}{{s.udpService, &s.gotService}, {s.udpNet, &s.gotNet}} {
		go func() {
			buf := make([]byte, 65536)
			for {
				if _, _, err := u.c.ReadFromUDP(buf); err != nil {
					return
				}
				u.got.Add(1)
			}
		}()
	}
	return s
}

func serveTCP(c net.Conn) {
	defer c.Close()
	var cmd [1]byte
	if _, err := io.ReadFull(c, cmd[:]); err != nil {
		return
	}
	switch cmd[0] {
	case 'u':
		n, _ := io.Copy(io.Discard, c)
		binary.Write(c, binary.BigEndian, uint64(n))
	case 'd':
		var n uint64
		if binary.Read(c, binary.BigEndian, &n) == nil {
			io.CopyN(c, zeroReader{}, int64(n))
		}
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) { clear(p); return len(p), nil }

// dial connects from the sandbox namespace.
func dial(ns netns.NsHandle, network string, to netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := inNetns(ns, func() error {
		var err error
		c, err = net.DialTimeout(network, to.String(), timeout)
		return err
	})
	return c, err
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; last state: %s", what, state)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func counters(t *testing.T, a *Attachment) Counters {
	t.Helper()
	c, err := a.Counters()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// within1pct checks got is within 1% of want.
func within1pct(t *testing.T, what string, got, want uint64) {
	t.Helper()
	diff := float64(got) - float64(want)
	if diff < 0 || diff > 0.01*float64(want) {
		t.Errorf("%s: counted %d bytes, want %d to %d (+1%%)", what, got, want, want+want/100)
	} else {
		t.Logf("%s: counted %d bytes for %d sent (+%.3f%%)", what, got, want, 100*diff/float64(want))
	}
}

// TestAttachedTraffic attaches to a real veth and sends real TCP and UDP
// from a sandbox namespace: allowed traffic flows and is counted, each kind
// of forbidden traffic is dropped and counted by reason, and Close removes
// every link, filter, qdisc and map entry.
func TestAttachedTraffic(t *testing.T) {
	testutil.RequirePrivileged(t)
	for _, mode := range []string{"tcx", "tc"} {
		t.Run(mode, func(t *testing.T) { testAttachedTraffic(t, mode) })
	}
}

func testAttachedTraffic(t *testing.T, mode string) {
	tn := newTestNet(t)
	srv := startServers(t, tn.host)
	m := newManager(t)
	m.forceLegacy = mode == "tc"
	if err := m.SetGlobal(Global{
		SandboxSubnet: netip.MustParsePrefix("10.99.0.0/24"),
		HostAddrs:     []netip.Addr{hostAddr},
		HostServices:  []netip.AddrPort{netip.AddrPortFrom(hostAddr, 5353)},
	}); err != nil {
		t.Fatal(err)
	}
	var a *Attachment
	err := inNetns(tn.host, func() error {
		var err error
		a, err = m.Attach(tn.ifindex, Policy{Egress: true, Deny: mustRules(t, "203.0.113.20/32:9000")})
		return err
	})
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}
	defer a.Close()
	if a.mode != mode {
		t.Fatalf("attached with %q, want %q", a.mode, mode)
	}
	if err := inNetns(tn.host, func() error {
		_, err := m.Attach(tn.ifindex, Policy{Egress: true})
		if err == nil || !errs.IsConflict(err) {
			return fmt.Errorf("second Attach error = %v, want conflict", err)
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
	progs := attachedPrograms(t, tn, mode)
	if len(progs) != 2 {
		t.Fatalf("after Attach: %d programs on the veth (%v), want 2", len(progs), progs)
	}

	t.Run("tcp upload counted", func(t *testing.T) {
		const size = 8 << 20
		before := counters(t, a)
		c, err := dial(tn.sandbox, "tcp4", netip.AddrPortFrom(internet, 9000), 2*time.Second)
		if err != nil {
			t.Fatalf("dial allowed server: %v", err)
		}
		defer c.Close()
		if _, err := c.Write([]byte{'u'}); err != nil {
			t.Fatal(err)
		}
		if _, err := io.CopyN(c, zeroReader{}, size); err != nil {
			t.Fatal(err)
		}
		c.(*net.TCPConn).CloseWrite()
		var got uint64
		if err := binary.Read(c, binary.BigEndian, &got); err != nil || got != size {
			t.Fatalf("server received %d bytes (%v), want %d", got, err, size)
		}
		after := counters(t, a)
		within1pct(t, "tcp out", after.BytesOut-before.BytesOut, size)
		if len(after.Drops) != len(before.Drops) {
			t.Errorf("drops changed during an allowed upload: %v → %v", before.Drops, after.Drops)
		}
	})

	t.Run("tcp download counted", func(t *testing.T) {
		const size = 8 << 20
		before := counters(t, a)
		c, err := dial(tn.sandbox, "tcp4", netip.AddrPortFrom(internet, 9000), 2*time.Second)
		if err != nil {
			t.Fatalf("dial allowed server: %v", err)
		}
		defer c.Close()
		if _, err := c.Write(binary.BigEndian.AppendUint64([]byte{'d'}, size)); err != nil {
			t.Fatal(err)
		}
		n, err := io.Copy(io.Discard, c)
		if err != nil || n != size {
			t.Fatalf("downloaded %d bytes (%v), want %d", n, err, size)
		}
		within1pct(t, "tcp in", counters(t, a).BytesIn-before.BytesIn, size)
	})

	t.Run("udp counted exactly", func(t *testing.T) {
		const count, size = 100, 1000
		before := counters(t, a)
		got0 := srv.gotNet.Load()
		c, err := dial(tn.sandbox, "udp4", netip.AddrPortFrom(internet, 5353), time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		buf := make([]byte, size)
		// One at a time, so the receiver's socket buffer never overflows.
		for i := range int64(count) {
			if _, err := c.Write(buf); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "the udp datagram", func() (bool, string) {
				n := srv.gotNet.Load() - got0
				return n == i+1, fmt.Sprintf("%d of %d datagrams received", n, i+1)
			})
		}
		want := uint64(count * (size + 8 + 20)) // UDP and IPv4 headers
		within1pct(t, "udp out", counters(t, a).BytesOut-before.BytesOut, want)
	})

	t.Run("host service reachable", func(t *testing.T) {
		got0 := srv.gotService.Load()
		c, err := dial(tn.sandbox, "udp4", netip.AddrPortFrom(hostAddr, 5353), time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write([]byte("query")); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the service datagram", func() (bool, string) {
			n := srv.gotService.Load() - got0
			return n == 1, fmt.Sprintf("%d received", n)
		})
	})

	for _, c := range []struct {
		name    string
		network string
		to      netip.AddrPort
		reason  Reason
	}{
		{"tcp to host port", "tcp4", netip.AddrPortFrom(hostAddr, 8080), ReasonHost},
		{"udp to host non-service", "udp4", netip.AddrPortFrom(hostAddr, 5354), ReasonHost},
		{"tcp to denied server", "tcp4", netip.AddrPortFrom(internetDn, 9000), ReasonDenied},
		{"udp to metadata", "udp4", netip.MustParseAddrPort("169.254.169.254:80"), ReasonMetadata},
		{"tcp to other sandbox", "tcp4", netip.MustParseAddrPort("10.99.0.3:9000"), ReasonSandbox},
		{"udp to private", "udp4", netip.MustParseAddrPort("192.168.1.1:53"), ReasonPrivate},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := counters(t, a)
			conn, err := dial(tn.sandbox, c.network, c.to, 300*time.Millisecond)
			if c.network == "tcp4" {
				if err == nil {
					conn.Close()
					t.Fatalf("tcp connect to %s succeeded, want it dropped", c.to)
				}
			} else {
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close()
				if _, err := conn.Write([]byte("x")); err != nil {
					t.Fatal(err)
				}
			}
			waitFor(t, "a "+c.reason.String()+" drop", func() (bool, string) {
				got := counters(t, a)
				return got.Drops[c.reason] > before.Drops[c.reason], fmt.Sprintf("drops %v", got.Drops)
			})
		})
	}

	// Close removes programs and map entries; traffic then flows unpoliced.
	if err := a.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := a.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if progs := attachedPrograms(t, tn, mode); len(progs) != 0 {
		t.Errorf("after Close: programs still on the veth: %v", progs)
	}
	if mode == "tc" {
		qs, err := tn.hostH.QdiscList(mustLink(t, tn))
		if err != nil {
			t.Fatal(err)
		}
		for _, q := range qs {
			if q.Type() == "clsact" {
				t.Errorf("after Close: clsact qdisc left on the veth")
			}
		}
	}
	for name, mp := range map[string]*ebpf.Map{
		"policies": m.objs.Policies, "counters": m.objs.SandboxCounters,
		"rules": m.objs.Rules,
	} {
		if n := countEntries(t, mp); n != 0 {
			t.Errorf("after Close: %d entries left in %s", n, name)
		}
	}
	if _, err := a.Counters(); err == nil {
		t.Errorf("Counters after Close succeeded, want an error")
	}
	c, err := dial(tn.sandbox, "tcp4", netip.AddrPortFrom(hostAddr, 8080), 2*time.Second)
	if err != nil {
		t.Fatalf("after Close, tcp to host port: %v; want the programs gone", err)
	}
	c.Close()

	// The interface is free for a new attachment.
	if err := inNetns(tn.host, func() error {
		a2, err := m.Attach(tn.ifindex, Policy{Egress: true})
		if err != nil {
			return err
		}
		return a2.Close()
	}); err != nil {
		t.Errorf("re-Attach after Close: %v", err)
	}
}

func mustLink(t *testing.T, tn *testNet) netlink.Link {
	t.Helper()
	l, err := tn.hostH.LinkByIndex(tn.ifindex)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// attachedPrograms lists what is attached to the host veth: TCX programs
// (tcx mode) or tc bpf filters (tc mode).
func attachedPrograms(t *testing.T, tn *testNet, mode string) []string {
	t.Helper()
	var out []string
	if mode == "tc" {
		l := mustLink(t, tn)
		for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
			fs, err := tn.hostH.FilterList(l, parent)
			if err != nil && !errors.Is(err, unix.EINVAL) { // EINVAL: no clsact qdisc
				t.Fatal(err)
			}
			for _, f := range fs {
				out = append(out, fmt.Sprintf("filter %s on %x", f.Type(), parent))
			}
		}
		return out
	}
	err := inNetns(tn.host, func() error {
		for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
			r, err := link.QueryPrograms(link.QueryOptions{Target: tn.ifindex, Attach: at})
			if err != nil {
				return err
			}
			for _, p := range r.Programs {
				out = append(out, fmt.Sprintf("%s program %d", at, p.ID))
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("querying tcx programs: %v", err)
	}
	return out
}

func countEntries(t *testing.T, mp *ebpf.Map) int {
	t.Helper()
	n := 0
	var key any // nil: the first key
	for {
		next, err := mp.NextKeyBytes(key)
		if err != nil {
			t.Fatalf("iterating %v: %v", mp, err)
		}
		if next == nil {
			return n
		}
		n++
		key = next
	}
}

// TestAttachCleanup: a failed Attach leaves nothing behind, and
// Manager.Close detaches every attachment still open.
func TestAttachCleanup(t *testing.T) {
	testutil.RequirePrivileged(t)
	for _, mode := range []string{"tcx", "tc"} {
		t.Run(mode, func(t *testing.T) {
			tn := newTestNet(t)
			m, err := New(nil)
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			m.forceLegacy = mode == "tc"
			maps := map[string]*ebpf.Map{
				"policies": m.objs.Policies, "counters": m.objs.SandboxCounters,
				"rules": m.objs.Rules,
			}
			deny := mustRules(t, "1.2.3.0/24:80", "1.2.0.0/16")
			err = inNetns(tn.host, func() error {
				// No such interface in this namespace.
				if _, err := m.Attach(tn.ifindex+100, Policy{Egress: true, Deny: deny}); err == nil {
					return fmt.Errorf("Attach to a missing interface succeeded")
				}
				if _, err := m.Attach(tn.ifindex, Policy{Egress: true, Allow: []Rule{{Prefix: netip.MustParsePrefix("2001:db8::/32")}}}); !errs.IsInvalid(err) {
					return fmt.Errorf("Attach with an IPv6 rule: error %v, want invalid_argument", err)
				}
				if _, err := m.Attach(0, Policy{}); !errs.IsInvalid(err) {
					return fmt.Errorf("Attach to ifindex 0: error %v, want invalid_argument", err)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			for name, mp := range maps {
				if n := countEntries(t, mp); n != 0 {
					t.Errorf("after failed Attach: %d entries left in %s", n, name)
				}
			}
			var a *Attachment
			if err := inNetns(tn.host, func() error {
				a, err = m.Attach(tn.ifindex, Policy{Egress: true, Deny: deny})
				return err
			}); err != nil {
				t.Fatal(err)
			}
			if n := countEntries(t, m.objs.Rules); n != 2 {
				t.Errorf("rules has %d entries, want 2", n)
			}
			if got := attachedPrograms(t, tn, mode); len(got) != 2 {
				t.Fatalf("after Attach: %v, want 2 programs", got)
			}
			if err := m.Close(); err != nil {
				t.Fatalf("Manager.Close: %v", err)
			}
			if got := attachedPrograms(t, tn, mode); len(got) != 0 {
				t.Errorf("after Manager.Close: programs still attached: %v", got)
			}
			if err := a.Close(); err != nil {
				t.Errorf("Attachment.Close after Manager.Close: %v", err)
			}
			if err := m.Close(); err != nil {
				t.Errorf("second Manager.Close: %v", err)
			}
			if err := inNetns(tn.host, func() error {
				_, err := m.Attach(tn.ifindex, Policy{Egress: true})
				return err
			}); err == nil {
				t.Errorf("Attach after Manager.Close succeeded")
			}
		})
	}
}
