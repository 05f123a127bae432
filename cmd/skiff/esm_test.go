package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/testing/protocmp"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

func TestESMCreate(t *testing.T) {
	off := false
	tests := []struct {
		name string
		args []string
		want *skiffv1.EventSourceMapping
	}{
		{"defaults", nil, &skiffv1.EventSourceMapping{Queue: "jobs", FunctionName: "worker"}},
		{
			"every setting",
			[]string{"--batch-size", "100", "--window", "5", "--max-concurrency", "4", "--report-batch-item-failures", "--disabled"},
			&skiffv1.EventSourceMapping{Queue: "jobs", FunctionName: "worker", BatchSize: i32(100), MaximumBatchingWindowSeconds: i32(5),
				MaximumConcurrency: i32(4), FunctionResponseTypes: []string{"ReportBatchItemFailures"}, Enabled: &off},
		},
		// An explicit zero window is sent; a zero concurrency means no limit.
		{"zeros", []string{"--window", "0", "--max-concurrency", "0"}, &skiffv1.EventSourceMapping{Queue: "jobs", FunctionName: "worker", MaximumBatchingWindowSeconds: i32(0)}},
	}
	for _, tt := range tests {
		for _, proto := range protocols {
			t.Run(tt.name+"/"+proto, func(t *testing.T) {
				s := newFakeServer(t)
				r := newCLI(t, s).run(append([]string{"--protocol", proto, "esm", "create", "--queue", "jobs", "--function", "worker"}, tt.args...)...)
				if r.code != 0 {
					t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
				}
				_, h, msg := s.esm.last(t)
				if d := cmp.Diff(&skiffv1.CreateEventSourceMappingRequest{Mapping: tt.want}, msg, protocmp.Transform()); d != "" {
					t.Errorf("request (-want +got):\n%s", d)
				}
				if h.Get("Authorization") != "Bearer test-key" {
					t.Errorf("Authorization = %q, want Bearer test-key", h.Get("Authorization"))
				}
				if !strings.Contains(r.stdout, "uuid-1") {
					t.Errorf("stdout lacks the new mapping's uuid:\n%s", r.stdout)
				}
			})
		}
	}
}

func TestESMCreateOutput(t *testing.T) {
	s := newFakeServer(t)
	c := newCLI(t, s)
	r := c.run("esm", "create", "--queue", "queue:jobs", "--function", "worker")
	if r.code != 0 {
		t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
	}
	if _, _, msg := s.esm.last(t); msg.(*skiffv1.CreateEventSourceMappingRequest).GetMapping().GetQueue() != "jobs" {
		t.Errorf("queue %q, want jobs without the queue: prefix", msg.(*skiffv1.CreateEventSourceMappingRequest).GetMapping().GetQueue())
	}
	checkFields(t, r.stdout, map[string]string{
		"UUID:":                "uuid-1",
		"Queue:":               "jobs",
		"Function:":            "worker",
		"State:":               "Enabled",
		"Batch size:":          "10 (default)",
		"Batching window:":     "0 s (default)",
		"Maximum concurrency:": "-",
		"Response types:":      "-",
		"Last modified:":       "2026-01-05T00:00:00Z",
		"Revision:":            "1",
	})
	r = c.run("esm", "create", "--queue", "jobs", "--function", "worker", "--disabled", "-o", "json")
	var out struct {
		UUID    string `json:"uuid"`
		Enabled *bool  `json:"enabled"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil || out.UUID != "uuid-1" || out.Enabled == nil || *out.Enabled {
		t.Errorf("json output %q (err %v), want uuid-1 and enabled false", r.stdout, err)
	}
}

func TestESMCreateErrors(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"esm", "create", "--function", "worker"}, "--queue or --stream is required"},
		{[]string{"esm", "create", "--queue", "jobs"}, "--function is required"},
		{[]string{"esm", "create", "extra", "--queue", "jobs", "--function", "worker"}, "unknown command"},
		{[]string{"esm", "create", "--queue", "jobs", "--function", "worker", "--batch-size", "many"}, "invalid argument"},
	} {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			s := newFakeServer(t)
			r := newCLI(t, s).run(tt.args...)
			if r.code != exitUsage || !strings.Contains(r.stderr, tt.want) {
				t.Errorf("exit %d, stderr %q; want %d and %q", r.code, r.stderr, exitUsage, tt.want)
			}
			if s.esm.count() != 0 {
				t.Errorf("the server got a call, want none")
			}
		})
	}
	t.Run("server", func(t *testing.T) {
		s := newFakeServer(t)
		s.esm.fail = errs.Invalid("mapping.batch_size", "batch size 100 needs a batching window: without one it is at most 10")
		r := newCLI(t, s).run("esm", "create", "--queue", "jobs", "--function", "worker", "--batch-size", "100")
		want := "skiff: batch size 100 needs a batching window: without one it is at most 10 (reason: invalid_mapping.batch_size, field: mapping.batch_size)\n"
		if r.code != 1 || r.stderr != want {
			t.Errorf("got exit %d, stderr %q; want 1, %q", r.code, r.stderr, want)
		}
	})
}

func TestESMUpdateMask(t *testing.T) {
	on, off := true, false
	tests := []struct {
		name     string
		args     []string
		wantMask []string
		want     *skiffv1.EventSourceMapping
	}{
		{"batch", []string{"--batch-size", "50", "--window", "2"}, []string{"batch_size", "maximum_batching_window_seconds"},
			&skiffv1.EventSourceMapping{BatchSize: i32(50), MaximumBatchingWindowSeconds: i32(2)}},
		{"function", []string{"--function", "worker2"}, []string{"function_name"}, &skiffv1.EventSourceMapping{FunctionName: "worker2"}},
		{"concurrency", []string{"--max-concurrency", "10"}, []string{"maximum_concurrency"}, &skiffv1.EventSourceMapping{MaximumConcurrency: i32(10)}},
		{"no concurrency limit", []string{"--max-concurrency", "0"}, []string{"maximum_concurrency"}, &skiffv1.EventSourceMapping{}},
		{"report failures", []string{"--report-batch-item-failures"}, []string{"function_response_types"},
			&skiffv1.EventSourceMapping{FunctionResponseTypes: []string{"ReportBatchItemFailures"}}},
		{"stop reporting failures", []string{"--report-batch-item-failures=false"}, []string{"function_response_types"}, &skiffv1.EventSourceMapping{}},
		{"disable", []string{"--disabled"}, []string{"enabled"}, &skiffv1.EventSourceMapping{Enabled: &off}},
		{"enable", []string{"--enabled"}, []string{"enabled"}, &skiffv1.EventSourceMapping{Enabled: &on}},
		{"disabled=false", []string{"--disabled=false"}, []string{"enabled"}, &skiffv1.EventSourceMapping{Enabled: &on}},
	}
	for _, tt := range tests {
		for _, proto := range protocols {
			t.Run(tt.name+"/"+proto, func(t *testing.T) {
				s := newFakeServer(t)
				r := newCLI(t, s).run(append([]string{"--protocol", proto, "esm", "update", "uuid-9"}, tt.args...)...)
				if r.code != 0 {
					t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
				}
				_, _, msg := s.esm.last(t)
				want := &skiffv1.UpdateEventSourceMappingRequest{Uuid: "uuid-9", Mapping: tt.want, UpdateMask: tt.wantMask}
				if d := cmp.Diff(want, msg, protocmp.Transform()); d != "" {
					t.Errorf("request (-want +got):\n%s", d)
				}
				if !strings.Contains(r.stdout, "uuid-9") {
					t.Errorf("stdout lacks the mapping:\n%s", r.stdout)
				}
			})
		}
	}
	for _, tt := range []struct {
		args []string
		want string
	}{
		{nil, "nothing to update"},
		{[]string{"--enabled", "--disabled"}, "--enabled and --disabled cannot be used together"},
	} {
		s := newFakeServer(t)
		r := newCLI(t, s).run(append([]string{"esm", "update", "uuid-9"}, tt.args...)...)
		if r.code != exitUsage || !strings.Contains(r.stderr, tt.want) {
			t.Errorf("%v: exit %d, stderr %q; want %d and %q", tt.args, r.code, r.stderr, exitUsage, tt.want)
		}
		if s.esm.count() != 0 {
			t.Errorf("%v: the server got a call, want none", tt.args)
		}
	}
}

func TestESMGetListDelete(t *testing.T) {
	s := newFakeServer(t)
	s.esm.mappings = []*skiffv1.EventSourceMapping{
		{Uuid: "uuid-1", Queue: "jobs", FunctionName: "worker", State: "Enabled", LastModified: "2026-01-05T00:00:00Z"},
		{Uuid: "uuid-2", Queue: "orders.fifo", FunctionName: "billing", BatchSize: i32(500), MaximumBatchingWindowSeconds: i32(30),
			MaximumConcurrency: i32(8), State: "Disabled", LastModified: "2026-01-06T00:00:00Z"},
	}
	c := newCLI(t, s)

	r := c.run("esm", "get", "uuid-7")
	if r.code != 0 {
		t.Fatalf("get: exit code %d, want 0; stderr: %s", r.code, r.stderr)
	}
	checkFields(t, r.stdout, map[string]string{
		"UUID:":                "uuid-7",
		"Queue:":               "jobs",
		"Function:":            "worker",
		"State:":               "Disabled",
		"Batch size:":          "100",
		"Batching window:":     "0 s (default)",
		"Maximum concurrency:": "5",
		"Response types:":      "ReportBatchItemFailures",
		"Last modified:":       "2026-01-05T00:00:00Z",
		"Revision:":            "4",
	})
	if r := c.run("esm", "get", "missing"); r.code != 1 || !strings.Contains(r.stderr, `event source mapping "missing" not found (reason: not_found)`) {
		t.Errorf("get missing: exit %d, stderr %q", r.code, r.stderr)
	}

	r = c.run("esm", "list", "--function", "worker", "--queue", "jobs")
	if _, _, msg := s.esm.last(t); !cmp.Equal(&skiffv1.ListEventSourceMappingsRequest{FunctionName: "worker", Queue: "jobs"}, msg, protocmp.Transform()) {
		t.Errorf("list request %v, want the filters", msg)
	}
	lines := strings.Split(strings.TrimSuffix(r.stdout, "\n"), "\n")
	if r.code != 0 || len(lines) != 3 {
		t.Fatalf("list: exit %d, stdout:\n%s", r.code, r.stdout)
	}
	for i, want := range [][]string{
		{"UUID", "SOURCE", "FUNCTION", "STATE", "BATCH", "WINDOW", "CONCURRENCY", "LAST", "MODIFIED"},
		{"uuid-1", "queue:jobs", "worker", "Enabled", "10", "0s", "-", "2026-01-05T00:00:00Z"},
		{"uuid-2", "queue:orders.fifo", "billing", "Disabled", "500", "30s", "8", "2026-01-06T00:00:00Z"},
	} {
		if d := cmp.Diff(want, strings.Fields(lines[i])); d != "" {
			t.Errorf("line %d (-want +got):\n%s", i, d)
		}
	}
	r = c.run("esm", "list", "-o", "json")
	var listed struct {
		Mappings []struct {
			UUID string `json:"uuid"`
		} `json:"mappings"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &listed); err != nil || len(listed.Mappings) != 2 || listed.Mappings[1].UUID != "uuid-2" {
		t.Errorf("list json %q (err %v), want both mappings", r.stdout, err)
	}

	for _, proto := range protocols {
		r = c.run("--protocol", proto, "esm", "delete", "uuid-1")
		if r.code != 0 || r.stdout != "deleted event source mapping uuid-1\n" {
			t.Errorf("%s: delete: exit %d, stdout %q, stderr %q", proto, r.code, r.stdout, r.stderr)
		}
		if proc, _, msg := s.esm.last(t); proc != "DeleteEventSourceMapping" || msg.(*skiffv1.DeleteEventSourceMappingRequest).GetUuid() != "uuid-1" {
			t.Errorf("%s: got %s %v, want DeleteEventSourceMapping of uuid-1", proto, proc, msg)
		}
	}
	if r := c.run("esm", "delete", "missing"); r.code != 1 || !strings.Contains(r.stderr, "not found") {
		t.Errorf("delete missing: exit %d, stderr %q", r.code, r.stderr)
	}
	for _, args := range [][]string{{"esm", "get"}, {"esm", "delete"}, {"esm", "update"}, {"esm", "list", "x"}, {"esm", "nope"}} {
		before := s.esm.count()
		if r := c.run(args...); r.code != exitUsage {
			t.Errorf("%v: exit %d, want %d; stderr %q", args, r.code, exitUsage, r.stderr)
		}
		if s.esm.count() != before {
			t.Errorf("%v: the server got a call, want none", args)
		}
	}
}

func TestAsyncCommandsHelp(t *testing.T) {
	c := newCLI(t, nil)
	for _, args := range [][]string{
		{"queue"}, {"esm"}, {"fn", "event-config"},
		{"queue", "receive", "--help"}, {"queue", "send", "--help"}, {"esm", "update", "--help"}, {"fn", "event-config", "put", "--help"},
	} {
		r := c.run(args...)
		if r.code != 0 || !strings.Contains(r.stdout, "Usage:") {
			t.Errorf("%v: exit %d, stdout %q; want 0 and usage", args, r.code, r.stdout)
		}
	}
	r := c.run("--help")
	for _, cmd := range []string{"queue", "esm"} {
		if !strings.Contains(r.stdout, "\n  "+cmd+" ") {
			t.Errorf("root help lacks %s:\n%s", cmd, r.stdout)
		}
	}
}

func TestESMCreateStream(t *testing.T) {
	off := false
	tests := []struct {
		name string
		args []string
		want *skiffv1.EventSourceMapping
	}{
		{"latest", []string{"--starting-position", "latest"}, &skiffv1.EventSourceMapping{Stream: "clicks", FunctionName: "counter", StartingPosition: "LATEST"}},
		{
			"every setting",
			[]string{"--starting-position", "at-timestamp", "--starting-timestamp", "2026-11-27T10:00:00Z", "--batch-size", "500", "--window", "2",
				"--parallelization-factor", "4", "--bisect", "--max-retries", "2", "--max-record-age", "3600", "--on-failure", "queue:clicks-failed",
				"--tumbling-window", "60", "--report-batch-item-failures", "--disabled"},
			&skiffv1.EventSourceMapping{Stream: "clicks", FunctionName: "counter", StartingPosition: "AT_TIMESTAMP",
				StartingPositionTimestamp: "2026-11-27T10:00:00Z", BatchSize: i32(500), MaximumBatchingWindowSeconds: i32(2),
				ParallelizationFactor: i32(4), BisectBatchOnFunctionError: true, MaximumRetryAttempts: i32(2), MaximumRecordAgeSeconds: i32(3600),
				OnFailure: "queue:clicks-failed", TumblingWindowSeconds: 60, FunctionResponseTypes: []string{"ReportBatchItemFailures"}, Enabled: &off},
		},
		// No limits are explicit -1s; the API's spelling of a position works too.
		{
			"no limits", []string{"--starting-position", "TRIM_HORIZON", "--max-retries", "-1", "--max-record-age", "-1"},
			&skiffv1.EventSourceMapping{Stream: "clicks", FunctionName: "counter", StartingPosition: "TRIM_HORIZON",
				MaximumRetryAttempts: i32(-1), MaximumRecordAgeSeconds: i32(-1)},
		},
	}
	for _, tt := range tests {
		for _, proto := range protocols {
			t.Run(tt.name+"/"+proto, func(t *testing.T) {
				s := newFakeServer(t)
				r := newCLI(t, s).run(append([]string{"--protocol", proto, "esm", "create", "--stream", "stream:clicks", "--function", "counter"}, tt.args...)...)
				if r.code != 0 {
					t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
				}
				_, _, msg := s.esm.last(t)
				if d := cmp.Diff(&skiffv1.CreateEventSourceMappingRequest{Mapping: tt.want}, msg, protocmp.Transform()); d != "" {
					t.Errorf("request (-want +got):\n%s", d)
				}
				if !strings.Contains(r.stdout, "uuid-1") {
					t.Errorf("stdout lacks the new mapping's uuid:\n%s", r.stdout)
				}
			})
		}
	}
}

func TestESMCreateStreamOutput(t *testing.T) {
	s := newFakeServer(t)
	r := newCLI(t, s).run("esm", "create", "--stream", "clicks", "--function", "counter", "--starting-position", "trim-horizon")
	if r.code != 0 {
		t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
	}
	checkFields(t, r.stdout, map[string]string{
		"UUID:":                     "uuid-1",
		"Stream:":                   "clicks",
		"Function:":                 "counter",
		"State:":                    "Enabled",
		"Batch size:":               "100 (default)",
		"Batching window:":          "0 s (default)",
		"Starting position:":        "TRIM_HORIZON",
		"Parallelization factor:":   "1 (default)",
		"Bisect on function error:": "false",
		"Maximum retry attempts:":   "no limit (default)",
		"Maximum record age:":       "no limit (default)",
		"On failure:":               "-",
		"Tumbling window:":          "none",
		"Response types:":           "-",
		"Revision:":                 "1",
	})
	for _, label := range []string{"Queue:", "Maximum concurrency:"} {
		if strings.Contains(r.stdout, label) {
			t.Errorf("a stream mapping shows %s:\n%s", label, r.stdout)
		}
	}
}

func TestESMCreateStreamErrors(t *testing.T) {
	base := []string{"esm", "create", "--function", "counter"}
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"--queue", "jobs", "--stream", "clicks", "--starting-position", "latest"}, "--queue and --stream cannot be used together"},
		{[]string{"--stream", "clicks"}, "--stream needs --starting-position"},
		{[]string{"--stream", "clicks", "--starting-position", "oldest"}, `invalid --starting-position "oldest"`},
		{[]string{"--stream", "clicks", "--starting-position", "at-timestamp"}, "--starting-position at-timestamp needs --starting-timestamp"},
		{[]string{"--stream", "clicks", "--starting-position", "latest", "--starting-timestamp", "2026-11-27T10:00:00Z"}, "--starting-timestamp needs --starting-position at-timestamp"},
		{[]string{"--stream", "clicks", "--starting-position", "at-timestamp", "--starting-timestamp", "noon"}, `invalid --starting-timestamp "noon"`},
		{[]string{"--stream", "clicks", "--starting-position", "latest", "--max-concurrency", "5"}, "--max-concurrency is for queue mappings"},
		{[]string{"--stream", "clicks", "--starting-position", "latest", "--max-retries", "few"}, "invalid argument"},
		{[]string{"--queue", "jobs", "--starting-position", "latest"}, "--starting-position is for stream mappings (--stream), not queues"},
		{[]string{"--queue", "jobs", "--bisect"}, "--bisect is for stream mappings"},
		{[]string{"--queue", "jobs", "--parallelization-factor", "2"}, "--parallelization-factor is for stream mappings"},
		{[]string{"--queue", "jobs", "--max-retries", "2"}, "--max-retries is for stream mappings"},
		{[]string{"--queue", "jobs", "--max-record-age", "60"}, "--max-record-age is for stream mappings"},
		{[]string{"--queue", "jobs", "--on-failure", "queue:x"}, "--on-failure is for stream mappings"},
		{[]string{"--queue", "jobs", "--tumbling-window", "60"}, "--tumbling-window is for stream mappings"},
	} {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			s := newFakeServer(t)
			r := newCLI(t, s).run(append(base, tt.args...)...)
			if r.code != exitUsage || !strings.Contains(r.stderr, tt.want) {
				t.Errorf("exit %d, stderr %q; want %d and %q", r.code, r.stderr, exitUsage, tt.want)
			}
			if s.esm.count() != 0 {
				t.Errorf("the server got a call, want none")
			}
		})
	}
	t.Run("server", func(t *testing.T) {
		s := newFakeServer(t)
		s.esm.fail = errs.Invalid("mapping.parallelization_factor", "parallelization factor 11 is out of range 1-10")
		r := newCLI(t, s).run(append(base, "--stream", "clicks", "--starting-position", "latest", "--parallelization-factor", "11")...)
		want := "skiff: parallelization factor 11 is out of range 1-10 (reason: invalid_mapping.parallelization_factor, field: mapping.parallelization_factor)\n"
		if r.code != 1 || r.stderr != want {
			t.Errorf("got exit %d, stderr %q; want 1, %q", r.code, r.stderr, want)
		}
	})
}

func TestESMUpdateStreamMask(t *testing.T) {
	tests := []struct {
		name     string
		args     []string
		wantMask []string
		want     *skiffv1.EventSourceMapping
	}{
		{"parallelization", []string{"--parallelization-factor", "3"}, []string{"parallelization_factor"}, &skiffv1.EventSourceMapping{ParallelizationFactor: i32(3)}},
		{"bisect", []string{"--bisect"}, []string{"bisect_batch_on_function_error"}, &skiffv1.EventSourceMapping{BisectBatchOnFunctionError: true}},
		{"stop bisecting", []string{"--bisect=false"}, []string{"bisect_batch_on_function_error"}, &skiffv1.EventSourceMapping{}},
		{
			"retries and age", []string{"--max-retries", "-1", "--max-record-age", "120"}, []string{"maximum_retry_attempts", "maximum_record_age_seconds"},
			&skiffv1.EventSourceMapping{MaximumRetryAttempts: i32(-1), MaximumRecordAgeSeconds: i32(120)},
		},
		{"on failure", []string{"--on-failure", "https://example.com/hook"}, []string{"on_failure"}, &skiffv1.EventSourceMapping{OnFailure: "https://example.com/hook"}},
		{"no destination", []string{"--on-failure", ""}, []string{"on_failure"}, &skiffv1.EventSourceMapping{}},
		{"tumbling window", []string{"--tumbling-window", "0"}, []string{"tumbling_window_seconds"}, &skiffv1.EventSourceMapping{}},
		{
			"batch and bisect", []string{"--batch-size", "1000", "--bisect", "--tumbling-window", "30"},
			[]string{"batch_size", "bisect_batch_on_function_error", "tumbling_window_seconds"},
			&skiffv1.EventSourceMapping{BatchSize: i32(1000), BisectBatchOnFunctionError: true, TumblingWindowSeconds: 30},
		},
	}
	for _, tt := range tests {
		for _, proto := range protocols {
			t.Run(tt.name+"/"+proto, func(t *testing.T) {
				s := newFakeServer(t)
				r := newCLI(t, s).run(append([]string{"--protocol", proto, "esm", "update", "uuid-9"}, tt.args...)...)
				if r.code != 0 {
					t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
				}
				_, _, msg := s.esm.last(t)
				want := &skiffv1.UpdateEventSourceMappingRequest{Uuid: "uuid-9", Mapping: tt.want, UpdateMask: tt.wantMask}
				if d := cmp.Diff(want, msg, protocmp.Transform()); d != "" {
					t.Errorf("request (-want +got):\n%s", d)
				}
			})
		}
	}
	s := newFakeServer(t)
	for _, args := range [][]string{{"--starting-position", "latest"}, {"--stream", "clicks"}} {
		if r := newCLI(t, s).run(append([]string{"esm", "update", "uuid-9"}, args...)...); r.code != exitUsage || !strings.Contains(r.stderr, "unknown flag") {
			t.Errorf("%v: exit %d, stderr %q; want %d and unknown flag", args, r.code, r.stderr, exitUsage)
		}
	}
	if s.esm.count() != 0 {
		t.Errorf("the server got a call, want none")
	}
}

func TestESMGetListStream(t *testing.T) {
	s := newFakeServer(t)
	s.esm.mappings = []*skiffv1.EventSourceMapping{
		{Uuid: "uuid-1", Queue: "jobs", FunctionName: "worker", State: "Enabled", LastModified: "2026-01-05T00:00:00Z"},
		{Uuid: "uuid-3", Stream: "clicks", FunctionName: "counter", StartingPosition: "LATEST", ParallelizationFactor: i32(4),
			State: "Enabled", LastModified: "2026-01-07T00:00:00Z"},
		{Uuid: "uuid-4", Stream: "audit", FunctionName: "counter", StartingPosition: "LATEST", BatchSize: i32(10),
			MaximumBatchingWindowSeconds: i32(1), State: "Disabled", LastModified: "2026-01-08T00:00:00Z"},
	}
	c := newCLI(t, s)
	for _, proto := range protocols {
		r := c.run("--protocol", proto, "esm", "get", "stream-uuid")
		if r.code != 0 {
			t.Fatalf("%s: get: exit code %d, want 0; stderr: %s", proto, r.code, r.stderr)
		}
		checkFields(t, r.stdout, map[string]string{
			"UUID:":                     "stream-uuid",
			"Stream:":                   "clicks",
			"Function:":                 "counter",
			"Batch size:":               "100 (default)",
			"Starting position:":        "AT_TIMESTAMP 2026-11-27T10:00:00Z",
			"Parallelization factor:":   "4",
			"Bisect on function error:": "true",
			"Maximum retry attempts:":   "2",
			"Maximum record age:":       "no limit (default)",
			"On failure:":               "queue:clicks-failed",
			"Tumbling window:":          "60 s",
		})
	}

	r := c.run("esm", "list")
	lines := strings.Split(strings.TrimSuffix(r.stdout, "\n"), "\n")
	if r.code != 0 || len(lines) != 4 {
		t.Fatalf("list: exit %d, stdout:\n%s", r.code, r.stdout)
	}
	for i, want := range [][]string{
		{"uuid-1", "queue:jobs", "worker", "Enabled", "10", "0s", "-", "2026-01-05T00:00:00Z"},
		{"uuid-3", "stream:clicks", "counter", "Enabled", "100", "0s", "4/shard", "2026-01-07T00:00:00Z"},
		{"uuid-4", "stream:audit", "counter", "Disabled", "10", "1s", "1/shard", "2026-01-08T00:00:00Z"},
	} {
		if d := cmp.Diff(want, strings.Fields(lines[i+1])); d != "" {
			t.Errorf("line %d (-want +got):\n%s", i+1, d)
		}
	}

	// The API filters by function and queue; the stream filter is the CLI's.
	r = c.run("esm", "list", "--function", "counter", "--stream", "stream:clicks", "-o", "json")
	if _, _, msg := s.esm.last(t); !cmp.Equal(&skiffv1.ListEventSourceMappingsRequest{FunctionName: "counter"}, msg, protocmp.Transform()) {
		t.Errorf("list request %v, want only the function filter", msg)
	}
	var listed struct {
		Mappings []struct {
			UUID string `json:"uuid"`
		} `json:"mappings"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &listed); err != nil || len(listed.Mappings) != 1 || listed.Mappings[0].UUID != "uuid-3" {
		t.Errorf("list json %q (err %v), want only uuid-3", r.stdout, err)
	}
	before := s.esm.count()
	if r := c.run("esm", "list", "--queue", "jobs", "--stream", "clicks"); r.code != exitUsage || !strings.Contains(r.stderr, "--queue and --stream cannot be used together") {
		t.Errorf("list --queue --stream: exit %d, stderr %q", r.code, r.stderr)
	}
	if s.esm.count() != before {
		t.Errorf("the server got a call, want none")
	}
}
