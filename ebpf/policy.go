package ebpf

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"

	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/netrule"
)

// Reason says why the policy program dropped a packet. The values mirror
// enum reason in bpf/egress.c.
type Reason uint8

// The drop reasons.
const (
	// ReasonSandbox: the destination is another sandbox (in the sandbox
	// subnet) and no allow rule at least as specific as the subnet opens it.
	ReasonSandbox Reason = 1
	// ReasonHost: the destination is one of the host's addresses and neither
	// a host service nor an allow rule for exactly that address (/32) opens it.
	ReasonHost Reason = 2
	// ReasonMetadata: link-local 169.254.0.0/16 (cloud metadata services).
	ReasonMetadata Reason = 3
	// ReasonPrivate: a private or special-purpose range (see
	// SpecialRanges) that no allow rule opens.
	ReasonPrivate Reason = 4
	// ReasonDenied: a deny rule matched.
	ReasonDenied Reason = 5
	// ReasonNotAllowed: the sandbox has no egress (network "none"), has no
	// policy, or sent something other than IPv4 or ARP (IPv6 included).
	ReasonNotAllowed Reason = 6
	// ReasonMalformed: an IPv4 packet too short or with a bad header.
	ReasonMalformed Reason = 7

	reasonMax = 8 // size of the drops array in struct counters
)

// Reasons lists every drop reason, in order.
func Reasons() []Reason {
	return []Reason{ReasonSandbox, ReasonHost, ReasonMetadata, ReasonPrivate, ReasonDenied, ReasonNotAllowed, ReasonMalformed}
}

// String returns the reason as a metric label value, e.g. "sandbox".
func (r Reason) String() string {
	switch r {
	case ReasonSandbox:
		return "sandbox"
	case ReasonHost:
		return "host"
	case ReasonMetadata:
		return "metadata"
	case ReasonPrivate:
		return "private"
	case ReasonDenied:
		return "denied"
	case ReasonNotAllowed:
		return "not_allowed"
	case ReasonMalformed:
		return "malformed"
	}
	return "reason_" + strconv.Itoa(int(r))
}

// PortRange is an inclusive range of TCP/UDP destination ports. The zero
// value means every port and every protocol.
type PortRange struct{ Lo, Hi uint16 }

// All reports whether r is the zero value: every port, every protocol.
func (r PortRange) All() bool { return r.Lo == 0 && r.Hi == 0 }

// String formats r as in a rule: "", "443" or "8000-8100".
func (r PortRange) String() string {
	switch {
	case r.All():
		return ""
	case r.Lo == r.Hi:
		return strconv.Itoa(int(r.Lo))
	}
	return strconv.Itoa(int(r.Lo)) + "-" + strconv.Itoa(int(r.Hi))
}

// Rule is one allow or deny entry: destinations in Prefix, on Ports. A rule
// with ports matches TCP and UDP only (never ICMP, nor non-first fragments,
// which carry no ports); a rule without ports matches every packet to Prefix.
type Rule struct {
	Prefix netip.Prefix
	Ports  PortRange
}

// String formats r the way ParseRule reads it, e.g. "1.2.3.0/24:80-90".
func (r Rule) String() string {
	if r.Ports.All() {
		return r.Prefix.String()
	}
	return r.Prefix.String() + ":" + r.Ports.String()
}

// Policy is one sandbox's egress policy. Egress false drops everything.
type Policy struct {
	Egress      bool
	Allow, Deny []Rule
}

// Global is the host-wide part of the policy, shared by every sandbox.
type Global struct {
	// SandboxSubnet holds every sandbox address; traffic between sandboxes
	// is dropped. The zero Prefix disables the check.
	SandboxSubnet netip.Prefix
	// HostAddrs are the host's own addresses; traffic to them is dropped
	// unless it is to a HostService. IPv6 addresses are ignored (all IPv6
	// from a sandbox is dropped).
	HostAddrs []netip.Addr
	// HostServices are host ip:port pairs sandboxes may reach, over TCP and
	// UDP (e.g. the DNS resolver). They need not be in HostAddrs.
	HostServices []netip.AddrPort
}

// Counters are one sandbox's traffic totals since Attach. Bytes are
// IP-level (Ethernet headers excluded); a GSO super-packet counts its one
// set of headers and its segment count as packets. Out is from the sandbox
// and passed the policy; In is to the sandbox. Drops holds only reasons
// with a non-zero count.
type Counters struct {
	BytesIn, BytesOut     uint64
	PacketsIn, PacketsOut uint64
	Drops                 map[Reason]uint64
}

// specialRanges are dropped (with their reason) unless an allow rule opens
// them. The documentation ranges 192.0.2.0/24, 198.51.100.0/24 and
// 203.0.113.0/24 are deliberately absent: tests use them as "the internet".
var specialRanges = []struct {
	prefix string
	reason Reason
}{
	{"0.0.0.0/8", ReasonPrivate},
	{"10.0.0.0/8", ReasonPrivate},
	{"100.64.0.0/10", ReasonPrivate},
	{"127.0.0.0/8", ReasonPrivate},
	{"169.254.0.0/16", ReasonMetadata},
	{"172.16.0.0/12", ReasonPrivate},
	{"192.0.0.0/24", ReasonPrivate},
	{"192.168.0.0/16", ReasonPrivate},
	{"198.18.0.0/15", ReasonPrivate},
	{"224.0.0.0/4", ReasonPrivate},
	{"240.0.0.0/4", ReasonPrivate},
}

// SpecialRanges returns the private and special-purpose ranges the policy
// drops unless allowed, with the reason each drop counts under.
func SpecialRanges() map[netip.Prefix]Reason {
	m := make(map[netip.Prefix]Reason, len(specialRanges))
	for _, s := range specialRanges {
		m[netip.MustParsePrefix(s.prefix)] = s.reason
	}
	return m
}

// ParseRule reads a rule: "CIDR", "CIDR:PORT" or "CIDR:LOW-HIGH", where a
// bare IPv4 address means /32 ("10.0.0.0/8", "1.2.3.4:443",
// "1.2.3.0/24:8000-8100"). It is internal/netrule's parse, the one the
// gateway validates function settings with.
func ParseRule(s string) (Rule, error) {
	r, err := netrule.Parse(s)
	if err != nil {
		return Rule{}, errs.New(errs.KindInvalidArgument, "rule %w", err)
	}
	return Rule{Prefix: r.Prefix, Ports: PortRange{Lo: r.Lo, Hi: r.Hi}}, nil
}

// validateRule checks a Rule built in code rather than by ParseRule.
func validateRule(r Rule) error {
	if !r.Prefix.IsValid() || !r.Prefix.Addr().Is4() {
		return errs.New(errs.KindInvalidArgument, "rule %s: prefix must be IPv4", r)
	}
	if r.Prefix.Masked() != r.Prefix {
		return errs.New(errs.KindInvalidArgument, "rule %s: prefix has host bits set", r)
	}
	if !r.Ports.All() && (r.Ports.Lo == 0 || r.Ports.Lo > r.Ports.Hi) {
		return errs.New(errs.KindInvalidArgument, "rule %s: bad port range %d-%d", r, r.Ports.Lo, r.Ports.Hi)
	}
	return nil
}

// maxPortRules is MAX_PORT_RULES in bpf/egress.c: how many allow rules,
// and how many deny rules (after merging), may cover one prefix of one
// sandbox.
const maxPortRules = 16

// portRule is one rule as stored under an LPM entry.
type portRule struct {
	lo, hi uint16
	plen   uint8
	any    bool
}

// lpmEntry is one LPM trie entry of a sandbox: a prefix, and the allow and
// the deny rules covering it.
type lpmEntry struct {
	prefix      netip.Prefix
	allow, deny []portRule
}

// buildEntries validates p's rules and turns them into LPM entries. Each
// prefix of an allow or a deny rule gets an entry holding the rules of its
// own prefix and of every shorter prefix containing it, so the kernel's
// longest-prefix match alone finds all rules that apply, allow and deny, in
// one lookup. Rules of one prefix length merge: an all-ports rule absorbs
// port rules, overlapping or adjacent port ranges join. Entries come
// sorted by address, then prefix length.
func buildEntries(p Policy) ([]lpmEntry, error) {
	allow, err := groupRules(p.Allow)
	if err != nil {
		return nil, fmt.Errorf("allow rules: %w", err)
	}
	deny, err := groupRules(p.Deny)
	if err != nil {
		return nil, fmt.Errorf("deny rules: %w", err)
	}
	set := map[netip.Prefix]bool{}
	for q := range allow {
		set[q] = true
	}
	for q := range deny {
		set[q] = true
	}
	prefixes := sortedPrefixes(set)
	entries := make([]lpmEntry, 0, len(prefixes))
	for _, q := range prefixes {
		e := lpmEntry{prefix: q, allow: coveringRules(allow, q), deny: coveringRules(deny, q)}
		for _, l := range []struct {
			what  string
			rules []portRule
		}{{"allow", e.allow}, {"deny", e.deny}} {
			if len(l.rules) > maxPortRules {
				return nil, errs.New(errs.KindInvalidArgument, "%d %s rules apply to %s after merging, at most %d are supported", len(l.rules), l.what, q, maxPortRules)
			}
		}
		entries = append(entries, e)
	}
	return entries, nil
}

// groupRules validates rules and groups their port ranges by prefix.
func groupRules(rules []Rule) (map[netip.Prefix][]PortRange, error) {
	by := map[netip.Prefix][]PortRange{}
	for _, r := range rules {
		if err := validateRule(r); err != nil {
			return nil, err
		}
		by[r.Prefix] = append(by[r.Prefix], r.Ports)
	}
	return by, nil
}

// sortedPrefixes returns the prefixes of set by address, then length.
func sortedPrefixes(set map[netip.Prefix]bool) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(set))
	for q := range set {
		out = append(out, q)
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
	})
	return out
}

// coveringRules returns the merged rules of every prefix of by that
// contains p (p included), shortest prefix first.
func coveringRules(by map[netip.Prefix][]PortRange, p netip.Prefix) []portRule {
	set := map[netip.Prefix]bool{}
	for q := range by {
		if q.Bits() <= p.Bits() && q.Contains(p.Addr()) {
			set[q] = true
		}
	}
	var out []portRule
	for _, q := range sortedPrefixes(set) { // nested: by address then length is by length
		out = append(out, mergePorts(q, by[q])...)
	}
	return out
}

// mergePorts merges the port ranges of the rules for one prefix.
func mergePorts(p netip.Prefix, ranges []PortRange) []portRule {
	plen := uint8(p.Bits())
	if slices.ContainsFunc(ranges, PortRange.All) {
		return []portRule{{plen: plen, any: true}}
	}
	sorted := slices.Clone(ranges)
	slices.SortFunc(sorted, func(a, b PortRange) int { return cmp.Compare(a.Lo, b.Lo) })
	var out []portRule
	for _, r := range sorted {
		if n := len(out); n > 0 && uint32(r.Lo) <= uint32(out[n-1].hi)+1 {
			out[n-1].hi = max(out[n-1].hi, r.Hi)
			continue
		}
		out = append(out, portRule{lo: r.Lo, hi: r.Hi, plen: plen})
	}
	return out
}
