package kinesis

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"skiff.dev/skiff/internal/errs"
)

// Sequential reads of a shard (a poller's, or a GetRecords chain) go
// through a cursor: an ephemeral JetStream pull consumer filtered on the
// shard's subject and positioned where the last read stopped. A read with
// `after` = a cursor's position takes it; any other read creates one.
// A pull (no wait) costs one round trip and no header rewriting, several
// times cheaper per record than direct gets, which also count the
// pending messages of the subject on every call.

const (
	cursorIdle     = time.Minute // a cursor unused this long is dropped
	cursorInactive = 2 * time.Minute
)

type cursorKey struct {
	stream, shard string // stream id, shard id
	next          uint64
}

type cursor struct {
	key      cursorKey
	consumer string
	jsName   string
	used     time.Time
	// sub receives the cursor's deliveries, on inbox.<pull number>
	// (deliveries carry the record's subject; statuses the reply subject).
	sub   *nats.Subscription
	inbox string
	pulls uint64
}

// cursors are the idle cursors, by position.
type cursors struct {
	mu   sync.Mutex
	idle map[cursorKey][]*cursor // guarded by mu
}

func (c *cursors) take(k cursorKey) *cursor {
	c.mu.Lock()
	defer c.mu.Unlock()
	list := c.idle[k]
	if len(list) == 0 {
		return nil
	}
	cur := list[len(list)-1]
	if len(list) == 1 {
		delete(c.idle, k)
	} else {
		c.idle[k] = list[:len(list)-1]
	}
	return cur
}

// put returns a cursor and the idle ones to drop.
func (c *cursors) put(cur *cursor, now time.Time) []*cursor {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.idle == nil {
		c.idle = map[cursorKey][]*cursor{}
	}
	cur.used = now
	c.idle[cur.key] = append(c.idle[cur.key], cur)
	var stale []*cursor
	for k, list := range c.idle {
		keep := list[:0]
		for _, x := range list {
			if now.Sub(x.used) > cursorIdle {
				stale = append(stale, x)
			} else {
				keep = append(keep, x)
			}
		}
		if len(keep) == 0 {
			delete(c.idle, k)
		} else {
			c.idle[k] = keep
		}
	}
	return stale
}

// openCursor creates a consumer delivering sh's records from next.
func (s *Store) openCursor(ctx context.Context, st *streamState, sh *shard, next uint64) (*cursor, error) {
	c, err := s.js.CreateConsumer(ctx, st.jsName(), jetstream.ConsumerConfig{
		DeliverPolicy:     jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:       max(next, 1),
		AckPolicy:         jetstream.AckNonePolicy,
		FilterSubject:     st.shardSubject(sh.id),
		InactiveThreshold: cursorInactive,
		MemoryStorage:     true,
		Replicas:          1,
	})
	if err != nil {
		if isStreamGone(err) {
			return nil, errs.NotFound("stream %s not found", st.info.Name)
		}
		return nil, engineErr(err, "opening a reader on stream %s", st.info.Name)
	}
	cur := &cursor{key: cursorKey{st.info.ID, sh.id, next}, consumer: c.CachedInfo().Name, jsName: st.jsName(), inbox: s.nc.NewInbox()}
	if cur.sub, err = s.nc.SubscribeSync(cur.inbox + ".*"); err == nil {
		err = cur.sub.SetPendingLimits(-1, -1)
	}
	if err != nil {
		s.dropCursors(cur)
		return nil, engineErr(err, "opening a reader on stream %s", st.info.Name)
	}
	return cur, nil
}

func (s *Store) dropCursors(list ...*cursor) {
	for _, c := range list {
		if c.sub != nil {
			_ = c.sub.Unsubscribe()
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := s.js.DeleteConsumer(ctx, c.jsName, c.consumer); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) && !errors.Is(err, jetstream.ErrStreamNotFound) {
			s.log.Debug("dropping a stream reader", "consumer", c.consumer, "err", err)
		}
		cancel()
	}
}

// pullReq is a JetStream pull request.
type pullReq struct {
	Batch    int           `json:"batch"`
	MaxBytes int           `json:"max_bytes,omitempty"`
	NoWait   bool          `json:"no_wait"`
	Expires  time.Duration `json:"expires,omitempty"`
}

// pull fetches up to batch records available now (at most maxBytes) and
// returns them with the number of matching records after the last, and
// whether the cursor's position is known. With wait > 0 it waits up to
// wait for the first record (a consumer learns of a new record a moment
// after the writer's acknowledgement).
func (s *Store) pull(ctx context.Context, st *streamState, cur *cursor, batch, maxBytes int, wait time.Duration) ([]rawMsg, uint64, bool, error) {
	body, _ := json.Marshal(pullReq{Batch: batch, MaxBytes: maxBytes, NoWait: true, Expires: wait})
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, directGetTimeout)
		defer cancel()
	}
	cur.pulls++
	inbox := cur.inbox + "." + strconv.FormatUint(cur.pulls, 36)
	// No Flush: it would wait for a PING round trip; the connection's
	// flusher sends the request at once.
	if err := s.nc.PublishRequest("$JS.API.CONSUMER.MSG.NEXT."+cur.jsName+"."+cur.consumer, inbox, body); err != nil {
		return nil, 0, false, engineErr(err, "reading stream %s", st.info.Name)
	}
	var out []rawMsg
	var pending uint64
	for {
		m, err := cur.sub.NextMsgWithContext(ctx)
		if err != nil {
			if errors.Is(err, nats.ErrNoResponders) {
				return nil, 0, false, errs.NotFound("stream %s not found", st.info.Name)
			}
			return nil, 0, false, engineErr(err, "reading stream %s", st.info.Name)
		}
		if status := m.Header.Get("Status"); status != "" || m.Reply == "" {
			if m.Subject != inbox {
				continue // the end of an earlier pull
			}
			switch status {
			case "404", "408", "409":
				// 404: nothing (more) now; 408: nothing within the wait;
				// 409: the request ended (a message over max_bytes stays
				// for the next pull).
				return out, pending, len(out) > 0 || status == "404" || status == "408", nil
			case "503":
				return nil, 0, false, errs.NotFound("stream %s not found", st.info.Name)
			}
			return nil, 0, false, errs.Unavailable("reading stream %s: status %s %s", st.info.Name, status, m.Header.Get("Description"))
		}
		seq, np, ok := ackInfo(m.Reply)
		if !ok {
			return nil, 0, false, errs.Internal("reading stream %s: unexpected reply subject %q", st.info.Name, m.Reply)
		}
		out = append(out, rawMsg{seq: seq, subject: m.Subject, data: m.Data})
		pending = np
		if len(out) == batch || np == 0 {
			return out, pending, true, nil
		}
	}
}

// ackInfo parses the stream sequence and pending count from a JetStream
// delivery's reply subject: $JS.ACK.<stream>.<consumer>.<delivered>.
// <stream seq>.<consumer seq>.<timestamp>.<pending> (older form), or the
// same after a domain and an account hash (newer form, 12+ tokens).
func ackInfo(reply string) (seq, pending uint64, ok bool) {
	// Split by hand: this runs for every record read.
	var tok [16]string
	n := 0
	for rest := reply; ; n++ {
		i := strings.IndexByte(rest, '.')
		t := rest
		if i >= 0 {
			t, rest = rest[:i], rest[i+1:]
		}
		if n < len(tok) {
			tok[n] = t
		}
		if i < 0 {
			n++
			break
		}
	}
	var sseq, np string
	switch {
	case n == 9 && tok[0] == "$JS" && tok[1] == "ACK":
		sseq, np = tok[5], tok[8]
	case n >= 12 && tok[0] == "$JS" && tok[1] == "ACK":
		sseq, np = tok[7], tok[10]
	default:
		return 0, 0, false
	}
	seq, err1 := strconv.ParseUint(sseq, 10, 64)
	pending, err2 := strconv.ParseUint(np, 10, 64)
	return seq, pending, err1 == nil && err2 == nil
}
