package destinations

import (
	"encoding/json"
	"testing"
	"time"
)

func TestRecordJSONFieldNames(t *testing.T) {
	tests := []struct {
		name string
		rec  Record
		want string
	}{
		{
			name: "success",
			rec: Record{
				Version:   "1.0",
				Timestamp: "2019-11-24T23:08:25.651Z",
				RequestContext: RequestContext{
					RequestID:              "c2a6f2ae-7dbb-4d22-8782-d0485c9877e2",
					FunctionArn:            "arn:aws:lambda:local:000000000000:function:my-function:$LATEST",
					Condition:              ConditionSuccess,
					ApproximateInvokeCount: 1,
				},
				RequestPayload:  json.RawMessage(`{"Success":true}`),
				ResponseContext: ResponseContext{StatusCode: 200, ExecutedVersion: "$LATEST"},
			},
			want: `{"version":"1.0","timestamp":"2019-11-24T23:08:25.651Z","requestContext":{"requestId":"c2a6f2ae-7dbb-4d22-8782-d0485c9877e2","functionArn":"arn:aws:lambda:local:000000000000:function:my-function:$LATEST","condition":"Success","approximateInvokeCount":1},"requestPayload":{"Success":true},"responseContext":{"statusCode":200,"executedVersion":"$LATEST"},"responsePayload":null}`,
		},
		{
			name: "retries exhausted",
			rec: Record{
				Timestamp: "2019-11-24T21:52:47.333Z",
				RequestContext: RequestContext{
					RequestID:              "e4b46cbf-b738-xmpl-8880-a18cdf61200e",
					FunctionArn:            "arn:aws:lambda:local:000000000000:function:my-function:$LATEST",
					Condition:              ConditionRetriesExhausted,
					ApproximateInvokeCount: 3,
				},
				RequestPayload:  json.RawMessage(`{"ORDER_IDS":["9e07af03"]}`),
				ResponseContext: ResponseContext{StatusCode: 200, ExecutedVersion: "$LATEST", FunctionError: "Unhandled"},
				ResponsePayload: json.RawMessage(`{"errorMessage":"boom","errorType":"errorString"}`),
			},
			want: `{"version":"1.0","timestamp":"2019-11-24T21:52:47.333Z","requestContext":{"requestId":"e4b46cbf-b738-xmpl-8880-a18cdf61200e","functionArn":"arn:aws:lambda:local:000000000000:function:my-function:$LATEST","condition":"RetriesExhausted","approximateInvokeCount":3},"requestPayload":{"ORDER_IDS":["9e07af03"]},"responseContext":{"statusCode":200,"executedVersion":"$LATEST","functionError":"Unhandled"},"responsePayload":{"errorMessage":"boom","errorType":"errorString"}}`,
		},
		{
			name: "payloads that are not JSON become strings",
			rec: Record{
				Timestamp:      "2020-01-01T00:00:00.000Z",
				RequestContext: RequestContext{RequestID: "r", FunctionArn: "a", Condition: ConditionEventAgeExceeded},
				RequestPayload: json.RawMessage("plain \"text\""),
			},
			want: `{"version":"1.0","timestamp":"2020-01-01T00:00:00.000Z","requestContext":{"requestId":"r","functionArn":"a","condition":"EventAgeExceeded","approximateInvokeCount":0},"requestPayload":"plain \"text\"","responseContext":{"statusCode":0,"executedVersion":""},"responsePayload":null}`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.rec.Encode()
			if err != nil {
				t.Fatalf("Encode: %v", err)
			}
			if string(got) != tt.want {
				t.Errorf("Encode:\ngot  %s\nwant %s", got, tt.want)
			}
			var back Record
			if err := json.Unmarshal(got, &back); err != nil {
				t.Fatalf("decoding the encoded record: %v", err)
			}
			if back.RequestContext != tt.rec.RequestContext {
				t.Errorf("round trip requestContext: got %+v, want %+v", back.RequestContext, tt.rec.RequestContext)
			}
		})
	}
}

func TestPayload(t *testing.T) {
	tests := []struct {
		in   string
		want string // "" means nil
	}{
		{"", ""},
		{`{"a":1}`, `{"a":1}`},
		{`"s"`, `"s"`},
		{`42`, `42`},
		{`null`, `null`},
		{`not json`, `"not json"`},
		{`{"a":`, `"{\"a\":"`},
		{"\xff\xfe", `"\ufffd\ufffd"`},
	}
	for _, tt := range tests {
		got := Payload([]byte(tt.in))
		if string(got) != tt.want {
			t.Errorf("Payload(%q) = %q, want %q", tt.in, got, tt.want)
		}
		if got != nil && !json.Valid(got) {
			t.Errorf("Payload(%q) = %q is not valid JSON", tt.in, got)
		}
	}
}

func TestTimestamp(t *testing.T) {
	at := time.Date(2019, 11, 24, 23, 8, 25, 651_900_000, time.FixedZone("x", 3600))
	if got, want := Timestamp(at), "2019-11-24T22:08:25.651Z"; got != want {
		t.Errorf("Timestamp = %q, want %q", got, want)
	}
}
