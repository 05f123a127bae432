package placement

import (
	"cmp"
	"container/heap"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"skiff.dev/skiff/gossip"
)

// The live cluster simulation (issue 5 item 9): agents and a gateway on
// gossip's in-memory network with the LAN timers. It measures membership
// and capacity convergence, then runs a stream of invocations placed the
// way gateway/router/cluster.go places them (hosts built from the
// gateway's live gossip.Member view on every decision, warm claims that a
// stale view can miss, refused cold placements retried elsewhere) while
// the agents gossip their changing capacity, and finally kills agents and
// measures how long the gateway takes to see them dead.
//
// Sizes: SKIFF_SIM_AGENTS (default simDefaultAgents, fewer under -race).
// SKIFF_SIM_DILATION=k multiplies every gossip timer by k (and divides the
// reported protocol times by k), to fit a large cluster's protocol work
// into a small machine's CPU.
//
// Every member is a full memberlist in this one process, so at 1,000 the
// protocol's own work (alive messages: msgpack, broadcast queues, garbage)
// exceeds two cores at the LAN timers: the full run needs the timers
// dilated and the collector off, and still sees false failures from CPU
// starvation (reported, not failed, unless strict):
//
//	SKIFF_SIM_1000=1 SKIFF_SIM_DILATION=10 SKIFF_SIM_LIMIT_S=150 SKIFF_SIM_STREAM_S=10 \
//	GOGC=off GOMEMLIMIT=10GiB go test -run TestSim1000 -v -timeout 60m ./gateway/placement/
//
// The last log line is the result as JSON ("sim-result: {...}").

// simOptions sizes one simulation.
type simOptions struct {
	agents   int
	dilation float64       // timer multiplier (1: the LAN timers)
	rate     float64       // invocations per second
	stream   time.Duration // how long invocations arrive
	kill     int           // agents killed at the end
	limit    time.Duration // for join + each convergence phase
	// strict fails the test when a phase does not converge within limit;
	// otherwise what was reached is reported.
	strict bool
}

// measure waits for check (which returns what is still missing) until
// limit after start; false when not reached (a test failure if strict).
func measure(t *testing.T, opts simOptions, start time.Time, what string, check func() string) bool {
	t.Helper()
	if opts.strict {
		waitUntil(t, start.Add(opts.limit), what, check)
		return true
	}
	for {
		missing := check()
		if missing == "" {
			return true
		}
		if time.Since(start) > opts.limit {
			t.Logf("%s: not reached within %v: %s", what, opts.limit, missing)
			return false
		}
		time.Sleep(250 * time.Millisecond) // polling interval of a measurement
	}
}

// simResult is what one simulation measured (JSON in the test log, for
// docs/benchmarks.md). Protocol times are divided by the dilation.
type simResult struct {
	Agents, Gateways int
	Dilation         float64
	JoinS            float64 // starting and joining every member (wall clock)
	GatewayViewS     float64 // after the last join: the gateway sees every member alive
	MembershipS      float64 // after the last join: every member sees every member alive (0: not within the limit)
	GatewayAliveSeen int     // members the gateway saw alive when the wait ended
	MinAliveSeen     int     // the fewest members any member saw alive then
	CapacityCurrent  int     // agents whose new capacity the gateway had, when not all within the limit
	CapacityS        float64 // after every agent set a new capacity: the gateway has them all
	// Placement stream.
	Invocations, WarmHits, ColdStarts, StaleWarm, Refused, Failed int
	WarmHitRate                                                   float64
	BuildP50us, BuildP99us                                        float64 // hosts from Members(), as the router builds them
	ChooseP50us, ChooseP99us                                      float64 // placement.Choose alone
	DecideP50us, DecideP99us                                      float64 // build + Choose, every attempt of one invocation
	SandboxesPerHostMean, SandboxesPerHostMax, SandboxesPerHostSD float64
	SandboxesMaxOverMean                                          float64
	ViewStaleMean                                                 float64 // |gateway's free MB - agent's free MB| / agent total, mean at the end
	// Failure detection.
	Killed, Detected       int
	DetectP50S, DetectMaxS float64 // kill → the gateway's fail event
	FalseFailures          int     // fail events for members that were not killed (or before the kill)
	FalselyFailedMembers   int     // distinct members with false fail events
	GatewayEvents          int
	HeapMB                 int // heap in use after the stream
	CPUs                   int
}

func envInt(tb testing.TB, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		tb.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}

func envFloat(tb testing.TB, name string, def float64) float64 {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	f, err := strconv.ParseFloat(v, 64)
	if err != nil || f < 1 || f > 100 {
		tb.Fatalf("%s=%q: want a number in [1, 100]", name, v)
	}
	return f
}

// joinWave is how many agents join before the next wait for the gateway
// to see them.
const joinWave = 50

// simDefaultAgents is the size `make test` runs (under -race: 20).
const simDefaultAgents = 60

// TestClusterSimulation is the small simulation `make test` runs.
func TestClusterSimulation(t *testing.T) {
	if testing.Short() {
		t.Skip("cluster simulation: skipped with -short")
	}
	agents := simDefaultAgents
	if raceEnabled {
		agents = 20
	}
	opts := simOptions{
		agents:   envInt(t, "SKIFF_SIM_AGENTS", agents),
		dilation: envFloat(t, "SKIFF_SIM_DILATION", 1),
		rate:     100,
		stream:   3 * time.Second,
		kill:     3,
		limit:    60 * time.Second,
		strict:   true,
	}
	res := simulate(t, opts)
	checkSim(t, opts, res)
}

// TestSim1000 is the full run: 1,000 agents (SKIFF_SIM_AGENTS overrides).
// It is skipped unless SKIFF_SIM_1000 is set: it takes minutes of both
// cores.
func TestSim1000(t *testing.T) {
	if os.Getenv("SKIFF_SIM_1000") == "" {
		t.Skip("set SKIFF_SIM_1000=1 to simulate 1,000 agents")
	}
	opts := simOptions{
		agents:   envInt(t, "SKIFF_SIM_AGENTS", 1000),
		dilation: envFloat(t, "SKIFF_SIM_DILATION", 1),
		rate:     float64(envInt(t, "SKIFF_SIM_RATE", 200)),
		stream:   time.Duration(envInt(t, "SKIFF_SIM_STREAM_S", 20)) * time.Second,
		kill:     10,
		limit:    time.Duration(envInt(t, "SKIFF_SIM_LIMIT_S", 600)) * time.Second,
	}
	res := simulate(t, opts)
	checkSim(t, opts, res)
}

func checkSim(t *testing.T, opts simOptions, r simResult) {
	t.Helper()
	if r.Failed > 0 {
		t.Errorf("%d invocations found no host, want 0 (the cluster has room)", r.Failed)
	}
	if r.WarmHitRate < 0.5 {
		t.Errorf("warm hit rate %.3f, want ≥ 0.5 (popular functions reuse their sandboxes)", r.WarmHitRate)
	}
	// Two choices among hosts the spread rules leave: no host gets more
	// than a handful of times the mean.
	if r.SandboxesPerHostMean >= 1 && r.SandboxesMaxOverMean > 4 {
		t.Errorf("sandboxes per host max/mean %.2f, want ≤ 4", r.SandboxesMaxOverMean)
	}
	// A crash is detected in about a second with the LAN timers (suspicion
	// timeout 2 × log10(n) probe intervals); 5 s (dilated) leaves room for
	// a busy host.
	if r.Detected < r.Killed {
		t.Errorf("%d of %d killed agents declared dead", r.Detected, r.Killed)
	}
	if bound := 5.0; r.DetectMaxS > bound {
		t.Errorf("failure detection took %.2f s, want ≤ %.0f s", r.DetectMaxS, bound)
	}
	if r.FalseFailures > 0 {
		t.Logf("note: %d members declared dead that were not killed (CPU starvation makes probes time out)", r.FalseFailures)
	}
}

// simAgent is one agent's ground truth.
type simAgent struct {
	node     *gossip.Node
	name     string
	zone     string
	totalMB  int64
	freeMB   int64
	idle     map[int]int // function index → idle sandboxes
	busy     int
	code     map[int]bool
	placed   int // sandboxes the stream started here
	dirty    bool
	dead     bool
	initUsed int64
}

func (a *simAgent) capacity(w *world) gossip.Capacity {
	c := gossip.Capacity{
		MemoryTotalMB: a.totalMB, MemoryFreeMB: a.freeMB, CPUTotalMilli: 32000,
		Busy: a.busy, WarmIdle: make(map[string]int, len(a.idle)),
	}
	for f, n := range a.idle {
		if n > 0 {
			c.WarmIdle[w.functions[f]] = n
			c.Idle += n
		}
	}
	for f := range a.code {
		c.CodeDigests = append(c.CodeDigests, w.digests[f])
	}
	c.Sandboxes = c.Busy + c.Idle
	c.Load = 1 - float64(a.freeMB)/float64(a.totalMB)
	c.CPUFreeMilli = int64(float64(c.CPUTotalMilli) * (1 - c.Load))
	return c
}

// reserve takes mb for a new sandbox, evicting idle sandboxes when needed
// (the agent's ledger does the same); false: the host is full.
func (a *simAgent) reserve(w *world, mb int64) bool {
	for a.freeMB < mb {
		victim := -1
		for f, n := range a.idle {
			if n > 0 {
				victim = f
				break
			}
		}
		if victim < 0 {
			return false
		}
		a.idle[victim]--
		a.freeMB = min(a.totalMB, a.freeMB+w.sizes[victim])
	}
	a.freeMB -= mb
	return true
}

// simCluster is the running simulation.
type simCluster struct {
	gw     *gossip.Node
	agents []*simAgent
	byName map[string]*simAgent
	events *eventLog
}

func (c *simCluster) shutdown() {
	var wg sync.WaitGroup
	for _, a := range c.agents {
		if !a.dead {
			wg.Go(func() { _ = a.node.Shutdown() })
		}
	}
	wg.Wait()
	_ = c.gw.Shutdown()
	c.events.wait()
}

// eventLog records the gateway's fail events with their arrival times.
type eventLog struct {
	mu    sync.Mutex
	fails map[string][]time.Time // every fail event of a member (a falsely failed one refutes and can fail again)
	count int
	done  chan struct{}
}

func watch(n *gossip.Node) *eventLog {
	l := &eventLog{fails: map[string][]time.Time{}, done: make(chan struct{})}
	go func() {
		defer close(l.done)
		for ev := range n.Events() {
			l.mu.Lock()
			l.count++
			if ev.Type == gossip.EventFail {
				l.fails[ev.Member.Name] = append(l.fails[ev.Member.Name], time.Now())
			}
			l.mu.Unlock()
		}
	}()
	return l
}

// failedAfter returns when the member was first declared dead after t.
func (l *eventLog) failedAfter(name string, t time.Time) (time.Time, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, at := range l.fails[name] {
		if !at.Before(t) {
			return at, true
		}
	}
	return time.Time{}, false
}

func (l *eventLog) wait() { <-l.done }

func scaled(t gossip.Timers, k float64) gossip.Timers {
	s := func(d time.Duration) time.Duration { return time.Duration(float64(d) * k) }
	t.ProbeInterval, t.ProbeTimeout = s(t.ProbeInterval), s(t.ProbeTimeout)
	t.GossipInterval, t.PushPullInterval = s(t.GossipInterval), s(t.PushPullInterval)
	t.UpdateInterval, t.RefreshInterval = s(t.UpdateInterval), s(t.RefreshInterval)
	return t
}

// simulate runs one simulation and logs its result as JSON.
func simulate(t *testing.T, opts simOptions) simResult {
	t.Helper()
	w := newWorld(1, 200, opts.agents)
	res := simResult{Agents: opts.agents, Gateways: 1, Dilation: opts.dilation, CPUs: runtime.NumCPU()}
	k := opts.dilation
	timers := scaled(gossip.LANTimers(), k)
	mn := gossip.NewMemNetwork()
	newNode := func(name string, role gossip.Role, zone string) *gossip.Node {
		n, err := gossip.New(gossip.Config{
			Name:          name,
			Transport:     mn.NewTransport(),
			Tags:          gossip.Tags{Role: role, Version: "sim", Zone: zone, Rack: "r1", RPCAddr: name + ":7070"},
			Timers:        timers,
			DiscardEvents: role == gossip.RoleAgent,
			SkipCapacity:  role == gossip.RoleAgent,
			Logger:        simLogger(t, name),
		})
		if err != nil {
			t.Fatalf("starting %s: %v", name, err)
		}
		return n
	}

	// Join.
	start := time.Now()
	c := &simCluster{gw: newNode("gw-0", gossip.RoleGateway, zones[0]), byName: map[string]*simAgent{}}
	c.events = watch(c.gw)
	defer func() { c.shutdown() }()
	for i := range opts.agents {
		if time.Since(start) > opts.limit {
			t.Fatalf("only %d of %d agents joined within %v", i, opts.agents, opts.limit)
		}
		name := fmt.Sprintf("agent-%04d", i)
		a := &simAgent{node: newNode(name, gossip.RoleAgent, zones[i%len(zones)]), name: name, zone: zones[i%len(zones)]}
		// Join through the gateway or a random earlier agent, as a fleet's
		// configuration would (any member is a valid seed).
		// A join that times out (a starved seed) is retried with another,
		// as an agent's start-up would.
		var err error
		for try := range 3 {
			seed := c.gw.Addr()
			if len(c.agents) > 0 && (try > 0 || w.rng.IntN(2) == 0) {
				seed = c.agents[w.rng.IntN(len(c.agents))].node.Addr()
			}
			if _, err = a.node.Join([]string{seed}); err == nil {
				break
			}
		}
		if err != nil {
			t.Fatal(err)
		}
		c.agents = append(c.agents, a)
		c.byName[name] = a
		// Agents start in waves of joinWave (a fleet's rolling start): the
		// next wave joins once the gateway sees this one, so the join
		// traffic stays within what one machine running every member
		// sustains.
		if len(c.agents)%joinWave == 0 {
			want := len(c.agents) + 1
			if !opts.strict {
				want = want * 98 / 100 // stragglers are counted below
			}
			waitUntil(t, start.Add(opts.limit), "join wave", func() string {
				if got := c.gw.Count(gossip.StateAlive); got < want {
					return fmt.Sprintf("the gateway sees %d of %d members alive", got, len(c.agents)+1)
				}
				return ""
			})
			if opts.agents >= 200 {
				t.Logf("%d agents joined after %.1f s", len(c.agents), time.Since(start).Seconds())
			}
		}
	}
	res.JoinS = time.Since(start).Seconds()
	total := opts.agents + 1
	all := func(yield func(*gossip.Node) bool) {
		if !yield(c.gw) {
			return
		}
		for _, a := range c.agents {
			if !yield(a.node) {
				return
			}
		}
	}

	// Membership convergence: first the gateway, then every member.
	start = time.Now()
	gwSees := func() string {
		if got := c.gw.Count(gossip.StateAlive); got != total {
			return fmt.Sprintf("the gateway sees %d of %d members alive", got, total)
		}
		return ""
	}
	if measure(t, opts, start, "the gateway's view", gwSees) {
		res.GatewayViewS = time.Since(start).Seconds() / k
	}
	converged := measure(t, opts, start, "membership convergence", func() string {
		for n := range all {
			if got := n.Count(gossip.StateAlive); got != total {
				return fmt.Sprintf("%s sees %d of %d members alive", n.Name(), got, total)
			}
		}
		return ""
	})
	res.MinAliveSeen = total
	for n := range all {
		res.MinAliveSeen = min(res.MinAliveSeen, n.Count(gossip.StateAlive))
	}
	res.GatewayAliveSeen = c.gw.Count(gossip.StateAlive)
	if converged {
		res.MembershipS = time.Since(start).Seconds() / k
		t.Logf("%d agents joined in %.1f s; the gateway saw all alive %.2f s later, every member %.2f s later", opts.agents, res.JoinS, res.GatewayViewS, res.MembershipS)
	} else {
		t.Logf("%d agents joined in %.1f s; NOT converged after %v: the gateway sees %d of %d alive, the worst member %d",
			opts.agents, res.JoinS, opts.limit, res.GatewayAliveSeen, total, res.MinAliveSeen)
	}

	// Capacity convergence: every agent reports at once.
	start = time.Now()
	for _, a := range c.agents {
		cp := w.agentCapacity()
		a.totalMB, a.freeMB, a.idle, a.code = cp.MemoryTotalMB, cp.MemoryFreeMB, map[int]int{}, map[int]bool{}
		a.initUsed = cp.MemoryTotalMB - cp.MemoryFreeMB
		for f, key := range w.functions {
			if n := cp.WarmIdle[key]; n > 0 {
				a.idle[f] = n
			}
		}
		for f, d := range w.digests {
			if slices.Contains(cp.CodeDigests, d) {
				a.code[f] = true
			}
		}
		if err := a.node.SetCapacity(a.capacity(w)); err != nil {
			t.Fatal(err)
		}
	}
	capacitySeen := func() (current int) {
		for _, a := range c.agents {
			if m, ok := c.gw.Member(a.name); ok && m.Capacity != nil && m.Capacity.MemoryFreeMB == a.freeMB {
				current++
			}
		}
		return current
	}
	if measure(t, opts, start, "capacity convergence", func() string {
		if got := capacitySeen(); got != len(c.agents) {
			return fmt.Sprintf("the gateway has %d of %d agents' new capacity", got, len(c.agents))
		}
		return ""
	}) {
		res.CapacityS = time.Since(start).Seconds() / k
		t.Logf("the gateway had every agent's new capacity %.2f s after they all changed", res.CapacityS)
	} else {
		res.CapacityCurrent = capacitySeen()
		t.Logf("capacity NOT converged after %v: the gateway has %d of %d agents' new capacity", opts.limit, res.CapacityCurrent, len(c.agents))
	}

	stream(t, w, c, opts, &res)
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	res.HeapMB = int(ms.HeapInuse >> 20)

	detectFailures(t, c, opts, &res)
	out, _ := json.Marshal(res)
	t.Logf("sim-result: %s", out)
	return res
}

// completion is a running invocation's end.
type completion struct {
	at    time.Time
	agent *simAgent
	fn    int
}

type completions []completion

func (h completions) Len() int           { return len(h) }
func (h completions) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h completions) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *completions) Push(x any)        { *h = append(*h, x.(completion)) }
func (h *completions) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// routerHosts builds placement's hosts from a gossip view exactly as
// gateway/router/cluster.go (Cluster.agents) does on every invocation.
func routerHosts(ms []gossip.Member) ([]Host, map[string]gossip.Member) {
	hosts := make([]Host, 0, len(ms))
	byName := make(map[string]gossip.Member, len(ms))
	for _, m := range ms {
		if m.Tags.Role != gossip.RoleAgent || m.Tags.RPCAddr == "" {
			continue
		}
		if m.State != gossip.StateAlive && m.State != gossip.StateSuspect {
			continue
		}
		h := Host{Name: m.Name, Zone: m.Tags.Zone, Draining: m.Draining, Suspect: m.State == gossip.StateSuspect}
		if m.Capacity != nil {
			h.FreeMemoryMB = m.Capacity.MemoryFreeMB
			h.Load = m.Capacity.Load
			h.Contents = m.Capacity
		}
		hosts = append(hosts, h)
		byName[m.Name] = m
	}
	return hosts, byName
}

// duration is a function's invocation time: 50 ms to ~2.5 s, fixed per
// function.
func (w *world) duration(f int) time.Duration {
	return time.Duration(50+(f*7919)%2500) * time.Millisecond
}

// stream runs opts.rate invocations per second for opts.stream (both
// dilated: rate/k for k × stream, invocations k times longer), placing
// each as the router does over the gateway's live view, while agents
// gossip their changes.
func stream(t *testing.T, w *world, c *simCluster, opts simOptions, res *simResult) {
	t.Helper()
	rng := rand.New(rand.NewPCG(5, 5))
	var (
		running       completions
		build, choose []time.Duration
		decide        []time.Duration
		lastFlush     time.Time
		k             = opts.dilation // the stream is dilated with the gossip timers
		interval      = time.Duration(float64(time.Second) / opts.rate * k)
		n             = int(opts.rate * opts.stream.Seconds())
		flushEvery    = time.Duration(20 * float64(time.Millisecond) * k)
		flush         = func() {
			for _, a := range c.agents {
				if a.dirty {
					a.dirty = false
					if err := a.node.SetCapacity(a.capacity(w)); err != nil {
						t.Fatal(err)
					}
				}
			}
		}
	)
	begin := time.Now()
	for i := range n {
		// Arrivals are paced in wall-clock time: gossip runs in real time.
		next := begin.Add(time.Duration(i) * interval)
		for {
			now := time.Now()
			for len(running) > 0 && !running[0].at.After(now) {
				done := heap.Pop(&running).(completion)
				done.agent.busy--
				done.agent.idle[done.fn]++
				done.agent.dirty = true
			}
			if now.Sub(lastFlush) >= flushEvery {
				flush()
				lastFlush = now
			}
			if !now.Before(next) {
				break
			}
			time.Sleep(min(next.Sub(now), time.Millisecond)) // load generator pacing
		}

		f := w.pick()
		req := Request{Function: w.functions[f], Digest: w.digests[f], MemoryMB: w.sizes[f], Exclude: map[string]bool{}, SkipWarm: map[string]bool{}}
		res.Invocations++
		var spent time.Duration
		placed := false
		for attempt, tries := 0, 0; attempt < 3 && !placed; tries++ {
			t0 := time.Now()
			hosts, _ := routerHosts(c.gw.Members())
			t1 := time.Now()
			d, err := Choose(req, hosts, rng)
			t2 := time.Now()
			build = append(build, t1.Sub(t0))
			choose = append(choose, t2.Sub(t1))
			spent += t2.Sub(t0)
			if err != nil || tries > len(hosts)+3 {
				break
			}
			a := c.byName[d.Host]
			switch {
			case a.idle[f] > 0: // warm claim, or a cold placement that finds a warm sandbox
				a.idle[f]--
				res.WarmHits++
			case d.Warm: // the gossiped warm sandbox is gone: place again
				res.StaleWarm++
				req.SkipWarm[d.Host] = true
				continue
			case !a.reserve(w, w.sizes[f]):
				res.Refused++
				req.Exclude[d.Host] = true
				attempt++
				continue
			default:
				res.ColdStarts++
				a.code[f] = true
				a.placed++
			}
			a.busy++
			a.dirty = true
			heap.Push(&running, completion{at: time.Now().Add(time.Duration(float64(w.duration(f)) * k)), agent: a, fn: f})
			placed = true
		}
		decide = append(decide, spent)
		if !placed {
			res.Failed++
		}
	}
	elapsed := time.Since(begin)
	if lag := elapsed - time.Duration(float64(opts.stream)*k); lag > opts.stream/10 {
		t.Logf("note: the stream ran %v late (the machine could not keep up with %.0f/s)", lag.Round(time.Millisecond), opts.rate)
	}
	res.WarmHitRate = float64(res.WarmHits) / float64(res.Invocations)
	res.BuildP50us, res.BuildP99us = pct(build, 50), pct(build, 99)
	res.ChooseP50us, res.ChooseP99us = pct(choose, 50), pct(choose, 99)
	res.DecideP50us, res.DecideP99us = pct(decide, 50), pct(decide, 99)
	placed := make([]int, len(c.agents))
	for i, a := range c.agents {
		placed[i] = a.placed
	}
	mean, mx, sd := stats(placed)
	res.SandboxesPerHostMean, res.SandboxesPerHostMax, res.SandboxesPerHostSD = mean, mx, sd
	if mean > 0 {
		res.SandboxesMaxOverMean = mx / mean
	}
	// How far the gateway's view is from the truth right now (in flight:
	// the last ~UpdateInterval of changes has not arrived).
	flush()
	var stale float64
	for _, a := range c.agents {
		if m, ok := c.gw.Member(a.name); ok && m.Capacity != nil {
			stale += math.Abs(float64(m.Capacity.MemoryFreeMB-a.freeMB)) / float64(a.totalMB)
		}
	}
	res.ViewStaleMean = stale / float64(len(c.agents))
	t.Logf("stream: %d invocations in %v: %d warm (%.1f %%), %d cold, %d stale warm claims, %d refused, %d failed",
		res.Invocations, elapsed.Round(time.Millisecond), res.WarmHits, 100*res.WarmHitRate, res.ColdStarts, res.StaleWarm, res.Refused, res.Failed)
	t.Logf("decision (hosts from Members() + Choose, all attempts): p50 %.0f µs, p99 %.0f µs; building hosts p50 %.0f µs p99 %.0f µs; Choose p50 %.0f µs p99 %.0f µs",
		res.DecideP50us, res.DecideP99us, res.BuildP50us, res.BuildP99us, res.ChooseP50us, res.ChooseP99us)
	t.Logf("sandboxes started per host: mean %.2f, max %.0f (max/mean %.2f), stddev %.2f", mean, mx, res.SandboxesMaxOverMean, sd)
}

// detectFailures kills opts.kill agents at once (no leave message) and
// measures when the gateway declares each dead.
func detectFailures(t *testing.T, c *simCluster, opts simOptions, res *simResult) {
	t.Helper()
	// Members that failed before the kill were false failures.
	victims := map[string]bool{}
	step := max(1, len(c.agents)/max(1, opts.kill))
	for i := 0; i < len(c.agents) && len(victims) < opts.kill; i += step {
		if m, ok := c.gw.Member(c.agents[i].name); ok && m.State == gossip.StateAlive {
			victims[c.agents[i].name] = true
		}
	}
	killed := time.Now()
	for _, a := range c.agents {
		if victims[a.name] {
			a.dead = true
			_ = a.node.Shutdown()
		}
	}
	var took []time.Duration
	detected := func() {
		took = took[:0]
		for name := range victims {
			if at, ok := c.events.failedAfter(name, killed); ok {
				took = append(took, at.Sub(killed))
			}
		}
	}
	measure(t, opts, killed, "failure detection", func() string {
		if detected(); len(took) < len(victims) {
			return fmt.Sprintf("%d of %d killed agents declared dead", len(took), len(victims))
		}
		return ""
	})
	detected()
	slices.Sort(took)
	res.Killed, res.Detected = len(victims), len(took)
	if len(took) > 0 {
		res.DetectP50S = took[len(took)/2].Seconds() / opts.dilation
		res.DetectMaxS = took[len(took)-1].Seconds() / opts.dilation
	}
	c.events.mu.Lock()
	falsely := map[string]bool{}
	for name, ats := range c.events.fails {
		for _, at := range ats {
			if !victims[name] || at.Before(killed) {
				res.FalseFailures++
				falsely[name] = true
			}
		}
	}
	res.FalselyFailedMembers = len(falsely)
	res.GatewayEvents = c.events.count
	c.events.mu.Unlock()
	t.Logf("failure detection: %d agents killed; the gateway declared %d dead after p50 %.2f s, max %.2f s; %d false fail events over the run (%d members)",
		res.Killed, res.Detected, res.DetectP50S, res.DetectMaxS, res.FalseFailures, res.FalselyFailedMembers)
}

// pct returns the p-th percentile in microseconds.
func pct(xs []time.Duration, p float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.SortFunc(s, cmp.Compare)
	i := min(len(s)-1, int(math.Ceil(p/100*float64(len(s))))-1)
	return float64(s[max(0, i)]) / float64(time.Microsecond)
}

// stats returns the mean, maximum and standard deviation.
func stats(xs []int) (mean, mx, sd float64) {
	if len(xs) == 0 {
		return 0, 0, 0
	}
	for _, x := range xs {
		mean += float64(x)
		mx = max(mx, float64(x))
	}
	mean /= float64(len(xs))
	for _, x := range xs {
		sd += (float64(x) - mean) * (float64(x) - mean)
	}
	return mean, mx, math.Sqrt(sd / float64(len(xs)))
}
