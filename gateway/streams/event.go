package streams

import (
	"bytes"
	"encoding/json"
	"hash/fnv"
	"strconv"
	"time"

	"skiff.dev/skiff/internal/uuid"
)

// laneOf is the lane of a partition key among p lanes.
func laneOf(partitionKey string, p int) int {
	if p <= 1 {
		return 0
	}
	h := fnv.New32a()
	_, _ = h.Write([]byte(partitionKey))
	return int(h.Sum32() % uint32(p))
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

func encodeRecord(ec eventContext, r Record) kinesisRecord {
	return kinesisRecord{
		Kinesis: kinesisData{
			KinesisSchemaVersion:        "1.0",
			PartitionKey:                r.PartitionKey,
			SequenceNumber:              r.SequenceNumber,
			Data:                        nonNil(r.Data),
			ApproximateArrivalTimestamp: epochSeconds(r.Arrival),
		},
		EventSource:       "aws:kinesis",
		EventVersion:      "1.0",
		EventID:           ec.shardID + ":" + r.SequenceNumber,
		EventName:         "aws:kinesis:record",
		InvokeIdentityArn: ec.identity,
		AWSRegion:         ec.region,
		EventSourceARN:    ec.streamARN,
	}
}

func nonNil(b []byte) []byte {
	if b == nil {
		return []byte{}
	}
	return b
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
func encodeEvent(ec eventContext, recs []Record, w *Window, final, early bool) ([]byte, error) {
	ev := kinesisEvent{Records: make([]kinesisRecord, len(recs))}
	for i, r := range recs {
		ev.Records[i] = encodeRecord(ec, r)
	}
	if w != nil {
		ev.Window = &windowBounds{Start: w.Start.UTC().Format(time.RFC3339), End: w.End.UTC().Format(time.RFC3339)}
		ev.State = w.State
		if len(ev.State) == 0 {
			ev.State = json.RawMessage(`{}`)
		}
		ev.ShardID = ec.shardID
		ev.EventSourceARN = ec.streamARN
		ev.IsFinalInvokeForWindow = &final
		ev.IsWindowTerminatedEarly = &early
	}
	return json.Marshal(&ev)
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
