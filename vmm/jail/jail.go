// Package jail runs function processes in Linux namespace sandboxes.
//
// Each sandbox is forked from one long-lived locked OS thread (see
// netns.Thread) inside a pre-created network namespace, with new user, pid,
// mount, uts and ipc namespaces, and placed in its own cgroup. The first
// process in the sandbox is the jail init, a re-exec of the agent's own
// binary (IsInit/InitMain): it builds a minimal root on a tmpfs (host /usr
// and /lib read-only for shell-script bootstraps, code read-only at
// /var/task, /tmp sized by ephemeral storage, a minimal /dev, /proc, /etc),
// pivots into it, drops to uid 993 with no capabilities, no_new_privs and a
// seccomp filter, and execs the function's bootstrap.
//
// To keep that re-exec (several milliseconds for a big binary) off the
// cold-start path, the Manager keeps a pool of pre-started inits
// (Config.PoolSize): forked into their namespaces with their listener,
// cgroup (named init_<agent pid>_<n>, without limits yet and at the lowest
// CPU weight) and root already made, each waiting on its control socket.
// Start takes one, applies the spec's cgroup limits from the agent and
// sends it the spec with the code directory as a detached mount and the
// stdout/stderr descriptors (SCM_RIGHTS); the init mounts /var/task and
// /tmp, drops its privileges and execs. Without an idle init, Start forks
// one itself (its cgroup named by the sandbox ID, limits set at creation)
// and takes it through the same steps. The pool refills in the background,
// one init at a time, after each Start.
//
// Every resource a sandbox takes is released by Sandbox.Close; Manager.Close
// and Manager.Reclaim release the pool's idle inits too, and Reclaim
// removes what a crashed agent left behind (pre-started inits die with the
// agent, like sandboxes, and their cgroups live under the same parent).
package jail

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"skiff.dev/skiff/internal/cgroup"
	"skiff.dev/skiff/netns"
)

// Config configures a Manager.
type Config struct {
	RunDir     string      // agent-private directory for per-sandbox state (created if missing); it and its parents must be searchable (o+x)
	CgroupName string      // skiff's parent cgroup name, e.g. "skiff"
	UIDBase    uint32      // first host uid/gid used for sandbox users (default 200000); each sandbox gets its own pair
	NetPool    *netns.Pool // may be nil: the jail creates one
	Logger     *slog.Logger

	// PoolSize is how many jail inits are kept pre-started (forked into
	// their namespaces and cgroup, root built, waiting for a spec), so
	// Start only hands one its sandbox. 0 (or less) disables the pool:
	// every Start forks its own init. DefaultPoolSize is the recommended
	// size.
	PoolSize int
	// PoolListenAddr is the address of the listener each pre-started init
	// holds in its network namespace (default "127.0.0.1:9001", the Runtime
	// API's). A Spec with another ListenAddr gets its listener at Start.
	PoolListenAddr string

	// Net enables sandbox networking (Spec.Network). Nil: every sandbox
	// has loopback only, and a Spec with a Network is refused.
	Net *NetConfig
}

// DefaultPoolSize is the recommended Config.PoolSize: enough pre-started
// inits for a burst of cold starts while one is being refilled.
const DefaultPoolSize = 4

const (
	defaultUIDBase        = 200000
	defaultPoolListenAddr = "127.0.0.1:9001"
	// SandboxUID is the uid and gid the function runs as inside the jail.
	SandboxUID = 993
	// Hostname is the jail's host name.
	Hostname    = "sandbox"
	rootDirName = "root"
)

// Manager starts and tracks sandboxes.
type Manager struct {
	cfg     Config
	log     *slog.Logger
	thread  *netns.Thread
	netPool *netns.Pool
	ownPool bool
	inits   *initPool
	cg      cgroup.Manager
	net     *sandboxNet // nil without Config.Net
	host    hostLayout
	devnull *os.File
	rootDir string // mount point of each sandbox's new root (in its own mount namespace)
	seccomp []unix.SockFilter

	mu     sync.Mutex
	live   map[string]*Sandbox // started sandboxes (nil while starting); guarded by mu
	slots  []bool              // uid slots in use; guarded by mu
	closed bool                // guarded by mu
	starts sync.WaitGroup      // Starts in flight; Add guarded by mu
}

// New prepares the run directory, detects the cgroup version and starts the
// fork thread.
func New(cfg Config) (*Manager, error) {
	if cfg.RunDir == "" {
		return nil, errors.New("jail: RunDir is required")
	}
	if cfg.CgroupName == "" {
		cfg.CgroupName = "skiff"
	}
	if cfg.UIDBase == 0 {
		cfg.UIDBase = defaultUIDBase
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.PoolListenAddr == "" {
		cfg.PoolListenAddr = defaultPoolListenAddr
	}
	if _, err := netip.ParseAddrPort(cfg.PoolListenAddr); err != nil {
		return nil, fmt.Errorf("jail: PoolListenAddr: %w", err)
	}
	runDir, err := filepath.Abs(cfg.RunDir)
	if err != nil {
		return nil, err
	}
	cfg.RunDir = runDir
	if err := os.MkdirAll(runDir, 0o711); err != nil {
		return nil, fmt.Errorf("jail: creating run dir: %w", err)
	}
	if err := os.Chmod(runDir, 0o711); err != nil {
		return nil, fmt.Errorf("jail: %w", err)
	}
	if err := checkSearchable(runDir); err != nil {
		return nil, err
	}
	m := &Manager{cfg: cfg, log: cfg.Logger, live: map[string]*Sandbox{}, rootDir: filepath.Join(runDir, rootDirName)}
	var cleanup []func()
	fail := func(err error) (*Manager, error) {
		for i := len(cleanup) - 1; i >= 0; i-- {
			cleanup[i]()
		}
		return nil, err
	}
	if err := ensureEmptyDir(m.rootDir); err != nil {
		return fail(err)
	}
	if m.cg, err = cgroup.New(cgroup.Config{Name: cfg.CgroupName}); err != nil {
		return fail(fmt.Errorf("jail: %w", err))
	}
	if m.host, err = probeHost(); err != nil {
		return fail(err)
	}
	if m.seccomp, err = assembleSeccomp(); err != nil {
		return fail(err)
	}
	if m.devnull, err = os.Open(os.DevNull); err != nil {
		return fail(err)
	}
	cleanup = append(cleanup, func() { m.devnull.Close() })
	if m.thread, err = netns.NewThread(); err != nil {
		return fail(fmt.Errorf("jail: starting fork thread: %w", err))
	}
	cleanup = append(cleanup, m.thread.Close)
	m.netPool = cfg.NetPool
	if m.netPool == nil {
		if m.netPool, err = netns.NewPool(netns.PoolConfig{Logger: cfg.Logger}); err != nil {
			return fail(fmt.Errorf("jail: %w", err))
		}
		m.ownPool = true
	}
	if cfg.Net != nil {
		if m.net, err = newSandboxNet(*cfg.Net, runDir, m); err != nil {
			return fail(err)
		}
		m.host.ResolvConf = netns.ResolvConf(m.net.resolver)
	}
	m.inits = newInitPool(m, max(cfg.PoolSize, 0), cfg.PoolListenAddr, m.net != nil)
	m.inits.start()
	return m, nil
}

// Stats says how sandboxes were started.
type Stats struct {
	PoolIdle    int    // pre-started inits ready now
	PoolIdleNet int    // of those, the ones with a veth already
	PoolHits    uint64 // Starts (failed ones too) that handed their sandbox to a pre-started init
	PoolMisses  uint64 // Starts that forked their own init (pool empty or disabled)
}

// Stats reports the pool's state and counters.
func (m *Manager) Stats() Stats {
	return Stats{PoolIdle: m.inits.idleCount(), PoolIdleNet: m.inits.idleOf(kindVeth), PoolHits: m.inits.hits.Load(), PoolMisses: m.inits.misses.Load()}
}

// CgroupVersion is 1 or 2, as detected.
func (m *Manager) CgroupVersion() int { return m.cg.Version() }

// checkSearchable makes sure a sandbox's unprivileged setup user can reach
// dir: every directory on the way must be searchable by others.
func checkSearchable(dir string) error {
	for d := dir; ; d = filepath.Dir(d) {
		st, err := os.Stat(d)
		if err != nil {
			return fmt.Errorf("jail: %w", err)
		}
		if st.Mode().Perm()&0o001 == 0 {
			return fmt.Errorf("jail: run dir %s is not reachable by sandbox users: %s lacks o+x", dir, d)
		}
		if d == "/" {
			return nil
		}
	}
}

func ensureEmptyDir(dir string) error {
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("jail: %w", err)
	}
	return os.Chmod(dir, 0o755)
}

// Reclaim removes what a crashed previous run left: every cgroup under
// CgroupName (after killing its processes), mounts under RunDir, RunDir
// leftovers, and with networking the links of the agent's tag (and its
// nftables table, reinstalled). Call it before starting sandboxes. The pool of pre-started
// inits is emptied first and refilled afterwards.
func (m *Manager) Reclaim() error {
	var errsOut []error
	if err := m.inits.halt(); err != nil {
		errsOut = append(errsOut, fmt.Errorf("releasing pre-started inits: %w", err))
	}
	defer func() {
		// Under mu: a concurrent Close either sees the pool running and
		// halts it, or has already marked the manager closed.
		m.mu.Lock()
		defer m.mu.Unlock()
		if !m.closed {
			m.inits.start()
		}
	}()
	n, err := m.cg.Reclaim()
	if err != nil {
		errsOut = append(errsOut, fmt.Errorf("reclaiming cgroups: %w", err))
	}
	files := 0
	mounts, err := m.reclaimMounts()
	if err != nil {
		// Never delete below a mount that is still attached.
		errsOut = append(errsOut, err)
	} else {
		entries, err := os.ReadDir(m.cfg.RunDir)
		if err != nil {
			errsOut = append(errsOut, err)
		}
		for _, e := range entries {
			if e.Name() == rootDirName {
				continue
			}
			if err := os.RemoveAll(filepath.Join(m.cfg.RunDir, e.Name())); err != nil {
				errsOut = append(errsOut, err)
			}
			files++
		}
	}
	if err := ensureEmptyDir(m.rootDir); err != nil {
		errsOut = append(errsOut, err)
	}
	links := 0
	if m.net != nil {
		if links, err = m.net.net.Reclaim(); err != nil {
			errsOut = append(errsOut, fmt.Errorf("reclaiming sandbox links: %w", err))
		}
	}
	if n+len(mounts)+files+links > 0 {
		m.log.Info("reclaimed sandbox leftovers", "cgroups", n, "mounts", len(mounts), "files", files, "links", links)
	}
	return errors.Join(errsOut...)
}

// reclaimMounts detaches every host mount under RunDir (deepest first) and
// makes sure none is left before anything there is deleted.
func (m *Manager) reclaimMounts() ([]string, error) {
	list := func() ([]string, error) {
		b, err := os.ReadFile("/proc/self/mountinfo")
		if err != nil {
			return nil, err
		}
		var out []string
		for line := range strings.Lines(string(b)) {
			f := strings.Fields(line)
			if len(f) > 4 && (f[4] == m.cfg.RunDir || strings.HasPrefix(f[4], m.cfg.RunDir+"/")) {
				out = append(out, f[4])
			}
		}
		return out, nil
	}
	mounts, err := list()
	if err != nil {
		return nil, err
	}
	for i := len(mounts) - 1; i >= 0; i-- {
		if err := unix.Unmount(mounts[i], unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			return mounts, fmt.Errorf("unmounting leftover %s: %w", mounts[i], err)
		}
	}
	left, err := list()
	if err != nil {
		return mounts, err
	}
	if len(left) > 0 {
		return mounts, fmt.Errorf("mounts left under %s: %v", m.cfg.RunDir, left)
	}
	return mounts, nil
}

// Close kills all live sandboxes and releases everything the Manager holds.
func (m *Manager) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	m.mu.Unlock()

	var errsOut []error
	if err := m.inits.halt(); err != nil {
		errsOut = append(errsOut, err)
	}
	m.starts.Wait()
	m.mu.Lock()
	live := make([]*Sandbox, 0, len(m.live))
	for _, s := range m.live {
		if s != nil {
			live = append(live, s)
		}
	}
	m.mu.Unlock()

	var wg sync.WaitGroup
	errCh := make(chan error, len(live))
	for _, s := range live {
		wg.Go(func() { errCh <- s.Close() })
	}
	wg.Wait()
	close(errCh)
	for err := range errCh {
		errsOut = append(errsOut, err)
	}
	m.thread.Close()
	if m.ownPool {
		errsOut = append(errsOut, m.netPool.Close())
	}
	if m.net != nil {
		errsOut = append(errsOut, m.net.close())
	}
	errsOut = append(errsOut, m.devnull.Close())
	return errors.Join(errsOut...)
}

// register reserves a sandbox ID for a Start, which calls m.starts.Done
// when it returns.
func (m *Manager) register(id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return errors.New("jail: manager is closed")
	}
	if _, ok := m.live[id]; ok {
		return fmt.Errorf("jail: sandbox %s already exists", id)
	}
	m.live[id] = nil
	m.starts.Add(1)
	return nil
}

func (m *Manager) unregister(id string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.live, id)
}

// acquireSlot returns a free uid slot.
func (m *Manager) acquireSlot() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i, used := range m.slots {
		if !used {
			m.slots[i] = true
			return i
		}
	}
	m.slots = append(m.slots, true)
	return len(m.slots) - 1
}

func (m *Manager) releaseSlot(slot int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.slots[slot] = false
}

// hostLayout is what the jail borrows from the host, probed once.
type hostLayout struct {
	Binds      []bindMount       // read-only binds of host directories
	Symlinks   map[string]string // host top-level symlinks reproduced in the jail (/bin -> usr/bin)
	ResolvConf string
}

type bindMount struct {
	Path  string // same path on the host and in the jail
	Flags uintptr
}

func probeHost() (hostLayout, error) {
	h := hostLayout{Symlinks: map[string]string{}}
	for _, p := range []string{"/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ssl/certs", "/etc/pki"} {
		st, err := os.Lstat(p)
		if err != nil {
			continue
		}
		if st.Mode()&os.ModeSymlink != 0 {
			target, err := os.Readlink(p)
			if err != nil {
				return h, err
			}
			h.Symlinks[p] = target
			continue
		}
		if !st.IsDir() {
			continue
		}
		var sfs unix.Statfs_t
		if err := unix.Statfs(p, &sfs); err != nil {
			return h, fmt.Errorf("jail: statfs %s: %w", p, err)
		}
		h.Binds = append(h.Binds, bindMount{Path: p, Flags: lockedFlags(sfs.Flags)})
	}
	if b, err := os.ReadFile("/etc/resolv.conf"); err == nil {
		h.ResolvConf = string(b)
	}
	return h, nil
}

// lockedFlags are the mount flags a bind mount in a user namespace must
// keep when it is remounted read-only (the kernel refuses to clear them).
func lockedFlags(st int64) uintptr {
	var f uintptr
	for _, m := range []struct {
		st int64
		ms uintptr
	}{
		{unix.ST_NOSUID, unix.MS_NOSUID},
		{unix.ST_NODEV, unix.MS_NODEV},
		{unix.ST_NOEXEC, unix.MS_NOEXEC},
		{unix.ST_NOATIME, unix.MS_NOATIME},
		{unix.ST_NODIRATIME, unix.MS_NODIRATIME},
		{unix.ST_RELATIME, unix.MS_RELATIME},
	} {
		if st&m.st != 0 {
			f |= m.ms
		}
	}
	return f
}
