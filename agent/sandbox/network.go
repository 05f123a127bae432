package sandbox

import (
	"fmt"
	"strings"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/ebpf"
	"skiff.dev/skiff/internal/errs"
)

// Network settings of a SandboxSpec.
const (
	NetworkEgress = "egress"
	NetworkNone   = "none"
)

// NetCounter is implemented by processes with a network: their counters
// since they started (an error when they have no network).
type NetCounter interface {
	NetCounters() (ebpf.Counters, error)
}

// networkPolicy maps a spec's network settings to the sandbox's egress
// policy: nil for "none" (or unset: loopback only).
func networkPolicy(spec *skiffv1.SandboxSpec) (*ebpf.Policy, error) {
	switch spec.GetNetwork() {
	case "", NetworkNone:
		if len(spec.GetNetworkAllow())+len(spec.GetNetworkDeny()) > 0 {
			return nil, errs.Invalid("spec.network_allow", "allow and deny rules need network %q", NetworkEgress)
		}
		return nil, nil
	case NetworkEgress:
	default:
		return nil, errs.Invalid("spec.network", "network %q: want %q or %q", spec.GetNetwork(), NetworkEgress, NetworkNone)
	}
	p := &ebpf.Policy{Egress: true}
	for _, list := range []struct {
		field string
		in    []string
		out   *[]ebpf.Rule
	}{{"spec.network_allow", spec.GetNetworkAllow(), &p.Allow}, {"spec.network_deny", spec.GetNetworkDeny(), &p.Deny}} {
		for _, s := range list.in {
			r, err := ebpf.ParseRule(s)
			if err != nil {
				return nil, errs.Invalid(list.field, "%w", err)
			}
			*list.out = append(*list.out, r)
		}
	}
	return p, nil
}

// netUsage is one invocation's network use.
type netUsage struct {
	out, in, drops uint64
}

// netRead reads the sandbox's counters once and returns what is new since
// the last read (ok false without network), adding it to the metrics. One
// read per invocation, after it: a sandbox serves one invocation at a time,
// so the traffic since the previous read is this invocation's (plus any
// the function made while idle between invocations, which Lambda's frozen
// sandboxes cannot make).
func (m *Manager) netRead(sb *Sandbox) (ebpf.Counters, bool) {
	nc, ok := sb.proc.(NetCounter)
	if !ok || !sb.network {
		return ebpf.Counters{}, false
	}
	c, err := nc.NetCounters()
	if err != nil {
		m.cfg.Logger.Debug("reading sandbox network counters", "sandbox", sb.id, "err", err)
		return ebpf.Counters{}, false
	}
	sb.mu.Lock()
	last := sb.netLast
	sb.netLast = c
	sb.mu.Unlock()
	d := diff(c, last)
	m.metrics.network(d)
	return d, true
}

// diff is what happened between two reads of a sandbox's counters.
func diff(now, before ebpf.Counters) ebpf.Counters {
	d := ebpf.Counters{
		BytesOut: now.BytesOut - before.BytesOut, BytesIn: now.BytesIn - before.BytesIn,
		PacketsOut: now.PacketsOut - before.PacketsOut, PacketsIn: now.PacketsIn - before.PacketsIn,
		Drops: map[ebpf.Reason]uint64{},
	}
	for r, n := range now.Drops {
		if n > before.Drops[r] {
			d.Drops[r] = n - before.Drops[r]
		}
	}
	return d
}

func usage(d ebpf.Counters) netUsage {
	u := netUsage{out: d.BytesOut, in: d.BytesIn}
	for _, n := range d.Drops {
		u.drops += n
	}
	return u
}

// skiffLine is skiff's own line after Lambda's REPORT line.
func skiffLine(requestID string, u netUsage) string {
	var b strings.Builder
	fmt.Fprintf(&b, "SKIFF RequestId: %s\tNetwork Out: %d bytes\tNetwork In: %d bytes\tNetwork Drops: %d\n", requestID, u.out, u.in, u.drops)
	return b.String()
}
