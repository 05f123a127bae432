package async

import (
	"context"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"skiff.dev/skiff/internal/uuid"
)

// Group commit. Each queue subject has a lane. An accept joins the lane's
// open group; when no write of the lane is in flight the group is written
// at once (a lone request waits for nothing), else it waits until the
// write in flight is acknowledged and is then written as one message,
// however many accepts joined it meanwhile. JetStream stores (and, with
// durability always, fsyncs) that one message, and every accept of the
// group returns after its ack: one fsync for the group instead of one per
// event. A group of one event is stored as today's single-event message
// (deduplicated by JetStream with the request id as its message id); a
// larger one as a batch message (batch.go). A group is bounded by
// Config.GroupEvents and Config.GroupBytes; an accept that does not fit
// opens the next group.

// pendingAccept is one accept waiting for its group's write.
type pendingAccept struct {
	ev   event
	done chan struct{}
	err  error // set before done is closed
	dup  bool  // JetStream reported the single-event message a duplicate
}

// group is the accepts written together.
type group struct {
	accepts []*pendingAccept
	bytes   int
}

// lane is the group commit of one queue subject.
type lane struct {
	subject string

	mu       sync.Mutex
	inFlight bool     // guarded by mu: a write of this lane is under way
	queued   []*group // guarded by mu: groups waiting for the write in flight; the last one is open
}

// laneFor returns the lane of a subject.
func (s *Service) laneFor(subject string) *lane {
	s.lanesMu.Lock()
	defer s.lanesMu.Unlock()
	l, ok := s.lanes[subject]
	if !ok {
		l = &lane{subject: subject}
		s.lanes[subject] = l
	}
	return l
}

// commit adds p to its lane and returns once p's group is stored (or its
// write failed).
func (s *Service) commit(ctx context.Context, l *lane, p *pendingAccept) error {
	size := p.ev.encodedSize()
	l.mu.Lock()
	if !l.inFlight {
		l.inFlight = true
		l.mu.Unlock()
		s.write(l, &group{accepts: []*pendingAccept{p}, bytes: size})
	} else {
		n := len(l.queued)
		if n == 0 || len(l.queued[n-1].accepts) >= s.cfg.GroupEvents || l.queued[n-1].bytes+size > s.cfg.GroupBytes {
			l.queued = append(l.queued, &group{})
			n++
		}
		g := l.queued[n-1]
		g.accepts = append(g.accepts, p)
		g.bytes += size
		l.mu.Unlock()
	}
	select {
	case <-p.done:
		return p.err
	case <-ctx.Done():
		// The group is written anyway; the caller learns nothing more.
		return publishErr(ctx.Err())
	}
}

// write stores g and then every group queued meanwhile, one at a time,
// until the lane has nothing queued. The first group is written on the
// caller's goroutine; later ones on a goroutine of their own, so the
// caller returns as soon as its own group is stored.
func (s *Service) write(l *lane, g *group) {
	s.store(l.subject, g)
	l.mu.Lock()
	if len(l.queued) == 0 {
		l.inFlight = false
		l.mu.Unlock()
		return
	}
	next := l.queued[0]
	l.queued = l.queued[1:]
	l.mu.Unlock()
	go s.write(l, next)
}

// store writes one group and completes its accepts.
func (s *Service) store(subject string, g *group) {
	ctx, cancel := context.WithTimeout(context.Background(), ackTimeout)
	defer cancel()
	var (
		msg  *nats.Msg
		opts []jetstream.PublishOpt
	)
	if len(g.accepts) == 1 {
		ev := &g.accepts[0].ev
		msg = singleMsg(subject, ev, 0, time.Time{})
		opts = []jetstream.PublishOpt{jetstream.WithMsgID(ev.requestID)}
	} else {
		evs := make([]*event, len(g.accepts))
		for i, p := range g.accepts {
			evs[i] = &p.ev
		}
		msg = encodeBatch(subject, evs)
		// A unique id: a publish retried by the client library after a
		// lost ack is stored once.
		opts = []jetstream.PublishOpt{jetstream.WithMsgID("batch-" + uuid.New())}
	}
	ack, err := s.js.PublishMsg(ctx, msg, opts...)
	if err != nil {
		err = publishErr(err)
	}
	s.met.groupEvents.Observe(float64(len(g.accepts)))
	if err == nil {
		s.announce(g)
	}
	for _, p := range g.accepts {
		p.err = err
		p.dup = err == nil && ack.Duplicate
		s.dedup.end(p)
		close(p.done)
	}
}

// singleMsg is the message of one event: attempt is the number of attempts
// already made, notBefore (unless zero) when it may run.
func singleMsg(subject string, ev *event, attempt int, notBefore time.Time) *nats.Msg {
	h := nats.Header{
		HeaderRequestID: {ev.requestID},
		HeaderFunction:  {ev.function},
		HeaderAccepted:  {ev.accepted.UTC().Format(time.RFC3339Nano)},
		HeaderAttempt:   {strconv.Itoa(attempt)},
		HeaderDepth:     {strconv.Itoa(ev.depth)},
	}
	if !notBefore.IsZero() {
		h[HeaderNotBefore] = []string{strconv.FormatInt(notBefore.UnixNano(), 10)}
	}
	return &nats.Msg{Subject: subject, Data: ev.payload, Header: h}
}

// Dedupe of request ids. JetStream deduplicates a single-event message by
// its message id (the request id), but not the events of a batch message,
// so each gateway keeps an index of the request ids accepted within
// Config.DedupWindow: its own accepts (exactly, including accepts still
// being written: a second accept of the same id waits for the first and
// returns its outcome) and, through a core NATS announcement sent after
// every stored group, the other gateways' (announced within a round trip
// of the ack; a retry that reaches another gateway sooner can be stored
// twice, which at-least-once processing allows). The index is bounded by
// maxDedupEntries (the oldest ids go first when it is full) and starts
// empty when the gateway starts; JetStream's own dedupe of single-event
// messages still applies then.

// dedupSubject is the core NATS subject of the accepted-ids announcements.
const dedupSubject = "_skiff.async.accepted"

// maxDedupEntries bounds the dedupe index (about 100 bytes an entry).
const maxDedupEntries = 1 << 19

// headerOrigin names the gateway that sent an announcement.
const headerOrigin = "Skiff-Origin"

type dedupEntry struct {
	id      string
	expires time.Time
}

// dedupIndex is the request ids accepted recently.
type dedupIndex struct {
	window time.Duration
	now    func() time.Time
	max    int // entries kept at most

	mu       sync.Mutex
	seen     map[string]time.Time      // guarded by mu: id → when it expires
	order    []dedupEntry              // guarded by mu: ids in the order added (a FIFO)
	head     int                       // guarded by mu: first live entry of order
	inFlight map[string]*pendingAccept // guarded by mu: ids whose accept is being written
}

func newDedupIndex(window time.Duration, now func() time.Time) *dedupIndex {
	return &dedupIndex{window: window, now: now, max: maxDedupEntries, seen: map[string]time.Time{}, inFlight: map[string]*pendingAccept{}}
}

// begin registers p's request id as being accepted. It returns nil when
// the caller goes ahead and stores p; otherwise the accept to wait for
// (dup false) or dup true when the id was accepted already.
func (d *dedupIndex) begin(p *pendingAccept) (wait *pendingAccept, dup bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	id := p.ev.requestID
	if exp, ok := d.seen[id]; ok && d.now().Before(exp) {
		return nil, true
	}
	if q, ok := d.inFlight[id]; ok {
		return q, false
	}
	d.inFlight[id] = p
	return nil, false
}

// end records the outcome of p's accept.
func (d *dedupIndex) end(p *pendingAccept) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.inFlight, p.ev.requestID)
	if p.err == nil {
		d.addLocked(p.ev.requestID)
	}
}

// add records ids accepted elsewhere.
func (d *dedupIndex) add(ids []string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, id := range ids {
		if id != "" {
			d.addLocked(id)
		}
	}
}

func (d *dedupIndex) addLocked(id string) {
	now := d.now()
	exp := now.Add(d.window)
	// Expire from the front, and make room.
	for d.head < len(d.order) {
		e := d.order[d.head]
		if now.Before(e.expires) && len(d.order)-d.head < d.max {
			break
		}
		if cur, ok := d.seen[e.id]; ok && !cur.After(e.expires) {
			delete(d.seen, e.id)
		}
		d.order[d.head] = dedupEntry{}
		d.head++
	}
	if d.head > 1024 && d.head*2 > len(d.order) {
		d.order = append(d.order[:0:0], d.order[d.head:]...)
		d.head = 0
	}
	d.seen[id] = exp
	d.order = append(d.order, dedupEntry{id: id, expires: exp})
}

// announce tells the other gateways the request ids of a stored group.
func (s *Service) announce(g *group) {
	if s.nc == nil {
		return
	}
	var b strings.Builder
	for i, p := range g.accepts {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(p.ev.requestID)
	}
	msg := &nats.Msg{Subject: dedupSubject, Data: []byte(b.String()), Header: nats.Header{headerOrigin: {s.instance}}}
	_ = s.nc.PublishMsg(msg) // best effort: see the dedupe comment above
}

// listen subscribes to the other gateways' announcements.
func (s *Service) listen() error {
	if s.nc == nil {
		return nil
	}
	sub, err := s.nc.Subscribe(dedupSubject, func(m *nats.Msg) {
		if m.Header.Get(headerOrigin) == s.instance || len(m.Data) > 1<<20 {
			return
		}
		s.dedup.add(strings.Split(string(m.Data), ","))
	})
	if err != nil {
		return err
	}
	s.dedupSub = sub
	return nil
}
