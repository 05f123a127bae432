package router

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/placement"
	"skiff.dev/skiff/gossip"
	"skiff.dev/skiff/internal/errs"
)

// Members is the gossiped view the cluster router places work on; a
// *gossip.Node implements it.
type Members interface {
	Members() []gossip.Member
	// MarkSuspect marks a member this gateway could not reach; placement
	// avoids it until its next metadata update.
	MarkSuspect(name string) bool
}

// ClusterConfig configures a Cluster.
type ClusterConfig struct {
	Members Members
	// Dial returns the AgentService client of the agent at rpcAddr (its
	// gossiped RPC address). The Cluster keeps one client per address.
	Dial func(rpcAddr string) Agent
	// Attempts bounds the hosts one invocation tries when agents refuse
	// it (draining, full, unreachable); default 3.
	Attempts int
	// SpreadWindow is how long a cold start counts towards spreading a
	// function's sandboxes over hosts and zones (about a sandbox's
	// keep-alive); default 10 minutes.
	SpreadWindow time.Duration
	// Now is the clock; nil means time.Now.
	Now      func() time.Time
	Logger   *slog.Logger
	Registry prometheus.Registerer
}

// Cluster is the worker manager of a gateway in a cluster: it places each
// invocation on an agent with gateway/placement over the gossiped view and
// calls it over the network.
type Cluster struct {
	cfg  ClusterConfig
	log  *slog.Logger
	m    *clusterMetrics
	view atomic.Pointer[view] // the hosts of the last member view version

	mu       sync.Mutex
	clients  map[string]Agent                                 // by RPC address; guarded by mu
	rng      *rand.Rand                                       // guarded by mu
	inflight map[string]map[*context.CancelCauseFunc]struct{} // by host; guarded by mu
	// starts: recent cold starts by function and host, so that a
	// function's sandboxes spread (the gossiped summaries carry only the
	// top idle counts); guarded by mu.
	starts map[string]map[string][]time.Time
	// pending: invocations of a function running now per host, so that
	// concurrent cold starts spread before the gossiped view shows them;
	// guarded by mu.
	pending map[string]map[string]int
}

// sandboxes counts a function's sandboxes per host as this gateway knows
// them: its recent cold starts and its invocations running now.
func (c *Cluster) sandboxes(function string) map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	hosts := c.starts[function]
	pend := c.pending[function]
	if len(hosts) == 0 && len(pend) == 0 {
		return nil
	}
	cutoff := c.cfg.Now().Add(-c.cfg.SpreadWindow)
	out := make(map[string]int, len(hosts)+len(pend))
	for h, n := range pend {
		out[h] = n
	}
	for h, ts := range hosts {
		i := 0
		for i < len(ts) && ts[i].Before(cutoff) {
			i++
		}
		if ts = ts[i:]; len(ts) == 0 {
			delete(hosts, h)
			continue
		}
		hosts[h] = ts
		out[h] += len(ts)
	}
	if len(hosts) == 0 {
		delete(c.starts, function)
	}
	return out
}

func (c *Cluster) pend(function, host string, delta int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := c.pending[function]
	if m == nil {
		m = map[string]int{}
		c.pending[function] = m
	}
	if m[host] += delta; m[host] <= 0 {
		delete(m, host)
		if len(m) == 0 {
			delete(c.pending, function)
		}
	}
}

func (c *Cluster) started(function, host string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.starts[function] == nil {
		c.starts[function] = map[string][]time.Time{}
	}
	c.starts[function][host] = append(c.starts[function][host], c.cfg.Now())
}

// errHostFailed is the cancellation cause of invocations on a host the
// failure detector declared dead.
type errHostFailed struct{ host string }

func (e errHostFailed) Error() string {
	return fmt.Sprintf("agent %s was declared dead by the cluster's failure detection", e.host)
}

// HostFailed fails the invocations running on host now: the gossip
// failure detector declared it dead, so waiting for the transport to
// notice (a TCP or HTTP/2 ping timeout) would only delay the error.
func (c *Cluster) HostFailed(host string) {
	c.mu.Lock()
	calls := c.inflight[host]
	delete(c.inflight, host)
	c.mu.Unlock()
	for cancel := range calls {
		(*cancel)(errHostFailed{host})
	}
	if len(calls) > 0 {
		c.log.Warn("invocations failed with their agent", "host", host, "count", len(calls))
	}
}

// track runs call under a context HostFailed can cancel.
func (c *Cluster) track(ctx context.Context, host string, call func(ctx context.Context) error) error {
	cctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	key := &cancel
	c.mu.Lock()
	if c.inflight[host] == nil {
		c.inflight[host] = map[*context.CancelCauseFunc]struct{}{}
	}
	c.inflight[host][key] = struct{}{}
	c.mu.Unlock()
	err := call(cctx)
	c.mu.Lock()
	delete(c.inflight[host], key)
	if len(c.inflight[host]) == 0 {
		delete(c.inflight, host)
	}
	c.mu.Unlock()
	var failed errHostFailed
	if err != nil && errors.As(context.Cause(cctx), &failed) {
		return errs.Unavailable("%v during the invocation", failed).WithReason("agent_lost")
	}
	return err
}

// NewCluster returns a cluster router.
func NewCluster(cfg ClusterConfig) (*Cluster, error) {
	if cfg.Members == nil || cfg.Dial == nil {
		return nil, errors.New("router: a cluster router needs members and a dialer")
	}
	if cfg.Attempts <= 0 {
		cfg.Attempts = 3
	}
	if cfg.SpreadWindow <= 0 {
		cfg.SpreadWindow = 10 * time.Minute
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	m, err := newClusterMetrics(cfg.Registry)
	if err != nil {
		return nil, err
	}
	return &Cluster{
		cfg: cfg, log: cfg.Logger, m: m,
		clients:  map[string]Agent{},
		inflight: map[string]map[*context.CancelCauseFunc]struct{}{},
		starts:   map[string]map[string][]time.Time{},
		pending:  map[string]map[string]int{},
		rng:      rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64())),
	}, nil
}

// versioned is a member view that counts its changes (*gossip.Node):
// the placement hosts are rebuilt only when it moved.
type versioned interface{ Version() uint64 }

// view is the placement hosts built from one version of the member view;
// read-only once built.
type view struct {
	version uint64
	hosts   []placement.Host
	byName  map[string]gossip.Member
}

// agents returns the live agents, as placement hosts and by name. With a
// versioned member view it reuses the hosts built for the same version
// (at 1,000 agents rebuilding costs far more than placing).
func (c *Cluster) agents() ([]placement.Host, map[string]gossip.Member) {
	v, ok := c.cfg.Members.(versioned)
	if !ok {
		return c.build()
	}
	ver := v.Version()
	if cur := c.view.Load(); cur != nil && cur.version == ver {
		return cur.hosts, cur.byName
	}
	hosts, byName := c.build()
	c.view.Store(&view{version: ver, hosts: hosts, byName: byName})
	return hosts, byName
}

func (c *Cluster) build() ([]placement.Host, map[string]gossip.Member) {
	ms := c.cfg.Members.Members()
	hosts := make([]placement.Host, 0, len(ms))
	byName := make(map[string]gossip.Member, len(ms))
	for _, m := range ms {
		if m.Tags.Role != gossip.RoleAgent || m.Tags.RPCAddr == "" {
			continue
		}
		if m.State != gossip.StateAlive && m.State != gossip.StateSuspect {
			continue
		}
		h := placement.Host{Name: m.Name, Zone: m.Tags.Zone, Draining: m.Draining, Suspect: m.State == gossip.StateSuspect}
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

func (c *Cluster) client(addr string) Agent {
	c.mu.Lock()
	defer c.mu.Unlock()
	a, ok := c.clients[addr]
	if !ok {
		a = c.cfg.Dial(addr)
		c.clients[addr] = a
	}
	return a
}

// lockedRand is placement's randomness, safe for concurrent placements.
type lockedRand struct{ c *Cluster }

func (r lockedRand) IntN(n int) int {
	r.c.mu.Lock()
	defer r.c.mu.Unlock()
	return r.c.rng.IntN(n)
}

// Invoke places req on an agent and runs it there (it sets req.WarmOnly
// for a warm placement: the agent refuses when the gossiped warm sandbox
// is gone, and the invocation is placed again). A host that refuses
// (draining, full) or cannot be reached is excluded and the invocation
// placed again, up to Attempts hosts; a host lost while the invocation
// ran on it fails the invocation with Unavailable naming the host (the
// function may have run: only the caller can decide to retry).
func (c *Cluster) Invoke(ctx context.Context, req *skiffv1.AgentInvokeRequest) (*skiffv1.AgentInvokeResponse, error) {
	spec := req.GetSpec()
	preq := placement.Request{
		Function:  spec.GetConfigKey(),
		Digest:    spec.GetCodeSha256(),
		MemoryMB:  int64(spec.GetMemoryMb()),
		Sandboxes: c.sandboxes(spec.GetFunctionName()),
		Exclude:   map[string]bool{},
		SkipWarm:  map[string]bool{},
	}
	var last error
	for attempt, tries := 0, 0; attempt < c.cfg.Attempts; tries++ {
		hosts, byName := c.agents()
		if tries > len(hosts)+c.cfg.Attempts {
			break // warm claims that all missed: bounded by the hosts
		}
		if len(hosts) == 0 {
			return nil, errs.Unavailable("no agent is alive in the cluster").WithReason("no_agents")
		}
		d, err := placement.Choose(preq, hosts, lockedRand{c})
		if err != nil {
			if last != nil {
				return nil, fmt.Errorf("%w (after: %w)", err, last)
			}
			return nil, err
		}
		c.m.placements.WithLabelValues(d.Rule).Inc()
		host := byName[d.Host]
		req.WarmOnly = d.Warm
		var resp *connect.Response[skiffv1.AgentInvokeResponse]
		c.pend(spec.GetFunctionName(), d.Host, 1)
		err = c.track(ctx, d.Host, func(ctx context.Context) (err error) {
			resp, err = c.client(host.Tags.RPCAddr).Invoke(ctx, connect.NewRequest(req))
			return err
		})
		c.pend(spec.GetFunctionName(), d.Host, -1)
		if err == nil {
			if resp.Msg.GetColdStart() {
				c.started(spec.GetFunctionName(), d.Host)
			}
			return resp.Msg, nil
		}
		var lost *errs.Error
		if errors.As(err, &lost) && lost.Reason == "agent_lost" {
			c.m.refusals.WithLabelValues("lost").Inc()
			return nil, err
		}
		if ctx.Err() != nil {
			return nil, errs.FromConnect(err)
		}
		var e *errs.Error
		conv := errs.FromConnect(err)
		errors.As(conv, &e)
		switch {
		case e != nil && e.Reason == "no_warm_sandbox":
			// The gossiped view was stale: place again, cold on this host
			// if it is still the best. A miss does not use an attempt.
			c.m.refusals.WithLabelValues(e.Reason).Inc()
			preq.SkipWarm[d.Host] = true
			last = conv
			continue
		case e != nil && (e.Reason == "draining" || e.Reason == "host_full"):
			c.m.refusals.WithLabelValues(e.Reason).Inc()
			c.log.Debug("agent refused a placement", "host", d.Host, "reason", e.Reason)
			preq.Exclude[d.Host] = true
			last = conv
		case notSent(err):
			c.m.refusals.WithLabelValues("unreachable").Inc()
			c.cfg.Members.MarkSuspect(d.Host)
			c.log.Warn("agent unreachable; placing elsewhere", "host", d.Host, "addr", host.Tags.RPCAddr, "err", err)
			preq.Exclude[d.Host] = true
			last = errs.Unavailable("agent %s (%s) unreachable: %v", d.Host, host.Tags.RPCAddr, err).WithReason("agent_unreachable")
		case connect.CodeOf(err) == connect.CodeUnavailable && e != nil && e.Reason == "":
			// The transport broke while the agent ran the invocation.
			c.m.refusals.WithLabelValues("lost").Inc()
			c.cfg.Members.MarkSuspect(d.Host)
			return nil, errs.Unavailable("agent %s was lost during the invocation: %v", d.Host, err).WithReason("agent_lost")
		default:
			return nil, conv
		}
		attempt++
	}
	if last == nil {
		last = errs.Unavailable("no agent could take the invocation").WithReason("no_agents")
	}
	return nil, last
}

// notSent reports whether err means the request never reached the agent
// (the connection could not be made), so placing it elsewhere cannot run
// the function twice.
func notSent(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

// Retire asks every live agent to stop the function's sandboxes whose
// configuration is not keep. Unreachable agents are skipped: an agent that
// comes back has lost its sandboxes or retires them on its next Retire.
func (c *Cluster) Retire(ctx context.Context, function, keep string) error {
	_, byName := c.agents()
	var (
		wg  sync.WaitGroup
		mu  sync.Mutex
		all []error
	)
	for name, m := range byName {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := c.client(m.Tags.RPCAddr).Retire(ctx, connect.NewRequest(&skiffv1.RetireRequest{FunctionName: function, KeepConfigKey: keep}))
			if err != nil && !notSent(err) {
				mu.Lock()
				all = append(all, fmt.Errorf("agent %s: %w", name, errs.FromConnect(err)))
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return errors.Join(all...)
}

type clusterMetrics struct {
	placements *prometheus.CounterVec
	refusals   *prometheus.CounterVec
}

func newClusterMetrics(reg prometheus.Registerer) (*clusterMetrics, error) {
	m := &clusterMetrics{
		placements: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skiff_router_placements_total", Help: "Placement decisions by the rule that decided (warm, spread, code, two-choices).",
		}, []string{"rule"}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skiff_router_agent_refusals_total", Help: "Invocations an agent refused or lost, by reason (draining, host_full, unreachable, lost).",
		}, []string{"reason"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.placements, m.refusals} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}
