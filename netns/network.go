package netns

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// DefaultSubnet is the default sandbox subnet of a host.
var DefaultSubnet = netip.MustParsePrefix("10.253.0.0/16")

const (
	// LinkPrefix starts the name of every host-side sandbox link, followed
	// by the agent's tag and the block index: "sk" + "a1b2" + "17".
	LinkPrefix = "sk"
	// TablePrefix starts the name of each agent's nftables table.
	TablePrefix = "skiff_"
	// PeerName is the sandbox side's name inside its namespace.
	PeerName = "eth0"
)

var tagRE = regexp.MustCompile(`^[a-z0-9]{4}$`)

// NetworkConfig configures a Network.
type NetworkConfig struct {
	// Tag names this agent's links ("sk"+Tag+index) and nftables table
	// ("skiff_"+Tag): four characters [a-z0-9], stable across restarts so
	// a restarted agent finds what a crashed run left.
	Tag    string
	Subnet netip.Prefix // sandbox addresses; default DefaultSubnet
	Logger *slog.Logger
}

// Network gives sandbox namespaces a veth to the host: an address block
// from the subnet, a default route via the host side, NAT and forwarding
// rules on the host. The host's IPv4 forwarding is turned on (and left on:
// other agents on the host may rely on it).
type Network struct {
	log    *slog.Logger
	prefix string // link names start with it
	blocks *Blocks
	fw     firewall
	thread *Thread // configures the sandbox side inside its namespace

	group uint32 // link group of the host sides, for bulk deletion

	mu      sync.Mutex
	veths   map[string]*Veth // guarded by mu: live veths by host-side name
	pending map[string]*Veth // guarded by mu: closed veths whose link still exists
	gone    chan struct{}    // guarded by mu: closed and replaced when a pending link goes
	closed  bool             // guarded by mu

	sweep   chan struct{} // asks the watcher to compare pending with the links
	stop    chan struct{}
	stopped chan struct{}
}

// NewNetwork enables forwarding, removes links a previous run of the same
// tag left, and installs the NAT and forwarding rules.
func NewNetwork(cfg NetworkConfig) (*Network, error) {
	if !tagRE.MatchString(cfg.Tag) {
		return nil, fmt.Errorf("network tag %q: want four characters [a-z0-9]", cfg.Tag)
	}
	if !cfg.Subnet.IsValid() {
		cfg.Subnet = DefaultSubnet
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	blocks, err := NewBlocks(cfg.Subnet)
	if err != nil {
		return nil, err
	}
	n := &Network{
		log:    cfg.Logger,
		prefix: LinkPrefix + cfg.Tag,
		blocks: blocks,
		fw:     firewall{table: TablePrefix + cfg.Tag, linkPrefix: LinkPrefix + cfg.Tag, subnet: blocks.Subnet()},
		group:  linkGroup(cfg.Tag),
		veths:  map[string]*Veth{},

		pending: map[string]*Veth{},
		gone:    make(chan struct{}),
		sweep:   make(chan struct{}, 1),
		stop:    make(chan struct{}),
		stopped: make(chan struct{}),
	}
	if l := len(n.linkName(blocks.Len() - 1)); l > unix.IFNAMSIZ-1 {
		return nil, fmt.Errorf("subnet %s: link names would be %d characters, more than %d", cfg.Subnet, l, unix.IFNAMSIZ-1)
	}
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0); err != nil {
		return nil, fmt.Errorf("enabling ip forwarding: %w", err)
	}
	// Links of a previous run of this tag: all of them at once, then any
	// stragglers by name.
	if err := n.deleteGroup(); err != nil {
		return nil, err
	}
	if _, err := n.deleteLinks(); err != nil {
		return nil, err
	}
	if err := n.checkSubnetFree(); err != nil {
		return nil, err
	}
	if err := n.fw.install(); err != nil {
		return nil, err
	}
	if n.thread, err = newThread(cfg.Logger); err != nil {
		return nil, errors.Join(err, n.fw.remove())
	}
	updates := make(chan netlink.LinkUpdate, 256)
	if err := netlink.LinkSubscribeWithOptions(updates, n.stop, netlink.LinkSubscribeOptions{
		ErrorCallback: func(err error) { n.kickSweep() }, // e.g. lost events: compare with a listing
	}); err != nil {
		n.thread.Close()
		return nil, errors.Join(fmt.Errorf("watching links: %w", err), n.fw.remove())
	}
	go n.watch(updates)
	return n, nil
}

// checkSubnetFree refuses a subnet that routes of other links overlap
// (another agent in this namespace, a VPN, a LAN): sandbox addresses
// there would be misrouted.
func (n *Network) checkSubnetFree() error {
	routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("listing routes: %w", err)
	}
	links := map[int]string{}
	if ls, err := netlink.LinkList(); err == nil {
		for _, l := range ls {
			links[l.Attrs().Index] = l.Attrs().Name
		}
	}
	sub := n.Subnet()
	for _, r := range routes {
		if r.Dst == nil {
			continue // the default route
		}
		ones, _ := r.Dst.Mask.Size()
		a, ok := netip.AddrFromSlice(r.Dst.IP.To4())
		if !ok || ones == 0 {
			continue
		}
		dst := netip.PrefixFrom(a, ones)
		if dst.Overlaps(sub) && !strings.HasPrefix(links[r.LinkIndex], n.prefix) {
			return fmt.Errorf("sandbox subnet %s overlaps route %s on %s: choose another subnet", sub, dst, links[r.LinkIndex])
		}
	}
	return nil
}

// linkGroup is the link group of a tag's host-side links: deleting a
// group removes all its links with one synchronisation in the kernel.
func linkGroup(tag string) uint32 {
	h := uint32(2166136261)
	for _, c := range []byte(tag) {
		h = (h ^ uint32(c)) * 16777619
	}
	return 0x736b0000 | h&0xffff // "sk" in the high half; never 0 (the default group)
}

// Subnet is the sandbox subnet.
func (n *Network) Subnet() netip.Prefix { return n.blocks.Subnet() }

// LinkPrefix is the prefix of this network's host-side link names.
func (n *Network) LinkPrefix() string { return n.prefix }

// Table is the name of this network's nftables table (family ip).
func (n *Network) Table() string { return n.fw.table }

func (n *Network) linkName(index int) string { return n.prefix + strconv.Itoa(index) }

// Veth is one sandbox's link to the host.
type Veth struct {
	n     *Network
	block Block
	name  string
	index int // host-side ifindex

	once     sync.Once
	closedAt time.Time // guarded by n.mu
	after    []func()  // guarded by n.mu: run once the link is gone
	released bool      // guarded by n.mu
}

// AfterRelease arranges for f to run once the veth's link is gone (at
// once if it is already), e.g. to detach eBPF programs cheaply: detaching
// from a live device waits for an RCU grace period, from a removed one it
// does not. f runs on the Network's watcher goroutine: it must not block.
func (v *Veth) AfterRelease(f func()) {
	v.n.mu.Lock()
	if !v.released {
		v.after = append(v.after, f)
		v.n.mu.Unlock()
		return
	}
	v.n.mu.Unlock()
	f()
}

// Block is the veth's address block.
func (v *Veth) Block() Block { return v.block }

// HostName is the host side's link name.
func (v *Veth) HostName() string { return v.name }

// HostIndex is the host side's interface index.
func (v *Veth) HostIndex() int { return v.index }

// Add gives the namespace ns a veth: the peer is created inside ns (never
// moved there), named eth0, with the block's sandbox address and a default
// route via the host side; the host side is up with the block's host
// address.
func (n *Network) Add(ns *NS) (*Veth, error) {
	n.mu.Lock()
	closed := n.closed
	n.mu.Unlock()
	if closed {
		return nil, errors.New("network is closed")
	}
	blk, err := n.blocks.Get()
	if err != nil {
		return nil, err
	}
	v := &Veth{n: n, block: blk, name: n.linkName(blk.Index)}
	n.mu.Lock()
	if p := n.pending[v.name]; p != nil {
		// Cannot happen: a block is free only once its link is gone.
		n.mu.Unlock()
		return nil, fmt.Errorf("link %s is still being removed", v.name)
	}
	n.mu.Unlock()
	if err := n.create(v, ns); err != nil {
		// The link may exist half-configured: delete it before the block
		// can be handed out again.
		derr := n.deleteLink(v.name)
		if derr == nil {
			n.blocks.Put(blk)
		}
		return nil, errors.Join(err, derr)
	}
	n.mu.Lock()
	n.veths[v.name] = v
	n.mu.Unlock()
	return v, nil
}

func (n *Network) create(v *Veth, ns *NS) error {
	fd := ns.Fd()
	if fd < 0 {
		return errors.New("creating veth: netns is closed")
	}
	la := netlink.NewLinkAttrs()
	la.Name = v.name
	la.Flags = net.FlagUp
	la.Group = n.group
	veth := &netlink.Veth{LinkAttrs: la, PeerName: PeerName, PeerNamespace: netlink.NsFd(fd)}
	if err := netlink.LinkAdd(veth); err != nil {
		return fmt.Errorf("creating veth %s: %w", v.name, err)
	}
	v.index = veth.Index
	hostAddr := &netlink.Addr{IPNet: ipNet(v.block.Host, v.block.Prefix.Bits())}
	if err := netlink.AddrAdd(veth, hostAddr); err != nil {
		return fmt.Errorf("adding %s to %s: %w", v.block.Host, v.name, err)
	}
	// The sandbox side, configured from inside its namespace.
	return n.thread.Run(ns, func() error {
		h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return fmt.Errorf("netlink in the sandbox netns: %w", err)
		}
		defer h.Close()
		peer, err := h.LinkByName(PeerName)
		if err != nil {
			return fmt.Errorf("finding %s in the sandbox netns: %w", PeerName, err)
		}
		if err := h.AddrAdd(peer, &netlink.Addr{IPNet: ipNet(v.block.Peer, v.block.Prefix.Bits())}); err != nil {
			return fmt.Errorf("adding %s to %s: %w", v.block.Peer, PeerName, err)
		}
		if err := h.LinkSetUp(peer); err != nil {
			return fmt.Errorf("setting %s up: %w", PeerName, err)
		}
		gw := v.block.Host.AsSlice()
		if err := h.RouteAdd(&netlink.Route{LinkIndex: peer.Attrs().Index, Gw: gw}); err != nil {
			return fmt.Errorf("adding the default route via %s: %w", v.block.Host, err)
		}
		return nil
	})
}

// Close releases the veth. Its link is not deleted here: deleting a veth
// costs ~30 ms of kernel synchronisation, while the kernel destroys it
// with the sandbox's namespace, batched with other namespaces, once the
// namespace's last reference (its processes, sockets and descriptor) is
// gone. The address block is released when the link is gone, so no two
// sandboxes ever hold the same address. A link still there after
// lingerTimeout is deleted explicitly. Close is idempotent.
func (v *Veth) Close() error {
	v.once.Do(func() {
		n := v.n
		n.mu.Lock()
		delete(n.veths, v.name)
		v.closedAt = time.Now()
		n.pending[v.name] = v
		n.mu.Unlock()
		n.kickSweep()
	})
	return nil
}

// lingerTimeout bounds how long a closed veth's link may outlive its
// Close before it is deleted explicitly (something still holds the
// namespace).
const lingerTimeout = 10 * time.Second

func (n *Network) kickSweep() {
	select {
	case n.sweep <- struct{}{}:
	default:
	}
}

// watch releases the blocks of closed veths as their links disappear:
// on link deletion events, and on a sweep that compares the pending links
// with a listing (after a Close, periodically while links are pending,
// and when events were lost).
func (n *Network) watch(updates <-chan netlink.LinkUpdate) {
	defer close(n.stopped)
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-n.stop:
			return
		case u, ok := <-updates:
			if !ok {
				// The subscription ended (an error): resubscribe and sweep.
				updates = n.resubscribe()
				n.sweepPending()
				continue
			}
			if u.Header.Type == unix.RTM_DELLINK && u.Link != nil {
				n.released(u.Link.Attrs().Name)
			}
		case <-n.sweep:
			n.sweepPending()
		case <-tick.C:
			n.mu.Lock()
			busy := len(n.pending) > 0
			n.mu.Unlock()
			if busy {
				n.sweepPending()
			}
		}
	}
}

func (n *Network) resubscribe() <-chan netlink.LinkUpdate {
	for {
		updates := make(chan netlink.LinkUpdate, 256)
		err := netlink.LinkSubscribeWithOptions(updates, n.stop, netlink.LinkSubscribeOptions{
			ErrorCallback: func(error) { n.kickSweep() },
		})
		if err == nil {
			return updates
		}
		n.log.Error("watching links", "err", err)
		select {
		case <-n.stop:
			return nil
		case <-time.After(time.Second):
		}
	}
}

// released releases the block of a pending veth whose link is gone and
// runs its AfterRelease functions.
func (n *Network) released(name string) {
	n.mu.Lock()
	v := n.pending[name]
	if v == nil {
		n.mu.Unlock()
		return
	}
	delete(n.pending, name)
	n.blocks.Put(v.block)
	v.released = true
	after := v.after
	v.after = nil
	close(n.gone)
	n.gone = make(chan struct{})
	n.mu.Unlock()
	for _, f := range after {
		f()
	}
}

// sweepPending releases pending veths whose links are gone and deletes
// the links that lingered too long.
func (n *Network) sweepPending() {
	n.mu.Lock()
	if len(n.pending) == 0 {
		n.mu.Unlock()
		return
	}
	n.mu.Unlock()
	names, err := n.Links()
	if err != nil {
		n.log.Error("listing sandbox links", "err", err)
		return
	}
	present := map[string]bool{}
	for _, name := range names {
		present[name] = true
	}
	var gone, stale []string
	n.mu.Lock()
	for name, v := range n.pending {
		switch {
		case !present[name]:
			gone = append(gone, name)
		case time.Since(v.closedAt) > lingerTimeout:
			stale = append(stale, name)
		}
	}
	n.mu.Unlock()
	for _, name := range gone {
		n.released(name)
	}
	for _, name := range stale {
		n.log.Warn("deleting a sandbox link that outlived its sandbox", "link", name)
		if err := n.deleteLink(name); err != nil {
			n.log.Error("deleting sandbox link", "link", name, "err", err)
			continue
		}
		n.released(name)
	}
}

// WaitReleased waits until every closed veth's link is gone (their blocks
// are free), or timeout passes; it reports whether none is pending.
func (n *Network) WaitReleased(timeout time.Duration) bool {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		n.mu.Lock()
		left, gone := len(n.pending), n.gone
		n.mu.Unlock()
		if left == 0 {
			return true
		}
		n.kickSweep()
		select {
		case <-gone:
		case <-deadline.C:
			return false
		}
	}
}

// deleteGroup deletes every host link of this network's group at once.
func (n *Network) deleteGroup() error {
	req := nl.NewNetlinkRequest(unix.RTM_DELLINK, unix.NLM_F_ACK)
	req.AddData(nl.NewIfInfomsg(unix.AF_UNSPEC))
	req.AddData(nl.NewRtAttr(unix.IFLA_GROUP, nl.Uint32Attr(n.group)))
	_, err := req.Execute(unix.NETLINK_ROUTE, 0)
	if err == nil || errors.Is(err, unix.ENODEV) {
		return nil
	}
	return fmt.Errorf("deleting link group %#x: %w", n.group, err)
}

func (n *Network) deleteLink(name string) error {
	// By name, in one request (netlink.LinkDel looks the index up first).
	req := nl.NewNetlinkRequest(unix.RTM_DELLINK, unix.NLM_F_ACK)
	req.AddData(nl.NewIfInfomsg(unix.AF_UNSPEC))
	req.AddData(nl.NewRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated(name)))
	_, err := req.Execute(unix.NETLINK_ROUTE, 0)
	if err == nil || errors.Is(err, unix.ENODEV) {
		return nil
	}
	return fmt.Errorf("deleting link %s: %w", name, err)
}

// Links lists the host's links named with this network's prefix.
func (n *Network) Links() ([]string, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("listing links: %w", err)
	}
	var out []string
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, n.prefix) {
			out = append(out, l.Attrs().Name)
		}
	}
	return out, nil
}

// deleteLinks deletes every link with this network's prefix that no live
// Veth holds.
func (n *Network) deleteLinks() (int, error) {
	names, err := n.Links()
	if err != nil {
		return 0, err
	}
	n.mu.Lock()
	live := map[string]bool{}
	for name := range n.veths {
		live[name] = true
	}
	for name := range n.pending {
		live[name] = true // going away on its own
	}
	n.mu.Unlock()
	var errsOut []error
	deleted := 0
	for _, name := range names {
		if live[name] {
			continue
		}
		if err := n.deleteLink(name); err != nil {
			errsOut = append(errsOut, err)
			continue
		}
		deleted++
	}
	return deleted, errors.Join(errsOut...)
}

// Reclaim removes links with this network's prefix that no Veth holds (a
// crashed run's, normally gone already with their namespaces) and
// reinstalls the nftables table. It returns how many links it deleted.
func (n *Network) Reclaim() (int, error) {
	deleted, err := n.deleteLinks()
	if ierr := n.fw.install(); ierr != nil {
		err = errors.Join(err, ierr)
	}
	if deleted > 0 {
		n.log.Info("reclaimed sandbox links", "links", deleted)
	}
	return deleted, err
}

// Close waits briefly for the links of closed veths to go with their
// namespaces, then deletes every link left (of live veths too) and the
// nftables table.
func (n *Network) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	n.mu.Unlock()
	n.WaitReleased(2 * time.Second)
	close(n.stop)
	<-n.stopped
	errsOut := []error{n.deleteGroup()}
	n.mu.Lock()
	var after []func()
	for _, v := range n.pending {
		v.released = true
		after = append(after, v.after...)
		v.after = nil
	}
	n.veths, n.pending = map[string]*Veth{}, map[string]*Veth{}
	n.mu.Unlock()
	if _, err := n.deleteLinks(); err != nil {
		errsOut = append(errsOut, err)
	}
	for _, f := range after {
		f()
	}
	errsOut = append(errsOut, n.fw.remove())
	n.thread.Close()
	return errors.Join(errsOut...)
}

func ipNet(a netip.Addr, bits int) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, 32)}
}

// HostAddrs lists the host's IPv4 addresses outside exclude (the sandbox
// subnet): what a sandbox must not reach unless a service is allowed.
func HostAddrs(exclude netip.Prefix) ([]netip.Addr, error) {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("listing host addresses: %w", err)
	}
	var out []netip.Addr
	seen := map[netip.Addr]bool{}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP.To4())
		if !ok || exclude.Contains(ip) || seen[ip] {
			continue
		}
		seen[ip] = true
		out = append(out, ip)
	}
	return out, nil
}
