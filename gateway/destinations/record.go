// Package destinations delivers the outcome of asynchronous invocations to
// event destinations, as Lambda's event destinations do: a skiff queue, another
// function (invoked asynchronously) or an HTTP webhook. What is delivered is
// Lambda's invocation record (Record), with Lambda's JSON field names.
//
// A Writer parses and validates targets ("queue:NAME", "function:NAME", an
// http(s) URL), checks at configuration time that queues and functions exist,
// and delivers records: to queues through QueueSender, to functions through
// AsyncInvoker (with the destination-chain depth incremented, so a chain of
// function destinations stops at Config.MaxDepth), and to webhooks as a signed
// POST retried with exponential backoff.
//
// Webhook requests carry X-Skiff-Timestamp (Unix seconds) and
// X-Skiff-Signature: "sha256=" + hex(HMAC-SHA256(key, timestamp + "." + body)).
// The key is created once per data directory by EnsureSigningKey; receivers
// check requests with Verify.
package destinations

import (
	"encoding/json"
	"time"
)

// Conditions of an invocation record (RequestContext.Condition).
const (
	ConditionSuccess          = "Success"
	ConditionRetriesExhausted = "RetriesExhausted"
	ConditionEventAgeExceeded = "EventAgeExceeded"
)

// RecordVersion is the version of the record format.
const RecordVersion = "1.0"

// TimestampFormat is the layout of Record.Timestamp: UTC with milliseconds,
// as Lambda writes it ("2019-11-24T23:08:25.651Z").
const TimestampFormat = "2006-01-02T15:04:05.000Z"

// Record is Lambda's invocation record: what a destination receives about one
// asynchronous invocation. The JSON field names are exactly Lambda's.
type Record struct {
	Version         string          `json:"version"`
	Timestamp       string          `json:"timestamp"`
	RequestContext  RequestContext  `json:"requestContext"`
	RequestPayload  json.RawMessage `json:"requestPayload"`
	ResponseContext ResponseContext `json:"responseContext"`
	ResponsePayload json.RawMessage `json:"responsePayload"`
}

// RequestContext identifies the invocation and says why the record was sent.
type RequestContext struct {
	RequestID   string `json:"requestId"`
	FunctionArn string `json:"functionArn"`
	// Condition is ConditionSuccess, ConditionRetriesExhausted or
	// ConditionEventAgeExceeded.
	Condition string `json:"condition"`
	// ApproximateInvokeCount is how many times the function was invoked
	// for this event (0 when it expired before the first attempt).
	ApproximateInvokeCount int `json:"approximateInvokeCount"`
}

// ResponseContext describes the function's last response.
type ResponseContext struct {
	StatusCode      int    `json:"statusCode"`
	ExecutedVersion string `json:"executedVersion"`
	// FunctionError is "Handled" or "Unhandled" when the function failed;
	// absent on success.
	FunctionError string `json:"functionError,omitempty"`
}

// Timestamp formats t as a record timestamp.
func Timestamp(t time.Time) string { return t.UTC().Format(TimestampFormat) }

// Payload makes b fit a record payload field: nil (JSON null) when empty, b
// itself when it is valid JSON, and otherwise b as a JSON string, so a
// function that returned bytes that are not JSON still yields a valid record.
func Payload(b []byte) json.RawMessage {
	if len(b) == 0 {
		return nil
	}
	if json.Valid(b) {
		return json.RawMessage(b)
	}
	q, err := json.Marshal(string(b)) // invalid UTF-8 becomes U+FFFD
	if err != nil {
		return nil
	}
	return json.RawMessage(q)
}

// Encode returns the record as JSON. The payload fields are passed through
// Payload first, so Encode never fails on a payload that is not JSON, and an
// empty Version is written as RecordVersion.
func (r *Record) Encode() ([]byte, error) {
	c := *r
	if c.Version == "" {
		c.Version = RecordVersion
	}
	c.RequestPayload = Payload(c.RequestPayload)
	c.ResponsePayload = Payload(c.ResponsePayload)
	return json.Marshal(&c)
}
