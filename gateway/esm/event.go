package esm

import (
	"bytes"
	"crypto/md5"
	"encoding/hex"
	"encoding/json"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/uuid"
)

// sqsRecord is one record of SQS's Lambda event, with Lambda's JSON names
// (aws-lambda-go's events.SQSMessage reads it).
type sqsRecord struct {
	MessageID         string                         `json:"messageId"`
	ReceiptHandle     string                         `json:"receiptHandle"`
	Body              string                         `json:"body"`
	Attributes        map[string]string              `json:"attributes"`
	MessageAttributes map[string]sqsMessageAttribute `json:"messageAttributes"`
	MD5OfBody         string                         `json:"md5OfBody"`
	EventSource       string                         `json:"eventSource"`
	EventSourceARN    string                         `json:"eventSourceARN"`
	AWSRegion         string                         `json:"awsRegion"`
}

// sqsMessageAttribute is a message attribute as Lambda renders it: the
// list fields are always present (empty), the value fields only when set.
type sqsMessageAttribute struct {
	StringValue      *string  `json:"stringValue,omitempty"`
	BinaryValue      []byte   `json:"binaryValue,omitempty"`
	StringListValues []string `json:"stringListValues"`
	BinaryListValues [][]byte `json:"binaryListValues"`
	DataType         string   `json:"dataType"`
}

// The event around the records: {"Records":[rec,rec,...]}.
const (
	eventPrefix = `{"Records":[`
	eventSuffix = `]}`
)

// encodeRecord renders one received message as a record of the event.
func encodeRecord(m *skiffv1.Message, arn, region string) ([]byte, error) {
	attrs := make(map[string]string, len(m.GetAttributes())+1)
	for k, v := range m.GetAttributes() {
		attrs[k] = v
	}
	if _, ok := attrs["SenderId"]; !ok {
		attrs["SenderId"] = accountOf(arn)
	}
	mattrs := make(map[string]sqsMessageAttribute, len(m.GetMessageAttributes()))
	for k, a := range m.GetMessageAttributes() {
		out := sqsMessageAttribute{StringListValues: []string{}, BinaryListValues: [][]byte{}, DataType: a.GetDataType()}
		if len(a.GetBinaryValue()) > 0 || isBinary(a.GetDataType()) {
			out.BinaryValue = a.GetBinaryValue()
		} else {
			v := a.GetStringValue()
			out.StringValue = &v
		}
		mattrs[k] = out
	}
	md5sum := m.GetMd5OfBody()
	if md5sum == "" {
		sum := md5.Sum([]byte(m.GetBody()))
		md5sum = hex.EncodeToString(sum[:])
	}
	return json.Marshal(sqsRecord{
		MessageID:         m.GetMessageId(),
		ReceiptHandle:     m.GetReceiptHandle(),
		Body:              m.GetBody(),
		Attributes:        attrs,
		MessageAttributes: mattrs,
		MD5OfBody:         md5sum,
		EventSource:       eventSourceSQS,
		EventSourceARN:    arn,
		AWSRegion:         region,
	})
}

func isBinary(dataType string) bool {
	return dataType == "Binary" || len(dataType) > 7 && dataType[:7] == "Binary."
}

// accountOf returns the account field of an ARN
// (arn:aws:sqs:region:account:name), or "" when there is none.
func accountOf(arn string) string {
	f := bytes.Split([]byte(arn), []byte(":"))
	if len(f) < 6 {
		return ""
	}
	return string(f[4])
}

// joinEvent builds the event from encoded records.
func joinEvent(recs [][]byte) []byte {
	n := len(eventPrefix) + len(eventSuffix)
	for _, r := range recs {
		n += len(r) + 1
	}
	b := make([]byte, 0, n)
	b = append(b, eventPrefix...)
	for i, r := range recs {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, r...)
	}
	return append(b, eventSuffix...)
}

// parseBatchItemFailures reads a ReportBatchItemFailures response and
// returns the ids of the messages that failed. ok is false when the
// response is not valid (Lambda then fails the whole batch): not JSON, not
// an object, batchItemFailures not a list, an entry without a non-empty
// string itemIdentifier, or an identifier not in the batch (ids). An empty
// or null response, an object without batchItemFailures, and an empty or
// null list all mean success.
func parseBatchItemFailures(payload []byte, ids map[string]bool) (failed map[string]bool, ok bool) {
	failed = map[string]bool{}
	p := bytes.TrimSpace(payload)
	if len(p) == 0 || string(p) == "null" {
		return failed, true
	}
	var resp map[string]json.RawMessage
	if err := json.Unmarshal(p, &resp); err != nil {
		return nil, false
	}
	raw, present := resp["batchItemFailures"]
	if !present || string(bytes.TrimSpace(raw)) == "null" {
		return failed, true
	}
	var entries []map[string]json.RawMessage
	if err := json.Unmarshal(raw, &entries); err != nil {
		return nil, false
	}
	for _, e := range entries {
		var id string
		v, present := e["itemIdentifier"]
		if e == nil || !present || json.Unmarshal(v, &id) != nil || id == "" || !ids[id] {
			return nil, false
		}
		failed[id] = true
	}
	return failed, true
}

func batchSize(m *skiffv1.EventSourceMapping) int32 {
	if m.BatchSize == nil {
		return defaultBatchSize
	}
	return m.GetBatchSize()
}

func reportsItemFailures(m *skiffv1.EventSourceMapping) bool {
	for _, t := range m.GetFunctionResponseTypes() {
		if t == reportBatchItemFailures {
			return true
		}
	}
	return false
}

// newUUID returns a random (version 4) UUID.
func newUUID() string { return uuid.New() }

// validUUID reports whether s looks like a UUID (36 characters, hex digits
// and dashes at 8, 13, 18, 23).
func validUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if (c < '0' || c > '9') && (c < 'a' || c > 'f') && (c < 'A' || c > 'F') {
				return false
			}
		}
	}
	return true
}
