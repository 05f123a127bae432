package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"skiff.dev/skiff/agent/placement"
	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/testutil"
)

// These tests run the real aws-lambda-go test function as a plain child
// process (no jail: that is vmm/jail's and the agent's privileged tests'
// job), so the pool, the Runtime API and the log framing are tested
// without root.

type procLauncher struct {
	launched atomic.Int64
	fail     error
}

type proc struct {
	cmd    *exec.Cmd
	ln     net.Listener
	done   chan struct{}
	closed sync.Once
}

func (l *procLauncher) Launch(s LaunchSpec) (Process, error) {
	if l.fail != nil {
		return nil, l.fail
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	env := make([]string, 0, len(s.Env))
	for _, kv := range s.Env {
		if strings.HasPrefix(kv, "AWS_LAMBDA_RUNTIME_API=") {
			kv = "AWS_LAMBDA_RUNTIME_API=" + ln.Addr().String()
		}
		env = append(env, kv)
	}
	cmd := exec.Command(filepath.Join(s.CodeDir, "bootstrap"))
	cmd.Env, cmd.Stdout, cmd.Stderr = env, s.Output, s.Output
	if err := cmd.Start(); err != nil {
		ln.Close()
		return nil, err
	}
	l.launched.Add(1)
	p := &proc{cmd: cmd, ln: ln, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	return p, nil
}

func (p *proc) Listener() net.Listener { return p.ln }
func (p *proc) Done() <-chan struct{}  { return p.done }
func (p *proc) ExitReason() (string, bool) {
	return p.cmd.ProcessState.String(), false
}
func (p *proc) MaxMemoryBytes() int64 { return 10 << 20 }
func (p *proc) Kill() error           { return p.cmd.Process.Kill() }
func (p *proc) Close() error {
	p.closed.Do(func() {
		_ = p.cmd.Process.Kill()
		<-p.done
		_ = p.ln.Close()
	})
	return nil
}

type dirCode struct{ dir string }

func (d dirCode) Get(context.Context, string) (string, error) { return d.dir, nil }

var (
	codeOnce sync.Once
	codeDir  string
)

func testCode(t *testing.T) CodeSource {
	codeOnce.Do(func() {
		bin := testutil.BuildFunction(t, "testfn")
		dir, err := os.MkdirTemp("", "skiff-sandbox-test")
		if err != nil {
			t.Fatal(err)
		}
		data, err := os.ReadFile(bin)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "bootstrap"), data, 0o755); err != nil {
			t.Fatal(err)
		}
		codeDir = dir
	})
	return dirCode{codeDir}
}

type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func newTestManager(t *testing.T, memMB int64) (*Manager, *procLauncher, *clock) {
	t.Helper()
	l := &procLauncher{}
	clk := &clock{now: time.Unix(1_700_000_000, 0)}
	m, err := New(Config{Launcher: l, Code: testCode(t), Ledger: placement.NewLedger(memMB), Host: "test", KeepAlive: time.Minute, Now: realish(clk)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close(context.Background()) })
	return m, l, clk
}

// realish returns a clock that moves with real time plus the fake offset,
// so durations stay positive while tests jump ahead for keep-alive.
func realish(c *clock) func() time.Time {
	start := time.Now()
	return func() time.Time { return c.Now().Add(time.Since(start)) }
}

var reqN atomic.Int64

func spec(fn, key string, timeout int32) *skiffv1.SandboxSpec {
	return &skiffv1.SandboxSpec{FunctionName: fn, FunctionArn: "arn:aws:lambda:local:000000000000:function:" + fn,
		ConfigKey: key, CodeSha256: "abc", MemoryMb: 128, TimeoutSeconds: timeout,
		Environment: map[string]string{"GREETING": "hi"}}
}

func invoke(t *testing.T, m *Manager, s *skiffv1.SandboxSpec, payload string) *skiffv1.AgentInvokeResponse {
	t.Helper()
	resp, err := m.Invoke(context.Background(), &skiffv1.AgentInvokeRequest{
		Spec: s, RequestId: "req-" + string(rune('a'+reqN.Add(1)%26)) + time.Now().Format("150405.000000"), Payload: []byte(payload), WantLog: true})
	if err != nil {
		t.Errorf("invoke %s: %v", payload, err) // not Fatal: also called from goroutines
		return &skiffv1.AgentInvokeResponse{}
	}
	return resp
}

func TestColdThenWarmReusesSandbox(t *testing.T) {
	m, l, _ := newTestManager(t, 1024)
	s := spec("echo", "k1", 3)
	r1 := invoke(t, m, s, `{"hello":"world"}`)
	if string(r1.Payload) != `{"hello":"world"}` || r1.FunctionError != "" {
		t.Fatalf("got payload %s error %q, want the echo", r1.Payload, r1.FunctionError)
	}
	if !r1.ColdStart || r1.InitDurationUs <= 0 {
		t.Fatalf("first invoke: cold=%v init=%dus, want a cold start with an init duration", r1.ColdStart, r1.InitDurationUs)
	}
	r2 := invoke(t, m, s, `{"action":"whoami"}`)
	r3 := invoke(t, m, s, `{"action":"whoami"}`)
	if r2.ColdStart || r2.SandboxId != r1.SandboxId || string(r2.Payload) != string(r3.Payload) {
		t.Fatalf("warm invokes: cold=%v sandbox %s vs %s, whoami %s vs %s: want the same sandbox and process", r2.ColdStart, r2.SandboxId, r1.SandboxId, r2.Payload, r3.Payload)
	}
	if n := l.launched.Load(); n != 1 {
		t.Fatalf("launched %d processes, want 1", n)
	}
	for _, want := range []string{"START RequestId: ", "END RequestId: ", "REPORT RequestId: ", "Billed Duration: ", "Memory Size: 128 MB", "Max Memory Used: 10 MB", "Init Duration: "} {
		if !strings.Contains(r1.Log, want) {
			t.Errorf("cold log lacks %q:\n%s", want, r1.Log)
		}
	}
	if strings.Contains(r2.Log, "Init Duration") {
		t.Errorf("warm log has an Init Duration:\n%s", r2.Log)
	}
}

func TestLogsBelongToTheirInvocation(t *testing.T) {
	m, _, _ := newTestManager(t, 1024)
	s := spec("logger", "k1", 3)
	for i := 0; i < 20; i++ {
		line := "line-" + time.Now().Format("150405.000000000")
		r := invoke(t, m, s, `{"log":"`+line+`"}`)
		start := strings.Index(r.Log, "START")
		end := strings.Index(r.Log, "END RequestId")
		if i := strings.Index(r.Log, line); i < start || i > end {
			t.Fatalf("invocation %d: logged line %q not between START and END:\n%s", i, line, r.Log)
		}
	}
}

func TestFunctionErrorsAndPanics(t *testing.T) {
	m, _, _ := newTestManager(t, 1024)
	s := spec("errs", "k1", 3)
	r := invoke(t, m, s, `{"action":"error","message":"boom"}`)
	var body struct{ ErrorMessage, ErrorType string }
	if err := json.Unmarshal(r.Payload, &body); err != nil {
		t.Fatal(err)
	}
	if r.FunctionError != "Unhandled" || body.ErrorMessage != "boom" || body.ErrorType != "errorString" {
		t.Fatalf("handled error: got %q %s", r.FunctionError, r.Payload)
	}
	// A handled error leaves the sandbox warm.
	if r = invoke(t, m, s, `{"ok":1}`); r.FunctionError != "" || r.ColdStart {
		t.Fatalf("after a handled error: got error %q cold %v, want a warm success", r.FunctionError, r.ColdStart)
	}
	r = invoke(t, m, s, `{"action":"panic","message":"kaboom"}`)
	if r.FunctionError != "Unhandled" || !strings.Contains(string(r.Payload), "kaboom") {
		t.Fatalf("panic: got %q %s", r.FunctionError, r.Payload)
	}
	// aws-lambda-go exits after reporting a panic; the next invocation, which
	// the dead runtime never took, runs on a new sandbox instead of failing.
	for i := 0; i < 5; i++ {
		if r = invoke(t, m, s, `{"ok":1}`); r.FunctionError != "" {
			t.Fatalf("invoke %d after a panic: got error %q %s, want success", i, r.FunctionError, r.Payload)
		}
	}
}

func TestTimeoutKillsAndReplaces(t *testing.T) {
	m, l, _ := newTestManager(t, 1024)
	s := spec("slow", "k1", 1)
	invoke(t, m, s, `{}`)
	r := invoke(t, m, s, `{"action":"sleep","sleep":"5s"}`)
	if r.FunctionError != "Unhandled" || !strings.Contains(string(r.Payload), "Task timed out after 1.00 seconds") {
		t.Fatalf("got %q %s, want a timeout", r.FunctionError, r.Payload)
	}
	if !strings.Contains(r.Log, "Task timed out after 1.00 seconds") {
		t.Errorf("log lacks the timeout line:\n%s", r.Log)
	}
	r = invoke(t, m, s, `{}`)
	if !r.ColdStart || l.launched.Load() != 2 {
		t.Fatalf("after a timeout: cold=%v launched=%d, want a new sandbox", r.ColdStart, l.launched.Load())
	}
}

func TestExitMidInvoke(t *testing.T) {
	m, _, _ := newTestManager(t, 1024)
	s := spec("exiter", "k1", 3)
	r := invoke(t, m, s, `{"action":"exit","exit":3}`)
	if r.FunctionError != "Unhandled" || !strings.Contains(string(r.Payload), "Runtime.ExitError") || !strings.Contains(string(r.Payload), "exit status 3") {
		t.Fatalf("got %q %s, want Runtime.ExitError naming exit status 3", r.FunctionError, r.Payload)
	}
	if got := len(m.Sandboxes()); got != 0 {
		t.Fatalf("%d sandboxes left after the exit, want 0", got)
	}
}

func TestParallelInvokesGetOwnSandboxes(t *testing.T) {
	m, l, _ := newTestManager(t, 4096)
	s := spec("par", "k1", 5)
	const n = 4
	var wg sync.WaitGroup
	ids := make([]string, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			ids[i] = invoke(t, m, s, `{"action":"sleep","sleep":"300ms"}`).SandboxId
		}(i)
	}
	wg.Wait()
	seen := map[string]bool{}
	for _, id := range ids {
		seen[id] = true
	}
	if len(seen) != n || l.launched.Load() != n {
		t.Fatalf("%d parallel invokes used %d sandboxes (%d launched), want %d", n, len(seen), l.launched.Load(), n)
	}
}

func TestKeepAliveReaps(t *testing.T) {
	m, _, clk := newTestManager(t, 1024)
	s := spec("idle", "k1", 3)
	invoke(t, m, s, `{}`)
	if n := m.Reap(m.cfg.Now()); n != 0 {
		t.Fatalf("reaped %d fresh sandboxes", n)
	}
	clk.Add(2 * time.Minute)
	if n := m.Reap(m.cfg.Now()); n != 1 {
		t.Fatalf("reaped %d after the keep-alive, want 1", n)
	}
	if c, _ := m.cfg.Ledger.Usage(); c != 0 {
		t.Fatalf("%d MB still committed after reaping", c)
	}
}

func TestRetireOnNewConfig(t *testing.T) {
	m, l, _ := newTestManager(t, 1024)
	invoke(t, m, spec("fn", "k1", 3), `{}`)
	r := invoke(t, m, spec("fn", "k2", 3), `{}`)
	if !r.ColdStart {
		t.Fatal("new config reused an old sandbox")
	}
	infos := m.Sandboxes()
	if len(infos) != 1 || infos[0].ConfigKey != "k2" {
		t.Fatalf("sandboxes after the config change: %+v, want only k2", infos)
	}
	if n := m.Retire("fn", ""); n != 1 {
		t.Fatalf("retire counted %d, want 1", n)
	}
	if len(m.Sandboxes()) != 0 || l.launched.Load() != 2 {
		t.Fatalf("after retire: %d sandboxes", len(m.Sandboxes()))
	}
}

func TestMemoryIsNeverOvercommitted(t *testing.T) {
	m, _, _ := newTestManager(t, 256) // room for two 128 MB sandboxes
	// Two idle sandboxes of one function, then a third function: one idle
	// sandbox is evicted to make room.
	var wg sync.WaitGroup
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); invoke(t, m, spec("a", "ka", 3), `{"action":"sleep","sleep":"200ms"}`) }()
	}
	wg.Wait()
	invoke(t, m, spec("b", "kb", 3), `{}`)
	if c, tot := m.cfg.Ledger.Usage(); c > tot {
		t.Fatalf("committed %d of %d MB", c, tot)
	}
	// Both slots busy: a third concurrent cold start is refused, not overcommitted.
	block := make(chan struct{})
	go func() { defer close(block); invoke(t, m, spec("a", "ka", 3), `{"action":"sleep","sleep":"1s"}`) }()
	go invoke(t, m, spec("b", "kb", 3), `{"action":"sleep","sleep":"1s"}`)
	deadline := time.Now().Add(5 * time.Second)
	for {
		busy := 0
		for _, s := range m.Sandboxes() {
			if s.State == StateBusy {
				busy++
			}
		}
		if busy == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("two sandboxes never became busy")
		}
		time.Sleep(5 * time.Millisecond)
	}
	_, err := m.Invoke(context.Background(), &skiffv1.AgentInvokeRequest{Spec: spec("c", "kc", 3), RequestId: "r-full"})
	if !errs.Is(err, errs.KindResourceExhausted) {
		t.Fatalf("third sandbox on a full host: got %v, want ResourceExhausted", err)
	}
	<-block
}

func TestLaunchFailureReleasesMemory(t *testing.T) {
	m, l, _ := newTestManager(t, 1024)
	l.fail = errors.New("no namespaces today")
	_, err := m.Invoke(context.Background(), &skiffv1.AgentInvokeRequest{Spec: spec("x", "k", 3), RequestId: "r1"})
	if !errs.Is(err, errs.KindUnavailable) || !strings.Contains(err.Error(), "no namespaces today") {
		t.Fatalf("got %v, want Unavailable naming the cause", err)
	}
	if c, _ := m.cfg.Ledger.Usage(); c != 0 {
		t.Fatalf("%d MB committed after a failed launch", c)
	}
}

func TestEnvironment(t *testing.T) {
	m, _, _ := newTestManager(t, 1024)
	r := invoke(t, m, spec("envfn", "k1", 3), `{"action":"env"}`)
	var got struct{ Env map[string]string }
	if err := json.Unmarshal(r.Payload, &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"AWS_LAMBDA_FUNCTION_NAME": "envfn", "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
		"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "128", "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/envfn",
		"LAMBDA_TASK_ROOT": "/var/task", "_HANDLER": "bootstrap", "TZ": ":UTC", "LANG": "en_US.UTF-8", "GREETING": "hi",
	}
	for k, v := range want {
		if got.Env[k] != v {
			t.Errorf("%s = %q, want %q", k, got.Env[k], v)
		}
	}
	if !strings.Contains(got.Env["AWS_LAMBDA_LOG_STREAM_NAME"], "[$LATEST]sb-") {
		t.Errorf("log stream name %q", got.Env["AWS_LAMBDA_LOG_STREAM_NAME"])
	}
}

func TestStateMachineRefusesIllegalMoves(t *testing.T) {
	for from := StateStarting; from <= StateDead; from++ {
		for to := StateStarting; to <= StateDead; to++ {
			want := false
			for _, s := range transitions[from] {
				want = want || s == to
			}
			if canMove(from, to) != want {
				t.Errorf("canMove(%s, %s) = %v", from, to, !want)
			}
		}
	}
	if canMove(StateDead, StateIdle) || canMove(StateIdle, StateInitializing) {
		t.Fatal("dead or idle sandboxes must not go back")
	}
}

// TestLargeOutput: a function logging more than the pipe holds is not
// blocked, and its whole output (up to the per-invocation cap) lands in its
// own invocation's log.
func TestLargeOutput(t *testing.T) {
	m, _, _ := newTestManager(t, 1024)
	s := spec("chatty", "k1", 5)
	line := strings.Repeat("x", 300<<10) + "-end"
	r := invoke(t, m, s, `{"log":"`+line+`"}`)
	if !strings.Contains(r.Log, line) {
		t.Fatalf("log of %d bytes lacks the 300 KB line", len(r.Log))
	}
	r = invoke(t, m, s, `{"log":"small"}`)
	if strings.Contains(r.Log, "-end") || !strings.Contains(r.Log, "small") {
		t.Fatalf("second invocation's log carries the first one's output or lacks its own:\n%.300s", r.Log)
	}
}
