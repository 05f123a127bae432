package store

import (
	"context"
	"errors"
	"fmt"
	"time"
	"unicode/utf8"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"skiff.dev/skiff/internal/errs"
)

// MaxLogEntry caps the text of one log entry; longer text keeps its tail.
const MaxLogEntry = 256 << 10

// Headers of a log message.
const (
	hdrRequestID = "Skiff-Request-Id"
	hdrTime      = "Skiff-Time"
)

// LogEntry is the log of one invocation, START to REPORT.
type LogEntry struct {
	Function  string
	RequestID string
	Time      time.Time
	Text      string
}

func (s *Store) logStreamConfig() jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name:        streamLogs,
		Description: "skiff function logs, one message per invocation",
		Subjects:    []string{subjectLogs + ".>"},
		Retention:   jetstream.LimitsPolicy,
		Discard:     jetstream.DiscardOld,
		MaxAge:      s.cfg.LogMaxAge,
		MaxBytes:    s.cfg.LogMaxBytes,
		Storage:     jetstream.FileStorage,
		AllowDirect: true,
	}
}

func logSubject(function string) string { return subjectLogs + "." + function }

// truncateTail keeps the last part of text so the result is at most max
// bytes, starting on a rune boundary and marked as truncated.
func truncateTail(text string, max int) string {
	if len(text) <= max {
		return text
	}
	marker := fmt.Sprintf("[skiff: %d bytes of log truncated]\n", len(text))
	cut := len(text) - (max - len(marker))
	for cut < len(text) && !utf8.RuneStart(text[cut]) {
		cut++
	}
	return marker + text[cut:]
}

// AppendLog stores the log of one invocation. Text over MaxLogEntry keeps
// its tail. It returns once the engine has stored the entry.
func (s *Store) AppendLog(ctx context.Context, e LogEntry) error {
	if err := checkName("function", e.Function); err != nil {
		return err
	}
	if e.Time.IsZero() {
		e.Time = s.cfg.Now()
	}
	msg := &nats.Msg{
		Subject: logSubject(e.Function),
		Header:  nats.Header{},
		Data:    []byte(truncateTail(e.Text, MaxLogEntry)),
	}
	msg.Header.Set(hdrRequestID, e.RequestID)
	msg.Header.Set(hdrTime, e.Time.UTC().Format(time.RFC3339Nano))
	if _, err := s.js.PublishMsg(ctx, msg, jetstream.WithExpectStream(streamLogs)); err != nil {
		return wrapErr(err, "appending log of %s", e.Function)
	}
	return nil
}

func decodeLog(function string, m jetstream.Msg) LogEntry {
	e := LogEntry{Function: function, RequestID: m.Headers().Get(hdrRequestID), Text: string(m.Data())}
	if t, err := time.Parse(time.RFC3339Nano, m.Headers().Get(hdrTime)); err == nil {
		e.Time = t
	} else if md, err := m.Metadata(); err == nil {
		e.Time = md.Timestamp
	}
	return e
}

// ReadLogs calls fn with the last `last` log entries of a function, oldest
// first (last < 0: every retained entry; last == 0: none). With follow it
// then keeps delivering new entries until ctx is done (returning nil) or fn
// returns an error (returned as is); without follow it returns after the
// entries stored when it was called.
func (s *Store) ReadLogs(ctx context.Context, function string, last int, follow bool, fn func(LogEntry) error) error {
	if err := checkName("function", function); err != nil {
		return err
	}
	subj := logSubject(function)
	// The end of the backlog: the function's newest entry now (0: none).
	var end uint64
	m, err := s.logs.GetLastMsgForSubject(ctx, subj)
	switch {
	case err == nil:
		end = m.Sequence
	case errors.Is(err, jetstream.ErrMsgNotFound):
	default:
		return wrapErr(err, "reading logs of %s", function)
	}
	if end == 0 && !follow {
		return nil
	}
	var start uint64 // first stream sequence to deliver; 0 means the beginning
	switch {
	case end == 0:
		// Nothing stored at the snapshot: everything found from here is new.
	case last == 0:
		start = end + 1
	case last > 0:
		start, err = s.nthLastSeq(ctx, subj, last, end)
		if err != nil {
			return err
		}
	}
	if start > end && !follow {
		return nil
	}
	cfg := jetstream.OrderedConsumerConfig{
		FilterSubjects:    []string{subj},
		DeliverPolicy:     jetstream.DeliverAllPolicy,
		InactiveThreshold: time.Minute,
	}
	if start > 0 {
		cfg.DeliverPolicy = jetstream.DeliverByStartSequencePolicy
		cfg.OptStartSeq = start
	}
	cons, err := s.js.OrderedConsumer(ctx, streamLogs, cfg)
	if err != nil {
		return wrapErr(err, "reading logs of %s", function)
	}
	if !follow {
		if info := cons.CachedInfo(); info != nil && info.NumPending == 0 {
			s.dropConsumer(cons)
			return nil
		}
	}
	defer s.dropConsumer(cons)
	it, err := cons.Messages()
	if err != nil {
		return wrapErr(err, "reading logs of %s", function)
	}
	defer it.Stop()
	for {
		msg, err := it.Next(jetstream.NextContext(ctx))
		if err != nil {
			if ctx.Err() != nil {
				if follow {
					return nil
				}
				return wrapErr(ctx.Err(), "reading logs of %s", function)
			}
			return wrapErr(err, "reading logs of %s", function)
		}
		md, err := msg.Metadata()
		if err != nil {
			return errs.Internal("reading logs of %s: %w", function, err)
		}
		if !follow && md.Sequence.Stream > end {
			return nil
		}
		if err := fn(decodeLog(function, msg)); err != nil {
			return err
		}
		if !follow && (md.Sequence.Stream >= end || md.NumPending == 0) {
			return nil
		}
	}
}

// nthLastSeq returns the stream sequence of the last-th newest entry of
// subj at or before end (0: the subject holds no more than `last`). A
// binary search over consumer pending counts finds where the last `last`
// entries start without reading them; a headers-only scan of that window
// makes the answer exact. Entries appended meanwhile can only make the
// search start too late; then it scans from the beginning.
func (s *Store) nthLastSeq(ctx context.Context, subj string, last int, end uint64) (uint64, error) {
	want := uint64(last)
	total, err := s.pendingFrom(ctx, subj, 1)
	if err != nil || total <= want {
		return 0, err
	}
	lo, hi := uint64(1), end // invariant: pendingFrom(lo) >= want
	for lo < hi {
		mid := lo + (hi-lo+1)/2
		n, err := s.pendingFrom(ctx, subj, mid)
		if err != nil {
			return 0, err
		}
		if n >= want {
			lo = mid
		} else {
			hi = mid - 1
		}
	}
	seq, n, err := s.scanLastSeqs(ctx, subj, lo, last, end)
	if err != nil || n >= last || lo <= 1 {
		return seq, err
	}
	seq, _, err = s.scanLastSeqs(ctx, subj, 1, last, end)
	return seq, err
}

// pendingFrom returns how many entries of subj have a sequence >= seq.
func (s *Store) pendingFrom(ctx context.Context, subj string, seq uint64) (uint64, error) {
	c, err := s.js.CreateConsumer(ctx, streamLogs, jetstream.ConsumerConfig{
		FilterSubject:     subj,
		DeliverPolicy:     jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:       seq,
		AckPolicy:         jetstream.AckNonePolicy,
		HeadersOnly:       true,
		MemoryStorage:     true,
		InactiveThreshold: time.Minute,
	})
	if err != nil {
		return 0, wrapErr(err, "counting logs of %s", subj)
	}
	defer s.dropConsumer(c)
	return c.CachedInfo().NumPending, nil
}

// scanLastSeqs reads the headers of subj's entries from start to end and
// returns the sequence of the oldest of the last `last` (end+1 when there
// are none) and how many it saw.
func (s *Store) scanLastSeqs(ctx context.Context, subj string, start uint64, last int, end uint64) (uint64, int, error) {
	cons, err := s.js.OrderedConsumer(ctx, streamLogs, jetstream.OrderedConsumerConfig{
		FilterSubjects:    []string{subj},
		DeliverPolicy:     jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:       start,
		HeadersOnly:       true,
		InactiveThreshold: time.Minute,
	})
	if err != nil {
		return 0, 0, wrapErr(err, "scanning logs of %s", subj)
	}
	defer s.dropConsumer(cons)
	if info := cons.CachedInfo(); info == nil || info.NumPending == 0 {
		return end + 1, 0, nil
	}
	it, err := cons.Messages()
	if err != nil {
		return 0, 0, wrapErr(err, "scanning logs of %s", subj)
	}
	defer it.Stop()
	ring := make([]uint64, last)
	n := 0
	for {
		msg, err := it.Next(jetstream.NextContext(ctx))
		if err != nil {
			return 0, 0, wrapErr(err, "scanning logs of %s", subj)
		}
		md, err := msg.Metadata()
		if err != nil {
			return 0, 0, errs.Internal("scanning logs of %s: %w", subj, err)
		}
		seq := md.Sequence.Stream
		if seq > end {
			break
		}
		ring[n%last] = seq
		n++
		if seq == end || md.NumPending == 0 {
			break
		}
	}
	switch {
	case n == 0:
		return end + 1, 0, nil
	case n < last:
		return ring[0], n, nil
	}
	return ring[n%last], n, nil
}

// dropConsumer deletes an ordered consumer's server side at once instead of
// leaving it to its inactivity threshold.
func (s *Store) dropConsumer(cons jetstream.Consumer) {
	info := cons.CachedInfo()
	if info == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.js.DeleteConsumer(ctx, streamLogs, info.Name); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
		s.log.Debug("deleting log consumer", "consumer", info.Name, "err", err)
	}
}
