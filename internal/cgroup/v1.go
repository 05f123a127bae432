package cgroup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// V1 manages sandbox cgroups in the v1 memory, cpu and pids hierarchies.
type V1 struct {
	parents map[string]string // controller → parent cgroup directory
	memsw   bool              // memory.memsw.* exists (swap accounting)
	rmdir   func(string) error
}

var _ Manager = (*V1)(nil)

// NewV1 returns a v1 Manager over the given parent directories, one per
// controller ("memory", "cpu", "pids"), creating them if missing.
func NewV1(parents map[string]string) (*V1, error) {
	for _, c := range controllers {
		dir, ok := parents[c]
		if !ok {
			return nil, fmt.Errorf("cgroup v1: no parent for controller %s", c)
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("creating cgroup %s: %w", dir, err)
		}
	}
	m := &V1{parents: parents, rmdir: unix.Rmdir}
	m.memsw = exists(filepath.Join(parents["memory"], "memory.memsw.limit_in_bytes"))
	// The OOM killer must act in sandbox cgroups (children inherit this).
	if p := filepath.Join(parents["memory"], "memory.oom_control"); exists(p) {
		if err := writeFile(parents["memory"], "memory.oom_control", "0"); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// Version implements Manager.
func (m *V1) Version() int { return 1 }

// Create implements Manager.
func (m *V1) Create(name string, r Resources) (Group, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	g := &v1Group{name: name, m: m, dirs: map[string]string{}}
	for _, c := range controllers {
		dir := filepath.Join(m.parents[c], name)
		if err := unix.Mkdir(dir, 0o755); err != nil {
			_ = g.Remove()
			if errors.Is(err, unix.EEXIST) {
				return nil, fmt.Errorf("cgroup %s already exists", dir)
			}
			return nil, fmt.Errorf("creating cgroup %s: %w", dir, err)
		}
		g.dirs[c] = dir
	}
	if err := g.apply(r); err != nil {
		_ = g.Remove()
		return nil, err
	}
	return g, nil
}

func (g *v1Group) apply(r Resources) error {
	mem := g.dirs["memory"]
	if r.MemoryMB > 0 {
		limit := strconv.FormatInt(int64(r.MemoryMB)<<20, 10)
		if g.m.memsw {
			// memsw must stay >= the memory limit: lower the memory limit
			// first, or raise memsw first when the memory limit grows.
			err := writeFile(mem, "memory.limit_in_bytes", limit)
			if err != nil && !errors.Is(err, unix.EINVAL) {
				return err
			}
			if err := writeFile(mem, "memory.memsw.limit_in_bytes", limit); err != nil {
				return err
			}
			if err != nil {
				if err := writeFile(mem, "memory.limit_in_bytes", limit); err != nil {
					return err
				}
			}
		} else {
			if err := writeFile(mem, "memory.limit_in_bytes", limit); err != nil {
				return err
			}
			if err := writeFile(mem, "memory.swappiness", "0"); err != nil {
				return err
			}
		}
	}
	if err := writeFile(g.dirs["cpu"], "cpu.shares", strconv.FormatUint(CPUShares(r.cpuMB()), 10)); err != nil {
		return err
	}
	if r.PidsMax > 0 {
		if err := writeFile(g.dirs["pids"], "pids.max", strconv.Itoa(r.PidsMax)); err != nil {
			return err
		}
	}
	return nil
}

// Reclaim implements Manager.
func (m *V1) Reclaim() (int, error) {
	n := 0
	var errsOut []error
	for _, c := range controllers {
		k, err := reclaimTree(m.parents[c], m.rmdir, killProcs)
		n = max(n, k)
		if err != nil {
			errsOut = append(errsOut, err)
		}
	}
	return n, errors.Join(errsOut...)
}

type v1Group struct {
	name string
	m    *V1
	dirs map[string]string // controller → directory; read-only after Create

	mu      sync.Mutex
	removed bool // guarded by mu
}

func (g *v1Group) Name() string { return g.name }

func (g *v1Group) CloneFD() (int, error) { return -1, nil }

func (g *v1Group) Add(pid int) error {
	p := strconv.Itoa(pid)
	for _, c := range controllers {
		if err := writeFile(g.dirs[c], "cgroup.procs", p); err != nil {
			return err
		}
	}
	return nil
}

func (g *v1Group) Update(r Resources) error { return g.apply(r) }

func (g *v1Group) PeakMemory() (int64, error) {
	return readInt(filepath.Join(g.dirs["memory"], "memory.max_usage_in_bytes"))
}

func (g *v1Group) OOMKills() (int64, error) {
	return readKey(filepath.Join(g.dirs["memory"], "memory.oom_control"), "oom_kill")
}

func (g *v1Group) Kill() error {
	// The pids hierarchy lists every process of the sandbox.
	return killProcs(g.dirs["pids"])
}

func (g *v1Group) Remove() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.removed {
		return nil
	}
	var errsOut []error
	for _, c := range controllers {
		dir, ok := g.dirs[c]
		if !ok {
			continue
		}
		if err := rmdirWait(dir, g.m.rmdir, g.Kill); err != nil {
			errsOut = append(errsOut, err)
		}
	}
	if len(errsOut) == 0 {
		g.removed = true
	}
	return errors.Join(errsOut...)
}
