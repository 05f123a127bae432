package gossip

import (
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// MemNetwork is an in-memory network of memberlist transports for tests and
// simulations. It follows memberlist's MockNetwork but behaves like a real
// network where the mock does not: it is safe to add members while others
// run, packets to a full or stopped member are dropped (as UDP drops them)
// instead of blocking the sender forever, and dialing a stopped member
// fails. Without the last two, a stopped member would wedge its peers and
// failure detection could not be tested.
type MemNetwork struct {
	mu     sync.RWMutex
	byAddr map[string]*MemTransport // guarded by mu
	port   int                      // guarded by mu
}

// NewMemNetwork returns an empty network.
func NewMemNetwork() *MemNetwork {
	return &MemNetwork{byAddr: make(map[string]*MemTransport)}
}

// memPacketQueue bounds each member's inbound packets, like a socket buffer.
const memPacketQueue = 4096

// NewTransport adds a member with a fresh address (127.0.0.1:port).
func (n *MemNetwork) NewTransport() *MemTransport {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.port++
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(10000+n.port))
	t := &MemTransport{
		net:      n,
		addr:     memAddr(addr),
		packetCh: make(chan *memberlist.Packet, memPacketQueue),
		streamCh: make(chan net.Conn, 64),
		done:     make(chan struct{}),
	}
	n.byAddr[addr] = t
	return t
}

func (n *MemNetwork) peer(addr string) *MemTransport {
	n.mu.RLock()
	defer n.mu.RUnlock()
	return n.byAddr[addr]
}

type memAddr string

func (a memAddr) Network() string { return "mem" }
func (a memAddr) String() string  { return string(a) }

// MemTransport is one member's memberlist.Transport on a MemNetwork.
type MemTransport struct {
	net      *MemNetwork
	addr     memAddr
	packetCh chan *memberlist.Packet
	streamCh chan net.Conn
	once     sync.Once
	done     chan struct{}
}

var _ memberlist.Transport = (*MemTransport)(nil)

// Addr is the member's address on the network.
func (t *MemTransport) Addr() string { return string(t.addr) }

// FinalAdvertiseAddr implements memberlist.Transport.
func (t *MemTransport) FinalAdvertiseAddr(string, int) (net.IP, int, error) {
	host, port, err := net.SplitHostPort(string(t.addr))
	if err != nil {
		return nil, 0, err
	}
	p, err := strconv.Atoi(port)
	if err != nil {
		return nil, 0, err
	}
	return net.ParseIP(host), p, nil
}

// WriteTo implements memberlist.Transport. A packet to an unknown, stopped
// or congested member is silently dropped.
func (t *MemTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	now := time.Now()
	dest := t.net.peer(addr)
	if dest == nil {
		return now, nil
	}
	p := &memberlist.Packet{Buf: append([]byte(nil), b...), From: t.addr, Timestamp: now}
	select {
	case <-dest.done:
	case dest.packetCh <- p:
	default:
	}
	return now, nil
}

// PacketCh implements memberlist.Transport.
func (t *MemTransport) PacketCh() <-chan *memberlist.Packet { return t.packetCh }

// DialTimeout implements memberlist.Transport.
func (t *MemTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	dest := t.net.peer(addr)
	if dest == nil {
		return nil, fmt.Errorf("dialing %s: no route to host", addr)
	}
	p1, p2 := net.Pipe()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case dest.streamCh <- p1:
		return p2, nil
	case <-dest.done:
	case <-timer.C:
	}
	_ = p1.Close()
	_ = p2.Close()
	return nil, fmt.Errorf("dialing %s: connection refused", addr)
}

// StreamCh implements memberlist.Transport.
func (t *MemTransport) StreamCh() <-chan net.Conn { return t.streamCh }

// Shutdown implements memberlist.Transport: the member leaves the network,
// so later packets to it are dropped and dials fail.
func (t *MemTransport) Shutdown() error {
	t.once.Do(func() {
		t.net.mu.Lock()
		if t.net.byAddr[string(t.addr)] == t {
			delete(t.net.byAddr, string(t.addr))
		}
		t.net.mu.Unlock()
		close(t.done)
	})
	return nil
}
