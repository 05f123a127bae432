package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/testing/protocmp"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

func TestInvokeAsync(t *testing.T) {
	for _, proto := range protocols {
		t.Run(proto, func(t *testing.T) {
			s := newFakeServer(t)
			s.inv.respond = func(r *skiffv1.InvokeRequest) (*skiffv1.InvokeResponse, error) {
				return &skiffv1.InvokeResponse{StatusCode: 202, RequestId: "req-async"}, nil
			}
			c := newCLI(t, s)
			r := c.run("--protocol", proto, "invoke", "resize", "--async", "--payload", `{"key":"cat.jpg"}`, "--qualifier", "$LATEST")
			if r.code != 0 {
				t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
			}
			_, _, msg := s.inv.last(t)
			want := &skiffv1.InvokeRequest{
				FunctionName: "resize", Qualifier: "$LATEST", Payload: []byte(`{"key":"cat.jpg"}`),
				InvocationType: skiffv1.InvocationType_INVOCATION_TYPE_EVENT,
				LogType:        skiffv1.LogType_LOG_TYPE_NONE,
			}
			if d := cmp.Diff(want, msg, protocmp.Transform()); d != "" {
				t.Errorf("request (-want +got):\n%s", d)
			}
			if r.stdout != "req-async\n" || r.stderr != "" {
				t.Errorf("stdout %q, stderr %q; want the request id alone and nothing", r.stdout, r.stderr)
			}

			r = c.run("--protocol", proto, "invoke", "resize", "--async", "-o", "json")
			var out struct {
				StatusCode int    `json:"statusCode"`
				RequestID  string `json:"requestId"`
			}
			if err := json.Unmarshal([]byte(r.stdout), &out); err != nil || out.StatusCode != 202 || out.RequestID != "req-async" {
				t.Errorf("json output %q (err %v), want status 202 and the request id", r.stdout, err)
			}
		})
	}
}

func TestInvokeAsyncErrors(t *testing.T) {
	t.Run("usage", func(t *testing.T) {
		for _, args := range [][]string{
			{"invoke", "hello", "--async", "--dry-run"},
			{"invoke", "hello", "--async", "--log-tail"},
		} {
			s := newFakeServer(t)
			r := newCLI(t, s).run(args...)
			if r.code != exitUsage || !strings.Contains(r.stderr, "--async cannot be used with") {
				t.Errorf("%v: exit %d, stderr %q; want %d and the conflict", args, r.code, r.stderr, exitUsage)
			}
			if s.inv.count() != 0 {
				t.Errorf("%v: the server got a call, want none", args)
			}
		}
	})
	t.Run("oversized payload", func(t *testing.T) {
		s := newFakeServer(t)
		s.inv.respond = func(*skiffv1.InvokeRequest) (*skiffv1.InvokeResponse, error) {
			return nil, errs.Invalid("payload", "payload of 2097152 bytes is over the 1048576-byte limit of asynchronous invocations")
		}
		r := newCLI(t, s).run("invoke", "hello", "--async")
		want := "skiff: payload of 2097152 bytes is over the 1048576-byte limit of asynchronous invocations (reason: invalid_payload, field: payload)\n"
		if r.code != 1 || r.stderr != want || r.stdout != "" {
			t.Errorf("got exit %d, stdout %q, stderr %q; want 1, nothing, %q", r.code, r.stdout, r.stderr, want)
		}
	})
	t.Run("no request id", func(t *testing.T) {
		s := newFakeServer(t)
		s.inv.respond = func(*skiffv1.InvokeRequest) (*skiffv1.InvokeResponse, error) {
			return &skiffv1.InvokeResponse{StatusCode: 202}, nil
		}
		r := newCLI(t, s).run("invoke", "hello", "--async")
		if r.code != 1 || !strings.Contains(r.stderr, "sent no request id") {
			t.Errorf("got exit %d, stderr %q; want 1 and a missing request id", r.code, r.stderr)
		}
	})
}

func TestEventConfigPut(t *testing.T) {
	i32 := func(v int32) *int32 { return &v }
	tests := []struct {
		name string
		args []string
		want *skiffv1.EventInvokeConfig
	}{
		{"defaults", nil, &skiffv1.EventInvokeConfig{}},
		{
			"everything",
			[]string{"--max-retries", "1", "--max-age", "3600", "--on-success", "https://example.com/hook", "--on-failure", "function:on-fail", "--dlq", "queue:dead"},
			&skiffv1.EventInvokeConfig{MaximumRetryAttempts: i32(1), MaximumEventAgeSeconds: i32(3600),
				OnSuccess: "https://example.com/hook", OnFailure: "function:on-fail", DeadLetterQueue: "queue:dead"},
		},
		// Zero retries is a setting, not the default.
		{"zero retries", []string{"--max-retries", "0"}, &skiffv1.EventInvokeConfig{MaximumRetryAttempts: i32(0)}},
		{"bare dlq name", []string{"--dlq", "dead"}, &skiffv1.EventInvokeConfig{DeadLetterQueue: "queue:dead"}},
	}
	for _, tt := range tests {
		for _, proto := range protocols {
			t.Run(tt.name+"/"+proto, func(t *testing.T) {
				s := newFakeServer(t)
				r := newCLI(t, s).run(append([]string{"--protocol", proto, "fn", "event-config", "put", "resize"}, tt.args...)...)
				if r.code != 0 {
					t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
				}
				proc, h, msg := s.fn.last(t)
				want := &skiffv1.PutFunctionEventInvokeConfigRequest{FunctionName: "resize", Config: tt.want}
				if d := cmp.Diff(want, msg, protocmp.Transform()); proc != "PutFunctionEventInvokeConfig" || d != "" {
					t.Errorf("got %s, request (-want +got):\n%s", proc, d)
				}
				if h.Get("Authorization") != "Bearer test-key" {
					t.Errorf("Authorization = %q, want Bearer test-key", h.Get("Authorization"))
				}
				if !strings.Contains(r.stdout, "Function:") || !strings.Contains(r.stdout, "resize") {
					t.Errorf("stdout lacks the function:\n%s", r.stdout)
				}
			})
		}
	}
}

func TestEventConfigOutput(t *testing.T) {
	s := newFakeServer(t)
	c := newCLI(t, s)

	r := c.run("fn", "event-config", "get", "resize")
	if r.code != 0 {
		t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
	}
	want := map[string]string{
		"Function:":               "resize",
		"Maximum retry attempts:": "2 (default)",
		"Maximum event age:":      "3600 s",
		"On success:":             "-",
		"On failure:":             "queue:failed",
		"Dead-letter queue:":      "-",
		"Last modified:":          "2026-01-03T00:00:00Z",
	}
	checkFields(t, r.stdout, want)

	r = c.run("fn", "event-config", "get", "resize", "-o", "json")
	var out struct {
		MaximumRetryAttempts   *int   `json:"maximumRetryAttempts"`
		MaximumEventAgeSeconds *int   `json:"maximumEventAgeSeconds"`
		OnFailure              string `json:"onFailure"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil || out.MaximumRetryAttempts != nil ||
		out.MaximumEventAgeSeconds == nil || *out.MaximumEventAgeSeconds != 3600 || out.OnFailure != "queue:failed" {
		t.Errorf("json output %q (err %v), want unset retries, age 3600 and the failure target", r.stdout, err)
	}

	r = c.run("fn", "event-config", "get", "missing")
	if r.code != 1 || !strings.Contains(r.stderr, `no event invoke config for function "missing" (reason: not_found)`) {
		t.Errorf("get missing: exit %d, stderr %q", r.code, r.stderr)
	}

	r = c.run("fn", "event-config", "delete", "resize")
	if r.code != 0 || r.stdout != "deleted the event invoke config of resize\n" {
		t.Errorf("delete: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	if proc, _, msg := s.fn.last(t); proc != "DeleteFunctionEventInvokeConfig" || msg.(*skiffv1.DeleteFunctionEventInvokeConfigRequest).GetFunctionName() != "resize" {
		t.Errorf("got %s %v, want DeleteFunctionEventInvokeConfig of resize", proc, msg)
	}
}

func TestEventConfigErrors(t *testing.T) {
	s := newFakeServer(t)
	s.fn.fail = errs.Invalid("on_success", `destination "queue:nope" does not exist`)
	c := newCLI(t, s)
	r := c.run("fn", "event-config", "put", "resize", "--on-success", "queue:nope")
	want := `skiff: destination "queue:nope" does not exist (reason: invalid_on_success, field: on_success)` + "\n"
	if r.code != 1 || r.stderr != want {
		t.Errorf("got exit %d, stderr %q; want 1, %q", r.code, r.stderr, want)
	}
	for _, args := range [][]string{
		{"fn", "event-config", "put"},
		{"fn", "event-config", "put", "a", "b"},
		{"fn", "event-config", "put", "a", "--max-retries", "two"},
		{"fn", "event-config", "get"},
		{"fn", "event-config", "nope"},
	} {
		before := s.fn.count()
		if r := c.run(args...); r.code != exitUsage {
			t.Errorf("%v: exit %d, want %d; stderr %q", args, r.code, exitUsage, r.stderr)
		}
		if s.fn.count() != before {
			t.Errorf("%v: the server got a call, want none", args)
		}
	}
}

// checkFields checks that a field-per-line output has each label with its
// value.
func checkFields(t *testing.T, out string, want map[string]string) {
	t.Helper()
	got := map[string]string{}
	for _, l := range strings.Split(out, "\n") {
		for label := range want {
			if rest, ok := strings.CutPrefix(l, label); ok {
				got[label] = strings.TrimSpace(rest)
			}
		}
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("fields (-want +got):\n%s\noutput:\n%s", d, out)
	}
}
