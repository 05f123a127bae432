package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/testutil"
	"skiff.dev/skiff/vmm/jail"
)

func TestMain(m *testing.M) {
	if jail.IsInit() {
		jail.InitMain()
	}
	os.Exit(m.Run())
}

type zipFetcher map[string][]byte

func (z zipFetcher) FetchCode(_ context.Context, digest string) ([]byte, error) {
	b, ok := z[digest]
	if !ok {
		return nil, errs.NotFound("code %s", digest)
	}
	return b, nil
}

func newAgent(t *testing.T, cgroup string) (*Agent, string) {
	t.Helper()
	testutil.RequirePrivileged(t)
	zip := testutil.FunctionZip(t, "testfn")
	sum := sha256.Sum256(zip)
	digest := hex.EncodeToString(sum[:])
	dir := t.TempDir()
	a, err := New(Config{DataDir: dir, MemoryMB: 2048, Code: zipFetcher{digest: zip}, CgroupName: cgroup, NetworkSubnet: testSubnet()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close(context.Background()) })
	return a, digest
}

func spec(fn, key, digest string) *skiffv1.SandboxSpec {
	return &skiffv1.SandboxSpec{FunctionName: fn, ConfigKey: key, CodeSha256: digest, MemoryMb: 128, TimeoutSeconds: 5}
}

func (a *Agent) invoke(t *testing.T, s *skiffv1.SandboxSpec, payload string) *skiffv1.AgentInvokeResponse {
	t.Helper()
	resp, err := a.Invoke(context.Background(), connect.NewRequest(&skiffv1.AgentInvokeRequest{Spec: s, RequestId: "r-" + strconv.Itoa(len(payload)), Payload: []byte(payload), WantLog: true}))
	if err != nil {
		t.Fatalf("invoke: %v", err)
	}
	return resp.Msg
}

// TestNoLeaks creates and destroys 200 real jailed sandboxes running the
// aws-lambda-go test function and checks that nothing is left: no child
// processes, no cgroups, no mounts, no file descriptors.
func TestNoLeaks(t *testing.T) {
	testutil.RequirePrivileged(t)
	testutil.FunctionZip(t, "testfn") // build before the baseline
	baseFDs, baseMounts := countFDs(t), countMounts(t)
	a, digest := newAgent(t, "skiff-leaktest")
	n := 200
	if testing.Short() {
		n = 20
	}
	for i := 0; i < n; i++ {
		r := a.invoke(t, spec("leak", "k"+strconv.Itoa(i), digest), `{"i":1}`)
		if !r.ColdStart || r.FunctionError != "" {
			t.Fatalf("invoke %d: cold=%v error %q %s", i, r.ColdStart, r.FunctionError, r.Payload)
		}
	}
	a.mgr.Retire("leak", "")
	if got := len(a.mgr.Sandboxes()); got != 0 {
		t.Fatalf("%d sandboxes left", got)
	}
	if c, _ := a.ledger.Usage(); c != 0 {
		t.Errorf("%d MB still committed", c)
	}
	// While the agent runs, only its pool of pre-started jail inits may
	// remain; after Close, nothing.
	if kids := testutil.ChildPIDs(os.Getpid()); len(kids) > jail.DefaultPoolSize {
		t.Errorf("%d child processes with no sandboxes, want at most the %d pooled inits: %v", len(kids), jail.DefaultPoolSize, kids)
	}
	if err := a.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if kids := testutil.ChildPIDs(os.Getpid()); len(kids) != 0 {
		t.Errorf("child processes left after Close: %v", kids)
	}
	if fds := countFDs(t); fds > baseFDs+2 {
		t.Errorf("open fds grew from %d to %d", baseFDs, fds)
	}
	if m := countMounts(t); m != baseMounts {
		t.Errorf("mounts went from %d to %d", baseMounts, m)
	}
	if left := sandboxCgroups(t, "skiff-leaktest"); len(left) != 0 {
		t.Errorf("cgroups left: %v", left)
	}
	if _, err := os.Stat(a.cfg.RunDir); !os.IsNotExist(err) {
		t.Errorf("run dir %s still there after Close (%v)", a.cfg.RunDir, err)
	}
}

func countFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func countMounts(t *testing.T) int {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), "\n")
}

// sandboxCgroups lists cgroup directories below any directory named name
// in the cgroup filesystem.
func sandboxCgroups(t *testing.T, name string) []string {
	var out []string
	_ = filepath.WalkDir("/sys/fs/cgroup", func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		if filepath.Base(filepath.Dir(p)) == name {
			out = append(out, p)
		}
		return nil
	})
	return out
}
