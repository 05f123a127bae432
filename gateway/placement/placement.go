// Package placement chooses the host for a sandbox from the cluster's
// gossiped view (Lambda's placement service, cluster half; agent/placement
// is the memory ledger on each host).
//
// Rules, in order:
//  1. A warm idle sandbox of the function version: the host with the most
//     of them. The caller claims it atomically on that agent; when the agent
//     refuses (the view was stale) it calls Choose again with the host in
//     Request.SkipWarm and gets a cold placement.
//  2. Otherwise a cold start on a host that is not draining, not suspect,
//     not excluded and has the memory. Among those: the zones with the
//     fewest sandboxes of the function, then the hosts there with the
//     fewest, then those that already cache the code digest, then the less
//     loaded of two random hosts ("power of two choices"). A host that
//     refuses a cold placement goes into Request.Exclude for the retry.
//
// Choose never returns a host without the requested memory.
package placement

import (
	"fmt"

	"skiff.dev/skiff/gossip"
	"skiff.dev/skiff/internal/errs"
)

// Contents is what placement reads about what a host holds; a gossip
// capacity summary implements it.
type Contents interface {
	// WarmIdle is the number of idle warm sandboxes of a function version.
	WarmIdle(function string) int
	// HasCode reports whether the host (probably) caches a code digest.
	HasCode(digest string) bool
}

// Host is one candidate host as the gateway sees it.
type Host struct {
	Name         string
	Zone         string
	Draining     bool // takes no new sandboxes
	Suspect      bool // not reachable lately
	FreeMemoryMB int64
	Load         float64  // lower is better; normally in [0, 1]
	Contents     Contents // nil: nothing warm, nothing cached
}

// Request is one sandbox to place.
type Request struct {
	Function string // function version key, as in the gossiped warm summaries
	Digest   string // code digest
	MemoryMB int64
	// Sandboxes counts the function's sandboxes per host name, so that a
	// function spreads over hosts and zones. Nil: none known.
	Sandboxes map[string]int
	// Exclude lists hosts not to use at all (they refused a cold placement).
	Exclude map[string]bool
	// SkipWarm lists hosts whose warm sandbox could not be claimed; they
	// remain candidates for a cold start.
	SkipWarm map[string]bool
}

// Decision is where to run.
type Decision struct {
	Host string
	Warm bool // claim an idle sandbox on Host; otherwise start a new one
	// Rule names the rule that decided: "warm", "spread", "code" or
	// "two-choices" (for logs and metrics).
	Rule string
}

// Rand is the randomness Choose needs; *math/rand/v2.Rand implements it.
type Rand interface {
	IntN(n int) int
}

// keyedContents is the fast path of Contents that look keys up by a hash
// (gossip summaries): Choose hashes the function and the digest once per
// decision instead of once per host. At 1,000 hosts that is most of a
// decision's time.
type keyedContents interface {
	WarmIdleKey(gossip.Key) int
	HasCodeKey(gossip.Key) bool
}

// warmIdle and hasCode look a request's keys up in c, through the fast
// path when c has one (a concrete *gossip.Summary first: the common case,
// and the cheapest type check).
func (q *query) warmIdle(c Contents) int {
	switch c := c.(type) {
	case *gossip.Summary:
		return c.WarmIdleKey(q.fn)
	case keyedContents:
		return c.WarmIdleKey(q.fn)
	}
	return c.WarmIdle(q.req.Function)
}

func (q *query) hasCode(c Contents) bool {
	switch c := c.(type) {
	case *gossip.Summary:
		return c.HasCodeKey(q.digest)
	case keyedContents:
		return c.HasCodeKey(q.digest)
	}
	return c.HasCode(q.req.Digest)
}

// query is one decision's request with its keys hashed.
type query struct {
	req        *Request
	fn, digest gossip.Key
}

// Choose picks the host for req among hosts.
func Choose(req Request, hosts []Host, rng Rand) (Decision, error) {
	if req.MemoryMB <= 0 {
		return Decision{}, errs.Invalid("memory_mb", "memory must be positive, got %d MB", req.MemoryMB)
	}
	q := query{req: &req, fn: gossip.KeyOf(req.Function), digest: gossip.KeyOf(req.Digest)}
	noExclusions := len(req.Exclude) == 0
	usable := func(h *Host) bool {
		return !h.Draining && !h.Suspect && (noExclusions || !req.Exclude[h.Name])
	}

	// 1. Warm.
	if req.Function != "" {
		noSkips := len(req.SkipWarm) == 0
		best, bestN, ties := -1, 0, 0
		for i := range hosts {
			h := &hosts[i]
			if h.Contents == nil || !usable(h) {
				continue
			}
			n := q.warmIdle(h.Contents)
			if n <= 0 || (!noSkips && req.SkipWarm[h.Name]) {
				continue
			}
			switch {
			case best < 0 || n > bestN || (n == bestN && h.Load < hosts[best].Load):
				best, bestN, ties = i, n, 1
			case n == bestN && h.Load == hosts[best].Load:
				ties++ // reservoir sampling among equals
				if rng.IntN(ties) == 0 {
					best = i
				}
			}
		}
		if best >= 0 {
			return Decision{Host: hosts[best].Name, Warm: true, Rule: "warm"}, nil
		}
	}

	// 2. Cold: hosts with the memory.
	cand := make([]int, 0, len(hosts))
	for i := range hosts {
		h := &hosts[i]
		if h.FreeMemoryMB >= req.MemoryMB && usable(h) {
			cand = append(cand, i)
		}
	}
	if len(cand) == 0 {
		return Decision{}, errs.New(errs.KindResourceExhausted, "no usable host has %d MB free among %d hosts (%d excluded)", req.MemoryMB, len(hosts), len(req.Exclude)).WithReason("no_capacity")
	}
	rule := "two-choices"

	// Spread across zones, then hosts: one lookup per host.
	if len(req.Sandboxes) > 0 {
		count := make([]int32, len(hosts))
		var zones []zoneCount // a few zones: a scan beats a map
		for i := range hosts {
			n := req.Sandboxes[hosts[i].Name]
			if n <= 0 {
				continue
			}
			count[i] = int32(min(n, 1<<30))
			zones = addZone(zones, hosts[i].Zone, n)
		}
		before := len(cand)
		if len(zones) > 0 {
			cand = keepMin(cand, func(i int) int { return zoneTotal(zones, hosts[i].Zone) })
		}
		cand = keepMin(cand, func(i int) int { return int(count[i]) })
		if len(cand) < before {
			rule = "spread"
		}
	}

	// Prefer hosts that cache the code.
	if req.Digest != "" {
		cached := 0
		for _, i := range cand {
			if c := hosts[i].Contents; c != nil && q.hasCode(c) {
				cand[cached] = i
				cached++
			}
		}
		if cached > 0 {
			cand = cand[:cached]
			rule = "code"
		}
	}

	// Power of two choices.
	pick := cand[0]
	if len(cand) > 1 {
		a := rng.IntN(len(cand))
		b := rng.IntN(len(cand) - 1)
		if b >= a {
			b++
		}
		pick = lessLoaded(hosts, cand[a], cand[b])
	}
	return Decision{Host: hosts[pick].Name, Rule: rule}, nil
}

type zoneCount struct {
	zone string
	n    int
}

func addZone(zs []zoneCount, zone string, n int) []zoneCount {
	for i := range zs {
		if zs[i].zone == zone {
			zs[i].n += n
			return zs
		}
	}
	return append(zs, zoneCount{zone, n})
}

func zoneTotal(zs []zoneCount, zone string) int {
	for _, z := range zs {
		if z.zone == zone {
			return z.n
		}
	}
	return 0
}

// keepMin filters idx in place to the entries with the smallest key (one
// key call per entry).
func keepMin(idx []int, key func(int) int) []int {
	lowest := int(^uint(0) >> 1)
	out := idx[:0]
	for _, i := range idx {
		switch k := key(i); {
		case k < lowest:
			lowest = k
			out = append(idx[:0], i)
		case k == lowest:
			out = append(out, i)
		}
	}
	return out
}

// lessLoaded returns the index of the less loaded host; on a tie the one
// with more free memory.
func lessLoaded(hosts []Host, a, b int) int {
	ha, hb := &hosts[a], &hosts[b]
	if ha.Load != hb.Load {
		if ha.Load < hb.Load {
			return a
		}
		return b
	}
	if hb.FreeMemoryMB > ha.FreeMemoryMB {
		return b
	}
	return a
}

// String formats a decision for logs.
func (d Decision) String() string {
	kind := "cold"
	if d.Warm {
		kind = "warm"
	}
	return fmt.Sprintf("%s on %s (%s)", kind, d.Host, d.Rule)
}
