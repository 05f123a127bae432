package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"skiff.dev/skiff/internal/devserver"
)

// devConfig is what `skiff dev` passes to the dev server; it mirrors
// devserver.Config field for field.
type devConfig struct {
	DataDir         string
	Listen          string
	Deploy          map[string]string // function name -> zip file or directory
	KeepAlive       time.Duration
	SandboxMemoryMB int
	AsyncDurability string
	AsyncRetryDelay time.Duration
	SandboxSubnet   netip.Prefix
	Resolver        netip.Addr
	Logger          *slog.Logger
	Stdout          io.Writer
}

// runDevServer is deps.devRun in the real binary.
func runDevServer(ctx context.Context, c devConfig) error {
	return devserver.Run(ctx, devserver.Config{
		DataDir: c.DataDir, Listen: c.Listen, Deploy: c.Deploy, KeepAlive: c.KeepAlive,
		SandboxMemoryMB: c.SandboxMemoryMB, AsyncDurability: c.AsyncDurability, AsyncRetryDelay: c.AsyncRetryDelay,
		SandboxSubnet: c.SandboxSubnet, Resolver: c.Resolver,
		Logger: c.Logger, Stdout: c.Stdout,
	})
}

func (a *app) devCmd() *cobra.Command {
	var (
		cfg      devConfig
		deploy   []string
		logLevel string
		subnet   string
		resolver string
	)
	c := &cobra.Command{
		Use:   "dev",
		Short: "Run a gateway and an agent on this machine",
		Long: lines(
			"Run skiff on this machine: the gateway (API, storage on embedded NATS",
			"JetStream) and an agent running sandboxes, in one process, until interrupted.",
			"",
			"On first start it creates an admin API key, prints it once and writes it to",
			"<data-dir>/admin.key, where the other commands find it. Sandboxes need root."),
		Example: lines(
			"  sudo skiff dev",
			"  sudo skiff dev --deploy hello=examples/hello/hello.zip --keep-alive 1m"),
		Args: checkArgs(cobra.NoArgs),
		RunE: func(c *cobra.Command, _ []string) error {
			if !c.Flags().Changed("data-dir") {
				cfg.DataDir = defaultDataDir(a.getenv, a.homeDir)
			}
			if cfg.DataDir == "" {
				return usagef(c, "--data-dir must not be empty")
			}
			if cfg.KeepAlive <= 0 {
				return usagef(c, "--keep-alive must be positive")
			}
			if cfg.SandboxMemoryMB < 0 {
				return usagef(c, "--sandbox-memory must not be negative")
			}
			if cfg.AsyncDurability != "always" && cfg.AsyncDurability != "interval" {
				return usagef(c, "invalid --async-durability %q: want always or interval", cfg.AsyncDurability)
			}
			if cfg.AsyncRetryDelay <= 0 {
				return usagef(c, "--async-retry-delay must be positive")
			}
			if subnet != "" {
				p, err := netip.ParsePrefix(subnet)
				if err != nil || !p.Addr().Is4() || p.Bits() > 28 || p.Masked() != p {
					return usagef(c, "invalid --sandbox-subnet %q: want an IPv4 prefix of /28 or larger without host bits, e.g. 10.253.0.0/16", subnet)
				}
				cfg.SandboxSubnet = p
			}
			if resolver != "" {
				a, err := netip.ParseAddr(resolver)
				if err != nil || !a.Is4() {
					return usagef(c, "invalid --resolver %q: want an IPv4 address", resolver)
				}
				cfg.Resolver = a
			}
			var err error
			if cfg.Deploy, err = parseDeploy(deploy); err != nil {
				return usageErr(c, err)
			}
			var level slog.Level
			if err := level.UnmarshalText([]byte(logLevel)); err != nil {
				return usagef(c, "invalid --log-level %q: want debug, info, warn or error", logLevel)
			}
			cfg.Logger = slog.New(slog.NewTextHandler(a.stderr, &slog.HandlerOptions{Level: level}))
			cfg.Stdout = a.stdout
			return a.devRun(c.Context(), cfg)
		},
	}
	fl := c.Flags()
	fl.StringVar(&cfg.DataDir, "data-dir", "", "state directory (default $"+envDataDir+", $XDG_DATA_HOME/skiff or ~/.local/share/skiff)")
	fl.StringVar(&cfg.Listen, "listen", "127.0.0.1:7070", "address to serve the API on")
	fl.StringArrayVar(&deploy, "deploy", nil, "create or update function NAME at start from a zip or a directory: NAME=ZIP|DIR (repeatable)")
	fl.DurationVar(&cfg.KeepAlive, "keep-alive", 10*time.Minute, "how long an idle sandbox stays warm")
	fl.IntVar(&cfg.SandboxMemoryMB, "sandbox-memory", 0, "memory in MB for all sandboxes together (default half the host's)")
	fl.StringVar(&cfg.AsyncDurability, "async-durability", "always", "when an async event is acknowledged: always (after fsync) or interval (after the engine's periodic sync; a host crash can lose the last ~2 minutes)")
	fl.DurationVar(&cfg.AsyncRetryDelay, "async-retry-delay", time.Minute, "base delay before retrying a failed async event (then twice that), as Lambda's ~1 and ~2 minutes")
	fl.StringVar(&subnet, "sandbox-subnet", "", "IPv4 prefix the sandboxes' addresses come from, a /30 each (default 10.253.0.0/16)")
	fl.StringVar(&resolver, "resolver", "", "DNS server written to the sandboxes' resolv.conf (default the host's first nameserver)")
	fl.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	return c
}

// parseDeploy turns NAME=PATH pairs into a map.
func parseDeploy(pairs []string) (map[string]string, error) {
	if len(pairs) == 0 {
		return nil, nil
	}
	m := make(map[string]string, len(pairs))
	for _, p := range pairs {
		name, path, ok := strings.Cut(p, "=")
		if !ok || name == "" || path == "" {
			return nil, fmt.Errorf("invalid --deploy %q: want NAME=ZIP or NAME=DIR", p)
		}
		if _, dup := m[name]; dup {
			return nil, fmt.Errorf("--deploy %s given twice", name)
		}
		m[name] = path
	}
	return m, nil
}
