// Package agentserver is the composition root of `skiff agent`: one host's
// agent (package agent) serving AgentService over HTTP/2 with mutual TLS
// (only certificates of the cluster CA are accepted), fetching code from a
// gateway's CodeService with its node certificate, a gossip member (role
// agent) that publishes the host's capacity whenever it changes, and a
// local control socket for `skiff agent drain`. A drain (the Drain RPC,
// the control socket or the first SIGTERM, which cancels Run's context)
// refuses new invocations with Unavailable "draining", flags the member
// draining, lets in-flight invocations finish and returns; a second
// SIGTERM (Config.Abort) or the drain timeout cuts it short. Only
// cmd/skiff imports it.
package agentserver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"connectrpc.com/connect"

	"skiff.dev/skiff/agent"
	"skiff.dev/skiff/agent/codecache"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/gossip"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/pki"
)

// Defaults.
const (
	DefaultListen       = "0.0.0.0:7071"
	DefaultDrainTimeout = 16 * time.Minute // the longest function timeout (15 min) and some
	// MaxRequestBytes bounds an AgentService request: a 6 MB invoke
	// payload, its spec and the protocol's overhead fit.
	MaxRequestBytes = 16 << 20
)

// Config configures `skiff agent`.
type Config struct {
	DataDir string // required; TLS material in <DataDir>/tls
	// Listen is host:port of the AgentService (mTLS); default
	// DefaultListen.
	Listen string
	// Advertise is host:port gateways dial (the gossip tag RPCAddr and a
	// host of the node certificate). Default: Listen when its host is
	// set, else the gossip bind host when set, else the host's first
	// global unicast IPv4 address, with Listen's port.
	Advertise string
	Name      string // member and certificate name; default the hostname
	// JoinToken and Gateway obtain the node certificate (pki.Join) when
	// <DataDir>/tls holds none.
	JoinToken string
	Gateway   string // https://host:port of a gateway: joins and code
	// Code fetches code archives; default the CodeService of Gateway.
	Code codecache.Fetcher

	GossipBind   string   // host:port; default 0.0.0.0:7946
	GossipJoin   []string // members to join (host:port)
	GossipKey    []byte   // 16, 24 or 32 bytes; nil means plaintext gossip
	GossipTimers gossip.Timers
	Zone, Rack   string
	Version      string

	SandboxMemoryMB int64         // default half the host's memory
	SandboxSubnet   netip.Prefix  // default the agent's (10.253.0.0/16)
	Resolver        netip.Addr    // default the host's first nameserver
	KeepAlive       time.Duration // idle sandbox lifetime; default 10m
	// DrainTimeout bounds how long a drain waits for in-flight
	// invocations; default DefaultDrainTimeout.
	DrainTimeout time.Duration
	// CapacityRefresh re-reports the capacity when nothing changed (the
	// load moves on its own); default 5s.
	CapacityRefresh time.Duration

	// Abort, when closed, cuts a drain short: in-flight sandboxes are
	// closed under their invocations (a second SIGTERM).
	Abort  <-chan struct{}
	Logger *slog.Logger
	// Ready, when set, is called once serving.
	Ready func(Addrs)
}

// Addrs are where a running agent can be reached.
type Addrs struct {
	RPC     string // the AgentService listener (bound address)
	RPCTag  string // the advertised RPC address
	Gossip  string // the gossip member address
	Control string // the control socket's path
}

// validate checks the configuration; it changes nothing on error.
func (c *Config) validate() error {
	var list []error
	if c.DataDir == "" {
		list = append(list, errs.Invalid("data_dir", "a data dir is required"))
	}
	if _, _, err := net.SplitHostPort(c.Listen); c.Listen != "" && err != nil {
		list = append(list, errs.Invalid("listen", "invalid listen address %q: want host:port", c.Listen))
	}
	if _, _, err := net.SplitHostPort(c.Advertise); c.Advertise != "" && err != nil {
		list = append(list, errs.Invalid("advertise", "invalid advertise address %q: want host:port", c.Advertise))
	}
	if _, err := splitPort(c.GossipBind); c.GossipBind != "" && err != nil {
		list = append(list, errs.Invalid("gossip_bind", "invalid gossip bind address %q: want host:port", c.GossipBind))
	}
	for _, a := range c.GossipJoin {
		if _, _, err := net.SplitHostPort(a); err != nil {
			list = append(list, errs.Invalid("gossip_join", "invalid gossip join address %q: want host:port", a))
		}
	}
	switch len(c.GossipKey) {
	case 0, 16, 24, 32:
	default:
		list = append(list, errs.Invalid("gossip_key", "gossip key is %d bytes, want 16, 24 or 32", len(c.GossipKey)))
	}
	if c.Gateway != "" {
		if u, err := url.Parse(c.Gateway); err != nil || u.Scheme != "https" || u.Host == "" {
			list = append(list, errs.Invalid("gateway", "invalid gateway URL %q: want https://host:port", c.Gateway))
		}
	}
	if c.JoinToken != "" && c.Gateway == "" {
		list = append(list, errs.Invalid("gateway", "joining with a token needs the gateway URL"))
	}
	if c.Code == nil && c.Gateway == "" {
		list = append(list, errs.Invalid("gateway", "the gateway URL is required: the agent fetches code from it"))
	}
	if c.SandboxMemoryMB < 0 {
		list = append(list, errs.Invalid("sandbox_memory", "sandbox memory must not be negative"))
	}
	if c.KeepAlive < 0 || c.DrainTimeout < 0 || c.CapacityRefresh < 0 {
		list = append(list, errs.Invalid("keep_alive", "durations must not be negative"))
	}
	if c.Name != "" {
		if err := pki.ValidateName(c.Name); err != nil {
			list = append(list, err)
		}
	}
	if len(c.Zone) > 64 {
		list = append(list, errs.Invalid("zone", "zone is %d bytes, at most 64", len(c.Zone)))
	}
	if len(c.Rack) > 64 {
		list = append(list, errs.Invalid("rack", "rack is %d bytes, at most 64", len(c.Rack)))
	}
	return errors.Join(list...)
}

func splitPort(hostport string) (int, error) {
	_, p, err := net.SplitHostPort(hostport)
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(p)
	if err != nil || n < 0 || n > 65535 {
		return 0, fmt.Errorf("invalid port %q", p)
	}
	return n, nil
}

// Run serves until ctx is done or a drain is requested, then drains and
// shuts down in order: refuse new invocations, flag the member draining,
// wait for in-flight invocations (until DrainTimeout or Abort), leave the
// gossip cluster, stop serving, close the sandboxes. It returns nil after
// a complete drain, and an error when the drain was cut short.
func Run(ctx context.Context, cfg Config) (err error) {
	if err := cfg.validate(); err != nil {
		return err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	log := cfg.Logger
	if cfg.Listen == "" {
		cfg.Listen = DefaultListen
	}
	if cfg.GossipBind == "" {
		cfg.GossipBind = net.JoinHostPort("0.0.0.0", strconv.Itoa(gossip.DefaultPort))
	}
	if cfg.Name == "" {
		if cfg.Name, err = os.Hostname(); err != nil || cfg.Name == "" {
			return errs.Invalid("name", "no --name given and the hostname is unknown")
		}
	}
	if cfg.DrainTimeout == 0 {
		cfg.DrainTimeout = DefaultDrainTimeout
	}
	if cfg.CapacityRefresh == 0 {
		cfg.CapacityRefresh = 5 * time.Second
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("creating data dir: %w", err)
	}
	ctlPath, err := controlPath(cfg.DataDir)
	if err != nil {
		return err
	}

	// Bind first: the advertised address derives from the bound one.
	rpcLn, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", cfg.Listen, err)
	}
	defer rpcLn.Close()
	advertise, err := advertiseAddr(cfg, rpcLn.Addr().(*net.TCPAddr).Port)
	if err != nil {
		return err
	}

	tlsDir := filepath.Join(cfg.DataDir, "tls")
	if !haveTLS(tlsDir) {
		if cfg.JoinToken == "" {
			return errs.Invalid("join", "no node certificate in %s: join the cluster with --join TOKEN --gateway URL (make a token with 'skiff token create' on a gateway)", tlsDir)
		}
		host, _, _ := net.SplitHostPort(advertise)
		hosts := []string{host}
		if hn, err := os.Hostname(); err == nil && hn != "" && hn != host {
			hosts = append(hosts, hn)
		}
		if err := pki.Join(ctx, pki.JoinRequest{Gateway: cfg.Gateway, Token: cfg.JoinToken, Name: cfg.Name, Hosts: hosts, Dir: tlsDir}); err != nil {
			return err // pki.Join names the gateway and keeps the refusal's reason
		}
		log.Info("joined the cluster: node certificate issued", "gateway", cfg.Gateway, "hosts", hosts)
	}
	serverTLS, err := pki.LoadServerTLS(tlsDir)
	if err != nil {
		return err
	}
	code := cfg.Code
	if code == nil {
		clientTLS, err := pki.LoadClientTLS(tlsDir)
		if err != nil {
			return err
		}
		code = NewGatewayCode(cfg.Gateway, clientTLS)
	}

	ctlLn, err := listenControl(ctlPath)
	if err != nil {
		return err
	}
	defer func() {
		_ = ctlLn.Close()
		_ = os.Remove(ctlPath)
	}()

	ag, err := agent.New(agent.Config{
		Host:            cfg.Name,
		DataDir:         filepath.Join(cfg.DataDir, "agent"),
		MemoryMB:        cfg.SandboxMemoryMB,
		KeepAlive:       cfg.KeepAlive,
		NetworkSubnet:   cfg.SandboxSubnet,
		NetworkResolver: cfg.Resolver,
		Code:            code,
		Logger:          log.With("component", "agent"),
	})
	if err != nil {
		return fmt.Errorf("starting agent: %w", err)
	}
	closed := false
	defer func() {
		if !closed {
			cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			err = errors.Join(err, ag.Close(cctx))
		}
	}()

	// The AgentService over mutual TLS, and Status and Drain on the
	// control socket.
	opts := []connect.HandlerOption{connect.WithInterceptors(errs.Interceptor()), connect.WithReadMaxBytes(MaxRequestBytes)}
	mux := http.NewServeMux()
	mux.Handle(skiffv1connect.NewAgentServiceHandler(ag, opts...))
	srv := &http.Server{
		Handler:           mux,
		TLSConfig:         serverTLS,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       5 * time.Minute,
		Protocols:         new(http.Protocols),
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	srv.Protocols.SetHTTP1(true)
	srv.Protocols.SetHTTP2(true)
	ctlMux := http.NewServeMux()
	ctlMux.Handle(skiffv1connect.NewAgentServiceHandler(controlHandler{svc: ag}, opts...))
	ctlSrv := &http.Server{Handler: ctlMux, ReadHeaderTimeout: 10 * time.Second}
	serveErr := make(chan error, 2)
	go func() { serveErr <- fmt.Errorf("serving AgentService: %w", srv.ServeTLS(rpcLn, "", "")) }()
	go func() { serveErr <- fmt.Errorf("serving the control socket: %w", ctlSrv.Serve(ctlLn)) }()
	defer func() {
		_ = srv.Close()
		_ = ctlSrv.Close()
	}()

	node, err := startGossip(cfg, advertise, log)
	if err != nil {
		return err
	}
	if gc, ok := code.(*GatewayCode); ok {
		// Code from any gateway alive in gossip when --gateway is down.
		gc.SetGateways(func() []string {
			var out []string
			for _, m := range node.Members() {
				if m.Tags.Role == gossip.RoleGateway && m.Tags.RPCAddr != "" && m.State == gossip.StateAlive {
					out = append(out, "https://"+m.Tags.RPCAddr)
				}
			}
			return out
		})
	}
	var bg sync.WaitGroup
	bgCtx, stopBG := context.WithCancel(context.Background())
	stopGossip := func() {
		stopBG()
		bg.Wait()
		if err := node.Leave(3 * time.Second); err != nil {
			log.Warn("leaving the gossip cluster", "err", err)
		}
		_ = node.Shutdown()
	}
	gossipStopped := false
	defer func() {
		if !gossipStopped {
			stopGossip()
		}
	}()
	if len(cfg.GossipJoin) > 0 {
		bg.Add(1)
		go func() {
			defer bg.Done()
			joinLoop(bgCtx, node, cfg.GossipJoin, log)
			rejoinLoop(bgCtx, node, cfg.GossipJoin, rejoinInterval, log)
		}()
	}
	bg.Add(1)
	go func() {
		defer bg.Done()
		publishCapacity(bgCtx, ag, node, cfg.GossipTimers.UpdateInterval, cfg.CapacityRefresh, log)
	}()

	addrs := Addrs{RPC: rpcLn.Addr().String(), RPCTag: advertise, Gossip: node.Addr(), Control: ctlPath}
	log.Info("skiff agent serving", "rpc", addrs.RPC, "advertise", advertise, "gossip", addrs.Gossip, "name", cfg.Name, "data_dir", cfg.DataDir)
	if cfg.Ready != nil {
		cfg.Ready(addrs)
	}

	select {
	case err := <-serveErr:
		return err
	case <-ctx.Done():
		log.Info("shutting down: draining")
	case <-ag.DrainStarted():
		log.Info("drain requested")
	}

	// Drain: nothing new starts; gateways see the flag and place elsewhere.
	ag.StartDrain()
	node.SetDraining(true)
	start := time.Now()
	actx, abort := context.WithCancelCause(context.Background())
	defer abort(nil)
	dctx, cancel := context.WithTimeoutCause(actx, cfg.DrainTimeout, fmt.Errorf("drain timeout of %s", cfg.DrainTimeout))
	defer cancel()
	if cfg.Abort != nil {
		go func() {
			select {
			case <-cfg.Abort:
				abort(errors.New("aborted"))
			case <-dctx.Done():
			}
		}()
	}
	var drainErr error
	if werr := ag.WaitIdle(dctx); werr != nil {
		drainErr = fmt.Errorf("drain cut short after %s (%v): %d invocations were still running", time.Since(start).Round(time.Millisecond), werr, ag.InFlight())
		log.Warn("drain cut short", "in_flight", ag.InFlight(), "cause", werr)
	} else {
		log.Info("drained: no invocation in flight", "took", time.Since(start).Round(time.Millisecond))
	}

	// In-flight responses are written: stop serving, leave, close.
	gossipStopped = true
	stopGossip()
	sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer scancel()
	if drainErr != nil {
		_ = srv.Close()
	} else if err := srv.Shutdown(sctx); err != nil {
		_ = srv.Close()
	}
	closed = true
	cctx, ccancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer ccancel()
	if drainErr != nil {
		ccancel() // cut short: close the sandboxes under their invocations
	}
	err = errors.Join(drainErr, ag.Close(cctx))
	// Last, so that `skiff agent drain` returns once the sandboxes are
	// gone.
	_ = ctlSrv.Shutdown(sctx)
	return err
}

// advertiseAddr is the RPC address others dial.
func advertiseAddr(cfg Config, port int) (string, error) {
	if cfg.Advertise != "" {
		return cfg.Advertise, nil
	}
	p := strconv.Itoa(port)
	if h, _, _ := net.SplitHostPort(cfg.Listen); h != "" && !isUnspecified(h) {
		return net.JoinHostPort(h, p), nil
	}
	if h, _, _ := net.SplitHostPort(cfg.GossipBind); h != "" && !isUnspecified(h) {
		return net.JoinHostPort(h, p), nil
	}
	ip, err := firstGlobalIPv4()
	if err != nil {
		return "", errs.Invalid("advertise", "cannot tell which address gateways should dial: pass --advertise host:port (%v)", err)
	}
	return net.JoinHostPort(ip.String(), p), nil
}

func isUnspecified(host string) bool {
	a, err := netip.ParseAddr(host)
	return err == nil && a.IsUnspecified()
}

func firstGlobalIPv4() (netip.Addr, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return netip.Addr{}, err
	}
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().Is4() && p.Addr().IsGlobalUnicast() {
			return p.Addr(), nil
		}
	}
	return netip.Addr{}, errors.New("no global unicast IPv4 address on this host")
}

// startGossip starts this agent's gossip member.
func startGossip(cfg Config, advertise string, log *slog.Logger) (*gossip.Node, error) {
	host, _, _ := net.SplitHostPort(cfg.GossipBind)
	port, err := splitPort(cfg.GossipBind)
	if err != nil {
		return nil, errs.Invalid("gossip_bind", "invalid gossip bind address %q", cfg.GossipBind)
	}
	node, err := gossip.New(gossip.Config{
		Name:     cfg.Name,
		BindAddr: host,
		BindPort: port,
		Tags: gossip.Tags{
			Role:    gossip.RoleAgent,
			Version: cfg.Version,
			Zone:    cfg.Zone,
			Rack:    cfg.Rack,
			RPCAddr: advertise,
		},
		Key:           cfg.GossipKey,
		Timers:        cfg.GossipTimers,
		Logger:        log,
		DiscardEvents: true, // an agent never reads membership events
		SkipCapacity:  true, // nor places work on others
	})
	if err != nil {
		return nil, fmt.Errorf("starting gossip: %w", err)
	}
	return node, nil
}

// joinLoop joins the given members, retrying with backoff (1 s doubling
// to 30 s) until one answers or ctx is done.
func joinLoop(ctx context.Context, node *gossip.Node, addrs []string, log *slog.Logger) {
	delay := time.Second
	for {
		n, err := node.Join(addrs)
		if err == nil {
			log.Info("joined the gossip cluster", "reached", n)
			return
		}
		log.Warn("joining the gossip cluster; retrying", "err", err, "in", delay)
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		delay = min(2*delay, 30*time.Second)
	}
}

// rejoinInterval is how often an agent that sees no gateway alive looks
// for one to rejoin through.
const rejoinInterval = time.Second

// rejoiner is what rejoinLoop needs of the gossip member.
type rejoiner interface {
	Members() []gossip.Member
	Join(addrs []string) (int, error)
}

// rejoinLoop keeps the agent in the cluster after its first join. A
// partition that cuts it off from the gateways for longer than the failure
// detection gets it declared dead, and memberlist stops talking to dead
// members (and the agent to the members it declared dead) shortly after:
// healed, neither side would reach out again. So while the agent sees no
// gateway alive, it checks every interval which seeds answer a TCP dial
// (quickly: a join's own dial waits for memberlist's TCP timeout) and
// joins through those, which also refutes its death in their views.
func rejoinLoop(ctx context.Context, node rejoiner, seeds []string, interval time.Duration, log *slog.Logger) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		rejoinOnce(ctx, node, seeds, interval/2, log)
	}
}

// rejoinOnce is one round of rejoinLoop: when no gateway is alive, join
// through the seeds that answer a TCP dial within dialTimeout. It
// reports whether it joined.
func rejoinOnce(ctx context.Context, node rejoiner, seeds []string, dialTimeout time.Duration, log *slog.Logger) bool {
	if gatewayAlive(node.Members()) {
		return false
	}
	dialer := &net.Dialer{Timeout: dialTimeout}
	var up []string
	for _, s := range seeds {
		c, err := dialer.DialContext(ctx, "tcp", s)
		if err == nil {
			_ = c.Close()
			up = append(up, s)
		}
	}
	if len(up) == 0 {
		return false
	}
	n, err := node.Join(up)
	if err != nil {
		log.Warn("rejoining the gossip cluster failed; retrying", "seeds", up, "err", err)
		return false
	}
	log.Info("rejoined the gossip cluster: no gateway was alive in this agent's view", "reached", n)
	return true
}

// gatewayAlive reports whether members hold a gateway that is alive (or
// only suspected).
func gatewayAlive(members []gossip.Member) bool {
	for _, m := range members {
		if m.Tags.Role == gossip.RoleGateway && (m.State == gossip.StateAlive || m.State == gossip.StateSuspect) {
			return true
		}
	}
	return false
}

// capacitySource is what publishCapacity reads.
type capacitySource interface {
	Capacity() gossip.Capacity
	Changes() <-chan struct{}
}

// capacitySink is what publishCapacity writes.
type capacitySink interface {
	SetCapacity(gossip.Capacity) error
}

// publishCapacity reports the agent's capacity after every change, at most
// once per minGap (changes in between are coalesced into the next report),
// and every refresh when nothing changed.
func publishCapacity(ctx context.Context, src capacitySource, sink capacitySink, minGap, refresh time.Duration, log *slog.Logger) {
	if minGap <= 0 {
		minGap = gossip.LANTimers().UpdateInterval
	}
	report := func() {
		if err := sink.SetCapacity(src.Capacity()); err != nil {
			log.Warn("publishing capacity", "err", err)
		}
	}
	report()
	t := time.NewTicker(refresh)
	defer t.Stop()
	gap := time.NewTimer(minGap)
	defer gap.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-src.Changes():
		case <-t.C:
		}
		select { // rate limit: wait out the gap since the last report
		case <-ctx.Done():
			return
		case <-gap.C:
		}
		report()
		gap.Reset(minGap)
	}
}
