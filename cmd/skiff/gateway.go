package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"skiff.dev/skiff/gateway/store"
	"skiff.dev/skiff/gossip"
	"skiff.dev/skiff/internal/gatewayserver"
)

// runGateway is deps.gatewayRun in the real binary.
func runGateway(ctx context.Context, cfg gatewayserver.ClusterConfig) error {
	return gatewayserver.RunCluster(ctx, cfg)
}

func (a *app) gatewayCmd() *cobra.Command {
	var (
		cfg                           gatewayserver.ClusterConfig
		natsURLs, natsCreds, natsUser string
		natsPasswordEnv, natsTokenEnv string
		gossipBind, gossipJoin        string
		gossipKeyFile, logLevel       string
		deploy                        []string
	)
	c := &cobra.Command{
		Use:   "gateway",
		Short: "Run a gateway of a cluster: the API, placement on agents, async, queues and streams",
		Long: lines(
			"Run a gateway: the API (as `skiff dev` serves it), the pollers and the stream",
			"tracker, placing invocations on the agents it learns about through gossip.",
			"",
			"Gateways share storage: an external NATS cluster (--nats), or, for a single",
			"gateway, NATS embedded under --data-dir. The cluster CA (`skiff ca init`) signs",
			"the agents' certificates; agents join with a token from `skiff token create`",
			"on the cluster listener (--cluster-listen), which also serves them code."),
		Example: lines(
			"  skiff ca init --dir /etc/skiff/ca",
			"  skiff gateway --ca-dir /etc/skiff/ca --gossip-key-file /etc/skiff/gossip.key \\",
			"      --nats nats://n1:4222,nats://n2:4222,nats://n3:4222 --listen 0.0.0.0:7070"),
		Args: checkArgs(cobra.NoArgs),
		RunE: func(c *cobra.Command, _ []string) error {
			if !c.Flags().Changed("data-dir") {
				cfg.DataDir = defaultDataDir(a.getenv, a.homeDir)
			}
			if cfg.DataDir == "" {
				return usagef(c, "--data-dir must not be empty")
			}
			if cfg.CADir == "" {
				return usagef(c, "--ca-dir is required (create the cluster CA with `skiff ca init`)")
			}
			if cfg.AsyncDurability != "always" && cfg.AsyncDurability != "interval" {
				return usagef(c, "invalid --async-durability %q: want always or interval", cfg.AsyncDurability)
			}
			if cfg.AsyncRetryDelay <= 0 {
				return usagef(c, "--async-retry-delay must be positive")
			}
			if _, _, err := net.SplitHostPort(cfg.ClusterListen); err != nil {
				return usagef(c, "invalid --cluster-listen %q: want host:port", cfg.ClusterListen)
			}
			if natsURLs != "" && c.Flags().Changed("async-durability") {
				// skiff cannot set it: acks come once a quorum of the
				// replicas stored the event, fsynced as the servers'
				// sync_interval says.
				return usagef(c, "--async-durability applies to the embedded store only: with --nats, set sync_interval on the NATS servers (always: fsync before every ack)")
			}
			if natsURLs != "" {
				urls, err := store.ParseURLs(natsURLs)
				if err != nil {
					return usageErr(c, fmt.Errorf("invalid --nats: %w", err))
				}
				cfg.Store.URLs = urls
				cfg.Store.Auth = store.Auth{CredsFile: natsCreds, User: natsUser}
				if natsPasswordEnv != "" {
					cfg.Store.Auth.Password = store.Secret(a.getenv(natsPasswordEnv))
				}
				if natsTokenEnv != "" {
					cfg.Store.Auth.Token = store.Secret(a.getenv(natsTokenEnv))
				}
			} else if natsCreds != "" || natsUser != "" || natsPasswordEnv != "" || natsTokenEnv != "" || cfg.Store.TLS.CAFile != "" || cfg.Store.TLS.CertFile != "" || cfg.Store.Replicas != 0 {
				return usagef(c, "the --nats-* flags need --nats (an external cluster)")
			}
			host, port, err := net.SplitHostPort(gossipBind)
			if err != nil {
				return usagef(c, "invalid --gossip-bind %q: want host:port", gossipBind)
			}
			p, err := strconv.Atoi(port)
			if err != nil || p < 0 || p > 65535 {
				return usagef(c, "invalid --gossip-bind port %q", port)
			}
			cfg.Gossip.BindAddr, cfg.Gossip.BindPort = host, p
			if gossipJoin != "" {
				for _, s := range strings.Split(gossipJoin, ",") {
					if _, _, err := net.SplitHostPort(strings.TrimSpace(s)); err != nil {
						return usagef(c, "invalid --gossip-join member %q: want host:port", s)
					}
					cfg.GossipJoin = append(cfg.GossipJoin, strings.TrimSpace(s))
				}
			}
			if gossipKeyFile != "" {
				key, err := gossip.ReadKeyFile(gossipKeyFile)
				if err != nil {
					return usageErr(c, err)
				}
				cfg.Gossip.Key = key
			}
			if cfg.Deploy, err = parseDeploy(deploy); err != nil {
				return usageErr(c, err)
			}
			var level slog.Level
			if err := level.UnmarshalText([]byte(logLevel)); err != nil {
				return usagef(c, "invalid --log-level %q: want debug, info, warn or error", logLevel)
			}
			cfg.Logger = slog.New(slog.NewTextHandler(a.stderr, &slog.HandlerOptions{Level: level}))
			cfg.Stdout = a.stdout
			cfg.Banner = "skiff gateway"
			return a.gatewayRun(c.Context(), cfg)
		},
	}
	fl := c.Flags()
	fl.StringVar(&cfg.DataDir, "data-dir", "", "state directory: admin key, the gateway's certificate, the embedded store without --nats (default $"+envDataDir+", $XDG_DATA_HOME/skiff or ~/.local/share/skiff)")
	fl.StringVar(&cfg.Listen, "listen", "127.0.0.1:7070", "address to serve the API on")
	fl.StringVar(&cfg.Name, "name", "", "this gateway's unique, stable name in the cluster (default the host name)")
	fl.StringVar(&cfg.CADir, "ca-dir", "", "the cluster CA directory made by 'skiff ca init' (required)")
	fl.StringVar(&cfg.ClusterListen, "cluster-listen", "0.0.0.0:7443", "address agents reach the gateway at over TLS: join and code")
	fl.StringVar(&cfg.Advertise, "advertise", "", "host or IP other members reach this gateway at (default the cluster listen host or the first non-loopback address)")
	fl.StringVar(&gossipBind, "gossip-bind", "0.0.0.0:"+strconv.Itoa(gossip.DefaultPort), "gossip address (UDP and TCP)")
	fl.StringVar(&gossipJoin, "gossip-join", "", "members to join, host:port[,host:port...]")
	fl.StringVar(&gossipKeyFile, "gossip-key-file", "", "file with the cluster's gossip encryption key (16, 24 or 32 bytes, raw or base64)")
	fl.StringVar(&cfg.Gossip.Tags.Zone, "zone", "", "this gateway's zone")
	fl.StringVar(&natsURLs, "nats", "", "external NATS cluster: nats://a:4222,nats://b:4222,... (default: embedded under --data-dir)")
	fl.StringVar(&natsCreds, "nats-creds", "", "NATS credentials file")
	fl.StringVar(&natsUser, "nats-user", "", "NATS user name")
	fl.StringVar(&natsPasswordEnv, "nats-password-env", "", "environment variable holding the NATS password")
	fl.StringVar(&natsTokenEnv, "nats-token-env", "", "environment variable holding the NATS token")
	fl.StringVar(&cfg.Store.TLS.CAFile, "nats-ca", "", "CA file for TLS to NATS")
	fl.StringVar(&cfg.Store.TLS.CertFile, "nats-cert", "", "client certificate for TLS to NATS")
	fl.StringVar(&cfg.Store.TLS.KeyFile, "nats-key", "", "client key for TLS to NATS")
	fl.IntVar(&cfg.Store.Replicas, "nats-replicas", 0, "replicas of every stream, KV bucket and object store (default 3 with --nats)")
	fl.StringArrayVar(&deploy, "deploy", nil, "create or update function NAME at start from a zip or a directory: NAME=ZIP|DIR (repeatable)")
	fl.StringVar(&cfg.AsyncDurability, "async-durability", "always", "embedded store only: when an async event is acknowledged, always (after fsync) or interval; with --nats the servers' sync_interval decides")
	fl.DurationVar(&cfg.AsyncRetryDelay, "async-retry-delay", time.Minute, "base delay before retrying a failed async event (then twice that)")
	fl.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	return c
}
