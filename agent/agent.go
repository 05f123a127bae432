// Package agent is skiff's per-host agent: it serves AgentService (called
// in-process by `skiff dev`, over HTTP/2 with mTLS in a cluster), and wires
// the sandbox pool to the namespace jail, the code cache and the host's
// memory ledger.
package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	"skiff.dev/skiff/agent/codecache"
	"skiff.dev/skiff/agent/placement"
	"skiff.dev/skiff/agent/sandbox"
	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/ebpf"
	"skiff.dev/skiff/gossip"
	"skiff.dev/skiff/internal/archive"
	"skiff.dev/skiff/vmm/jail"
)

// Config configures an agent.
type Config struct {
	Host        string        // defaults to the hostname
	DataDir     string        // code cache and jail state live under it
	MemoryMB    int64         // memory for sandboxes; default half the host's RAM
	KeepAlive   time.Duration // idle sandbox lifetime; default 10m
	InitTimeout time.Duration // default 10s
	Region      string
	// CgroupName is the parent cgroup of this agent's sandboxes; default
	// "skiff-<hash of DataDir>", so that agents with different data dirs on
	// one host never reclaim each other's sandboxes while a restarted agent
	// reclaims its own.
	CgroupName string
	// RunDir holds the jail's per-sandbox mount points. Every directory on
	// its path must be searchable by unprivileged users (sandbox roots map
	// to one); default /run/skiff/<hash of DataDir>.
	RunDir   string
	Code     codecache.Fetcher
	Logger   *slog.Logger
	Registry prometheus.Registerer

	// NetworkSubnet holds the sandboxes' addresses (a /30 each); default
	// 10.253.0.0/16. Agents sharing a network namespace need disjoint ones.
	NetworkSubnet netip.Prefix
	// NetworkResolver is the sandboxes' DNS server; default the host's
	// first nameserver a sandbox can reach, or 1.1.1.1.
	NetworkResolver netip.Addr
	// DisableNetwork runs without sandbox networking (no veths, no eBPF):
	// sandboxes with network "egress" are then refused.
	DisableNetwork bool
}

// Agent runs sandboxes on one host.
type Agent struct {
	cfg    Config
	jail   *jail.Manager
	mgr    *sandbox.Manager
	cache  *codecache.Cache
	ledger *placement.Ledger
	cancel context.CancelFunc
	done   chan struct{}

	changes   chan struct{} // a pending capacity change (one buffered)
	drainOnce sync.Once
	drainCh   chan struct{} // closed when draining starts
}

var _ skiffv1connect.AgentServiceHandler = (*Agent)(nil)

// New starts an agent: it reclaims what a crashed previous run left, then
// starts the jail and the idle reaper.
func New(cfg Config) (*Agent, error) {
	if cfg.DataDir == "" {
		return nil, errors.New("agent: DataDir is required")
	}
	dataDir, err := filepath.Abs(cfg.DataDir)
	if err != nil {
		return nil, fmt.Errorf("agent: data dir: %w", err)
	}
	cfg.DataDir = dataDir
	if cfg.Code == nil {
		return nil, errors.New("agent: Code fetcher is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Host == "" {
		cfg.Host, _ = os.Hostname()
	}
	sum := sha256.Sum256([]byte(cfg.DataDir))
	tag := hex.EncodeToString(sum[:6])
	if cfg.CgroupName == "" {
		cfg.CgroupName = "skiff-" + tag
	}
	if cfg.MemoryMB <= 0 {
		cfg.MemoryMB = hostMemoryMB() / 2
	}
	if cfg.KeepAlive <= 0 {
		cfg.KeepAlive = 10 * time.Minute
	}
	if cfg.RunDir == "" {
		cfg.RunDir = filepath.Join("/run/skiff", tag)
	}
	if err := os.MkdirAll(filepath.Dir(cfg.RunDir), 0o711); err != nil {
		return nil, fmt.Errorf("creating %s: %w", filepath.Dir(cfg.RunDir), err)
	}
	jcfg := jail.Config{
		RunDir:     cfg.RunDir,
		CgroupName: cfg.CgroupName,
		PoolSize:   jail.DefaultPoolSize,
		Logger:     cfg.Logger,
	}
	if !cfg.DisableNetwork {
		// The tag derives from RunDir (a hash of DataDir): a restarted
		// agent reclaims the links and rules of a crashed run.
		jcfg.Net = &jail.NetConfig{Subnet: cfg.NetworkSubnet, Resolver: cfg.NetworkResolver}
	}
	jm, err := jail.New(jcfg)
	if err != nil {
		return nil, fmt.Errorf("starting jail: %w", err)
	}
	if err := jm.Reclaim(); err != nil {
		cfg.Logger.Warn("reclaiming leftovers of a previous run", "err", err)
	}
	cache, err := codecache.New(filepath.Join(cfg.DataDir, "code"), cfg.Code, archive.Limits{}, cfg.Logger)
	if err != nil {
		_ = jm.Close()
		return nil, fmt.Errorf("opening code cache: %w", err)
	}
	ledger := placement.NewLedger(cfg.MemoryMB)
	changes := make(chan struct{}, 1)
	mgr, err := sandbox.New(sandbox.Config{
		OnChange:    func() { kick(changes) },
		Launcher:    jailLauncher{jm},
		Code:        cache,
		Ledger:      ledger,
		Host:        cfg.Host,
		Region:      cfg.Region,
		KeepAlive:   cfg.KeepAlive,
		InitTimeout: cfg.InitTimeout,
		Logger:      cfg.Logger,
		Registry:    cfg.Registry,
	})
	if err != nil {
		_ = jm.Close()
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := &Agent{cfg: cfg, jail: jm, mgr: mgr, cache: cache, ledger: ledger, cancel: cancel, done: make(chan struct{}),
		changes: changes, drainCh: make(chan struct{})}
	go func() {
		defer close(a.done)
		interval := cfg.KeepAlive / 10
		if interval > 10*time.Second {
			interval = 10 * time.Second
		}
		if interval < 10*time.Millisecond {
			interval = 10 * time.Millisecond
		}
		mgr.RunReaper(ctx, interval)
	}()
	return a, nil
}

// Invoke runs one invocation.
func (a *Agent) Invoke(ctx context.Context, req *connect.Request[skiffv1.AgentInvokeRequest]) (*connect.Response[skiffv1.AgentInvokeResponse], error) {
	resp, err := a.mgr.Invoke(ctx, req.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(resp), nil
}

// Retire stops a function's sandboxes of other configurations.
func (a *Agent) Retire(_ context.Context, req *connect.Request[skiffv1.RetireRequest]) (*connect.Response[skiffv1.RetireResponse], error) {
	n := a.mgr.Retire(req.Msg.GetFunctionName(), req.Msg.GetKeepConfigKey())
	return connect.NewResponse(&skiffv1.RetireResponse{Retired: int32(n)}), nil
}

// Status reports capacity and sandboxes.
func (a *Agent) Status(context.Context, *connect.Request[skiffv1.StatusRequest]) (*connect.Response[skiffv1.StatusResponse], error) {
	committed, total := a.ledger.Usage()
	resp := &skiffv1.StatusResponse{Host: a.cfg.Host, MemoryTotalMb: total, MemoryCommittedMb: committed,
		Draining: a.mgr.Draining(), InFlight: int32(a.mgr.InFlight())}
	for _, s := range a.mgr.Sandboxes() {
		resp.Sandboxes = append(resp.Sandboxes, &skiffv1.SandboxInfo{
			Id: s.ID, FunctionName: s.Function, ConfigKey: s.ConfigKey, State: s.State.String(),
			MemoryMb: int32(s.MemoryMB), Invocations: s.Invocations,
		})
	}
	return connect.NewResponse(resp), nil
}

// Drain starts draining (see StartDrain); with req.Wait it answers once
// the in-flight invocations finished or the call's deadline passed.
func (a *Agent) Drain(ctx context.Context, req *connect.Request[skiffv1.DrainRequest]) (*connect.Response[skiffv1.DrainResponse], error) {
	a.StartDrain()
	if req.Msg.GetWait() {
		if err := a.mgr.WaitIdle(ctx); err != nil {
			a.cfg.Logger.Info("drain: stopped waiting for in-flight invocations", "in_flight", a.mgr.InFlight(), "err", err)
		}
	}
	return connect.NewResponse(&skiffv1.DrainResponse{InFlight: int32(a.mgr.InFlight())}), nil
}

// StartDrain makes the agent refuse new invocations (Unavailable, reason
// "draining") while in-flight ones finish; see WaitIdle. It is idempotent
// and cannot be undone. DrainStarted is closed when it is first called.
func (a *Agent) StartDrain() {
	a.drainOnce.Do(func() {
		a.mgr.Drain()
		a.cfg.Logger.Info("draining: taking no new invocations", "in_flight", a.mgr.InFlight())
		close(a.drainCh)
		kick(a.changes)
	})
}

// DrainStarted is closed once draining started (StartDrain or the Drain
// RPC): the process that owns the agent then waits for WaitIdle and exits.
func (a *Agent) DrainStarted() <-chan struct{} { return a.drainCh }

// WaitIdle waits until no invocation is in flight or ctx is done. After
// StartDrain nothing new starts, so it returns once the last one finished.
func (a *Agent) WaitIdle(ctx context.Context) error { return a.mgr.WaitIdle(ctx) }

// InFlight returns the number of invocations running.
func (a *Agent) InFlight() int { return a.mgr.InFlight() }

// Changes receives a value (coalesced: one pending at most) after the
// agent's capacity may have changed: a sandbox started, became busy or
// idle, or died, or draining started. Report Capacity then.
func (a *Agent) Changes() <-chan struct{} { return a.changes }

// Capacity reports what this host has, for gossip: memory from the
// placement ledger, CPU cores and load, sandbox counts, warm idle
// sandboxes per configuration key and the cached code digests.
func (a *Agent) Capacity() gossip.Capacity {
	committed, total := a.ledger.Usage()
	c := gossip.Capacity{
		MemoryTotalMB: total,
		MemoryFreeMB:  max(total-committed, 0),
		CPUTotalMilli: int64(runtime.NumCPU()) * 1000,
		WarmIdle:      map[string]int{},
		CodeDigests:   a.cache.Digests(),
	}
	c.Load = hostLoad(runtime.NumCPU())
	c.CPUFreeMilli = int64(float64(c.CPUTotalMilli) * (1 - min(c.Load, 1)))
	for _, s := range a.mgr.Sandboxes() {
		c.Sandboxes++
		switch s.State {
		case sandbox.StateIdle:
			c.Idle++
			c.WarmIdle[s.ConfigKey]++
		case sandbox.StateDead:
		default: // starting, initializing and busy sandboxes all serve an invocation
			c.Busy++
		}
	}
	return c
}

// hostLoad is the one-minute load average per core, 0 when unknown.
func hostLoad(cores int) float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil || cores <= 0 {
		return 0
	}
	var l float64
	if _, err := fmt.Sscanf(string(b), "%f", &l); err != nil || l < 0 {
		return 0
	}
	return l / float64(cores)
}

// kick signals ch without blocking.
func kick(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// Close drains in-flight invocations (until ctx is done), then releases
// every sandbox and the jail.
func (a *Agent) Close(ctx context.Context) error {
	a.cancel()
	<-a.done
	err := errors.Join(a.mgr.Close(ctx), a.jail.Close())
	removeEmptyDirs(a.cfg.RunDir)
	return err
}

// removeEmptyDirs removes dir and the empty directories below it, deepest
// first. It only ever calls rmdir: a directory that still holds a file or
// a mount (which a bug could leave) stays, and nothing below it is touched.
func removeEmptyDirs(dir string) {
	var dirs []string
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	for i := len(dirs) - 1; i >= 0; i-- {
		_ = syscall.Rmdir(dirs[i])
	}
}

// jailLauncher adapts vmm/jail to the sandbox pool.
type jailLauncher struct{ m *jail.Manager }

func (l jailLauncher) Launch(s sandbox.LaunchSpec) (sandbox.Process, error) {
	sb, err := l.m.Start(jail.Spec{
		ID:          s.ID,
		CodeDir:     s.CodeDir,
		Argv:        s.Argv,
		Env:         s.Env,
		MemoryMB:    s.MemoryMB,
		EphemeralMB: s.EphemeralMB,
		Stdout:      s.Output,
		Stderr:      s.Output,
		ListenAddr:  sandbox.RuntimeAPIAddr,
		Network:     netSpec(s.Network),
	})
	if err != nil {
		return nil, err
	}
	return jailProcess{sb}, nil
}

func netSpec(p *ebpf.Policy) *jail.NetSpec {
	if p == nil {
		return nil
	}
	return &jail.NetSpec{Policy: *p}
}

// jailProcess is a jailed sandbox; its NetCounters make it a
// sandbox.NetCounter.
type jailProcess struct{ *jail.Sandbox }

var _ sandbox.NetCounter = jailProcess{}

func (p jailProcess) ExitReason() (string, bool) {
	e := p.Exit()
	return e.String(), e.OOMKilled
}

func hostMemoryMB() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 2048
	}
	var kb int64
	if _, err := fmt.Sscanf(string(b), "MemTotal: %d kB", &kb); err != nil || kb == 0 {
		return 2048
	}
	return kb / 1024
}
