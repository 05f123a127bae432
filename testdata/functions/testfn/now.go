package main

import (
	"context"
	"encoding/json"
	"time"
)

// The "now" action answers the time the handler started, {"t": unix
// nanoseconds}: `make bench` measures async end-to-end latency (accept to
// function start) with it, reading the answer from an OnSuccess record.
func init() {
	extraActions["now"] = func(context.Context, json.RawMessage) (any, error) {
		return map[string]int64{"t": time.Now().UnixNano()}, nil
	}
}
