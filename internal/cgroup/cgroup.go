// Package cgroup gives each sandbox a control group: a memory limit, a CPU
// weight proportional to its memory (as Lambda does), a pids limit, peak
// memory and OOM-kill accounting, and a kill switch. One small interface
// has two implementations, cgroup v1 (one directory per controller
// hierarchy) and v2 (the unified hierarchy), chosen by detection.
//
// Both write cgroupfs files directly: it is several times cheaper than a
// general cgroup library on the sandbox cold-start path.
//
// All cgroups live under one parent named by Config.Name, created below the
// calling process's own cgroup (the root on a dedicated host, the service's
// delegated subtree under systemd), so Reclaim can find and remove what a
// crashed run left.
package cgroup

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Resources are the limits of one sandbox's cgroup.
type Resources struct {
	MemoryMB int // memory limit in MiB (0: no limit); also scales the CPU weight
	PidsMax  int // maximum number of tasks; 0 leaves the limit unchanged
	// CPUWeightMB, when set, scales the CPU weight instead of MemoryMB: a
	// group without a memory limit (a pre-started jail init waiting for its
	// sandbox) still gets a small, explicit weight.
	CPUWeightMB int
}

// cpuMB is the memory size the CPU weight is scaled from.
func (r Resources) cpuMB() int {
	if r.CPUWeightMB > 0 {
		return r.CPUWeightMB
	}
	return r.MemoryMB
}

// Manager creates per-sandbox cgroups under the parent cgroup.
type Manager interface {
	// Version is 1 or 2.
	Version() int
	// Create makes the cgroup name under the parent and applies r.
	Create(name string, r Resources) (Group, error)
	// Reclaim kills the processes of every cgroup under the parent and
	// removes those cgroups. It returns how many cgroups it removed.
	Reclaim() (int, error)
}

// Group is one sandbox's cgroup.
type Group interface {
	// Name is the cgroup's name under the parent.
	Name() string
	// CloneFD returns a new directory fd for CLONE_INTO_CGROUP (the caller
	// closes it), or -1 when the hierarchy needs Add after the fork (v1).
	CloneFD() (int, error)
	// Add moves the process pid into the cgroup.
	Add(pid int) error
	// Update applies r to the existing cgroup (a pre-started init's group
	// getting its sandbox's limits). A zero MemoryMB or PidsMax leaves that
	// limit unchanged.
	Update(r Resources) error
	// PeakMemory is the highest memory usage seen, in bytes.
	PeakMemory() (int64, error)
	// OOMKills counts the processes the OOM killer killed in the cgroup.
	OOMKills() (int64, error)
	// Kill sends SIGKILL to every process in the cgroup.
	Kill() error
	// Remove kills what is left and removes the cgroup. It is idempotent:
	// a cgroup that is already gone is success.
	Remove() error
}

// Config selects the hierarchy and names the parent cgroup.
type Config struct {
	Name string // parent cgroup name, e.g. "skiff"
}

// Controllers are the v1 hierarchies (and v2 controllers) skiff uses.
var controllers = []string{"memory", "cpu", "pids"}

// New detects the cgroup version of this host and returns a Manager whose
// parent is Config.Name below the calling process's own cgroup.
func New(cfg Config) (Manager, error) {
	if err := validName(cfg.Name); err != nil {
		return nil, fmt.Errorf("cgroup parent: %w", err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs("/sys/fs/cgroup", &st); err != nil {
		return nil, fmt.Errorf("detecting cgroup version: %w", err)
	}
	own, err := readOwnCgroups("/proc/self/cgroup")
	if err != nil {
		return nil, err
	}
	if st.Type == unix.CGROUP2_SUPER_MAGIC {
		return NewV2(filepath.Join("/sys/fs/cgroup", own[""], cfg.Name))
	}
	mounts, err := v1Mounts("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	dirs := map[string]string{}
	for _, c := range controllers {
		m, ok := mounts[c]
		if !ok {
			return nil, fmt.Errorf("cgroup v1 controller %s is not mounted", c)
		}
		rel, err := filepath.Rel(m.root, own[c])
		if err != nil || strings.HasPrefix(rel, "..") {
			rel = "."
		}
		dirs[c] = filepath.Join(m.dir, rel, cfg.Name)
	}
	return NewV1(dirs)
}

// CPUShares is the v1 cpu.shares for a sandbox of memoryMB: 1024 (one
// full CPU's default share) at 1769 MB, as Lambda allots one vCPU per
// 1769 MB, clamped to the kernel's range.
func CPUShares(memoryMB int) uint64 {
	return clamp(uint64(max(memoryMB, 0))*1024/1769, 2, 262144)
}

// CPUWeight is the v2 cpu.weight scaled the same way as CPUShares: the
// default weight 100 at 1769 MB, clamped to [1, 10000].
func CPUWeight(memoryMB int) uint64 {
	return clamp(uint64(max(memoryMB, 0))*100/1769, 1, 10000)
}

func clamp(v, lo, hi uint64) uint64 { return min(max(v, lo), hi) }

func validName(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
		return fmt.Errorf("invalid cgroup name %q", name)
	}
	return nil
}

// readOwnCgroups parses /proc/self/cgroup into controller → path; the v2
// entry has the key "".
func readOwnCgroups(path string) (map[string]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading own cgroup: %w", err)
	}
	out := map[string]string{}
	for line := range strings.Lines(string(b)) {
		parts := strings.SplitN(strings.TrimSpace(line), ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[1] == "" {
			out[""] = parts[2]
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			out[c] = parts[2]
		}
	}
	return out, nil
}

type v1Mount struct{ dir, root string }

// v1Mounts finds the mount point of each v1 controller in mountinfo.
func v1Mounts(path string) (map[string]v1Mount, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading mountinfo: %w", err)
	}
	defer f.Close()
	out := map[string]v1Mount{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent maj:min root mountpoint options [optional...] - fstype source superopts
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		pf, qf := strings.Fields(pre), strings.Fields(post)
		if len(pf) < 5 || len(qf) < 3 || qf[0] != "cgroup" {
			continue
		}
		for _, opt := range strings.Split(qf[2], ",") {
			if _, seen := out[opt]; !seen {
				out[opt] = v1Mount{dir: unescapeMount(pf[4]), root: unescapeMount(pf[3])}
			}
		}
	}
	return out, sc.Err()
}

func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// writeFile writes a cgroupfs control file (creating it, so the v2 logic
// can be tested on an ordinary directory).
func writeFile(dir, file, value string) error {
	f, err := os.OpenFile(filepath.Join(dir, file), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("writing %s: %w", file, err)
	}
	_, err = f.WriteString(value)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("writing %s=%s in %s: %w", file, value, dir, err)
	}
	return nil
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// readInt reads a file holding one integer ("max" reads as -1).
func readInt(path string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	s := strings.TrimSpace(string(b))
	if s == "max" {
		return -1, nil
	}
	return strconv.ParseInt(s, 10, 64)
}

// readKey reads "key value" lines (memory.events, memory.oom_control).
func readKey(path, key string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	for line := range bytes.Lines(b) {
		k, v, ok := bytes.Cut(bytes.TrimSpace(line), []byte(" "))
		if ok && string(k) == key {
			return strconv.ParseInt(string(bytes.TrimSpace(v)), 10, 64)
		}
	}
	return 0, nil
}

// procs lists the pids in a cgroup.procs file.
func procs(dir string) ([]int, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil, err
	}
	var pids []int
	for f := range strings.FieldsSeq(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// killProcs SIGKILLs every process listed in dir's cgroup.procs.
func killProcs(dir string) error {
	pids, err := procs(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("listing processes of %s: %w", dir, err)
	}
	for _, pid := range pids {
		if err := unix.Kill(pid, unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("killing %d in %s: %w", pid, dir, err)
		}
	}
	return nil
}

// rmdirWait removes a cgroup directory, killing its processes and waiting
// (bounded) for them to be gone: a killed process leaves the cgroup only
// once it has exited. A missing directory is success.
func rmdirWait(dir string, rmdir func(string) error, kill func() error) error {
	deadline := time.Now().Add(5 * time.Second)
	for attempt := 0; ; attempt++ {
		err := rmdir(dir)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if !errors.Is(err, syscall.EBUSY) || time.Now().After(deadline) {
			return fmt.Errorf("removing cgroup %s: %w", dir, err)
		}
		if err := kill(); err != nil {
			return err
		}
		// Dying processes leave the cgroup asynchronously; back off briefly.
		time.Sleep(time.Duration(min(attempt+1, 20)) * time.Millisecond)
	}
}

// reclaimTree removes every cgroup below parent, deepest first, killing
// their processes. It returns how many top-level cgroups it removed.
func reclaimTree(parent string, rmdir func(string) error, kill func(dir string) error) (int, error) {
	entries, err := os.ReadDir(parent)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("listing %s: %w", parent, err)
	}
	n := 0
	var errsOut []error
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(parent, e.Name())
		if _, err := reclaimTree(dir, rmdir, kill); err != nil {
			errsOut = append(errsOut, err)
			continue
		}
		if err := kill(dir); err != nil {
			errsOut = append(errsOut, err)
		}
		if err := rmdirWait(dir, rmdir, func() error { return kill(dir) }); err != nil {
			errsOut = append(errsOut, err)
			continue
		}
		n++
	}
	return n, errors.Join(errsOut...)
}
