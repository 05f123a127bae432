package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"skiff.dev/skiff/internal/gatewayserver"
)

// deps is what the command tree takes from the process. main uses
// defaultDeps; tests inject their own (stdin, environment, terminal, the
// dev server) instead of touching process state.
type deps struct {
	stdin      io.Reader
	getenv     func(string) string
	homeDir    func() (string, error)
	isTerminal func(io.Writer) bool
	// devRun runs `skiff dev` until ctx ends.
	devRun func(context.Context, devConfig) error
	// gatewayRun runs `skiff gateway` until ctx ends.
	gatewayRun func(context.Context, gatewayserver.ClusterConfig) error
	// streamPoll is how long `stream get --follow` waits after a round
	// of reads that found nothing new (0: defaultStreamPoll).
	streamPoll time.Duration
}

func defaultDeps() deps {
	return deps{
		stdin:      os.Stdin,
		getenv:     os.Getenv,
		homeDir:    os.UserHomeDir,
		isTerminal: isTerminal,
		devRun:     runDevServer,
		gatewayRun: runGateway,
		streamPoll: defaultStreamPoll,
	}
}

// isTerminal reports whether w is a terminal (progress bars go only there).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// run executes the command line args, writing results to stdout and
// diagnostics to stderr. It returns the error to report; see report.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return runWith(ctx, defaultDeps(), args, stdout, stderr)
}

func runWith(ctx context.Context, d deps, args []string, stdout, stderr io.Writer) error {
	a := &app{deps: d, stdout: stdout, stderr: stderr}
	root := a.rootCmd()
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetIn(d.stdin)
	err := root.ExecuteContext(ctx)
	if err != nil && a.endpoint != "" {
		err = withHint(err, a.endpoint)
	}
	return err
}

// app holds one invocation's global flags and dependencies.
type app struct {
	deps
	stdout, stderr io.Writer

	// Global flags.
	flagEndpoint string
	flagAPIKey   string
	flagOutput   string
	flagProtocol string

	endpoint string // resolved by dial, for error hints
}

const (
	defaultEndpoint = "http://127.0.0.1:7070"
	envEndpoint     = "SKIFF_ENDPOINT"
	envAPIKey       = "SKIFF_API_KEY"
	envDataDir      = "SKIFF_DATA_DIR"
	adminKeyFile    = "admin.key"
)

func (a *app) rootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "skiff",
		Short: "Self-hosted AWS Lambda: run and manage functions",
		Long: `skiff runs functions packaged as AWS Lambda zips in namespace jails.

Start a single-machine server with 'skiff dev', then manage functions with
'skiff fn', run them with 'skiff invoke' and read their logs with 'skiff logs'.
'skiff queue' manages message queues, 'skiff stream' sharded streams, and
'skiff esm' maps queues and streams to functions.`,
		Args:                  cobra.ArbitraryArgs,
		RunE:                  groupRun,
		DisableFlagsInUseLine: true,
		SilenceErrors:         true,
		SilenceUsage:          true,
		PersistentPreRunE:     a.validateGlobal,
	}
	pf := root.PersistentFlags()
	pf.StringVar(&a.flagEndpoint, "endpoint", "", "gateway URL (env "+envEndpoint+", default "+defaultEndpoint+")")
	pf.StringVar(&a.flagAPIKey, "api-key", "", "API key (env "+envAPIKey+", default the admin key in the data dir)")
	pf.StringVarP(&a.flagOutput, "output", "o", "table", "output format: table or json")
	pf.StringVar(&a.flagProtocol, "protocol", "connect", "RPC protocol: connect or grpc")
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error { return usageErr(c, err) })
	root.AddCommand(
		a.devCmd(),
		a.gatewayCmd(),
		a.agentCmd(),
		a.fnCmd(),
		a.invokeCmd(),
		a.logsCmd(),
		a.keyCmd(),
		a.concurrencyCmd(),
		a.queueCmd(),
		a.streamCmd(),
		a.esmCmd(),
		a.caCmd(),
		a.tokenCmd(),
		a.clusterCmd(),
		a.sandboxesCmd(),
		a.versionCmd(),
	)
	return root
}

func (a *app) validateGlobal(c *cobra.Command, _ []string) error {
	switch a.flagOutput {
	case "table", "json":
	default:
		return usageErr(c, fmt.Errorf("invalid --output %q: want table or json", a.flagOutput))
	}
	switch a.flagProtocol {
	case "connect", "grpc":
	default:
		return usageErr(c, fmt.Errorf("invalid --protocol %q: want connect or grpc", a.flagProtocol))
	}
	return nil
}

func (a *app) json() bool { return a.flagOutput == "json" }

// groupRun is the RunE of commands that only group subcommands: help
// without arguments, a usage error for an unknown subcommand.
func groupRun(c *cobra.Command, args []string) error {
	if len(args) == 0 {
		return c.Help()
	}
	msg := fmt.Sprintf("unknown command %q for %q", args[0], c.CommandPath())
	if c.SuggestionsMinimumDistance <= 0 {
		c.SuggestionsMinimumDistance = 2
	}
	if s := c.SuggestionsFor(args[0]); len(s) > 0 {
		msg += fmt.Sprintf(" (did you mean %q?)", s[0])
	}
	return usageErr(c, errors.New(msg))
}

// usageError is a command line mistake: exit code 2 and a pointer to help.
type usageError struct {
	err  error
	path string // command path, for the help hint
}

func (e *usageError) Error() string { return e.err.Error() }
func (e *usageError) Unwrap() error { return e.err }

func usageErr(c *cobra.Command, err error) error {
	var ue *usageError
	if errors.As(err, &ue) {
		return err
	}
	return &usageError{err: err, path: c.CommandPath()}
}

func usagef(c *cobra.Command, format string, args ...any) error {
	return usageErr(c, fmt.Errorf(format, args...))
}

// checkArgs wraps a positional-argument validator so that its failures are
// usage errors.
func checkArgs(v cobra.PositionalArgs) cobra.PositionalArgs {
	return func(c *cobra.Command, args []string) error {
		if err := v(c, args); err != nil {
			return usageErr(c, err)
		}
		return nil
	}
}

// lines joins lines with newlines, for long help texts.
func lines(l ...string) string { return strings.Join(l, "\n") }
