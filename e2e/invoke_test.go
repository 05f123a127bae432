package e2e

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

type lambdaError struct {
	ErrorMessage string `json:"errorMessage"`
	ErrorType    string `json:"errorType"`
}

func decodeError(t *testing.T, r *skiffv1.InvokeResponse) lambdaError {
	t.Helper()
	var e lambdaError
	if err := json.Unmarshal(r.GetPayload(), &e); err != nil {
		t.Fatalf("error payload %q is not Lambda's error JSON: %v", r.GetPayload(), err)
	}
	return e
}

// TestInvokeBehaviours runs the real aws-lambda-go test function through a
// real `skiff dev`, over both Connect and gRPC.
func TestInvokeBehaviours(t *testing.T) {
	d := startDev(t, "")
	for _, proto := range protocols {
		t.Run(proto, func(t *testing.T) {
			c := d.client(proto, "")
			fn := "fn-" + proto
			createFunction(t, c, fn, &skiffv1.FunctionConfig{MemoryMb: 128, TimeoutSeconds: 2,
				Environment: map[string]string{"SKIFF_TEST_VAR": "from-config"}})

			t.Run("echo", func(t *testing.T) {
				r := mustInvoke(t, c, fn, `{"hello":"world"}`)
				if string(r.Payload) != `{"hello":"world"}` || r.FunctionError != "" || r.StatusCode != 200 {
					t.Fatalf("got status %d payload %s error %q", r.StatusCode, r.Payload, r.FunctionError)
				}
				if r.ExecutedVersion != "$LATEST" || r.RequestId == "" {
					t.Fatalf("executed version %q request id %q", r.ExecutedVersion, r.RequestId)
				}
			})
			t.Run("handled error", func(t *testing.T) {
				r := mustInvoke(t, c, fn, `{"action":"error","message":"boom"}`)
				e := decodeError(t, r)
				if r.FunctionError != "Unhandled" || e.ErrorMessage != "boom" || e.ErrorType != "errorString" {
					t.Fatalf("got %q %+v", r.FunctionError, e)
				}
			})
			t.Run("panic", func(t *testing.T) {
				r := mustInvoke(t, c, fn, `{"action":"panic","message":"kaboom"}`)
				if r.FunctionError != "Unhandled" || !strings.Contains(string(r.Payload), "kaboom") {
					t.Fatalf("got %q %s", r.FunctionError, r.Payload)
				}
				// aws-lambda-go exits after a panic: the next invoke still works.
				if r := mustInvoke(t, c, fn, `{"after":"panic"}`); r.FunctionError != "" {
					t.Fatalf("invoke after a panic: %q %s", r.FunctionError, r.Payload)
				}
			})
			t.Run("timeout", func(t *testing.T) {
				start := time.Now()
				r := mustInvoke(t, c, fn, `{"action":"sleep","sleep":"10s"}`)
				e := decodeError(t, r)
				if r.FunctionError != "Unhandled" || !strings.Contains(e.ErrorMessage, "Task timed out after 2.00 seconds") {
					t.Fatalf("got %q %+v", r.FunctionError, e)
				}
				if el := time.Since(start); el > 5*time.Second {
					t.Fatalf("timeout took %v, want about 2s", el)
				}
			})
			t.Run("environment and identity", func(t *testing.T) {
				r := mustInvoke(t, c, fn, `{"action":"env"}`)
				var got struct {
					Env      map[string]string
					UID, GID int
					Cwd      string
					Hostname string
				}
				if err := json.Unmarshal(r.Payload, &got); err != nil {
					t.Fatal(err)
				}
				want := map[string]string{
					"AWS_LAMBDA_FUNCTION_NAME": fn, "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
					"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "128", "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/" + fn,
					"AWS_LAMBDA_RUNTIME_API": "127.0.0.1:9001", "LAMBDA_TASK_ROOT": "/var/task",
					"_HANDLER": "bootstrap", "TZ": ":UTC", "LANG": "en_US.UTF-8", "SKIFF_TEST_VAR": "from-config",
				}
				for k, v := range want {
					if got.Env[k] != v {
						t.Errorf("%s = %q, want %q", k, got.Env[k], v)
					}
				}
				if got.Env["AWS_LAMBDA_LOG_STREAM_NAME"] == "" || got.Env["PATH"] == "" {
					t.Errorf("log stream name or PATH missing: %v", got.Env)
				}
				if got.UID != 993 || got.GID != 993 || got.Cwd != "/var/task" {
					t.Errorf("uid %d gid %d cwd %s, want 993 993 /var/task", got.UID, got.GID, got.Cwd)
				}
			})
			t.Run("code is read-only", func(t *testing.T) {
				r := mustInvoke(t, c, fn, `{"action":"write","message":"/var/task/x"}`)
				if !strings.Contains(string(r.Payload), "read-only file system") {
					t.Fatalf("writing /var/task: %s, want a read-only error", r.Payload)
				}
				r = mustInvoke(t, c, fn, `{"action":"write","message":"/tmp/x"}`)
				if !strings.Contains(string(r.Payload), `"error":"\u003cnil\u003e"`) && !strings.Contains(string(r.Payload), `"error":"<nil>"`) {
					t.Fatalf("writing /tmp: %s, want success", r.Payload)
				}
			})
			t.Run("context deadline", func(t *testing.T) {
				r := mustInvoke(t, c, fn, `{"action":"deadline"}`)
				var got struct {
					HasDeadline bool
					RemainingMs int64
					RequestID   string `json:"requestId"`
					ARN         string `json:"arn"`
				}
				if err := json.Unmarshal(r.Payload, &got); err != nil {
					t.Fatal(err)
				}
				if !got.HasDeadline || got.RemainingMs <= 0 || got.RemainingMs > 2000 {
					t.Errorf("deadline: has %v remaining %dms, want within the 2s timeout", got.HasDeadline, got.RemainingMs)
				}
				if got.RequestID != r.RequestId {
					t.Errorf("function saw request id %q, response says %q", got.RequestID, r.RequestId)
				}
				if got.ARN != "arn:aws:lambda:local:000000000000:function:"+fn {
					t.Errorf("function ARN %q", got.ARN)
				}
			})
			t.Run("log tail", func(t *testing.T) {
				r := mustInvoke(t, c, fn, `{"log":"a line from the function"}`)
				tail, err := base64.StdEncoding.DecodeString(r.LogResult)
				if err != nil {
					t.Fatal(err)
				}
				for _, want := range []string{"START RequestId: " + r.RequestId, "a line from the function", "END RequestId: " + r.RequestId, "REPORT RequestId: " + r.RequestId, "Max Memory Used: "} {
					if !strings.Contains(string(tail), want) {
						t.Errorf("log tail lacks %q:\n%s", want, tail)
					}
				}
			})
		})
	}
}

func TestColdThenWarm(t *testing.T) {
	d := startDev(t, "")
	c := d.client("connect", "")
	createFunction(t, c, "warm", nil)
	r1 := mustInvoke(t, c, "warm", `{"action":"whoami"}`)
	r2 := mustInvoke(t, c, "warm", `{"action":"whoami"}`)
	if string(r1.Payload) != string(r2.Payload) {
		t.Fatalf("whoami %s then %s: want the same sandbox process", r1.Payload, r2.Payload)
	}
	t1, _ := base64.StdEncoding.DecodeString(r1.LogResult)
	t2, _ := base64.StdEncoding.DecodeString(r2.LogResult)
	if !strings.Contains(string(t1), "Init Duration") || strings.Contains(string(t2), "Init Duration") {
		t.Fatalf("want an Init Duration on the cold start only:\ncold: %s\nwarm: %s", t1, t2)
	}
}

func TestParallelInvokesGetOwnSandboxes(t *testing.T) {
	d := startDev(t, "")
	c := d.client("connect", "")
	createFunction(t, c, "par", &skiffv1.FunctionConfig{TimeoutSeconds: 10})
	const n = 4
	var wg sync.WaitGroup
	var mu sync.Mutex
	seen := map[string]bool{}
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w, err := invoke(context.Background(), c, "par", `{"action":"sleepwho","sleep":"1s"}`)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			seen[string(w.Payload)] = true
			mu.Unlock()
		}()
	}
	wg.Wait()
	// A sandbox runs one invocation at a time: n invocations sleeping at
	// once ran on n sandboxes, each answering with its own identity.
	if len(seen) != n {
		t.Fatalf("%d parallel invokes were served by %d sandbox(es), want %d", n, len(seen), n)
	}
}

func TestReservedConcurrencyThrottles(t *testing.T) {
	d := startDev(t, "")
	c := d.client("connect", "")
	createFunction(t, c, "limited", &skiffv1.FunctionConfig{TimeoutSeconds: 10})
	if _, err := c.fn.PutFunctionConcurrency(context.Background(), connect.NewRequest(&skiffv1.PutFunctionConcurrencyRequest{Name: "limited", ReservedConcurrentExecutions: 2})); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	results := make(chan error, 2)
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := invoke(ctx, c, "limited", `{"action":"sleep","sleep":"3s"}`)
			results <- err
		}()
	}
	// Wait until both are admitted (running), then the third is throttled.
	waitFor(t, 20*time.Second, "two invocations in flight", func() bool {
		return d.metric(t, `skiff_function_concurrent_executions{function="limited"}`) == 2
	})
	_, err := invoke(context.Background(), c, "limited", `{"action":"sleep","sleep":"1ms"}`)
	if connect.CodeOf(err) != connect.CodeResourceExhausted {
		t.Fatalf("third concurrent invoke: %v, want ResourceExhausted", err)
	}
	var ce *connect.Error
	if !errorsAs(err, &ce) || ce.Meta().Get(errs.HeaderReason) != "throttled" || ce.Meta().Get(errs.HeaderRetryAfter) == "" {
		t.Fatalf("throttle error lacks reason/retry hint: %v", err)
	}
	wg.Wait()
	close(results)
	for err := range results {
		if err != nil {
			t.Errorf("admitted invoke failed: %v", err)
		}
	}
}

func TestSixMegabytePayloads(t *testing.T) {
	d := startDev(t, "")
	c := d.client("connect", "")
	createFunction(t, c, "big", &skiffv1.FunctionConfig{MemoryMb: 512, TimeoutSeconds: 10})
	// Request: a JSON string just under 6 MB is echoed back whole.
	body := `"` + strings.Repeat("a", 6*1024*1024-64) + `"`
	r := mustInvoke(t, c, "big", body)
	if len(r.Payload) != len(body) || r.FunctionError != "" {
		t.Fatalf("6 MB echo: got %d bytes, error %q; want %d bytes", len(r.Payload), r.FunctionError, len(body))
	}
	// Response: the function returns just under 6 MB.
	r = mustInvoke(t, c, "big", fmt.Sprintf(`{"action":"big","size":%d}`, 6*1024*1024-64))
	if len(r.Payload) < 6*1024*1024-64 || r.FunctionError != "" {
		t.Fatalf("6 MB response: got %d bytes, error %q", len(r.Payload), r.FunctionError)
	}
	// Over the limit, both ways.
	_, err := invoke(context.Background(), c, "big", `"`+strings.Repeat("a", 6*1024*1024+10)+`"`)
	if connect.CodeOf(err) != connect.CodeInvalidArgument && connect.CodeOf(err) != connect.CodeResourceExhausted {
		t.Fatalf("7 MB request: %v, want a clear rejection", err)
	}
	r = mustInvoke(t, c, "big", fmt.Sprintf(`{"action":"big","size":%d}`, 7*1024*1024))
	if r.FunctionError == "" || !strings.Contains(string(r.Payload), "Function.ResponseSizeTooLarge") {
		t.Fatalf("7 MB response: error %q payload %.200s, want Function.ResponseSizeTooLarge", r.FunctionError, r.Payload)
	}
}

func TestOutOfMemoryAndExit(t *testing.T) {
	d := startDev(t, "")
	c := d.client("connect", "")
	createFunction(t, c, "oom", &skiffv1.FunctionConfig{MemoryMb: 128, TimeoutSeconds: 20})
	r := mustInvoke(t, c, "oom", `{"action":"oom","allocMB":512}`)
	e := decodeError(t, r)
	if r.FunctionError != "Unhandled" || e.ErrorType != "Runtime.OutOfMemory" || !strings.Contains(e.ErrorMessage, "signal: killed") {
		t.Fatalf("OOM: got %q %+v, want Runtime.OutOfMemory naming the signal", r.FunctionError, e)
	}
	r = mustInvoke(t, c, "oom", `{"action":"exit","exit":7}`)
	e = decodeError(t, r)
	if e.ErrorType != "Runtime.ExitError" || !strings.Contains(e.ErrorMessage, "exit status 7") {
		t.Fatalf("exit: got %+v, want Runtime.ExitError naming exit status 7", e)
	}
	// The sandbox is replaced: the next invoke succeeds.
	if r := mustInvoke(t, c, "oom", `{"ok":true}`); r.FunctionError != "" {
		t.Fatalf("after the crash: %s", r.Payload)
	}
}

func TestDeleteDuringInvokes(t *testing.T) {
	d := startDev(t, "")
	c := d.client("connect", "")
	createFunction(t, c, "doomed", &skiffv1.FunctionConfig{TimeoutSeconds: 10})
	mustInvoke(t, c, "doomed", `{}`)
	done := make(chan *skiffv1.InvokeResponse, 1)
	go func() {
		r, err := invoke(context.Background(), c, "doomed", `{"action":"sleep","sleep":"1500ms"}`)
		if err != nil {
			t.Error(err)
		}
		done <- r
	}()
	waitFor(t, 10*time.Second, "the invoke to be running", func() bool {
		return d.metric(t, `skiff_function_concurrent_executions{function="doomed"}`) >= 1
	})
	if _, err := c.fn.DeleteFunction(context.Background(), connect.NewRequest(&skiffv1.DeleteFunctionRequest{Name: "doomed"})); err != nil {
		t.Fatal(err)
	}
	if _, err := invoke(context.Background(), c, "doomed", `{}`); connect.CodeOf(err) != connect.CodeNotFound {
		t.Fatalf("invoke after delete: %v, want NotFound", err)
	}
	if r := <-done; r == nil || r.FunctionError != "" || !strings.Contains(string(r.Payload), "slept") {
		t.Fatalf("in-flight invoke during delete: %+v, want it to finish", r)
	}
}
