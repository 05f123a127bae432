package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gossip"
	"skiff.dev/skiff/internal/agentserver"
)

const defaultAgentDataDir = "/var/lib/skiff/agent"

func (a *app) agentCmd() *cobra.Command {
	var (
		cfg        agentserver.Config
		keyFile    string
		subnet     string
		resolver   string
		memoryMB   int64
		logLevel   string
		gossipJoin []string
	)
	c := &cobra.Command{
		Use:   "agent",
		Short: "Run this host's agent in a skiff cluster",
		Long: lines(
			"Run the agent of this host: it runs sandboxes for the gateways, serving",
			"AgentService over HTTP/2 with mutual TLS (only certificates of the cluster CA",
			"are accepted), fetches code from a gateway, and gossips its capacity.",
			"",
			"Its certificate lives in <data-dir>/tls; without one, --join TOKEN (from",
			"'skiff token create' on a gateway) obtains it from --gateway.",
			"",
			"SIGTERM (or 'skiff agent drain') drains it: new invocations are refused with",
			"reason \"draining\" so the gateways place them elsewhere, in-flight ones finish,",
			"then it exits 0. A second SIGTERM or the drain timeout ends it at once.",
			"Sandboxes need root."),
		Example: lines(
			"  sudo skiff agent --data-dir /var/lib/skiff/agent --listen 10.0.0.5:7071 \\",
			"    --join TOKEN --gateway https://10.0.0.1:7443 --gossip-bind 10.0.0.5:7946 \\",
			"    --gossip-join 10.0.0.1:7946 --gossip-key-file /etc/skiff/gossip.key --zone a",
			"  sudo skiff agent drain --data-dir /var/lib/skiff/agent"),
		Args: checkArgs(cobra.NoArgs),
		RunE: func(c *cobra.Command, _ []string) error {
			if cfg.DataDir == "" {
				return usagef(c, "--data-dir must not be empty")
			}
			if cfg.KeepAlive <= 0 {
				return usagef(c, "--keep-alive must be positive")
			}
			if cfg.DrainTimeout <= 0 {
				return usagef(c, "--drain-timeout must be positive")
			}
			if memoryMB < 0 {
				return usagef(c, "--sandbox-memory must not be negative")
			}
			cfg.SandboxMemoryMB = memoryMB
			if subnet != "" {
				p, err := netip.ParsePrefix(subnet)
				if err != nil || !p.Addr().Is4() || p.Bits() > 28 || p.Masked() != p {
					return usagef(c, "invalid --sandbox-subnet %q: want an IPv4 prefix of /28 or larger without host bits, e.g. 10.253.0.0/16", subnet)
				}
				cfg.SandboxSubnet = p
			}
			if resolver != "" {
				addr, err := netip.ParseAddr(resolver)
				if err != nil || !addr.Is4() {
					return usagef(c, "invalid --resolver %q: want an IPv4 address", resolver)
				}
				cfg.Resolver = addr
			}
			for _, j := range gossipJoin {
				for _, s := range strings.Split(j, ",") {
					if s = strings.TrimSpace(s); s != "" {
						cfg.GossipJoin = append(cfg.GossipJoin, s)
					}
				}
			}
			if keyFile != "" {
				key, err := gossip.ReadKeyFile(keyFile)
				if err != nil {
					return usageErr(c, err)
				}
				cfg.GossipKey = key
			}
			var level slog.Level
			if err := level.UnmarshalText([]byte(logLevel)); err != nil {
				return usagef(c, "invalid --log-level %q: want debug, info, warn or error", logLevel)
			}
			cfg.Logger = slog.New(slog.NewTextHandler(a.stderr, &slog.HandlerOptions{Level: level}))
			cfg.Version = readVersion().Version
			cfg.Ready = func(ad agentserver.Addrs) {
				fmt.Fprintf(a.stdout, "skiff agent %s listening on https://%s (advertised %s), gossip %s\n", cfg.Name, ad.RPC, ad.RPCTag, ad.Gossip)
			}
			// The first SIGTERM or SIGINT cancels the context (main) and
			// starts the drain; the second ends it at once.
			abort := make(chan struct{})
			sigs := make(chan os.Signal, 2)
			signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
			defer signal.Stop(sigs)
			go func() {
				n := 0
				for range sigs {
					if n++; n == 2 {
						close(abort)
						return
					}
				}
			}()
			cfg.Abort = abort
			err := agentserver.Run(c.Context(), cfg)
			if err == nil {
				fmt.Fprintln(a.stdout, "skiff agent drained and stopped")
			}
			return err
		},
	}
	fl := c.Flags()
	fl.StringVar(&cfg.DataDir, "data-dir", defaultAgentDataDir, "state directory: TLS material, code cache, control socket")
	fl.StringVar(&cfg.Listen, "listen", agentserver.DefaultListen, "host:port to serve AgentService on (mutual TLS)")
	fl.StringVar(&cfg.Advertise, "advertise", "", "host:port gateways dial (default the --listen host, else the --gossip-bind host, else the first global IPv4 address)")
	fl.StringVar(&cfg.Name, "name", "", "node name in the cluster (default the hostname)")
	fl.StringVar(&cfg.JoinToken, "join", "", "join token from 'skiff token create', to obtain the node certificate when <data-dir>/tls has none")
	fl.StringVar(&cfg.Gateway, "gateway", "", "gateway URL (https://host:port): joins and function code")
	fl.StringVar(&cfg.GossipBind, "gossip-bind", fmt.Sprintf("0.0.0.0:%d", gossip.DefaultPort), "host:port of the gossip member (UDP and TCP)")
	fl.StringSliceVar(&gossipJoin, "gossip-join", nil, "gossip members to join: host:port[,host:port] (repeatable)")
	fl.StringVar(&keyFile, "gossip-key-file", "", "file with the cluster's gossip key: 16, 24 or 32 raw bytes or their base64 (default plaintext gossip)")
	fl.StringVar(&cfg.Zone, "zone", "", "availability zone of this host (placement spreads across zones)")
	fl.StringVar(&cfg.Rack, "rack", "", "rack of this host")
	fl.Int64Var(&memoryMB, "sandbox-memory", 0, "memory in MB for all sandboxes together (default half the host's)")
	fl.StringVar(&subnet, "sandbox-subnet", "", "IPv4 prefix the sandboxes' addresses come from, a /30 each (default 10.253.0.0/16; agents sharing a host need disjoint ones)")
	fl.StringVar(&resolver, "resolver", "", "DNS server written to the sandboxes' resolv.conf (default the host's first nameserver)")
	fl.DurationVar(&cfg.KeepAlive, "keep-alive", 10*time.Minute, "how long an idle sandbox stays warm")
	fl.DurationVar(&cfg.DrainTimeout, "drain-timeout", agentserver.DefaultDrainTimeout, "how long a drain waits for in-flight invocations")
	fl.DurationVar(&cfg.GossipTimers.ProbeInterval, "gossip-probe-interval", gossip.LANTimers().ProbeInterval, "how often the member probes a random peer")
	fl.DurationVar(&cfg.GossipTimers.ProbeTimeout, "gossip-probe-timeout", gossip.LANTimers().ProbeTimeout, "how long a probe waits for its ack (shorter than the interval)")
	fl.IntVar(&cfg.GossipTimers.SuspicionMult, "gossip-suspicion-mult", gossip.LANTimers().SuspicionMult, "suspicion timeout = mult × log10(members) × probe interval")
	fl.DurationVar(&cfg.GossipTimers.GossipInterval, "gossip-interval", gossip.LANTimers().GossipInterval, "how often queued gossip is sent")
	fl.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	c.AddCommand(a.agentDrainCmd())
	return c
}

func (a *app) agentDrainCmd() *cobra.Command {
	var (
		dataDir string
		noWait  bool
		timeout time.Duration
	)
	c := &cobra.Command{
		Use:   "drain",
		Short: "Drain the agent running on this host, then let it exit",
		Long: lines(
			"Ask the agent running on --data-dir (through its control socket, which only",
			"its user can open) to drain: it refuses new invocations, finishes in-flight",
			"ones and exits. Without --no-wait, waits until the in-flight invocations",
			"finished and the agent exited."),
		Args: checkArgs(cobra.NoArgs),
		RunE: func(c *cobra.Command, _ []string) error {
			if timeout <= 0 {
				return usagef(c, "--timeout must be positive")
			}
			client, err := agentserver.ControlClient(dataDir)
			if err != nil {
				return usageErr(c, err)
			}
			ctx, cancel := context.WithTimeout(c.Context(), timeout)
			defer cancel()
			resp, err := client.Drain(ctx, connect.NewRequest(&skiffv1.DrainRequest{Wait: !noWait}))
			if err != nil {
				return fmt.Errorf("draining the agent on %s: %w", dataDir, err)
			}
			if noWait {
				fmt.Fprintf(a.stdout, "draining: %d invocations in flight\n", resp.Msg.GetInFlight())
				return nil
			}
			if n := resp.Msg.GetInFlight(); n > 0 {
				return fmt.Errorf("agent still has %d invocations in flight after %s", n, timeout)
			}
			// Drained: the agent now leaves the cluster and exits; wait
			// until its control socket stops answering.
			tick := time.NewTicker(50 * time.Millisecond)
			defer tick.Stop()
			for {
				if _, err := client.Status(ctx, connect.NewRequest(&skiffv1.StatusRequest{})); err != nil {
					if ctx.Err() != nil {
						return errors.New("the agent drained but did not exit within --timeout")
					}
					break
				}
				select {
				case <-ctx.Done():
					return errors.New("the agent drained but did not exit within --timeout")
				case <-tick.C:
				}
			}
			fmt.Fprintln(a.stdout, "agent drained and stopped")
			return nil
		},
	}
	c.Flags().StringVar(&dataDir, "data-dir", defaultAgentDataDir, "the agent's data dir")
	c.Flags().BoolVar(&noWait, "no-wait", false, "return once draining started")
	c.Flags().DurationVar(&timeout, "timeout", agentserver.DefaultDrainTimeout+time.Minute, "how long to wait")
	return c
}
