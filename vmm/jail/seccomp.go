package jail

import (
	"fmt"
	"unsafe"

	seccomp "github.com/elastic/go-seccomp-bpf"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// deniedSyscalls fail with EPERM inside a jail: mounting and namespace
// changes, kernel modules and kexec, tracing and cross-process memory
// access, the kernel keyring, BPF and perf, clock changes, raw I/O ports,
// and the rarely needed, often exploited interfaces (userfaultfd, io_uring,
// file handles). Nested user namespaces are refused separately (the init
// sets the jail's max_user_namespaces to 0).
var deniedSyscalls = []string{
	"mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig",
	"fsmount", "fspick", "mount_setattr",
	"swapon", "swapoff", "reboot", "kexec_load", "kexec_file_load",
	"init_module", "finit_module", "delete_module",
	"bpf", "perf_event_open", "ptrace", "process_vm_readv", "process_vm_writev",
	"keyctl", "add_key", "request_key",
	"setns", "unshare", "userfaultfd", "open_by_handle_at", "name_to_handle_at",
	"acct", "quotactl", "iopl", "ioperm",
	"settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
	"syslog", "vhangup", "lookup_dcookie", "uselib", "ustat", "sysfs",
	"io_uring_setup", "io_uring_enter", "io_uring_register",
	"fanotify_init",
}

// assembleSeccomp compiles the jail's filter once, in the agent, so each
// init only loads it.
func assembleSeccomp() ([]unix.SockFilter, error) {
	policy := seccomp.Policy{
		DefaultAction: seccomp.ActionAllow,
		Syscalls: []seccomp.SyscallGroup{{
			Action: seccomp.ActionErrno,
			Names:  deniedSyscalls,
		}},
	}
	insts, err := policy.Assemble()
	if err != nil {
		return nil, fmt.Errorf("jail: assembling seccomp filter: %w", err)
	}
	raw, err := bpf.Assemble(insts)
	if err != nil {
		return nil, fmt.Errorf("jail: assembling seccomp filter: %w", err)
	}
	out := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		out[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	return out, nil
}

// loadSeccomp sets no_new_privs and installs the filter on the calling
// thread (the one that execs the function; see dropPrivileges).
func loadSeccomp(filter []unix.SockFilter) error {
	if len(filter) == 0 {
		return fmt.Errorf("empty filter")
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	_, _, errno := unix.RawSyscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER,
		0, uintptr(unsafe.Pointer(&prog)))
	if errno != 0 {
		return errno
	}
	return nil
}
