package main

import (
	"fmt"
	"strconv"
	"strings"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
)

// Defaults of an event source mapping, as the gateway applies them to
// unset fields; shown next to unset values.
const (
	defaultBatchSize = 10
	defaultWindow    = 0
	// reportBatchItemFailures is the one function response type.
	reportBatchItemFailures = "ReportBatchItemFailures"
)

func (a *app) esmCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "esm",
		Short: "Map queues to functions (event source mappings)",
		Long: lines(
			"An event source mapping polls a queue and invokes a function with batches of",
			"its messages, in the event shape of SQS's Lambda integration. Messages of a",
			"batch the function handled are deleted; those of a failed batch come back",
			"after the visibility timeout (and reach the queue's dead-letter queue after",
			"its maximum receives). With --report-batch-item-failures the function may",
			`return {"batchItemFailures":[{"itemIdentifier":"<messageId>"}]} so that only`,
			"those messages come back."),
		Args: cobra.ArbitraryArgs,
		RunE: groupRun,
		// A group: its usage line has no flags of its own.
		DisableFlagsInUseLine: true,
	}
	c.AddCommand(a.esmCreateCmd(), a.esmListCmd(), a.esmGetCmd(), a.esmUpdateCmd(), a.esmDeleteCmd())
	return c
}

// mappingFlags are the settings of a mapping that create and update share.
type mappingFlags struct {
	function                         string
	batchSize, window, maxConcurrent int32
	reportFailures                   bool
}

func (f *mappingFlags) register(c *cobra.Command) {
	fl := c.Flags()
	fl.StringVar(&f.function, "function", "", "the function to invoke")
	fl.Int32Var(&f.batchSize, "batch-size", 0, "most messages per invocation, 1-10000; over 10 needs a --window (default 10)")
	fl.Int32Var(&f.window, "window", 0, "seconds to gather a batch, 0-300 (default 0)")
	fl.Int32Var(&f.maxConcurrent, "max-concurrency", 0, "most concurrent invocations, 2-1000; 0 means no limit beyond the function's (default)")
	fl.BoolVar(&f.reportFailures, "report-batch-item-failures", false, "the function reports failed messages (ReportBatchItemFailures); only those come back")
}

// apply sets on m the settings whose flags were given and returns their
// update_mask field names.
func (f *mappingFlags) apply(c *cobra.Command, m *skiffv1.EventSourceMapping) []string {
	var mask []string
	fl := c.Flags()
	if fl.Changed("function") {
		m.FunctionName = f.function
		mask = append(mask, "function_name")
	}
	if fl.Changed("batch-size") {
		m.BatchSize = &f.batchSize
		mask = append(mask, "batch_size")
	}
	if fl.Changed("window") {
		m.MaximumBatchingWindowSeconds = &f.window
		mask = append(mask, "maximum_batching_window_seconds")
	}
	if fl.Changed("max-concurrency") {
		// 0 is no limit: the field unset.
		if f.maxConcurrent != 0 {
			m.MaximumConcurrency = &f.maxConcurrent
		}
		mask = append(mask, "maximum_concurrency")
	}
	if fl.Changed("report-batch-item-failures") {
		if f.reportFailures {
			m.FunctionResponseTypes = []string{reportBatchItemFailures}
		}
		mask = append(mask, "function_response_types")
	}
	return mask
}

func (a *app) esmCreateCmd() *cobra.Command {
	var (
		f        mappingFlags
		queue    string
		disabled bool
	)
	c := &cobra.Command{
		Use:   "create --queue QUEUE --function NAME [flags]",
		Short: "Map a queue to a function",
		Example: lines(
			"  skiff esm create --queue jobs --function worker",
			"  skiff esm create --queue jobs --function worker --batch-size 100 --window 5 --max-concurrency 5 --report-batch-item-failures"),
		Args: checkArgs(cobra.NoArgs),
		RunE: func(c *cobra.Command, _ []string) error {
			switch {
			case queue == "":
				return usagef(c, "--queue is required")
			case f.function == "":
				return usagef(c, "--function is required")
			}
			m := &skiffv1.EventSourceMapping{Queue: strings.TrimPrefix(queue, "queue:")}
			f.apply(c, m)
			if disabled {
				enabled := false
				m.Enabled = &enabled
			}
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.esm.CreateEventSourceMapping(c.Context(), connect.NewRequest(&skiffv1.CreateEventSourceMappingRequest{Mapping: m}))
			if err != nil {
				return err
			}
			return a.writeMapping(resp.Msg.GetMapping())
		},
	}
	f.register(c)
	c.Flags().StringVar(&queue, "queue", "", "the queue to poll")
	c.Flags().BoolVar(&disabled, "disabled", false, "create the mapping disabled (no polling until it is enabled)")
	return c
}

func (a *app) esmUpdateCmd() *cobra.Command {
	var (
		f                 mappingFlags
		enabled, disabled bool
	)
	c := &cobra.Command{
		Use:   "update UUID [flags]",
		Short: "Change a mapping (only the flags given)",
		Long: lines(
			"Change the settings of a mapping whose flags are given (sent as the",
			"update_mask). --max-concurrency 0 removes the limit;",
			"--report-batch-item-failures=false turns reporting off. The queue of a",
			"mapping cannot change: delete it and create another."),
		Example: lines(
			"  skiff esm update 6f1c… --batch-size 50 --window 2",
			"  skiff esm update 6f1c… --disabled",
			"  skiff esm update 6f1c… --enabled --max-concurrency 0"),
		Args: checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			m := &skiffv1.EventSourceMapping{}
			mask := f.apply(c, m)
			fl := c.Flags()
			switch {
			case fl.Changed("enabled") && fl.Changed("disabled"):
				return usagef(c, "--enabled and --disabled cannot be used together")
			case fl.Changed("enabled"):
				m.Enabled = &enabled
				mask = append(mask, "enabled")
			case fl.Changed("disabled"):
				on := !disabled
				m.Enabled = &on
				mask = append(mask, "enabled")
			}
			if len(mask) == 0 {
				return usagef(c, "nothing to update: give at least one of --function, --batch-size, --window, --max-concurrency, --report-batch-item-failures, --enabled, --disabled")
			}
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.esm.UpdateEventSourceMapping(c.Context(), connect.NewRequest(&skiffv1.UpdateEventSourceMappingRequest{
				Uuid: args[0], Mapping: m, UpdateMask: mask,
			}))
			if err != nil {
				return err
			}
			return a.writeMapping(resp.Msg.GetMapping())
		},
	}
	f.register(c)
	c.Flags().BoolVar(&enabled, "enabled", false, "enable the mapping (start polling)")
	c.Flags().BoolVar(&disabled, "disabled", false, "disable the mapping (stop polling)")
	return c
}

func (a *app) esmListCmd() *cobra.Command {
	var function, queue string
	c := &cobra.Command{
		Use:     "list [--function NAME] [--queue QUEUE]",
		Short:   "List event source mappings",
		Example: "  skiff esm list --function worker",
		Args:    checkArgs(cobra.NoArgs),
		RunE: func(c *cobra.Command, _ []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.esm.ListEventSourceMappings(c.Context(), connect.NewRequest(&skiffv1.ListEventSourceMappingsRequest{
				FunctionName: function, Queue: strings.TrimPrefix(queue, "queue:"),
			}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			t := newTable(a.stdout)
			t.row("UUID", "QUEUE", "FUNCTION", "STATE", "BATCH", "WINDOW", "CONCURRENCY", "LAST MODIFIED")
			for _, m := range resp.Msg.GetMappings() {
				t.row(m.GetUuid(), m.GetQueue(), m.GetFunctionName(), mappingState(m),
					strconv.Itoa(int(optInt(m.BatchSize, defaultBatchSize))),
					strconv.Itoa(int(optInt(m.MaximumBatchingWindowSeconds, defaultWindow)))+"s",
					maxConcurrency(m), m.GetLastModified())
			}
			return t.flush()
		},
	}
	c.Flags().StringVar(&function, "function", "", "only the mappings of this function")
	c.Flags().StringVar(&queue, "queue", "", "only the mappings of this queue")
	return c
}

func (a *app) esmGetCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "get UUID",
		Short: "Show an event source mapping",
		Args:  checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.esm.GetEventSourceMapping(c.Context(), connect.NewRequest(&skiffv1.GetEventSourceMappingRequest{Uuid: args[0]}))
			if err != nil {
				return err
			}
			return a.writeMapping(resp.Msg.GetMapping())
		},
	}
}

func (a *app) esmDeleteCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "delete UUID",
		Short: "Delete an event source mapping (its pollers stop)",
		Args:  checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.esm.DeleteEventSourceMapping(c.Context(), connect.NewRequest(&skiffv1.DeleteEventSourceMappingRequest{Uuid: args[0]}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			_, err = fmt.Fprintf(a.stdout, "deleted event source mapping %s\n", args[0])
			return err
		},
	}
}

// writeMapping prints one mapping: JSON, or a field per line with the
// defaults of unset settings.
func (a *app) writeMapping(m *skiffv1.EventSourceMapping) error {
	if a.json() {
		return writeJSON(a.stdout, m)
	}
	size := strconv.Itoa(defaultBatchSize) + " (default)"
	if m.BatchSize != nil {
		size = strconv.Itoa(int(m.GetBatchSize()))
	}
	t := newTable(a.stdout)
	t.row("UUID:", m.GetUuid())
	t.row("Queue:", m.GetQueue())
	t.row("Function:", m.GetFunctionName())
	t.row("State:", mappingState(m))
	t.row("Batch size:", size)
	t.row("Batching window:", optSeconds(m.MaximumBatchingWindowSeconds, defaultWindow))
	t.row("Maximum concurrency:", maxConcurrency(m))
	t.row("Response types:", orDash(strings.Join(m.GetFunctionResponseTypes(), ",")))
	t.row("Last modified:", m.GetLastModified())
	t.row("Revision:", strconv.FormatUint(m.GetRevision(), 10))
	return t.flush()
}

// mappingState is the state the gateway reports, else what enabled says.
func mappingState(m *skiffv1.EventSourceMapping) string {
	switch {
	case m.GetState() != "":
		return m.GetState()
	case m.Enabled != nil && !m.GetEnabled():
		return "Disabled"
	}
	return "Enabled"
}

func maxConcurrency(m *skiffv1.EventSourceMapping) string {
	if m.MaximumConcurrency == nil {
		return "-"
	}
	return strconv.Itoa(int(m.GetMaximumConcurrency()))
}
