package esm

import (
	"cmp"
	"context"
	"errors"
	"maps"
	"slices"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/internal/errs"
)

// updateRetries bounds the read-modify-write retries of an update without
// a caller revision.
const updateRetries = 5

// Handler returns the EventSourceService handler. Its errors are plain
// errs errors: mount it behind errs.Interceptor().
func (s *Service) Handler() skiffv1connect.EventSourceServiceHandler { return handler{s} }

type handler struct{ s *Service }

var _ skiffv1connect.EventSourceServiceHandler = handler{}

func (h handler) CreateEventSourceMapping(ctx context.Context, req *connect.Request[skiffv1.CreateEventSourceMappingRequest]) (*connect.Response[skiffv1.CreateEventSourceMappingResponse], error) {
	m, err := h.s.Create(ctx, req.Msg.GetMapping())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.CreateEventSourceMappingResponse{Mapping: m}), nil
}

func (h handler) GetEventSourceMapping(ctx context.Context, req *connect.Request[skiffv1.GetEventSourceMappingRequest]) (*connect.Response[skiffv1.GetEventSourceMappingResponse], error) {
	m, err := h.s.Get(ctx, req.Msg.GetUuid())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.GetEventSourceMappingResponse{Mapping: m}), nil
}

func (h handler) ListEventSourceMappings(ctx context.Context, req *connect.Request[skiffv1.ListEventSourceMappingsRequest]) (*connect.Response[skiffv1.ListEventSourceMappingsResponse], error) {
	ms, err := h.s.List(ctx, req.Msg.GetFunctionName(), req.Msg.GetQueue())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.ListEventSourceMappingsResponse{Mappings: ms}), nil
}

func (h handler) UpdateEventSourceMapping(ctx context.Context, req *connect.Request[skiffv1.UpdateEventSourceMappingRequest]) (*connect.Response[skiffv1.UpdateEventSourceMappingResponse], error) {
	m, err := h.s.Update(ctx, req.Msg.GetUuid(), req.Msg.GetMapping(), req.Msg.GetUpdateMask())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.UpdateEventSourceMappingResponse{Mapping: m}), nil
}

func (h handler) DeleteEventSourceMapping(ctx context.Context, req *connect.Request[skiffv1.DeleteEventSourceMappingRequest]) (*connect.Response[skiffv1.DeleteEventSourceMappingResponse], error) {
	if err := h.s.Delete(ctx, req.Msg.GetUuid()); err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.DeleteEventSourceMappingResponse{}), nil
}

// Create validates and stores a new mapping from queue to function (both
// must exist; one mapping per pair) and returns it with its UUID, defaults
// filled in, state and revision.
func (s *Service) Create(ctx context.Context, in *skiffv1.EventSourceMapping) (*skiffv1.EventSourceMapping, error) {
	if in == nil {
		return nil, errs.Invalid("mapping", "mapping is required")
	}
	if in.GetUuid() != "" {
		return nil, errs.Invalid("uuid", "uuid is assigned by the server: leave it empty")
	}
	m := &skiffv1.EventSourceMapping{
		FunctionName:                 in.GetFunctionName(),
		Queue:                        in.GetQueue(),
		BatchSize:                    in.BatchSize,
		MaximumBatchingWindowSeconds: in.MaximumBatchingWindowSeconds,
		MaximumConcurrency:           in.MaximumConcurrency,
		FunctionResponseTypes:        slices.Clone(in.GetFunctionResponseTypes()),
		Enabled:                      in.Enabled,
		Stream:                       in.GetStream(),
		StartingPosition:             in.GetStartingPosition(),
		StartingPositionTimestamp:    in.GetStartingPositionTimestamp(),
		ParallelizationFactor:        in.ParallelizationFactor,
		BisectBatchOnFunctionError:   in.GetBisectBatchOnFunctionError(),
		MaximumRetryAttempts:         in.MaximumRetryAttempts,
		MaximumRecordAgeSeconds:      in.MaximumRecordAgeSeconds,
		OnFailure:                    in.GetOnFailure(),
		TumblingWindowSeconds:        in.GetTumblingWindowSeconds(),
	}
	if err := normalize(m); err != nil {
		return nil, err
	}
	if err := s.checkFunction(ctx, m.GetFunctionName()); err != nil {
		return nil, err
	}
	if m.GetStream() != "" {
		if err := s.checkStream(ctx, m.GetStream()); err != nil {
			return nil, err
		}
		if err := s.checkOnFailure(ctx, m.GetOnFailure()); err != nil {
			return nil, err
		}
	} else if err := s.checkQueue(ctx, m.GetQueue()); err != nil {
		return nil, err
	}
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if err := s.checkUnique(ctx, m, ""); err != nil {
		return nil, err
	}
	m.Uuid = newUUID()
	m.LastModified = s.timestamp()
	b, err := encodeMapping(m)
	if err != nil {
		return nil, err
	}
	rev, err := s.kv.Create(ctx, m.Uuid, b)
	if err != nil {
		if errors.Is(err, jetstream.ErrKeyExists) {
			return nil, errs.Conflict("event source mapping %s already exists", m.Uuid)
		}
		return nil, kvErr(err, "creating event source mapping")
	}
	return withComputed(m, rev), nil
}

// Get returns a mapping (errs.NotFound when there is none).
func (s *Service) Get(ctx context.Context, id string) (*skiffv1.EventSourceMapping, error) {
	if err := checkUUID(id); err != nil {
		return nil, err
	}
	m, _, err := s.load(ctx, id)
	return m, err
}

// List returns the mappings, filtered by function and queue when those are
// not empty, ordered by function, queue and UUID.
func (s *Service) List(ctx context.Context, function, queue string) ([]*skiffv1.EventSourceMapping, error) {
	if function != "" && !validFunctionName(function) {
		return nil, errs.Invalid("function_name", "function name %q is not 1-64 letters, digits, '-' or '_'", function)
	}
	if queue != "" && !validQueueName(queue) {
		return nil, errs.Invalid("queue", "queue name %q is not 1-80 letters, digits, '-' or '_' (with a .fifo suffix for FIFO queues)", queue)
	}
	all, err := s.all(ctx)
	if err != nil {
		return nil, err
	}
	out := all[:0]
	for _, m := range all {
		if (function == "" || m.GetFunctionName() == function) && (queue == "" || m.GetQueue() == queue) {
			out = append(out, m)
		}
	}
	return out, nil
}

// updatable are the fields update_mask may name. The source (queue or
// stream), its starting position and the parallelization factor (which
// fixes the stream's lanes and their checkpoints) cannot change.
var updatable = map[string]bool{
	"batch_size":                      true,
	"maximum_batching_window_seconds": true,
	"maximum_concurrency":             true,
	"function_response_types":         true,
	"enabled":                         true,
	"function_name":                   true,
	"bisect_batch_on_function_error":  true,
	"maximum_retry_attempts":          true,
	"maximum_record_age_seconds":      true,
	"on_failure":                      true,
	"tumbling_window_seconds":         true,
}

// Update replaces the fields of a mapping named in mask (or, with an empty
// mask, the fields set in upd) and returns the stored mapping. A non-zero
// upd.Revision must match the stored revision (errs.Conflict otherwise).
func (s *Service) Update(ctx context.Context, id string, upd *skiffv1.EventSourceMapping, mask []string) (*skiffv1.EventSourceMapping, error) {
	if err := checkUUID(id); err != nil {
		return nil, err
	}
	if upd == nil {
		return nil, errs.Invalid("mapping", "mapping is required")
	}
	if upd.GetUuid() != "" && upd.GetUuid() != id {
		return nil, errs.Invalid("mapping.uuid", "mapping.uuid %s differs from uuid %s", upd.GetUuid(), id)
	}
	set := map[string]bool{}
	for _, f := range mask {
		if !updatable[f] {
			return nil, errs.Invalid("update_mask", "field %q cannot be updated: update_mask may name batch_size, maximum_batching_window_seconds, maximum_concurrency, function_response_types, enabled, function_name, bisect_batch_on_function_error, maximum_retry_attempts, maximum_record_age_seconds, on_failure and tumbling_window_seconds", f)
		}
		set[f] = true
	}
	if len(mask) == 0 {
		set["batch_size"] = upd.BatchSize != nil
		set["maximum_batching_window_seconds"] = upd.MaximumBatchingWindowSeconds != nil
		set["maximum_concurrency"] = upd.MaximumConcurrency != nil
		set["function_response_types"] = len(upd.GetFunctionResponseTypes()) > 0
		set["enabled"] = upd.Enabled != nil
		set["function_name"] = upd.GetFunctionName() != ""
		set["bisect_batch_on_function_error"] = upd.GetBisectBatchOnFunctionError()
		set["maximum_retry_attempts"] = upd.MaximumRetryAttempts != nil
		set["maximum_record_age_seconds"] = upd.MaximumRecordAgeSeconds != nil
		set["on_failure"] = upd.GetOnFailure() != ""
		set["tumbling_window_seconds"] = upd.GetTumblingWindowSeconds() != 0
		if upd.GetQueue() != "" {
			return nil, errs.Invalid("queue", "the queue of a mapping cannot be changed: create another mapping")
		}
		if err := checkFixed(upd); err != nil {
			return nil, err
		}
	}
	if !slices.Contains(slices.Collect(maps.Values(set)), true) {
		return nil, errs.Invalid("mapping", "the update sets no field: set fields of mapping or name them in update_mask")
	}
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	for range updateRetries {
		cur, rev, err := s.load(ctx, id)
		if err != nil {
			return nil, err
		}
		if upd.GetRevision() != 0 && upd.GetRevision() != rev {
			return nil, errs.Conflict("event source mapping %s was changed concurrently (revision %d, now %d)", id, upd.GetRevision(), rev)
		}
		next := proto.CloneOf(cur)
		next.State, next.Revision = "", 0
		if set["batch_size"] {
			next.BatchSize = upd.BatchSize
		}
		if set["maximum_batching_window_seconds"] {
			next.MaximumBatchingWindowSeconds = upd.MaximumBatchingWindowSeconds
		}
		if set["maximum_concurrency"] {
			next.MaximumConcurrency = upd.MaximumConcurrency
		}
		if set["function_response_types"] {
			next.FunctionResponseTypes = slices.Clone(upd.GetFunctionResponseTypes())
		}
		if set["enabled"] {
			next.Enabled = upd.Enabled
		}
		if set["function_name"] {
			next.FunctionName = upd.GetFunctionName()
		}
		if set["bisect_batch_on_function_error"] {
			next.BisectBatchOnFunctionError = upd.GetBisectBatchOnFunctionError()
		}
		if set["maximum_retry_attempts"] {
			next.MaximumRetryAttempts = upd.MaximumRetryAttempts
		}
		if set["maximum_record_age_seconds"] {
			next.MaximumRecordAgeSeconds = upd.MaximumRecordAgeSeconds
		}
		if set["on_failure"] {
			next.OnFailure = upd.GetOnFailure()
		}
		if set["tumbling_window_seconds"] {
			next.TumblingWindowSeconds = upd.GetTumblingWindowSeconds()
		}
		if err := normalize(next); err != nil {
			return nil, err
		}
		if next.GetOnFailure() != "" && next.GetOnFailure() != cur.GetOnFailure() {
			if err := s.checkOnFailure(ctx, next.GetOnFailure()); err != nil {
				return nil, err
			}
		}
		if next.GetFunctionName() != cur.GetFunctionName() {
			if err := s.checkFunction(ctx, next.GetFunctionName()); err != nil {
				return nil, err
			}
			if err := s.checkUnique(ctx, next, id); err != nil {
				return nil, err
			}
		}
		next.LastModified = s.timestamp()
		b, err := encodeMapping(next)
		if err != nil {
			return nil, err
		}
		nrev, err := s.kv.Update(ctx, id, b, rev)
		if errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			if upd.GetRevision() != 0 {
				return nil, errs.Conflict("event source mapping %s was changed concurrently", id)
			}
			continue // another gateway wrote it: read again
		}
		if err != nil {
			return nil, kvErr(err, "updating event source mapping %s", id)
		}
		return withComputed(next, nrev), nil
	}
	return nil, errs.Conflict("event source mapping %s: too many concurrent updates", id)
}

// Delete removes a mapping (errs.NotFound when there is none). Its
// pollers stop and its lease resource goes with the next reconcile of
// every running gateway.
func (s *Service) Delete(ctx context.Context, id string) error {
	if err := checkUUID(id); err != nil {
		return err
	}
	_, rev, err := s.load(ctx, id)
	if err != nil {
		return err
	}
	if err := s.kv.Delete(ctx, id, jetstream.LastRevision(rev)); err != nil {
		if errors.Is(err, jetstream.ErrKeyRevisionMismatch) || isWrongLastSequence(err) {
			return errs.Conflict("event source mapping %s was changed concurrently: delete again", id)
		}
		return kvErr(err, "deleting event source mapping %s", id)
	}
	return nil
}

// load reads one mapping from the bucket.
func (s *Service) load(ctx context.Context, id string) (*skiffv1.EventSourceMapping, uint64, error) {
	e, err := s.kv.Get(ctx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, 0, errs.NotFound("event source mapping %s not found", id)
	}
	if err != nil {
		return nil, 0, kvErr(err, "reading event source mapping %s", id)
	}
	m, err := decodeMapping(e.Value(), e.Revision())
	if err != nil {
		return nil, 0, err
	}
	return m, e.Revision(), nil
}

// all reads every mapping from the bucket, in List's order.
func (s *Service) all(ctx context.Context) ([]*skiffv1.EventSourceMapping, error) {
	kl, err := s.kv.ListKeys(ctx)
	if err != nil {
		return nil, kvErr(err, "listing event source mappings")
	}
	defer func() { _ = kl.Stop() }()
	var out []*skiffv1.EventSourceMapping
	for key := range kl.Keys() {
		m, _, err := s.load(ctx, key)
		if errs.IsNotFound(err) {
			continue // deleted since listed
		}
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	if err := ctx.Err(); err != nil {
		return nil, kvErr(err, "listing event source mappings")
	}
	slices.SortFunc(out, func(a, b *skiffv1.EventSourceMapping) int {
		return cmp.Or(cmp.Compare(a.GetFunctionName(), b.GetFunctionName()), cmp.Compare(a.GetQueue(), b.GetQueue()), cmp.Compare(a.GetUuid(), b.GetUuid()))
	})
	return out, nil
}

// checkUnique refuses a second mapping of the same queue and function
// (Lambda's ResourceConflictException). The check and the write are
// serialized on this gateway; two gateways creating the same pair at the
// same instant can both succeed.
func (s *Service) checkUnique(ctx context.Context, m *skiffv1.EventSourceMapping, self string) error {
	all, err := s.all(ctx)
	if err != nil {
		return err
	}
	for _, o := range all {
		if o.GetUuid() != self && o.GetQueue() == m.GetQueue() && o.GetStream() == m.GetStream() && o.GetFunctionName() == m.GetFunctionName() {
			kind, src := "queue", m.GetQueue()
			if m.GetStream() != "" {
				kind, src = "stream", m.GetStream()
			}
			return errs.New(errs.KindAlreadyExists, "an event source mapping from %s %s to function %s already exists: %s", kind, src, m.GetFunctionName(), o.GetUuid())
		}
	}
	return nil
}

func (s *Service) checkFunction(ctx context.Context, name string) error {
	err := s.fns.Exists(ctx, name)
	if errs.IsNotFound(err) {
		return errs.NotFound("function %s not found", name)
	}
	return err
}

func (s *Service) checkQueue(ctx context.Context, name string) error {
	err := s.q.Exists(ctx, name)
	if errs.IsNotFound(err) {
		return errs.Invalid("queue", "queue %s does not exist", name)
	}
	return err
}

func (s *Service) checkStream(ctx context.Context, name string) error {
	if s.cfg.Streams == nil {
		return errs.Invalid("stream", "stream event sources are not available on this gateway")
	}
	err := s.cfg.Streams.Exists(ctx, name)
	if errs.IsNotFound(err) {
		return errs.Invalid("stream", "stream %s does not exist", name)
	}
	return err
}

// checkOnFailure checks an OnFailure destination: a skiff queue or an
// http(s) webhook, validated by the destinations writer.
func (s *Service) checkOnFailure(ctx context.Context, target string) error {
	if target == "" {
		return nil
	}
	if !strings.HasPrefix(target, "queue:") && !strings.HasPrefix(target, "http://") && !strings.HasPrefix(target, "https://") {
		return errs.Invalid("on_failure", "on_failure %q is not \"queue:NAME\" or an http(s) URL", target)
	}
	if s.cfg.Destinations == nil {
		return errs.Invalid("on_failure", "on-failure destinations are not available on this gateway")
	}
	if err := s.cfg.Destinations.Validate(ctx, target); err != nil {
		if errs.IsNotFound(err) || errs.Is(err, errs.KindInvalidArgument) {
			return errs.Invalid("on_failure", "on_failure: %v", err)
		}
		return err
	}
	return nil
}

func (s *Service) timestamp() string { return s.cfg.Now().UTC().Format(time.RFC3339Nano) }

// normalize fills the defaults of a mapping and checks every field: the
// names, the ranges, the combinations Lambda refuses (a batch over 10
// without a batching window; FIFO queues: batches of at most 10 and no
// window) and the response types.
func normalize(m *skiffv1.EventSourceMapping) error {
	if !validFunctionName(m.GetFunctionName()) {
		return errs.Invalid("function_name", "function name %q is not 1-64 letters, digits, '-' or '_'", m.GetFunctionName())
	}
	switch {
	case m.GetQueue() != "" && m.GetStream() != "":
		return errs.Invalid("stream", "a mapping has one source: set queue or stream, not both")
	case m.GetQueue() == "" && m.GetStream() == "":
		return errs.Invalid("queue", "a mapping needs a source: set queue or stream")
	case m.GetStream() != "":
		return normalizeStream(m)
	}
	if err := rejectStreamFields(m); err != nil {
		return err
	}
	if !validQueueName(m.GetQueue()) {
		return errs.Invalid("queue", "queue name %q is not 1-80 letters, digits, '-' or '_' (with a .fifo suffix for FIFO queues)", m.GetQueue())
	}
	if m.BatchSize == nil {
		m.BatchSize = proto.Int32(defaultBatchSize)
	}
	if m.MaximumBatchingWindowSeconds == nil {
		m.MaximumBatchingWindowSeconds = proto.Int32(0)
	}
	if m.Enabled == nil {
		m.Enabled = proto.Bool(true)
	}
	bs, win := m.GetBatchSize(), m.GetMaximumBatchingWindowSeconds()
	if bs < 1 || bs > maxBatchSize {
		return errs.Invalid("batch_size", "batch_size %d is out of range 1-%d", bs, maxBatchSize)
	}
	if win < 0 || win > maxBatchingWindowSeconds {
		return errs.Invalid("maximum_batching_window_seconds", "maximum_batching_window_seconds %d is out of range 0-%d", win, maxBatchingWindowSeconds)
	}
	if strings.HasSuffix(m.GetQueue(), ".fifo") {
		if bs > maxBatchSizeWithoutWindow {
			return errs.Invalid("batch_size", "batch_size %d is over %d, the limit for FIFO queues", bs, maxBatchSizeWithoutWindow)
		}
		if win != 0 {
			return errs.Invalid("maximum_batching_window_seconds", "FIFO queues do not support a batching window (got %d s)", win)
		}
	}
	if win == 0 && bs > maxBatchSizeWithoutWindow {
		return errs.Invalid("batch_size", "batch_size %d is over %d: larger batches need maximum_batching_window_seconds of at least 1", bs, maxBatchSizeWithoutWindow)
	}
	if m.MaximumConcurrency != nil {
		if c := m.GetMaximumConcurrency(); c < minMaximumConcurrency || c > maxMaximumConcurrency {
			return errs.Invalid("maximum_concurrency", "maximum_concurrency %d is out of range %d-%d", c, minMaximumConcurrency, maxMaximumConcurrency)
		}
	}
	var types []string
	for _, t := range m.GetFunctionResponseTypes() {
		if t != reportBatchItemFailures {
			return errs.Invalid("function_response_types", "function response type %q is not supported: the only one is %s", t, reportBatchItemFailures)
		}
		if !slices.Contains(types, t) {
			types = append(types, t)
		}
	}
	m.FunctionResponseTypes = types
	return nil
}

// rejectStreamFields refuses the stream-only fields on a queue mapping.
func rejectStreamFields(m *skiffv1.EventSourceMapping) error {
	for _, f := range []struct {
		name string
		set  bool
	}{
		{"starting_position", m.GetStartingPosition() != ""},
		{"starting_position_timestamp", m.GetStartingPositionTimestamp() != ""},
		{"parallelization_factor", m.ParallelizationFactor != nil},
		{"bisect_batch_on_function_error", m.GetBisectBatchOnFunctionError()},
		{"maximum_retry_attempts", m.MaximumRetryAttempts != nil},
		{"maximum_record_age_seconds", m.MaximumRecordAgeSeconds != nil},
		{"on_failure", m.GetOnFailure() != ""},
		{"tumbling_window_seconds", m.GetTumblingWindowSeconds() != 0},
	} {
		if f.set {
			return errs.Invalid(f.name, "%s applies to stream sources only: a queue mapping cannot set it", f.name)
		}
	}
	return nil
}

// checkFixed refuses an update (without a mask) that sets a field that
// cannot change.
func checkFixed(upd *skiffv1.EventSourceMapping) error {
	for _, f := range []struct {
		name string
		set  bool
	}{
		{"stream", upd.GetStream() != ""},
		{"starting_position", upd.GetStartingPosition() != ""},
		{"starting_position_timestamp", upd.GetStartingPositionTimestamp() != ""},
		{"parallelization_factor", upd.ParallelizationFactor != nil},
	} {
		if f.set {
			return errs.Invalid(f.name, "%s of a mapping cannot be changed: create another mapping", f.name)
		}
	}
	return nil
}

// Stream mapping limits and defaults.
const (
	defaultStreamBatchSize     = 100
	maxParallelization         = 10
	maxRetryAttempts           = 10000
	minRecordAge, maxRecordAge = 60, 604800
	maxTumblingWindow          = 900
	// Starting positions of stream mappings.
	PositionTrimHorizon = "TRIM_HORIZON"
	PositionLatest      = "LATEST"
	PositionAtTimestamp = "AT_TIMESTAMP"
)

// validStreamName reports whether name is a Kinesis stream name: 1-128
// letters, digits, '_', '.' and '-'.
func validStreamName(name string) bool {
	if len(name) < 1 || len(name) > 128 {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_', c == '.':
		default:
			return false
		}
	}
	return true
}

// normalizeStream fills the defaults of a stream mapping and checks its
// fields (Lambda's Kinesis limits).
func normalizeStream(m *skiffv1.EventSourceMapping) error {
	if !validStreamName(m.GetStream()) {
		return errs.Invalid("stream", "stream name %q is not 1-128 letters, digits, '_', '.' or '-'", m.GetStream())
	}
	if m.MaximumConcurrency != nil {
		return errs.Invalid("maximum_concurrency", "maximum_concurrency applies to queue sources only: use parallelization_factor for streams")
	}
	switch m.GetStartingPosition() {
	case PositionTrimHorizon, PositionLatest:
		if m.GetStartingPositionTimestamp() != "" {
			return errs.Invalid("starting_position_timestamp", "starting_position_timestamp needs starting_position %s (got %s)", PositionAtTimestamp, m.GetStartingPosition())
		}
	case PositionAtTimestamp:
		ts := m.GetStartingPositionTimestamp()
		if ts == "" {
			return errs.Invalid("starting_position_timestamp", "starting_position %s needs starting_position_timestamp (RFC 3339)", PositionAtTimestamp)
		}
		if _, err := time.Parse(time.RFC3339Nano, ts); err != nil {
			return errs.Invalid("starting_position_timestamp", "starting_position_timestamp %q is not an RFC 3339 time", ts)
		}
	case "":
		return errs.Invalid("starting_position", "starting_position is required for streams: %s, %s or %s", PositionTrimHorizon, PositionLatest, PositionAtTimestamp)
	default:
		return errs.Invalid("starting_position", "starting_position %q is not %s, %s or %s", m.GetStartingPosition(), PositionTrimHorizon, PositionLatest, PositionAtTimestamp)
	}
	if m.BatchSize == nil {
		m.BatchSize = proto.Int32(defaultStreamBatchSize)
	}
	if m.MaximumBatchingWindowSeconds == nil {
		m.MaximumBatchingWindowSeconds = proto.Int32(0)
	}
	if m.ParallelizationFactor == nil {
		m.ParallelizationFactor = proto.Int32(1)
	}
	if m.MaximumRetryAttempts == nil {
		m.MaximumRetryAttempts = proto.Int32(-1)
	}
	if m.MaximumRecordAgeSeconds == nil {
		m.MaximumRecordAgeSeconds = proto.Int32(-1)
	}
	if m.Enabled == nil {
		m.Enabled = proto.Bool(true)
	}
	if bs := m.GetBatchSize(); bs < 1 || bs > maxBatchSize {
		return errs.Invalid("batch_size", "batch_size %d is out of range 1-%d", bs, maxBatchSize)
	}
	if win := m.GetMaximumBatchingWindowSeconds(); win < 0 || win > maxBatchingWindowSeconds {
		return errs.Invalid("maximum_batching_window_seconds", "maximum_batching_window_seconds %d is out of range 0-%d", win, maxBatchingWindowSeconds)
	}
	if p := m.GetParallelizationFactor(); p < 1 || p > maxParallelization {
		return errs.Invalid("parallelization_factor", "parallelization_factor %d is out of range 1-%d", p, maxParallelization)
	}
	if r := m.GetMaximumRetryAttempts(); r < -1 || r > maxRetryAttempts {
		return errs.Invalid("maximum_retry_attempts", "maximum_retry_attempts %d is out of range -1 (unlimited) to %d", r, maxRetryAttempts)
	}
	if a := m.GetMaximumRecordAgeSeconds(); a != -1 && (a < minRecordAge || a > maxRecordAge) {
		return errs.Invalid("maximum_record_age_seconds", "maximum_record_age_seconds %d is not -1 (unlimited) or %d-%d", a, minRecordAge, maxRecordAge)
	}
	if w := m.GetTumblingWindowSeconds(); w < 0 || w > maxTumblingWindow {
		return errs.Invalid("tumbling_window_seconds", "tumbling_window_seconds %d is out of range 0-%d", w, maxTumblingWindow)
	}
	if f := m.GetOnFailure(); f != "" && !strings.HasPrefix(f, "queue:") && !strings.HasPrefix(f, "http://") && !strings.HasPrefix(f, "https://") {
		return errs.Invalid("on_failure", "on_failure %q is not \"queue:NAME\" or an http(s) URL", f)
	}
	var types []string
	for _, t := range m.GetFunctionResponseTypes() {
		if t != reportBatchItemFailures {
			return errs.Invalid("function_response_types", "function response type %q is not supported: the only one is %s", t, reportBatchItemFailures)
		}
		if !slices.Contains(types, t) {
			types = append(types, t)
		}
	}
	m.FunctionResponseTypes = types
	return nil
}

// validFunctionName reports whether name is a Lambda function name: 1-64
// letters, digits, '-' and '_'.
func validFunctionName(name string) bool {
	return len(name) >= 1 && len(name) <= maxFnLength && nameChars(name)
}

// validQueueName reports whether name is an SQS queue name: 1-80 letters,
// digits, '-' and '_', the last 5 of which may be ".fifo".
func validQueueName(name string) bool {
	if len(name) < 1 || len(name) > maxQueueNameLen {
		return false
	}
	base := strings.TrimSuffix(name, ".fifo")
	return base != "" && nameChars(base)
}

func nameChars(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_':
		default:
			return false
		}
	}
	return true
}

func checkUUID(id string) error {
	if id == "" {
		return errs.Invalid("uuid", "uuid is required")
	}
	if !validUUID(id) {
		return errs.Invalid("uuid", "uuid %q is not a UUID", id)
	}
	return nil
}

// encodeMapping marshals a mapping for the bucket, without the computed
// fields.
func encodeMapping(m *skiffv1.EventSourceMapping) ([]byte, error) {
	c := proto.CloneOf(m)
	c.State, c.Revision = "", 0
	b, err := proto.Marshal(c)
	if err != nil {
		return nil, errs.Internal("encoding event source mapping %s: %w", m.GetUuid(), err)
	}
	return b, nil
}

// decodeMapping unmarshals a stored mapping and sets its computed fields.
func decodeMapping(b []byte, rev uint64) (*skiffv1.EventSourceMapping, error) {
	m := &skiffv1.EventSourceMapping{}
	if err := proto.Unmarshal(b, m); err != nil {
		return nil, errs.Internal("decoding event source mapping (revision %d): %w", rev, err)
	}
	return withComputed(m, rev), nil
}

func withComputed(m *skiffv1.EventSourceMapping, rev uint64) *skiffv1.EventSourceMapping {
	m.Revision = rev
	m.State = stateDisabled
	if m.GetEnabled() {
		m.State = stateEnabled
	}
	return m
}

func isWrongLastSequence(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence
}

// kvErr maps an engine error: context errors keep their kind, anything
// else is Unavailable.
func kvErr(err error, format string, args ...any) error {
	args = append(args, err)
	switch {
	case errors.Is(err, context.Canceled):
		return errs.New(errs.KindCanceled, format+": %w", args...)
	case errors.Is(err, context.DeadlineExceeded):
		return errs.New(errs.KindDeadlineExceeded, format+": %w", args...)
	}
	return errs.Unavailable(format+": %w", args...)
}
