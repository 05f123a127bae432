package jail

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"regexp"
	"runtime"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"skiff.dev/skiff/ebpf"
	"skiff.dev/skiff/internal/cgroup"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/netns"
)

// Spec describes one sandbox.
type Spec struct {
	ID             string   // [a-z0-9-]{1,40}, unique; used in cgroup names
	CodeDir        string   // host dir, bind-mounted read-only at /var/task
	Argv           []string // argv[0] is the path inside the jail, e.g. "/var/task/bootstrap"
	Env            []string
	MemoryMB       int      // memory limit; swap disabled where the kernel allows
	EphemeralMB    int      // size of the tmpfs at /tmp; default 512
	PidsMax        int      // default 1024
	Stdout, Stderr *os.File // write ends given to the process; nil: /dev/null
	ListenAddr     string   // if set (e.g. "127.0.0.1:9001"), a TCP listener created inside the sandbox netns before the process starts
	Network        *NetSpec // nil: loopback only (network "none")
}

var idRE = regexp.MustCompile(`^[a-z0-9-]{1,40}$`)

func (s *Spec) validate() error {
	switch {
	case !idRE.MatchString(s.ID):
		return errs.Invalid("ID", "sandbox id %q must match [a-z0-9-]{1,40}", s.ID)
	case s.CodeDir == "":
		return errs.Invalid("CodeDir", "code dir is required")
	case len(s.Argv) == 0 || s.Argv[0] == "":
		return errs.Invalid("Argv", "argv is required")
	case s.MemoryMB <= 0:
		return errs.Invalid("MemoryMB", "memory must be positive, got %d", s.MemoryMB)
	case s.EphemeralMB < 0 || s.PidsMax < 0:
		return errs.Invalid("EphemeralMB", "negative ephemeral storage or pids limit")
	case s.Network != nil && !s.Network.Policy.Egress:
		return errs.Invalid("Network", "a network without egress is no network: leave Network nil")
	}
	st, err := os.Stat(s.CodeDir)
	switch {
	case err != nil:
		return errs.Invalid("CodeDir", "opening code dir: %w", err)
	case !st.IsDir():
		return errs.Invalid("CodeDir", "code dir %s is not a directory", s.CodeDir)
	case st.Mode().Perm()&0o005 != 0o005:
		return errs.Invalid("CodeDir", "code dir %s must be readable and searchable by the sandbox user (mode o+rx), got %v", s.CodeDir, st.Mode().Perm())
	}
	if s.EphemeralMB == 0 {
		s.EphemeralMB = 512
	}
	if s.PidsMax == 0 {
		s.PidsMax = 1024
	}
	return nil
}

// ExitInfo says how a sandbox's process ended.
type ExitInfo struct {
	Code      int            // exit status, -1 when killed by a signal
	Signal    syscall.Signal // the killing signal, 0 on a normal exit
	OOMKilled bool           // the OOM killer acted in the sandbox's cgroup
}

func (e ExitInfo) String() string {
	s := fmt.Sprintf("exit status %d", e.Code)
	if e.Signal != 0 {
		s = "signal: " + e.Signal.String()
	}
	if e.OOMKilled {
		s += " (out of memory)"
	}
	return s
}

// Sandbox is one running (or ended) jailed process. A pre-started init
// waiting in the Manager's pool is a Sandbox without an ID yet.
type Sandbox struct {
	id      string // set when the sandbox is handed out by Start
	m       *Manager
	proc    *os.Process
	cg      cgroup.Group
	ns      *netns.NS
	ctl     *net.UnixConn // the agent's end of the init's control socket
	ln      net.Listener
	lnAddr  string           // the address ln listens on
	veth    *netns.Veth      // nil without network
	att     *ebpf.Attachment // the egress policy on veth
	attSpec *NetSpec         // what att enforces
	done    chan struct{}

	exit     ExitInfo // set before done is closed
	peakExit int64    // peak memory read at exit; set before done is closed

	cleanup   []func() error // LIFO; owned by Start (or the pool), then by Close
	closeOnce sync.Once
	closeErr  error
}

// ID is the sandbox's ID.
func (s *Sandbox) ID() string { return s.id }

// PID is the host pid of the sandbox's first process.
func (s *Sandbox) PID() int { return s.proc.Pid }

// Listener is the listener made from Spec.ListenAddr inside the sandbox's
// network namespace (nil without ListenAddr). The host process serves it.
func (s *Sandbox) Listener() net.Listener { return s.ln }

// Done is closed when the sandbox's process has exited.
func (s *Sandbox) Done() <-chan struct{} { return s.done }

// Exit is how the process ended; valid after Done is closed.
func (s *Sandbox) Exit() ExitInfo {
	<-s.done
	return s.exit
}

// MaxMemoryBytes is the peak memory usage of the sandbox's cgroup.
func (s *Sandbox) MaxMemoryBytes() int64 {
	select {
	case <-s.done:
		return s.peakExit
	default:
	}
	n, err := s.cg.PeakMemory()
	if err != nil {
		return 0
	}
	return n
}

// Kill sends SIGKILL to every process of the sandbox. It is idempotent.
func (s *Sandbox) Kill() error {
	// Killing the pid namespace's init kills all its processes; the cgroup
	// sweep catches anything else.
	if err := s.proc.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("killing sandbox %s (pid %d): %w", s.id, s.proc.Pid, err)
	}
	select {
	case <-s.done:
		return nil
	default:
	}
	return s.cg.Kill()
}

// Close kills the sandbox, waits for it and releases its cgroup, network
// namespace, listener and uid slot. It is idempotent.
func (s *Sandbox) Close() error {
	s.closeOnce.Do(func() {
		var errsOut []error
		for i := len(s.cleanup) - 1; i >= 0; i-- {
			if err := s.cleanup[i](); err != nil {
				errsOut = append(errsOut, err)
			}
		}
		s.cleanup = nil
		s.closeErr = errors.Join(errsOut...)
	})
	return s.closeErr
}

// Start creates a sandbox and returns once its process has been exec'd. It
// hands the spec to a pre-started init from the pool when one is ready, and
// forks a new init otherwise.
func (m *Manager) Start(spec Spec) (*Sandbox, error) {
	if err := spec.validate(); err != nil {
		return nil, err
	}
	if spec.Network != nil && m.net == nil {
		return nil, errs.Invalid("Network", "sandbox networking is not enabled on this host")
	}
	msg, err := json.Marshal(initSpec{Argv: spec.Argv, Env: spec.Env, EphemeralMB: spec.EphemeralMB})
	if err != nil {
		return nil, err
	}
	if len(msg) > maxMsg {
		return nil, errs.Invalid("Env", "argv and environment take %d bytes, more than %d", len(msg), maxMsg)
	}
	if err := m.register(spec.ID); err != nil {
		return nil, err
	}
	defer m.starts.Done()
	s, err := m.start(spec, msg)
	if err != nil {
		m.unregister(spec.ID)
		return nil, fmt.Errorf("starting sandbox %s: %w", spec.ID, err)
	}
	return s, nil
}

// start hands spec (msg is its initSpec) to a pre-started init, or to a
// new one when the pool has none.
func (m *Manager) start(spec Spec, msg []byte) (*Sandbox, error) {
	defer m.inits.kick()
	kind := kindPlain
	if spec.Network != nil {
		kind = kindVeth
	}
	for {
		s := m.inits.take(kind)
		if s == nil {
			break
		}
		err := m.prepareNet(s, &spec)
		if err == nil {
			err = m.claim(s, spec, msg, true)
		}
		if err == nil {
			m.inits.hits.Add(1)
			return m.adopt(s, spec.ID), nil
		}
		cerr := s.Close()
		if !errors.Is(err, errStale) {
			m.inits.hits.Add(1)
			return nil, errors.Join(err, cerr)
		}
		m.log.Warn("discarding a pre-started jail init", "err", err)
	}
	m.inits.misses.Add(1)
	s, err := m.spawn(spec.ID, cgroup.Resources{MemoryMB: spec.MemoryMB, PidsMax: spec.PidsMax}, spec.ListenAddr, nil)
	if err != nil {
		return nil, err
	}
	err = m.prepareNet(s, &spec)
	if err == nil {
		err = m.claim(s, spec, msg, false)
	}
	if err != nil {
		return nil, errors.Join(err, s.Close())
	}
	return m.adopt(s, spec.ID), nil
}

// adopt makes s the live sandbox id. Its ID is released last when it
// closes, after everything else it holds.
func (m *Manager) adopt(s *Sandbox, id string) *Sandbox {
	s.id = id
	s.cleanup = append([]func() error{func() error { m.unregister(id); return nil }}, s.cleanup...)
	m.mu.Lock()
	defer m.mu.Unlock()
	m.live[id] = s
	return s
}

// spawn forks a jail init into fresh user, pid, mount, uts and ipc
// namespaces and a network namespace from the pool, in the cgroup cgName
// (made with r), with a listener on lnAddr (if set) created inside that
// network namespace. It returns once the init has built its root and waits
// for its spec. Closing abort (may be nil) cancels the wait.
func (m *Manager) spawn(cgName string, r cgroup.Resources, lnAddr string, abort <-chan struct{}) (*Sandbox, error) {
	s := &Sandbox{m: m, done: make(chan struct{}), lnAddr: lnAddr}
	slot := m.acquireSlot()
	s.cleanup = append(s.cleanup, func() error { m.releaseSlot(slot); return nil })
	if err := m.fork(s, cgName, r, slot, abort); err != nil {
		return nil, errors.Join(err, s.Close())
	}
	return s, nil
}

func (m *Manager) fork(s *Sandbox, cgName string, r cgroup.Resources, slot int, abort <-chan struct{}) error {
	ns, err := m.netPool.Get()
	if err != nil {
		return err
	}
	s.ns = ns
	s.cleanup = append(s.cleanup, ns.Close)

	cg, err := m.cg.Create(cgName, r)
	if err != nil {
		return err
	}
	s.cg = cg
	s.cleanup = append(s.cleanup, cg.Remove)

	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	child := os.NewFile(uintptr(pair[1]), "jail-ctl")
	defer child.Close()
	parent := os.NewFile(uintptr(pair[0]), "jail-ctl")
	conn, err := net.FileConn(parent)
	parent.Close()
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	s.ctl = conn.(*net.UnixConn)
	s.cleanup = append(s.cleanup, func() error {
		if err := s.ctl.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			return err
		}
		return nil
	})
	cgfd, err := cg.CloneFD()
	if err != nil {
		return err
	}
	if cgfd >= 0 {
		defer unix.Close(cgfd)
	}

	rootUID, userUID := int(m.cfg.UIDBase)+2*slot, int(m.cfg.UIDBase)+2*slot+1
	attr := &os.ProcAttr{
		Dir:   "/",
		Env:   []string{"GOMAXPROCS=1", "GOGC=off"},
		Files: []*os.File{m.devnull, m.devnull, m.devnull, child},
		Sys: &syscall.SysProcAttr{
			Cloneflags: syscall.CLONE_NEWUSER | syscall.CLONE_NEWNS | syscall.CLONE_NEWPID |
				syscall.CLONE_NEWUTS | syscall.CLONE_NEWIPC,
			UidMappings: []syscall.SysProcIDMap{
				{ContainerID: 0, HostID: rootUID, Size: 1},
				{ContainerID: SandboxUID, HostID: userUID, Size: 1},
			},
			GidMappings: []syscall.SysProcIDMap{
				{ContainerID: 0, HostID: rootUID, Size: 1},
				{ContainerID: SandboxUID, HostID: userUID, Size: 1},
			},
			GidMappingsEnableSetgroups: true,
			// Become the namespace's root (host uid rootUID): the host root
			// the child starts as is not mapped in it.
			Credential:  &syscall.Credential{Uid: 0, Gid: 0},
			Pdeathsig:   syscall.SIGKILL,
			UseCgroupFD: cgfd >= 0,
			CgroupFD:    cgfd,
		},
	}
	var proc *os.Process
	err = m.thread.Run(ns, func() error {
		if lnAddr := s.lnAddr; lnAddr != "" {
			ln, err := net.Listen("tcp", lnAddr)
			if err != nil {
				return fmt.Errorf("listening on %s in the sandbox: %w", lnAddr, err)
			}
			s.ln = ln
		}
		var err error
		proc, err = os.StartProcess("/proc/self/exe", []string{initArg0}, attr)
		return err
	})
	s.cleanup = append(s.cleanup, s.closeListener)
	if err != nil {
		return fmt.Errorf("forking jail init: %w", err)
	}
	s.proc = proc
	go s.wait()
	s.cleanup = append(s.cleanup, func() error {
		err := s.Kill()
		<-s.done
		return err
	})
	child.Close()

	if cgfd < 0 {
		if err := cg.Add(proc.Pid); err != nil {
			return err
		}
	}
	b, err := json.Marshal(initSetup{Root: m.rootDir, Host: m.host, Hostname: Hostname, UID: SandboxUID, Seccomp: m.seccomp})
	if err != nil {
		return err
	}
	if _, err := s.ctl.Write(b); err != nil {
		return fmt.Errorf("sending setup to jail init: %w", err)
	}
	if abort != nil {
		stop := make(chan struct{})
		defer close(stop)
		go func() {
			select {
			case <-abort:
				s.ctl.SetReadDeadline(time.Unix(1, 0))
			case <-stop:
			}
		}()
	}
	s.ctl.SetReadDeadline(time.Now().Add(setupTimeout))
	msg, err := readCtl(s.ctl)
	s.ctl.SetReadDeadline(time.Time{})
	switch {
	case err == io.EOF:
		return errors.New("jail init exited during setup")
	case err != nil:
		return fmt.Errorf("waiting for jail init: %w", err)
	case msg != msgReady:
		return errors.New(msg)
	}
	return nil
}

// setupTimeout bounds the wait for an init to build its root (normally a
// few milliseconds).
const setupTimeout = 30 * time.Second

// errStale marks a pre-started init that can no longer be used (it died
// while waiting): Start discards it and takes another.
var errStale = errors.New("pre-started jail init is gone")

// claim hands spec (msg is its initSpec) to the init s is waiting with
// and returns once the function's process has been exec'd. limits applies
// spec's cgroup limits first (a pre-started init's group has none yet).
func (m *Manager) claim(s *Sandbox, spec Spec, msg []byte, limits bool) error {
	select {
	case <-s.done:
		return fmt.Errorf("%w (%v)", errStale, s.exit)
	default:
	}
	code, err := openCodeTree(spec.CodeDir)
	if err != nil {
		return err
	}
	defer code.Close()
	if limits {
		if err := s.cg.Update(cgroup.Resources{MemoryMB: spec.MemoryMB, PidsMax: spec.PidsMax}); err != nil {
			return err
		}
	}
	if spec.ListenAddr != s.lnAddr {
		if err := s.closeListener(); err != nil {
			return err
		}
		s.ln, s.lnAddr = nil, spec.ListenAddr
		if spec.ListenAddr != "" {
			err := m.thread.Run(s.ns, func() error {
				ln, err := net.Listen("tcp", spec.ListenAddr)
				if err != nil {
					return fmt.Errorf("listening on %s in the sandbox: %w", spec.ListenAddr, err)
				}
				s.ln = ln
				return nil
			})
			if err != nil {
				return err
			}
		}
	}
	stdout, stderr := orDevNull(spec.Stdout, m.devnull), orDevNull(spec.Stderr, m.devnull)
	// Fd puts the files in blocking mode, as the process expects them.
	rights := unix.UnixRights(int(code.Fd()), int(stdout.Fd()), int(stderr.Fd()))
	_, _, err = s.ctl.WriteMsgUnix(msg, rights, nil)
	runtime.KeepAlive(stdout)
	runtime.KeepAlive(stderr)
	if err != nil {
		return fmt.Errorf("%w: sending spec: %w", errStale, err)
	}
	code.Close()
	// The control socket closes on exec (close-on-exec) or carries the
	// init's error.
	status, err := readCtl(s.ctl)
	s.ctl.Close()
	switch {
	case err == io.EOF:
		return nil
	case err != nil:
		return fmt.Errorf("reading jail init status: %w", err)
	}
	return errors.New(status)
}

// readCtl reads one message from an init's control socket; io.EOF when
// the init closed it.
func readCtl(c *net.UnixConn) (string, error) {
	buf := make([]byte, 4096)
	n, err := c.Read(buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

// closeListener closes the listener (if any); closing it again is
// success.
func (s *Sandbox) closeListener() error {
	if s.ln == nil {
		return nil
	}
	if err := s.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		return err
	}
	return nil
}

func orDevNull(f, devnull *os.File) *os.File {
	if f == nil {
		return devnull
	}
	return f
}

// wait reaps the process and records how it ended.
func (s *Sandbox) wait() {
	st, err := s.proc.Wait()
	info := ExitInfo{Code: -1}
	if err == nil {
		if ws, ok := st.Sys().(syscall.WaitStatus); ok {
			switch {
			case ws.Signaled():
				info.Signal = ws.Signal()
			case ws.Exited():
				info.Code = ws.ExitStatus()
			}
		}
	} else {
		s.m.log.Error("waiting for sandbox", "pid", s.proc.Pid, "err", err)
	}
	if n, err := s.cg.OOMKills(); err == nil && n > 0 {
		info.OOMKilled = true
	}
	s.peakExit, _ = s.cg.PeakMemory()
	s.exit = info
	close(s.done)
}

// openCodeTree makes a detached read-only copy of the code directory's
// mount, which the init (without access to the host path) attaches at
// /var/task.
func openCodeTree(dir string) (*os.File, error) {
	fd, err := unix.OpenTree(unix.AT_FDCWD, dir, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC|unix.AT_RECURSIVE)
	if err != nil {
		return nil, fmt.Errorf("opening code dir %s: %w", dir, err)
	}
	attr := unix.MountAttr{Attr_set: unix.MOUNT_ATTR_RDONLY | unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV}
	if err := unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH|unix.AT_RECURSIVE, &attr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("making code dir read-only: %w", err)
	}
	return os.NewFile(uintptr(fd), "code"), nil
}
