// Package kinesis is skiff's Kinesis-style sharded streams on NATS
// JetStream: records are routed by the MD5 of their partition key (or an
// explicit hash key) to the open shard whose 128-bit hash key range holds
// it, ordered within a shard by increasing sequence numbers, kept for the
// stream's retention period, and read with expiring shard iterators.
// Shards split, merge and scale uniformly with parent/child lineage.
//
// The Store serves the StreamService RPCs (Handler) and, in-process, what
// the stream pollers need: Exists, Shards, Read, SeqAt and Watch.
//
// # Storage
//
//   - KV bucket "kinesis": key = base64url(stream name), value = a
//     streamInfo (JSON): the name, a random id naming this incarnation of
//     the stream, the creation time and the retention period.
//   - One JetStream stream per Kinesis stream, "KINESIS_<id>", subjects
//     "kin.<id>.>". Records are on "kin.<id>.s.<shard id>"; the record's
//     sequence number is its JetStream stream sequence (decimal), so
//     sequence numbers increase within a shard (and across the stream).
//     The data is an envelope: version, arrival time (the injected clock),
//     partition key, data. MaxAge is the retention period; reads also drop
//     records older than the retention by the injected clock.
//   - The shard map is the last message on "kin.<id>.map" of the same
//     stream, published with "Nats-TTL: never" so retention never removes
//     it. A shard's records are the stream sequences in
//     [start, close) on its subject, where start is one past the sequence
//     of the map message that created it and close is the sequence of the
//     map message that closed it (values relative to their own message are
//     resolved when a map is loaded, see mapDoc).
//
// # Reads
//
// Sequential reads of a shard go through cursors: ephemeral pull
// consumers (AckNone, memory state) filtered on the shard's subject, kept
// idle between reads keyed by their position, so a poller's next Read
// costs one no-wait pull; single lookups (LATEST, AT_TIMESTAMP, map) are
// direct gets. Close drops the idle cursors.
//
// # Resharding is atomic with respect to writers
//
// Every record is published with "Nats-Expected-Last-Subject-Sequence" =
// the sequence of the map message the writer routed with, on the map
// subject. A reshard publishes the next map (compare-and-set on the same
// header, so concurrent reshards serialize); from that instant the engine
// rejects every record routed with the old map, and the writer reloads the
// map and routes again. So a closed parent receives nothing after the map
// message that closed it, and the close sequence bounds its records
// exactly, with no lock and no wait.
//
// Decisions:
//   - EndingSequenceNumber of a closed shard is the end of its sequence
//     range (close - 1), not necessarily a stored record; an intermediate
//     shard created and closed by one UpdateShardCount has an empty range.
//   - PutRecords validates every entry first (a bad entry rejects the call,
//     naming the entry's field, and nothing is written); per-record errors
//     report engine failures.
//   - Open shards are limited to 64 (the CreateStream maximum), and
//     UpdateShardCount to between half and double the open shards, as
//     Kinesis does.
//   - Data is limited to 1 MiB, but also by the NATS connection's maximum
//     payload (1 MB by default, which is less than a 1 MiB record plus its
//     envelope): New reports the effective limit in its log, and a record
//     over it gets InvalidArgument on "data".
package kinesis

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"log/slog"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

// Names this package owns.
const (
	Bucket       = "kinesis"
	streamPrefix = "KINESIS_"
	subjectRoot  = "kin"
)

// Limits and defaults (Kinesis's).
const (
	MaxShards            = 64
	MaxNameLen           = 128
	MaxPartitionKeyLen   = 256
	MaxDataBytes         = 1 << 20
	MaxPutRecords        = 500
	MaxPutRecordsBytes   = 5 << 20
	MaxGetRecords        = 10000
	MaxGetRecordsBytes   = 10 << 20
	DefaultRetentionHrs  = 24
	MaxRetentionHrs      = 8760
	IteratorLifetime     = 5 * time.Minute
	envelopeOverhead     = 1 + 8 + 2
	orphanGrace          = time.Minute
	putAttempts          = 8
	reshardAttempts      = 5
	directGetTimeout     = 10 * time.Second
	lagWait              = 200 * time.Millisecond
	hdrExpectLastSubjSeq = "Nats-Expected-Last-Subject-Sequence"
	hdrExpectSubj        = "Nats-Expected-Last-Subject-Sequence-Subject"
	hdrTTL               = "Nats-TTL"
)

var nameRE = regexp.MustCompile(`^[a-zA-Z0-9_.-]{1,128}$`)

// Config configures a Store.
type Config struct {
	// Now is the clock for arrival times, retention and iterator expiry;
	// nil means time.Now.
	Now func() time.Time
	// Logger; nil discards.
	Logger *slog.Logger
	// Registry receives the stream metrics; nil registers nothing.
	Registry prometheus.Registerer
	// Region and AccountID go into ARNs (defaults "local", "000000000000").
	Region, AccountID string
}

func (c *Config) setDefaults() {
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Region == "" {
		c.Region = "local"
	}
	if c.AccountID == "" {
		c.AccountID = "000000000000"
	}
}

// Store owns the streams. Its methods are safe for concurrent use, and
// several Stores (gateways) may share one JetStream.
type Store struct {
	cfg     Config
	log     *slog.Logger
	js      jetstream.JetStream
	nc      *nats.Conn
	kv      jetstream.KeyValue
	metrics *metrics
	replies *replyMux
	cursors cursors
	maxData int // effective data limit

	// publish is js.PublishMsgAsync; tests replace it to inject failures.
	publish func(m *nats.Msg) (jetstream.PubAckFuture, error)

	mu      sync.Mutex
	streams map[string]*streamState // by name; guarded by mu
}

// streamInfo is the KV record of a stream.
type streamInfo struct {
	Name           string    `json:"name"`
	ID             string    `json:"id"`
	Created        time.Time `json:"created"`
	RetentionHours int32     `json:"retention_hours"`
}

// streamState is a cached stream: its info is immutable, its map the
// latest one this Store has seen.
type streamState struct {
	info streamInfo
	m    atomic.Pointer[shardMap]
}

func (st *streamState) jsName() string     { return streamPrefix + st.info.ID }
func (st *streamState) mapSubject() string { return subjectRoot + "." + st.info.ID + ".map" }
func (st *streamState) shardSubject(id string) string {
	return subjectRoot + "." + st.info.ID + ".s." + id
}
func (st *streamState) retention() time.Duration {
	return time.Duration(st.info.RetentionHours) * time.Hour
}

// StoredRecord is a record as the pollers read it.
type StoredRecord struct {
	// Seq is the record's stream sequence; SequenceNumber its decimal form.
	Seq            uint64
	SequenceNumber string
	PartitionKey   string
	Data           []byte
	Arrival        time.Time
	ShardID        string
}

// New opens (creating if needed) the stream registry, and deletes the
// JetStream streams of streams whose deletion did not finish.
func New(ctx context.Context, js jetstream.JetStream, cfg Config) (*Store, error) {
	cfg.setDefaults()
	s := &Store{
		cfg:     cfg,
		log:     cfg.Logger.With("component", "kinesis"),
		js:      js,
		nc:      js.Conn(),
		streams: map[string]*streamState{},
	}
	s.publish = func(m *nats.Msg) (jetstream.PubAckFuture, error) { return s.js.PublishMsgAsync(m) }
	var err error
	if s.metrics, err = newMetrics(cfg.Registry, s); err != nil {
		return nil, err
	}
	s.kv, err = js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      Bucket,
		Description: "skiff kinesis stream registry",
		History:     1,
		Storage:     jetstream.FileStorage,
	})
	if err != nil {
		return nil, engineErr(err, "opening kv bucket %s", Bucket)
	}
	s.maxData = MaxDataBytes
	if mp := int(s.nc.MaxPayload()) - envelopeOverhead - MaxPartitionKeyLen - 256; mp < s.maxData {
		s.maxData = mp
		s.log.Warn("nats max payload limits stream records below 1 MiB", "max_data_bytes", mp, "max_payload", s.nc.MaxPayload())
	}
	if s.replies, err = newReplyMux(s.nc); err != nil {
		return nil, engineErr(err, "subscribing to stream read replies")
	}
	if err := s.collectOrphans(ctx); err != nil {
		s.log.Warn("collecting orphaned stream storage", "err", err)
	}
	return s, nil
}

// Close releases the Store's subscription. The JetStream connection is
// the caller's.
func (s *Store) Close() error {
	s.cursors.mu.Lock()
	var all []*cursor
	for _, list := range s.cursors.idle {
		all = append(all, list...)
	}
	s.cursors.idle = nil
	s.cursors.mu.Unlock()
	s.dropCursors(all...)
	if err := s.replies.sub.Unsubscribe(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) && !errors.Is(err, nats.ErrBadSubscription) {
		return engineErr(err, "closing the stream store")
	}
	return nil
}

// MaxData is the largest record data this Store accepts.
func (s *Store) MaxData() int { return s.maxData }

func (s *Store) now() time.Time { return s.cfg.Now() }

func (s *Store) arn(name string) string {
	return "arn:aws:kinesis:" + s.cfg.Region + ":" + s.cfg.AccountID + ":stream/" + name
}

func kvKey(name string) string { return base64.RawURLEncoding.EncodeToString([]byte(name)) }

func checkName(field, name string) error {
	if !nameRE.MatchString(name) {
		return errs.Invalid(field, "stream name %q must be 1-%d characters of [a-zA-Z0-9_.-]", name, MaxNameLen)
	}
	return nil
}

// CreateStream creates a stream of shardCount uniform shards.
func (s *Store) CreateStream(ctx context.Context, req *skiffv1.CreateStreamRequest) (*skiffv1.StreamDescription, error) {
	if err := checkName("name", req.GetName()); err != nil {
		return nil, err
	}
	n := int(req.GetShardCount())
	if n < 1 || n > MaxShards {
		return nil, errs.Invalid("shard_count", "shard count %d is not in 1-%d", n, MaxShards)
	}
	ret := req.GetRetentionPeriodHours()
	if ret == 0 {
		ret = DefaultRetentionHrs
	}
	if ret < 1 || ret > MaxRetentionHrs {
		return nil, errs.Invalid("retention_period_hours", "retention period %d hours is not in 1-%d", ret, MaxRetentionHrs)
	}
	if _, err := s.kv.Get(ctx, kvKey(req.GetName())); err == nil {
		return nil, errs.New(errs.KindAlreadyExists, "stream %s already exists", req.GetName())
	}
	var idb [8]byte
	_, _ = rand.Read(idb[:])
	st := &streamState{info: streamInfo{
		Name: req.GetName(), ID: hex.EncodeToString(idb[:]), Created: s.now().UTC(), RetentionHours: ret,
	}}
	_, err := s.js.CreateStream(ctx, jetstream.StreamConfig{
		Name:        st.jsName(),
		Description: "skiff kinesis stream " + st.info.Name,
		Subjects:    []string{subjectRoot + "." + st.info.ID + ".>"},
		Retention:   jetstream.LimitsPolicy,
		Discard:     jetstream.DiscardOld,
		MaxAge:      st.retention(),
		MaxMsgSize:  int32(min(int(s.nc.MaxPayload()), MaxDataBytes+envelopeOverhead+MaxPartitionKeyLen+256)),
		Storage:     jetstream.FileStorage,
		AllowDirect: true,
		AllowMsgTTL: true,
	})
	if err != nil {
		return nil, engineErr(err, "creating storage of stream %s", st.info.Name)
	}
	cleanup := func() {
		if err := s.js.DeleteStream(context.WithoutCancel(ctx), st.jsName()); err != nil {
			s.log.Warn("deleting storage of a stream not created", "stream", st.info.Name, "err", err)
		}
	}
	if _, err := s.publishMap(ctx, st, newMapDoc(n), 0); err != nil {
		cleanup()
		return nil, err
	}
	body, _ := json.Marshal(st.info)
	if _, err := s.kv.Create(ctx, kvKey(st.info.Name), body); err != nil {
		cleanup()
		if errors.Is(err, jetstream.ErrKeyExists) {
			return nil, errs.New(errs.KindAlreadyExists, "stream %s already exists", st.info.Name)
		}
		return nil, engineErr(err, "registering stream %s", st.info.Name)
	}
	if err := s.loadMap(ctx, st); err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.streams[st.info.Name] = st
	s.mu.Unlock()
	s.metrics.created(st)
	s.log.Info("stream created", "stream", st.info.Name, "shards", n, "retention_hours", ret)
	return s.describe(st), nil
}

// DeleteStream deletes a stream and its records.
func (s *Store) DeleteStream(ctx context.Context, name string) error {
	if err := checkName("name", name); err != nil {
		return err
	}
	e, err := s.kv.Get(ctx, kvKey(name))
	if err != nil {
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			return errs.NotFound("stream %s not found", name)
		}
		return engineErr(err, "reading stream %s", name)
	}
	var info streamInfo
	if err := json.Unmarshal(e.Value(), &info); err != nil {
		return errs.Internal("decoding stream %s: %w", name, err)
	}
	if err := s.kv.Delete(ctx, kvKey(name), jetstream.LastRevision(e.Revision())); err != nil {
		if isWrongLastSeq(err) {
			return errs.Conflict("stream %s changed while being deleted; retry", name)
		}
		return engineErr(err, "deleting stream %s", name)
	}
	s.forget(name)
	st := &streamState{info: info}
	if err := s.js.DeleteStream(ctx, st.jsName()); err != nil && !errors.Is(err, jetstream.ErrStreamNotFound) {
		s.log.Warn("deleting stream storage; collected at the next start", "stream", name, "err", err)
	}
	s.metrics.deleted(name)
	s.log.Info("stream deleted", "stream", name)
	return nil
}

// ListStreams returns the stream names, sorted.
func (s *Store) ListStreams(ctx context.Context) ([]string, error) {
	infos, err := s.registry(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(infos))
	for _, in := range infos {
		out = append(out, in.Name)
	}
	sort.Strings(out)
	return out, nil
}

func (s *Store) registry(ctx context.Context) ([]streamInfo, error) {
	lister, err := s.kv.ListKeys(ctx)
	if err != nil {
		return nil, engineErr(err, "listing streams")
	}
	var out []streamInfo
	for k := range lister.Keys() {
		e, err := s.kv.Get(ctx, k)
		if err != nil {
			continue // deleted meanwhile
		}
		var in streamInfo
		if err := json.Unmarshal(e.Value(), &in); err != nil {
			return nil, errs.Internal("decoding stream record %s: %w", k, err)
		}
		out = append(out, in)
	}
	return out, nil
}

// DescribeStream returns a stream's description with every shard.
func (s *Store) DescribeStream(ctx context.Context, name string) (*skiffv1.StreamDescription, error) {
	st, err := s.fresh(ctx, name)
	if err != nil {
		return nil, err
	}
	return s.describe(st), nil
}

func (s *Store) describe(st *streamState) *skiffv1.StreamDescription {
	return &skiffv1.StreamDescription{
		Name:                 st.info.Name,
		Arn:                  s.arn(st.info.Name),
		Status:               "ACTIVE",
		RetentionPeriodHours: st.info.RetentionHours,
		Shards:               st.m.Load().protos(),
		Created:              st.info.Created.Format(time.RFC3339),
	}
}

// Exists reports whether a stream exists: nil, NotFound, or another error.
func (s *Store) Exists(ctx context.Context, stream string) error {
	if err := checkName("stream", stream); err != nil {
		return err
	}
	e, err := s.kv.Get(ctx, kvKey(stream))
	if err != nil {
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			s.forget(stream)
			return errs.NotFound("stream %s not found", stream)
		}
		return engineErr(err, "reading stream %s", stream)
	}
	var in streamInfo
	if err := json.Unmarshal(e.Value(), &in); err == nil {
		s.mu.Lock()
		if st := s.streams[stream]; st != nil && st.info.ID != in.ID {
			delete(s.streams, stream)
		}
		s.mu.Unlock()
	}
	return nil
}

// ARN returns a stream's ARN (whether or not it exists).
func (s *Store) ARN(stream string) string { return s.arn(stream) }

// Shards returns every shard of a stream, closed ones included, with their
// lineage, in creation order (parents before children).
func (s *Store) Shards(ctx context.Context, stream string) ([]*skiffv1.Shard, error) {
	st, err := s.fresh(ctx, stream)
	if err != nil {
		return nil, err
	}
	return st.m.Load().protos(), nil
}

// state returns the cached stream, loading it if needed.
func (s *Store) state(ctx context.Context, name string) (*streamState, error) {
	s.mu.Lock()
	st := s.streams[name]
	s.mu.Unlock()
	if st != nil {
		return st, nil
	}
	return s.load(ctx, name)
}

// fresh returns the stream with its current map.
func (s *Store) fresh(ctx context.Context, name string) (*streamState, error) {
	if err := checkName("stream", name); err != nil {
		return nil, err
	}
	st, err := s.state(ctx, name)
	if err != nil {
		return nil, err
	}
	if err := s.loadMap(ctx, st); err != nil {
		if !errs.IsNotFound(err) {
			return nil, err
		}
		s.forget(name)
		return s.load(ctx, name) // deleted and maybe re-created
	}
	return st, nil
}

func (s *Store) forget(name string) {
	s.mu.Lock()
	delete(s.streams, name)
	s.mu.Unlock()
}

// load reads a stream's record and map and caches it.
func (s *Store) load(ctx context.Context, name string) (*streamState, error) {
	e, err := s.kv.Get(ctx, kvKey(name))
	if err != nil {
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			return nil, errs.NotFound("stream %s not found", name)
		}
		return nil, engineErr(err, "reading stream %s", name)
	}
	st := &streamState{}
	if err := json.Unmarshal(e.Value(), &st.info); err != nil {
		return nil, errs.Internal("decoding stream %s: %w", name, err)
	}
	if err := s.loadMap(ctx, st); err != nil {
		return nil, err
	}
	s.mu.Lock()
	if cur := s.streams[name]; cur != nil && cur.info.ID == st.info.ID {
		st = cur
	} else {
		s.streams[name] = st
	}
	s.mu.Unlock()
	return st, nil
}

// loadMap reads the stream's current map into st (if newer than st's).
func (s *Store) loadMap(ctx context.Context, st *streamState) error {
	msgs, _, err := s.directGet(ctx, st, directReq{LastFor: st.mapSubject()})
	if err != nil {
		return err
	}
	if len(msgs) == 0 {
		return errs.NotFound("stream %s has no shard map", st.info.Name)
	}
	m, err := decodeMap(msgs[0].data, msgs[0].seq)
	if err != nil {
		return err
	}
	for {
		cur := st.m.Load()
		if cur != nil && cur.seq >= m.seq {
			return nil
		}
		if st.m.CompareAndSwap(cur, m) {
			s.metrics.mapLoaded(st, m)
			return nil
		}
	}
}

// publishMap stores doc as the stream's next map, expecting the current one
// at sequence prev.
func (s *Store) publishMap(ctx context.Context, st *streamState, doc mapDoc, prev uint64) (uint64, error) {
	body, err := json.Marshal(doc)
	if err != nil {
		return 0, errs.Internal("encoding shard map: %w", err)
	}
	msg := nats.NewMsg(st.mapSubject())
	msg.Data = body
	msg.Header.Set(hdrTTL, "never")
	ack, err := s.js.PublishMsg(ctx, msg, jetstream.WithExpectLastSequencePerSubject(prev))
	if err != nil {
		if isWrongLastSeq(err) {
			return 0, errs.Conflict("stream %s is being resharded; retry", st.info.Name)
		}
		if isStreamGone(err) {
			return 0, errs.NotFound("stream %s not found", st.info.Name)
		}
		return 0, engineErr(err, "storing the shard map of stream %s", st.info.Name)
	}
	return ack.Sequence, nil
}

// reshard applies edit to the stream's current map and stores the result
// atomically, retrying when another reshard won the race. edit validates
// against the current map; on error nothing is stored.
func (s *Store) reshard(ctx context.Context, name, op string, edit func(*editor) (bool, error)) (*shardMap, error) {
	if err := checkName("stream", name); err != nil {
		return nil, err
	}
	for attempt := 0; ; attempt++ {
		st, err := s.fresh(ctx, name)
		if err != nil {
			return nil, err
		}
		cur := st.m.Load()
		ed := newEditor(cur)
		changed, err := edit(ed)
		if err != nil {
			return nil, err
		}
		if !changed {
			return cur, nil
		}
		if n := len(ed.openShards()); n > MaxShards {
			return nil, errs.Invalid("stream", "resharding would leave %d open shards, over the limit of %d", n, MaxShards)
		}
		_, err = s.publishMap(ctx, st, ed.doc(), cur.seq)
		if errs.IsConflict(err) && attempt < reshardAttempts {
			continue
		}
		if err != nil {
			return nil, err
		}
		if err := s.loadMap(ctx, st); err != nil {
			return nil, err
		}
		s.deleteOldMap(ctx, st, cur.seq)
		s.metrics.reshards.WithLabelValues(name, op).Inc()
		m := st.m.Load()
		s.log.Info("stream resharded", "stream", name, "op", op, "open_shards", len(m.open), "map_seq", m.seq)
		return m, nil
	}
}

// deleteOldMap removes a superseded map message (it never expires).
func (s *Store) deleteOldMap(ctx context.Context, st *streamState, seq uint64) {
	js, err := s.js.Stream(ctx, st.jsName())
	if err == nil {
		err = js.DeleteMsg(ctx, seq)
	}
	if err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
		s.log.Debug("deleting a superseded shard map", "stream", st.info.Name, "seq", seq, "err", err)
	}
}

// SplitShard splits an open shard at newStart.
func (s *Store) SplitShard(ctx context.Context, req *skiffv1.SplitShardRequest) error {
	at, err := parseHashKey(req.GetNewStartingHashKey())
	if err != nil {
		return errs.Invalid("new_starting_hash_key", "%w", err)
	}
	_, err = s.reshard(ctx, req.GetStream(), "split", func(e *editor) (bool, error) {
		sh, err := e.openShard("shard_to_split", req.GetShardToSplit())
		if err != nil {
			return false, err
		}
		_, _, err = e.split("new_starting_hash_key", sh, at)
		return err == nil, err
	})
	return err
}

// MergeShards merges two adjacent open shards.
func (s *Store) MergeShards(ctx context.Context, req *skiffv1.MergeShardsRequest) error {
	if req.GetShardToMerge() == req.GetAdjacentShardToMerge() {
		return errs.Invalid("adjacent_shard_to_merge", "a shard cannot be merged with itself")
	}
	_, err := s.reshard(ctx, req.GetStream(), "merge", func(e *editor) (bool, error) {
		a, err := e.openShard("shard_to_merge", req.GetShardToMerge())
		if err != nil {
			return false, err
		}
		b, err := e.openShard("adjacent_shard_to_merge", req.GetAdjacentShardToMerge())
		if err != nil {
			return false, err
		}
		_, err = e.merge("adjacent_shard_to_merge", a, b)
		return err == nil, err
	})
	return err
}

// UpdateShardCount rescales to target open shards of uniform ranges. It
// returns the open shard counts before and after.
func (s *Store) UpdateShardCount(ctx context.Context, stream string, target int) (current, after int, err error) {
	if target < 1 || target > MaxShards {
		return 0, 0, errs.Invalid("target_shard_count", "target shard count %d is not in 1-%d", target, MaxShards)
	}
	m, err := s.reshard(ctx, stream, "scale", func(e *editor) (bool, error) {
		current = len(e.openShards())
		if target > 2*current || 2*target < current {
			return false, errs.Invalid("target_shard_count", "target shard count %d is not between half and double the %d open shards", target, current)
		}
		return e.scale(target)
	})
	if err != nil {
		return 0, 0, err
	}
	return current, len(m.open), nil
}

// collectOrphans deletes the JetStream streams of streams no longer in the
// registry (a deletion interrupted between its two steps), once they are
// older than a creation could take.
func (s *Store) collectOrphans(ctx context.Context) error {
	infos, err := s.registry(ctx)
	if err != nil {
		return err
	}
	live := map[string]bool{}
	for _, in := range infos {
		live[streamPrefix+in.ID] = true
	}
	lister := s.js.ListStreams(ctx, jetstream.WithStreamListSubject(subjectRoot+".>"))
	for info := range lister.Info() {
		name := info.Config.Name
		if !strings.HasPrefix(name, streamPrefix) || live[name] || time.Since(info.Created) < orphanGrace {
			continue
		}
		if err := s.js.DeleteStream(ctx, name); err != nil {
			s.log.Warn("deleting orphaned stream storage", "jetstream_stream", name, "err", err)
			continue
		}
		s.log.Info("deleted orphaned stream storage", "jetstream_stream", name)
	}
	return lister.Err()
}

// engineErr maps a JetStream error: context errors keep their kind,
// anything else is Unavailable.
func engineErr(err error, format string, args ...any) error {
	args = append(args, err)
	switch {
	case errors.Is(err, context.Canceled):
		return errs.New(errs.KindCanceled, format+": %w", args...)
	case errors.Is(err, context.DeadlineExceeded):
		return errs.New(errs.KindDeadlineExceeded, format+": %w", args...)
	}
	return errs.Unavailable(format+": %w", args...)
}

func isWrongLastSeq(err error) bool {
	var ae *jetstream.APIError
	if errors.As(err, &ae) {
		return ae.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence || ae.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant
	}
	return false
}

func isStreamGone(err error) bool {
	var ae *jetstream.APIError
	if errors.As(err, &ae) && ae.ErrorCode == jetstream.JSErrCodeStreamNotFound {
		return true
	}
	return errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrNoResponders) || errors.Is(err, jetstream.ErrStreamNotFound)
}

func formatSeq(seq uint64) string { return strconv.FormatUint(seq, 10) }
