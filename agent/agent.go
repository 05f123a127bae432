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
	ledger *placement.Ledger
	cancel context.CancelFunc
	done   chan struct{}
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
	mgr, err := sandbox.New(sandbox.Config{
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
	a := &Agent{cfg: cfg, jail: jm, mgr: mgr, ledger: ledger, cancel: cancel, done: make(chan struct{})}
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
	resp := &skiffv1.StatusResponse{Host: a.cfg.Host, MemoryTotalMb: total, MemoryCommittedMb: committed}
	for _, s := range a.mgr.Sandboxes() {
		resp.Sandboxes = append(resp.Sandboxes, &skiffv1.SandboxInfo{
			Id: s.ID, FunctionName: s.Function, ConfigKey: s.ConfigKey, State: s.State.String(),
			MemoryMb: int32(s.MemoryMB), Invocations: s.Invocations,
		})
	}
	return connect.NewResponse(resp), nil
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
