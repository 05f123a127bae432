package kinesis

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

// Positions for SeqAt and GetShardIterator.
const (
	TrimHorizon         = "TRIM_HORIZON"
	Latest              = "LATEST"
	AtTimestamp         = "AT_TIMESTAMP"
	AtSequenceNumber    = "AT_SEQUENCE_NUMBER"
	AfterSequenceNumber = "AFTER_SEQUENCE_NUMBER"
)

const envelopeVersion = 1

// entry is one record to put, validated.
type entry struct {
	pk   string
	data []byte
	key  hashKey
}

// PutResult is the outcome of one record of a put.
type PutResult struct {
	ShardID        string
	SequenceNumber string
	Seq            uint64
	// Err is set when this record was not stored.
	Err error
}

func (s *Store) checkEntry(prefix, pk string, data []byte, explicit string) (entry, error) {
	if n := len(pk); n < 1 || n > MaxPartitionKeyLen {
		return entry{}, errs.Invalid(prefix+"partition_key", "partition key is %d characters, want 1-%d", n, MaxPartitionKeyLen)
	}
	if len(data) > s.maxData {
		return entry{}, errs.Invalid(prefix+"data", "record data is %d bytes, over the %d-byte limit", len(data), s.maxData)
	}
	e := entry{pk: pk, data: data}
	if explicit != "" {
		k, err := parseHashKey(explicit)
		if err != nil {
			return entry{}, errs.Invalid(prefix+"explicit_hash_key", "%w", err)
		}
		e.key = k
	} else {
		e.key = md5Key(pk)
	}
	return e, nil
}

// PutRecord stores one record.
func (s *Store) PutRecord(ctx context.Context, req *skiffv1.PutRecordRequest) (*skiffv1.PutRecordResponse, error) {
	if err := checkName("stream", req.GetStream()); err != nil {
		return nil, err
	}
	e, err := s.checkEntry("", req.GetPartitionKey(), req.GetData(), req.GetExplicitHashKey())
	if err != nil {
		return nil, err
	}
	res, err := s.put(ctx, req.GetStream(), []entry{e})
	if err != nil {
		return nil, err
	}
	if res[0].Err != nil {
		return nil, res[0].Err
	}
	return &skiffv1.PutRecordResponse{ShardId: res[0].ShardID, SequenceNumber: res[0].SequenceNumber}, nil
}

// PutRecords stores up to 500 records (5 MiB) with a result per record.
// Records of one call are not ordered among themselves (as in Kinesis).
func (s *Store) PutRecords(ctx context.Context, req *skiffv1.PutRecordsRequest) (*skiffv1.PutRecordsResponse, error) {
	if err := checkName("stream", req.GetStream()); err != nil {
		return nil, err
	}
	recs := req.GetRecords()
	if n := len(recs); n < 1 || n > MaxPutRecords {
		return nil, errs.Invalid("records", "%d records, want 1-%d", n, MaxPutRecords)
	}
	entries := make([]entry, len(recs))
	total := 0
	for i, r := range recs {
		e, err := s.checkEntry("records["+strconv.Itoa(i)+"].", r.GetPartitionKey(), r.GetData(), r.GetExplicitHashKey())
		if err != nil {
			return nil, err
		}
		total += len(r.GetData()) + len(r.GetPartitionKey())
		entries[i] = e
	}
	if total > MaxPutRecordsBytes {
		return nil, errs.Invalid("records", "records total %d bytes, over the %d-byte limit", total, MaxPutRecordsBytes)
	}
	res, err := s.put(ctx, req.GetStream(), entries)
	if err != nil {
		return nil, err
	}
	out := &skiffv1.PutRecordsResponse{Records: make([]*skiffv1.PutRecordsResult, len(res))}
	for i, r := range res {
		if r.Err != nil {
			out.FailedRecordCount++
			code := "InternalFailure"
			if errs.IsThrottled(r.Err) {
				code = "ProvisionedThroughputExceededException"
			}
			out.Records[i] = &skiffv1.PutRecordsResult{ErrorCode: code, ErrorMessage: r.Err.Error()}
			continue
		}
		out.Records[i] = &skiffv1.PutRecordsResult{ShardId: r.ShardID, SequenceNumber: r.SequenceNumber}
	}
	return out, nil
}

// Put stores validated-by-caller records (the in-process producer API):
// partition keys, data and optional explicit hash keys as in PutRecords.
func (s *Store) Put(ctx context.Context, stream string, recs []*skiffv1.PutRecordsEntry) ([]PutResult, error) {
	if err := checkName("stream", stream); err != nil {
		return nil, err
	}
	entries := make([]entry, len(recs))
	for i, r := range recs {
		e, err := s.checkEntry("records["+strconv.Itoa(i)+"].", r.GetPartitionKey(), r.GetData(), r.GetExplicitHashKey())
		if err != nil {
			return nil, err
		}
		entries[i] = e
	}
	return s.put(ctx, stream, entries)
}

// put publishes entries fenced by the map they were routed with; records
// rejected because the map changed are routed again with the new map.
// The error is for the whole call (the stream is gone); engine failures of
// single records are in their results.
func (s *Store) put(ctx context.Context, name string, entries []entry) ([]PutResult, error) {
	st, err := s.state(ctx, name)
	if err != nil {
		return nil, err
	}
	res := make([]PutResult, len(entries))
	pending := make([]int, len(entries))
	for i := range pending {
		pending[i] = i
	}
	arrival := s.now()
	for attempt := 0; len(pending) > 0; attempt++ {
		m := st.m.Load()
		type inflight struct {
			i   int
			sh  *shard
			fut jetstream.PubAckFuture
		}
		flights := make([]inflight, 0, len(pending))
		for _, i := range pending {
			e := entries[i]
			sh := m.route(e.key)
			if sh == nil {
				res[i].Err = errs.Internal("no open shard of stream %s holds hash key %s", name, e.key)
				continue
			}
			msg := &nats.Msg{Subject: st.shardSubject(sh.id), Header: nats.Header{}, Data: encodeEnvelope(arrival, e.pk, e.data)}
			msg.Header.Set(hdrExpectLastSubjSeq, strconv.FormatUint(m.seq, 10))
			msg.Header.Set(hdrExpectSubj, st.mapSubject())
			fut, err := s.publish(msg)
			if err != nil {
				res[i].Err = engineErr(err, "storing a record in stream %s", name)
				continue
			}
			flights = append(flights, inflight{i, sh, fut})
		}
		var stale []int
		gone := false
		for _, f := range flights {
			select {
			case ack := <-f.fut.Ok():
				res[f.i] = PutResult{ShardID: f.sh.id, Seq: ack.Sequence, SequenceNumber: formatSeq(ack.Sequence)}
				s.metrics.put(name, len(entries[f.i].data))
			case err := <-f.fut.Err():
				switch {
				case isWrongLastSeq(err):
					stale = append(stale, f.i)
				case isStreamGone(err):
					gone = true
					stale = append(stale, f.i)
				default:
					res[f.i].Err = engineErr(err, "storing a record in stream %s", name)
				}
			case <-ctx.Done():
				return nil, engineErr(ctx.Err(), "storing records in stream %s", name)
			}
		}
		if len(stale) == 0 {
			break
		}
		if attempt+1 >= putAttempts {
			for _, i := range stale {
				res[i].Err = errs.Throttled(50*time.Millisecond, "stream %s kept resharding; record not stored", name)
			}
			break
		}
		if gone {
			s.forget(name)
			if st, err = s.load(ctx, name); err != nil {
				return nil, err
			}
		} else if err := s.loadMap(ctx, st); err != nil {
			return nil, err
		}
		pending = stale
	}
	for _, r := range res {
		if r.Err != nil {
			s.metrics.putFailures.WithLabelValues(name).Inc()
		}
	}
	return res, nil
}

func encodeEnvelope(arrival time.Time, pk string, data []byte) []byte {
	b := make([]byte, envelopeOverhead+len(pk)+len(data))
	b[0] = envelopeVersion
	binary.BigEndian.PutUint64(b[1:9], uint64(arrival.UnixNano()))
	binary.BigEndian.PutUint16(b[9:11], uint16(len(pk)))
	copy(b[11:], pk)
	copy(b[11+len(pk):], data)
	return b
}

func decodeEnvelope(b []byte) (arrival time.Time, pk string, data []byte, err error) {
	if len(b) < envelopeOverhead || b[0] != envelopeVersion {
		return time.Time{}, "", nil, errs.Internal("malformed stream record envelope")
	}
	n := int(binary.BigEndian.Uint16(b[9:11]))
	if len(b) < envelopeOverhead+n {
		return time.Time{}, "", nil, errs.Internal("malformed stream record envelope")
	}
	return time.Unix(0, int64(binary.BigEndian.Uint64(b[1:9]))).UTC(), string(b[11 : 11+n]), b[11+n:], nil
}

// replyMux routes the replies of direct gets to their callers over one
// wildcard inbox subscription (a subscription per request costs a
// millisecond).
type replyMux struct {
	prefix string
	sub    *nats.Subscription

	mu      sync.Mutex
	next    uint64
	waiting map[string]*replyQueue // by inbox; guarded by mu
}

// replyQueue collects the replies of one request.
type replyQueue struct {
	mu     sync.Mutex
	msgs   []*nats.Msg // guarded by mu
	signal chan struct{}
}

func newReplyMux(nc *nats.Conn) (*replyMux, error) {
	m := &replyMux{prefix: nc.NewInbox() + ".", waiting: map[string]*replyQueue{}}
	sub, err := nc.Subscribe(m.prefix+"*", m.deliver)
	if err != nil {
		return nil, err
	}
	if err := sub.SetPendingLimits(-1, -1); err != nil {
		_ = sub.Unsubscribe()
		return nil, err
	}
	m.sub = sub
	return m, nil
}

func (m *replyMux) deliver(msg *nats.Msg) {
	m.mu.Lock()
	q := m.waiting[msg.Subject]
	m.mu.Unlock()
	if q == nil {
		return // a reply to a request that gave up
	}
	q.mu.Lock()
	q.msgs = append(q.msgs, msg)
	q.mu.Unlock()
	select {
	case q.signal <- struct{}{}:
	default:
	}
}

func (m *replyMux) open() (string, *replyQueue) {
	q := &replyQueue{signal: make(chan struct{}, 1)}
	m.mu.Lock()
	m.next++
	inbox := m.prefix + strconv.FormatUint(m.next, 36)
	m.waiting[inbox] = q
	m.mu.Unlock()
	return inbox, q
}

func (m *replyMux) done(inbox string) {
	m.mu.Lock()
	delete(m.waiting, inbox)
	m.mu.Unlock()
}

// take waits for and returns the replies received so far.
func (q *replyQueue) take(ctx context.Context) ([]*nats.Msg, error) {
	for {
		q.mu.Lock()
		msgs := q.msgs
		q.msgs = nil
		q.mu.Unlock()
		if len(msgs) > 0 {
			return msgs, nil
		}
		select {
		case <-q.signal:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// directReq is a JetStream direct get request.
type directReq struct {
	Seq      uint64 `json:"seq,omitempty"`
	LastFor  string `json:"last_by_subj,omitempty"`
	NextFor  string `json:"next_by_subj,omitempty"`
	Batch    int    `json:"batch,omitempty"`
	MaxBytes int    `json:"max_bytes,omitempty"`
}

type rawMsg struct {
	seq     uint64
	subject string
	data    []byte
}

// directGet runs a direct get (batched when req.Batch > 0) and returns the
// messages and, for a batch, how many matching messages follow the last.
func (s *Store) directGet(ctx context.Context, st *streamState, req directReq) ([]rawMsg, uint64, error) {
	body, _ := json.Marshal(req)
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, directGetTimeout)
		defer cancel()
	}
	inbox, q := s.replies.open()
	defer s.replies.done(inbox)
	if err := s.nc.PublishRequest("$JS.API.DIRECT.GET."+st.jsName(), inbox, body); err != nil {
		return nil, 0, engineErr(err, "reading stream %s", st.info.Name)
	}
	var out []rawMsg
	for {
		msgs, err := q.take(ctx)
		if err != nil {
			return nil, 0, engineErr(err, "reading stream %s", st.info.Name)
		}
		for _, m := range msgs {
			switch m.Header.Get("Status") {
			case "":
			case "404":
				return out, 0, nil
			case "204": // end of batch
				np, _ := strconv.ParseUint(m.Header.Get("Nats-Num-Pending"), 10, 64)
				return out, np, nil
			case "503":
				return nil, 0, errs.NotFound("stream %s not found", st.info.Name)
			default:
				return nil, 0, errs.Unavailable("reading stream %s: status %s %s", st.info.Name, m.Header.Get("Status"), m.Header.Get("Description"))
			}
			seq, err := strconv.ParseUint(m.Header.Get("Nats-Sequence"), 10, 64)
			if err != nil {
				return nil, 0, errs.Internal("reading stream %s: bad sequence header: %w", st.info.Name, err)
			}
			out = append(out, rawMsg{seq: seq, subject: m.Header.Get("Nats-Subject"), data: m.Data})
			if req.Batch == 0 {
				return out, 0, nil
			}
		}
	}
}

// shardOf looks a shard up in st's map, reloading it once if unknown.
func (s *Store) shardOf(ctx context.Context, st *streamState, id string) (*shard, error) {
	if sh := st.m.Load().byID[id]; sh != nil {
		return sh, nil
	}
	if err := s.loadMap(ctx, st); err != nil {
		return nil, err
	}
	if sh := st.m.Load().byID[id]; sh != nil {
		return sh, nil
	}
	return nil, errs.NotFound("shard %s of stream %s not found", id, st.info.Name)
}

// readResult is a read of one shard.
type readResult struct {
	recs     []StoredRecord
	shardEnd bool
	pending  uint64 // records of the shard after the last one read
}

// Read returns up to limit records (≤ 0 means 10000; at most 10 MiB of
// data, but always at least one record) of a shard with sequence > after,
// in order, skipping records past the retention period. shardEnd is true
// when the shard is closed and no record follows after.
func (s *Store) Read(ctx context.Context, stream, shardID string, after uint64, limit int) ([]StoredRecord, bool, error) {
	if err := checkName("stream", stream); err != nil {
		return nil, false, err
	}
	st, err := s.state(ctx, stream)
	if err != nil {
		return nil, false, err
	}
	r, err := s.read(ctx, st, shardID, after, limit)
	if errs.IsNotFound(err) {
		// Deleted, or deleted and re-created: look again once.
		s.forget(stream)
		if st, err = s.load(ctx, stream); err != nil {
			return nil, false, err
		}
		r, err = s.read(ctx, st, shardID, after, limit)
	}
	if err != nil {
		return nil, false, err
	}
	return r.recs, r.shardEnd, nil
}

func (s *Store) read(ctx context.Context, st *streamState, shardID string, after uint64, limit int) (readResult, error) {
	if limit <= 0 || limit > MaxGetRecords {
		limit = MaxGetRecords
	}
	sh, err := s.shardOf(ctx, st, shardID)
	if err != nil {
		return readResult{}, err
	}
	r, err := s.readShard(ctx, st, sh, after, limit)
	if err != nil {
		return readResult{}, err
	}
	if len(r.recs) == 0 && sh.open() {
		// Caught up on a shard we believe open: it may have been closed.
		if err := s.loadMap(ctx, st); err != nil {
			return readResult{}, err
		}
		if now := st.m.Load().byID[shardID]; now != nil && !now.open() {
			if r, err = s.readShard(ctx, st, now, after, limit); err != nil {
				return readResult{}, err
			}
		}
	}
	return r, nil
}

// readShard reads sh's records after `after` through a cursor. A closed
// shard's records all lie below its close sequence, and nothing is added
// to it any more, so no pending record means shard end.
func (s *Store) readShard(ctx context.Context, st *streamState, sh *shard, after uint64, limit int) (readResult, error) {
	horizon := s.now().Add(-st.retention())
	var out readResult
	if !sh.open() && after+1 >= sh.closeSeq {
		out.shardEnd = true
		return out, nil
	}
	key := cursorKey{st.info.ID, sh.id, after + 1}
	cur := s.cursors.take(key)
	if cur == nil {
		var err error
		if cur, err = s.openCursor(ctx, st, sh, after+1); err != nil {
			return readResult{}, err
		}
	}
	budget := MaxGetRecordsBytes
	next := after + 1
	for len(out.recs) < limit {
		msgs, np, ok, err := s.pull(ctx, st, cur, limit-len(out.recs), budget, 0)
		if err == nil && ok && len(msgs) == 0 {
			// Nothing: unless the consumer has not yet learned of a
			// record the stream already holds.
			var lag bool
			if lag, err = s.hasRecord(ctx, st, sh, next); err == nil && lag {
				msgs, np, ok, err = s.pull(ctx, st, cur, limit-len(out.recs), budget, lagWait)
			}
		}
		if err != nil {
			s.dropCursors(cur)
			return readResult{}, err
		}
		if !ok { // the pull ended early: the cursor's position is unknown
			s.dropCursors(cur)
			cur = nil
		}
		out.pending = np
		for _, m := range msgs {
			next = m.seq + 1
			arrival, pk, data, err := decodeEnvelope(m.data)
			if err != nil {
				if cur != nil {
					s.dropCursors(cur)
				}
				return readResult{}, err
			}
			if arrival.Before(horizon) {
				continue // past retention
			}
			budget -= len(data)
			out.recs = append(out.recs, StoredRecord{
				Seq: m.seq, SequenceNumber: formatSeq(m.seq), PartitionKey: pk, Data: data, Arrival: arrival, ShardID: sh.id,
			})
		}
		if cur == nil || len(msgs) == 0 || np == 0 || budget <= 0 || len(out.recs) > 0 {
			break
		}
		// Only expired records so far: go on.
	}
	if cur != nil {
		cur.key.next = next
		s.dropCursors(s.cursors.put(cur, time.Now())...)
	}
	if len(out.recs) > 0 {
		s.metrics.read(st.info.Name, len(out.recs))
	}
	out.shardEnd = !sh.open() && out.pending == 0 && cur != nil
	return out, nil
}

// hasRecord reports whether sh holds a record at or after seq.
func (s *Store) hasRecord(ctx context.Context, st *streamState, sh *shard, seq uint64) (bool, error) {
	msgs, _, err := s.directGet(ctx, st, directReq{Seq: seq, NextFor: st.shardSubject(sh.id)})
	if err != nil || len(msgs) == 0 {
		return false, err
	}
	return sh.open() || msgs[0].seq < sh.closeSeq, nil
}

// SeqAt returns the `after` to read a shard from for a starting position:
// TRIM_HORIZON, LATEST or AT_TIMESTAMP (ts).
func (s *Store) SeqAt(ctx context.Context, stream, shardID, pos string, ts time.Time) (uint64, error) {
	if err := checkName("stream", stream); err != nil {
		return 0, err
	}
	st, err := s.fresh(ctx, stream)
	if err != nil {
		return 0, err
	}
	sh, err := s.shardOf(ctx, st, shardID)
	if err != nil {
		return 0, err
	}
	switch pos {
	case TrimHorizon:
		return sh.startSeq - 1, nil
	case Latest:
		return s.latest(ctx, st, sh)
	case AtTimestamp:
		return s.atTimestamp(ctx, st, sh, ts)
	}
	return 0, errs.Invalid("starting_position", "starting position %q is not TRIM_HORIZON, LATEST or AT_TIMESTAMP", pos)
}

// latest is the sequence of the shard's last record (or one before its
// range when it has none).
func (s *Store) latest(ctx context.Context, st *streamState, sh *shard) (uint64, error) {
	if !sh.open() {
		return sh.closeSeq - 1, nil
	}
	msgs, _, err := s.directGet(ctx, st, directReq{LastFor: st.shardSubject(sh.id)})
	if err != nil {
		return 0, err
	}
	if len(msgs) == 0 {
		return sh.startSeq - 1, nil
	}
	return msgs[0].seq, nil
}

// atTimestamp finds, by binary search over sequences, the first record
// that arrived at or after ts (arrivals grow with sequences within a
// shard), and returns the sequence before it.
func (s *Store) atTimestamp(ctx context.Context, st *streamState, sh *shard, ts time.Time) (uint64, error) {
	last, err := s.latest(ctx, st, sh)
	if err != nil {
		return 0, err
	}
	subj := st.shardSubject(sh.id)
	// first(x) is the first record with sequence ≥ x.
	first := func(x uint64) (rawMsg, time.Time, bool, error) {
		msgs, _, err := s.directGet(ctx, st, directReq{Seq: x, NextFor: subj})
		if err != nil || len(msgs) == 0 || msgs[0].seq > last {
			return rawMsg{}, time.Time{}, false, err
		}
		arrival, _, _, err := decodeEnvelope(msgs[0].data)
		return msgs[0], arrival, err == nil, err
	}
	lo, hi := sh.startSeq, last+1 // answer in [lo, hi]; hi means none
	for lo < hi {
		mid := lo + (hi-lo)/2
		m, arrival, ok, err := first(mid)
		if err != nil {
			return 0, err
		}
		if !ok {
			hi = mid
			continue
		}
		if !arrival.Before(ts) {
			hi = min(mid, m.seq)
		} else {
			lo = m.seq + 1
		}
	}
	if lo > last {
		return last, nil
	}
	m, _, ok, err := first(lo)
	if err != nil {
		return 0, err
	}
	if !ok {
		return last, nil
	}
	return m.seq - 1, nil
}

// Watch signals (coalesced) every new record and every reshard of a
// stream until ctx ends. The channel is never closed.
func (s *Store) Watch(ctx context.Context, stream string) (<-chan struct{}, error) {
	if err := checkName("stream", stream); err != nil {
		return nil, err
	}
	st, err := s.state(ctx, stream)
	if err != nil {
		return nil, err
	}
	ch := make(chan struct{}, 1)
	sub, err := s.nc.Subscribe(subjectRoot+"."+st.info.ID+".>", func(*nats.Msg) {
		select {
		case ch <- struct{}{}:
		default:
		}
	})
	if err != nil {
		return nil, engineErr(err, "watching stream %s", stream)
	}
	context.AfterFunc(ctx, func() { _ = sub.Unsubscribe() })
	return ch, nil
}

// iterator is the content of a shard iterator token.
type iterator struct {
	Stream string `json:"s"`
	ID     string `json:"i"`
	Shard  string `json:"h"`
	After  uint64 `json:"a"`
	Issued int64  `json:"t"` // unix ms
}

func (s *Store) encodeIterator(st *streamState, shardID string, after uint64) string {
	b, _ := json.Marshal(iterator{Stream: st.info.Name, ID: st.info.ID, Shard: shardID, After: after, Issued: s.now().UnixMilli()})
	return base64.RawURLEncoding.EncodeToString(b)
}

func (s *Store) decodeIterator(tok string) (iterator, error) {
	var it iterator
	b, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil || json.Unmarshal(b, &it) != nil || it.Stream == "" || it.Shard == "" {
		return iterator{}, errs.Invalid("shard_iterator", "malformed shard iterator")
	}
	if age := s.now().Sub(time.UnixMilli(it.Issued)); age > IteratorLifetime {
		return iterator{}, errs.New(errs.KindFailedPrecondition, "shard iterator expired %v ago", (age - IteratorLifetime).Round(time.Second)).WithReason("expired_iterator")
	}
	return it, nil
}

// GetShardIterator returns an iterator token for a shard position.
func (s *Store) GetShardIterator(ctx context.Context, req *skiffv1.GetShardIteratorRequest) (string, error) {
	st, err := s.fresh(ctx, req.GetStream())
	if err != nil {
		return "", err
	}
	if req.GetShardId() == "" {
		return "", errs.Invalid("shard_id", "shard id is required")
	}
	sh, err := s.shardOf(ctx, st, req.GetShardId())
	if err != nil {
		return "", err
	}
	var after uint64
	switch req.GetType() {
	case skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_TRIM_HORIZON:
		after = sh.startSeq - 1
	case skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_LATEST:
		if after, err = s.latest(ctx, st, sh); err != nil {
			return "", err
		}
	case skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AT_SEQUENCE_NUMBER, skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AFTER_SEQUENCE_NUMBER:
		seq, err := s.checkSeq(ctx, st, sh, req.GetStartingSequenceNumber())
		if err != nil {
			return "", err
		}
		after = seq
		if req.GetType() == skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AT_SEQUENCE_NUMBER {
			after = seq - 1
		}
	case skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AT_TIMESTAMP:
		ts, err := time.Parse(time.RFC3339Nano, req.GetTimestamp())
		if err != nil {
			return "", errs.Invalid("timestamp", "timestamp %q is not RFC 3339", req.GetTimestamp())
		}
		if after, err = s.atTimestamp(ctx, st, sh, ts); err != nil {
			return "", err
		}
	default:
		return "", errs.Invalid("type", "shard iterator type %v is not supported", req.GetType())
	}
	return s.encodeIterator(st, sh.id, after), nil
}

// checkSeq parses a sequence number and checks that it belongs to sh.
func (s *Store) checkSeq(ctx context.Context, st *streamState, sh *shard, str string) (uint64, error) {
	seq, err := strconv.ParseUint(str, 10, 64)
	if err != nil || seq == 0 {
		return 0, errs.Invalid("starting_sequence_number", "sequence number %q is not a positive decimal number", str)
	}
	if seq < sh.startSeq || (!sh.open() && seq >= sh.closeSeq) {
		return 0, errs.Invalid("starting_sequence_number", "sequence number %d is not in shard %s", seq, sh.id)
	}
	msgs, _, err := s.directGet(ctx, st, directReq{Seq: seq})
	if err != nil {
		return 0, err
	}
	if len(msgs) == 1 && msgs[0].seq == seq && msgs[0].subject != st.shardSubject(sh.id) {
		return 0, errs.Invalid("starting_sequence_number", "sequence number %d is not in shard %s", seq, sh.id)
	}
	return seq, nil
}

// GetRecords reads from an iterator.
func (s *Store) GetRecords(ctx context.Context, req *skiffv1.GetRecordsRequest) (*skiffv1.GetRecordsResponse, error) {
	limit := int(req.GetLimit())
	if limit < 0 || limit > MaxGetRecords {
		return nil, errs.Invalid("limit", "limit %d is not in 1-%d", limit, MaxGetRecords)
	}
	it, err := s.decodeIterator(req.GetShardIterator())
	if err != nil {
		return nil, err
	}
	st, err := s.state(ctx, it.Stream)
	if err != nil {
		return nil, err
	}
	if st.info.ID != it.ID {
		if err := s.Exists(ctx, it.Stream); err != nil {
			return nil, err
		}
		if st, err = s.state(ctx, it.Stream); err != nil {
			return nil, err
		}
		if st.info.ID != it.ID {
			return nil, errs.NotFound("the stream of this shard iterator was deleted")
		}
	}
	r, err := s.read(ctx, st, it.Shard, it.After, limit)
	if err != nil {
		return nil, err
	}
	out := &skiffv1.GetRecordsResponse{Records: make([]*skiffv1.Record, len(r.recs))}
	after := it.After
	for i, rec := range r.recs {
		out.Records[i] = &skiffv1.Record{
			SequenceNumber:              rec.SequenceNumber,
			ApproximateArrivalTimestamp: rec.Arrival.Format("2006-01-02T15:04:05.000Z07:00"),
			Data:                        rec.Data,
			PartitionKey:                rec.PartitionKey,
		}
		after = rec.Seq
	}
	if r.pending > 0 && len(r.recs) > 0 {
		out.MillisBehindLatest = max(0, s.now().Sub(r.recs[len(r.recs)-1].Arrival).Milliseconds())
	}
	if r.shardEnd {
		out.ChildShards = st.m.Load().children(it.Shard)
	} else {
		out.NextShardIterator = s.encodeIterator(st, it.Shard, after)
	}
	return out, nil
}
