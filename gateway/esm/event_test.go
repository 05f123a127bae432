package esm

import (
	"crypto/md5"
	"encoding/hex"
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/aws/aws-lambda-go/events"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
)

func TestEventShapeReadsAsAWSSQSEvent(t *testing.T) {
	msgs := []*skiffv1.Message{
		{
			MessageId:     "m-1",
			ReceiptHandle: "rh-1",
			Body:          `{"hello":"world"} "quoted" \ and <html>`,
			Md5OfBody:     "ignored-when-set",
			Attributes: map[string]string{
				"ApproximateReceiveCount":          "2",
				"SentTimestamp":                    "1700000000000",
				"ApproximateFirstReceiveTimestamp": "1700000000100",
			},
			MessageAttributes: map[string]*skiffv1.MessageAttribute{
				"color": {DataType: "String", StringValue: "blue"},
				"n":     {DataType: "Number", StringValue: "42"},
				"raw":   {DataType: "Binary", BinaryValue: []byte{0, 1, 2, 255}},
			},
		},
		{
			MessageId:     "m-2",
			ReceiptHandle: "rh-2",
			Body:          "plain",
			Attributes: map[string]string{
				"ApproximateReceiveCount": "1",
				"SentTimestamp":           "1700000000001",
				"SenderId":                "123",
				"MessageGroupId":          "g1",
				"MessageDeduplicationId":  "d1",
				"SequenceNumber":          "18849496460467696128",
			},
		},
	}
	arn := "arn:aws:sqs:eu-west-1:111122223333:orders"
	var recs [][]byte
	for _, m := range msgs {
		b, err := encodeRecord(m, arn, "eu-west-1")
		if err != nil {
			t.Fatal(err)
		}
		recs = append(recs, b)
	}
	payload := joinEvent(recs)

	var ev events.SQSEvent
	if err := json.Unmarshal(payload, &ev); err != nil {
		t.Fatalf("unmarshalling into events.SQSEvent: %v\n%s", err, payload)
	}
	sum := md5.Sum([]byte("plain"))
	blue, n42 := "blue", "42"
	want := events.SQSEvent{Records: []events.SQSMessage{
		{
			MessageId:     "m-1",
			ReceiptHandle: "rh-1",
			Body:          msgs[0].Body,
			Md5OfBody:     "ignored-when-set",
			Attributes: map[string]string{
				"ApproximateReceiveCount":          "2",
				"SentTimestamp":                    "1700000000000",
				"ApproximateFirstReceiveTimestamp": "1700000000100",
				"SenderId":                         "111122223333",
			},
			MessageAttributes: map[string]events.SQSMessageAttribute{
				"color": {StringValue: &blue, StringListValues: []string{}, BinaryListValues: [][]byte{}, DataType: "String"},
				"n":     {StringValue: &n42, StringListValues: []string{}, BinaryListValues: [][]byte{}, DataType: "Number"},
				"raw":   {BinaryValue: []byte{0, 1, 2, 255}, StringListValues: []string{}, BinaryListValues: [][]byte{}, DataType: "Binary"},
			},
			EventSource:    "aws:sqs",
			EventSourceARN: arn,
			AWSRegion:      "eu-west-1",
		},
		{
			MessageId:     "m-2",
			ReceiptHandle: "rh-2",
			Body:          "plain",
			Md5OfBody:     hex.EncodeToString(sum[:]),
			Attributes: map[string]string{
				"ApproximateReceiveCount": "1",
				"SentTimestamp":           "1700000000001",
				"SenderId":                "123",
				"MessageGroupId":          "g1",
				"MessageDeduplicationId":  "d1",
				"SequenceNumber":          "18849496460467696128",
			},
			MessageAttributes: map[string]events.SQSMessageAttribute{},
			EventSource:       "aws:sqs",
			EventSourceARN:    arn,
			AWSRegion:         "eu-west-1",
		},
	}}
	if d := cmp.Diff(want, ev); d != "" {
		t.Fatalf("event (-want +got):\n%s", d)
	}

	// Lambda's exact key names and shapes, checked on the raw JSON.
	var raw struct {
		Records []map[string]json.RawMessage `json:"Records"`
	}
	if err := json.Unmarshal(payload, &raw); err != nil {
		t.Fatal(err)
	}
	var keys []string
	for k := range raw.Records[0] {
		keys = append(keys, k)
	}
	wantKeys := []string{"attributes", "awsRegion", "body", "eventSource", "eventSourceARN", "md5OfBody", "messageAttributes", "messageId", "receiptHandle"}
	if d := cmp.Diff(wantKeys, sorted(keys)); d != "" {
		t.Fatalf("record keys (-want +got):\n%s", d)
	}
	var ma map[string]map[string]json.RawMessage
	if err := json.Unmarshal(raw.Records[0]["messageAttributes"], &ma); err != nil {
		t.Fatal(err)
	}
	if got := string(ma["color"]["stringListValues"]); got != "[]" {
		t.Errorf("stringListValues: got %s, want []", got)
	}
	if _, ok := ma["color"]["binaryValue"]; ok {
		t.Errorf("string attribute has a binaryValue: %v", ma["color"])
	}
	if got := string(ma["raw"]["binaryValue"]); got != `"AAEC/w=="` {
		t.Errorf("binaryValue: got %s, want base64 \"AAEC/w==\"", got)
	}
	if got := string(raw.Records[1]["messageAttributes"]); got != "{}" {
		t.Errorf("empty messageAttributes: got %s, want {}", got)
	}
}

func TestJoinEventEmpty(t *testing.T) {
	if got := string(joinEvent(nil)); got != `{"Records":[]}` {
		t.Fatalf("got %s, want {\"Records\":[]}", got)
	}
}

func TestParseBatchItemFailures(t *testing.T) {
	ids := map[string]bool{"a": true, "b": true, "c": true}
	tests := []struct {
		name    string
		payload string
		want    []string // failed ids; nil with ok false
		ok      bool
	}{
		{"empty", "", []string{}, true},
		{"whitespace", " \n", []string{}, true},
		{"null", "null", []string{}, true},
		{"empty object", "{}", []string{}, true},
		{"other keys only", `{"status":"done"}`, []string{}, true},
		{"null list", `{"batchItemFailures":null}`, []string{}, true},
		{"empty list", `{"batchItemFailures":[]}`, []string{}, true},
		{"one", `{"batchItemFailures":[{"itemIdentifier":"b"}]}`, []string{"b"}, true},
		{"two and a duplicate", `{"batchItemFailures":[{"itemIdentifier":"a"},{"itemIdentifier":"c"},{"itemIdentifier":"a"}]}`, []string{"a", "c"}, true},
		{"not json", `{"batchItemFailures":[`, nil, false},
		{"a string", `"ok"`, nil, false},
		{"a number", `42`, nil, false},
		{"an array", `[{"itemIdentifier":"a"}]`, nil, false},
		{"list is an object", `{"batchItemFailures":{"itemIdentifier":"a"}}`, nil, false},
		{"empty identifier", `{"batchItemFailures":[{"itemIdentifier":""}]}`, nil, false},
		{"null identifier", `{"batchItemFailures":[{"itemIdentifier":null}]}`, nil, false},
		{"bad key name", `{"batchItemFailures":[{"itemId":"a"}]}`, nil, false},
		{"null entry", `{"batchItemFailures":[null]}`, nil, false},
		{"numeric identifier", `{"batchItemFailures":[{"itemIdentifier":7}]}`, nil, false},
		{"unknown id", `{"batchItemFailures":[{"itemIdentifier":"a"},{"itemIdentifier":"zzz"}]}`, nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := parseBatchItemFailures([]byte(tt.payload), ids)
			if ok != tt.ok {
				t.Fatalf("ok: got %v, want %v", ok, tt.ok)
			}
			if !ok {
				return
			}
			var gotIDs []string
			for id := range got {
				gotIDs = append(gotIDs, id)
			}
			if d := cmp.Diff(tt.want, sorted(gotIDs), cmpopts.EquateEmpty()); d != "" {
				t.Fatalf("failed ids (-want +got):\n%s", d)
			}
		})
	}
}

func TestUUIDs(t *testing.T) {
	seen := map[string]bool{}
	for range 100 {
		u := newUUID()
		if !validUUID(u) || u[14] != '4' || !strings.ContainsRune("89ab", rune(u[19])) {
			t.Fatalf("newUUID: %q is not a version 4 UUID", u)
		}
		if seen[u] {
			t.Fatalf("newUUID repeated %q", u)
		}
		seen[u] = true
	}
	for _, bad := range []string{"", "x", "0000000-0000-4000-8000-0000000000000", "00000000-0000-4000-8000-00000000000g", "00000000_0000-4000-8000-000000000000"} {
		if validUUID(bad) {
			t.Errorf("validUUID(%q) = true, want false", bad)
		}
	}
}

func sorted(s []string) []string { return slices.Sorted(slices.Values(s)) }
