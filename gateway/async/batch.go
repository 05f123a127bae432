package async

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
)

// A group of events accepted together is stored as one batch message: the
// header HeaderBatch gives the number of events, HeaderAccepted the first
// accept time of the oldest (for queue statistics) and HeaderRequestIDs
// the request ids (for the other gateways' dedupe index); the data is the
// envelope below. Every event of a batch is a fresh one (attempt 0, no
// not-before time); a retry or a hand-off is always a message of its own.
//
// Envelope (version 1):
//
//	byte     1 (version)
//	uvarint  number of events
//	per event:
//	  uvarint len, bytes   request id
//	  uvarint len, bytes   function
//	  varint               accepted, unix nanoseconds
//	  uvarint              destination-chain depth
//	  uvarint len, bytes   payload
const (
	HeaderBatch      = "Skiff-Batch"       // number of events in a batch message
	HeaderRequestIDs = "Skiff-Request-Ids" // the batch's request ids, comma-separated

	batchVersion = 1
	// batchEventOverhead bounds the envelope bytes of one event besides its
	// request id, function name and payload (five varints).
	batchEventOverhead = 5 * binary.MaxVarintLen64
)

// encodedSize bounds the bytes one event adds to a batch message: its
// envelope entry and its request id in HeaderRequestIDs.
func (e *event) encodedSize() int {
	return 2*len(e.requestID) + 1 + len(e.function) + len(e.payload) + batchEventOverhead
}

// encodeBatch returns the batch message of events (all for subject).
func encodeBatch(subject string, events []*event) *nats.Msg {
	size := 1 + binary.MaxVarintLen64
	ids := make([]byte, 0, len(events)*37)
	oldest := events[0].accepted
	for i, e := range events {
		size += e.encodedSize()
		if i > 0 {
			ids = append(ids, ',')
		}
		ids = append(ids, e.requestID...)
		if e.accepted.Before(oldest) {
			oldest = e.accepted
		}
	}
	b := make([]byte, 0, size)
	b = append(b, batchVersion)
	b = binary.AppendUvarint(b, uint64(len(events)))
	for _, e := range events {
		b = appendBytes(b, e.requestID)
		b = appendBytes(b, e.function)
		b = binary.AppendVarint(b, e.accepted.UnixNano())
		b = binary.AppendUvarint(b, uint64(e.depth))
		b = appendBytes(b, string(e.payload))
	}
	return &nats.Msg{
		Subject: subject,
		Data:    b,
		Header: nats.Header{
			HeaderBatch:      {strconv.Itoa(len(events))},
			HeaderAccepted:   {oldest.UTC().Format(time.RFC3339Nano)},
			HeaderRequestIDs: {string(ids)},
		},
	}
}

func appendBytes(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// maxBatchEvents bounds the events a batch message may claim, whatever its
// size: a malformed count must not make the decoder allocate much.
const maxBatchEvents = 1 << 16

// decodeBatch parses a batch message's envelope. The payloads alias data.
func decodeBatch(data []byte) ([]event, error) {
	if len(data) == 0 || data[0] != batchVersion {
		return nil, errors.New("batch envelope: unknown version")
	}
	r := reader{b: data[1:]}
	n := r.uvarint()
	if r.err == nil && (n == 0 || n > maxBatchEvents || n > uint64(len(r.b))) {
		return nil, fmt.Errorf("batch envelope: %d events", n)
	}
	out := make([]event, 0, int(min(n, maxBatchEvents)))
	for i := uint64(0); i < n && r.err == nil; i++ {
		var ev event
		ev.requestID = string(r.bytes())
		ev.function = string(r.bytes())
		ev.accepted = time.Unix(0, r.varint())
		depth := r.uvarint()
		ev.payload = r.bytes()
		if r.err != nil {
			break
		}
		if ev.requestID == "" || ev.function == "" {
			return nil, fmt.Errorf("batch envelope: event %d without request id or function", i)
		}
		if depth > 1<<16 {
			return nil, fmt.Errorf("batch envelope: event %d: depth %d", i, depth)
		}
		ev.depth = int(depth)
		out = append(out, ev)
	}
	if r.err != nil {
		return nil, fmt.Errorf("batch envelope: %w", r.err)
	}
	if len(r.b) != 0 {
		return nil, fmt.Errorf("batch envelope: %d bytes after the last event", len(r.b))
	}
	return out, nil
}

// reader reads varints and length-prefixed byte strings, remembering the
// first error.
type reader struct {
	b   []byte
	err error
}

var errTruncated = errors.New("truncated")

func (r *reader) uvarint() uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.err = errTruncated
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *reader) varint() int64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Varint(r.b)
	if n <= 0 {
		r.err = errTruncated
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *reader) bytes() []byte {
	n := r.uvarint()
	if r.err != nil {
		return nil
	}
	if n > uint64(len(r.b)) {
		r.err = errTruncated
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}
