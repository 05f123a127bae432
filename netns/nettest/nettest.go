// Package nettest builds a stand-in for the internet for sandbox network
// tests: a network namespace behind a host veth, with TCP and UDP servers
// on a documentation address (TEST-NET-2) and a fake metadata service on
// 169.254.169.254 routed only from the sandbox subnet, so the host's own
// traffic is untouched. Everything is removed when the test ends.
package nettest

import (
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"strconv"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"skiff.dev/skiff/netns"
)

// Metadata is the cloud metadata address the sandboxes must not reach.
var Metadata = netip.MustParseAddr("169.254.169.254")

// Ports of the servers.
const (
	TCPPort      = 8080 // on Server: reads to EOF, replies "got <n>"
	UDPPort      = 8081 // on Server: echoes
	MetadataPort = 80   // on Metadata: reads to EOF, replies "metadata"
)

// Inet is the stand-in internet.
type Inet struct {
	Host   netip.Addr // the host side of the link: one of the host's addresses
	Server netip.Addr // the servers' address
	Link   string     // the host side's name
	// Received gets the byte count of each TCP connection to Server.
	Received chan int64

	ns     *netns.NS
	thread *netns.Thread
}

// New makes the namespace with the link's addresses in block (a /30 or
// larger, e.g. 198.51.100.16/28: the first address is the host's, the
// second the servers'), and routes Metadata to it for traffic from
// sandboxes (sources in subnet).
func New(t testing.TB, block, subnet netip.Prefix) *Inet {
	t.Helper()
	host := block.Masked().Addr().Next()
	in := &Inet{Host: host, Server: host.Next(), Link: fmt.Sprintf("inet%04x", rand.IntN(0x10000)), Received: make(chan int64, 16)}
	pool, err := netns.NewPool(netns.PoolConfig{Size: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	if in.ns, err = pool.Get(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { in.ns.Close() })
	if in.thread, err = netns.NewThread(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(in.thread.Close)

	la := netlink.NewLinkAttrs()
	la.Name, la.Flags = in.Link, net.FlagUp
	veth := &netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerNamespace: netlink.NsFd(in.ns.Fd())}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netlink.LinkDel(veth) })
	if err := netlink.AddrAdd(veth, &netlink.Addr{IPNet: ipNet(host, block.Bits())}); err != nil {
		t.Fatal(err)
	}
	err = in.thread.Run(in.ns, func() error {
		eth, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(eth, &netlink.Addr{IPNet: ipNet(in.Server, block.Bits())}); err != nil {
			return err
		}
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(lo, &netlink.Addr{IPNet: ipNet(Metadata, 32)}); err != nil {
			return err
		}
		if err := netlink.LinkSetUp(eth); err != nil {
			return err
		}
		return netlink.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Gw: host.AsSlice()})
	})
	if err != nil {
		t.Fatal(err)
	}

	// Metadata through the namespace, for sandbox sources only.
	table := 20000 + rand.IntN(10000)
	rule := netlink.NewRule()
	rule.Src, rule.Table, rule.Priority = ipNet(subnet.Addr(), subnet.Bits()), table, table
	if err := netlink.RuleAdd(rule); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netlink.RuleDel(rule) })
	route := &netlink.Route{Dst: ipNet(Metadata, 32), Gw: in.Server.AsSlice(), LinkIndex: veth.Attrs().Index, Table: table}
	if err := netlink.RouteAdd(route); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netlink.RouteDel(route) })

	in.serveTCP(t, netip.AddrPortFrom(in.Server, TCPPort), func(c net.Conn) {
		n, _ := io.Copy(io.Discard, c)
		fmt.Fprintf(c, "got %d", n)
		select {
		case in.Received <- n:
		default:
		}
	})
	in.serveTCP(t, netip.AddrPortFrom(Metadata, MetadataPort), func(c net.Conn) {
		io.Copy(io.Discard, c) // closing with unread data would reset the connection
		io.WriteString(c, "metadata")
	})
	var pc net.PacketConn
	if err := in.thread.Run(in.ns, func() (err error) {
		pc, err = net.ListenPacket("udp4", netip.AddrPortFrom(in.Server, UDPPort).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		b := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(b)
			if err != nil {
				return
			}
			pc.WriteTo(b[:n], from)
		}
	}()
	return in
}

// Run runs fn on a thread inside the namespace.
func (in *Inet) Run(fn func() error) error { return in.thread.Run(in.ns, fn) }

// Addr is the servers' address with port, as a string.
func (in *Inet) Addr(port int) string {
	return net.JoinHostPort(in.Server.String(), strconv.Itoa(port))
}

func (in *Inet) serveTCP(t testing.TB, addr netip.AddrPort, handle func(net.Conn)) {
	t.Helper()
	var ln net.Listener
	if err := in.thread.Run(in.ns, func() (err error) {
		ln, err = net.Listen("tcp4", addr.String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ServeTCP(ln, handle)
}

// ServeTCP accepts connections on ln until it closes, each handled by
// handle and closed.
func ServeTCP(ln net.Listener, handle func(net.Conn)) {
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
}

// ListenHost listens on the host's address of the link (a host service
// sandboxes must not reach), replying "host" to each connection.
func (in *Inet) ListenHost(t testing.TB) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp4", net.JoinHostPort(in.Host.String(), "0"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ServeTCP(ln, func(c net.Conn) {
		io.Copy(io.Discard, c)
		io.WriteString(c, "host")
	})
	return netip.MustParseAddrPort(ln.Addr().String())
}

// ListenHostUDP echoes UDP on the host's address of the link at port (53
// stands in for a DNS resolver on the host). It returns the error when
// the port is taken; other failures fail the test.
func (in *Inet) ListenHostUDP(t testing.TB, port int) error {
	pc, err := net.ListenPacket("udp4", net.JoinHostPort(in.Host.String(), strconv.Itoa(port)))
	if err != nil {
		if errors.Is(err, unix.EADDRINUSE) {
			return err
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		b := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(b)
			if err != nil {
				return
			}
			pc.WriteTo(b[:n], from)
		}
	}()
	return nil
}

func ipNet(a netip.Addr, bits int) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, 32)}
}

// WireBytes is the IP-level byte count (link bytes less a 14-byte
// Ethernet header per packet, a GSO packet counting once) of everything
// the host has sent into the namespace: what a sandbox's traffic to the
// servers amounted to on the wire, TCP/IP headers and retransmissions
// included. Take the difference around the traffic to measure.
func (in *Inet) WireBytes(t testing.TB) uint64 {
	t.Helper()
	l, err := netlink.LinkByName(in.Link)
	if err != nil {
		t.Fatal(err)
	}
	st := l.Attrs().Statistics
	return st.TxBytes - 14*st.TxPackets
}
