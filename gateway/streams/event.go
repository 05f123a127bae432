package streams

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"math"
	"strconv"
	"time"

	"skiff.dev/skiff/internal/uuid"
)

// laneOf is the lane of a partition key among p lanes.
func laneOf(partitionKey string, p int) int {
	if p <= 1 {
		return 0
	}
	// FNV-1a, 32 bits (hash/fnv's New32a), without its allocations.
	h := uint32(2166136261)
	for i := 0; i < len(partitionKey); i++ {
		h ^= uint32(partitionKey[i])
		h *= 16777619
	}
	return int(h % uint32(p))
}

// kinesisRecord is one record of Kinesis's Lambda event (aws-lambda-go's
// events.KinesisEventRecord reads it).
type kinesisRecord struct {
	Kinesis           kinesisData `json:"kinesis"`
	EventSource       string      `json:"eventSource"`
	EventVersion      string      `json:"eventVersion"`
	EventID           string      `json:"eventID"`
	EventName         string      `json:"eventName"`
	InvokeIdentityArn string      `json:"invokeIdentityArn"`
	AWSRegion         string      `json:"awsRegion"`
	EventSourceARN    string      `json:"eventSourceARN"`
}

type kinesisData struct {
	KinesisSchemaVersion        string  `json:"kinesisSchemaVersion"`
	PartitionKey                string  `json:"partitionKey"`
	SequenceNumber              string  `json:"sequenceNumber"`
	Data                        []byte  `json:"data"` // base64 by encoding/json
	ApproximateArrivalTimestamp float64 `json:"approximateArrivalTimestamp"`
}

// eventContext is what every record of a lane's events shares.
type eventContext struct {
	shardID, streamARN, region, identity string
}

// recordOverhead is a generous estimate of the JSON around one record's
// data, partition key and sequence number.
const recordOverhead = 512

// recordSize estimates the size of a record in the event.
func recordSize(r Record) int {
	return (len(r.Data)+2)/3*4 + len(r.PartitionKey)*2 + len(r.SequenceNumber)*2 + len(r.Data)/16 + recordOverhead
}

// epochSeconds is t as Unix seconds with millisecond precision.
func epochSeconds(t time.Time) float64 {
	return float64(t.UnixMilli()) / 1000
}

// kinesisEvent is the event of a batch; the window fields are set only
// for mappings with a tumbling window (Lambda's KinesisTimeWindowEvent).
type kinesisEvent struct {
	Records                 []kinesisRecord `json:"Records"`
	Window                  *windowBounds   `json:"window,omitempty"`
	State                   json.RawMessage `json:"state,omitempty"`
	ShardID                 string          `json:"shardId,omitempty"`
	EventSourceARN          string          `json:"eventSourceARN,omitempty"`
	IsFinalInvokeForWindow  *bool           `json:"isFinalInvokeForWindow,omitempty"`
	IsWindowTerminatedEarly *bool           `json:"isWindowTerminatedEarly,omitempty"`
}

type windowBounds struct {
	Start string `json:"start"`
	End   string `json:"end"`
}

// encodeEvent renders a batch. w is the tumbling window (nil without one).
// It writes the JSON encoding/json would write for kinesisEvent (the
// tests compare the two), without reflection and with one allocation.
func encodeEvent(ec eventContext, recs []Record, w *Window, final, early bool) ([]byte, error) {
	size := 32
	for _, r := range recs {
		size += recordSize(r)
	}
	b := make([]byte, 0, size)
	b = append(b, `{"Records":[`...)
	// What every record of the lane shares, encoded once.
	shared := appendString(nil, ec.identity)
	shared = append(shared, `,"awsRegion":`...)
	shared = appendString(shared, ec.region)
	shared = append(shared, `,"eventSourceARN":`...)
	shared = appendString(shared, ec.streamARN)
	shared = append(shared, '}')
	for i, r := range recs {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, `{"kinesis":{"kinesisSchemaVersion":"1.0","partitionKey":`...)
		b = appendString(b, r.PartitionKey)
		b = append(b, `,"sequenceNumber":`...)
		b = appendString(b, r.SequenceNumber)
		b = append(b, `,"data":"`...)
		b = base64.StdEncoding.AppendEncode(b, r.Data)
		b = append(b, `","approximateArrivalTimestamp":`...)
		b = appendFloat(b, epochSeconds(r.Arrival))
		b = append(b, `},"eventSource":"aws:kinesis","eventVersion":"1.0","eventID":`...)
		b = appendString2(b, ec.shardID, ":", r.SequenceNumber)
		b = append(b, `,"eventName":"aws:kinesis:record","invokeIdentityArn":`...)
		b = append(b, shared...)
	}
	b = append(b, ']')
	if w != nil {
		ev := kinesisEvent{
			Window:                  &windowBounds{Start: w.Start.UTC().Format(time.RFC3339), End: w.End.UTC().Format(time.RFC3339)},
			State:                   w.State,
			ShardID:                 ec.shardID,
			EventSourceARN:          ec.streamARN,
			IsFinalInvokeForWindow:  &final,
			IsWindowTerminatedEarly: &early,
		}
		if len(ev.State) == 0 {
			ev.State = json.RawMessage(`{}`)
		}
		rest, err := json.Marshal(&ev)
		if err != nil {
			return nil, err
		}
		// rest is {"Records":null,...}: keep what follows Records.
		_, tail, ok := bytes.Cut(rest, []byte(`"Records":null,`))
		if !ok {
			return nil, errors.New("encoding the window of a stream event")
		}
		b = append(b, ',')
		return append(b, tail...), nil
	}
	return append(b, '}'), nil
}

// appendFloat appends f as encoding/json does.
func appendFloat(b []byte, f float64) []byte {
	if math.IsInf(f, 0) || math.IsNaN(f) {
		return append(b, '0') // not a time epochSeconds returns
	}
	abs := math.Abs(f)
	if abs != 0 && (abs < 1e-6 || abs >= 1e21) {
		n := len(b)
		b = strconv.AppendFloat(b, f, 'e', -1, 64)
		// clean up e-09 to e-9, as encoding/json
		if m := len(b); m-n >= 4 && b[m-4] == 'e' && b[m-3] == '-' && b[m-2] == '0' {
			b[m-2] = b[m-1]
			b = b[:m-1]
		}
		return b
	}
	return strconv.AppendFloat(b, f, 'f', -1, 64)
}

// appendString appends s as a JSON string as encoding/json does (HTML
// characters escaped); strings that need no escaping, the usual case, are
// copied.
func appendString(b []byte, s string) []byte {
	if plain(s) {
		b = append(b, '"')
		b = append(b, s...)
		return append(b, '"')
	}
	q, _ := json.Marshal(s)
	return append(b, q...)
}

// appendString2 appends the JSON string of a+sep+c.
func appendString2(b []byte, a, sep, c string) []byte {
	if plain(a) && plain(sep) && plain(c) {
		b = append(b, '"')
		b = append(b, a...)
		b = append(b, sep...)
		b = append(b, c...)
		return append(b, '"')
	}
	return appendString(b, a+sep+c)
}

// plain reports whether s is printable ASCII that JSON (with encoding/json's
// HTML escaping) writes as is.
func plain(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			return false
		}
	}
	return true
}

// response is the part of a function's response the pollers read.
type response struct {
	BatchItemFailures *[]map[string]any `json:"batchItemFailures"`
	State             json.RawMessage   `json:"state"`
}

// itemFailure parses a ReportBatchItemFailures response: it returns the
// index of the first failed record of recs (len(recs) when none failed)
// and ok false when the response makes the whole batch a failure (an
// empty, null or unknown itemIdentifier or a bad key, as Lambda).
func itemFailure(payload []byte, recs []Record) (int, bool) {
	p := bytes.TrimSpace(payload)
	if len(p) == 0 || bytes.Equal(p, []byte("null")) {
		return len(recs), true
	}
	var r response
	if err := json.Unmarshal(p, &r); err != nil {
		// Not an object: Lambda treats it as success only when it is an
		// empty response; anything else fails the batch.
		return 0, false
	}
	if r.BatchItemFailures == nil || len(*r.BatchItemFailures) == 0 {
		return len(recs), true
	}
	idx := make(map[string]int, len(recs))
	for i, rec := range recs {
		idx[rec.SequenceNumber] = i
	}
	first := len(recs)
	for _, f := range *r.BatchItemFailures {
		v, ok := f["itemIdentifier"]
		if !ok || len(f) != 1 {
			return 0, false
		}
		id, ok := v.(string)
		if !ok || id == "" {
			return 0, false
		}
		i, ok := idx[id]
		if !ok {
			return 0, false
		}
		first = min(first, i)
	}
	return first, true
}

// windowState returns the "state" of a tumbling-window response (nil when
// there is none).
func windowState(payload []byte) json.RawMessage {
	var r response
	if err := json.Unmarshal(payload, &r); err != nil {
		return nil
	}
	if len(r.State) == 0 || bytes.Equal(bytes.TrimSpace(r.State), []byte("null")) {
		return nil
	}
	return r.State
}

// failureRecord is Lambda's OnFailure record of a stream batch.
type failureRecord struct {
	RequestContext   failureRequest  `json:"requestContext"`
	ResponseContext  failureResponse `json:"responseContext"`
	Version          string          `json:"version"`
	Timestamp        string          `json:"timestamp"`
	KinesisBatchInfo batchInfo       `json:"KinesisBatchInfo"`
}

type failureRequest struct {
	RequestID              string `json:"requestId"`
	FunctionArn            string `json:"functionArn"`
	Condition              string `json:"condition"`
	ApproximateInvokeCount int    `json:"approximateInvokeCount"`
}

type failureResponse struct {
	StatusCode      int    `json:"statusCode"`
	ExecutedVersion string `json:"executedVersion"`
	FunctionError   string `json:"functionError,omitempty"`
}

type batchInfo struct {
	ShardID                         string `json:"shardId"`
	StartSequenceNumber             string `json:"startSequenceNumber"`
	EndSequenceNumber               string `json:"endSequenceNumber"`
	ApproximateArrivalOfFirstRecord string `json:"approximateArrivalOfFirstRecord"`
	ApproximateArrivalOfLastRecord  string `json:"approximateArrivalOfLastRecord"`
	BatchSize                       int    `json:"batchSize"`
	StreamArn                       string `json:"streamArn"`
}

// Conditions of an OnFailure record.
const (
	ConditionRetryAttemptsExhausted = "RetryAttemptsExhausted"
	ConditionRecordAgeExceeded      = "RecordAgeExceeded"
)

const timestampFormat = "2006-01-02T15:04:05.000Z"

func formatTime(t time.Time) string { return t.UTC().Format(timestampFormat) }

func newRequestID() string { return uuid.New() }

// seqString is a fallback sequence number for records without one.
func seqString(r Record) string {
	if r.SequenceNumber != "" {
		return r.SequenceNumber
	}
	return strconv.FormatUint(r.Seq, 10)
}
