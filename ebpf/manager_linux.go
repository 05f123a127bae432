//go:build linux && (386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64)

package ebpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
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
	mode    string // "tcx" or "tc"

	links []link.Link // TCX

	nl      *netlink.Handle // legacy tc: a socket in the veth's netns
	filters []*netlink.BpfFilter
	qdisc   *netlink.GenericQdisc // non-nil when Attach created it
	// mu is held while Attach sets up and while Update rewrites the maps,
	// so a concurrent Close waits for them.
	mu      sync.Mutex
	egress  bool       // guarded by mu: what the policies map holds
	entries []lpmEntry // guarded by mu: what the rules map holds
	closed  bool       // guarded by mu

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
	entries, err := buildEntries(p)
	if err != nil {
		return nil, err
	}

	a := &Attachment{m: m, ifindex: hostIfindex}
	a.mu.Lock()
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		a.mu.Unlock()
		return nil, errs.New(errs.KindFailedPrecondition, "ebpf: manager is closed")
	}
	if _, ok := m.atts[hostIfindex]; ok {
		m.mu.Unlock()
		a.mu.Unlock()
		return nil, errs.Conflict("ebpf: interface %d already has an attachment", hostIfindex)
	}
	m.atts[hostIfindex] = a // reserved: the slow work below runs unlocked
	m.mu.Unlock()

	err = a.setupLocked(p.Egress, entries)
	a.mu.Unlock()
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

func (a *Attachment) setupLocked(egress bool, entries []lpmEntry) error {
	if err := a.storeMapsLocked(egress, entries); err != nil {
		return err
	}
	return a.attach()
}

// storeMapsLocked writes the sandbox's policy, zeroed counters and rules.
func (a *Attachment) storeMapsLocked(egress bool, entries []lpmEntry) error {
	m := a.m
	ifx := uint32(a.ifindex)
	// Maps first: the programs must find the policy from the first packet.
	if err := a.putEgressLocked(egress); err != nil {
		return err
	}
	if err := m.objs.SandboxCounters.Put(ifx, make([]egressCounters, m.ncpu)); err != nil {
		return errs.Internal("ebpf: creating counters for interface %d: %w", a.ifindex, err)
	}
	for _, e := range entries {
		if err := a.putEntryLocked(e); err != nil {
			return err
		}
	}
	return nil
}

// putEgressLocked stores the sandbox's egress switch.
func (a *Attachment) putEgressLocked(egress bool) error {
	pol := egressPolicy{}
	if egress {
		pol.Egress = 1
	}
	if err := a.m.objs.Policies.Put(uint32(a.ifindex), pol); err != nil {
		return errs.Internal("ebpf: storing policy for interface %d: %w", a.ifindex, err)
	}
	a.egress = egress
	return nil
}

// ruleKey is the rules map key of the sandbox's entry for prefix.
func (a *Attachment) ruleKey(prefix netip.Prefix) egressRuleKey {
	return egressRuleKey{Prefixlen: 32 + uint32(prefix.Bits()), Ifindex: uint32(a.ifindex), Addr: addrKey(prefix.Addr())}
}

// putEntryLocked stores e in the rules map (replacing an entry for the
// same prefix in one step) and records it in a.entries.
func (a *Attachment) putEntryLocked(e lpmEntry) error {
	if err := a.m.objs.Rules.Put(a.ruleKey(e.prefix), ruleValBytes(e)); err != nil {
		return errs.Internal("ebpf: storing rules for %s of interface %d: %w", e.prefix, a.ifindex, err)
	}
	if i := slices.IndexFunc(a.entries, func(o lpmEntry) bool { return o.prefix == e.prefix }); i >= 0 {
		a.entries[i] = e
	} else {
		a.entries = append(a.entries, e)
	}
	return nil
}

// ruleValSize is sizeof(struct rule_val).
const ruleValSize = 8 + 2*maxPortRules*8

// ruleValBytes is e as the rules map stores it (struct rule_val), encoded
// by hand: cilium/ebpf would marshal egressRuleVal by reflection, which
// costs more than the map write itself.
func ruleValBytes(e lpmEntry) []byte {
	b := make([]byte, ruleValSize)
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], uint32(len(e.allow)))
	ne.PutUint32(b[4:], uint32(len(e.deny)))
	for l, rs := range [][]portRule{e.allow, e.deny} {
		for i, r := range rs {
			o := 8 + l*maxPortRules*8 + i*8
			ne.PutUint16(b[o:], r.lo)
			ne.PutUint16(b[o+2:], r.hi)
			b[o+4] = r.plen
			if r.any {
				b[o+5] = 1
			}
		}
	}
	return b
}

// deleteEntryLocked deletes the sandbox's entry for prefix from the rules
// map and from a.entries.
func (a *Attachment) deleteEntryLocked(prefix netip.Prefix) error {
	if err := deleteKey(a.m.objs.Rules, a.ruleKey(prefix)); err != nil {
		return errs.Internal("ebpf: deleting rules for %s of interface %d: %w", prefix, a.ifindex, err)
	}
	a.entries = slices.DeleteFunc(a.entries, func(o lpmEntry) bool { return o.prefix == prefix })
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

// Update replaces the sandbox's policy with p in place: it rewrites the
// sandbox's map entries and leaves the programs attached and the counters
// running (re-attaching costs RCU grace periods, tens of milliseconds;
// Update costs microseconds). p is validated in full first: an invalid
// policy is an InvalidArgument error and changes nothing. Update on a
// closed attachment is a FailedPrecondition error.
//
// Packets in flight see the old or the new policy, never a mix (see "Policy
// updates" in the package documentation). Should a map write fail midway,
// Update puts the old rules back before returning the error.
func (a *Attachment) Update(p Policy) error {
	entries, err := buildEntries(p)
	if err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return errs.New(errs.KindFailedPrecondition, "ebpf: attachment to interface %d is closed", a.ifindex)
	}
	if !p.Egress {
		// The switch first and the rules untouched: a packet that read
		// "egress on" just before must still find the old rules. While
		// egress is off the rules are unused; the next Update with egress
		// rewrites them.
		return a.putEgressLocked(false)
	}
	old := slices.Clone(a.entries)
	if err := a.applyLocked(entries); err != nil {
		if rerr := a.applyLocked(old); rerr != nil {
			return errors.Join(err, fmt.Errorf("ebpf: restoring the old rules of interface %d: %w", a.ifindex, rerr))
		}
		return err
	}
	if !a.egress {
		// Off to on: the rules were rewritten while nothing passed.
		return a.putEgressLocked(true)
	}
	return nil
}

// applyLocked makes the sandbox's rules map entries target's, so that a
// packet's one rules lookup returns what the old or the new rules decide
// for it, never a mix. Every entry is self-contained (it holds every allow
// and deny rule covering its prefix), but the kernel's trie lookup is not
// atomic: a lookup that has walked past a node still sees later changes
// below it. Hence three steps:
//
//  1. Every target entry, and every stale entry (a prefix only the old
//     rules have) rewritten with the target's rules covering it, go in
//     longest prefix first, replacing entries in place. A stale prefix's
//     rewritten value is that of the longest target entry containing it:
//     what the new rules decide for every address that falls back to it.
//     A lookup that finds a rewritten entry finds every longer one
//     rewritten too (they went in first); one that finds an old entry
//     decides as the old rules do (nothing is deleted yet, so it misses no
//     longer old entry).
//  2. When there are stale entries: wait until every program run that
//     started before step 1 ended has finished (an RCU grace period).
//  3. Delete the stale entries. Every lookup running now started after
//     step 1, and every entry it can meet holds the new rules' answer for
//     its addresses, so whichever it finds decides as the new rules do.
//
// Steps 2 and 3 cost a grace period (milliseconds) only when prefixes
// disappear; adding rules or changing ports and directions costs map
// writes alone. Should the wait fail, the stale entries stay: they hold
// the new rules' answers, so only space is lost until the next Update or
// Close.
func (a *Attachment) applyLocked(target []lpmEntry) error {
	want := map[netip.Prefix]bool{}
	for _, e := range target {
		want[e.prefix] = true
	}
	puts := slices.Clone(target)
	var stale []netip.Prefix
	for _, e := range a.entries {
		if !want[e.prefix] {
			stale = append(stale, e.prefix)
			puts = append(puts, coveringEntry(target, e.prefix))
		}
	}
	slices.SortStableFunc(puts, func(x, y lpmEntry) int { return y.prefix.Bits() - x.prefix.Bits() })
	for _, e := range puts {
		if err := a.putEntryLocked(e); err != nil {
			return err
		}
	}
	if len(stale) == 0 {
		return nil
	}
	if err := waitForReaders(); err != nil {
		a.m.log.Warn("ebpf: cannot wait for running programs; keeping stale (harmless) rule entries",
			"ifindex", a.ifindex, "stale", len(stale), "err", err)
		return nil
	}
	for _, q := range stale {
		if err := a.deleteEntryLocked(q); err != nil {
			return err
		}
	}
	return nil
}

// waitForReaders returns once every eBPF program run that started before
// the call has finished. The programs run inside RCU read-side critical
// sections; membarrier(MEMBARRIER_CMD_GLOBAL) waits for an RCU grace period
// (synchronize_rcu). It fails on nohz_full kernels.
func waitForReaders() error {
	const membarrierCmdGlobal = 1 // MEMBARRIER_CMD_GLOBAL
	if _, _, e := unix.Syscall(unix.SYS_MEMBARRIER, membarrierCmdGlobal, 0, 0); e != 0 {
		return fmt.Errorf("membarrier: %w", e)
	}
	return nil
}

// coveringEntry is an entry for q holding the rules of the longest entry
// of entries that contains q (none: no rules).
func coveringEntry(entries []lpmEntry, q netip.Prefix) lpmEntry {
	out, best := lpmEntry{prefix: q}, -1
	for _, e := range entries {
		if b := e.prefix.Bits(); b <= q.Bits() && b > best && e.prefix.Contains(q.Addr()) {
			out.allow, out.deny, best = e.allow, e.deny, b
		}
	}
	return out
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
	a.mu.Lock()
	defer a.mu.Unlock()
	a.closed = true
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
	for _, e := range slices.Clone(a.entries) {
		if err := a.deleteEntryLocked(e.prefix); err != nil {
			errList = append(errList, err)
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
