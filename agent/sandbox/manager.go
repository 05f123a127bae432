// Package sandbox is the agent's worker pool: it keeps warm sandboxes per
// function configuration, starts new ones on a cold path (placement on the
// host's memory, code, process, Runtime API, init), runs one invocation at
// a time on each, frames their logs as Lambda does, reaps idle ones after
// the keep-alive and retires them when their function changes.
package sandbox

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"skiff.dev/skiff/agent/placement"
	"skiff.dev/skiff/agent/runtimeapi"
	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

// CodeSource returns the directory of a function's unpacked code.
type CodeSource interface {
	Get(ctx context.Context, sha256hex string) (dir string, err error)
}

// Config configures a Manager.
type Config struct {
	Launcher    Launcher
	Code        CodeSource
	Ledger      *placement.Ledger
	Host        string
	Region      string
	KeepAlive   time.Duration // idle sandboxes live this long; default 10m
	InitTimeout time.Duration // the runtime must reach /next within this; default 10s
	MaxLogBytes int           // per invocation, keeping the tail; default 1 MiB
	Now         func() time.Time
	Logger      *slog.Logger
	Registry    prometheus.Registerer // optional
	// OnChange, when set, is called after every sandbox state change (a
	// sandbox started, became busy or idle, or died): for capacity
	// reports. It must return quickly and must not call the Manager.
	OnChange func()
}

func (c *Config) setDefaults() {
	if c.KeepAlive <= 0 {
		c.KeepAlive = 10 * time.Minute
	}
	if c.InitTimeout <= 0 {
		c.InitTimeout = 10 * time.Second
	}
	if c.MaxLogBytes <= 0 {
		c.MaxLogBytes = 1 << 20
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Region == "" {
		c.Region = "local"
	}
}

// Manager owns the sandboxes of one host.
type Manager struct {
	cfg     Config
	metrics *metrics

	mu       sync.Mutex
	pools    map[string]*pool    // guarded by mu; by config key
	newest   map[string]string   // guarded by mu; function → newest config key
	all      map[string]*Sandbox // guarded by mu; every live sandbox
	closed   bool                // guarded by mu
	draining bool                // guarded by mu: new invocations are refused
	inflight int                 // guarded by mu: invocations running
	drained  chan struct{}       // guarded by mu: closed when inflight drops to 0
}

// pool holds the idle sandboxes of one function configuration.
type pool struct {
	key, function string
	idle          []*Sandbox // a stack: the most recently used is reused first
	retired       bool
}

// New returns a Manager.
func New(cfg Config) (*Manager, error) {
	if cfg.Launcher == nil || cfg.Code == nil || cfg.Ledger == nil {
		return nil, errors.New("sandbox: Launcher, Code and Ledger are required")
	}
	cfg.setDefaults()
	m := &Manager{
		cfg:    cfg,
		pools:  map[string]*pool{},
		newest: map[string]string{},
		all:    map[string]*Sandbox{},
	}
	m.metrics = newMetrics(cfg.Registry)
	return m, nil
}

// Invoke runs one invocation, on a warm sandbox when one is idle.
func (m *Manager) Invoke(ctx context.Context, req *skiffv1.AgentInvokeRequest) (*skiffv1.AgentInvokeResponse, error) {
	spec := req.GetSpec()
	if spec == nil || spec.GetConfigKey() == "" || spec.GetFunctionName() == "" {
		return nil, errs.Invalid("spec", "invoke request needs a sandbox spec with a function name and config key")
	}
	if req.GetRequestId() == "" {
		return nil, errs.Invalid("request_id", "invoke request needs a request id")
	}
	if _, err := networkPolicy(spec); err != nil {
		return nil, err
	}
	if err := m.begin(); err != nil {
		return nil, err
	}
	defer m.end()
	for attempt := 0; ; attempt++ {
		resp, retry, err := m.invokeOnce(ctx, req, attempt > 0)
		if !retry || attempt >= 2 {
			return resp, err
		}
	}
}

// invokeOnce runs the invocation on a warm sandbox, or a new one when none
// is idle or fresh is set. It asks for a retry when a warm sandbox's
// runtime had exited before it took the invocation.
func (m *Manager) invokeOnce(ctx context.Context, req *skiffv1.AgentInvokeRequest, fresh bool) (*skiffv1.AgentInvokeResponse, bool, error) {
	spec := req.GetSpec()
	var sb *Sandbox
	var err error
	if !fresh {
		if sb, err = m.acquire(spec); err != nil {
			return nil, false, err
		}
		if sb == nil && req.GetWarmOnly() {
			return nil, false, errs.New(errs.KindFailedPrecondition, "agent %s has no idle sandbox of %s (config %.12s)",
				m.cfg.Host, spec.GetFunctionName(), spec.GetConfigKey()).WithReason("no_warm_sandbox")
		}
	} else if err := m.refuseClosed(); err != nil {
		return nil, false, err
	}
	cold := sb == nil
	var initDur time.Duration
	var initLog []byte
	if cold {
		var fail *outcome
		sb, initDur, fail, err = m.start(ctx, spec)
		if err != nil {
			return nil, false, err
		}
		if fail != nil { // init failed: the invocation reports it
			initLog = sb.out.Take()
			m.discard(sb)
			return m.respond(req, sb, *fail, true, initDur, 0, initLog, nil), false, nil
		}
	}

	timeout := time.Duration(spec.GetTimeoutSeconds()) * time.Second
	if timeout <= 0 {
		timeout = 3 * time.Second
	}
	start := m.cfg.Now()
	inv := runtimeapi.Invocation{
		RequestID:     req.GetRequestId(),
		FunctionARN:   spec.GetFunctionArn(),
		TraceID:       req.GetTraceId(),
		ClientContext: req.GetClientContext(),
		Deadline:      time.Now().Add(timeout),
		Payload:       req.GetPayload(),
	}
	if inv.TraceID == "" {
		inv.TraceID = traceID(start)
	}
	o, err := sb.invoke(ctx, inv, timeout)
	dur := m.cfg.Now().Sub(start)
	var net *netUsage
	if d, ok := m.netRead(sb); ok {
		u := usage(d)
		net = &u
	}
	if err != nil {
		m.discard(sb)
		return nil, false, err
	}
	if o.undelivered {
		sb.out.Take()
		m.discard(sb)
		return nil, true, nil
	}
	if !o.healthy {
		m.discard(sb)
	}
	resp := m.respond(req, sb, o, cold, initDur, dur, nil, net)
	if o.healthy {
		m.release(sb)
	}
	return resp, false, nil
}

// respond builds the agent's response with the invocation's framed log.
func (m *Manager) respond(req *skiffv1.AgentInvokeRequest, sb *Sandbox, o outcome, cold bool, initDur, dur time.Duration, initLog []byte, net *netUsage) *skiffv1.AgentInvokeResponse {
	spec := req.GetSpec()
	maxMem := sb.proc.MaxMemoryBytes()
	var text []byte
	if initLog != nil {
		text = initLog
	} else {
		sb.out.Sync()
		text = sb.out.Take()
	}
	log := frameLog(req.GetRequestId(), spec, text, o.note, dur, initDur, cold, maxMem)
	if net != nil {
		log += skiffLine(req.GetRequestId(), *net)
	}
	m.metrics.observe(spec.GetFunctionName(), cold, initDur, o.functionError != "")
	resp := &skiffv1.AgentInvokeResponse{
		Payload:            o.payload,
		FunctionError:      o.functionError,
		ColdStart:          cold,
		InitDurationUs:     initDur.Microseconds(),
		DurationUs:         dur.Microseconds(),
		MaxMemoryUsedBytes: maxMem,
		SandboxId:          sb.id,
		Host:               m.cfg.Host,
	}
	if net != nil {
		resp.NetworkBytesOut, resp.NetworkBytesIn = int64(net.out), int64(net.in)
	}
	if req.GetWantLog() {
		resp.Log = log
	}
	return resp
}

// frameLog wraps the function's output in Lambda's START/END/REPORT lines.
func frameLog(requestID string, spec *skiffv1.SandboxSpec, text []byte, note string, dur, initDur time.Duration, cold bool, maxMem int64) string {
	version := spec.GetVersion()
	if version == "" {
		version = "$LATEST"
	}
	var b strings.Builder
	b.Grow(len(text) + 256)
	fmt.Fprintf(&b, "START RequestId: %s Version: %s\n", requestID, version)
	b.Write(text)
	if len(text) > 0 && text[len(text)-1] != '\n' {
		b.WriteByte('\n')
	}
	if note != "" {
		b.WriteString(note)
		b.WriteByte('\n')
	}
	fmt.Fprintf(&b, "END RequestId: %s\n", requestID)
	billed := (dur + time.Millisecond - 1) / time.Millisecond
	if billed < 1 {
		billed = 1
	}
	fmt.Fprintf(&b, "REPORT RequestId: %s\tDuration: %.2f ms\tBilled Duration: %d ms\tMemory Size: %d MB\tMax Memory Used: %d MB",
		requestID, float64(dur)/float64(time.Millisecond), int64(billed), spec.GetMemoryMb(), (maxMem+(1<<20)-1)>>20)
	if cold {
		fmt.Fprintf(&b, "\tInit Duration: %.2f ms", float64(initDur)/float64(time.Millisecond))
	}
	b.WriteString("\t\n")
	return b.String()
}

// begin counts an invocation in, unless the manager is closed or
// draining.
func (m *Manager) begin() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return errs.Unavailable("agent %s is shutting down", m.cfg.Host).WithReason("draining")
	}
	if m.draining {
		return errs.Unavailable("agent %s is draining: it takes no new invocations", m.cfg.Host).WithReason("draining")
	}
	m.inflight++
	return nil
}

// end counts an invocation out.
func (m *Manager) end() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.inflight--
	if m.inflight == 0 && m.drained != nil {
		close(m.drained)
		m.drained = nil
	}
}

// InFlight returns the number of invocations running.
func (m *Manager) InFlight() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.inflight
}

// Drain makes the manager refuse new invocations (Unavailable, reason
// "draining") from now on; in-flight ones continue. It cannot be undone.
func (m *Manager) Drain() {
	m.mu.Lock()
	m.draining = true
	m.mu.Unlock()
}

// Draining reports whether Drain or Close was called.
func (m *Manager) Draining() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.draining || m.closed
}

// WaitIdle waits until no invocation is in flight, or ctx is done. Call it
// after Drain or Close, or new invocations may keep it waiting.
func (m *Manager) WaitIdle(ctx context.Context) error {
	m.mu.Lock()
	if m.inflight == 0 {
		m.mu.Unlock()
		return nil
	}
	if m.drained == nil {
		m.drained = make(chan struct{})
	}
	ch := m.drained
	m.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

func (m *Manager) refuseClosed() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return errs.Unavailable("agent %s is shutting down", m.cfg.Host)
	}
	return nil
}

// acquire takes an idle sandbox of spec's configuration, or returns nil
// when the invocation must start one.
func (m *Manager) acquire(spec *skiffv1.SandboxSpec) (*Sandbox, error) {
	var retire []*Sandbox
	defer func() { m.closeAll(retire) }()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, errs.Unavailable("agent %s is shutting down", m.cfg.Host)
	}
	// A newer configuration of the function retires the older ones, even
	// if the gateway's Retire has not arrived yet.
	fn, key := spec.GetFunctionName(), spec.GetConfigKey()
	if old, ok := m.newest[fn]; ok && old != key {
		if p := m.pools[old]; p != nil && !p.retired {
			retire = append(retire, m.retirePoolLocked(p)...)
		}
	}
	m.newest[fn] = key
	p := m.pools[key]
	if p == nil {
		p = &pool{key: key, function: fn}
		m.pools[key] = p
	}
	for len(p.idle) > 0 {
		sb := p.idle[len(p.idle)-1]
		p.idle = p.idle[:len(p.idle)-1]
		if sb.exited() {
			retire = append(retire, sb)
			continue
		}
		if from, err := sb.move(StateBusy, m.cfg.Now()); err != nil {
			m.cfg.Logger.Error("acquire", "err", err)
			retire = append(retire, sb)
			continue
		} else {
			m.moved(from, StateBusy)
		}
		return sb, nil
	}
	return nil, nil
}

// start places, creates and initialises a sandbox for spec. When the
// function's init fails, it returns the sandbox and the failure outcome.
func (m *Manager) start(ctx context.Context, spec *skiffv1.SandboxSpec) (*Sandbox, time.Duration, *outcome, error) {
	memMB := int64(spec.GetMemoryMb())
	if memMB <= 0 {
		memMB = 128
	}
	if err := m.reserve(memMB); err != nil {
		return nil, 0, nil, err
	}
	codeDir, err := m.cfg.Code.Get(ctx, spec.GetCodeSha256())
	if err != nil {
		m.cfg.Ledger.Release(memMB)
		return nil, 0, nil, fmt.Errorf("preparing code %s: %w", short(spec.GetCodeSha256()), err)
	}
	out, err := newOutput(m.cfg.MaxLogBytes)
	if err != nil {
		m.cfg.Ledger.Release(memMB)
		return nil, 0, nil, errs.Internal("creating output pipe: %w", err)
	}
	id := newID()
	began := m.cfg.Now()
	eph := int(spec.GetEphemeralStorageMb())
	if eph <= 0 {
		eph = 512
	}
	policy, err := networkPolicy(spec)
	if err != nil {
		_ = out.Close()
		m.cfg.Ledger.Release(memMB)
		return nil, 0, nil, err
	}
	proc, err := m.cfg.Launcher.Launch(LaunchSpec{
		ID:          id,
		CodeDir:     codeDir,
		Argv:        []string{"/var/task/bootstrap"},
		Env:         Environment(spec, id, m.cfg.Region, began),
		MemoryMB:    int(memMB),
		EphemeralMB: eph,
		Output:      out.writer(),
		Network:     policy,
	})
	if err != nil {
		_ = out.Close()
		m.cfg.Ledger.Release(memMB)
		return nil, 0, nil, errs.Unavailable("starting sandbox on %s: %w", m.cfg.Host, err)
	}
	sctx, cancel := context.WithCancelCause(context.Background())
	sb := &Sandbox{
		id: id, spec: spec, memoryMB: memMB, proc: proc, out: out, created: began, network: policy != nil,
		rapi:   runtimeapi.NewServer(runtimeapi.Config{Logger: m.cfg.Logger}),
		ctx:    sctx,
		cancel: cancel,
		state:  StateStarting,
	}
	go func() {
		<-proc.Done()
		cancel(errExited)
	}()
	go func() { _ = sb.rapi.Serve(proc.Listener()) }()
	m.mu.Lock()
	m.all[id] = sb
	m.mu.Unlock()
	m.moved(-1, StateStarting)
	m.mustMove(sb, StateInitializing)

	ictx, icancel := context.WithTimeout(ctx, m.cfg.InitTimeout)
	stop := context.AfterFunc(sctx, icancel)
	err = sb.rapi.WaitInit(ictx)
	stop()
	icancel()
	initDur := m.cfg.Now().Sub(began)
	var initErr *runtimeapi.InitError
	switch {
	case err == nil:
		m.mustMove(sb, StateBusy)
		return sb, initDur, nil, nil
	case errors.As(err, &initErr):
		o := outcome{payload: initErr.Payload, functionError: "Unhandled", note: "INIT_REPORT Status: error\tError Type: " + initErr.Type}
		if len(o.payload) == 0 {
			o.payload = jsonError(initErr.Type, "init error")
		}
		return sb, initDur, &o, nil
	case sb.exited():
		o := sb.exitOutcome("")
		o.note = "INIT_REPORT Status: error\t" + o.note
		return sb, initDur, &o, nil
	case ctx.Err() != nil:
		m.discard(sb)
		return nil, 0, nil, ctx.Err()
	}
	msg := fmt.Sprintf("Runtime did not reach /runtime/invocation/next within the %s init timeout", m.cfg.InitTimeout)
	o := outcome{payload: jsonError("Runtime.InitTimeout", msg), functionError: "Unhandled", note: "INIT_REPORT Status: timeout\t" + msg}
	return sb, initDur, &o, nil
}

// reserve commits memory on the host, evicting idle sandboxes (least
// recently used first) when it is full.
func (m *Manager) reserve(mb int64) error {
	for {
		if m.cfg.Ledger.Reserve(mb) {
			return nil
		}
		victim := m.popLRUIdle()
		if victim == nil {
			committed, total := m.cfg.Ledger.Usage()
			return errs.New(errs.KindResourceExhausted, "host %s has no memory for a %d MB sandbox (%d of %d MB committed to busy sandboxes)",
				m.cfg.Host, mb, committed, total).WithReason("host_full")
		}
		m.discard(victim)
	}
}

func (m *Manager) popLRUIdle() *Sandbox {
	m.mu.Lock()
	defer m.mu.Unlock()
	var best *pool
	bestIdx := -1
	var bestTime time.Time
	for _, p := range m.pools {
		for i, sb := range p.idle {
			sb.mu.Lock()
			lu := sb.lastUsed
			sb.mu.Unlock()
			if best == nil || lu.Before(bestTime) {
				best, bestIdx, bestTime = p, i, lu
			}
		}
	}
	if best == nil {
		return nil
	}
	sb := best.idle[bestIdx]
	best.idle = append(best.idle[:bestIdx], best.idle[bestIdx+1:]...)
	return sb
}

// release returns a healthy sandbox to its pool, or closes it when its
// pool was retired meanwhile.
func (m *Manager) release(sb *Sandbox) {
	m.mu.Lock()
	p := m.pools[sb.spec.GetConfigKey()]
	if m.closed || p == nil || p.retired || sb.exited() {
		m.mu.Unlock()
		m.discard(sb)
		return
	}
	from, err := sb.move(StateIdle, m.cfg.Now())
	if err != nil {
		m.mu.Unlock()
		m.cfg.Logger.Error("release", "err", err)
		m.discard(sb)
		return
	}
	p.idle = append(p.idle, sb)
	m.mu.Unlock()
	m.moved(from, StateIdle)
}

// discard closes a sandbox and returns its memory.
func (m *Manager) discard(sb *Sandbox) {
	sb.mu.Lock()
	from := sb.state
	dead := from == StateDead
	if !dead {
		sb.state = StateDead
	}
	sb.mu.Unlock()
	if dead {
		return
	}
	m.mu.Lock()
	delete(m.all, sb.id)
	m.mu.Unlock()
	m.netRead(sb) // traffic since the last invocation, into the metrics
	if err := sb.close(); err != nil {
		m.cfg.Logger.Warn("closing sandbox", "sandbox", sb.id, "err", err)
	}
	m.cfg.Ledger.Release(sb.memoryMB)
	m.moved(from, StateDead)
}

// moved records a state change in the metrics and tells OnChange.
func (m *Manager) moved(from, to State) {
	m.metrics.moved(from, to)
	if m.cfg.OnChange != nil {
		m.cfg.OnChange()
	}
}

func (m *Manager) mustMove(sb *Sandbox, to State) {
	from, err := sb.move(to, m.cfg.Now())
	if err != nil {
		panic(err) // the manager's own sequencing is wrong
	}
	m.moved(from, to)
}

func (m *Manager) closeAll(sbs []*Sandbox) {
	for _, sb := range sbs {
		m.discard(sb)
	}
}

// retirePoolLocked marks p retired and returns its idle sandboxes to close;
// busy ones are closed when they are released.
func (m *Manager) retirePoolLocked(p *pool) []*Sandbox {
	p.retired = true
	idle := p.idle
	p.idle = nil
	delete(m.pools, p.key)
	return idle
}

// Retire stops the function's sandboxes whose configuration is not keep
// (all of them when keep is empty). In-flight invocations finish first.
func (m *Manager) Retire(function, keep string) int {
	var victims []*Sandbox
	m.mu.Lock()
	n := 0
	for _, p := range m.pools {
		if p.function == function && p.key != keep {
			victims = append(victims, m.retirePoolLocked(p)...)
		}
	}
	for _, sb := range m.all {
		if sb.spec.GetFunctionName() == function && sb.spec.GetConfigKey() != keep {
			n++
		}
	}
	if keep == "" {
		delete(m.newest, function)
	} else {
		m.newest[function] = keep
	}
	m.mu.Unlock()
	m.closeAll(victims)
	return n
}

// Reap closes sandboxes idle for longer than the keep-alive at now.
func (m *Manager) Reap(now time.Time) int {
	var victims []*Sandbox
	m.mu.Lock()
	for _, p := range m.pools {
		kept := p.idle[:0]
		for _, sb := range p.idle {
			sb.mu.Lock()
			expired := now.Sub(sb.lastUsed) >= m.cfg.KeepAlive
			sb.mu.Unlock()
			if expired || sb.exited() {
				victims = append(victims, sb)
			} else {
				kept = append(kept, sb)
			}
		}
		clear(p.idle[len(kept):])
		p.idle = kept
		if len(p.idle) == 0 && p.retired {
			delete(m.pools, p.key)
		}
	}
	m.mu.Unlock()
	m.closeAll(victims)
	return len(victims)
}

// RunReaper reaps idle sandboxes every interval until ctx is done.
func (m *Manager) RunReaper(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			m.Reap(m.cfg.Now())
		}
	}
}

// Info describes a sandbox for status reports.
type Info struct {
	ID, Function, ConfigKey string
	State                   State
	MemoryMB                int64
	Invocations             int64
}

// Sandboxes lists the live sandboxes, sorted by id.
func (m *Manager) Sandboxes() []Info {
	m.mu.Lock()
	out := make([]Info, 0, len(m.all))
	for _, sb := range m.all {
		sb.mu.Lock()
		out = append(out, Info{ID: sb.id, Function: sb.spec.GetFunctionName(), ConfigKey: sb.spec.GetConfigKey(),
			State: sb.state, MemoryMB: sb.memoryMB, Invocations: sb.invocations})
		sb.mu.Unlock()
	}
	m.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Close stops taking invocations, waits for in-flight ones (until ctx is
// done) and closes every sandbox.
func (m *Manager) Close(ctx context.Context) error {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	_ = m.WaitIdle(ctx) // past ctx, in-flight sandboxes are closed under them
	m.mu.Lock()
	var all []*Sandbox
	for _, sb := range m.all {
		all = append(all, sb)
	}
	m.pools = map[string]*pool{}
	m.mu.Unlock()
	m.closeAll(all)
	return nil
}

func newID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return "sb-" + hex.EncodeToString(b)
}

// traceID makes an X-Ray style trace header value.
func traceID(now time.Time) string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return fmt.Sprintf("Root=1-%08x-%s;Sampled=0", now.Unix(), hex.EncodeToString(b))
}

func short(digest string) string {
	if len(digest) > 12 {
		return digest[:12]
	}
	return digest
}
