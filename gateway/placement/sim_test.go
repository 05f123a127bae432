package placement

import (
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"os"
	"slices"
	"testing"
	"time"

	"skiff.dev/skiff/gossip"
)

// The cluster simulation (issue 5 item 9): agents and gateways on gossip's
// in-memory network with the LAN timers, convergence measured, then
// placement decisions over a gateway's converged view.

var zones = []string{"zone-a", "zone-b", "zone-c"}

// world is the ground truth the simulated agents report.
type world struct {
	functions []string // function version keys
	digests   []string // code digest per function
	sizes     []int64  // memory per function
	zipf      *rand.Zipf
	rng       *rand.Rand
	hostMB    int64 // memory per host: 128 GB at 1,000 hosts, scaled up for fewer
}

func newWorld(seed uint64, nfuncs, hosts int) *world {
	rng := rand.New(rand.NewPCG(seed, 99))
	w := &world{rng: rng, zipf: rand.NewZipf(rng, 1.1, 1, uint64(nfuncs-1)), hostMB: 128 * 1024 * 1000 / int64(hosts)}
	sizes := []struct {
		mb     int64
		weight int
	}{{128, 30}, {256, 25}, {512, 20}, {1024, 15}, {2048, 8}, {3008, 2}}
	for i := range nfuncs {
		w.functions = append(w.functions, fmt.Sprintf("fn-%04d:%d", i, 1+i%3))
		w.digests = append(w.digests, fmt.Sprintf("sha256:%064x", uint64(i)*0x9e3779b97f4a7c15))
		r := rng.IntN(100)
		for _, s := range sizes {
			if r < s.weight {
				w.sizes = append(w.sizes, s.mb)
				break
			}
			r -= s.weight
		}
	}
	return w
}

func (w *world) pick() int { return int(w.zipf.Uint64()) }

// agentCapacity is what an agent starts with: hostMB, 10–30 % used, a few
// warm idle sandboxes and ~30 cached digests of popular functions.
func (w *world) agentCapacity() gossip.Capacity {
	c := gossip.Capacity{MemoryTotalMB: w.hostMB, CPUTotalMilli: 32000, WarmIdle: map[string]int{}}
	used := int64(float64(c.MemoryTotalMB) * (0.1 + 0.2*w.rng.Float64()))
	c.MemoryFreeMB = c.MemoryTotalMB - used
	c.Load = float64(used) / float64(c.MemoryTotalMB)
	c.CPUFreeMilli = int64(float64(c.CPUTotalMilli) * (1 - c.Load))
	for range 10 {
		c.WarmIdle[w.functions[w.pick()]]++
		c.Idle++
	}
	seen := map[int]bool{}
	for len(seen) < 30 {
		seen[w.pick()] = true
	}
	for f := range seen {
		c.CodeDigests = append(c.CodeDigests, w.digests[f])
	}
	c.Sandboxes = c.Idle + int(used/512)
	c.Busy = c.Sandboxes - c.Idle
	return c
}

// simLogger keeps memberlist's warnings of one gateway (gw-0) in the test
// log, counted rather than printed when there are many.
func simLogger(tb testing.TB, name string) *slog.Logger {
	if name != "gw-0" || os.Getenv("SKIFF_SIM_LOG") == "" {
		return nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// waitUntil polls check (which returns what is still missing) until it
// returns "" or the deadline passes.
func waitUntil(tb testing.TB, deadline time.Time, what string, check func() string) {
	tb.Helper()
	for {
		missing := check()
		if missing == "" {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%s: not reached in time: %s", what, missing)
		}
		time.Sleep(100 * time.Millisecond) // polling interval of a measurement, not synchronisation
	}
}

// simContents is a gateway's view of one host: the gossiped summary plus
// what the gateway itself did since (claims, placements). It implements
// the keyed fast path, as the summary does.
type simContents struct {
	sum     *gossip.Summary
	claimed map[gossip.Key]int
	added   map[gossip.Key]bool
}

func (s *simContents) WarmIdle(f string) int { return s.WarmIdleKey(gossip.KeyOf(f)) }
func (s *simContents) HasCode(d string) bool { return s.HasCodeKey(gossip.KeyOf(d)) }

func (s *simContents) WarmIdleKey(k gossip.Key) int {
	n := s.sum.WarmIdleKey(k)
	if n > 0 {
		n -= s.claimed[k]
	}
	return n
}

func (s *simContents) HasCodeKey(k gossip.Key) bool {
	return s.sum.HasCodeKey(k) || (len(s.added) > 0 && s.added[k])
}

type placementStats struct {
	hosts                         int
	decisions, warm, cold, failed int
	perDecision                   time.Duration
	maxOverMean, cv               float64 // sandboxes placed per host
	memMaxOverMean, memCV         float64 // memory used per host
	topHosts, topZones            int     // hosts and zones holding the most popular function
}

// runPlacements places n sandboxes over the view a gateway converged on.
func runPlacements(tb testing.TB, w *world, view []gossip.Member, n int) placementStats {
	tb.Helper()
	var hosts []Host
	total := map[string]int64{}
	for _, m := range view {
		if m.Tags.Role != gossip.RoleAgent || m.State != gossip.StateAlive || m.Capacity == nil {
			continue
		}
		s := m.Capacity
		hosts = append(hosts, Host{
			Name: m.Name, Zone: m.Tags.Zone, Draining: m.Draining, FreeMemoryMB: s.MemoryFreeMB, Load: s.Load,
			Contents: &simContents{sum: s, claimed: map[gossip.Key]int{}, added: map[gossip.Key]bool{}},
		})
		total[m.Name] = s.MemoryTotalMB
	}
	slices.SortFunc(hosts, func(a, b Host) int {
		if a.Name < b.Name {
			return -1
		}
		return 1
	})
	index := map[string]int{}
	for i, h := range hosts {
		index[h.Name] = i
	}
	placed := make([]int, len(hosts))
	spread := make([]map[string]int, len(w.functions))
	rng := rand.New(rand.NewPCG(42, 42))
	st := placementStats{hosts: len(hosts)}
	var spent time.Duration
	for range n {
		f := w.pick()
		if spread[f] == nil {
			spread[f] = map[string]int{}
		}
		req := Request{Function: w.functions[f], Digest: w.digests[f], MemoryMB: w.sizes[f], Sandboxes: spread[f]}
		t0 := time.Now()
		d, err := Choose(req, hosts, rng)
		spent += time.Since(t0)
		st.decisions++
		if err != nil {
			st.failed++
			continue
		}
		i := index[d.Host]
		h := &hosts[i]
		c := h.Contents.(*simContents)
		if d.Warm {
			st.warm++
			c.claimed[gossip.KeyOf(req.Function)]++
		} else {
			st.cold++
			h.FreeMemoryMB -= req.MemoryMB
			if h.FreeMemoryMB < 0 {
				tb.Fatalf("host %s overcommitted: %d MB free", h.Name, h.FreeMemoryMB)
			}
			h.Load = 1 - float64(h.FreeMemoryMB)/float64(total[h.Name])
			c.added[gossip.KeyOf(req.Digest)] = true
		}
		placed[i]++
		spread[f][d.Host]++
	}
	st.perDecision = spent / time.Duration(n)
	st.maxOverMean, st.cv = balance(placed)
	used := make([]int, len(hosts))
	for i, h := range hosts {
		used[i] = int(total[h.Name] - h.FreeMemoryMB)
	}
	st.memMaxOverMean, st.memCV = balance(used)
	zs := map[string]bool{}
	for name := range spread[0] {
		zs[hosts[index[name]].Zone] = true
	}
	st.topHosts, st.topZones = len(spread[0]), len(zs)
	return st
}

// balance returns max/mean and the coefficient of variation.
func balance(xs []int) (maxOverMean, cv float64) {
	var sum, mx float64
	for _, x := range xs {
		sum += float64(x)
		mx = max(mx, float64(x))
	}
	mean := sum / float64(len(xs))
	var ss float64
	for _, x := range xs {
		ss += (float64(x) - mean) * (float64(x) - mean)
	}
	return mx / mean, math.Sqrt(ss/float64(len(xs))) / mean
}

// TestPlacement1000View places 100,000 sandboxes over the view a
// converged gateway holds of 1,000 agents (the same gossiped summaries,
// without running 1,000 memberlists): balance and spread.
func TestPlacement1000View(t *testing.T) {
	w := newWorld(1, 500, 1000)
	var view []gossip.Member
	for i := range 1000 {
		s, err := gossip.Summarize(w.agentCapacity(), 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		view = append(view, gossip.Member{Name: fmt.Sprintf("agent-%04d", i), Tags: gossip.Tags{Role: gossip.RoleAgent, Zone: zones[i%len(zones)]}, Capacity: s})
	}
	checkPlacements(t, w, view)
}

func checkPlacements(t *testing.T, w *world, view []gossip.Member) {
	t.Helper()
	decisions := 100_000
	if raceEnabled {
		decisions = 10_000 // the race detector makes each decision ~4× slower
	}
	st := runPlacements(t, w, view, decisions)
	t.Logf("placement over %d hosts: %d decisions, %d warm, %d cold, %d without capacity; %v per decision",
		st.hosts, st.decisions, st.warm, st.cold, st.failed, st.perDecision)
	t.Logf("balance over %d hosts: sandboxes placed per host max/mean %.2f, CV %.3f; memory used per host max/mean %.2f, CV %.3f; most popular function on %d hosts in %d zones",
		st.hosts, st.maxOverMean, st.cv, st.memMaxOverMean, st.memCV, st.topHosts, st.topZones)
	if st.failed > 0 {
		t.Errorf("%d placements found no host, want 0 (the cluster has room)", st.failed)
	}
	if st.topZones != len(zones) {
		t.Errorf("most popular function in %d zones, want %d", st.topZones, len(zones))
	}
	if st.maxOverMean > 2 {
		t.Errorf("sandboxes per host max/mean %.2f, want ≤ 2", st.maxOverMean)
	}
}

// BenchmarkChoose1000 measures one decision over 1,000 hosts with
// gossiped summaries (warm top-N, code filter): "warm" finds a warm
// sandbox (a scan of every host); "cold" finds none (the scan, then
// memory, a few hosts already running the function, the code filter and
// two choices); "cold-spread" is a function already on 300 hosts.
func BenchmarkChoose1000(b *testing.B) {
	w := newWorld(2, 500, 1000)
	hosts := make([]Host, 1000)
	for i := range hosts {
		cp := w.agentCapacity()
		s, err := gossip.Summarize(cp, 0, 0)
		if err != nil {
			b.Fatal(err)
		}
		hosts[i] = Host{Name: fmt.Sprintf("agent-%04d", i), Zone: zones[i%3], FreeMemoryMB: s.MemoryFreeMB, Load: s.Load, Contents: s}
	}
	requests := func(cold bool, spreadOver int) []Request {
		reqs := make([]Request, 1024)
		for i := range reqs {
			f := w.pick()
			spread := map[string]int{}
			for range spreadOver + w.rng.IntN(8) {
				spread[hosts[w.rng.IntN(len(hosts))].Name]++
			}
			fn := w.functions[f]
			if cold {
				fn = "not-warm-anywhere:1" // the digest stays: the code filter is consulted
			}
			reqs[i] = Request{Function: fn, Digest: w.digests[f], MemoryMB: w.sizes[f], Sandboxes: spread}
		}
		return reqs
	}
	for _, bc := range []struct {
		name string
		reqs []Request
	}{{"warm", requests(false, 0)}, {"cold", requests(true, 0)}, {"cold-spread", requests(true, 300)}} {
		b.Run(bc.name, func(b *testing.B) {
			rng := rand.New(rand.NewPCG(3, 3))
			warm := 0
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				d, err := Choose(bc.reqs[i%len(bc.reqs)], hosts, rng)
				if err != nil {
					b.Fatal(err)
				}
				if d.Warm {
					warm++
				}
			}
			if want := bc.name == "warm"; (warm > 0) != want {
				b.Fatalf("%s: %d warm decisions", bc.name, warm)
			}
		})
	}
}
