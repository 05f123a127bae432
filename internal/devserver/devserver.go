// Package devserver is the composition root of `skiff dev`: one process
// running the gateway (internal/gatewayserver: front end, storage on
// embedded NATS JetStream, async, queues, streams) and an agent, which the
// router calls in-process through the same AgentService interface a
// cluster uses over the network. Only cmd/skiff imports it.
package devserver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"skiff.dev/skiff/agent"
	"skiff.dev/skiff/gateway/router"
	"skiff.dev/skiff/gateway/store"
	"skiff.dev/skiff/internal/gatewayserver"
)

// Config configures `skiff dev`.
type Config struct {
	DataDir         string
	Listen          string            // default 127.0.0.1:7070
	Deploy          map[string]string // function name → zip file or directory, created or updated at start
	KeepAlive       time.Duration     // idle sandbox lifetime
	SandboxMemoryMB int               // memory for sandboxes; default half the host's
	// AsyncDurability is when an accepted async event is acknowledged:
	// "always" (after fsync; the default) or "interval" (after the
	// engine's periodic sync).
	AsyncDurability string
	// SandboxSubnet holds the sandboxes' addresses (a /30 each); zero means
	// the agent's default, 10.253.0.0/16.
	SandboxSubnet netip.Prefix
	// Resolver is the sandboxes' DNS server; zero means the host's first
	// nameserver.
	Resolver netip.Addr
	// AsyncRetryDelay is the base delay before retrying a failed async
	// event (Lambda's is about a minute, then twice that); default 1m.
	AsyncRetryDelay time.Duration
	Logger          *slog.Logger
	Stdout          io.Writer
	// Ready, when set, is called with the bound address once serving.
	Ready func(addr string)
}

// Run serves until ctx is done, then shuts down in order: stop accepting,
// drain in-flight invocations, close sandboxes, close storage.
func Run(ctx context.Context, cfg Config) error {
	if cfg.DataDir == "" {
		return errors.New("dev: a data dir is required")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return gatewayserver.Run(ctx, gatewayserver.Config{
		DataDir:         cfg.DataDir,
		Listen:          cfg.Listen,
		Name:            "dev-" + gatewayserver.HostID(cfg.DataDir),
		Deploy:          cfg.Deploy,
		AsyncDurability: cfg.AsyncDurability,
		AsyncRetryDelay: cfg.AsyncRetryDelay,
		Logger:          log,
		Stdout:          cfg.Stdout,
		Banner:          "skiff dev",
		Ready:           cfg.Ready,
		Workers: func(ctx context.Context, st *store.Store, reg prometheus.Registerer) (gatewayserver.Workers, error) {
			ag, err := agent.New(agent.Config{
				DataDir:         filepath.Join(cfg.DataDir, "agent"),
				MemoryMB:        int64(cfg.SandboxMemoryMB),
				KeepAlive:       cfg.KeepAlive,
				NetworkSubnet:   cfg.SandboxSubnet,
				NetworkResolver: cfg.Resolver,
				Code:            st,
				Logger:          log.With("component", "agent"),
				Registry:        reg,
			})
			if err != nil {
				return nil, fmt.Errorf("starting agent: %w", err)
			}
			rt, err := router.New(ag)
			if err != nil {
				return nil, errors.Join(err, ag.Close(context.Background()))
			}
			return inProcess{Router: rt, agent: ag}, nil
		},
	})
}

// inProcess is the worker manager of `skiff dev`: the router over the one
// agent running in this process.
type inProcess struct {
	*router.Router
	agent *agent.Agent
}

func (w inProcess) Close(ctx context.Context) error { return w.agent.Close(ctx) }
