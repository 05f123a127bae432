package main

import (
	"fmt"
	"strconv"
	"strings"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
)

// Defaults of an event invoke config, as the gateway applies them to unset
// fields; shown next to unset values.
const (
	defaultMaxRetries = 2
	defaultMaxAge     = 21600
)

func (a *app) fnEventConfigCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "event-config",
		Short: "Set how asynchronous invocations of a function are retried and where their outcomes go",
		Long: lines(
			"The event invoke config of a function governs its asynchronous invocations",
			"(skiff invoke --async, function destinations): how often a failed event is",
			"retried, how old an event may get before it is given up, and where records",
			"of successes and failures are sent."),
		Args: cobra.ArbitraryArgs,
		RunE: groupRun,
		// A group: its usage line has no flags of its own.
		DisableFlagsInUseLine: true,
	}
	c.AddCommand(a.eventConfigPutCmd(), a.eventConfigGetCmd(), a.eventConfigDeleteCmd())
	return c
}

func (a *app) eventConfigPutCmd() *cobra.Command {
	var (
		maxRetries, maxAge        int32
		onSuccess, onFailure, dlq string
	)
	c := &cobra.Command{
		Use:   "put NAME [flags]",
		Short: "Set a function's event invoke config (replacing the whole config)",
		Long: lines(
			"Set the event invoke config of a function. The config is replaced as a whole:",
			"a flag not given takes its default (2 retries, a maximum age of 21600 s, no",
			"destination). Destinations must exist; TARGET is queue:NAME, function:NAME",
			"or an http(s) URL (a webhook, sent a signed POST).",
			"",
			"A failed event goes to --on-failure; without it, its original payload goes to",
			"the dead-letter queue --dlq; without either it is dropped (and counted)."),
		Example: lines(
			"  skiff fn event-config put resize --max-retries 1 --on-failure queue:resize-failed",
			"  skiff fn event-config put resize --max-age 3600 --on-success https://example.com/hook",
			"  skiff fn event-config put resize --max-retries 0 --dlq queue:resize-dlq"),
		Args: checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			cfg := &skiffv1.EventInvokeConfig{OnSuccess: onSuccess, OnFailure: onFailure}
			if c.Flags().Changed("max-retries") {
				cfg.MaximumRetryAttempts = &maxRetries
			}
			if c.Flags().Changed("max-age") {
				cfg.MaximumEventAgeSeconds = &maxAge
			}
			if dlq != "" {
				// A bare name is a queue: the only kind of dead-letter target.
				if !strings.Contains(dlq, ":") {
					dlq = "queue:" + dlq
				}
				cfg.DeadLetterQueue = dlq
			}
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.fn.PutFunctionEventInvokeConfig(c.Context(), connect.NewRequest(&skiffv1.PutFunctionEventInvokeConfigRequest{
				FunctionName: args[0], Config: cfg,
			}))
			if err != nil {
				return err
			}
			return a.writeEventConfig(args[0], resp.Msg.GetConfig())
		},
	}
	fl := c.Flags()
	fl.Int32Var(&maxRetries, "max-retries", 0, "retries of an event whose invocation failed, 0-2 (default 2)")
	fl.Int32Var(&maxAge, "max-age", 0, "maximum age of an event in seconds, 60-21600 (default 21600)")
	fl.StringVar(&onSuccess, "on-success", "", "where to send a record of each success: queue:NAME, function:NAME or an http(s) URL")
	fl.StringVar(&onFailure, "on-failure", "", "where to send a record of each failure: queue:NAME, function:NAME or an http(s) URL")
	fl.StringVar(&dlq, "dlq", "", "dead-letter queue (queue:NAME) for the payloads of failed events, when --on-failure is not set")
	return c
}

func (a *app) eventConfigGetCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "get NAME",
		Short:   "Show a function's event invoke config",
		Example: "  skiff fn event-config get resize -o json",
		Args:    checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.fn.GetFunctionEventInvokeConfig(c.Context(), connect.NewRequest(&skiffv1.GetFunctionEventInvokeConfigRequest{
				FunctionName: args[0],
			}))
			if err != nil {
				return err
			}
			return a.writeEventConfig(args[0], resp.Msg.GetConfig())
		},
	}
}

func (a *app) eventConfigDeleteCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a function's event invoke config (back to the defaults)",
		Args:  checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.fn.DeleteFunctionEventInvokeConfig(c.Context(), connect.NewRequest(&skiffv1.DeleteFunctionEventInvokeConfigRequest{
				FunctionName: args[0],
			}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			_, err = fmt.Fprintf(a.stdout, "deleted the event invoke config of %s\n", args[0])
			return err
		},
	}
}

// writeEventConfig prints an event invoke config: JSON, or a field per line
// with the defaults of unset fields spelled out.
func (a *app) writeEventConfig(function string, cfg *skiffv1.EventInvokeConfig) error {
	if a.json() {
		return writeJSON(a.stdout, cfg)
	}
	retries := strconv.Itoa(defaultMaxRetries) + " (default)"
	if cfg.MaximumRetryAttempts != nil {
		retries = strconv.Itoa(int(cfg.GetMaximumRetryAttempts()))
	}
	age := strconv.Itoa(defaultMaxAge) + " s (default)"
	if cfg.MaximumEventAgeSeconds != nil {
		age = strconv.Itoa(int(cfg.GetMaximumEventAgeSeconds())) + " s"
	}
	t := newTable(a.stdout)
	t.row("Function:", function)
	t.row("Maximum retry attempts:", retries)
	t.row("Maximum event age:", age)
	t.row("On success:", orDash(cfg.GetOnSuccess()))
	t.row("On failure:", orDash(cfg.GetOnFailure()))
	t.row("Dead-letter queue:", orDash(cfg.GetDeadLetterQueue()))
	if cfg.GetLastModified() != "" {
		t.row("Last modified:", cfg.GetLastModified())
	}
	return t.flush()
}

// orDash is s, or "-" when it is empty.
func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
