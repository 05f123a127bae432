// Package netrule parses the destinations of a function's network allow and
// deny lists ("CIDR", "CIDR:PORT", "CIDR:LOW-HIGH"; a bare IPv4 address is
// a /32). The gateway validates with it and the agent's eBPF policy is
// built from the same parse, so what is accepted is what is enforced.
package netrule

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// MaxRules bounds each of a function's allow and deny lists. The eBPF
// policy holds at most 16 merged rules covering any one prefix, so a list
// of at most 16 rules is always attachable.
const MaxRules = 16

// Rule is one destination: an IPv4 prefix and a port range (0-0: any port).
type Rule struct {
	Prefix netip.Prefix
	Lo, Hi uint16
}

// AnyPort reports whether the rule matches every port (and non-port
// protocols such as ICMP).
func (r Rule) AnyPort() bool { return r.Lo == 0 && r.Hi == 0 }

func (r Rule) String() string {
	switch {
	case r.AnyPort():
		return r.Prefix.String()
	case r.Lo == r.Hi:
		return fmt.Sprintf("%s:%d", r.Prefix, r.Lo)
	}
	return fmt.Sprintf("%s:%d-%d", r.Prefix, r.Lo, r.Hi)
}

// Parse parses one rule. Only IPv4 is supported: sandboxes have no IPv6.
func Parse(s string) (Rule, error) {
	if strings.Count(s, ":") > 1 {
		return Rule{}, fmt.Errorf("%q: only IPv4 destinations are supported", s)
	}
	addr, ports, hasPorts := strings.Cut(strings.TrimSpace(s), ":")
	var r Rule
	if strings.Contains(addr, "/") {
		p, err := netip.ParsePrefix(addr)
		if err != nil {
			return Rule{}, fmt.Errorf("%q: %q is not a CIDR prefix", s, addr)
		}
		if p.Addr().Is4() && p.Masked() != p {
			return Rule{}, fmt.Errorf("%q: %s has host bits set (did you mean %s?)", s, p, p.Masked())
		}
		r.Prefix = p
	} else {
		a, err := netip.ParseAddr(addr)
		if err != nil {
			return Rule{}, fmt.Errorf("%q: %q is not an IPv4 address or CIDR prefix", s, addr)
		}
		r.Prefix = netip.PrefixFrom(a, a.BitLen())
	}
	if !r.Prefix.Addr().Is4() {
		return Rule{}, fmt.Errorf("%q: only IPv4 destinations are supported", s)
	}
	if !hasPorts {
		return r, nil
	}
	lo, hi, isRange := strings.Cut(ports, "-")
	l, err := parsePort(lo)
	if err != nil {
		return Rule{}, fmt.Errorf("%q: %w", s, err)
	}
	h := l
	if isRange {
		if h, err = parsePort(hi); err != nil {
			return Rule{}, fmt.Errorf("%q: %w", s, err)
		}
	}
	if h < l {
		return Rule{}, fmt.Errorf("%q: port range %d-%d is backwards", s, l, h)
	}
	r.Lo, r.Hi = l, h
	return r, nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("port %q is not in 1-65535", s)
	}
	return uint16(n), nil
}

// ParseList parses a list of rules, at most MaxRules.
func ParseList(list []string) ([]Rule, error) {
	if len(list) > MaxRules {
		return nil, fmt.Errorf("%d rules, over the limit of %d", len(list), MaxRules)
	}
	out := make([]Rule, 0, len(list))
	for _, s := range list {
		r, err := Parse(s)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, nil
}
