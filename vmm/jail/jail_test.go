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
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"skiff.dev/skiff/internal/cgroup"
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

// newManagerPool starts a Manager with PoolSize poolSize (0: no pool), its
// own cgroup parent and run dir, closed and reclaimed at the end of the
// test. It returns once the pool is full.
func newManagerPool(t testing.TB, poolSize int) (*jail.Manager, jail.Config) {
	t.Helper()
	testutil.RequirePrivileged(t)
	runDir, err := os.MkdirTemp("", "skiff-jail-test-")
	if err != nil {
		t.Fatal(err)
	}
	cfg := jail.Config{
		RunDir:     runDir,
		CgroupName: fmt.Sprintf("skiff-jailtest-%d-%d", os.Getpid(), time.Now().UnixNano()%1e6),
		PoolSize:   poolSize,
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
	waitPool(t, m, poolSize)
	return m, cfg
}

// waitPool waits until the manager's pool holds poolSize idle inits.
func waitPool(t testing.TB, m *jail.Manager, poolSize int) {
	t.Helper()
	if poolSize <= 0 {
		return
	}
	waitFor(t, fmt.Sprintf("%d pre-started inits", poolSize), func() bool { return m.Stats().PoolIdle >= poolSize })
}

// waitFor polls cond until it holds, failing the test after 30 s.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// poolModes are the two ways a sandbox starts: handed to a pre-started
// init, or with its own freshly forked init.
var poolModes = []struct {
	name string
	size int
}{{"pool", 2}, {"direct", 0}}

// forPoolModes runs f once with a pool of pre-started inits (and checks
// that f's Starts used it) and once without.
func forPoolModes(t *testing.T, f func(t *testing.T, m *jail.Manager, cfg jail.Config)) {
	for _, mode := range poolModes {
		t.Run(mode.name, func(t *testing.T) {
			m, cfg := newManagerPool(t, mode.size)
			f(t, m, cfg)
			st := m.Stats()
			if mode.size > 0 && st.PoolHits == 0 {
				t.Errorf("no Start used a pre-started init: %+v", st)
			}
			if mode.size == 0 && (st.PoolHits != 0 || st.PoolIdle != 0) {
				t.Errorf("pool disabled, but stats %+v", st)
			}
		})
	}
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
	forPoolModes(t, testShellSandboxIsolation)
}

func testShellSandboxIsolation(t *testing.T, m *jail.Manager, _ jail.Config) {
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
	forPoolModes(t, testProbeSyscallsAndListener)
}

func testProbeSyscallsAndListener(t *testing.T, m *jail.Manager, _ jail.Config) {
	// Someone else on this host may hold 127.0.0.1:9001; then only the
	// sandbox side is checked.
	hostFree := false
	if ln, err := net.Listen("tcp", "127.0.0.1:9001"); err == nil {
		hostFree = true
		ln.Close()
	}
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
	if ln, err := net.Listen("tcp", "127.0.0.1:9001"); err == nil {
		ln.Close()
	} else if hostFree {
		t.Errorf("host port 9001 taken: %v", err)
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
	forPoolModes(t, testRuntimeAPIThroughListener)
}

func testRuntimeAPIThroughListener(t *testing.T, m *jail.Manager, _ jail.Config) {
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
	forPoolModes(t, testExitStatus)
}

func testExitStatus(t *testing.T, m *jail.Manager, _ jail.Config) {
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
	forPoolModes(t, testOOMKill)
}

func testOOMKill(t *testing.T, m *jail.Manager, _ jail.Config) {
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
	forPoolModes(t, testStartErrors)
}

func testStartErrors(t *testing.T, m *jail.Manager, _ jail.Config) {
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
	for _, mode := range poolModes {
		t.Run(mode.name, func(t *testing.T) { testNoLeaks(t, mode.size) })
	}
}

func testNoLeaks(t *testing.T, poolSize int) {
	fdsNew, _ := fdCounts(t)
	kids0 := len(children(t))
	m, cfg := newManagerPool(t, poolSize)
	idle := max(poolSize, 0)
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
	// Warm up (fork thread, pools, cgroup parents) before measuring, and
	// measure with the pool full.
	start(-1).Close()
	waitPool(t, m, poolSize)
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
	waitPool(t, m, poolSize)
	// What is left is exactly the pool: its inits, their cgroups and fds.
	if kids := children(t); len(kids) != kids0+idle {
		t.Errorf("child processes %v, want only the pool's %d", kids, idle)
	}
	checkCgroups := func(want int) {
		t.Helper()
		for _, parent := range cgroupParents(t, cfg.CgroupName) {
			entries, _ := os.ReadDir(parent)
			var dirs []string
			for _, e := range entries {
				if e.IsDir() {
					dirs = append(dirs, e.Name())
				}
			}
			if len(dirs) != want {
				t.Errorf("cgroups under %s: got %v, want %d", parent, dirs, want)
			}
		}
	}
	checkCgroups(idle)
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
	// The netns pool's 8 plus one in flight, and one per pre-started init.
	if nsfds > 9+idle {
		t.Errorf("%d netns fds open, want at most %d", nsfds, 9+idle)
	}

	// Closing the manager releases the pool too.
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if kids := children(t); len(kids) != kids0 {
		t.Errorf("child processes after Close: %v", kids)
	}
	checkCgroups(0)
	if fds2, nsfds := fdCounts(t); fds2 > fdsNew+2 || nsfds > 0 {
		t.Errorf("fds after Close: %d (%d netns), want %d as before New", fds2, nsfds, fdsNew)
	}
	if st := m.Stats(); st.PoolIdle != 0 || (poolSize > 0 && st.PoolHits == 0) {
		t.Errorf("stats after Close: %+v", st)
	}
}

func TestReclaim(t *testing.T) {
	forPoolModes(t, testReclaim)
}

func testReclaim(t *testing.T, m *jail.Manager, cfg jail.Config) {
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
	pooled := children(t) // the pre-started inits, if any
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
	// The pre-started inits were released with everything else (and the
	// pool refills with new ones).
	now := map[string]bool{}
	for _, pid := range children(t) {
		now[pid] = true
	}
	for _, pid := range pooled {
		if now[pid] {
			t.Errorf("pre-started init %s survived Reclaim", pid)
		}
	}
	waitPool(t, m, cfg.PoolSize)
	// The manager still works.
	if s, err := m.Start(jail.Spec{ID: "after", CodeDir: t.TempDir(), Argv: []string{"/bin/true"}, MemoryMB: 64}); err != nil {
		t.Errorf("start after reclaim: %v", err)
	} else {
		s.Close()
	}
}

// TestPool checks that Start hands sandboxes to pre-started inits while
// there are some, forks its own otherwise, refills the pool after each
// claim, and copes with an init that died while waiting.
func TestPool(t *testing.T) {
	const size = 2
	m, _ := newManagerPool(t, size)
	code := probe(t)
	if st := m.Stats(); st != (jail.Stats{PoolIdle: size}) {
		t.Fatalf("stats of a fresh manager: got %+v, want %d idle", st, size)
	}
	run := func(id string, ln string) *jail.Sandbox {
		t.Helper()
		s, err := m.Start(jail.Spec{
			ID: id, CodeDir: code, Argv: []string{"/var/task/probe", "connect", "127.0.0.1:8080"},
			MemoryMB: 64, ListenAddr: ln,
		})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	// A ListenAddr other than the pool's gets its own listener, and the
	// process reaches it.
	s := run("other-addr", "127.0.0.1:8080")
	lines := serveLines(s.Listener(), "ok")
	select {
	case l := <-lines:
		if l != "ready" {
			t.Errorf("listener got %q, want ready", l)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no connection on 127.0.0.1:8080")
	}
	waitDone(t, s)
	if got := s.Exit(); got.Code != 0 {
		t.Errorf("exit: got %v, want 0", got)
	}
	s.Close()
	if st := m.Stats(); st.PoolHits != 1 || st.PoolMisses != 0 {
		t.Errorf("after one start: got %+v, want 1 hit", st)
	}
	waitPool(t, m, size)

	// More starts in a row than the pool holds: the first ones are
	// pre-started, the rest fork their own, all work.
	var ss []*jail.Sandbox
	for i := range size + 2 {
		s := run(fmt.Sprintf("burst-%d", i), "")
		if s.Listener() != nil {
			t.Errorf("sandbox without ListenAddr has a listener")
		}
		ss = append(ss, s)
	}
	for _, s := range ss {
		waitDone(t, s)
		s.Close()
	}
	// How many of the last two found a refilled init depends on timing.
	if st := m.Stats(); st.PoolHits+st.PoolMisses != size+3 || st.PoolHits < size+1 {
		t.Errorf("after a burst of %d: got %+v, want at least %d hits and %d starts", size+2, st, size+1, size+3)
	}
	waitPool(t, m, size)

	// An init that died while waiting is discarded.
	before := children(t)
	if len(before) != size {
		t.Fatalf("children %v, want the %d pre-started inits", before, size)
	}
	for _, p := range before {
		pid, _ := strconv.Atoi(p)
		syscall.Kill(pid, syscall.SIGKILL)
	}
	waitFor(t, "the killed inits to be reaped", func() bool {
		for _, p := range before {
			if _, err := os.Stat("/proc/" + p); err == nil {
				return false
			}
		}
		return true
	})
	out, exit := runSh(t, m, jail.Spec{ID: "after-kill"}, "echo alive")
	if out != "alive" || exit.Code != 0 {
		t.Errorf("start after the pool's inits died: got %q, %v", out, exit)
	}
}

// cgroupFiles reads the limits of the cgroups holding pid, by file name.
func cgroupFiles(t *testing.T, cfg jail.Config, pid int) map[string]string {
	got := map[string]string{}
	for _, parent := range cgroupParents(t, cfg.CgroupName) {
		entries, _ := os.ReadDir(parent)
		for _, e := range entries {
			dir := filepath.Join(parent, e.Name())
			procs, _ := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
			if !e.IsDir() || !slices.Contains(strings.Fields(string(procs)), strconv.Itoa(pid)) {
				continue
			}
			for _, f := range []string{"memory.limit_in_bytes", "memory.max", "cpu.shares", "cpu.weight", "pids.max"} {
				if b, err := os.ReadFile(filepath.Join(dir, f)); err == nil {
					got[f] = strings.TrimSpace(string(b))
				}
			}
		}
	}
	return got
}

// TestSandboxLimits checks that a sandbox's cgroup carries its spec's
// limits, whether its init was pre-started (limits set at Start) or not.
func TestSandboxLimits(t *testing.T) {
	forPoolModes(t, func(t *testing.T, m *jail.Manager, cfg jail.Config) {
		s, err := m.Start(jail.Spec{ID: "limits", CodeDir: t.TempDir(), Argv: []string{"/bin/sleep", "60"}, MemoryMB: 96, PidsMax: 50})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		got := cgroupFiles(t, cfg, s.PID())
		want := map[string]string{"pids.max": "50"}
		if _, ok := got["memory.max"]; ok { // v2
			want["memory.max"] = strconv.Itoa(96 << 20)
			want["cpu.weight"] = strconv.FormatUint(cgroup.CPUWeight(96), 10)
		} else {
			want["memory.limit_in_bytes"] = strconv.Itoa(96 << 20)
			want["cpu.shares"] = strconv.FormatUint(cgroup.CPUShares(96), 10)
		}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("cgroup limits of the sandbox (-want +got):\n%s", diff)
		}
	})
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

// TestStartLatency reports the cold-start cost with and without the pool
// (it asserts only a generous bound: timings belong to BenchmarkStart).
func TestStartLatency(t *testing.T) {
	forPoolModes(t, func(t *testing.T, m *jail.Manager, cfg jail.Config) {
		code := probe(t)
		var starts, readies, closes []time.Duration
		for i := range 30 {
			waitPool(t, m, cfg.PoolSize)
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
		if st := m.Stats(); cfg.PoolSize > 0 && st.PoolMisses != 0 {
			t.Errorf("starts with a full pool: got %+v, want no misses", st)
		}
	})
}

// BenchmarkStart measures Start and Start→process running (the probe
// connected to its listener), and Close:
//   - pool: a pre-started init is ready for each Start (the pool is
//     refilled between iterations, outside the measurement);
//   - pool-burst: back-to-back Starts, the pool refilling meanwhile (hits
//     and misses mix; "hit-ratio" reports how many found an init);
//   - direct: no pool, every Start forks its own init.
func BenchmarkStart(b *testing.B) {
	for _, bc := range []struct {
		name string
		size int
		wait bool
	}{{"pool", jail.DefaultPoolSize, true}, {"pool-burst", jail.DefaultPoolSize, false}, {"direct", 0, false}} {
		b.Run(bc.name, func(b *testing.B) {
			m, _ := newManagerPool(b, bc.size)
			code := probe(b)
			var starts, readies, closes []time.Duration
			i := 0
			for b.Loop() {
				if bc.wait {
					b.StopTimer()
					waitPool(b, m, bc.size)
					b.StartTimer()
				}
				s, st, ready := startReady(b, m, code, i)
				t0 := time.Now()
				if err := s.Close(); err != nil {
					b.Fatal(err)
				}
				starts, readies, closes = append(starts, st), append(readies, ready), append(closes, time.Since(t0))
				i++
			}
			b.ReportMetric(float64(percentile(starts, .5).Microseconds())/1000, "start-p50-ms")
			b.ReportMetric(float64(percentile(starts, .99).Microseconds())/1000, "start-p99-ms")
			b.ReportMetric(float64(percentile(readies, .5).Microseconds())/1000, "running-p50-ms")
			b.ReportMetric(float64(percentile(readies, .99).Microseconds())/1000, "running-p99-ms")
			b.ReportMetric(float64(percentile(closes, .5).Microseconds())/1000, "close-p50-ms")
			if st := m.Stats(); bc.size > 0 {
				b.ReportMetric(float64(st.PoolHits)/float64(st.PoolHits+st.PoolMisses), "hit-ratio")
			}
		})
	}
}

const crashHelperEnv = "SKIFF_JAIL_CRASH_HELPER"

// TestCrashHelper is the agent of TestPoolDiesWithAgent, run in a child
// process: it fills a pool, starts a sandbox, prints its children's pids
// and waits to be killed.
func TestCrashHelper(t *testing.T) {
	env := os.Getenv(crashHelperEnv)
	if env == "" {
		t.Skip("helper process of TestPoolDiesWithAgent")
	}
	runDir, cgName, _ := strings.Cut(env, ",")
	m, err := jail.New(jail.Config{RunDir: runDir, CgroupName: cgName, PoolSize: 2})
	if err != nil {
		t.Fatal(err)
	}
	waitPool(t, m, 2)
	if _, err := m.Start(jail.Spec{ID: "crash", CodeDir: t.TempDir(), Argv: []string{"/bin/sleep", "600"}, MemoryMB: 64}); err != nil {
		t.Fatal(err)
	}
	waitPool(t, m, 2)
	fmt.Printf("pids %s\n", strings.Join(children(t), " "))
	select {}
}

// TestPoolDiesWithAgent kills an agent with a running sandbox and a full
// pool of pre-started inits: all of them die with it (parent-death
// signal), and Reclaim in the next run removes their cgroups.
func TestPoolDiesWithAgent(t *testing.T) {
	testutil.RequirePrivileged(t)
	runDir, err := os.MkdirTemp("", "skiff-jail-crash-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(runDir)
	cgName := fmt.Sprintf("skiff-jailcrash-%d", os.Getpid())
	defer removeCgroupParents(t, cgName)

	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashHelper$")
	cmd.Env = append(os.Environ(), crashHelperEnv+"="+runDir+","+cgName)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	pidLine := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if rest, ok := strings.CutPrefix(sc.Text(), "pids "); ok {
				pidLine <- rest
			}
		}
		close(pidLine)
	}()
	var pids []string
	select {
	case line, ok := <-pidLine:
		if !ok {
			t.Fatal("helper exited without reporting its children")
		}
		pids = strings.Fields(line)
	case <-time.After(60 * time.Second):
		t.Fatal("helper did not report its children")
	}
	if len(pids) != 3 {
		t.Fatalf("helper's children: got %v, want a sandbox and 2 pre-started inits", pids)
	}
	t.Logf("helper %d: sandbox and pre-started inits %v", cmd.Process.Pid, pids)
	cmd.Process.Kill()
	cmd.Wait()
	waitFor(t, "the helper's sandbox and inits to die", func() bool {
		for _, pid := range pids {
			b, err := os.ReadFile("/proc/" + pid + "/stat")
			if err != nil {
				continue // gone
			}
			// "pid (comm) state ...": a zombie is dead.
			if _, rest, _ := strings.Cut(string(b), ") "); !strings.HasPrefix(rest, "Z") {
				return false
			}
		}
		return true
	})

	// The next run reclaims the cgroups they leave behind.
	m, err := jail.New(jail.Config{RunDir: runDir, CgroupName: cgName})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	parents := cgroupParents(t, cgName)
	left := 0
	for _, p := range parents {
		entries, _ := os.ReadDir(p)
		for _, e := range entries {
			if e.IsDir() {
				left++
			}
		}
	}
	if left != 3*len(parents) {
		t.Errorf("cgroups left by the crash: got %d, want 3 in each of %d hierarchies", left, len(parents))
	}
	t.Logf("%d cgroups left by the crash in %d hierarchies", left, len(parents))
	if err := m.Reclaim(); err != nil {
		t.Fatal(err)
	}
	for _, p := range parents {
		entries, _ := os.ReadDir(p)
		for _, e := range entries {
			if e.IsDir() {
				t.Errorf("cgroup %s/%s left after Reclaim", p, e.Name())
			}
		}
	}
}
