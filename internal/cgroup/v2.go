package cgroup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// V2 manages sandbox cgroups in the unified (v2) hierarchy.
type V2 struct {
	parent string
	rmdir  func(string) error
}

var _ Manager = (*V2)(nil)

// NewV2 returns a v2 Manager whose parent cgroup is the directory parent,
// creating it and enabling the memory, cpu and pids controllers for its
// children (and in its own parent, which must be the root or a delegated
// cgroup without processes of its own).
func NewV2(parent string) (*V2, error) {
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return nil, fmt.Errorf("creating cgroup %s: %w", parent, err)
	}
	if err := evacuate(filepath.Dir(parent)); err != nil {
		return nil, err
	}
	enable := "+" + strings.Join(controllers, " +")
	for _, dir := range []string{filepath.Dir(parent), parent} {
		if err := writeFile(dir, "cgroup.subtree_control", enable); err != nil {
			return nil, fmt.Errorf("enabling cgroup controllers (is %s delegated and free of processes?): %w", dir, err)
		}
	}
	return &V2{parent: parent, rmdir: unix.Rmdir}, nil
}

// Version implements Manager.
func (m *V2) Version() int { return 2 }

// Create implements Manager.
func (m *V2) Create(name string, r Resources) (Group, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	dir := filepath.Join(m.parent, name)
	if err := unix.Mkdir(dir, 0o755); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("cgroup %s already exists", dir)
		}
		return nil, fmt.Errorf("creating cgroup %s: %w", dir, err)
	}
	g := &v2Group{name: name, dir: dir, m: m}
	if err := g.apply(r); err != nil {
		_ = g.Remove()
		return nil, err
	}
	return g, nil
}

func (g *v2Group) apply(r Resources) error {
	// Optional files are written only where the kernel has them (the
	// parent's files show what the kernel offers).
	has := func(file string) bool { return exists(filepath.Join(g.m.parent, file)) }
	if r.MemoryMB > 0 {
		if err := writeFile(g.dir, "memory.max", strconv.FormatInt(int64(r.MemoryMB)<<20, 10)); err != nil {
			return err
		}
		if has("memory.swap.max") {
			if err := writeFile(g.dir, "memory.swap.max", "0"); err != nil {
				return err
			}
		}
	}
	if has("memory.oom.group") {
		if err := writeFile(g.dir, "memory.oom.group", "1"); err != nil {
			return err
		}
	}
	if err := writeFile(g.dir, "cpu.weight", strconv.FormatUint(CPUWeight(r.cpuMB()), 10)); err != nil {
		return err
	}
	if r.PidsMax > 0 {
		if err := writeFile(g.dir, "pids.max", strconv.Itoa(r.PidsMax)); err != nil {
			return err
		}
	}
	return nil
}

// Reclaim implements Manager.
func (m *V2) Reclaim() (int, error) {
	return reclaimTree(m.parent, m.rmdir, killV2)
}

func killV2(dir string) error {
	if exists(filepath.Join(dir, "cgroup.kill")) {
		err := writeFile(dir, "cgroup.kill", "1")
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	return killProcs(dir)
}

type v2Group struct {
	name, dir string
	m         *V2

	mu      sync.Mutex
	removed bool // guarded by mu
}

func (g *v2Group) Name() string { return g.name }

func (g *v2Group) CloneFD() (int, error) {
	fd, err := unix.Open(g.dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("opening cgroup %s: %w", g.dir, err)
	}
	return fd, nil
}

func (g *v2Group) Add(pid int) error {
	return writeFile(g.dir, "cgroup.procs", strconv.Itoa(pid))
}

func (g *v2Group) Update(r Resources) error { return g.apply(r) }

func (g *v2Group) PeakMemory() (int64, error) {
	return readInt(filepath.Join(g.dir, "memory.peak"))
}

func (g *v2Group) OOMKills() (int64, error) {
	return readKey(filepath.Join(g.dir, "memory.events"), "oom_kill")
}

func (g *v2Group) Kill() error { return killV2(g.dir) }

func (g *v2Group) Remove() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.removed {
		return nil
	}
	if err := rmdirWait(g.dir, g.m.rmdir, g.Kill); err != nil {
		return err
	}
	g.removed = true
	return nil
}

// SupervisorName is the leaf cgroup the agent moves itself into when it
// runs in a non-root cgroup that holds processes (a systemd service with
// Delegate=yes): v2's no-internal-processes rule forbids enabling
// controllers for children of a cgroup that has processes of its own.
const SupervisorName = "supervisor"

// evacuate moves every process of the non-root cgroup dir into the leaf
// dir/supervisor, so controllers can be enabled for dir's children. The
// root cgroup (which has no cgroup.type file) is exempt from the rule.
func evacuate(dir string) error {
	if !exists(filepath.Join(dir, "cgroup.type")) {
		return nil
	}
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return fmt.Errorf("reading %s/cgroup.procs: %w", dir, err)
	}
	pids := strings.Fields(string(b))
	if len(pids) == 0 {
		return nil
	}
	leaf := filepath.Join(dir, SupervisorName)
	if err := os.MkdirAll(leaf, 0o755); err != nil {
		return fmt.Errorf("creating cgroup %s: %w", leaf, err)
	}
	for _, pid := range pids {
		if err := writeFile(leaf, "cgroup.procs", pid); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("moving process %s to %s: %w", pid, leaf, err)
		}
	}
	return nil
}
