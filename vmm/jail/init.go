package jail

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"
)

// initArg0 marks the re-exec'd agent binary as a jail init.
const initArg0 = "skiff-jail-init"

// File descriptors the init inherits.
const (
	fdSpec   = 3 // read end of the spec pipe
	fdStatus = 4 // write end of the status pipe (close-on-exec once read)
	fdCode   = 5 // detached read-only mount of the code directory
)

// IsInit reports whether this process is a jail init. The agent's main and
// test binaries' TestMain call it first:
//
//	if jail.IsInit() { jail.InitMain() }
func IsInit() bool { return len(os.Args) > 0 && os.Args[0] == initArg0 }

// InitMain runs the jail init: it sets up the sandbox and execs the
// function's process. It never returns; a failure is reported to the agent
// over the status pipe and the init exits.
func InitMain() {
	runtime.LockOSThread() // credentials, capabilities and seccomp are per thread: exec from this one
	step, err := initMain()
	msg := fmt.Sprintf("jail init: %s: %v", step, err)
	_, _ = unix.Write(fdStatus, []byte(msg))
	fmt.Fprintln(os.Stderr, msg)
	os.Exit(126)
}

func initMain() (string, error) {
	spec, err := readSpec()
	if err != nil {
		return "reading spec", err
	}
	if _, err := unix.FcntlInt(fdStatus, unix.F_SETFD, unix.FD_CLOEXEC); err != nil {
		return "status fd", err
	}
	if step, err := buildRoot(spec); err != nil {
		return step, err
	}
	if err := unix.Sethostname([]byte(spec.Hostname)); err != nil {
		return "sethostname", err
	}
	if step, err := dropPrivileges(spec.UID, spec.Seccomp); err != nil {
		return step, err
	}
	if err := unix.Chdir("/var/task"); err != nil {
		return "chdir /var/task", err
	}
	argv0 := spec.Argv[0]
	err = syscall.Exec(argv0, spec.Argv, spec.Env)
	return "exec " + argv0, err
}

func readSpec() (*initSpec, error) {
	f := os.NewFile(fdSpec, "spec")
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil {
		return nil, err
	}
	var spec initSpec
	if err := json.Unmarshal(b, &spec); err != nil {
		return nil, err
	}
	if len(spec.Argv) == 0 {
		return nil, fmt.Errorf("empty argv")
	}
	return &spec, nil
}

// buildRoot makes the sandbox's root file system on a tmpfs and pivots
// into it.
func buildRoot(spec *initSpec) (string, error) {
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return "making mounts private", err
	}
	root := spec.Root
	if err := unix.Mount("tmpfs", root, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "size=1m,nr_inodes=4096,mode=0755"); err != nil {
		return "mounting root tmpfs", err
	}
	at := func(p string) string { return filepath.Join(root, p) }
	for _, b := range spec.Host.Binds {
		if err := os.MkdirAll(at(b.Path), 0o755); err != nil {
			return "mkdir " + b.Path, err
		}
		if err := bindRO(b.Path, at(b.Path), b.Flags, true); err != nil {
			return "bind " + b.Path, err
		}
	}
	for p, target := range spec.Host.Symlinks {
		if err := os.MkdirAll(filepath.Dir(at(p)), 0o755); err != nil {
			return "mkdir " + filepath.Dir(p), err
		}
		if err := unix.Symlink(target, at(p)); err != nil {
			return "symlink " + p, err
		}
	}
	// Code, read-only at /var/task (the agent made the detached mount
	// read-only, nosuid and nodev).
	if err := os.MkdirAll(at("var/task"), 0o755); err != nil {
		return "mkdir /var/task", err
	}
	if err := unix.MoveMount(fdCode, "", unix.AT_FDCWD, at("var/task"), unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return "attaching /var/task", err
	}
	unix.Close(fdCode)
	for _, d := range []string{"tmp", "dev", "proc", "etc", "opt"} {
		if err := unix.Mkdir(at(d), 0o755); err != nil && err != unix.EEXIST {
			return "mkdir /" + d, err
		}
	}
	if err := unix.Mount("tmpfs", at("tmp"), "tmpfs", unix.MS_NOSUID|unix.MS_NODEV,
		fmt.Sprintf("size=%dm,mode=1777", spec.EphemeralMB)); err != nil {
		return "mounting /tmp", err
	}
	if step, err := buildDev(at("dev")); err != nil {
		return step, err
	}
	if err := unix.Mount("proc", at("proc"), "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return "mounting /proc", err
	}
	if err := writeEtc(at("etc"), spec); err != nil {
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

func writeEtc(etc string, spec *initSpec) error {
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

// dropPrivileges leaves the init with uid/gid u, no capabilities (bounding
// and ambient sets cleared), no_new_privs and the seccomp filter, and
// re-arms the parent-death signal that the credential change cleared.
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
	if err := syscall.Setgroups(nil); err != nil {
		return "setgroups", err
	}
	if err := syscall.Setresgid(u, u, u); err != nil {
		return "setresgid", err
	}
	if err := syscall.Setresuid(u, u, u); err != nil {
		return "setresuid", err
	}
	if err := unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(unix.SIGKILL), 0, 0, 0); err != nil {
		return "pdeathsig", err
	}
	// The agent may have died before the signal was re-armed: its end of
	// the status pipe is then closed.
	pfd := []unix.PollFd{{Fd: fdStatus, Events: unix.POLLOUT}}
	if _, err := unix.Poll(pfd, 0); err == nil && pfd[0].Revents&unix.POLLERR != 0 {
		os.Exit(137)
	}
	if err := loadSeccomp(filter); err != nil {
		return "seccomp", err
	}
	return "", nil
}
