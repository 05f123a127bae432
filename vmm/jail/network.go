package jail

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"skiff.dev/skiff/ebpf"
	"skiff.dev/skiff/netns"
)

// NetConfig enables sandbox networking: a veth per sandbox with a Network
// spec, routed and NATed on the host, with the eBPF egress policy attached
// to its host side.
type NetConfig struct {
	// Tag names the agent's links and nftables table (four characters
	// [a-z0-9]); default: derived from RunDir, so a restarted agent with
	// the same RunDir reclaims what a crashed run left.
	Tag string
	// Subnet holds the sandboxes' addresses, a /30 each; default
	// netns.DefaultSubnet. Agents sharing a network namespace need
	// disjoint subnets.
	Subnet netip.Prefix
	// Resolver is the DNS server in each sandbox's /etc/resolv.conf, and
	// reachable on port 53 whatever the policy (unless denied); default
	// the host's first usable nameserver (netns.HostResolver), or 1.1.1.1.
	Resolver netip.Addr
	// HostServices are host addresses and ports every sandbox may reach.
	HostServices []netip.AddrPort
	// EBPF is the loaded policy programs; nil: the jail loads them (and
	// unloads them on Close).
	EBPF *ebpf.Manager
}

// NetSpec is a sandbox's network: egress through a veth under Policy.
type NetSpec struct {
	Policy ebpf.Policy
}

// sandboxNet is the Manager's networking state (nil without NetConfig).
type sandboxNet struct {
	cfg      NetConfig
	net      *netns.Network
	bpf      *ebpf.Manager
	ownBPF   bool
	resolver netip.Addr
	stop     chan struct{}
	stopped  chan struct{}
}

func newSandboxNet(cfg NetConfig, runDir string, m *Manager) (_ *sandboxNet, err error) {
	if cfg.Tag == "" {
		sum := sha256.Sum256([]byte(runDir))
		cfg.Tag = hex.EncodeToString(sum[:2])
	}
	if !cfg.Subnet.IsValid() {
		cfg.Subnet = netns.DefaultSubnet
	}
	if !cfg.Resolver.IsValid() {
		cfg.Resolver = netns.HostResolver("/etc/resolv.conf")
	}
	if !cfg.Resolver.Is4() {
		return nil, fmt.Errorf("jail: resolver %s: must be IPv4", cfg.Resolver)
	}
	n := &sandboxNet{cfg: cfg, resolver: cfg.Resolver, bpf: cfg.EBPF, stop: make(chan struct{}), stopped: make(chan struct{})}
	if n.bpf == nil {
		if n.bpf, err = ebpf.New(m.log); err != nil {
			return nil, fmt.Errorf("jail: %w", err)
		}
		n.ownBPF = true
	}
	defer func() {
		if err != nil && n.ownBPF {
			n.bpf.Close()
		}
	}()
	if n.net, err = netns.NewNetwork(netns.NetworkConfig{Tag: cfg.Tag, Subnet: cfg.Subnet, Logger: m.log}); err != nil {
		return nil, fmt.Errorf("jail: %w", err)
	}
	if err := n.refreshGlobal(); err != nil {
		return nil, errors.Join(err, n.net.Close())
	}
	updates := make(chan netlink.AddrUpdate, 64)
	if err := netlink.AddrSubscribeWithOptions(updates, n.stop, netlink.AddrSubscribeOptions{}); err != nil {
		return nil, errors.Join(fmt.Errorf("jail: watching host addresses: %w", err), n.net.Close())
	}
	go n.watchAddrs(updates, m)
	return n, nil
}

// refreshGlobal gives the policy programs the host's current addresses.
func (n *sandboxNet) refreshGlobal() error {
	addrs, err := netns.HostAddrs(n.net.Subnet())
	if err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	g := ebpf.Global{SandboxSubnet: n.net.Subnet(), HostAddrs: addrs, HostServices: n.cfg.HostServices}
	if err := n.bpf.SetGlobal(g); err != nil {
		return fmt.Errorf("jail: setting the host-wide egress policy: %w", err)
	}
	return nil
}

// watchAddrs refreshes the host addresses the policy protects whenever
// an address outside the sandbox subnet comes or goes.
func (n *sandboxNet) watchAddrs(updates chan netlink.AddrUpdate, m *Manager) {
	defer close(n.stopped)
	for {
		select {
		case <-n.stop:
			return
		case u, ok := <-updates:
			if !ok {
				// The subscription failed: poll once and resubscribe.
				if err := n.refreshGlobal(); err != nil {
					m.log.Error("refreshing host addresses", "err", err)
				}
				updates = make(chan netlink.AddrUpdate, 64)
				if err := netlink.AddrSubscribeWithOptions(updates, n.stop, netlink.AddrSubscribeOptions{}); err != nil {
					m.log.Error("watching host addresses; no longer following changes", "err", err)
					<-n.stop
					return
				}
				continue
			}
			a, ok := netip.AddrFromSlice(u.LinkAddress.IP.To4())
			if !ok || n.net.Subnet().Contains(a) {
				continue // a sandbox veth's own address, or IPv6
			}
			if err := n.refreshGlobal(); err != nil {
				m.log.Error("refreshing host addresses", "err", err)
			}
		}
	}
}

// policy is spec's policy with the resolver opened on port 53 (a deny
// rule can still close it).
func (n *sandboxNet) policy(spec *NetSpec) ebpf.Policy {
	p := spec.Policy
	dns := ebpf.Rule{Prefix: netip.PrefixFrom(n.resolver, 32), Ports: ebpf.PortRange{Lo: 53, Hi: 53}}
	p.Allow = append([]ebpf.Rule{dns}, p.Allow...)
	return p
}

func (n *sandboxNet) close() error {
	close(n.stop)
	<-n.stopped
	err := n.net.Close()
	if n.ownBPF {
		err = errors.Join(err, n.bpf.Close())
	}
	return err
}

// RefreshHostAddrs re-reads the host's addresses for the egress policy
// (it follows address changes by itself; this is for callers that must
// know the policy is current, e.g. right after adding an address).
func (m *Manager) RefreshHostAddrs() error {
	if m.net == nil {
		return errors.New("jail: networking is not enabled")
	}
	return m.net.refreshGlobal()
}

// Network is the sandboxes' netns.Network (nil without NetConfig).
func (m *Manager) Network() *netns.Network {
	if m.net == nil {
		return nil
	}
	return m.net.net
}

// defaultPolicy is the policy of a sandbox with egress and no allow or
// deny rules of its own (most functions): pre-started inits get their
// veth with it attached.
var defaultPolicy = NetSpec{Policy: ebpf.Policy{Egress: true}}

// addVeth gives s (forked, not yet claimed) its veth with the default
// policy attached. Attaching costs two RCU grace periods in the kernel
// (tens of milliseconds on a small VM), so pre-started inits pay it, not
// Start.
func (m *Manager) addVeth(s *Sandbox) error {
	v, err := m.net.net.Add(s.ns)
	if err != nil {
		return err
	}
	s.veth = v
	s.cleanup = append(s.cleanup, s.releaseNet)
	return m.attach(s, &defaultPolicy)
}

func (m *Manager) attach(s *Sandbox, spec *NetSpec) error {
	att, err := m.net.bpf.Attach(s.veth.HostIndex(), m.net.policy(spec))
	if err != nil {
		return fmt.Errorf("attaching the egress policy: %w", err)
	}
	s.att, s.attSpec = att, spec
	return nil
}

// prepareNet makes s's network match spec before the function runs: a
// veth (added now when s has none) with spec's policy attached (replacing
// the default one when the spec has rules of its own).
func (m *Manager) prepareNet(s *Sandbox, spec *Spec) error {
	if spec.Network == nil {
		if s.veth != nil {
			return errors.New("jail: a sandbox without network was given an init with a veth")
		}
		return nil
	}
	if s.veth == nil {
		if err := m.addVeth(s); err != nil {
			return err
		}
	}
	if samePolicy(s.attSpec, spec.Network) {
		return nil
	}
	// Rewriting the policy maps in place costs microseconds; replacing
	// the attachment costs four RCU grace periods. Used when package
	// ebpf offers it.
	if u, ok := any(s.att).(policyUpdater); ok {
		if err := u.Update(m.net.policy(spec.Network)); err != nil {
			return fmt.Errorf("updating the egress policy: %w", err)
		}
		s.attSpec = spec.Network
		return nil
	}
	att := s.att
	s.att, s.attSpec = nil, nil
	if err := att.Close(); err != nil {
		return fmt.Errorf("detaching the default egress policy: %w", err)
	}
	// A fork in flight (the pool's) holds copies of the agent's
	// descriptors, the old TCX links' too, until it execs: the kernel
	// detaches them only then, and attaching again meanwhile finds them
	// (EEXIST). Retry briefly.
	var err error
	for delay := 100 * time.Microsecond; ; delay *= 2 {
		err = m.attach(s, spec.Network)
		if !errors.Is(err, unix.EEXIST) || delay > 100*time.Millisecond {
			return err
		}
		time.Sleep(delay)
	}
}

// policyUpdater replaces an attachment's policy without detaching.
type policyUpdater interface {
	Update(ebpf.Policy) error
}

func samePolicy(a, b *NetSpec) bool {
	return a != nil && b != nil && a.Policy.Egress == b.Policy.Egress &&
		slices.Equal(a.Policy.Allow, b.Policy.Allow) && slices.Equal(a.Policy.Deny, b.Policy.Deny)
}

// releaseNet ends the sandbox's processes first (the function must never
// run with its veth but without its policy), then releases the veth. The
// policy is detached once the veth is gone with the sandbox's namespace,
// when detaching is cheap.
func (s *Sandbox) releaseNet() error {
	_ = s.Kill() // reported by the process's own cleanup
	<-s.done
	if att := s.att; att != nil {
		log := s.m.log
		s.veth.AfterRelease(func() {
			if err := att.Close(); err != nil {
				log.Error("detaching a sandbox's egress policy", "err", err)
			}
		})
	}
	return s.veth.Close()
}

// NetCounters are the sandbox's network counters (bytes and packets in
// and out, drops by reason) since it started. A sandbox without network
// has none.
func (s *Sandbox) NetCounters() (ebpf.Counters, error) {
	if s.att == nil {
		return ebpf.Counters{}, errors.New("jail: sandbox has no network")
	}
	return s.att.Counters()
}

// Veth is the sandbox's veth (nil without network): its address block,
// its host side's name and index.
func (s *Sandbox) Veth() *netns.Veth { return s.veth }
