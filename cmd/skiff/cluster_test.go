package main

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/gateway/cluster"
	"skiff.dev/skiff/gateway/store"
	"skiff.dev/skiff/gossip"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/pki"
)

// staticMembers is a fixed gossip view.
type staticMembers []gossip.Member

func (m staticMembers) Members() []gossip.Member { return append([]gossip.Member(nil), m...) }

type staticSandboxes struct {
	list        []*skiffv1.PlacedSandbox
	unreachable []string
}

func (s staticSandboxes) Sandboxes(context.Context) ([]*skiffv1.PlacedSandbox, []string, error) {
	return s.list, s.unreachable, nil
}

// authLog records the Authorization header of every call.
type authLog struct {
	mu    sync.Mutex
	heads []string // guarded by mu
}

func (l *authLog) interceptor() connect.UnaryInterceptorFunc {
	return func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			l.mu.Lock()
			l.heads = append(l.heads, req.Header().Get("Authorization"))
			l.mu.Unlock()
			return next(ctx, req)
		}
	}
}

func (l *authLog) all() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.heads...)
}

// clusterServer serves the real ClusterService handler (real CA, join
// tokens in an embedded NATS store) with a fixed membership and sandbox
// list, over HTTP/1.1 and h2c.
func clusterServer(t *testing.T) (*cli, *pki.CA, *authLog) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := store.Open(ctx, store.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	tokens, err := cluster.NewTokenStore(ctx, st.JetStream(), cluster.TokenStoreConfig{})
	if err != nil {
		t.Fatal(err)
	}
	caDir := filepath.Join(t.TempDir(), "ca")
	if err := pki.InitCA(caDir); err != nil {
		t.Fatal(err)
	}
	ca, err := pki.LoadCA(caDir)
	if err != nil {
		t.Fatal(err)
	}
	capacity, err := gossip.Summarize(gossip.Capacity{MemoryTotalMB: 8192, MemoryFreeMB: 6144, CPUTotalMilli: 4000, CPUFreeMilli: 2500, Sandboxes: 5, Busy: 2, Idle: 3, Load: 0.375}, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	members := staticMembers{
		{Name: "gw-1", Addr: "10.0.0.1:7946", Tags: gossip.Tags{Role: gossip.RoleGateway, Version: "v1", Zone: "z1", RPCAddr: "10.0.0.1:7070"}},
		{Name: "agent-1", Addr: "10.0.0.2:7946", Tags: gossip.Tags{Role: gossip.RoleAgent, Version: "v1", Zone: "z1", Rack: "r1", RPCAddr: "10.0.0.2:7071"}, Capacity: capacity},
		{Name: "agent-2", Addr: "10.0.0.3:7946", State: gossip.StateSuspect, Draining: true, Tags: gossip.Tags{Role: gossip.RoleAgent, Version: "v1", Zone: "z2", RPCAddr: "10.0.0.3:7071"}},
	}
	sandboxes := staticSandboxes{
		list: []*skiffv1.PlacedSandbox{
			{Host: "agent-1", Sandbox: &skiffv1.SandboxInfo{Id: "sb-2", FunctionName: "resize", ConfigKey: "k2", State: "busy", MemoryMb: 256, Invocations: 7}},
			{Host: "agent-1", Sandbox: &skiffv1.SandboxInfo{Id: "sb-1", FunctionName: "hello", ConfigKey: "k1", State: "idle", MemoryMb: 128, Invocations: 42}},
		},
		unreachable: []string{"agent-2"},
	}
	h, err := cluster.New(cluster.Config{CA: ca, Tokens: tokens, Members: members, Sandboxes: sandboxes})
	if err != nil {
		t.Fatal(err)
	}
	log := &authLog{}
	mux := http.NewServeMux()
	mux.Handle(skiffv1connect.NewClusterServiceHandler(h, connect.WithInterceptors(errs.Interceptor(), log.interceptor())))
	srv := httptest.NewUnstartedServer(mux)
	srv.Config.Protocols = new(http.Protocols)
	srv.Config.Protocols.SetHTTP1(true)
	srv.Config.Protocols.SetUnencryptedHTTP2(true)
	srv.Start()
	t.Cleanup(srv.Close)
	c := &cli{t: t, env: map[string]string{envAPIKey: "test-key", envEndpoint: srv.URL}, home: t.TempDir()}
	return c, ca, log
}

func TestCAInit(t *testing.T) {
	c := newCLI(t, nil)
	dir := filepath.Join(t.TempDir(), "ca")
	r := c.run("ca", "init", "--dir", dir)
	if r.code != 0 {
		t.Fatalf("ca init: exit %d, stderr %s", r.code, r.stderr)
	}
	ca, err := pki.LoadCA(dir)
	if err != nil {
		t.Fatalf("the created CA does not load: %v", err)
	}
	if !strings.Contains(r.stdout, ca.Fingerprint()) || !strings.Contains(r.stdout, dir) {
		t.Errorf("stdout lacks the fingerprint or the directory:\n%s", r.stdout)
	}
	before, _ := os.ReadFile(filepath.Join(dir, pki.CAKeyFile))
	r = c.run("ca", "init", "--dir", dir)
	if r.code != exitError || !strings.Contains(r.stderr, "refusing to overwrite") {
		t.Errorf("second ca init: exit %d, stderr %q; want a refusal", r.code, r.stderr)
	}
	if after, _ := os.ReadFile(filepath.Join(dir, pki.CAKeyFile)); string(after) != string(before) {
		t.Error("the second init changed ca.key")
	}

	// The default directory is <data dir>/ca; -o json for scripts.
	c.env[envDataDir] = t.TempDir()
	r = c.run("ca", "init", "-o", "json")
	var out struct{ Dir, Fingerprint string }
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil || r.code != 0 {
		t.Fatalf("ca init -o json: exit %d, %q (%v)", r.code, r.stdout, err)
	}
	if want := filepath.Join(c.env[envDataDir], "ca"); out.Dir != want || len(out.Fingerprint) != 64 {
		t.Errorf("json %+v, want dir %s and a fingerprint", out, want)
	}
	if _, err := os.Stat(filepath.Join(out.Dir, pki.CAKeyFile)); err != nil {
		t.Error(err)
	}
}

var tokenRE = regexp.MustCompile(`^skiff-join-v1:([0-9a-f]{12})\.[0-9a-f]{32}:([0-9a-f]{64})\n$`)

func TestTokens(t *testing.T) {
	c, ca, log := clusterServer(t)
	r := c.run("token", "create", "--ttl", "30m", "--description", "rack 7")
	if r.code != 0 {
		t.Fatalf("token create: exit %d, stderr %s", r.code, r.stderr)
	}
	m := tokenRE.FindStringSubmatch(r.stdout)
	if m == nil {
		t.Fatalf("stdout %q is not the token alone", r.stdout)
	}
	id := m[1]
	if m[2] != ca.Fingerprint() {
		t.Errorf("the token pins %s, want the CA %s", m[2], ca.Fingerprint())
	}
	if !strings.Contains(r.stderr, id) || !strings.Contains(r.stderr, "not shown again") {
		t.Errorf("stderr %q lacks the id and the warning", r.stderr)
	}
	if heads := log.all(); len(heads) != 1 || heads[0] != "Bearer test-key" {
		t.Errorf("Authorization headers %q, want the API key", heads)
	}

	r = c.run("token", "create", "-o", "json")
	var created struct{ Token, Id, Expires string }
	if err := json.Unmarshal([]byte(r.stdout), &created); err != nil || !tokenRE.MatchString(created.Token+"\n") || created.Expires == "" {
		t.Errorf("token create -o json: %q (%v)", r.stdout, err)
	}

	r = c.run("token", "list")
	rows := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if r.code != 0 || len(rows) != 3 || !strings.HasPrefix(rows[0], "ID") {
		t.Fatalf("token list: exit %d, stdout:\n%s", r.code, r.stdout)
	}
	if !strings.Contains(r.stdout, id) || !strings.Contains(r.stdout, "rack 7") || strings.Count(r.stdout, "valid") != 2 {
		t.Errorf("token list:\n%s", r.stdout)
	}

	r = c.run("token", "revoke", id)
	if r.code != 0 || r.stdout != "revoked join token "+id+"\n" {
		t.Errorf("revoke: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	r = c.run("token", "list", "-o", "json")
	var list struct {
		Tokens []struct{ Id, State string } `json:"tokens"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &list); err != nil {
		t.Fatal(err)
	}
	for _, tk := range list.Tokens {
		if (tk.Id == id) != (tk.State == "revoked") {
			t.Errorf("after revoking %s: %s is %s", id, tk.Id, tk.State)
		}
	}

	for _, args := range [][]string{
		{"token", "create", "--ttl", "0s"},
		{"token", "create", "--ttl", "-1h"},
		{"token", "create", "--ttl", "1.5s"},
		{"token", "create", "--ttl", "soon"},
		{"token", "revoke"},
	} {
		if r := c.run(args...); r.code != exitUsage {
			t.Errorf("%v: exit %d, want %d", args, r.code, exitUsage)
		}
	}
	// The gateway's own checks come back with the field.
	if r := c.run("token", "create", "--ttl", "10s"); r.code != exitError || !strings.Contains(r.stderr, "lifetime") {
		t.Errorf("--ttl 10s: exit %d, stderr %q", r.code, r.stderr)
	}
	if r := c.run("token", "revoke", "0123456789ab"); r.code != exitError || !strings.Contains(r.stderr, "not found") {
		t.Errorf("revoke of an unknown token: exit %d, stderr %q", r.code, r.stderr)
	}
}

func TestClusterMembersHostsSandboxes(t *testing.T) {
	c, _, _ := clusterServer(t)
	r := c.run("cluster", "members")
	want := []string{
		"NAME     ROLE     STATE             ADDRESS        RPC ADDRESS    ZONE  RACK  VERSION",
		"agent-1  agent    alive             10.0.0.2:7946  10.0.0.2:7071  z1    r1    v1",
		"agent-2  agent    suspect,draining  10.0.0.3:7946  10.0.0.3:7071  z2    -     v1",
		"gw-1     gateway  alive             10.0.0.1:7946  10.0.0.1:7070  z1    -     v1",
	}
	if got := strings.Split(strings.TrimRight(r.stdout, "\n"), "\n"); r.code != 0 || strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("cluster members: exit %d, stdout:\n%s\nwant:\n%s", r.code, r.stdout, strings.Join(want, "\n"))
	}

	r = c.run("cluster", "hosts")
	want = []string{
		"NAME     STATE             ZONE  RACK  MEMORY FREE/TOTAL  CPU FREE/TOTAL  SANDBOXES  BUSY  IDLE  LOAD",
		"agent-1  alive             z1    r1    6144/8192 MB       2.5/4           5          2     3     0.38",
		"agent-2  suspect,draining  z2    -     -                  -               -          -     -     -",
	}
	if got := strings.Split(strings.TrimRight(r.stdout, "\n"), "\n"); r.code != 0 || strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("cluster hosts: exit %d, stdout:\n%s\nwant:\n%s", r.code, r.stdout, strings.Join(want, "\n"))
	}
	r = c.run("cluster", "hosts", "-o", "json")
	var hosts struct {
		Hosts []struct {
			Name          string `json:"name"`
			MemoryTotalMb string `json:"memoryTotalMb"`
			Load          float64
		} `json:"hosts"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &hosts); err != nil || len(hosts.Hosts) != 2 || hosts.Hosts[0].MemoryTotalMb != "8192" || hosts.Hosts[0].Load != 0.375 {
		t.Errorf("cluster hosts -o json: %v\n%s", err, r.stdout)
	}

	r = c.run("sandboxes")
	want = []string{
		"HOST     SANDBOX  FUNCTION  STATE  MEMORY  INVOCATIONS  CONFIG KEY",
		"agent-1  sb-1     hello     idle   128 MB  42           k1",
		"agent-1  sb-2     resize    busy   256 MB  7            k2",
	}
	if got := strings.Split(strings.TrimRight(r.stdout, "\n"), "\n"); r.code != 0 || strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("sandboxes: exit %d, stdout:\n%s\nwant:\n%s", r.code, r.stdout, strings.Join(want, "\n"))
	}
	if !strings.Contains(r.stderr, "could not reach agent-2") {
		t.Errorf("stderr %q lacks the unreachable host", r.stderr)
	}
	r = c.run("sandboxes", "--function", "resize")
	if r.code != 0 || strings.Count(r.stdout, "\n") != 2 || !strings.Contains(r.stdout, "sb-2") {
		t.Errorf("sandboxes --function resize:\n%s", r.stdout)
	}
	r = c.run("sandboxes", "--host", "agent-9")
	if r.code != 0 || strings.Count(r.stdout, "\n") != 1 || r.stderr != "" {
		t.Errorf("sandboxes --host agent-9: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
}
