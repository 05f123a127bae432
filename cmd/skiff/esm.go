package main

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
)

// Defaults of an event source mapping, as the gateway applies them to
// unset fields; shown next to unset values.
const (
	defaultBatchSize       = 10
	defaultStreamBatchSize = 100
	defaultWindow          = 0
	defaultParallelization = 1
	// Unset retry attempts and record age of a stream mapping mean no limit.
	defaultStreamRetries   = -1
	defaultStreamRecordAge = -1
	// reportBatchItemFailures is the one function response type.
	reportBatchItemFailures = "ReportBatchItemFailures"
)

func (a *app) esmCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "esm",
		Short: "Map queues and streams to functions (event source mappings)",
		Long: lines(
			"An event source mapping polls a queue and invokes a function with batches of",
			"its messages, in the event shape of SQS's Lambda integration. Messages of a",
			"batch the function handled are deleted; those of a failed batch come back",
			"after the visibility timeout (and reach the queue's dead-letter queue after",
			"its maximum receives). With --report-batch-item-failures the function may",
			`return {"batchItemFailures":[{"itemIdentifier":"<messageId>"}]} so that only`,
			"those messages come back.",
			"",
			"A mapping of a stream (--stream) reads every shard in order, in the event",
			"shape of Kinesis's Lambda integration, and moves on only after a batch",
			"succeeded: a failed batch is retried (split in halves with --bisect) until",
			"--max-retries or --max-record-age runs out, then its metadata goes to",
			"--on-failure and the shard moves past it."),
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

	// Stream mappings only.
	parallelization, maxRetries, maxRecordAge, tumbling int32
	bisect                                              bool
	onFailure                                           string
}

// streamOnlyFlags are the flags of settings only stream mappings have.
var streamOnlyFlags = []string{"parallelization-factor", "bisect", "max-retries", "max-record-age", "on-failure", "tumbling-window"}

func (f *mappingFlags) register(c *cobra.Command) {
	fl := c.Flags()
	fl.StringVar(&f.function, "function", "", "the function to invoke")
	fl.Int32Var(&f.batchSize, "batch-size", 0, "most messages or records per invocation, 1-10000; over 10 from a queue needs a --window (default 10 for queues, 100 for streams)")
	fl.Int32Var(&f.window, "window", 0, "seconds to gather a batch, 0-300 (default 0)")
	fl.Int32Var(&f.maxConcurrent, "max-concurrency", 0, "queues: most concurrent invocations, 2-1000; 0 means no limit beyond the function's (default)")
	fl.BoolVar(&f.reportFailures, "report-batch-item-failures", false, "the function reports failed items (ReportBatchItemFailures); only those come back (streams: the shard resumes at the first)")
	fl.Int32Var(&f.parallelization, "parallelization-factor", 0, "streams: concurrent batches per shard, 1-10, order kept per partition key (default 1)")
	fl.BoolVar(&f.bisect, "bisect", false, "streams: split a failed batch in halves and retry each")
	fl.Int32Var(&f.maxRetries, "max-retries", 0, "streams: retries of a failed batch, -1 (no limit) to 10000 (default -1)")
	fl.Int32Var(&f.maxRecordAge, "max-record-age", 0, "streams: seconds after which records are skipped, -1 (no limit) or 60-604800 (default -1)")
	fl.StringVar(&f.onFailure, "on-failure", "", "streams: where a skipped batch's metadata goes: queue:NAME or an http(s) URL")
	fl.Int32Var(&f.tumbling, "tumbling-window", 0, "streams: seconds of a tumbling window whose state passes between invocations, 0-900 (default 0: none)")
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
	if fl.Changed("parallelization-factor") {
		m.ParallelizationFactor = &f.parallelization
		mask = append(mask, "parallelization_factor")
	}
	if fl.Changed("bisect") {
		m.BisectBatchOnFunctionError = f.bisect
		mask = append(mask, "bisect_batch_on_function_error")
	}
	if fl.Changed("max-retries") {
		m.MaximumRetryAttempts = &f.maxRetries
		mask = append(mask, "maximum_retry_attempts")
	}
	if fl.Changed("max-record-age") {
		m.MaximumRecordAgeSeconds = &f.maxRecordAge
		mask = append(mask, "maximum_record_age_seconds")
	}
	if fl.Changed("on-failure") {
		m.OnFailure = f.onFailure
		mask = append(mask, "on_failure")
	}
	if fl.Changed("tumbling-window") {
		m.TumblingWindowSeconds = f.tumbling
		mask = append(mask, "tumbling_window_seconds")
	}
	return mask
}

// startingPositions are the --starting-position values and the API's.
var startingPositions = map[string]string{
	"trim-horizon": "TRIM_HORIZON",
	"latest":       "LATEST",
	"at-timestamp": "AT_TIMESTAMP",
}

func (a *app) esmCreateCmd() *cobra.Command {
	var (
		f                 mappingFlags
		queue, stream     string
		position, startTS string
		disabled          bool
	)
	c := &cobra.Command{
		Use:   "create (--queue QUEUE | --stream STREAM --starting-position P) --function NAME [flags]",
		Short: "Map a queue or a stream to a function",
		Long: lines(
			"Map a queue (--queue) or a stream (--stream) to a function. A stream mapping",
			"needs --starting-position: trim-horizon (the oldest record kept), latest (records",
			"put from now on) or at-timestamp with --starting-timestamp (RFC 3339). The flags",
			"marked \"streams:\" are for stream mappings, --max-concurrency for queue mappings."),
		Example: lines(
			"  skiff esm create --queue jobs --function worker",
			"  skiff esm create --queue jobs --function worker --batch-size 100 --window 5 --max-concurrency 5 --report-batch-item-failures",
			"  skiff esm create --stream clicks --function counter --starting-position latest",
			"  skiff esm create --stream clicks --function counter --starting-position trim-horizon --batch-size 500 \\",
			"      --parallelization-factor 4 --bisect --max-retries 2 --max-record-age 3600 --on-failure queue:clicks-failed"),
		Args: checkArgs(cobra.NoArgs),
		RunE: func(c *cobra.Command, _ []string) error {
			fl := c.Flags()
			switch {
			case queue != "" && stream != "":
				return usagef(c, "--queue and --stream cannot be used together: a mapping has one source")
			case queue == "" && stream == "":
				return usagef(c, "--queue or --stream is required")
			case f.function == "":
				return usagef(c, "--function is required")
			}
			m := &skiffv1.EventSourceMapping{}
			if queue != "" {
				for _, name := range append([]string{"starting-position", "starting-timestamp"}, streamOnlyFlags...) {
					if fl.Changed(name) {
						return usagef(c, "--%s is for stream mappings (--stream), not queues", name)
					}
				}
				m.Queue = strings.TrimPrefix(queue, "queue:")
			} else {
				if fl.Changed("max-concurrency") {
					return usagef(c, "--max-concurrency is for queue mappings: a stream mapping's concurrency is its shards times --parallelization-factor")
				}
				// The API's spelling (TRIM_HORIZON) works too.
				pos, ok := startingPositions[strings.ToLower(strings.ReplaceAll(position, "_", "-"))]
				switch {
				case position == "":
					return usagef(c, "--stream needs --starting-position: trim-horizon, latest or at-timestamp")
				case !ok:
					return usagef(c, "invalid --starting-position %q: want trim-horizon, latest or at-timestamp", position)
				case pos == "AT_TIMESTAMP" && startTS == "":
					return usagef(c, "--starting-position at-timestamp needs --starting-timestamp")
				case pos != "AT_TIMESTAMP" && fl.Changed("starting-timestamp"):
					return usagef(c, "--starting-timestamp needs --starting-position at-timestamp")
				}
				if startTS != "" {
					if _, err := time.Parse(time.RFC3339Nano, startTS); err != nil {
						return usagef(c, "invalid --starting-timestamp %q: want an RFC 3339 time such as 2026-11-27T10:00:00Z", startTS)
					}
				}
				m.Stream, m.StartingPosition, m.StartingPositionTimestamp = strings.TrimPrefix(stream, "stream:"), pos, startTS
			}
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
	c.Flags().StringVar(&stream, "stream", "", "the stream to read")
	c.Flags().StringVar(&position, "starting-position", "", "streams: where reading starts: trim-horizon, latest or at-timestamp (required with --stream)")
	c.Flags().StringVar(&startTS, "starting-timestamp", "", "streams: the RFC 3339 time for --starting-position at-timestamp")
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
			"--report-batch-item-failures=false turns reporting off; --bisect=false turns",
			"bisecting off; --on-failure '' removes the destination. The source (queue or",
			"stream) and the starting position of a mapping cannot change: delete it and",
			"create another."),
		Example: lines(
			"  skiff esm update 6f1c… --batch-size 50 --window 2",
			"  skiff esm update 6f1c… --max-retries 5 --bisect --on-failure https://example.com/hook",
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
				return usagef(c, "nothing to update: give at least one of --function, --batch-size, --window, --max-concurrency, --report-batch-item-failures, "+
					"--parallelization-factor, --bisect, --max-retries, --max-record-age, --on-failure, --tumbling-window, --enabled, --disabled")
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
	var function, queue, stream string
	c := &cobra.Command{
		Use:     "list [--function NAME] [--queue QUEUE | --stream STREAM]",
		Short:   "List event source mappings",
		Example: "  skiff esm list --function worker",
		Args:    checkArgs(cobra.NoArgs),
		RunE: func(c *cobra.Command, _ []string) error {
			if queue != "" && stream != "" {
				return usagef(c, "--queue and --stream cannot be used together")
			}
			stream = strings.TrimPrefix(stream, "stream:")
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
			if stream != "" {
				// The API filters by queue only: filter by stream here.
				var ms []*skiffv1.EventSourceMapping
				for _, m := range resp.Msg.GetMappings() {
					if m.GetStream() == stream {
						ms = append(ms, m)
					}
				}
				resp.Msg.Mappings = ms
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			t := newTable(a.stdout)
			t.row("UUID", "SOURCE", "FUNCTION", "STATE", "BATCH", "WINDOW", "CONCURRENCY", "LAST MODIFIED")
			for _, m := range resp.Msg.GetMappings() {
				t.row(m.GetUuid(), mappingSource(m), m.GetFunctionName(), mappingState(m),
					strconv.Itoa(int(optInt(m.BatchSize, batchSizeDefault(m)))),
					strconv.Itoa(int(optInt(m.MaximumBatchingWindowSeconds, defaultWindow)))+"s",
					mappingConcurrency(m), m.GetLastModified())
			}
			return t.flush()
		},
	}
	c.Flags().StringVar(&function, "function", "", "only the mappings of this function")
	c.Flags().StringVar(&queue, "queue", "", "only the mappings of this queue")
	c.Flags().StringVar(&stream, "stream", "", "only the mappings of this stream")
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
	size := strconv.Itoa(int(batchSizeDefault(m))) + " (default)"
	if m.BatchSize != nil {
		size = strconv.Itoa(int(m.GetBatchSize()))
	}
	t := newTable(a.stdout)
	t.row("UUID:", m.GetUuid())
	if m.GetStream() != "" {
		t.row("Stream:", m.GetStream())
	} else {
		t.row("Queue:", m.GetQueue())
	}
	t.row("Function:", m.GetFunctionName())
	t.row("State:", mappingState(m))
	t.row("Batch size:", size)
	t.row("Batching window:", optSeconds(m.MaximumBatchingWindowSeconds, defaultWindow))
	if m.GetStream() != "" {
		pos := m.GetStartingPosition()
		if m.GetStartingPositionTimestamp() != "" {
			pos += " " + m.GetStartingPositionTimestamp()
		}
		t.row("Starting position:", pos)
		t.row("Parallelization factor:", optCount(m.ParallelizationFactor, defaultParallelization))
		t.row("Bisect on function error:", strconv.FormatBool(m.GetBisectBatchOnFunctionError()))
		t.row("Maximum retry attempts:", optLimit(m.MaximumRetryAttempts, defaultStreamRetries, ""))
		t.row("Maximum record age:", optLimit(m.MaximumRecordAgeSeconds, defaultStreamRecordAge, " s"))
		t.row("On failure:", orDash(m.GetOnFailure()))
		tumbling := "none"
		if m.GetTumblingWindowSeconds() != 0 {
			tumbling = strconv.Itoa(int(m.GetTumblingWindowSeconds())) + " s"
		}
		t.row("Tumbling window:", tumbling)
	} else {
		t.row("Maximum concurrency:", maxConcurrency(m))
	}
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

// mappingSource is a mapping's source as a target: queue:NAME or
// stream:NAME.
func mappingSource(m *skiffv1.EventSourceMapping) string {
	if m.GetStream() != "" {
		return "stream:" + m.GetStream()
	}
	return "queue:" + m.GetQueue()
}

// batchSizeDefault is the batch size the gateway applies when it is unset.
func batchSizeDefault(m *skiffv1.EventSourceMapping) int32 {
	if m.GetStream() != "" {
		return defaultStreamBatchSize
	}
	return defaultBatchSize
}

// mappingConcurrency is the concurrency column of a mapping: a queue
// mapping's maximum, a stream mapping's batches per shard.
func mappingConcurrency(m *skiffv1.EventSourceMapping) string {
	if m.GetStream() != "" {
		return strconv.Itoa(int(optInt(m.ParallelizationFactor, defaultParallelization))) + "/shard"
	}
	return maxConcurrency(m)
}

// optCount renders an optional count, naming the default when it is unset.
func optCount(p *int32, def int32) string {
	if p == nil {
		return strconv.Itoa(int(def)) + " (default)"
	}
	return strconv.Itoa(int(*p))
}

// optLimit renders an optional limit where -1 means none, naming the
// default when it is unset.
func optLimit(p *int32, def int32, unit string) string {
	v, suffix := def, " (default)"
	if p != nil {
		v, suffix = *p, ""
	}
	if v == -1 {
		return "no limit" + suffix
	}
	return strconv.Itoa(int(v)) + unit + suffix
}

func maxConcurrency(m *skiffv1.EventSourceMapping) string {
	if m.MaximumConcurrency == nil {
		return "-"
	}
	return strconv.Itoa(int(m.GetMaximumConcurrency()))
}
