package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/aws/aws-lambda-go/lambdacontext"
)

// extraActions are actions kept apart from main.go's switch, so tests of
// different areas can add theirs without touching one another's code.
var extraActions = map[string]func(ctx context.Context, raw json.RawMessage) (any, error){
	"failtimes": failTimes,
}

// failTimes fails the first Times invocations of a key (default: the
// request id, the same for every attempt of an async event) and then
// succeeds, answering {"attempts": n}. Attempts are counted in a file under
// /tmp, so they must run in the same sandbox: the attempts of one async
// event run one after another and reuse the warm sandbox.
func failTimes(ctx context.Context, raw json.RawMessage) (any, error) {
	var req struct {
		Times int    `json:"times"`
		Key   string `json:"key"`
	}
	if err := json.Unmarshal(raw, &req); err != nil {
		return nil, err
	}
	key := req.Key
	if key == "" {
		lc, _ := lambdacontext.FromContext(ctx)
		key = lc.AwsRequestID
	}
	path := filepath.Join(os.TempDir(), "failtimes-"+strings.Map(func(r rune) rune {
		if r == '/' || r == '.' {
			return '_'
		}
		return r
	}, key))
	n := 1
	if b, err := os.ReadFile(path); err == nil {
		prev, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		n = prev + 1
	}
	if err := os.WriteFile(path, []byte(strconv.Itoa(n)), 0o644); err != nil {
		return nil, fmt.Errorf("counting attempts: %w", err)
	}
	if n <= req.Times {
		return nil, fmt.Errorf("failing attempt %d of %d", n, req.Times)
	}
	return map[string]any{"attempts": n}, nil
}

// isSQSEvent reports whether raw is an SQS event (an event source mapping's
// batch).
func isSQSEvent(raw json.RawMessage) bool {
	var probe struct {
		Records []struct {
			EventSource string `json:"eventSource"`
		} `json:"Records"`
	}
	return json.Unmarshal(raw, &probe) == nil && len(probe.Records) > 0 && probe.Records[0].EventSource == "aws:sqs"
}

// handleSQS handles an event source mapping's batch: it reports as failed
// (Lambda's ReportBatchItemFailures response) every record whose body
// contains "poison"; the others succeed.
var handleSQS = func(ctx context.Context, raw json.RawMessage) (any, error) {
	var ev struct {
		Records []struct {
			MessageID string `json:"messageId"`
			Body      string `json:"body"`
		} `json:"Records"`
	}
	if err := json.Unmarshal(raw, &ev); err != nil {
		return nil, fmt.Errorf("decoding the SQS event: %w", err)
	}
	failures := []map[string]string{}
	for _, r := range ev.Records {
		if strings.Contains(r.Body, "poison") {
			failures = append(failures, map[string]string{"itemIdentifier": r.MessageID})
		}
	}
	return map[string]any{"batchItemFailures": failures}, nil
}
