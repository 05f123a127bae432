package esm

import (
	"context"
	"errors"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

// fakeStreams is a set of stream names.
type fakeStreams map[string]bool

func (f fakeStreams) Exists(_ context.Context, name string) error {
	if !f[name] {
		return errs.NotFound("stream %s not found", name)
	}
	return nil
}

// fakeTargets accepts queue "dlq" and any webhook.
type fakeTargets struct{}

func (fakeTargets) Validate(_ context.Context, target string) error {
	switch {
	case target == "queue:dlq", strings.HasPrefix(target, "https://"), strings.HasPrefix(target, "http://127.0.0.1"):
		return nil
	case strings.HasPrefix(target, "queue:"):
		return errs.NotFound("destination queue %q does not exist", strings.TrimPrefix(target, "queue:")).WithReason("destination_not_found")
	}
	return errs.Invalid("destination", "bad destination %q", target)
}

func streamEnv(t *testing.T) *env {
	cfg := testConfig()
	cfg.Streams = fakeStreams{"clicks": true, "other": true}
	cfg.Destinations = fakeTargets{}
	return newEnv(t, cfg)
}

func TestStreamMappingValidation(t *testing.T) {
	e := streamEnv(t)
	ctx := testCtx(t)
	base := func() *skiffv1.EventSourceMapping {
		return &skiffv1.EventSourceMapping{FunctionName: "worker", Stream: "clicks", StartingPosition: "TRIM_HORIZON"}
	}
	for _, tc := range []struct {
		name  string
		edit  func(m *skiffv1.EventSourceMapping)
		field string // "" means accepted
	}{
		{"minimal", func(*skiffv1.EventSourceMapping) {}, ""},
		{"every field", func(m *skiffv1.EventSourceMapping) {
			m.Stream = "other"
			m.StartingPosition, m.StartingPositionTimestamp = "AT_TIMESTAMP", "2026-01-02T03:04:05Z"
			m.BatchSize, m.MaximumBatchingWindowSeconds = proto.Int32(10000), proto.Int32(300)
			m.ParallelizationFactor, m.BisectBatchOnFunctionError = proto.Int32(10), true
			m.MaximumRetryAttempts, m.MaximumRecordAgeSeconds = proto.Int32(10000), proto.Int32(604800)
			m.OnFailure, m.TumblingWindowSeconds = "queue:dlq", 900
			m.FunctionResponseTypes = []string{"ReportBatchItemFailures"}
		}, ""},
		{"both sources", func(m *skiffv1.EventSourceMapping) { m.Queue = "orders" }, "stream"},
		{"no source", func(m *skiffv1.EventSourceMapping) { m.Stream = "" }, "queue"},
		{"bad stream name", func(m *skiffv1.EventSourceMapping) { m.Stream = "no/slash" }, "stream"},
		{"unknown stream", func(m *skiffv1.EventSourceMapping) { m.Stream = "missing" }, "stream"},
		{"no starting position", func(m *skiffv1.EventSourceMapping) { m.StartingPosition = "" }, "starting_position"},
		{"bad starting position", func(m *skiffv1.EventSourceMapping) { m.StartingPosition = "AT_SEQUENCE_NUMBER" }, "starting_position"},
		{"AT_TIMESTAMP without a time", func(m *skiffv1.EventSourceMapping) { m.StartingPosition = "AT_TIMESTAMP" }, "starting_position_timestamp"},
		{"bad timestamp", func(m *skiffv1.EventSourceMapping) {
			m.StartingPosition, m.StartingPositionTimestamp = "AT_TIMESTAMP", "yesterday"
		}, "starting_position_timestamp"},
		{"timestamp with LATEST", func(m *skiffv1.EventSourceMapping) {
			m.StartingPosition, m.StartingPositionTimestamp = "LATEST", "2026-01-02T03:04:05Z"
		}, "starting_position_timestamp"},
		{"batch 0", func(m *skiffv1.EventSourceMapping) { m.BatchSize = proto.Int32(0) }, "batch_size"},
		{"batch 10001", func(m *skiffv1.EventSourceMapping) { m.BatchSize = proto.Int32(10001) }, "batch_size"},
		{"window 301", func(m *skiffv1.EventSourceMapping) { m.MaximumBatchingWindowSeconds = proto.Int32(301) }, "maximum_batching_window_seconds"},
		{"window -1", func(m *skiffv1.EventSourceMapping) { m.MaximumBatchingWindowSeconds = proto.Int32(-1) }, "maximum_batching_window_seconds"},
		{"parallelization 0", func(m *skiffv1.EventSourceMapping) { m.ParallelizationFactor = proto.Int32(0) }, "parallelization_factor"},
		{"parallelization 11", func(m *skiffv1.EventSourceMapping) { m.ParallelizationFactor = proto.Int32(11) }, "parallelization_factor"},
		{"retries -2", func(m *skiffv1.EventSourceMapping) { m.MaximumRetryAttempts = proto.Int32(-2) }, "maximum_retry_attempts"},
		{"retries 10001", func(m *skiffv1.EventSourceMapping) { m.MaximumRetryAttempts = proto.Int32(10001) }, "maximum_retry_attempts"},
		{"record age 59", func(m *skiffv1.EventSourceMapping) { m.MaximumRecordAgeSeconds = proto.Int32(59) }, "maximum_record_age_seconds"},
		{"record age 0", func(m *skiffv1.EventSourceMapping) { m.MaximumRecordAgeSeconds = proto.Int32(0) }, "maximum_record_age_seconds"},
		{"record age 604801", func(m *skiffv1.EventSourceMapping) { m.MaximumRecordAgeSeconds = proto.Int32(604801) }, "maximum_record_age_seconds"},
		{"tumbling 901", func(m *skiffv1.EventSourceMapping) { m.TumblingWindowSeconds = 901 }, "tumbling_window_seconds"},
		{"tumbling -1", func(m *skiffv1.EventSourceMapping) { m.TumblingWindowSeconds = -1 }, "tumbling_window_seconds"},
		{"on failure function", func(m *skiffv1.EventSourceMapping) { m.OnFailure = "function:other-worker" }, "on_failure"},
		{"on failure unknown queue", func(m *skiffv1.EventSourceMapping) { m.OnFailure = "queue:nope" }, "on_failure"},
		{"response type", func(m *skiffv1.EventSourceMapping) { m.FunctionResponseTypes = []string{"Other"} }, "function_response_types"},
		{"maximum concurrency", func(m *skiffv1.EventSourceMapping) { m.MaximumConcurrency = proto.Int32(5) }, "maximum_concurrency"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := base()
			tc.edit(m)
			got, err := e.s.Create(ctx, m)
			if tc.field == "" {
				if err != nil {
					t.Fatalf("Create: %v", err)
				}
				if err := e.s.Delete(ctx, got.GetUuid()); err != nil {
					t.Fatal(err)
				}
				return
			}
			var ee *errs.Error
			if !errs.IsInvalid(err) || !errorsAs(err, &ee) || ee.Field != tc.field {
				t.Fatalf("Create: got %v, want InvalidArgument on %q", err, tc.field)
			}
		})
	}
	all, err := e.s.List(ctx, "", "")
	if err != nil || len(all) != 0 {
		t.Fatalf("after the rejected creates: got %d mappings (%v), want 0", len(all), err)
	}
}

func TestStreamMappingDefaultsAndUpdate(t *testing.T) {
	e := streamEnv(t)
	ctx := testCtx(t)
	m, err := e.s.Create(ctx, &skiffv1.EventSourceMapping{FunctionName: "worker", Stream: "clicks", StartingPosition: "LATEST"})
	if err != nil {
		t.Fatal(err)
	}
	if m.GetBatchSize() != 100 || m.GetParallelizationFactor() != 1 || m.GetMaximumRetryAttempts() != -1 || m.GetMaximumRecordAgeSeconds() != -1 || m.GetMaximumBatchingWindowSeconds() != 0 || !m.GetEnabled() {
		t.Fatalf("got %v, want the stream defaults (batch 100, factor 1, retries -1, age -1, window 0, enabled)", m)
	}
	if _, err := e.s.Create(ctx, &skiffv1.EventSourceMapping{FunctionName: "worker", Stream: "clicks", StartingPosition: "LATEST"}); !errs.Is(err, errs.KindAlreadyExists) {
		t.Fatalf("duplicate: got %v, want AlreadyExists", err)
	}
	if _, err := e.s.Create(ctx, &skiffv1.EventSourceMapping{FunctionName: "worker", Stream: "other", StartingPosition: "LATEST"}); err != nil {
		t.Fatalf("same function, another stream: %v", err)
	}
	up, err := e.s.Update(ctx, m.GetUuid(), &skiffv1.EventSourceMapping{MaximumRetryAttempts: proto.Int32(3), OnFailure: "https://example.com/x", BisectBatchOnFunctionError: true}, nil)
	if err != nil {
		t.Fatalf("Update: %v", err)
	}
	if up.GetMaximumRetryAttempts() != 3 || up.GetOnFailure() != "https://example.com/x" || !up.GetBisectBatchOnFunctionError() {
		t.Fatalf("updated: got %v", up)
	}
	for _, tc := range []struct {
		upd   *skiffv1.EventSourceMapping
		mask  []string
		field string
	}{
		{&skiffv1.EventSourceMapping{ParallelizationFactor: proto.Int32(2)}, nil, "parallelization_factor"},
		{&skiffv1.EventSourceMapping{StartingPosition: "TRIM_HORIZON"}, nil, "starting_position"},
		{&skiffv1.EventSourceMapping{Stream: "other"}, nil, "stream"},
		{&skiffv1.EventSourceMapping{}, []string{"parallelization_factor"}, "update_mask"},
		{&skiffv1.EventSourceMapping{MaximumConcurrency: proto.Int32(5)}, nil, "maximum_concurrency"},
		{&skiffv1.EventSourceMapping{MaximumRecordAgeSeconds: proto.Int32(10)}, nil, "maximum_record_age_seconds"},
		{&skiffv1.EventSourceMapping{OnFailure: "queue:nope"}, nil, "on_failure"},
	} {
		_, err := e.s.Update(ctx, m.GetUuid(), tc.upd, tc.mask)
		var ee *errs.Error
		if !errs.IsInvalid(err) || !errorsAs(err, &ee) || ee.Field != tc.field {
			t.Fatalf("Update(%v, %v): got %v, want InvalidArgument on %q", tc.upd, tc.mask, err, tc.field)
		}
	}
}

func TestQueueMappingRejectsStreamFields(t *testing.T) {
	e := streamEnv(t)
	ctx := testCtx(t)
	for _, tc := range []struct {
		edit  func(m *skiffv1.EventSourceMapping)
		field string
	}{
		{func(m *skiffv1.EventSourceMapping) { m.StartingPosition = "LATEST" }, "starting_position"},
		{func(m *skiffv1.EventSourceMapping) { m.StartingPositionTimestamp = "2026-01-02T03:04:05Z" }, "starting_position_timestamp"},
		{func(m *skiffv1.EventSourceMapping) { m.ParallelizationFactor = proto.Int32(2) }, "parallelization_factor"},
		{func(m *skiffv1.EventSourceMapping) { m.BisectBatchOnFunctionError = true }, "bisect_batch_on_function_error"},
		{func(m *skiffv1.EventSourceMapping) { m.MaximumRetryAttempts = proto.Int32(2) }, "maximum_retry_attempts"},
		{func(m *skiffv1.EventSourceMapping) { m.MaximumRecordAgeSeconds = proto.Int32(60) }, "maximum_record_age_seconds"},
		{func(m *skiffv1.EventSourceMapping) { m.OnFailure = "queue:dlq" }, "on_failure"},
		{func(m *skiffv1.EventSourceMapping) { m.TumblingWindowSeconds = 5 }, "tumbling_window_seconds"},
	} {
		m := &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders"}
		tc.edit(m)
		_, err := e.s.Create(ctx, m)
		var ee *errs.Error
		if !errs.IsInvalid(err) || !errorsAs(err, &ee) || ee.Field != tc.field {
			t.Fatalf("queue mapping with %s: got %v, want InvalidArgument on it", tc.field, err)
		}
	}
	q, err := e.s.Create(ctx, &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.s.Update(ctx, q.GetUuid(), &skiffv1.EventSourceMapping{TumblingWindowSeconds: 5}, nil); !errs.IsInvalid(err) {
		t.Fatalf("updating a queue mapping with a stream field: got %v, want InvalidArgument", err)
	}
}

func TestStreamMappingsAreNotPolledHere(t *testing.T) {
	e := streamEnv(t)
	ctx := testCtx(t)
	m, err := e.s.Create(ctx, &skiffv1.EventSourceMapping{FunctionName: "worker", Stream: "clicks", StartingPosition: "LATEST"})
	if err != nil {
		t.Fatal(err)
	}
	q, err := e.s.Create(ctx, &skiffv1.EventSourceMapping{FunctionName: "worker", Queue: "orders"})
	if err != nil {
		t.Fatal(err)
	}
	e.run(t)
	eventually(t, "the queue mapping's resource", func() bool { _, ok := e.ls.desiredOf(ResourcePrefix + q.GetUuid()); return ok })
	if _, ok := e.ls.desiredOf(ResourcePrefix + m.GetUuid()); ok {
		t.Fatalf("the stream mapping got an esm lease resource")
	}
	if e.s.match(ResourcePrefix + m.GetUuid()) {
		t.Fatalf("the esm pollers match the stream mapping")
	}
}

func errorsAs(err error, target **errs.Error) bool { return errors.As(err, target) }
