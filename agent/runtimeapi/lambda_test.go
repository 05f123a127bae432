package runtimeapi

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"skiff.dev/skiff/internal/testutil"
)

// TestAWSLambdaGo runs a real function built with aws-lambda-go as a plain
// child process against the server.
func TestAWSLambdaGo(t *testing.T) {
	bin := testutil.BuildFunction(t, "testfn")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(Config{})
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()

	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(),
		"AWS_LAMBDA_RUNTIME_API="+l.Addr().String(),
		"_HANDLER=bootstrap",
		"AWS_LAMBDA_FUNCTION_NAME=testfn",
		"AWS_LAMBDA_FUNCTION_MEMORY_SIZE=128",
	)
	var logs strings.Builder
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill() // the child we started, by its PID
		<-exited
		_ = s.Close()
		<-served
		if t.Failed() {
			t.Logf("function output:\n%s", logs.String())
		}
	})

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.WaitInit(ctx); err != nil {
		t.Fatalf("WaitInit: %v", err)
	}

	const arn = "arn:aws:lambda:us-east-1:123456789012:function:testfn"
	tests := []struct {
		name     string
		payload  string
		check    func(t *testing.T, res Result)
		wantExit bool
	}{
		{
			name:    "echo",
			payload: `{"hello":"world"}`,
			check: func(t *testing.T, res Result) {
				if res.Failed || string(res.Payload) != `{"hello":"world"}` {
					t.Errorf("got %+v (%s), want the payload echoed", res, res.Payload)
				}
			},
		},
		{
			name:    "deadline and context",
			payload: `{"action":"deadline"}`,
			check: func(t *testing.T, res Result) {
				var got struct {
					HasDeadline bool   `json:"hasDeadline"`
					RemainingMs int64  `json:"remainingMs"`
					RequestID   string `json:"requestId"`
					ARN         string `json:"arn"`
				}
				if err := json.Unmarshal(res.Payload, &got); err != nil {
					t.Fatalf("decoding %s: %v", res.Payload, err)
				}
				if !got.HasDeadline || got.RemainingMs <= 50_000 || got.RemainingMs > 60_000 {
					t.Errorf("deadline: got %+v, want about 60000 ms remaining", got)
				}
				if got.RequestID != "deadline-and-context" || got.ARN != arn {
					t.Errorf("context: got %q %q, want deadline-and-context %q", got.RequestID, got.ARN, arn)
				}
			},
		},
		{
			name:    "error",
			payload: `{"action":"error","message":"boom"}`,
			check: func(t *testing.T, res Result) {
				var body struct{ ErrorMessage, ErrorType string }
				_ = json.Unmarshal(res.Payload, &body)
				if !res.Failed || res.ErrorType != "errorString" || body.ErrorMessage != "boom" || body.ErrorType != "errorString" {
					t.Errorf("got %+v (%s), want a failed errorString boom", res, res.Payload)
				}
			},
		},
		{
			name:    "echo after an error",
			payload: `[1,2,3]`,
			check: func(t *testing.T, res Result) {
				if res.Failed || string(res.Payload) != `[1,2,3]` {
					t.Errorf("got %+v (%s), want the payload echoed", res, res.Payload)
				}
			},
		},
		{
			name:     "panic",
			payload:  `{"action":"panic","message":"oh no"}`,
			wantExit: true,
			check: func(t *testing.T, res Result) {
				var body struct {
					ErrorMessage, ErrorType string
					StackTrace              []any
				}
				_ = json.Unmarshal(res.Payload, &body)
				if !res.Failed || res.ErrorType != "string" || body.ErrorMessage != "oh no" || len(body.StackTrace) == 0 {
					t.Errorf("got %+v (%s), want a failed panic with a stack trace", res, res.Payload)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			inv := Invocation{
				RequestID:   strings.ReplaceAll(tt.name, " ", "-"),
				FunctionARN: arn,
				TraceID:     "Root=1-00000000-000000000000000000000000;Sampled=0",
				Deadline:    time.Now().Add(time.Minute),
				Payload:     []byte(tt.payload),
			}
			res, err := s.Invoke(ctx, inv)
			if err != nil {
				t.Fatalf("Invoke: %v", err)
			}
			tt.check(t, res)
			if tt.wantExit {
				select {
				case <-exited:
				case <-ctx.Done():
					t.Fatal("the function did not exit after a panic")
				}
			}
		})
	}
}
