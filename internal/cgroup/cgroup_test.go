package cgroup

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"skiff.dev/skiff/internal/testutil"
)

func TestCPUWeights(t *testing.T) {
	tests := []struct {
		mb             int
		shares, weight uint64
	}{
		{0, 2, 1},
		{128, 74, 7},
		{1769, 1024, 100},
		{3538, 2048, 200},
		{10240, 5927, 578},
		{1 << 30, 262144, 10000},
	}
	for _, tc := range tests {
		if got := CPUShares(tc.mb); got != tc.shares {
			t.Errorf("CPUShares(%d): got %d, want %d", tc.mb, got, tc.shares)
		}
		if got := CPUWeight(tc.mb); got != tc.weight {
			t.Errorf("CPUWeight(%d): got %d, want %d", tc.mb, got, tc.weight)
		}
	}
}

func TestParseOwnCgroupsAndMounts(t *testing.T) {
	dir := t.TempDir()
	cg := filepath.Join(dir, "cgroup")
	os.WriteFile(cg, []byte("9:name=systemd:/\n4:memory:/process_api/abc\n2:cpu,cpuacct:/x\n0::/unified\n"), 0o644)
	own, err := readOwnCgroups(cg)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"name=systemd": "/", "memory": "/process_api/abc", "cpu": "/x", "cpuacct": "/x", "": "/unified"}
	if d := cmp.Diff(want, own); d != "" {
		t.Errorf("own cgroups (-want +got):\n%s", d)
	}
	mi := filepath.Join(dir, "mountinfo")
	os.WriteFile(mi, []byte(strings.Join([]string{
		"30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct",
		"31 25 0:27 /nested /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory",
		"32 25 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw",
		"33 25 0:29 / /mnt/with\\040space rw - cgroup cgroup rw,pids",
	}, "\n")), 0o644)
	mounts, err := v1Mounts(mi)
	if err != nil {
		t.Fatal(err)
	}
	for c, w := range map[string]v1Mount{
		"cpu":    {dir: "/sys/fs/cgroup/cpu,cpuacct", root: "/"},
		"memory": {dir: "/sys/fs/cgroup/memory", root: "/nested"},
		"pids":   {dir: "/mnt/with space", root: "/"},
	} {
		if mounts[c] != w {
			t.Errorf("mount of %s: got %+v, want %+v", c, mounts[c], w)
		}
	}
}

func read(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestV2Files runs the v2 logic on an ordinary directory standing in for
// cgroupfs.
func TestV2Files(t *testing.T) {
	root := t.TempDir()
	parent := filepath.Join(root, "skiff")
	if err := os.Mkdir(parent, 0o755); err != nil {
		t.Fatal(err)
	}
	// The kernel offers swap and group OOM control here.
	for _, f := range []string{"memory.swap.max", "memory.oom.group"} {
		os.WriteFile(filepath.Join(parent, f), nil, 0o644)
	}
	m, err := NewV2(parent)
	if err != nil {
		t.Fatal(err)
	}
	m.rmdir = os.RemoveAll
	for _, dir := range []string{root, parent} {
		if got := read(t, filepath.Join(dir, "cgroup.subtree_control")); got != "+memory +cpu +pids" {
			t.Errorf("%s subtree_control: got %q", dir, got)
		}
	}
	g, err := m.Create("sb-1", Resources{MemoryMB: 3538, PidsMax: 77})
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(parent, "sb-1")
	for file, want := range map[string]string{
		"memory.max": strconv.Itoa(3538 << 20), "memory.swap.max": "0", "memory.oom.group": "1",
		"cpu.weight": "200", "pids.max": "77",
	} {
		if got := read(t, filepath.Join(dir, file)); got != want {
			t.Errorf("%s: got %q, want %q", file, got, want)
		}
	}
	if _, err := m.Create("sb-1", Resources{MemoryMB: 128}); err == nil {
		t.Error("creating an existing cgroup: got no error")
	}
	if fd, err := g.CloneFD(); err != nil || fd < 0 {
		t.Errorf("CloneFD: got %d, %v; want a directory fd", fd, err)
	} else {
		syscall.Close(fd)
	}
	if err := g.Add(4242); err != nil {
		t.Fatal(err)
	}
	if got := read(t, filepath.Join(dir, "cgroup.procs")); got != "4242" {
		t.Errorf("cgroup.procs: got %q", got)
	}
	os.WriteFile(filepath.Join(dir, "memory.peak"), []byte("12345\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "memory.events"), []byte("low 0\nhigh 0\nmax 9\noom 2\noom_kill 1\noom_group_kill 0\n"), 0o644)
	if got, err := g.PeakMemory(); err != nil || got != 12345 {
		t.Errorf("PeakMemory: got %d, %v; want 12345", got, err)
	}
	if got, err := g.OOMKills(); err != nil || got != 1 {
		t.Errorf("OOMKills: got %d, %v; want 1", got, err)
	}
	// With cgroup.kill present, Kill writes it instead of signalling pids.
	os.WriteFile(filepath.Join(dir, "cgroup.kill"), nil, 0o644)
	if err := g.Kill(); err != nil {
		t.Fatal(err)
	}
	if got := read(t, filepath.Join(dir, "cgroup.kill")); got != "1" {
		t.Errorf("cgroup.kill: got %q, want 1", got)
	}
	if err := g.Remove(); err != nil {
		t.Fatal(err)
	}
	if err := g.Remove(); err != nil {
		t.Errorf("second Remove: %v", err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("cgroup dir after Remove: %v", err)
	}
	// A group made without limits (a pre-started init's) gets them later.
	pg, err := m.Create("pool_1", Resources{CPUWeightMB: 1769})
	if err != nil {
		t.Fatal(err)
	}
	pdir := filepath.Join(parent, "pool_1")
	if got := read(t, filepath.Join(pdir, "cpu.weight")); got != "100" {
		t.Errorf("pool cpu.weight: got %q, want 100", got)
	}
	for _, file := range []string{"memory.max", "pids.max"} {
		if _, err := os.Stat(filepath.Join(pdir, file)); !os.IsNotExist(err) {
			t.Errorf("pool group has %s (stat %v), want no limit written", file, err)
		}
	}
	if err := pg.Update(Resources{MemoryMB: 128, PidsMax: 5}); err != nil {
		t.Fatal(err)
	}
	for file, want := range map[string]string{
		"memory.max": strconv.Itoa(128 << 20), "memory.swap.max": "0", "cpu.weight": "7", "pids.max": "5",
	} {
		if got := read(t, filepath.Join(pdir, file)); got != want {
			t.Errorf("updated %s: got %q, want %q", file, got, want)
		}
	}
	if err := pg.Remove(); err != nil {
		t.Fatal(err)
	}
	// Reclaim removes leftovers, nested ones too.
	os.MkdirAll(filepath.Join(parent, "old-1", "inner"), 0o755)
	os.MkdirAll(filepath.Join(parent, "old-2"), 0o755)
	n, err := m.Reclaim()
	if err != nil || n != 2 {
		t.Errorf("Reclaim: got %d, %v; want 2", n, err)
	}
	entries, _ := os.ReadDir(parent)
	for _, e := range entries {
		if e.IsDir() {
			t.Errorf("left after Reclaim: %s", e.Name())
		}
	}
}

// TestHostCgroups runs the detected implementation for real: limits,
// membership, kill, peak memory and removal.
func TestHostCgroups(t *testing.T) {
	testutil.RequirePrivileged(t)
	name := "skiff-cgtest-" + strconv.Itoa(os.Getpid())
	m, err := New(Config{Name: name})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := m.Reclaim(); err != nil {
			t.Error(err)
		}
		switch m := m.(type) {
		case *V1:
			for _, d := range m.parents {
				os.Remove(d)
			}
		case *V2:
			os.Remove(m.parent)
		}
	})
	// Limits set at creation and limits set later on a group made without
	// them (a pre-started init's) end up the same.
	pg, err := m.Create("pool_1", Resources{CPUWeightMB: 128})
	if err != nil {
		t.Fatal(err)
	}
	if err := pg.Update(Resources{MemoryMB: 64, PidsMax: 16}); err != nil {
		t.Fatal(err)
	}
	g, err := m.Create("sb", Resources{MemoryMB: 64, PidsMax: 16})
	if err != nil {
		t.Fatal(err)
	}
	checkV1Limits(t, m, pg)
	checkV1Limits(t, m, g)
	if err := pg.Remove(); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sleep", "600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	if err := g.Add(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	// Charges made before the move stay behind (v1), so only readability
	// is checked here; the jail's OOM test checks a real peak.
	if peak, err := g.PeakMemory(); err != nil || peak < 0 {
		t.Errorf("PeakMemory: got %d, %v", peak, err)
	}
	if n, err := g.OOMKills(); err != nil || n != 0 {
		t.Errorf("OOMKills: got %d, %v; want 0", n, err)
	}
	if err := g.Kill(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("process in the cgroup survived Kill")
	}
	if err := g.Remove(); err != nil {
		t.Fatal(err)
	}
	if err := g.Remove(); err != nil {
		t.Errorf("second Remove: %v", err)
	}
}

// checkV1Limits checks the files of a group that should hold a 64 MiB
// memory limit and a pids limit of 16 (on a v1 host).
func checkV1Limits(t *testing.T, m Manager, g Group) {
	t.Helper()
	v1, ok := m.(*V1)
	if !ok {
		return
	}
	gg := g.(*v1Group)
	for file, want := range map[string]string{
		filepath.Join(gg.dirs["memory"], "memory.limit_in_bytes"): strconv.Itoa(64 << 20),
		filepath.Join(gg.dirs["cpu"], "cpu.shares"):               strconv.FormatUint(CPUShares(64), 10),
		filepath.Join(gg.dirs["pids"], "pids.max"):                "16",
	} {
		if got := strings.TrimSpace(read(t, file)); got != want {
			t.Errorf("%s: got %q, want %q", file, got, want)
		}
	}
	if v1.memsw {
		if got := strings.TrimSpace(read(t, filepath.Join(gg.dirs["memory"], "memory.memsw.limit_in_bytes"))); got != strconv.Itoa(64<<20) {
			t.Errorf("memsw limit: got %q", got)
		}
	}
}

// TestV2EvacuatesDelegatedCgroup: under systemd with Delegate=yes the agent
// starts in a non-root cgroup that has processes; NewV2 moves them into a
// leaf before enabling controllers for the sandboxes' parent.
func TestV2EvacuatesDelegatedCgroup(t *testing.T) {
	own := t.TempDir()
	os.WriteFile(filepath.Join(own, "cgroup.type"), []byte("domain\n"), 0o644)
	os.WriteFile(filepath.Join(own, "cgroup.procs"), []byte("4242\n"), 0o644)
	if _, err := NewV2(filepath.Join(own, "skiff")); err != nil {
		t.Fatal(err)
	}
	if got := read(t, filepath.Join(own, SupervisorName, "cgroup.procs")); got != "4242" {
		t.Fatalf("supervisor cgroup.procs = %q, want the agent's pid 4242", got)
	}
	// The root cgroup is exempt: nothing is moved.
	root := t.TempDir()
	os.WriteFile(filepath.Join(root, "cgroup.procs"), []byte("1\n"), 0o644)
	if _, err := NewV2(filepath.Join(root, "skiff")); err != nil {
		t.Fatal(err)
	}
	if exists(filepath.Join(root, SupervisorName)) {
		t.Fatal("processes were moved out of the root cgroup")
	}
}
