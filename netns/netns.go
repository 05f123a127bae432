// Package netns provides pre-created network namespaces and the locked OS
// thread that enters them.
//
// A namespace is held only by an open file descriptor (no bind mount in
// /run/netns), so it dies with the process that holds it. A Thread is one
// long-lived goroutine locked to its OS thread; work runs on it with the
// thread switched into a namespace and switched back afterwards. A thread
// that cannot be switched back is never unlocked: Go discards it when its
// goroutine exits, and the Thread continues on a fresh one.
package netns

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// NS is a network namespace held by an open file descriptor.
type NS struct {
	mu sync.Mutex
	fd int // guarded by mu; -1 once closed
}

// Fd is the namespace's file descriptor (-1 after Close).
func (n *NS) Fd() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.fd
}

// Close releases the descriptor. It is idempotent.
func (n *NS) Close() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.fd < 0 {
		return nil
	}
	err := unix.Close(n.fd)
	n.fd = -1
	if err != nil {
		return fmt.Errorf("closing netns: %w", err)
	}
	return nil
}

// Inode identifies the namespace (as /proc/<pid>/ns/net shows it).
func (n *NS) Inode() (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(n.Fd(), &st); err != nil {
		return 0, fmt.Errorf("stat netns: %w", err)
	}
	return st.Ino, nil
}

type request struct {
	ns     *NS
	fn     func() error
	result chan error
}

// Thread is one long-lived OS thread, locked, that runs functions inside a
// network namespace. Processes forked from it get a parent-death signal
// tied to it, so it lives as long as the Thread is open.
type Thread struct {
	reqs chan request
	log  *slog.Logger

	closeOnce sync.Once
	done      chan struct{}
	exited    chan struct{} // closed when the worker has stopped for good
}

// errDiscarded reports a thread left in a foreign namespace.
var errDiscarded = errors.New("thread could not return to its own network namespace")

// NewThread starts a locked OS thread in the current (host) namespace.
func NewThread() (*Thread, error) { return newThread(slog.New(slog.DiscardHandler)) }

func newThread(log *slog.Logger) (*Thread, error) {
	t := &Thread{reqs: make(chan request), log: log, done: make(chan struct{}), exited: make(chan struct{})}
	started := make(chan error, 1)
	go t.supervise(started)
	if err := <-started; err != nil {
		return nil, err
	}
	return t, nil
}

// supervise runs workers one after another: a worker whose thread was left
// in a foreign namespace returns, and a fresh one takes over.
func (t *Thread) supervise(started chan<- error) {
	defer close(t.exited)
	for {
		ready := make(chan error, 1)
		stopped := make(chan bool, 1)
		go func() { stopped <- t.work(ready) }()
		err := <-ready
		if started != nil {
			started <- err
			started = nil
		}
		if err != nil {
			return
		}
		if clean := <-stopped; clean {
			return
		}
		t.log.Warn("netns thread discarded: could not switch back to the host namespace; starting a new one")
	}
}

// work is one locked thread's loop. It returns true when the Thread was
// closed, false when the thread had to be discarded.
func (t *Thread) work(ready chan<- error) bool {
	runtime.LockOSThread()
	host, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		runtime.UnlockOSThread()
		ready <- fmt.Errorf("opening host netns: %w", err)
		return true
	}
	ready <- nil
	for {
		select {
		case <-t.done:
			unix.Close(host)
			runtime.UnlockOSThread()
			return true
		case req := <-t.reqs:
			err, ok := runIn(host, req)
			req.result <- err
			if !ok {
				// Stay locked: the goroutine exits and Go ends the thread.
				unix.Close(host)
				return false
			}
		}
	}
}

// runIn runs req on the current thread and always switches back to host.
// ok is false when switching back failed.
func runIn(host int, req request) (err error, ok bool) {
	if req.ns != nil {
		req.ns.mu.Lock()
		fd := req.ns.fd
		var serr error
		if fd < 0 {
			serr = errors.New("netns is closed")
		} else {
			serr = unix.Setns(fd, unix.CLONE_NEWNET)
		}
		req.ns.mu.Unlock()
		if serr != nil {
			return fmt.Errorf("entering netns: %w", serr), true
		}
	}
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("panic on netns thread: %v", p)
		}
		if serr := unix.Setns(host, unix.CLONE_NEWNET); serr != nil {
			err, ok = errors.Join(err, fmt.Errorf("%w: %w", errDiscarded, serr)), false
		}
	}()
	return req.fn(), true
}

// Run executes fn on the thread with the thread switched into ns (nil:
// the host namespace) and switches back afterwards. If switching back
// fails the thread is discarded, and Run returns an error.
func (t *Thread) Run(ns *NS, fn func() error) error {
	req := request{ns: ns, fn: fn, result: make(chan error, 1)}
	select {
	case t.reqs <- req:
	case <-t.exited:
		return errors.New("netns thread is closed")
	}
	return <-req.result
}

// Close stops the thread. Processes forked on it receive their
// parent-death signal.
func (t *Thread) Close() {
	t.closeOnce.Do(func() { close(t.done) })
	<-t.exited
}

// create makes a new network namespace with loopback up, IPv6 disabled
// (so nothing bypasses the IPv4 egress policy of a sandbox veth) and
// unprivileged ICMP echo sockets allowed (ping works through the policy,
// like TCP and UDP). It must run on a Thread (which switches back
// afterwards).
func create() (*NS, error) {
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		return nil, fmt.Errorf("unshare netns: %w", err)
	}
	fd, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening new netns: %w", err)
	}
	if err := loopbackUp(); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if err := sysctls(); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return &NS{fd: fd}, nil
}

// loopbackUp sets IFF_UP on lo in the current thread's namespace.
func loopbackUp() error {
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loopback up: %w", err)
	}
	defer unix.Close(s)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(s, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("loopback flags: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(s, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("loopback up: %w", err)
	}
	return nil
}

// nsSysctls are set in every new namespace; /proc/sys/net belongs to the
// namespace of the thread that opens it.
var nsSysctls = []struct {
	path, value string
	optional    bool // absent when the kernel lacks the feature
}{
	{"/proc/sys/net/ipv6/conf/all/disable_ipv6", "1", true},
	{"/proc/sys/net/ipv6/conf/default/disable_ipv6", "1", true},
	{"/proc/sys/net/ipv4/ping_group_range", "0 2147483647", false},
}

func sysctls() error {
	for _, s := range nsSysctls {
		err := os.WriteFile(s.path, []byte(s.value), 0)
		if err != nil && !(s.optional && errors.Is(err, os.ErrNotExist)) {
			return fmt.Errorf("sysctl %s: %w", s.path, err)
		}
	}
	return nil
}
