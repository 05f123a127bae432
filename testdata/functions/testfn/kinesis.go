package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/aws/aws-lambda-go/lambda"
)

// With KINESIS_NOOP set (make bench's stream sink) the whole function is a
// no-op: every invoke answers null at once, without reading the event
// (handle's dispatch decodes a 100-record event three times, over a
// millisecond, which is the function's cost, not the pipeline's).
func init() {
	if os.Getenv("KINESIS_NOOP") != "" {
		lambda.Start(func(context.Context, json.RawMessage) (any, error) { return nil, nil })
	}
}

// kinesisEvent is the part of Kinesis's Lambda event the stream tests
// read.
type kinesisEvent struct {
	Records []struct {
		Kinesis struct {
			PartitionKey   string `json:"partitionKey"`
			SequenceNumber string `json:"sequenceNumber"`
			Data           []byte `json:"data"` // base64 in the JSON
		} `json:"kinesis"`
		EventSource string `json:"eventSource"`
		EventID     string `json:"eventID"`
	} `json:"Records"`
}

// isKinesisEvent reports whether raw is a stream mapping's batch.
func isKinesisEvent(raw json.RawMessage) bool {
	var probe struct {
		Records []struct {
			EventSource string `json:"eventSource"`
		} `json:"Records"`
	}
	return json.Unmarshal(raw, &probe) == nil && len(probe.Records) > 0 && probe.Records[0].EventSource == "aws:kinesis"
}

// handleKinesis handles a stream mapping's batch. The stream tests read
// what it saw from the function's logs: it fails a batch holding a record
// whose data contains "poison" (logging "FAIL <records>"), and otherwise
// logs one line per record, in the batch's order:
//
//	SEEN <shard id> <sequence number> <partition key> <data>
//
// (the shard id is the eventID's part before the colon). With
// KINESIS_SLEEP set (a duration) it first sleeps that long per batch.
func handleKinesis(_ context.Context, raw json.RawMessage) (any, error) {
	var ev kinesisEvent
	if err := json.Unmarshal(raw, &ev); err != nil {
		return nil, fmt.Errorf("decoding the Kinesis event: %w", err)
	}
	if d, err := time.ParseDuration(os.Getenv("KINESIS_SLEEP")); err == nil && d > 0 {
		time.Sleep(d)
	}
	for _, r := range ev.Records {
		if strings.Contains(string(r.Kinesis.Data), "poison") {
			fmt.Printf("FAIL %d\n", len(ev.Records))
			return nil, fmt.Errorf("poison record %s in a batch of %d", r.Kinesis.SequenceNumber, len(ev.Records))
		}
	}
	var b strings.Builder
	for _, r := range ev.Records {
		shard, _, _ := strings.Cut(r.EventID, ":")
		fmt.Fprintf(&b, "SEEN %s %s %s %s\n", shard, r.Kinesis.SequenceNumber, r.Kinesis.PartitionKey, r.Kinesis.Data)
	}
	os.Stdout.WriteString(b.String())
	return map[string]int{"records": len(ev.Records)}, nil
}
