package e2e

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os/exec"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"skiff.dev/skiff/internal/testutil"
	"skiff.dev/skiff/netns"
)

// hostNet is a set of simulated hosts for multi-host tests: each host is a
// network namespace with one interface, eth0, whose address is on a
// private /24 (10.99.<n>.0/24, clear of the 10.2xx sandbox subnets). The
// hosts' links meet on a Linux bridge that lives in a namespace of its own
// (the "switch"), so the host's firewall and br_netfilter never see the
// traffic; a further link connects the test's own namespace to the bridge
// at 10.99.<n>.1, so the test reaches every host directly.
//
//	test ns: e2eXXXX 10.99.n.1 ──┐
//	                             switch ns: br0 ── p0 ── host0 ns: eth0 10.99.n.2
//	                                            ── p1 ── host1 ns: eth0 10.99.n.3 …
//
// Processes run inside a host with host.start (forked from a locked
// thread that has entered the namespace: no `ip netns exec`, no nsenter),
// and die with the test (parent-death signal). A host is partitioned by
// taking its bridge port down, which drops its traffic both ways, and
// healed by bringing it back. Everything is removed when the test ends,
// failed or not: the namespaces are held only by descriptors, and the
// links go with them.
type hostNet struct {
	t      testing.TB
	prefix netip.Prefix
	uplink string // the test namespace's link to the bridge
	thread *netns.Thread
	sw     *netns.NS
	hosts  []*host
}

// host is one simulated host.
type host struct {
	name string
	addr netip.Addr
	ns   *netns.NS
	port string // its port on the bridge, in the switch namespace
	net  *hostNet
}

const (
	bridgeName = "br0"
	uplinkPeer = "up"
)

// Subnets in use by this test binary: two hostNets never share one.
var (
	hostNetMu   sync.Mutex
	hostNetUsed = map[int]bool{}
)

// newHostNet creates n hosts (named host0…) on a fresh bridge.
func newHostNet(t testing.TB, n int) *hostNet {
	t.Helper()
	testutil.RequirePrivileged(t)
	if n < 1 || n > 200 {
		t.Fatalf("newHostNet: %d hosts, want 1-200", n)
	}
	hn := &hostNet{t: t, uplink: fmt.Sprintf("e2e%04x", rand.IntN(0x10000))}
	var err error
	if hn.thread, err = netns.NewThread(); err != nil {
		t.Fatal(err)
	}
	// Registered first, so it runs last: processes started in the hosts
	// (whose cleanups come later) are gone by then.
	t.Cleanup(hn.thread.Close)
	pool, err := netns.NewPool(netns.PoolConfig{Size: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	newNS := func() *netns.NS {
		ns, err := pool.Get()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ns.Close() })
		return ns
	}
	hn.sw = newNS()

	third := hn.pickSubnet()
	hn.prefix = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 99, byte(third), 0}), 24)
	t.Cleanup(func() {
		hostNetMu.Lock()
		delete(hostNetUsed, third)
		hostNetMu.Unlock()
	})

	// The bridge, in the switch namespace.
	if err := hn.thread.Run(hn.sw, func() error {
		la := netlink.NewLinkAttrs()
		la.Name = bridgeName
		br := &netlink.Bridge{LinkAttrs: la}
		if err := netlink.LinkAdd(br); err != nil {
			return fmt.Errorf("adding bridge: %w", err)
		}
		return netlink.LinkSetUp(br)
	}); err != nil {
		t.Fatal(err)
	}

	// The uplink from the test's namespace.
	gw := hn.prefix.Addr().Next()
	if err := hn.thread.Run(nil, func() error {
		la := netlink.NewLinkAttrs()
		la.Name = hn.uplink
		veth := &netlink.Veth{LinkAttrs: la, PeerName: uplinkPeer, PeerNamespace: netlink.NsFd(hn.sw.Fd())}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("adding uplink %s: %w", hn.uplink, err)
		}
		if err := netlink.AddrAdd(veth, &netlink.Addr{IPNet: ipNet(gw, 24)}); err != nil {
			return fmt.Errorf("addressing uplink: %w", err)
		}
		return netlink.LinkSetUp(veth)
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Also removed with the switch namespace; deleting it here frees
		// the route at once.
		_ = hn.thread.Run(nil, func() error {
			if l, err := netlink.LinkByName(hn.uplink); err == nil {
				return netlink.LinkDel(l)
			}
			return nil
		})
	})
	if err := hn.thread.Run(hn.sw, func() error { return attach(uplinkPeer) }); err != nil {
		t.Fatal(err)
	}

	addr := gw
	for i := range n {
		addr = addr.Next()
		h := &host{name: fmt.Sprintf("host%d", i), addr: addr, ns: newNS(), port: fmt.Sprintf("p%d", i), net: hn}
		if err := hn.thread.Run(hn.sw, func() error {
			la := netlink.NewLinkAttrs()
			la.Name = h.port
			veth := &netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerNamespace: netlink.NsFd(h.ns.Fd())}
			if err := netlink.LinkAdd(veth); err != nil {
				return fmt.Errorf("adding %s's link: %w", h.name, err)
			}
			return attach(h.port)
		}); err != nil {
			t.Fatal(err)
		}
		if err := h.run(func() error {
			eth, err := netlink.LinkByName("eth0")
			if err != nil {
				return err
			}
			if err := netlink.AddrAdd(eth, &netlink.Addr{IPNet: ipNet(h.addr, 24)}); err != nil {
				return err
			}
			return netlink.LinkSetUp(eth)
		}); err != nil {
			t.Fatalf("configuring %s: %v", h.name, err)
		}
		hn.hosts = append(hn.hosts, h)
	}
	hn.waitUp()
	return hn
}

// waitUp waits until every link of the network is operationally up
// (carrier on both ends of each veth; a port of a bridge without STP
// forwards as soon as it has carrier): before that, the first packets are
// dropped.
func (hn *hostNet) waitUp() {
	hn.t.Helper()
	up := func(ns *netns.NS, names ...string) (string, bool) {
		var down string
		err := hn.thread.Run(ns, func() error {
			for _, name := range names {
				l, err := netlink.LinkByName(name)
				if err != nil {
					return err
				}
				if l.Attrs().OperState != netlink.OperUp {
					down = name
					return nil
				}
			}
			return nil
		})
		if err != nil {
			hn.t.Fatal(err)
		}
		return down, down == ""
	}
	ports := []string{uplinkPeer}
	for _, h := range hn.hosts {
		ports = append(ports, h.port)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		down, ok := up(nil, hn.uplink)
		if ok {
			down, ok = up(hn.sw, append([]string{bridgeName}, ports...)...)
		}
		for _, h := range hn.hosts {
			if !ok {
				break
			}
			if down, ok = up(h.ns, "eth0"); !ok {
				down = h.name + " eth0"
			}
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			hn.t.Fatalf("host network: %s not up after 10s", down)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// pickSubnet chooses n for 10.99.n.0/24: one this binary does not use
// and no route of the test namespace overlaps.
func (hn *hostNet) pickSubnet() int {
	hn.t.Helper()
	var routes []netlink.Route
	if err := hn.thread.Run(nil, func() (err error) {
		routes, err = netlink.RouteList(nil, netlink.FAMILY_V4)
		return err
	}); err != nil {
		hn.t.Fatal(err)
	}
	hostNetMu.Lock()
	defer hostNetMu.Unlock()
	start := rand.IntN(256)
	for k := range 256 {
		third := (start + k) % 256
		if hostNetUsed[third] {
			continue
		}
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 99, byte(third), 0}), 24)
		clash := false
		for _, r := range routes {
			if r.Dst == nil {
				continue // the default route
			}
			ra, ok := netip.AddrFromSlice(r.Dst.IP)
			ones, _ := r.Dst.Mask.Size()
			if ok && ones > 0 && netip.PrefixFrom(ra.Unmap(), ones).Overlaps(p) {
				clash = true
				break
			}
		}
		if !clash {
			hostNetUsed[third] = true
			return third
		}
	}
	hn.t.Fatal("no free 10.99.n.0/24 subnet")
	return 0
}

// attach puts link (in the current namespace) on the bridge and up.
func attach(link string) error {
	l, err := netlink.LinkByName(link)
	if err != nil {
		return err
	}
	br, err := netlink.LinkByName(bridgeName)
	if err != nil {
		return err
	}
	if err := netlink.LinkSetMaster(l, br); err != nil {
		return fmt.Errorf("attaching %s to the bridge: %w", link, err)
	}
	return netlink.LinkSetUp(l)
}

// addrs are the hosts' addresses, as strings.
func (hn *hostNet) addrs() []string {
	out := make([]string, len(hn.hosts))
	for i, h := range hn.hosts {
		out[i] = h.addr.String()
	}
	return out
}

// run runs fn on a thread inside the host's namespace.
func (h *host) run(fn func() error) error { return h.net.thread.Run(h.ns, fn) }

// start starts cmd inside the host's namespace: the process is forked
// from the namespace thread, so it and its children live in the host's
// network namespace (and nothing else about them changes). It gets
// SIGKILL when the hostNet is torn down, unless cmd sets its own
// SysProcAttr.
func (h *host) start(cmd *exec.Cmd) error {
	return h.run(func() error { return cmd.Start() })
}

// dial connects from inside the host.
func (h *host) dial(addr string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := h.run(func() (err error) {
		c, err = net.DialTimeout("tcp4", addr, timeout)
		return err
	})
	return c, err
}

// listen listens inside the host on its address.
func (h *host) listen(port int) (net.Listener, error) {
	var l net.Listener
	err := h.run(func() (err error) {
		l, err = net.Listen("tcp4", net.JoinHostPort(h.addr.String(), fmt.Sprint(port)))
		return err
	})
	return l, err
}

// partition cuts the host off the network: its bridge port goes down, and
// every packet to or from it is dropped (no reset, no ICMP: as a pulled
// cable or a dead switch port looks to the others).
func (h *host) partition() error {
	return h.net.thread.Run(h.net.sw, func() error {
		l, err := netlink.LinkByName(h.port)
		if err != nil {
			return err
		}
		return netlink.LinkSetDown(l)
	})
}

// heal reconnects a partitioned host.
func (h *host) heal() error {
	return h.net.thread.Run(h.net.sw, func() error {
		l, err := netlink.LinkByName(h.port)
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(l)
	})
}

// partitioned reports whether the host's port is down.
func (h *host) partitioned() (bool, error) {
	var down bool
	err := h.net.thread.Run(h.net.sw, func() error {
		l, err := netlink.LinkByName(h.port)
		if err != nil {
			return err
		}
		down = l.Attrs().Flags&net.FlagUp == 0
		return nil
	})
	return down, err
}

func ipNet(a netip.Addr, bits int) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, 32)}
}
