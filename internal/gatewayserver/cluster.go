package gatewayserver

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/gateway/cluster"
	"skiff.dev/skiff/gateway/codeservice"
	"skiff.dev/skiff/gateway/router"
	"skiff.dev/skiff/gateway/store"
	"skiff.dev/skiff/gossip"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/pki"
)

// ClusterConfig configures `skiff gateway`: a gateway that places work on
// the agents it learns about through gossip.
type ClusterConfig struct {
	// Config is the gateway's base configuration; RunCluster sets its
	// Workers, Cluster and Mount.
	Config
	// CADir holds the cluster CA (`skiff ca init`): the gateway signs
	// agents' certificates with it (Join) and issues its own.
	CADir string
	// ClusterListen is where agents reach the gateway over TLS: Join (a
	// join token is the credential) and CodeService (a cluster client
	// certificate is required). Default 0.0.0.0:7443.
	ClusterListen string
	// Advertise is the host (IP or DNS name) other members reach this
	// gateway at; it goes into the gateway's certificate. Default: the
	// host of ClusterListen, or the first non-loopback address.
	Advertise string
	// Gossip configures this gateway's membership; Name, Tags.Role and
	// Tags.RPCAddr are set here.
	Gossip gossip.Config
	// GossipJoin are members (host:port) to join at start.
	GossipJoin []string
	// AgentTimeout bounds an agent call's connection setup (default 2 s).
	AgentTimeout time.Duration
}

// clusterLeaseExpiry is the pollers' lease expiry in a cluster, where
// gossip's failure detection, not the expiry, hands a dead gateway's
// leases over.
const clusterLeaseExpiry = 9 * time.Second

// nodeCertTTL is the lifetime of the certificate a gateway issues itself.
const nodeCertTTL = 365 * 24 * time.Hour

// RunCluster runs a gateway of a cluster until ctx is done.
func RunCluster(ctx context.Context, cfg ClusterConfig) error {
	if cfg.CADir == "" {
		return errs.Invalid("ca_dir", "a gateway needs the cluster CA directory (from `skiff ca init`)")
	}
	if cfg.DataDir == "" {
		return errors.New("gateway: a data dir is required")
	}
	if cfg.Name == "" {
		h, _ := os.Hostname()
		cfg.Name = h
	}
	if err := pki.ValidateName(cfg.Name); err != nil {
		return err
	}
	if cfg.ClusterListen == "" {
		cfg.ClusterListen = "0.0.0.0:7443"
	}
	if cfg.AgentTimeout <= 0 {
		cfg.AgentTimeout = 2 * time.Second
	}
	ca, err := pki.LoadCA(cfg.CADir)
	if err != nil {
		return fmt.Errorf("loading the cluster CA: %w", err)
	}
	host, port, err := net.SplitHostPort(cfg.ClusterListen)
	if err != nil {
		return errs.Invalid("cluster_listen", "cluster listen address %q: %v", cfg.ClusterListen, err)
	}
	advertise := cfg.Advertise
	if advertise == "" {
		advertise = host
		if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
			advertise = firstAddress()
		}
	}
	tlsDir := filepath.Join(cfg.DataDir, "tls")
	if err := ensureNodeCert(ca, tlsDir, cfg.Name, []string{advertise, cfg.Name, "127.0.0.1", "localhost"}); err != nil {
		return err
	}
	clientTLS, err := pki.LoadClientTLS(tlsDir)
	if err != nil {
		return err
	}
	serverTLS, err := pki.LoadPublicTLS(tlsDir)
	if err != nil {
		return err
	}

	// Membership: the gateway gossips with agents and other gateways.
	gcfg := cfg.Gossip
	gcfg.Name = cfg.Name
	gcfg.Tags.Role = gossip.RoleGateway
	gcfg.Tags.RPCAddr = net.JoinHostPort(advertise, port)
	if gcfg.Logger == nil {
		gcfg.Logger = cfg.Logger
	}
	node, err := gossip.New(gcfg)
	if err != nil {
		return fmt.Errorf("starting gossip: %w", err)
	}
	defer func() { _ = node.Shutdown() }()
	if len(cfg.GossipJoin) > 0 {
		if _, err := node.Join(cfg.GossipJoin); err != nil {
			// Not fatal: the seeds may start later; they join us then.
			if cfg.Logger != nil {
				cfg.Logger.Warn("joining the cluster failed; waiting for members to join us", "seeds", cfg.GossipJoin, "err", err)
			}
		}
	}
	defer func() { _ = node.Leave(time.Second) }()

	cfg.SharedLimits = true
	// Lease holders are "<gateway name>/<purpose>": a gateway gossip
	// declared dead or that left loses its pollers' leases at once
	// instead of after their expiry.
	// Liveness rides on gossip: the stored heartbeats are the backstop
	// (a gateway cut off from gossip but not dead), renewed every 3 s.
	if cfg.LeaseExpiry == 0 {
		cfg.LeaseExpiry = clusterLeaseExpiry
	}
	cfg.HolderDead = func(holder string) bool {
		name, _, _ := strings.Cut(holder, "/")
		m, ok := node.Member(name)
		return ok && m.Tags.Role == gossip.RoleGateway && (m.State == gossip.StateDead || m.State == gossip.StateLeft)
	}
	agents := newAgentClients(clientTLS, cfg.AgentTimeout)
	var rt *router.Cluster
	cfg.Workers = func(ctx context.Context, st *store.Store, reg prometheus.Registerer) (Workers, error) {
		var err error
		rt, err = router.NewCluster(router.ClusterConfig{
			Members:  node,
			Dial:     func(addr string) router.Agent { return agents.get(addr) },
			Logger:   cfg.Logger,
			Registry: reg,
		})
		if err != nil {
			return nil, err
		}
		return clusterWorkers{rt}, nil
	}
	var joinHandler *cluster.Handler
	cfg.Cluster = func(ctx context.Context, st *store.Store) (skiffv1connect.ClusterServiceHandler, error) {
		tokens, err := cluster.NewTokenStore(ctx, st.JetStream(), cluster.TokenStoreConfig{})
		if err != nil {
			return nil, err
		}
		h, err := cluster.New(cluster.Config{CA: ca, Tokens: tokens, Members: node,
			Sandboxes: sandboxSource{node: node, agents: agents}, Logger: cfg.Logger})
		joinHandler = h
		return h, err
	}
	cfg.Mount = func(_ *http.ServeMux, p Parts) error {
		// The cluster listener: Join for agents without a certificate yet,
		// CodeService for agents with one.
		mux := http.NewServeMux()
		_, h := skiffv1connect.NewClusterServiceHandler(joinHandler, connect.WithInterceptors(errs.Interceptor()), connect.WithReadMaxBytes(cluster.MaxRequestBytes))
		mux.Handle(skiffv1connect.ClusterServiceJoinProcedure, h) // only Join: the rest needs an admin key, on the API listener
		codeservice.New(p.Store).Mount(mux)
		// Membership events: an agent declared dead fails the invocations
		// running on it at once; a gateway declared dead or gone has its
		// leases taken over at once.
		p.Background(func(ctx context.Context) error {
			for {
				select {
				case <-ctx.Done():
					return nil
				case ev, ok := <-node.Events():
					if !ok {
						return nil
					}
					if (ev.Type == gossip.EventFail || ev.Type == gossip.EventLeave) && ev.Member.Tags.Role == gossip.RoleGateway {
						// Its leases are free now (HolderDead): take them
						// at once, not at the keepers' next tick.
						p.Leases.Kick()
					}
					if ev.Type == gossip.EventFail && ev.Member.Tags.Role == gossip.RoleAgent {
						if cfg.Logger != nil {
							cfg.Logger.Warn("agent failed", "host", ev.Member.Name, "addr", ev.Member.Tags.RPCAddr)
						}
						rt.HostFailed(ev.Member.Name)
					}
				}
			}
		})
		ln, err := net.Listen("tcp", cfg.ClusterListen)
		if err != nil {
			return fmt.Errorf("listening on %s: %w", cfg.ClusterListen, err)
		}
		srv := &http.Server{Handler: mux, TLSConfig: serverTLS, ReadHeaderTimeout: 10 * time.Second}
		p.Background(func(ctx context.Context) error {
			errc := make(chan error, 1)
			go func() { errc <- srv.ServeTLS(ln, "", "") }()
			select {
			case err := <-errc:
				return fmt.Errorf("cluster listener: %w", err)
			case <-ctx.Done():
				sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				_ = srv.Shutdown(sctx)
				return nil
			}
		})
		if cfg.Logger != nil {
			cfg.Logger.Info("cluster listener serving", "addr", ln.Addr().String(), "advertise", gcfg.Tags.RPCAddr, "gossip", node.Addr())
		}
		return nil
	}
	return Run(ctx, cfg.Config)
}

// ensureNodeCert issues the gateway's own node certificate when it has
// none or the one it has expires within a month.
func ensureNodeCert(ca *pki.CA, dir, name string, hosts []string) error {
	if cfg, err := pki.LoadClientTLS(dir); err == nil && len(cfg.Certificates) > 0 {
		if leaf := cfg.Certificates[0].Leaf; leaf != nil && time.Until(leaf.NotAfter) > 30*24*time.Hour {
			return nil
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	if err := ca.IssueNode(dir, name, hosts, nodeCertTTL); err != nil {
		return fmt.Errorf("issuing the gateway's certificate: %w", err)
	}
	return nil
}

// firstAddress is the first non-loopback IPv4 address of the host, or
// 127.0.0.1.
func firstAddress() string {
	addrs, err := net.InterfaceAddrs()
	if err == nil {
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok && !n.IP.IsLoopback() && n.IP.To4() != nil {
				return n.IP.String()
			}
		}
	}
	return "127.0.0.1"
}

// clusterWorkers is the cluster router with nothing to close (agents are
// separate processes).
type clusterWorkers struct{ *router.Cluster }

func (clusterWorkers) Close(context.Context) error { return nil }

// agentClients keeps one AgentService client per agent address, over
// HTTP/2 with the gateway's node certificate.
type agentClients struct {
	http *http.Client
	mu   sync.Mutex
	m    map[string]skiffv1connect.AgentServiceClient // guarded by mu
}

func newAgentClients(tlsCfg *tls.Config, dialTimeout time.Duration) *agentClients {
	tr := &http.Transport{
		TLSClientConfig:     tlsCfg,
		DialContext:         (&net.Dialer{Timeout: dialTimeout, KeepAlive: 15 * time.Second}).DialContext,
		TLSHandshakeTimeout: dialTimeout,
		Protocols:           new(http.Protocols),
		// Ping a connection that has been silent: a dead agent's is
		// closed instead of hanging the invocations on it.
		HTTP2: &http.HTTP2Config{SendPingTimeout: 2 * time.Second, PingTimeout: time.Second},
	}
	tr.Protocols.SetHTTP2(true)
	return &agentClients{http: &http.Client{Transport: tr}, m: map[string]skiffv1connect.AgentServiceClient{}}
}

func (a *agentClients) get(addr string) skiffv1connect.AgentServiceClient {
	a.mu.Lock()
	defer a.mu.Unlock()
	c, ok := a.m[addr]
	if !ok {
		c = skiffv1connect.NewAgentServiceClient(a.http, "https://"+addr)
		a.m[addr] = c
	}
	return c
}

// sandboxSource asks every live agent for its sandboxes.
type sandboxSource struct {
	node   *gossip.Node
	agents *agentClients
}

func (s sandboxSource) Sandboxes(ctx context.Context) ([]*skiffv1.PlacedSandbox, []string, error) {
	var (
		mu          sync.Mutex
		wg          sync.WaitGroup
		out         []*skiffv1.PlacedSandbox
		unreachable []string
	)
	for _, m := range s.node.Members() {
		if m.Tags.Role != gossip.RoleAgent || m.Tags.RPCAddr == "" || (m.State != gossip.StateAlive && m.State != gossip.StateSuspect) {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			resp, err := s.agents.get(m.Tags.RPCAddr).Status(cctx, connect.NewRequest(&skiffv1.StatusRequest{}))
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				unreachable = append(unreachable, m.Name)
				return
			}
			for _, sb := range resp.Msg.GetSandboxes() {
				out = append(out, &skiffv1.PlacedSandbox{Host: m.Name, Sandbox: sb})
			}
		}()
	}
	wg.Wait()
	return out, unreachable, nil
}
