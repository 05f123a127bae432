//go:build linux && (386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64)

package ebpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"skiff.dev/skiff/internal/errs"
)

// Manager owns the loaded programs and maps; one per agent. It is safe for
// concurrent use.
type Manager struct {
	log  *slog.Logger
	objs egressObjects
	ncpu int
	// forceLegacy makes Attach use legacy tc even when TCX works (tests).
	forceLegacy bool
	// noTCX is set once the kernel said it has no TCX.
	noTCX atomic.Bool

	mu     sync.Mutex
	global Global                    // guarded by mu: what the global maps hold
	atts   map[int]*Attachment       // guarded by mu: by host ifindex, reserved before attaching
	closed bool                      // guarded by mu
	hostSv map[egressServiceKey]bool // guarded by mu: host_services keys in the map
}

// New loads the programs and maps into the kernel. It needs root (or
// CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON); without them, or on a kernel
// without the needed eBPF support, it returns an Unavailable error saying so.
func New(log *slog.Logger) (*Manager, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// A no-op on kernels that account BPF memory to the cgroup (5.11+).
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, errs.Unavailable("ebpf: raising the memlock limit: %w", err)
	}
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, errs.Unavailable("ebpf: counting possible cpus: %w", err)
	}
	m := &Manager{log: log, ncpu: ncpu, atts: map[int]*Attachment{}, hostSv: map[egressServiceKey]bool{}}
	if err := loadEgressObjects(&m.objs, nil); err != nil {
		var ve *ebpf.VerifierError
		switch {
		case errors.Is(err, unix.EPERM) || errors.Is(err, os.ErrPermission):
			return nil, errs.Unavailable("ebpf: loading the egress programs needs root or CAP_BPF+CAP_NET_ADMIN: %w", err)
		case errors.Is(err, ebpf.ErrNotSupported):
			return nil, errs.Unavailable("ebpf: this kernel lacks eBPF features the egress programs need: %w", err)
		case errors.As(err, &ve):
			log.Error("ebpf verifier rejected the egress programs", "log", fmt.Sprintf("%+v", ve))
		}
		return nil, errs.Unavailable("ebpf: loading the egress programs: %w", err)
	}
	for _, s := range specialRanges {
		p := netip.MustParsePrefix(s.prefix)
		key := egressSpecialKey{Prefixlen: uint32(p.Bits()), Addr: addrKey(p.Addr())}
		if err := m.objs.SpecialRanges.Put(key, uint8(s.reason)); err != nil {
			m.objs.Close()
			return nil, errs.Internal("ebpf: storing special range %s: %w", p, err)
		}
	}
	return m, nil
}

// addrKey returns an IPv4 address as the uint32 whose memory holds it in
// network byte order, as the programs read it from packets.
func addrKey(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

// portKey returns a port as the uint16 whose memory holds it in network
// byte order.
func portKey(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

// SetGlobal replaces the host-wide policy: the sandbox subnet, the host's
// addresses and the host services sandboxes may reach.
func (m *Manager) SetGlobal(g Global) error {
	var glob egressGlobal
	if g.SandboxSubnet.IsValid() {
		p := g.SandboxSubnet
		if !p.Addr().Is4() || p.Bits() == 0 || p.Masked() != p {
			return errs.Invalid("sandbox_subnet", "sandbox subnet %s must be an IPv4 prefix without host bits, longer than /0", p)
		}
		mask := netip.PrefixFrom(netip.AddrFrom4([4]byte{255, 255, 255, 255}), p.Bits()).Masked().Addr()
		glob = egressGlobal{SubnetAddr: addrKey(p.Addr()), SubnetMask: addrKey(mask), SubnetPlen: uint32(p.Bits()), SubnetSet: 1}
	}
	addrs := map[uint32]bool{}
	for _, a := range g.HostAddrs {
		if a = a.Unmap(); a.Is4() {
			addrs[addrKey(a)] = true
		}
	}
	services := map[egressServiceKey]bool{}
	for _, s := range g.HostServices {
		a := s.Addr().Unmap()
		if !a.Is4() {
			continue
		}
		if s.Port() == 0 {
			return errs.Invalid("host_services", "host service %s has no port", s)
		}
		for _, proto := range []uint8{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
			services[egressServiceKey{Addr: addrKey(a), Port: portKey(s.Port()), Proto: proto}] = true
		}
	}

	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return errs.New(errs.KindFailedPrecondition, "ebpf: manager is closed")
	}
	for a := range addrs {
		if err := m.objs.HostAddrs.Put(a, uint8(1)); err != nil {
			return errs.Internal("ebpf: storing host address: %w", err)
		}
	}
	for k := range services {
		if err := m.objs.HostServices.Put(k, uint8(1)); err != nil {
			return errs.Internal("ebpf: storing host service: %w", err)
		}
	}
	if err := m.objs.Globals.Put(uint32(0), glob); err != nil {
		return errs.Internal("ebpf: storing the sandbox subnet: %w", err)
	}
	for _, a := range m.global.HostAddrs {
		if a = a.Unmap(); a.Is4() && !addrs[addrKey(a)] {
			if err := deleteKey(m.objs.HostAddrs, addrKey(a)); err != nil {
				return errs.Internal("ebpf: removing host address %s: %w", a, err)
			}
		}
	}
	for k := range m.hostSv {
		if !services[k] {
			if err := deleteKey(m.objs.HostServices, k); err != nil {
				return errs.Internal("ebpf: removing host service: %w", err)
			}
		}
	}
	m.global = Global{
		SandboxSubnet: g.SandboxSubnet,
		HostAddrs:     append([]netip.Addr(nil), g.HostAddrs...),
		HostServices:  append([]netip.AddrPort(nil), g.HostServices...),
	}
	m.hostSv = services
	return nil
}

// deleteKey deletes key from mp; a missing key is not an error.
func deleteKey(mp *ebpf.Map, key any) error {
	if err := mp.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return err
	}
	return nil
}

// Attachment is the programs attached to one sandbox veth and the sandbox's
// entries in the maps.
type Attachment struct {
	m       *Manager
	ifindex int
	allow   []egressRuleKey
	deny    []egressRuleKey
	mode    string // "tcx" or "tc"

	links []link.Link // TCX

	nl      *netlink.Handle // legacy tc: a socket in the veth's netns
	filters []*netlink.BpfFilter
	qdisc   *netlink.GenericQdisc // non-nil when Attach created it
	// setupMu is held while Attach sets up, so a concurrent Manager.Close
	// waits for it before closing the attachment.
	setupMu   sync.Mutex
	closeOnce sync.Once
	closeErr  error
}

// Attach stores p for the sandbox whose veth has hostIfindex on the host
// side (in the calling thread's network namespace) and attaches the
// programs there: ingress (packets from the sandbox: policy and out
// counters) and egress (packets to the sandbox: in counters). It uses TCX,
// and legacy tc (a clsact qdisc and direct-action bpf filters) when the
// kernel has no TCX. A second Attach to the same ifindex before Close is a
// Conflict.
func (m *Manager) Attach(hostIfindex int, p Policy) (*Attachment, error) {
	if hostIfindex <= 0 {
		return nil, errs.Invalid("ifindex", "ebpf: bad interface index %d", hostIfindex)
	}
	allow, err := buildEntries(p.Allow)
	if err != nil {
		return nil, fmt.Errorf("allow rules: %w", err)
	}
	deny, err := buildEntries(p.Deny)
	if err != nil {
		return nil, fmt.Errorf("deny rules: %w", err)
	}

	a := &Attachment{m: m, ifindex: hostIfindex}
	a.setupMu.Lock()
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		a.setupMu.Unlock()
		return nil, errs.New(errs.KindFailedPrecondition, "ebpf: manager is closed")
	}
	if _, ok := m.atts[hostIfindex]; ok {
		m.mu.Unlock()
		a.setupMu.Unlock()
		return nil, errs.Conflict("ebpf: interface %d already has an attachment", hostIfindex)
	}
	m.atts[hostIfindex] = a // reserved: the slow work below runs unlocked
	m.mu.Unlock()

	err = a.setup(p.Egress, allow, deny)
	a.setupMu.Unlock()
	if err != nil {
		return nil, errors.Join(err, a.Close())
	}
	m.mu.Lock()
	closed := m.closed
	m.mu.Unlock()
	if closed {
		return nil, errors.Join(errs.New(errs.KindFailedPrecondition, "ebpf: manager is closed"), a.Close())
	}
	m.log.Debug("ebpf programs attached", "ifindex", hostIfindex, "mode", a.mode,
		"egress", p.Egress, "allow", len(p.Allow), "deny", len(p.Deny))
	return a, nil
}

func (a *Attachment) setup(egress bool, allow, deny []lpmEntry) error {
	if err := a.storeMaps(egress, allow, deny); err != nil {
		return err
	}
	return a.attach()
}

// storeMaps writes the sandbox's policy, zeroed counters and rules.
func (a *Attachment) storeMaps(egress bool, allow, deny []lpmEntry) error {
	m := a.m
	ifx := uint32(a.ifindex)
	pol := egressPolicy{}
	if egress {
		pol.Egress = 1
	}
	// Maps first: the programs must find the policy from the first packet.
	if err := m.objs.Policies.Put(ifx, pol); err != nil {
		return errs.Internal("ebpf: storing policy for interface %d: %w", a.ifindex, err)
	}
	if err := m.objs.SandboxCounters.Put(ifx, make([]egressCounters, m.ncpu)); err != nil {
		return errs.Internal("ebpf: creating counters for interface %d: %w", a.ifindex, err)
	}
	var err error
	if a.allow, err = putRules(m.objs.AllowRules, ifx, allow); err != nil {
		return errs.Internal("ebpf: storing allow rules for interface %d: %w", a.ifindex, err)
	}
	if a.deny, err = putRules(m.objs.DenyRules, ifx, deny); err != nil {
		return errs.Internal("ebpf: storing deny rules for interface %d: %w", a.ifindex, err)
	}
	return nil
}

// attach attaches the programs with TCX, or legacy tc without TCX.
func (a *Attachment) attach() error {
	m := a.m
	if !m.forceLegacy && !m.noTCX.Load() {
		err := a.attachTCX()
		if err == nil {
			a.mode = "tcx"
			return nil
		}
		if !errors.Is(err, ebpf.ErrNotSupported) {
			return err
		}
		m.noTCX.Store(true)
		m.log.Info("tcx unsupported, attaching with legacy tc from now on", "ifindex", a.ifindex, "err", err)
	}
	a.mode = "tc"
	return a.attachTC()
}

// putRules stores entries for ifindex and returns the keys it wrote.
func putRules(mp *ebpf.Map, ifindex uint32, entries []lpmEntry) ([]egressRuleKey, error) {
	keys := make([]egressRuleKey, 0, len(entries))
	for _, e := range entries {
		var v egressRuleVal
		v.N = uint32(len(e.rules))
		for i, r := range e.rules {
			v.Rules[i] = egressPortRule{Lo: r.lo, Hi: r.hi, Plen: r.plen}
			if r.any {
				v.Rules[i].AnyPort = 1
			}
		}
		k := egressRuleKey{Prefixlen: 32 + uint32(e.prefix.Bits()), Ifindex: ifindex, Addr: addrKey(e.prefix.Addr())}
		if err := mp.Put(k, v); err != nil {
			return keys, fmt.Errorf("rule %s: %w", e.prefix, err)
		}
		keys = append(keys, k)
	}
	return keys, nil
}

func (a *Attachment) attachTCX() error {
	for _, at := range []struct {
		prog *ebpf.Program
		typ  ebpf.AttachType
	}{
		{a.m.objs.SandboxIngress, ebpf.AttachTCXIngress},
		{a.m.objs.SandboxEgress, ebpf.AttachTCXEgress},
	} {
		// At the head, so no other program can redirect around the policy.
		l, err := link.AttachTCX(link.TCXOptions{Interface: a.ifindex, Program: at.prog, Attach: at.typ, Anchor: link.Head()})
		if err != nil {
			return fmt.Errorf("ebpf: attaching tcx %s to interface %d: %w", at.typ, a.ifindex, err)
		}
		a.links = append(a.links, l)
	}
	return nil
}

// tcPriority and tcHandle identify skiff's filters on a sandbox veth.
const (
	tcPriority = 1
	tcHandle   = 1
)

func (a *Attachment) attachTC() error {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return errs.Internal("ebpf: opening netlink: %w", err)
	}
	a.nl = h
	q := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: a.ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
	switch err := h.QdiscAdd(q); {
	case err == nil:
		a.qdisc = q
	case errors.Is(err, unix.EEXIST):
	default:
		return errs.Internal("ebpf: adding clsact qdisc to interface %d: %w", a.ifindex, err)
	}
	for _, f := range []struct {
		prog   *ebpf.Program
		parent uint32
		name   string
	}{
		{a.m.objs.SandboxIngress, netlink.HANDLE_MIN_INGRESS, "skiff_ingress"},
		{a.m.objs.SandboxEgress, netlink.HANDLE_MIN_EGRESS, "skiff_egress"},
	} {
		filter := &netlink.BpfFilter{
			FilterAttrs: netlink.FilterAttrs{
				LinkIndex: a.ifindex,
				Parent:    f.parent,
				Handle:    netlink.MakeHandle(0, tcHandle),
				Protocol:  unix.ETH_P_ALL,
				Priority:  tcPriority,
			},
			Fd:           f.prog.FD(),
			Name:         f.name,
			DirectAction: true,
		}
		// Replace: a filter an agent killed mid-flight left behind is ours.
		if err := h.FilterReplace(filter); err != nil {
			return errs.Internal("ebpf: adding tc filter %s to interface %d: %w", f.name, a.ifindex, err)
		}
		a.filters = append(a.filters, filter)
	}
	return nil
}

// Counters returns the sandbox's counters summed over CPUs.
func (a *Attachment) Counters() (Counters, error) {
	var per []egressCounters
	if err := a.m.objs.SandboxCounters.Lookup(uint32(a.ifindex), &per); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return Counters{}, errs.NotFound("ebpf: no counters for interface %d (attachment closed?)", a.ifindex)
		}
		return Counters{}, errs.Internal("ebpf: reading counters for interface %d: %w", a.ifindex, err)
	}
	c := Counters{Drops: map[Reason]uint64{}}
	for _, v := range per {
		c.BytesIn += v.BytesIn
		c.BytesOut += v.BytesOut
		c.PacketsIn += v.PacketsIn
		c.PacketsOut += v.PacketsOut
		for r := 1; r < reasonMax; r++ {
			if v.Drops[r] != 0 {
				c.Drops[Reason(r)] += v.Drops[r]
			}
		}
	}
	return c, nil
}

// Close detaches the programs and deletes the sandbox's map entries. An
// interface that is already gone counts as detached. Close is idempotent.
func (a *Attachment) Close() error {
	a.closeOnce.Do(func() { a.closeErr = a.close() })
	return a.closeErr
}

func (a *Attachment) close() error {
	a.setupMu.Lock()
	defer a.setupMu.Unlock()
	var errList []error
	// Detach first: with the entries gone an attached program drops all.
	for _, l := range a.links {
		if err := l.Close(); err != nil {
			errList = append(errList, fmt.Errorf("ebpf: detaching tcx from interface %d: %w", a.ifindex, err))
		}
	}
	if a.nl != nil {
		for _, f := range a.filters {
			if err := a.nl.FilterDel(f); err != nil && !gone(err) {
				errList = append(errList, fmt.Errorf("ebpf: deleting tc filter %s from interface %d: %w", f.Name, a.ifindex, err))
			}
		}
		if a.qdisc != nil {
			if err := a.nl.QdiscDel(a.qdisc); err != nil && !gone(err) {
				errList = append(errList, fmt.Errorf("ebpf: deleting clsact qdisc from interface %d: %w", a.ifindex, err))
			}
		}
		a.nl.Close()
	}
	ifx := uint32(a.ifindex)
	for _, del := range []struct {
		mp  *ebpf.Map
		key any
	}{{a.m.objs.Policies, ifx}, {a.m.objs.SandboxCounters, ifx}} {
		if err := deleteKey(del.mp, del.key); err != nil {
			errList = append(errList, fmt.Errorf("ebpf: deleting map entry for interface %d: %w", a.ifindex, err))
		}
	}
	for _, k := range a.allow {
		if err := deleteKey(a.m.objs.AllowRules, k); err != nil {
			errList = append(errList, fmt.Errorf("ebpf: deleting allow rule for interface %d: %w", a.ifindex, err))
		}
	}
	for _, k := range a.deny {
		if err := deleteKey(a.m.objs.DenyRules, k); err != nil {
			errList = append(errList, fmt.Errorf("ebpf: deleting deny rule for interface %d: %w", a.ifindex, err))
		}
	}
	a.m.mu.Lock()
	if a.m.atts[a.ifindex] == a {
		delete(a.m.atts, a.ifindex)
	}
	a.m.mu.Unlock()
	return errors.Join(errList...)
}

// gone reports whether a netlink error means the interface, qdisc or filter
// no longer exists.
func gone(err error) bool {
	return errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EINVAL)
}

// Close closes every attachment, then unloads the programs and maps.
// Idempotent.
func (m *Manager) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	atts := make([]*Attachment, 0, len(m.atts))
	for _, a := range m.atts {
		atts = append(atts, a)
	}
	m.mu.Unlock()
	var errList []error
	for _, a := range atts {
		errList = append(errList, a.Close())
	}
	errList = append(errList, m.objs.Close())
	return errors.Join(errList...)
}
