package jail

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// initArg0 marks the re-exec'd agent binary as a jail init.
const initArg0 = "skiff-jail-init"

// fdCtl is the init's end of its control socket (SOCK_SEQPACKET), its only
// inherited descriptor besides /dev/null on 0-2. The conversation:
//
//	agent → init  initSetup (once the init is in its cgroup)
//	init → agent  msgReady  (root built and pivoted into)
//	agent → init  initSpec, with SCM_RIGHTS [code mount, stdout, stderr]
//	init → agent  nothing: exec closes the socket (close-on-exec)
//
// Any failure is sent as one message "jail init: <step>: <error>" before
// the init exits. An init that reads end-of-file instead of a spec (the
// agent released it unused) exits quietly.
const fdCtl = 3

const (
	msgReady = "ready"
	// maxMsg bounds one control message; the agent refuses larger specs.
	maxMsg = 256 << 10
	// specFDs are the descriptors sent with initSpec.
	specFDs = 3
)

// initSetup is what a jail init needs before it knows its sandbox.
type initSetup struct {
	Root     string
	Host     hostLayout
	Hostname string
	UID      int
	Seccomp  []unix.SockFilter
}

// initSpec is the sandbox a (pre-started) init is handed.
type initSpec struct {
	Argv, Env   []string
	EphemeralMB int
}

// errReleased reports an init released unused by the agent.
var errReleased = errors.New("released")

// IsInit reports whether this process is a jail init. The agent's main and
// test binaries' TestMain call it first:
//
//	if jail.IsInit() { jail.InitMain() }
func IsInit() bool { return len(os.Args) > 0 && os.Args[0] == initArg0 }

// InitMain runs the jail init: it sets up the sandbox and execs the
// function's process. It never returns; a failure is reported to the agent
// over the control socket and the init exits.
func InitMain() {
	runtime.LockOSThread() // credentials, capabilities and seccomp are per thread: exec from this one
	step, err := initMain()
	if errors.Is(err, errReleased) {
		os.Exit(0)
	}
	msg := fmt.Sprintf("jail init: %s: %v", step, err)
	_, _ = unix.Write(fdCtl, []byte(msg))
	fmt.Fprintln(os.Stderr, msg)
	os.Exit(126)
}

func initMain() (string, error) {
	if _, err := unix.FcntlInt(fdCtl, unix.F_SETFD, unix.FD_CLOEXEC); err != nil {
		return "control fd", err
	}
	// Everything that does not depend on the sandbox happens first: a
	// pre-started init does it while it waits in the agent's pool.
	var setup initSetup
	if _, err := recvMsg(&setup, 0); err != nil {
		return "reading setup", err
	}
	if step, err := buildRoot(&setup); err != nil {
		return step, err
	}
	if err := unix.Sethostname([]byte(setup.Hostname)); err != nil {
		return "sethostname", err
	}
	if _, err := unix.Write(fdCtl, []byte(msgReady)); err != nil {
		return "reporting ready", err
	}

	var spec initSpec
	fds, err := recvMsg(&spec, specFDs)
	if err != nil {
		return "reading spec", err
	}
	if len(spec.Argv) == 0 {
		return "reading spec", fmt.Errorf("empty argv")
	}
	if step, err := finishRoot(&spec, fds[0]); err != nil {
		return step, err
	}
	// The sandbox's stdout and stderr; from here on the init's own error
	// messages land there too.
	for i, fd := range fds[1:] {
		if err := unix.Dup2(fd, 1+i); err != nil {
			return "installing stdout/stderr", err
		}
	}
	for _, fd := range fds[1:] {
		if fd > 2 {
			unix.Close(fd)
		}
	}
	if step, err := dropPrivileges(setup.UID, setup.Seccomp); err != nil {
		return step, err
	}
	if err := unix.Chdir("/var/task"); err != nil {
		return "chdir /var/task", err
	}
	argv0 := spec.Argv[0]
	// ETXTBSY: the agent unpacked the code a moment ago and a process it
	// forked in between (another sandbox's init, before its own exec)
	// still holds the write descriptor; it goes with that exec, within
	// milliseconds (golang/go#22315). Retry briefly.
	for range execBusyRetries {
		if err = syscall.Exec(argv0, spec.Argv, spec.Env); err != syscall.ETXTBSY {
			break
		}
		time.Sleep(time.Millisecond)
	}
	return "exec " + argv0, err
}

// execBusyRetries bounds the exec retries on ETXTBSY (about 200 ms).
const execBusyRetries = 200

// recvMsg reads one JSON control message into v with exactly nfds
// descriptors attached (received close-on-exec). End of file is
// errReleased.
func recvMsg(v any, nfds int) ([]int, error) {
	buf := make([]byte, maxMsg)
	oob := make([]byte, unix.CmsgSpace(4*max(nfds, 1)))
	var n, oobn, flags int
	var err error
	for {
		n, oobn, flags, _, err = unix.Recvmsg(fdCtl, buf, oob, unix.MSG_CMSG_CLOEXEC)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		return nil, err
	}
	var fds []int
	if oobn > 0 {
		cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return nil, fmt.Errorf("parsing control message: %w", err)
		}
		for _, c := range cmsgs {
			got, err := unix.ParseUnixRights(&c)
			if err != nil {
				return nil, fmt.Errorf("parsing descriptors: %w", err)
			}
			fds = append(fds, got...)
		}
	}
	closeAll := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	switch {
	case n == 0 && oobn == 0:
		return nil, errReleased
	case flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0:
		closeAll()
		return nil, fmt.Errorf("message truncated")
	case len(fds) != nfds:
		closeAll()
		return nil, fmt.Errorf("got %d descriptors, want %d", len(fds), nfds)
	}
	if err := json.Unmarshal(buf[:n], v); err != nil {
		closeAll()
		return nil, err
	}
	return fds, nil
}

// buildRoot makes the sandbox's root file system on a tmpfs, pivots into
// it and makes it read-only. Only /var/task and /tmp are left for
// finishRoot: their mount points exist.
func buildRoot(setup *initSetup) (string, error) {
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return "making mounts private", err
	}
	root := setup.Root
	if err := unix.Mount("tmpfs", root, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "size=1m,nr_inodes=4096,mode=0755"); err != nil {
		return "mounting root tmpfs", err
	}
	at := func(p string) string { return filepath.Join(root, p) }
	for _, b := range setup.Host.Binds {
		if err := os.MkdirAll(at(b.Path), 0o755); err != nil {
			return "mkdir " + b.Path, err
		}
		if err := bindRO(b.Path, at(b.Path), b.Flags, true); err != nil {
			return "bind " + b.Path, err
		}
	}
	for p, target := range setup.Host.Symlinks {
		if err := os.MkdirAll(filepath.Dir(at(p)), 0o755); err != nil {
			return "mkdir " + filepath.Dir(p), err
		}
		if err := unix.Symlink(target, at(p)); err != nil {
			return "symlink " + p, err
		}
	}
	if err := os.MkdirAll(at("var/task"), 0o755); err != nil {
		return "mkdir /var/task", err
	}
	for _, d := range []string{"tmp", "dev", "proc", "etc", "opt"} {
		if err := unix.Mkdir(at(d), 0o755); err != nil && err != unix.EEXIST {
			return "mkdir /" + d, err
		}
	}
	if step, err := buildDev(at("dev")); err != nil {
		return step, err
	}
	if err := unix.Mount("proc", at("proc"), "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return "mounting /proc", err
	}
	if err := writeEtc(at("etc"), setup); err != nil {
		return "writing /etc", err
	}

	if err := unix.Chdir(root); err != nil {
		return "chdir new root", err
	}
	if err := unix.PivotRoot(".", "."); err != nil {
		return "pivot_root", err
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return "detaching old root", err
	}
	if err := unix.Chdir("/"); err != nil {
		return "chdir /", err
	}
	if err := unix.Mount("", "/", "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		return "making root read-only", err
	}
	// No nested user namespaces: they would hand the function a fresh set
	// of capabilities (and the kernel attack surface behind them).
	if err := os.WriteFile("/proc/sys/user/max_user_namespaces", []byte("0"), 0); err != nil {
		return "limiting user namespaces", err
	}
	return "", nil
}

// finishRoot mounts what depends on the sandbox: its code, read-only at
// /var/task (the agent made the detached mount code read-only, nosuid and
// nodev), and /tmp sized by its ephemeral storage.
func finishRoot(spec *initSpec, code int) (string, error) {
	if err := unix.MoveMount(code, "", unix.AT_FDCWD, "/var/task", unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return "attaching /var/task", err
	}
	unix.Close(code)
	if err := unix.Mount("tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV,
		fmt.Sprintf("size=%dm,mode=1777", spec.EphemeralMB)); err != nil {
		return "mounting /tmp", err
	}
	return "", nil
}

func bindRO(src, dst string, locked uintptr, rec bool) error {
	flags := uintptr(unix.MS_BIND)
	if rec {
		flags |= unix.MS_REC
	}
	if err := unix.Mount(src, dst, "", flags, ""); err != nil {
		return err
	}
	return unix.Mount("", dst, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|locked, "")
}

// buildDev makes a minimal /dev: the harmless character devices bound from
// the host, /dev/shm and the usual symlinks.
func buildDev(dev string) (string, error) {
	if err := unix.Mount("tmpfs", dev, "tmpfs", unix.MS_NOSUID|unix.MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755"); err != nil {
		return "mounting /dev", err
	}
	for _, name := range []string{"null", "zero", "full", "random", "urandom", "tty"} {
		p := filepath.Join(dev, name)
		fd, err := unix.Open(p, unix.O_CREAT|unix.O_WRONLY|unix.O_CLOEXEC, 0o666)
		if err != nil {
			return "creating /dev/" + name, err
		}
		unix.Close(fd)
		if err := unix.Mount("/dev/"+name, p, "", unix.MS_BIND, ""); err != nil {
			return "binding /dev/" + name, err
		}
	}
	if err := unix.Mkdir(filepath.Join(dev, "shm"), 0o1777); err != nil {
		return "mkdir /dev/shm", err
	}
	if err := unix.Mount("tmpfs", filepath.Join(dev, "shm"), "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "size=64m,mode=1777"); err != nil {
		return "mounting /dev/shm", err
	}
	for name, target := range map[string]string{
		"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2",
	} {
		if err := unix.Symlink(target, filepath.Join(dev, name)); err != nil {
			return "symlink /dev/" + name, err
		}
	}
	return "", nil
}

func writeEtc(etc string, spec *initSetup) error {
	u := spec.UID
	files := map[string]string{
		"passwd":        fmt.Sprintf("root:x:0:0:root:/root:/sbin/nologin\nsbx_user1051:x:%d:%d::/tmp:/sbin/nologin\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n", u, u),
		"group":         fmt.Sprintf("root:x:0:\nsbx_user1051:x:%d:\nnobody:x:65534:\n", u),
		"hosts":         "127.0.0.1\tlocalhost " + spec.Hostname + "\n::1\tlocalhost ip6-localhost ip6-loopback\n",
		"hostname":      spec.Hostname + "\n",
		"resolv.conf":   spec.Host.ResolvConf,
		"nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(etc, name), []byte(content), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// dropPrivileges leaves the init's thread with uid/gid u, no capabilities
// (bounding and ambient sets cleared), no_new_privs and the seccomp filter,
// and re-arms the parent-death signal that the credential change cleared.
//
// It changes only the calling thread, the one InitMain locked and that
// execs the function: execve ends the Go runtime's other threads before
// the new program runs, and the program inherits this thread's
// credentials, capability sets, no_new_privs and seccomp filter. (Changing
// every thread, as syscall.Setresuid does, stops the world and signals
// each thread: a millisecond or more on a busy host.)
func dropPrivileges(u int, filter []unix.SockFilter) (string, error) {
	for c := 0; ; c++ {
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil {
			if err == unix.EINVAL && c > 0 {
				break
			}
			return "dropping bounding capabilities", err
		}
	}
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil {
		return "clearing ambient capabilities", err
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETGROUPS, 0, 0, 0); e != 0 {
		return "setgroups", e
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESGID, uintptr(u), uintptr(u), uintptr(u)); e != 0 {
		return "setresgid", e
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, uintptr(u), uintptr(u), uintptr(u)); e != 0 {
		return "setresuid", e
	}
	if err := unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(unix.SIGKILL), 0, 0, 0); err != nil {
		return "pdeathsig", err
	}
	// The agent may have died before the signal was re-armed: its end of
	// the control socket is then closed.
	pfd := []unix.PollFd{{Fd: fdCtl, Events: unix.POLLIN}}
	if _, err := unix.Poll(pfd, 0); err == nil && pfd[0].Revents&(unix.POLLHUP|unix.POLLERR) != 0 {
		os.Exit(137)
	}
	if err := loadSeccomp(filter); err != nil {
		return "seccomp", err
	}
	return "", nil
}
