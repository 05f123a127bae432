package queue

import (
	"context"
	"encoding/json"
	"errors"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
)

// queueRecord is the value stored in the "queues" bucket.
type queueRecord struct {
	Queue []byte `json:"queue"` // proto-marshalled skiffv1.Queue
	Floor uint64 `json:"floor"` // first stream sequence of this incarnation
}

// queueMeta is a queue as the index knows it. Values are replaced, never
// mutated, so a pointer read under mu may be used after unlocking.
type queueMeta struct {
	q       *skiffv1.Queue
	token   string
	floor   uint64
	rev     uint64
	deleted bool
}

func (q *queueMeta) fifo() bool { return q.q.GetConfig().GetFifo() }

func (q *queueMeta) visibility() time.Duration {
	return time.Duration(q.q.GetConfig().GetVisibilityTimeoutSeconds()) * time.Second
}

func (q *queueMeta) retention() time.Duration {
	return time.Duration(q.q.GetConfig().GetMessageRetentionSeconds()) * time.Second
}

// msgState is the value stored in the "queuestate" bucket.
type msgState struct {
	VisibleAt    int64  `json:"v"` // unix ms
	Receives     int    `json:"n"`
	FirstReceive int64  `json:"f"` // unix ms
	Nonce        string `json:"h"`
}

// entry is one message in the index.
type entry struct {
	seq       uint64
	sent      int64 // unix ms
	visibleAt int64 // unix ms: receivable from then on
	receives  int
	first     int64
	rev       uint64 // state revision; 0 = never received
	group     string
	body      bool // the message itself has been seen, not only its state
	claiming  bool // a receive in this process is claiming it
}

func (e *entry) inFlight(now int64) bool { return e.rev != 0 && e.receives > 0 && e.visibleAt > now }

func (e *entry) delayed(now int64) bool { return e.receives == 0 && e.visibleAt > now }

// qcache indexes one queue's messages (by token).
type qcache struct {
	seqs  []uint64 // ascending; may hold sequences no longer in msgs
	msgs  map[uint64]*entry
	floor uint64
}

func newQcache() *qcache { return &qcache{msgs: map[uint64]*entry{}} }

// getOrAdd returns the entry for seq, adding it; nil below the floor.
func (c *qcache) getOrAdd(seq uint64) *entry {
	if seq < c.floor {
		return nil
	}
	if e := c.msgs[seq]; e != nil {
		return e
	}
	e := &entry{seq: seq}
	c.msgs[seq] = e
	n := len(c.seqs)
	if n == 0 || c.seqs[n-1] < seq {
		c.seqs = append(c.seqs, seq)
	} else {
		i := sort.Search(n, func(i int) bool { return c.seqs[i] >= seq })
		if i == n || c.seqs[i] != seq {
			c.seqs = append(c.seqs, 0)
			copy(c.seqs[i+1:], c.seqs[i:])
			c.seqs[i] = seq
		}
	}
	return e
}

func (c *qcache) drop(seq uint64) {
	delete(c.msgs, seq)
	if len(c.seqs) > 64 && len(c.seqs) > 2*len(c.msgs) {
		c.compact()
	}
}

func (c *qcache) compact() {
	out := c.seqs[:0]
	for _, s := range c.seqs {
		if _, ok := c.msgs[s]; ok {
			out = append(out, s)
		}
	}
	c.seqs = out
}

func (c *qcache) setFloor(floor uint64) {
	if floor <= c.floor {
		return
	}
	c.floor = floor
	for seq := range c.msgs {
		if seq < floor {
			delete(c.msgs, seq)
		}
	}
	c.compact()
}

// each calls fn for the indexed messages in sequence order until fn
// returns false.
func (c *qcache) each(fn func(*entry) bool) {
	for _, s := range c.seqs {
		if e := c.msgs[s]; e != nil && e.body {
			if !fn(e) {
				return
			}
		}
	}
}

// cacheLocked returns the index of a token, creating it.
func (m *Manager) cacheLocked(tok string) *qcache {
	c := m.caches[tok]
	if c == nil {
		c = newQcache()
		m.caches[tok] = c
	}
	return c
}

// notifyLocked wakes every long poll.
func (m *Manager) notifyLocked() {
	close(m.changed)
	m.changed = make(chan struct{})
}

func (m *Manager) changedCh() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.changed
}

// applyQueue records a queue's metadata (rev orders local and watched
// writes).
func (m *Manager) applyQueue(name string, rev uint64, rec *queueRecord) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.applyQueueLocked(name, rev, rec)
}

func (m *Manager) applyQueueLocked(name string, rev uint64, rec *queueRecord) {
	if old := m.queues[name]; old != nil && old.rev >= rev {
		return
	}
	tok := token(name)
	if rec == nil {
		m.queues[name] = &queueMeta{token: tok, rev: rev, deleted: true}
		delete(m.caches, tok)
		m.metrics.forget(name)
		m.notifyLocked()
		return
	}
	q := &skiffv1.Queue{}
	if err := proto.Unmarshal(rec.Queue, q); err != nil {
		m.log.Error("bad queue record", "queue", name, "err", err)
		return
	}
	m.queues[name] = &queueMeta{q: q, token: tok, floor: rec.Floor, rev: rev}
	m.cacheLocked(tok).setFloor(rec.Floor)
	m.notifyLocked()
}

// applyBody records a stored message (from its headers); watched is set
// for the message watcher's deliveries.
func (m *Manager) applyBody(tok string, seq uint64, sent, visible int64, group string, watched bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if watched && seq > m.bodySeen {
		m.bodySeen = seq
	}
	if _, deleted := m.gone[seq]; deleted {
		if watched {
			delete(m.gone, seq)
		}
		return
	}
	e := m.cacheLocked(tok).getOrAdd(seq)
	if e == nil || e.body {
		return
	}
	e.body, e.sent, e.group = true, sent, group
	if e.rev == 0 {
		e.visibleAt = visible
	}
	m.notifyLocked()
}

// applyState records a message's receive state at revision rev.
func (m *Manager) applyState(tok string, seq, rev uint64, st *msgState) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.applyStateLocked(tok, seq, rev, st)
}

func (m *Manager) applyStateLocked(tok string, seq, rev uint64, st *msgState) {
	c := m.caches[tok]
	if c == nil {
		c = m.cacheLocked(tok)
	}
	if st == nil { // deleted
		m.goneLocked(seq)
		if c.msgs[seq] != nil {
			c.drop(seq)
			m.notifyLocked()
		}
		return
	}
	e := c.getOrAdd(seq)
	if e == nil || e.rev >= rev {
		return
	}
	e.rev, e.visibleAt, e.receives, e.first = rev, st.VisibleAt, st.Receives, st.FirstReceive
	m.notifyLocked()
}

// goneLocked notes that seq was deleted, if the watcher has yet to
// deliver it.
func (m *Manager) goneLocked(seq uint64) {
	if seq > m.bodySeen {
		m.gone[seq] = struct{}{}
	}
}

// pruneGone forgets the deleted sequences the watcher has passed (it
// skips messages deleted before it got to them).
func (m *Manager) pruneGone() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for s := range m.gone {
		if s <= m.bodySeen {
			delete(m.gone, s)
		}
	}
}

// forget drops a deleted message from the index.
func (m *Manager) forget(tok string, seq uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.goneLocked(seq)
	if c := m.caches[tok]; c != nil && c.msgs[seq] != nil {
		c.drop(seq)
		m.notifyLocked()
	}
}

// refresh re-reads a message's state after a failed compare-and-set.
func (m *Manager) refresh(ctx context.Context, tok string, seq uint64) {
	raw, err := m.stateStream.GetLastMsgForSubject(ctx, statePrefix+stateKey(tok, seq))
	switch {
	case isNotFound(err):
		// No state at all (purged): the message is unreceived again.
		m.mu.Lock()
		if c := m.caches[tok]; c != nil {
			if e := c.msgs[seq]; e != nil {
				e.rev, e.receives, e.first = 0, 0, 0
				m.notifyLocked()
			}
		}
		m.mu.Unlock()
		return
	case err != nil:
		m.log.Warn("refreshing message state", "token", tok, "seq", seq, "err", err)
		return
	}
	if op := raw.Header.Get("KV-Operation"); op != "" {
		m.applyState(tok, seq, raw.Sequence, nil)
		return
	}
	var st msgState
	if err := json.Unmarshal(raw.Data, &st); err != nil {
		m.log.Error("bad message state", "token", tok, "seq", seq, "err", err)
		return
	}
	m.applyState(tok, seq, raw.Sequence, &st)
}

func isNotFound(err error) bool {
	return err != nil && (errors.Is(err, jetstream.ErrMsgNotFound) || errors.Is(err, jetstream.ErrKeyNotFound))
}

// startWatchers loads the index and keeps it current until wctx ends.
func (m *Manager) startWatchers(ctx, wctx context.Context) error {
	qw, err := m.queuesKV.WatchAll(wctx)
	if err != nil {
		return engineErr(err, "watching kv bucket %s", BucketQueues)
	}
	m.stops = append(m.stops, func() { _ = qw.Stop() })
	sw, err := m.stateKV.WatchAll(wctx)
	if err != nil {
		return engineErr(err, "watching kv bucket %s", BucketState)
	}
	m.stops = append(m.stops, func() { _ = sw.Stop() })

	queuesReady := make(chan struct{})
	stateReady := make(chan struct{})
	bodiesReady := make(chan struct{})
	m.wg.Add(2)
	go m.watchKV(wctx, qw, queuesReady, m.onQueueEntry)
	go m.watchKV(wctx, sw, stateReady, m.onStateEntry)

	info, err := m.stream.Info(ctx)
	if err != nil {
		return engineErr(err, "reading stream %s", StreamName)
	}
	if info.State.Msgs == 0 {
		close(bodiesReady)
	}
	cons, err := m.stream.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{subjectRoot + ".*.m"},
		HeadersOnly:    true,
	})
	if err != nil {
		return engineErr(err, "watching stream %s", StreamName)
	}
	var once bool
	cc, err := cons.Consume(func(msg jetstream.Msg) {
		md, err := msg.Metadata()
		if err != nil {
			return
		}
		m.onBody(msg.Subject(), md.Sequence.Stream, msg.Headers())
		if md.NumPending == 0 && !once {
			once = true
			if info.State.Msgs != 0 {
				close(bodiesReady)
			}
		}
	})
	if err != nil {
		return engineErr(err, "watching stream %s", StreamName)
	}
	m.stops = append(m.stops, cc.Stop)
	for _, ch := range []chan struct{}{queuesReady, stateReady} {
		select {
		case <-ch:
		case <-ctx.Done():
			return engineErr(ctx.Err(), "loading the queue index")
		}
	}
	// The stream may have been emptied after it was read: then no message
	// will ever say it was the last one.
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-bodiesReady:
			return nil
		case <-ctx.Done():
			return engineErr(ctx.Err(), "loading the queue index")
		case <-tick.C:
			if info, err := m.stream.Info(ctx); err == nil && info.State.Msgs == 0 {
				return nil
			}
		}
	}
}

func (m *Manager) watchKV(ctx context.Context, w jetstream.KeyWatcher, ready chan struct{}, apply func(jetstream.KeyValueEntry)) {
	defer m.wg.Done()
	initial := true
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-w.Updates():
			if !ok {
				return
			}
			if e == nil {
				if initial {
					initial = false
					close(ready)
				}
				continue
			}
			apply(e)
		}
	}
}

func (m *Manager) onQueueEntry(e jetstream.KeyValueEntry) {
	if e.Operation() != jetstream.KeyValuePut {
		m.applyQueue(e.Key(), e.Revision(), nil)
		return
	}
	var rec queueRecord
	if err := json.Unmarshal(e.Value(), &rec); err != nil {
		m.log.Error("bad queue record", "queue", e.Key(), "err", err)
		return
	}
	m.applyQueue(e.Key(), e.Revision(), &rec)
}

func (m *Manager) onStateEntry(e jetstream.KeyValueEntry) {
	i := strings.LastIndexByte(e.Key(), '.')
	if i < 0 {
		return
	}
	seq, err := strconv.ParseUint(e.Key()[i+1:], 10, 64)
	if err != nil {
		return
	}
	tok := e.Key()[:i]
	if e.Operation() != jetstream.KeyValuePut {
		m.applyState(tok, seq, e.Revision(), nil)
		return
	}
	var st msgState
	if err := json.Unmarshal(e.Value(), &st); err != nil {
		m.log.Error("bad message state", "key", e.Key(), "err", err)
		return
	}
	m.applyState(tok, seq, e.Revision(), &st)
}

func (m *Manager) onBody(subject string, seq uint64, h interface{ Get(string) string }) {
	parts := strings.Split(subject, ".")
	if len(parts) != 3 {
		return
	}
	sent, _ := strconv.ParseInt(h.Get(hdrSent), 10, 64)
	visible, _ := strconv.ParseInt(h.Get(hdrVisible), 10, 64)
	m.applyBody(parts[1], seq, sent, visible, h.Get(hdrGroup), true)
}
