package jail

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"regexp"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"skiff.dev/skiff/internal/cgroup"
	"skiff.dev/skiff/internal/errs"
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

// Sandbox is one running (or ended) jailed process.
type Sandbox struct {
	id   string
	m    *Manager
	proc *os.Process
	cg   cgroup.Group
	ln   net.Listener
	done chan struct{}

	exit     ExitInfo // set before done is closed
	peakExit int64    // peak memory read at exit; set before done is closed

	cleanup   []func() error // LIFO; owned by Start, then by Close
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
		return fmt.Errorf("killing sandbox %s: %w", s.id, err)
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

// initSpec is what the jail init receives over its spec pipe.
type initSpec struct {
	Root        string
	Host        hostLayout
	Hostname    string
	Argv, Env   []string
	EphemeralMB int
	UID         int
	Seccomp     []unix.SockFilter
}

// Start creates a sandbox and returns once its process has been exec'd.
func (m *Manager) Start(spec Spec) (*Sandbox, error) {
	if err := spec.validate(); err != nil {
		return nil, err
	}
	s := &Sandbox{id: spec.ID, m: m, done: make(chan struct{})}
	slot, err := m.acquire(spec.ID, s)
	if err != nil {
		return nil, err
	}
	s.cleanup = append(s.cleanup, func() error { m.release(spec.ID, slot); return nil })
	if err := m.start(s, spec, slot); err != nil {
		return nil, errors.Join(fmt.Errorf("starting sandbox %s: %w", spec.ID, err), s.Close())
	}
	return s, nil
}

func (m *Manager) start(s *Sandbox, spec Spec, slot int) error {
	ns, err := m.pool.Get()
	if err != nil {
		return err
	}
	s.cleanup = append(s.cleanup, ns.Close)

	cg, err := m.cg.Create(spec.ID, cgroup.Resources{MemoryMB: spec.MemoryMB, PidsMax: spec.PidsMax})
	if err != nil {
		return err
	}
	s.cg = cg
	s.cleanup = append(s.cleanup, cg.Remove)

	code, err := openCodeTree(spec.CodeDir)
	if err != nil {
		return err
	}
	defer code.Close()
	specR, specW, err := os.Pipe()
	if err != nil {
		return err
	}
	defer specW.Close()
	defer specR.Close()
	statusR, statusW, err := os.Pipe()
	if err != nil {
		return err
	}
	defer statusR.Close()
	defer statusW.Close()
	cgfd, err := cg.CloneFD()
	if err != nil {
		return err
	}
	if cgfd >= 0 {
		defer unix.Close(cgfd)
	}

	stdout, stderr := orDevNull(spec.Stdout, m.devnull), orDevNull(spec.Stderr, m.devnull)
	rootUID, userUID := int(m.cfg.UIDBase)+2*slot, int(m.cfg.UIDBase)+2*slot+1
	attr := &os.ProcAttr{
		Dir:   "/",
		Env:   []string{"GOMAXPROCS=1", "GOGC=off"},
		Files: []*os.File{m.devnull, stdout, stderr, specR, statusW, code},
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
		if spec.ListenAddr != "" {
			ln, err := net.Listen("tcp", spec.ListenAddr)
			if err != nil {
				return fmt.Errorf("listening on %s in the sandbox: %w", spec.ListenAddr, err)
			}
			s.ln = ln
		}
		var err error
		proc, err = os.StartProcess("/proc/self/exe", []string{initArg0}, attr)
		return err
	})
	if s.ln != nil {
		s.cleanup = append(s.cleanup, func() error {
			if err := s.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
				return err
			}
			return nil
		})
	}
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
	specR.Close()
	statusW.Close()
	code.Close()

	if cgfd < 0 {
		if err := cg.Add(proc.Pid); err != nil {
			return err
		}
	}
	b, err := json.Marshal(initSpec{
		Root: m.rootDir, Host: m.host, Hostname: Hostname,
		Argv: spec.Argv, Env: spec.Env, EphemeralMB: spec.EphemeralMB, UID: SandboxUID, Seccomp: m.seccomp,
	})
	if err != nil {
		return err
	}
	if _, err := specW.Write(b); err != nil {
		return fmt.Errorf("sending spec to jail init: %w", err)
	}
	specW.Close()
	// The status pipe closes on exec (close-on-exec) or carries the init's
	// error.
	msg, err := io.ReadAll(statusR)
	if err != nil {
		return fmt.Errorf("reading jail init status: %w", err)
	}
	if len(msg) > 0 {
		return errors.New(string(msg))
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
		s.m.log.Error("waiting for sandbox", "id", s.id, "err", err)
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
