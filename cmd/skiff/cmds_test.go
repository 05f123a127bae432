package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/testing/protocmp"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

func TestInvokePayloads(t *testing.T) {
	file := writeFile(t, filepath.Join(t.TempDir(), "event.json"), []byte(`{"from":"file"}`), 0o644)
	tests := []struct {
		name  string
		args  []string
		stdin string
		want  string
	}{
		{"literal", []string{"--payload", `{"name":"skiff"}`}, "", `{"name":"skiff"}`},
		{"file", []string{"--payload", "@" + file}, "", `{"from":"file"}`},
		{"stdin", []string{"--payload", "-"}, `{"from":"stdin"}` + "\n", `{"from":"stdin"}` + "\n"},
		{"none", nil, "", `{}`},
	}
	for _, tt := range tests {
		for _, proto := range protocols {
			t.Run(tt.name+"/"+proto, func(t *testing.T) {
				s := newFakeServer(t)
				c := newCLI(t, s)
				c.stdin = tt.stdin
				r := c.run(append([]string{"--protocol", proto, "invoke", "hello"}, tt.args...)...)
				if r.code != 0 {
					t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
				}
				_, h, msg := s.inv.last(t)
				want := &skiffv1.InvokeRequest{
					FunctionName: "hello", Payload: []byte(tt.want),
					InvocationType: skiffv1.InvocationType_INVOCATION_TYPE_REQUEST_RESPONSE,
					LogType:        skiffv1.LogType_LOG_TYPE_NONE,
				}
				if d := cmp.Diff(want, msg, protocmp.Transform()); d != "" {
					t.Errorf("request (-want +got):\n%s", d)
				}
				if got := h.Get("Authorization"); got != "Bearer test-key" {
					t.Errorf("Authorization = %q, want Bearer test-key", got)
				}
				// The fake echoes: the payload comes back with exactly one newline.
				if want := strings.TrimSuffix(tt.want, "\n") + "\n"; r.stdout != want {
					t.Errorf("stdout = %q, want %q", r.stdout, want)
				}
			})
		}
	}
}

func TestInvokeOptions(t *testing.T) {
	s := newFakeServer(t)
	logs := "START RequestId: r1\nhello from the function\nEND RequestId: r1\n"
	s.inv.respond = func(r *skiffv1.InvokeRequest) (*skiffv1.InvokeResponse, error) {
		if r.GetInvocationType() == skiffv1.InvocationType_INVOCATION_TYPE_DRY_RUN {
			return &skiffv1.InvokeResponse{StatusCode: 204}, nil
		}
		return &skiffv1.InvokeResponse{StatusCode: 200, Payload: []byte(`"ok"`), LogResult: base64.StdEncoding.EncodeToString([]byte(logs))}, nil
	}
	c := newCLI(t, s)

	r := c.run("invoke", "hello", "--log-tail", "--qualifier", "$LATEST")
	if r.code != 0 {
		t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
	}
	_, _, msg := s.inv.last(t)
	req := msg.(*skiffv1.InvokeRequest)
	if req.GetLogType() != skiffv1.LogType_LOG_TYPE_TAIL || req.GetQualifier() != "$LATEST" {
		t.Errorf("got log type %v, qualifier %q; want TAIL and $LATEST", req.GetLogType(), req.GetQualifier())
	}
	if r.stdout != "\"ok\"\n" {
		t.Errorf("stdout = %q, want the payload", r.stdout)
	}
	if r.stderr != logs {
		t.Errorf("stderr = %q, want the decoded log tail %q", r.stderr, logs)
	}

	r = c.run("invoke", "hello", "--dry-run")
	if r.code != 0 || r.stdout != "" {
		t.Errorf("dry run: exit %d, stdout %q; want 0 and nothing", r.code, r.stdout)
	}
	_, _, msg = s.inv.last(t)
	if got := msg.(*skiffv1.InvokeRequest).GetInvocationType(); got != skiffv1.InvocationType_INVOCATION_TYPE_DRY_RUN {
		t.Errorf("invocation type %v, want DRY_RUN", got)
	}
}

func TestInvokeFunctionError(t *testing.T) {
	for _, proto := range protocols {
		t.Run(proto, func(t *testing.T) {
			s := newFakeServer(t)
			errPayload := `{"errorMessage":"boom","errorType":"errorString"}`
			s.inv.respond = func(*skiffv1.InvokeRequest) (*skiffv1.InvokeResponse, error) {
				return &skiffv1.InvokeResponse{StatusCode: 200, Payload: []byte(errPayload), FunctionError: "Unhandled"}, nil
			}
			r := newCLI(t, s).run("--protocol", proto, "invoke", "hello", "--payload", `{"action":"error"}`)
			if r.code != 1 {
				t.Errorf("exit code %d, want 1", r.code)
			}
			if r.stdout != errPayload+"\n" {
				t.Errorf("stdout = %q, want the error payload", r.stdout)
			}
			if !strings.Contains(r.stderr, "function error: Unhandled") {
				t.Errorf("stderr = %q, want 'function error: Unhandled'", r.stderr)
			}
		})
	}
}

func TestInvokeThrottled(t *testing.T) {
	s := newFakeServer(t)
	s.inv.respond = func(*skiffv1.InvokeRequest) (*skiffv1.InvokeResponse, error) {
		return nil, errs.Throttled(time.Second, "rate exceeded: reserved concurrency 2 of hello in use")
	}
	r := newCLI(t, s).run("invoke", "hello")
	want := "skiff: rate exceeded: reserved concurrency 2 of hello in use (reason: throttled, retry after 1s)\n"
	if r.code != 1 || r.stderr != want || r.stdout != "" {
		t.Errorf("got exit %d, stdout %q, stderr %q; want 1, nothing, %q", r.code, r.stdout, r.stderr, want)
	}
}

func TestInvokeBadPayloadFile(t *testing.T) {
	s := newFakeServer(t)
	r := newCLI(t, s).run("invoke", "hello", "--payload", "@/does/not/exist.json")
	if r.code != 1 || !strings.Contains(r.stderr, "skiff: reading the payload:") {
		t.Errorf("got exit %d, stderr %q; want 1 and a read error", r.code, r.stderr)
	}
	if s.inv.count() != 0 {
		t.Errorf("the server got a call, want none")
	}
}

func TestLogs(t *testing.T) {
	for _, proto := range protocols {
		t.Run(proto, func(t *testing.T) {
			s := newFakeServer(t)
			s.log.lines = []string{"START RequestId: r1\n", "line without newline", "END RequestId: r1\n"}
			r := newCLI(t, s).run("--protocol", proto, "logs", "hello", "--lines", "20")
			if r.code != 0 {
				t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
			}
			_, h, msg := s.log.last(t)
			if d := cmp.Diff(&skiffv1.TailLogsRequest{FunctionName: "hello", Lines: 20}, msg, protocmp.Transform()); d != "" {
				t.Errorf("request (-want +got):\n%s", d)
			}
			if h.Get("Authorization") != "Bearer test-key" {
				t.Errorf("Authorization = %q, want Bearer test-key on the stream", h.Get("Authorization"))
			}
			if want := "START RequestId: r1\nline without newline\nEND RequestId: r1\n"; r.stdout != want {
				t.Errorf("stdout = %q, want %q", r.stdout, want)
			}
		})
	}
}

func TestLogsFollowEndsOnInterrupt(t *testing.T) {
	s := newFakeServer(t)
	s.log.lines = []string{"old line\n"}
	s.log.following = make(chan struct{})
	ctx, cancel := context.WithCancel(t.Context())
	c := newCLI(t, s)
	printed := make(chan struct{})
	var once sync.Once
	c.onStdout = func(out string) {
		if out == "old line\n" {
			once.Do(func() { close(printed) })
		}
	}
	go func() {
		for _, ch := range []chan struct{}{s.log.following, printed} { // following, and the history is out
			select {
			case <-ch:
			case <-ctx.Done():
				return
			}
		}
		cancel()
	}()
	r := c.runCtx(ctx, "logs", "hello", "-f")
	if r.code != 0 {
		t.Errorf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
	}
	if r.stdout != "old line\n" {
		t.Errorf("stdout = %q, want the old line", r.stdout)
	}
	_, _, msg := s.log.last(t)
	if req := msg.(*skiffv1.TailLogsRequest); !req.GetFollow() || req.GetLines() != 50 {
		t.Errorf("got follow %v lines %d, want true and the default 50", req.GetFollow(), req.GetLines())
	}
}

func TestLogsNotFound(t *testing.T) {
	s := newFakeServer(t)
	r := newCLI(t, s).run("logs", "missing")
	if r.code != 1 || !strings.Contains(r.stderr, `skiff: function "missing" not found (reason: not_found)`) {
		t.Errorf("got exit %d, stderr %q; want 1 and not found", r.code, r.stderr)
	}
}

func TestKeys(t *testing.T) {
	s := newFakeServer(t)
	c := newCLI(t, s)

	r := c.run("key", "create", "--invoke", "fn1,fn2", "--invoke", "fn3", "--description", "ci")
	if r.code != 0 {
		t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
	}
	_, _, msg := s.key.last(t)
	want := &skiffv1.CreateKeyRequest{Description: "ci", InvokeFunctions: []string{"fn1", "fn2", "fn3"}}
	if d := cmp.Diff(want, msg, protocmp.Transform()); d != "" {
		t.Errorf("request (-want +got):\n%s", d)
	}
	for _, w := range []string{"key-1", "sk_secret_value", "invoke fn1,fn2,fn3"} {
		if !strings.Contains(r.stdout, w) {
			t.Errorf("stdout lacks %q:\n%s", w, r.stdout)
		}
	}
	if !strings.Contains(r.stderr, "not shown again") {
		t.Errorf("stderr = %q, want the warning that the secret is shown once", r.stderr)
	}

	r = c.run("key", "create", "--admin", "-o", "json")
	var created struct {
		Key struct {
			Admin bool `json:"admin"`
		} `json:"key"`
		Secret string `json:"secret"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &created); err != nil || !created.Key.Admin || created.Secret != "sk_secret_value" {
		t.Errorf("json output %q (err %v), want an admin key and the secret", r.stdout, err)
	}

	for _, args := range [][]string{{"key", "create"}, {"key", "create", "--admin", "--invoke", "x"}} {
		if r := c.run(args...); r.code != exitUsage {
			t.Errorf("%v: exit code %d, want %d", args, r.code, exitUsage)
		}
	}

	r = c.run("key", "list")
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if r.code != 0 || len(lines) != 3 || !strings.HasPrefix(lines[0], "ID") ||
		!strings.Contains(lines[1], "key-admin") || !strings.Contains(lines[1], "admin") || !strings.Contains(lines[2], "invoke a,b") {
		t.Errorf("key list: exit %d, stdout:\n%s", r.code, r.stdout)
	}

	r = c.run("key", "revoke", "key-2")
	if r.code != 0 || r.stdout != "revoked key key-2\n" {
		t.Errorf("revoke: exit %d, stdout %q", r.code, r.stdout)
	}
	if _, _, msg := s.key.last(t); msg.(*skiffv1.RevokeKeyRequest).GetId() != "key-2" {
		t.Errorf("revoked %v, want key-2", msg)
	}
	if r := c.run("key", "revoke", "nope"); r.code != 1 || !strings.Contains(r.stderr, `key "nope" not found`) {
		t.Errorf("revoke of an unknown key: exit %d, stderr %q", r.code, r.stderr)
	}
}

func TestConcurrency(t *testing.T) {
	s := newFakeServer(t)
	c := newCLI(t, s)
	r := c.run("concurrency", "set", "hello", "10")
	if r.code != 0 || r.stdout != "reserved concurrency of hello: 10\n" {
		t.Errorf("set: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	_, _, msg := s.fn.last(t)
	if d := cmp.Diff(&skiffv1.PutFunctionConcurrencyRequest{Name: "hello", ReservedConcurrentExecutions: 10}, msg, protocmp.Transform()); d != "" {
		t.Errorf("request (-want +got):\n%s", d)
	}
	r = c.run("concurrency", "delete", "hello")
	if r.code != 0 {
		t.Errorf("delete: exit %d, stderr %q", r.code, r.stderr)
	}
	if proc, _, msg := s.fn.last(t); proc != "DeleteFunctionConcurrency" || msg.(*skiffv1.DeleteFunctionConcurrencyRequest).GetName() != "hello" {
		t.Errorf("got %s %v, want DeleteFunctionConcurrency of hello", proc, msg)
	}
	for _, n := range []string{"-1", "ten", "99999999999"} {
		if r := c.run("concurrency", "set", "hello", n); r.code != exitUsage {
			t.Errorf("concurrency set hello %s: exit %d, want %d", n, r.code, exitUsage)
		}
	}
}

func TestAPIKeyResolution(t *testing.T) {
	tests := []struct {
		name     string
		flag     string
		env      string
		file     string // admin.key content in the data dir
		dataDir  string // how the data dir is found: SKIFF_DATA_DIR, XDG_DATA_HOME or home
		wantAuth string
	}{
		{"flag wins", "from-flag", "from-env", "from-file", "SKIFF_DATA_DIR", "Bearer from-flag"},
		{"env next", "", "from-env", "from-file", "SKIFF_DATA_DIR", "Bearer from-env"},
		{"admin key file", "", "", "from-file\n", "SKIFF_DATA_DIR", "Bearer from-file"},
		{"admin key under XDG_DATA_HOME", "", "", "xdg-key", "XDG_DATA_HOME", "Bearer xdg-key"},
		{"admin key under home", "", "", "home-key", "home", "Bearer home-key"},
		{"none", "", "", "", "SKIFF_DATA_DIR", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newFakeServer(t)
			c := newCLI(t, s)
			delete(c.env, envAPIKey)
			if tt.env != "" {
				c.env[envAPIKey] = tt.env
			}
			base := t.TempDir()
			var dataDir string
			switch tt.dataDir {
			case "SKIFF_DATA_DIR":
				dataDir = filepath.Join(base, "data")
				c.env[envDataDir] = dataDir
			case "XDG_DATA_HOME":
				c.env["XDG_DATA_HOME"] = base
				dataDir = filepath.Join(base, "skiff")
			case "home":
				c.home = base
				dataDir = filepath.Join(base, ".local", "share", "skiff")
			}
			if tt.file != "" {
				writeFile(t, filepath.Join(dataDir, "admin.key"), []byte(tt.file), 0o600)
			}
			args := []string{"fn", "get", "hello"}
			if tt.flag != "" {
				args = append([]string{"--api-key", tt.flag}, args...)
			}
			if r := c.run(args...); r.code != 0 {
				t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
			}
			if _, h, _ := s.fn.last(t); h.Get("Authorization") != tt.wantAuth {
				t.Errorf("Authorization = %q, want %q", h.Get("Authorization"), tt.wantAuth)
			}
		})
	}
}

func TestAPIKeyUnreadable(t *testing.T) {
	s := newFakeServer(t)
	c := newCLI(t, s)
	delete(c.env, envAPIKey)
	dataDir := t.TempDir()
	c.env[envDataDir] = dataDir
	// A directory where the key file should be cannot be read as a file.
	if err := os.Mkdir(filepath.Join(dataDir, "admin.key"), 0o700); err != nil {
		t.Fatal(err)
	}
	r := c.run("fn", "list")
	if r.code != 1 || !strings.Contains(r.stderr, "skiff: reading the admin key:") {
		t.Errorf("got exit %d, stderr %q; want 1 and a read error", r.code, r.stderr)
	}
}

func TestEndpointFlagAndEnv(t *testing.T) {
	s := newFakeServer(t)
	c := newCLI(t, nil)
	c.env[envEndpoint] = "http://127.0.0.1:1" // wrong; the flag must win
	if r := c.run("--endpoint", s.url+"/", "fn", "get", "x"); r.code != 0 {
		t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
	}
	if s.fn.count() != 1 {
		t.Errorf("the server got %d calls, want 1", s.fn.count())
	}
	if r := c.run("--endpoint", "ftp://x", "fn", "list"); r.code != exitUsage || !strings.Contains(r.stderr, "invalid endpoint") {
		t.Errorf("bad endpoint: exit %d, stderr %q; want %d and invalid endpoint", r.code, r.stderr, exitUsage)
	}
}

func TestDefaultDataDir(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		home string
		want string
	}{
		{"SKIFF_DATA_DIR", map[string]string{"SKIFF_DATA_DIR": "/srv/skiff", "XDG_DATA_HOME": "/x"}, "/home/u", "/srv/skiff"},
		{"XDG_DATA_HOME", map[string]string{"XDG_DATA_HOME": "/x"}, "/home/u", "/x/skiff"},
		{"home", nil, "/home/u", "/home/u/.local/share/skiff"},
		{"no home", nil, "", ".skiff"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			home := func() (string, error) {
				if tt.home == "" {
					return "", errors.New("no home")
				}
				return tt.home, nil
			}
			if got := defaultDataDir(func(k string) string { return tt.env[k] }, home); got != tt.want {
				t.Errorf("defaultDataDir = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestDev(t *testing.T) {
	t.Run("defaults", func(t *testing.T) {
		c := newCLI(t, nil)
		c.env[envDataDir] = "/var/lib/skiff"
		var got devConfig
		c.dev = func(_ context.Context, cfg devConfig) error { got = cfg; return nil }
		if r := c.run("dev"); r.code != 0 {
			t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
		}
		if got.DataDir != "/var/lib/skiff" || got.Listen != "127.0.0.1:7070" || got.KeepAlive != 10*time.Minute ||
			got.SandboxMemoryMB != 0 || got.Deploy != nil || got.Logger == nil || got.Stdout == nil ||
			got.AsyncDurability != "always" || got.AsyncRetryDelay != time.Minute {
			t.Errorf("got config %+v, want the defaults", got)
		}
	})
	t.Run("flags", func(t *testing.T) {
		c := newCLI(t, nil)
		var got devConfig
		c.dev = func(_ context.Context, cfg devConfig) error { got = cfg; return nil }
		r := c.run("dev", "--data-dir", "/d", "--listen", "127.0.0.1:0", "--deploy", "hello=h.zip", "--deploy", "b=x=y.zip",
			"--keep-alive", "90s", "--sandbox-memory", "2048", "--async-durability", "interval", "--async-retry-delay", "1s",
			"--sandbox-subnet", "10.99.0.0/20", "--resolver", "192.0.2.53")
		if r.code != 0 {
			t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
		}
		want := devConfig{DataDir: "/d", Listen: "127.0.0.1:0", Deploy: map[string]string{"hello": "h.zip", "b": "x=y.zip"},
			KeepAlive: 90 * time.Second, SandboxMemoryMB: 2048, AsyncDurability: "interval", AsyncRetryDelay: time.Second,
			SandboxSubnet: netip.MustParsePrefix("10.99.0.0/20"), Resolver: netip.MustParseAddr("192.0.2.53")}
		got.Logger, got.Stdout = nil, nil
		if d := cmp.Diff(want, got, cmp.AllowUnexported(devConfig{}), cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }), cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); d != "" {
			t.Errorf("config (-want +got):\n%s", d)
		}
	})
	t.Run("server error", func(t *testing.T) {
		c := newCLI(t, nil)
		c.dev = func(context.Context, devConfig) error {
			return errors.New("listening on 127.0.0.1:7070: address already in use")
		}
		if r := c.run("dev"); r.code != 1 || r.stderr != "skiff: listening on 127.0.0.1:7070: address already in use\n" {
			t.Errorf("got exit %d, stderr %q", r.code, r.stderr)
		}
	})
	for _, args := range [][]string{
		{"dev", "--deploy", "noequals"},
		{"dev", "--deploy", "=x.zip"},
		{"dev", "--deploy", "a=1.zip", "--deploy", "a=2.zip"},
		{"dev", "--keep-alive", "0s"},
		{"dev", "--log-level", "loud"},
		{"dev", "--async-durability", "sometimes"},
		{"dev", "--async-retry-delay", "0s"},
		{"dev", "--sandbox-subnet", "10.0.0.1/16"},
		{"dev", "--sandbox-subnet", "fd00::/64"},
		{"dev", "--resolver", "dns.example"},
		{"dev", "extra"},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			c := newCLI(t, nil)
			c.dev = func(context.Context, devConfig) error { t.Error("the dev server ran"); return nil }
			if r := c.run(args...); r.code != exitUsage {
				t.Errorf("exit code %d, want %d; stderr %q", r.code, exitUsage, r.stderr)
			}
		})
	}
}

func TestVersion(t *testing.T) {
	c := newCLI(t, nil)
	r := c.run("version")
	if r.code != 0 || !strings.HasPrefix(r.stdout, "skiff ") || !strings.Contains(r.stdout, "go1.") {
		t.Errorf("version: exit %d, stdout %q", r.code, r.stdout)
	}
	r = c.run("version", "-o", "json")
	var v buildVersion
	if err := json.Unmarshal([]byte(r.stdout), &v); err != nil || v.Go == "" || v.Version == "" {
		t.Errorf("version json %q (err %v), want version and go", r.stdout, err)
	}
}

func TestHelp(t *testing.T) {
	c := newCLI(t, nil)
	for _, args := range [][]string{nil, {"fn"}, {"--help"}, {"invoke", "--help"}} {
		r := c.run(args...)
		if r.code != 0 || !strings.Contains(r.stdout, "Usage:") {
			t.Errorf("%v: exit %d, stdout %q; want 0 and usage", args, r.code, r.stdout)
		}
	}
}

func TestInterrupted(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if code := report(ctx, new(strings.Builder), context.Canceled); code != exitInterrupted {
		t.Errorf("exit code %d, want %d", code, exitInterrupted)
	}
}
