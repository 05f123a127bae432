package placement

import (
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"sync"
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

type simCluster struct {
	gateways []*gossip.Node
	agents   []*gossip.Node
	caps     []gossip.Capacity
}

func (c *simCluster) all() []*gossip.Node { return append(slices.Clone(c.gateways), c.agents...) }

func (c *simCluster) shutdown() {
	var wg sync.WaitGroup
	for _, n := range c.all() {
		wg.Go(func() { _ = n.Shutdown() })
	}
	wg.Wait()
}

type convergence struct {
	join       time.Duration // starting and joining every member
	membership time.Duration // after the last join: every member sees every member alive
	capacity   time.Duration // after every agent set a new capacity: every gateway sees all of them
}

// startCluster starts gateways and agents on one in-memory network and
// measures convergence. It fails tb when the cluster does not converge
// within limit.
func startCluster(tb testing.TB, w *world, nAgents, nGateways int, limit time.Duration) (*simCluster, convergence) {
	tb.Helper()
	mn := gossip.NewMemNetwork()
	c := &simCluster{}
	var conv convergence
	start := time.Now()
	newNode := func(name string, role gossip.Role, zone string) *gossip.Node {
		n, err := gossip.New(gossip.Config{
			Name:          name,
			Transport:     mn.NewTransport(),
			Tags:          gossip.Tags{Role: role, Version: "sim", Zone: zone, Rack: "r1", RPCAddr: name + ":7070"},
			DiscardEvents: true,
			SkipCapacity:  role == gossip.RoleAgent,
			Logger:        simLogger(tb, name),
		})
		if err != nil {
			tb.Fatalf("starting %s: %v", name, err)
		}
		return n
	}
	for i := range nGateways {
		g := newNode(fmt.Sprintf("gw-%d", i), gossip.RoleGateway, zones[i%len(zones)])
		if i > 0 {
			if _, err := g.Join([]string{c.gateways[0].Addr()}); err != nil {
				tb.Fatal(err)
			}
		}
		c.gateways = append(c.gateways, g)
	}
	for i := range nAgents {
		if time.Since(start) > limit {
			c.shutdown()
			tb.Fatalf("only %d of %d agents joined within %v", i, nAgents, limit)
		}
		a := newNode(fmt.Sprintf("agent-%04d", i), gossip.RoleAgent, zones[i%len(zones)])
		// Join through a random earlier member, as agents started by a
		// fleet's configuration would (any member is a valid seed).
		seed := c.gateways[i%nGateways]
		if i > 0 && w.rng.IntN(2) == 0 {
			seed = c.agents[w.rng.IntN(len(c.agents))]
		}
		if _, err := a.Join([]string{seed.Addr()}); err != nil {
			tb.Fatal(err)
		}
		c.agents = append(c.agents, a)
	}
	conv.join = time.Since(start)
	total := nAgents + nGateways
	deadline := start.Add(limit)

	start = time.Now()
	waitUntil(tb, deadline, "membership convergence", func() string {
		for _, n := range c.all() {
			if got := n.Count(gossip.StateAlive); got != total {
				return fmt.Sprintf("%s sees %d of %d members alive", n.Name(), got, total)
			}
		}
		return ""
	})
	conv.membership = time.Since(start)

	start = time.Now()
	for _, a := range c.agents {
		cp := w.agentCapacity()
		c.caps = append(c.caps, cp)
		if err := a.SetCapacity(cp); err != nil {
			tb.Fatal(err)
		}
	}
	waitUntil(tb, deadline, "capacity convergence", func() string {
		for _, g := range c.gateways {
			for i, a := range c.agents {
				m, ok := g.Member(a.Name())
				if !ok || m.Capacity == nil || m.Capacity.MemoryFreeMB != c.caps[i].MemoryFreeMB {
					return fmt.Sprintf("%s has not seen %s's capacity", g.Name(), a.Name())
				}
			}
		}
		return ""
	})
	conv.capacity = time.Since(start)
	return c, conv
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
// what the gateway itself did since (claims, placements).
type simContents struct {
	sum     *gossip.Summary
	claimed map[string]int
	added   map[string]bool
}

func (s *simContents) WarmIdle(f string) int {
	n := s.sum.WarmIdle(f)
	if n > 0 {
		n -= s.claimed[f]
	}
	return n
}

func (s *simContents) HasCode(d string) bool {
	return s.sum.HasCode(d) || (len(s.added) > 0 && s.added[d])
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
			Contents: &simContents{sum: s, claimed: map[string]int{}, added: map[string]bool{}},
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
			c.claimed[req.Function]++
		} else {
			st.cold++
			h.FreeMemoryMB -= req.MemoryMB
			if h.FreeMemoryMB < 0 {
				tb.Fatalf("host %s overcommitted: %d MB free", h.Name, h.FreeMemoryMB)
			}
			h.Load = 1 - float64(h.FreeMemoryMB)/float64(total[h.Name])
			c.added[req.Digest] = true
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

func simAgents(tb testing.TB) int {
	if v := os.Getenv("SKIFF_SIM_AGENTS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			tb.Fatalf("SKIFF_SIM_AGENTS=%q: want a positive integer", v)
		}
		return n
	}
	if raceEnabled {
		return 40
	}
	return 150
}

// TestClusterSimulation runs SKIFF_SIM_AGENTS agents (default 150, 40 under
// -race: what a
// 2-core host sustains with the LAN timers, every member being a full
// memberlist in one process) and 3 gateways, measures gossip convergence,
// then runs 100,000 placements over the converged gateway view and over a
// 1,000-host view made of the same gossiped summaries.
func TestClusterSimulation(t *testing.T) {
	if testing.Short() {
		t.Skip("cluster simulation: skipped with -short")
	}
	agents := simAgents(t)
	w := newWorld(1, 500, agents)
	c, conv := startCluster(t, w, agents, 3, 55*time.Second)
	view := c.gateways[0].Members() // the converged view; stop gossip before timing decisions
	c.shutdown()
	t.Logf("gossip: %d agents + %d gateways: started and joined in %v; membership converged %v after the last join; all capacities at every gateway %v after every agent updated",
		agents, len(c.gateways), conv.join.Round(time.Millisecond), conv.membership.Round(time.Millisecond), conv.capacity.Round(time.Millisecond))
	checkPlacements(t, w, view)

	// 1,000 hosts: the view a converged gateway holds, built from the same
	// summaries without running 1,000 memberlists.
	w = newWorld(1, 500, 1000)
	view = nil
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

// BenchmarkChoose measures one decision over 1,000 hosts with gossiped
// summaries (warm top-N, code filter).
func BenchmarkChoose(b *testing.B) {
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
	reqs := make([]Request, 1024)
	for i := range reqs {
		f := w.pick()
		spread := map[string]int{}
		for range w.rng.IntN(8) {
			spread[hosts[w.rng.IntN(len(hosts))].Name]++
		}
		reqs[i] = Request{Function: w.functions[f], Digest: w.digests[f], MemoryMB: w.sizes[f], Sandboxes: spread}
	}
	rng := rand.New(rand.NewPCG(3, 3))
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if _, err := Choose(reqs[i%len(reqs)], hosts, rng); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkGossipConvergence starts a cluster per iteration
// (SKIFF_SIM_AGENTS agents, default 1,000) and reports its convergence.
func BenchmarkGossipConvergence(b *testing.B) {
	agents := simAgents(b)
	for b.Loop() {
		c, conv := startCluster(b, newWorld(1, 500, agents), agents, 3, 5*time.Minute)
		b.ReportMetric(conv.membership.Seconds(), "membership-s")
		b.ReportMetric(conv.capacity.Seconds(), "capacity-s")
		b.ReportMetric(conv.join.Seconds(), "join-s")
		c.shutdown()
	}
}
