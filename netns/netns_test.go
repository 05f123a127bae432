package netns

import (
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"skiff.dev/skiff/internal/testutil"
)

// threadNetns is the inode of the calling thread's network namespace.
func threadNetns(t *testing.T) uint64 {
	var st unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func loopbackIsUp(t *testing.T) bool {
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(s)
	ifr, _ := unix.NewIfreq("lo")
	if err := unix.IoctlIfreq(s, unix.SIOCGIFFLAGS, ifr); err != nil {
		t.Fatal(err)
	}
	return ifr.Uint16()&unix.IFF_UP != 0
}

func TestPoolHandsOutDistinctNamespacesWithLoopbackUp(t *testing.T) {
	testutil.RequirePrivileged(t)
	p, err := NewPool(PoolConfig{Size: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	th, err := NewThread()
	if err != nil {
		t.Fatal(err)
	}
	defer th.Close()

	var host uint64
	if err := th.Run(nil, func() error { host = threadNetns(t); return nil }); err != nil {
		t.Fatal(err)
	}
	seen := map[uint64]bool{host: true}
	for i := range 5 { // more than the pool holds: some are made inline
		ns, err := p.Get()
		if err != nil {
			t.Fatal(err)
		}
		ino, err := ns.Inode()
		if err != nil {
			t.Fatal(err)
		}
		if seen[ino] {
			t.Fatalf("namespace %d: inode %d handed out twice (or is the host's)", i, ino)
		}
		seen[ino] = true
		var inside uint64
		var up bool
		if err := th.Run(ns, func() error { inside, up = threadNetns(t), loopbackIsUp(t); return nil }); err != nil {
			t.Fatal(err)
		}
		if inside != ino {
			t.Errorf("Run: thread in netns %d, want %d", inside, ino)
		}
		if !up {
			t.Errorf("namespace %d: lo is down", i)
		}
		// Back in the host namespace afterwards.
		var after uint64
		th.Run(nil, func() error { after = threadNetns(t); return nil })
		if after != host {
			t.Errorf("after Run: thread in netns %d, want host %d", after, host)
		}
		if err := ns.Close(); err != nil {
			t.Fatal(err)
		}
		if err := ns.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
		if ns.Fd() != -1 {
			t.Errorf("Fd after Close: got %d, want -1", ns.Fd())
		}
	}
}

func TestThreadRunPropagatesErrorsAndRefusesClosedNS(t *testing.T) {
	testutil.RequirePrivileged(t)
	th, err := NewThread()
	if err != nil {
		t.Fatal(err)
	}
	defer th.Close()
	want := errors.New("boom")
	if got := th.Run(nil, func() error { return want }); !errors.Is(got, want) {
		t.Errorf("Run error: got %v, want %v", got, want)
	}
	ns := &NS{fd: -1}
	if err := th.Run(ns, func() error { t.Error("fn ran in a closed namespace"); return nil }); err == nil {
		t.Error("Run in a closed namespace: got no error")
	}
	if err := th.Run(nil, func() error { panic("oops") }); err == nil {
		t.Error("Run with a panicking fn: got no error")
	}
	// Still usable.
	if err := th.Run(nil, func() error { return nil }); err != nil {
		t.Errorf("Run after errors: %v", err)
	}
	th.Close()
	if err := th.Run(nil, func() error { return nil }); err == nil {
		t.Error("Run after Close: got no error")
	}
}

func TestThreadDiscardedWhenSwitchBackFails(t *testing.T) {
	testutil.RequirePrivileged(t)
	th, err := NewThread()
	if err != nil {
		t.Fatal(err)
	}
	defer th.Close()
	var first, second int
	th.Run(nil, func() error { first = unix.Gettid(); return nil })
	// Make the host-namespace handle unusable, as a failure to switch back
	// would: the thread must be discarded, not reused.
	err = th.Run(nil, func() error {
		fd, err := unix.Open(os.DevNull, unix.O_RDONLY, 0)
		if err != nil {
			return err
		}
		hostFd := findHostFd(t)
		unix.Dup2(fd, hostFd) // the handle now names /dev/null: setns fails
		unix.Close(fd)
		return nil
	})
	if !errors.Is(err, errDiscarded) {
		t.Fatalf("Run: got %v, want the thread discarded", err)
	}
	if err := th.Run(nil, func() error { second = unix.Gettid(); return nil }); err != nil {
		t.Fatalf("Run on the replacement thread: %v", err)
	}
	if first == second {
		t.Errorf("replacement runs on the same OS thread %d", first)
	}
}

// findHostFd finds the newest fd naming the host network namespace (the
// thread's handle).
func findHostFd(t *testing.T) int {
	host, _ := os.Readlink("/proc/self/ns/net")
	entries, _ := os.ReadDir("/proc/self/fd")
	best := -1
	for _, e := range entries {
		var n int
		for _, c := range e.Name() {
			n = n*10 + int(c-'0')
		}
		if l, _ := os.Readlink("/proc/self/fd/" + e.Name()); l == host && n > best {
			best = n
		}
	}
	if best < 0 {
		t.Fatal("no host netns fd found")
	}
	return best
}
