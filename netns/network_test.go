package netns

import (
	"bufio"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"skiff.dev/skiff/internal/testutil"
)

func TestBlocks(t *testing.T) {
	b, err := NewBlocks(netip.MustParsePrefix("10.9.0.0/28"))
	if err != nil {
		t.Fatal(err)
	}
	if b.Len() != 4 {
		t.Fatalf("Len: got %d, want 4", b.Len())
	}
	var got []Block
	for range 4 {
		blk, err := b.Get()
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, blk)
	}
	want := []Block{
		{0, netip.MustParsePrefix("10.9.0.0/30"), netip.MustParseAddr("10.9.0.1"), netip.MustParseAddr("10.9.0.2")},
		{1, netip.MustParsePrefix("10.9.0.4/30"), netip.MustParseAddr("10.9.0.5"), netip.MustParseAddr("10.9.0.6")},
		{2, netip.MustParsePrefix("10.9.0.8/30"), netip.MustParseAddr("10.9.0.9"), netip.MustParseAddr("10.9.0.10")},
		{3, netip.MustParsePrefix("10.9.0.12/30"), netip.MustParseAddr("10.9.0.13"), netip.MustParseAddr("10.9.0.14")},
	}
	if d := cmp.Diff(want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b }), cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); d != "" {
		t.Errorf("blocks (-want +got):\n%s", d)
	}
	if _, err := b.Get(); !errors.Is(err, ErrExhausted) {
		t.Errorf("Get on a full subnet: got %v, want ErrExhausted", err)
	}
	// Released blocks come back oldest release first; double Put is a no-op.
	b.Put(got[2])
	b.Put(got[0])
	b.Put(got[2])
	if n := b.InUse(); n != 2 {
		t.Errorf("InUse: got %d, want 2", n)
	}
	for _, wantIdx := range []int{2, 0} {
		blk, err := b.Get()
		if err != nil {
			t.Fatal(err)
		}
		if blk.Index != wantIdx {
			t.Errorf("Get after release: got block %d, want %d", blk.Index, wantIdx)
		}
	}
	if _, err := b.Get(); !errors.Is(err, ErrExhausted) {
		t.Errorf("Get: got %v, want ErrExhausted (a double Put must not free a block twice)", err)
	}

	for _, bad := range []string{"10.0.0.0/31", "2001:db8::/64", "10.0.0.0/7"} {
		if _, err := NewBlocks(netip.MustParsePrefix(bad)); err == nil {
			t.Errorf("NewBlocks(%s): got no error", bad)
		}
	}
}

func TestHostResolver(t *testing.T) {
	for _, tc := range []struct {
		name, conf string
		want       string
	}{
		{"first usable", "# c\nnameserver 127.0.0.53\nnameserver ::1\nnameserver 10.1.2.3\nnameserver 9.9.9.9\n", "10.1.2.3"},
		{"only a local stub", "nameserver 127.0.0.53\n", "1.1.1.1"},
		{"empty", "", "1.1.1.1"},
		{"missing file", "-", "1.1.1.1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "resolv.conf")
			if tc.conf != "-" {
				if err := os.WriteFile(p, []byte(tc.conf), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if got := HostResolver(p).String(); got != tc.want {
				t.Errorf("got %s, want %s", got, tc.want)
			}
		})
	}
	if got, want := ResolvConf(netip.MustParseAddr("10.1.2.3")), "nameserver 10.1.2.3\noptions timeout:2 attempts:2\n"; got != want {
		t.Errorf("ResolvConf: got %q, want %q", got, want)
	}
}

// testNetwork makes a Network with a random tag and a random /24 in
// 10.200.0.0/13 (tests of several packages run at once on one host),
// closed at the end of the test.
func testNetwork(t testing.TB) *Network {
	t.Helper()
	testutil.RequirePrivileged(t)
	tag := fmt.Sprintf("t%03x", rand.IntN(0x1000))
	subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(200 + rand.IntN(8)), byte(rand.IntN(256)), 0}), 24)
	n, err := NewNetwork(NetworkConfig{Tag: tag, Subnet: subnet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Errorf("closing network: %v", err)
		}
	})
	return n
}

func TestNetworkVeth(t *testing.T) {
	n := testNetwork(t)
	pool, err := NewPool(PoolConfig{Size: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	th, err := NewThread()
	if err != nil {
		t.Fatal(err)
	}
	defer th.Close()
	if ok, err := n.fw.exists(); err != nil || !ok {
		t.Fatalf("nftables table %s: exists %v, err %v", n.Table(), ok, err)
	}
	if b, _ := os.ReadFile("/proc/sys/net/ipv4/ip_forward"); strings.TrimSpace(string(b)) != "1" {
		t.Errorf("ip_forward: got %q, want 1", b)
	}

	ns, err := pool.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	v, err := n.Add(ns)
	if err != nil {
		t.Fatal(err)
	}
	blk := v.Block()
	if !n.Subnet().Contains(blk.Host) || !strings.HasPrefix(v.HostName(), n.LinkPrefix()) {
		t.Errorf("veth %s block %+v: not in %s / prefix %s", v.HostName(), blk, n.Subnet(), n.LinkPrefix())
	}
	l, err := netlink.LinkByName(v.HostName())
	if err != nil {
		t.Fatal(err)
	}
	if l.Attrs().Index != v.HostIndex() {
		t.Errorf("HostIndex: got %d, want %d", v.HostIndex(), l.Attrs().Index)
	}

	// Inside: lo and eth0 only, the sandbox address, a default route via
	// the host side, no IPv6.
	var names []string
	var addrs []string
	var gw string
	var v6 string
	err = th.Run(ns, func() error {
		links, err := netlink.LinkList()
		if err != nil {
			return err
		}
		for _, l := range links {
			names = append(names, l.Attrs().Name)
		}
		eth, err := netlink.LinkByName(PeerName)
		if err != nil {
			return err
		}
		as, err := netlink.AddrList(eth, netlink.FAMILY_ALL)
		if err != nil {
			return err
		}
		for _, a := range as {
			addrs = append(addrs, a.IPNet.String())
		}
		routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		for _, r := range routes {
			if r.Dst == nil || r.Dst.String() == "0.0.0.0/0" {
				gw = r.Gw.String()
			}
		}
		b, err := os.ReadFile("/proc/sys/net/ipv6/conf/all/disable_ipv6")
		v6 = strings.TrimSpace(string(b))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(names)
	if d := cmp.Diff([]string{PeerName, "lo"}, names); d != "" {
		t.Errorf("links in the namespace (-want +got):\n%s", d)
	}
	if d := cmp.Diff([]string{fmt.Sprintf("%s/30", blk.Peer)}, addrs); d != "" {
		t.Errorf("eth0 addresses (-want +got):\n%s", d)
	}
	if gw != blk.Host.String() {
		t.Errorf("default route via %q, want %s", gw, blk.Host)
	}
	if v6 != "1" {
		t.Errorf("disable_ipv6 in the namespace: got %q, want 1", v6)
	}

	// Real traffic: the namespace reaches a listener on the host side.
	ln, err := net.Listen("tcp4", net.JoinHostPort(blk.Host.String(), "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		line, _ := bufio.NewReader(c).ReadString('\n')
		fmt.Fprintf(c, "got %s", line)
	}()
	var reply string
	err = th.Run(ns, func() error {
		c, err := net.DialTimeout("tcp4", ln.Addr().String(), 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		fmt.Fprintln(c, "hello")
		reply, err = bufio.NewReader(c).ReadString('\n')
		return err
	})
	if err != nil || reply != "got hello\n" {
		t.Errorf("talking to the host side: reply %q, err %v", reply, err)
	}

	// The link goes with the namespace; the block is free only then.
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	if err := v.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if got := n.blocks.InUse(); got != 1 {
		t.Errorf("blocks in use after Close, namespace still open: got %d, want 1", got)
	}
	ns.Close()
	if !n.WaitReleased(10 * time.Second) {
		t.Fatal("veth not released 10 s after its namespace was closed")
	}
	if _, err := netlink.LinkByName(v.HostName()); err == nil {
		t.Errorf("link %s still exists after release", v.HostName())
	}
	if got := n.blocks.InUse(); got != 0 {
		t.Errorf("blocks in use after release: got %d, want 0", got)
	}
}

// orphanVeth makes what a crashed run leaves: a link with the network's
// prefix (its peer in a namespace something still holds).
func orphanVeth(t *testing.T, n *Network, pool *Pool, name string) {
	t.Helper()
	ns, err := pool.Get()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	la := netlink.NewLinkAttrs()
	la.Name = name
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerNamespace: netlink.NsFd(ns.Fd())}); err != nil {
		t.Fatal(err)
	}
}

func TestNetworkReclaimAndClose(t *testing.T) {
	n := testNetwork(t)
	pool, err := NewPool(PoolConfig{Size: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	ns, err := pool.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	live, err := n.Add(ns)
	if err != nil {
		t.Fatal(err)
	}
	orphan := n.LinkPrefix() + "999"
	orphanVeth(t, n, pool, orphan)
	deleted, err := n.Reclaim()
	if err != nil || deleted != 1 {
		t.Errorf("Reclaim: deleted %d, err %v; want 1, nil", deleted, err)
	}
	links, _ := n.Links()
	if d := cmp.Diff([]string{live.HostName()}, links); d != "" {
		t.Errorf("links after Reclaim (-want +got):\n%s", d)
	}
	// Close deletes the live veth's link and the table.
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if links, _ := n.Links(); len(links) != 0 {
		t.Errorf("links after Close: got %v, want none", links)
	}
	// A new Network of the same tag (a restarted agent) removes leftovers,
	// of its group (all at once) and by name.
	orphanVeth(t, n, pool, orphan)
	la := netlink.NewLinkAttrs()
	la.Name, la.Group = n.LinkPrefix()+"5", n.group
	ns2, err := pool.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer ns2.Close()
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerNamespace: netlink.NsFd(ns2.Fd())}); err != nil {
		t.Fatal(err)
	}
	if ok, err := n.fw.exists(); err != nil || ok {
		t.Errorf("nftables table after Close: exists %v, err %v", ok, err)
	}
	n2, err := NewNetwork(NetworkConfig{Tag: strings.TrimPrefix(n.LinkPrefix(), LinkPrefix), Subnet: n.Subnet()})
	if err != nil {
		t.Fatal(err)
	}
	defer n2.Close()
	if links, _ := n2.Links(); len(links) != 0 {
		t.Errorf("links after a restart: got %v, want none", links)
	}
	if _, err := n2.Add(&NS{fd: -1}); err == nil {
		t.Error("Add with a closed namespace: got no error")
	}
	if n2.blocks.InUse() != 0 {
		t.Errorf("a failed Add kept its block")
	}
	if err := unix.Access("/proc/sys/net/ipv4/ip_forward", unix.R_OK); err != nil {
		t.Fatal(err)
	}
}

// BenchmarkVeth measures giving a pooled namespace a veth (Add), and the
// release of veths with their namespaces (the kernel removes them in
// batches) against deleting each link explicitly.
func BenchmarkVeth(b *testing.B) {
	for _, explicit := range []bool{false, true} {
		name := "release-with-netns"
		if explicit {
			name = "explicit-delete"
		}
		b.Run(name, func(b *testing.B) {
			n := testNetwork(b)
			pool, err := NewPool(PoolConfig{Size: 8})
			if err != nil {
				b.Fatal(err)
			}
			defer pool.Close()
			var add, del time.Duration
			for b.Loop() {
				ns, err := pool.Get()
				if err != nil {
					b.Fatal(err)
				}
				t0 := time.Now()
				v, err := n.Add(ns)
				if err != nil {
					b.Fatal(err)
				}
				t1 := time.Now()
				if explicit {
					if err := n.deleteLink(v.HostName()); err != nil {
						b.Fatal(err)
					}
				}
				v.Close()
				ns.Close()
				add += t1.Sub(t0)
				del += time.Since(t1)
			}
			t2 := time.Now()
			if !n.WaitReleased(time.Minute) {
				b.Fatal("veths not released")
			}
			del += time.Since(t2)
			b.ReportMetric(float64(add.Microseconds())/float64(b.N), "add-µs/op")
			b.ReportMetric(float64(del.Microseconds())/float64(b.N), "release-µs/op")
		})
	}
}
