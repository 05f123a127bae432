package netns_test

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"testing"
	"time"

	"skiff.dev/skiff/ebpf"
	"skiff.dev/skiff/internal/testutil"
	"skiff.dev/skiff/netns"
	"skiff.dev/skiff/netns/nettest"
)

// BenchmarkThroughput measures a sandbox namespace's TCP throughput to a
// server namespace through its veth, the host's forwarding and NAT:
// without eBPF programs, and with the egress policy and counters attached
// to the veth's host side. The MB/s ratio of the two is the policy's
// cost.
func BenchmarkThroughput(b *testing.B) {
	testutil.RequirePrivileged(b)
	subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(200 + rand.IntN(8)), byte(rand.IntN(256)), 0}), 24)
	n, err := netns.NewNetwork(netns.NetworkConfig{Tag: fmt.Sprintf("b%03x", rand.IntN(0x1000)), Subnet: subnet})
	if err != nil {
		b.Fatal(err)
	}
	defer n.Close()
	inet := nettest.New(b, netip.MustParsePrefix("198.51.100.32/28"), subnet)
	bm, err := ebpf.New(nil)
	if err != nil {
		b.Fatal(err)
	}
	defer bm.Close()
	addrs, err := netns.HostAddrs(subnet)
	if err != nil {
		b.Fatal(err)
	}
	if err := bm.SetGlobal(ebpf.Global{SandboxSubnet: subnet, HostAddrs: addrs}); err != nil {
		b.Fatal(err)
	}
	pool, err := netns.NewPool(netns.PoolConfig{Size: 1})
	if err != nil {
		b.Fatal(err)
	}
	defer pool.Close()
	th, err := netns.NewThread()
	if err != nil {
		b.Fatal(err)
	}
	defer th.Close()

	const chunk = 256 << 10
	const perOp = 64 << 20
	for _, withBPF := range []bool{false, true} {
		name := "no-ebpf"
		if withBPF {
			name = "ebpf"
		}
		b.Run(name, func(b *testing.B) {
			ns, err := pool.Get()
			if err != nil {
				b.Fatal(err)
			}
			defer ns.Close()
			v, err := n.Add(ns)
			if err != nil {
				b.Fatal(err)
			}
			defer v.Close()
			if withBPF {
				att, err := bm.Attach(v.HostIndex(), ebpf.Policy{Egress: true})
				if err != nil {
					b.Fatal(err)
				}
				defer att.Close()
			}
			var c net.Conn
			if err := th.Run(ns, func() (err error) {
				c, err = net.DialTimeout("tcp4", inet.Addr(nettest.TCPPort), 5*time.Second)
				return err
			}); err != nil {
				b.Fatal(err)
			}
			buf := make([]byte, chunk)
			b.SetBytes(perOp)
			for b.Loop() {
				for sent := 0; sent < perOp; sent += chunk {
					if _, err := c.Write(buf); err != nil {
						b.Fatal(err)
					}
				}
			}
			c.(*net.TCPConn).CloseWrite()
			c.SetReadDeadline(time.Now().Add(30 * time.Second))
			reply := make([]byte, 64)
			k, _ := c.Read(reply)
			c.Close()
			got := <-inet.Received
			if want := int64(b.N) * perOp; got != want {
				b.Fatalf("server received %d bytes, want %d (reply %q)", got, want, reply[:k])
			}
		})
	}
}
