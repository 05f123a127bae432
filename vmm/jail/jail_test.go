package jail_test

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"skiff.dev/skiff/internal/testutil"
	"skiff.dev/skiff/vmm/jail"
)

func TestMain(m *testing.M) {
	if jail.IsInit() {
		jail.InitMain()
	}
	code := m.Run()
	if probeDir != "" {
		os.RemoveAll(probeDir)
	}
	os.Exit(code)
}

// newManager starts a Manager with its own cgroup parent and run dir,
// closed and reclaimed at the end of the test.
func newManager(t testing.TB) (*jail.Manager, jail.Config) {
	t.Helper()
	testutil.RequirePrivileged(t)
	runDir, err := os.MkdirTemp("", "skiff-jail-test-")
	if err != nil {
		t.Fatal(err)
	}
	cfg := jail.Config{
		RunDir:     runDir,
		CgroupName: fmt.Sprintf("skiff-jailtest-%d-%d", os.Getpid(), time.Now().UnixNano()%1e6),
	}
	m, err := jail.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Errorf("closing manager: %v", err)
		}
		if err := m.Reclaim(); err != nil {
			t.Errorf("reclaim: %v", err)
		}
		removeCgroupParents(t, cfg.CgroupName)
		os.RemoveAll(runDir)
	})
	return m, cfg
}

// removeCgroupParents removes the test's (empty) parent cgroups.
func removeCgroupParents(t testing.TB, name string) {
	for _, dir := range cgroupParents(t, name) {
		if err := os.Remove(dir); err != nil && !os.IsNotExist(err) {
			t.Errorf("removing cgroup parent: %v", err)
		}
	}
}

// cgroupParents finds the parent cgroup directories named name.
func cgroupParents(t testing.TB, name string) []string {
	var out []string
	filepath.WalkDir("/sys/fs/cgroup", func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		if d.Name() == name {
			out = append(out, p)
			return filepath.SkipDir
		}
		if strings.Count(p, "/") > 7 {
			return filepath.SkipDir
		}
		return nil
	})
	return out
}

// codeDir makes a code directory holding the given files.
func codeDir(t testing.TB, files map[string]string) string {
	dir := t.TempDir()
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// runSh runs a shell script in a sandbox and returns its output and exit.
func runSh(t *testing.T, m *jail.Manager, spec jail.Spec, script string) (string, jail.ExitInfo) {
	t.Helper()
	out, err := os.CreateTemp(t.TempDir(), "out")
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	if spec.CodeDir == "" {
		spec.CodeDir = codeDir(t, map[string]string{"README": "code"})
	}
	spec.Argv = []string{"/bin/sh", "-c", script}
	spec.Stdout, spec.Stderr = out, out
	if spec.MemoryMB == 0 {
		spec.MemoryMB = 128
	}
	s, err := m.Start(spec)
	if err != nil {
		t.Fatalf("start: %v", err)
	}
	defer s.Close()
	select {
	case <-s.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("sandbox did not exit")
	}
	b, err := os.ReadFile(out.Name())
	if err != nil {
		t.Fatal(err)
	}
	return string(bytes.TrimSpace(b)), s.Exit()
}

var (
	probeOnce sync.Once
	probeDir  string
	probeErr  error
)

// probe builds testdata/probe (a static Go program) into a code dir.
func probe(t testing.TB) string {
	t.Helper()
	probeOnce.Do(func() {
		probeDir, probeErr = os.MkdirTemp("", "skiff-jail-probe-")
		if probeErr != nil {
			return
		}
		if probeErr = os.Chmod(probeDir, 0o755); probeErr != nil {
			return
		}
		cmd := exec.Command("go", "build", "-o", filepath.Join(probeDir, "probe"), "./testdata/probe")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			probeErr = fmt.Errorf("building probe: %v\n%s", err, out)
		}
	})
	if probeErr != nil {
		t.Fatal(probeErr)
	}
	return probeDir
}

func waitDone(t testing.TB, s *jail.Sandbox) {
	t.Helper()
	select {
	case <-s.Done():
	case <-time.After(30 * time.Second):
		t.Fatalf("sandbox %s did not exit", s.ID())
	}
}

// parseKV reads "key=value" lines.
func parseKV(out string) map[string]string {
	kv := map[string]string{}
	for line := range strings.Lines(out) {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), "="); ok {
			kv[k] = v
		}
	}
	return kv
}

func TestShellSandboxIsolation(t *testing.T) {
	m, _ := newManager(t)
	script := `
echo uid=$(id -u)
echo gid=$(id -g)
echo user=$(id -un)
echo pid=$$
echo hostname=$(hostname)
echo cwd=$(pwd)
if touch /var/task/x 2>/dev/null; then echo taskwrite=ok; else echo taskwrite=denied; fi
if echo hi > /etc/x 2>/dev/null; then echo rootwrite=ok; else echo rootwrite=denied; fi
echo code=$(cat /var/task/README)
if echo data > /tmp/f && [ "$(cat /tmp/f)" = data ]; then echo tmpwrite=ok; else echo tmpwrite=failed; fi
if head -c 3000000 /dev/zero > /tmp/big 2>/dev/null; then echo tmpfull=no; else echo tmpfull=yes; fi
echo procs=$(ls /proc | grep -c '^[0-9]')
if mount -t tmpfs none /tmp 2>/dev/null; then echo mount=ok; else echo mount=denied; fi
grep -E '^(CapEff|CapPrm|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status | tr -d ' \t' | sed 's/:/=/'
echo ifaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\n' ',')
echo env=$FOO
echo devnull=$(echo x > /dev/null && echo ok)
echo urandom=$(head -c 4 /dev/urandom | wc -c)
`
	out, exit := runSh(t, m, jail.Spec{ID: "iso", EphemeralMB: 2, Env: []string{"FOO=bar baz", "PATH=/usr/bin:/bin"}}, script)
	if exit.Code != 0 || exit.Signal != 0 {
		t.Fatalf("exit %v, output:\n%s", exit, out)
	}
	got := parseKV(out)
	want := map[string]string{
		"uid": "993", "gid": "993", "user": "sbx_user1051", "pid": "1", "hostname": "sandbox", "cwd": "/var/task",
		"taskwrite": "denied", "rootwrite": "denied", "code": "code", "tmpwrite": "ok", "tmpfull": "yes",
		"mount": "denied", "CapEff": "0000000000000000", "CapPrm": "0000000000000000", "CapBnd": "0000000000000000",
		"CapAmb": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2", "ifaces": "lo,", "env": "bar baz",
		"devnull": "ok", "urandom": "4",
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("%s: got %q, want %q", k, got[k], w)
		}
	}
	// sh, ls and grep at most: no host processes.
	if n, err := strconv.Atoi(got["procs"]); err != nil || n > 4 {
		t.Errorf("processes visible in /proc: got %q, want at most 4", got["procs"])
	}
	if t.Failed() {
		t.Logf("output:\n%s", out)
	}
}

// serveLines answers each line read from a connection on ln with reply.
func serveLines(ln net.Listener, reply string) (lines chan string) {
	lines = make(chan string, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				line, err := bufio.NewReader(c).ReadString('\n')
				if err == nil {
					lines <- strings.TrimSpace(line)
					fmt.Fprintln(c, reply)
				}
			}()
		}
	}()
	return lines
}

func TestProbeSyscallsAndListener(t *testing.T) {
	m, _ := newManager(t)
	var out bytes.Buffer
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	s, err := m.Start(jail.Spec{
		ID: "probe", CodeDir: probe(t), Argv: []string{"/var/task/probe", "check"},
		Env: []string{"PROBE_ADDR=127.0.0.1:9001"}, MemoryMB: 64, Stdout: w, Stderr: w,
		ListenAddr: "127.0.0.1:9001",
	})
	w.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	lines := serveLines(s.Listener(), "pong")
	if _, err := out.ReadFrom(r); err != nil {
		t.Fatal(err)
	}
	waitDone(t, s)
	got := parseKV(out.String())
	eperm := syscall.EPERM.Error()
	want := map[string]string{
		"mount": eperm, "unshare": eperm, "setns": eperm, "ptrace": eperm, "chown": eperm,
		"listener": `"pong\n" ok`,
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("%s: got %q, want %q", k, got[k], w)
		}
	}
	// Nested user namespaces are refused (ENOSPC: the limit is 0).
	if got["userns"] == "ok" || got["userns"] == "" {
		t.Errorf("userns: got %q, want an error", got["userns"])
	}
	select {
	case l := <-lines:
		if l != "ping" {
			t.Errorf("listener got %q, want ping", l)
		}
	default:
		t.Error("listener saw no connection")
	}
	// The host's own 127.0.0.1:9001 stays free.
	if ln, err := net.Listen("tcp", "127.0.0.1:9001"); err != nil {
		t.Errorf("host port 9001 taken: %v", err)
	} else {
		ln.Close()
	}
	if t.Failed() {
		t.Logf("output:\n%s", out.String())
	}
}

// runtimeAPI is a minimal Lambda Runtime API: one event, then it records
// the response.
func runtimeAPI(t *testing.T, ln net.Listener, event string) <-chan string {
	responses := make(chan string, 1)
	mux := http.NewServeMux()
	var served sync.Once
	mux.HandleFunc("GET /2018-06-01/runtime/invocation/next", func(w http.ResponseWriter, r *http.Request) {
		first := false
		served.Do(func() { first = true })
		if !first {
			<-r.Context().Done() // long poll until the sandbox ends
			return
		}
		w.Header().Set("Lambda-Runtime-Aws-Request-Id", "req-1")
		w.Header().Set("Lambda-Runtime-Deadline-Ms", strconv.FormatInt(time.Now().Add(time.Minute).UnixMilli(), 10))
		w.Header().Set("Lambda-Runtime-Invoked-Function-Arn", "arn:aws:lambda:local:0:function:testfn")
		io.WriteString(w, event)
	})
	mux.HandleFunc("POST /2018-06-01/runtime/invocation/{id}/response", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		responses <- string(b)
		w.WriteHeader(http.StatusAccepted)
	})
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return responses
}

func TestRuntimeAPIThroughListener(t *testing.T) {
	m, _ := newManager(t)
	bin := testutil.BuildFunction(t, "testfn")
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "bootstrap"), data, 0o755); err != nil {
		t.Fatal(err)
	}
	s, err := m.Start(jail.Spec{
		ID: "rapi", CodeDir: dir, Argv: []string{"/var/task/bootstrap"},
		Env:      []string{"AWS_LAMBDA_RUNTIME_API=127.0.0.1:9001", "_HANDLER=bootstrap", "LAMBDA_TASK_ROOT=/var/task"},
		MemoryMB: 128, ListenAddr: "127.0.0.1:9001",
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	responses := runtimeAPI(t, s.Listener(), `{"hello":"jail"}`)
	select {
	case got := <-responses:
		if want := `{"hello":"jail"}`; got != want {
			t.Errorf("response: got %s, want %s", got, want)
		}
	case <-s.Done():
		t.Fatalf("function exited: %v", s.Exit())
	case <-time.After(30 * time.Second):
		t.Fatal("no response from the function")
	}
	if peak := s.MaxMemoryBytes(); peak <= 0 {
		t.Errorf("MaxMemoryBytes: got %d, want > 0", peak)
	}
}

func TestExitStatus(t *testing.T) {
	m, _ := newManager(t)
	tests := []struct {
		name, script string
		kill         bool
		want         jail.ExitInfo
		wantString   string
	}{
		{"ok", "exit 0", false, jail.ExitInfo{Code: 0}, "exit status 0"},
		{"code", "exit 2", false, jail.ExitInfo{Code: 2}, "exit status 2"},
		{"killed", "echo started; sleep 60", true, jail.ExitInfo{Code: -1, Signal: syscall.SIGKILL}, "signal: killed"},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			s, err := m.Start(jail.Spec{
				ID: fmt.Sprintf("exit-%d", i), CodeDir: t.TempDir(), Argv: []string{"/bin/sh", "-c", tc.script},
				MemoryMB: 64, Stdout: w,
			})
			w.Close()
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			if tc.kill {
				line, _ := bufio.NewReader(r).ReadString('\n')
				if line != "started\n" {
					t.Fatalf("got %q, want started", line)
				}
				if err := s.Kill(); err != nil {
					t.Fatal(err)
				}
				if err := s.Kill(); err != nil {
					t.Fatalf("second kill: %v", err)
				}
			}
			waitDone(t, s)
			if got := s.Exit(); got != tc.want {
				t.Errorf("exit: got %+v, want %+v", got, tc.want)
			}
			if got := s.Exit().String(); got != tc.wantString {
				t.Errorf("exit string: got %q, want %q", got, tc.wantString)
			}
		})
	}
}

func TestOOMKill(t *testing.T) {
	m, _ := newManager(t)
	s, err := m.Start(jail.Spec{ID: "oom", CodeDir: probe(t), Argv: []string{"/var/task/probe", "alloc", "256"}, MemoryMB: 48})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	waitDone(t, s)
	got := s.Exit()
	if !got.OOMKilled || got.Signal != syscall.SIGKILL {
		t.Errorf("exit: got %+v (%v), want OOMKilled by SIGKILL", got, got)
	}
	if peak := s.MaxMemoryBytes(); peak < 40<<20 || peak > 49<<20 {
		t.Errorf("peak memory: got %d, want about 48 MiB", peak)
	}
}

func TestStartErrors(t *testing.T) {
	m, _ := newManager(t)
	tests := []struct {
		name string
		spec jail.Spec
		want string
	}{
		{"bad id", jail.Spec{ID: "Bad_ID", CodeDir: "/", Argv: []string{"/bin/true"}, MemoryMB: 64}, "must match"},
		{"no argv", jail.Spec{ID: "noargv", CodeDir: "/", MemoryMB: 64}, "argv is required"},
		{"missing code", jail.Spec{ID: "nocode", CodeDir: "/nonexistent", Argv: []string{"/bin/true"}, MemoryMB: 64}, "opening code dir"},
		{"private code", jail.Spec{ID: "private", CodeDir: privateDir(t), Argv: []string{"/bin/true"}, MemoryMB: 64}, "mode o+rx"},
		{"bad exec", jail.Spec{ID: "noexec", CodeDir: t.TempDir(), Argv: []string{"/var/task/bootstrap"}, MemoryMB: 64},
			"jail init: exec /var/task/bootstrap: no such file or directory"},
		{"busy port", jail.Spec{ID: "port", CodeDir: t.TempDir(), Argv: []string{"/bin/true"}, MemoryMB: 64, ListenAddr: "256.0.0.1:1"},
			"listening on 256.0.0.1:1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, err := m.Start(tc.spec)
			if err == nil {
				s.Close()
				t.Fatalf("got no error, want one containing %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %q, want it to contain %q", err, tc.want)
			}
		})
	}
	// Failed starts leave nothing behind: the same ID starts cleanly.
	s, err := m.Start(jail.Spec{ID: "noexec", CodeDir: t.TempDir(), Argv: []string{"/bin/true"}, MemoryMB: 64})
	if err != nil {
		t.Fatalf("restart after failure: %v", err)
	}
	s.Close()
	// Duplicate IDs are refused while the first lives.
	s, err = m.Start(jail.Spec{ID: "dup", CodeDir: t.TempDir(), Argv: []string{"/bin/sleep", "60"}, MemoryMB: 64})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s2, err := m.Start(jail.Spec{ID: "dup", CodeDir: t.TempDir(), Argv: []string{"/bin/true"}, MemoryMB: 64}); err == nil {
		s2.Close()
		t.Error("duplicate id: got no error")
	}
}

func privateDir(t testing.TB) string {
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	return dir
}

// fdCounts counts this process's open fds, network namespaces apart.
func fdCounts(t testing.TB) (other, netns int) {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	host, _ := os.Readlink("/proc/self/ns/net")
	for _, e := range entries {
		l, _ := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		if l == host {
			continue // the locked threads' handles on the host namespace
		}
		if strings.HasPrefix(l, "net:") {
			netns++
		} else {
			other++
		}
	}
	return other, netns
}

func children(t testing.TB) []string {
	var out []string
	tasks, _ := filepath.Glob("/proc/self/task/*/children")
	for _, f := range tasks {
		b, _ := os.ReadFile(f)
		out = append(out, strings.Fields(string(b))...)
	}
	return out
}

func TestNoLeaks(t *testing.T) {
	m, cfg := newManager(t)
	code := t.TempDir()
	start := func(i int) *jail.Sandbox {
		s, err := m.Start(jail.Spec{
			ID: fmt.Sprintf("leak-%d", i), CodeDir: code, Argv: []string{"/bin/sleep", "60"},
			MemoryMB: 64, ListenAddr: "127.0.0.1:9001",
		})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	// Warm up (fork thread, pool, cgroup parents) before measuring.
	start(-1).Close()
	fds0, _ := fdCounts(t)
	const n = 200
	for i := range n {
		s := start(i)
		if i%2 == 0 {
			s.Kill()
			waitDone(t, s)
		}
		if err := s.Close(); err != nil {
			t.Fatalf("close %d: %v", i, err)
		}
		if err := s.Close(); err != nil {
			t.Fatalf("second close %d: %v", i, err)
		}
	}
	if kids := children(t); len(kids) > 0 {
		t.Errorf("leftover child processes: %v", kids)
	}
	for _, parent := range cgroupParents(t, cfg.CgroupName) {
		entries, _ := os.ReadDir(parent)
		for _, e := range entries {
			if e.IsDir() {
				t.Errorf("leftover cgroup %s/%s", parent, e.Name())
			}
		}
	}
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mi), cfg.RunDir) {
		t.Errorf("host mount table mentions the run dir %s", cfg.RunDir)
	}
	entries, _ := os.ReadDir(cfg.RunDir)
	if len(entries) != 1 {
		t.Errorf("run dir holds %d entries, want only the root mount point", len(entries))
	}
	fds1, nsfds := fdCounts(t)
	if fds1 > fds0+2 {
		t.Errorf("open fds grew from %d to %d", fds0, fds1)
	}
	if nsfds > 9 { // the pool's 8 plus one in flight
		t.Errorf("%d netns fds open, want at most the pool's", nsfds)
	}
}

func TestReclaim(t *testing.T) {
	m, cfg := newManager(t)
	// Start one sandbox so the parent cgroups exist, then fake a crash's
	// leftovers: a cgroup with a live process and a run dir entry.
	s, err := m.Start(jail.Spec{ID: "live", CodeDir: t.TempDir(), Argv: []string{"/bin/true"}, MemoryMB: 64})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	parents := cgroupParents(t, cfg.CgroupName)
	if len(parents) < 3 {
		t.Fatalf("found cgroup parents %v, want memory, cpu and pids", parents)
	}
	sleeper := exec.Command("sleep", "600")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- sleeper.Wait() }()
	t.Cleanup(func() { sleeper.Process.Kill() })
	for _, p := range parents {
		dir := filepath.Join(p, "crashed")
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(sleeper.Process.Pid)), 0); err != nil {
			t.Fatal(err)
		}
	}
	left := filepath.Join(cfg.RunDir, "crashed-sandbox")
	if err := os.MkdirAll(filepath.Join(left, "state"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := m.Reclaim(); err != nil {
		t.Fatalf("reclaim: %v", err)
	}
	select {
	case err := <-exited:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Errorf("leftover process: got %v, want killed", err)
		}
	case <-time.After(10 * time.Second):
		t.Error("leftover process still running after Reclaim")
	}
	for _, p := range parents {
		if _, err := os.Stat(filepath.Join(p, "crashed")); !os.IsNotExist(err) {
			t.Errorf("leftover cgroup %s/crashed: stat %v", p, err)
		}
	}
	if _, err := os.Stat(left); !os.IsNotExist(err) {
		t.Errorf("run dir leftover: stat %v", err)
	}
	// The manager still works.
	if s, err := m.Start(jail.Spec{ID: "after", CodeDir: t.TempDir(), Argv: []string{"/bin/true"}, MemoryMB: 64}); err != nil {
		t.Errorf("start after reclaim: %v", err)
	} else {
		s.Close()
	}
}

// startReady starts a probe that connects to its listener and waits for
// that connection: the sandbox's process is running.
func startReady(t testing.TB, m *jail.Manager, code string, i int) (*jail.Sandbox, time.Duration, time.Duration) {
	t0 := time.Now()
	s, err := m.Start(jail.Spec{
		ID: fmt.Sprintf("bench-%d", i), CodeDir: code, Argv: []string{"/var/task/probe", "connect", "127.0.0.1:9001"},
		MemoryMB: 128, ListenAddr: "127.0.0.1:9001",
	})
	if err != nil {
		t.Fatal(err)
	}
	started := time.Since(t0)
	c, err := s.Listener().Accept()
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	return s, started, time.Since(t0)
}

func percentile(d []time.Duration, p float64) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[int(float64(len(s)-1)*p)]
}

// TestStartLatency reports the cold-start cost (it asserts only a generous
// bound: timings belong to BenchmarkStart).
func TestStartLatency(t *testing.T) {
	m, _ := newManager(t)
	code := probe(t)
	var starts, readies, closes []time.Duration
	for i := range 30 {
		s, st, ready := startReady(t, m, code, i)
		t0 := time.Now()
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		starts, readies, closes = append(starts, st), append(readies, ready), append(closes, time.Since(t0))
	}
	t.Logf("Start p50 %v p90 %v; Start→process connected p50 %v p90 %v; Close p50 %v p90 %v",
		percentile(starts, .5), percentile(starts, .9), percentile(readies, .5), percentile(readies, .9),
		percentile(closes, .5), percentile(closes, .9))
	if p := percentile(readies, .5); p > time.Second {
		t.Errorf("median start to running: %v", p)
	}
}

func BenchmarkStart(b *testing.B) {
	m, _ := newManager(b)
	code := probe(b)
	var starts, readies, closes []time.Duration
	i := 0
	for b.Loop() {
		s, st, ready := startReady(b, m, code, i)
		t0 := time.Now()
		if err := s.Close(); err != nil {
			b.Fatal(err)
		}
		starts, readies, closes = append(starts, st), append(readies, ready), append(closes, time.Since(t0))
		i++
	}
	b.ReportMetric(float64(percentile(starts, .5).Microseconds())/1000, "start-p50-ms")
	b.ReportMetric(float64(percentile(readies, .5).Microseconds())/1000, "running-p50-ms")
	b.ReportMetric(float64(percentile(readies, .99).Microseconds())/1000, "running-p99-ms")
	b.ReportMetric(float64(percentile(closes, .5).Microseconds())/1000, "close-p50-ms")
}
