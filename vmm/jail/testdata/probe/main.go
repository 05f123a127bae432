// Command probe runs inside a jail for the jail's tests: it reports what
// the sandbox lets it do, allocates memory, connects to the agent, tries
// network destinations (net) or serves TCP and UDP echo (serve).
package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	switch os.Args[1] {
	case "check":
		check()
	case "alloc":
		mb, _ := strconv.Atoi(os.Args[2])
		var hold [][]byte
		for i := 0; i < mb; i++ {
			b := make([]byte, 1<<20)
			for j := range b {
				b[j] = byte(j)
			}
			hold = append(hold, b)
		}
		fmt.Println("allocated", len(hold))
	case "connect":
		c, err := net.DialTimeout("tcp", os.Args[2], 5*time.Second)
		if err != nil {
			fmt.Println("dial:", err)
			os.Exit(1)
		}
		fmt.Fprintln(c, "ready")
		c.Close()
	case "net":
		netChecks(os.Args[2:])
	case "serve":
		serve(os.Args[2])
	}
}

// checkTimeout bounds each network check: a dropped packet is a timeout.
const checkTimeout = 1500 * time.Millisecond

// netChecks runs checks concurrently and prints "<check>: <result>" for
// each, in order. A check is tcp=ADDR[/N] (send N bytes, default "hello",
// and read the reply), udp=ADDR, ping=IP or ifaces. A result is "ok
// <reply>" or the error.
func netChecks(checks []string) {
	out := make([]string, len(checks))
	var wg sync.WaitGroup
	for i, c := range checks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := netCheck(c)
			if err != nil {
				out[i] = err.Error()
			} else {
				out[i] = "ok " + strings.TrimSpace(r)
			}
		}()
	}
	wg.Wait()
	for i, c := range checks {
		fmt.Printf("%s: %s\n", c, out[i])
	}
}

func netCheck(c string) (string, error) {
	kind, arg, _ := strings.Cut(c, "=")
	switch kind {
	case "tcp":
		addr, n, _ := strings.Cut(arg, "/")
		conn, err := net.DialTimeout("tcp4", addr, checkTimeout)
		if err != nil {
			return "", err
		}
		defer conn.Close()
		payload := []byte("hello")
		if n != "" {
			size, _ := strconv.Atoi(n)
			payload = make([]byte, size)
		} else {
			conn.SetDeadline(time.Now().Add(checkTimeout))
		}
		if _, err := conn.Write(payload); err != nil {
			return "", err
		}
		conn.(*net.TCPConn).CloseWrite()
		b, err := io.ReadAll(conn)
		return string(b), err
	case "udp":
		conn, err := net.Dial("udp4", arg)
		if err != nil {
			return "", err
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(checkTimeout))
		if _, err := conn.Write([]byte("hello")); err != nil {
			return "", err
		}
		b := make([]byte, 512)
		n, err := conn.Read(b)
		return string(b[:n]), err
	case "ping":
		return ping(arg)
	case "ifaces":
		ifs, err := net.Interfaces()
		if err != nil {
			return "", err
		}
		var names []string
		for _, i := range ifs {
			names = append(names, i.Name)
		}
		return strings.Join(names, ","), nil
	}
	return "", fmt.Errorf("unknown check %q", c)
}

// ping sends one ICMP echo over an unprivileged ping socket.
func ping(ip string) (string, error) {
	a := net.ParseIP(ip).To4()
	if a == nil {
		return "", fmt.Errorf("bad address %q", ip)
	}
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, syscall.IPPROTO_ICMP)
	if err != nil {
		return "", fmt.Errorf("ping socket: %w", err)
	}
	defer syscall.Close(fd)
	tv := syscall.NsecToTimeval(checkTimeout.Nanoseconds())
	syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv)
	echo := []byte{8, 0, 0, 0, 0, 0, 0, 1, 'p', 'r', 'o', 'b', 'e'} // the kernel sets id and checksum
	to := &syscall.SockaddrInet4{Addr: [4]byte(a)}
	if err := syscall.Sendto(fd, echo, 0, to); err != nil {
		return "", fmt.Errorf("ping: %w", err)
	}
	buf := make([]byte, 512)
	n, _, err := syscall.Recvfrom(fd, buf, 0)
	if err != nil {
		return "", fmt.Errorf("ping: %w", err)
	}
	if n < 1 || buf[0] != 0 {
		return "", fmt.Errorf("ping: got icmp type %d, want an echo reply", buf[0])
	}
	return "pong", nil
}

// serve echoes TCP and UDP on port until killed.
func serve(port string) {
	ln, err := net.Listen("tcp4", ":"+port)
	if err != nil {
		fmt.Println("listen:", err)
		os.Exit(1)
	}
	pc, err := net.ListenPacket("udp4", ":"+port)
	if err != nil {
		fmt.Println("listen:", err)
		os.Exit(1)
	}
	go func() {
		b := make([]byte, 512)
		for {
			n, from, err := pc.ReadFrom(b)
			if err != nil {
				return
			}
			pc.WriteTo(b[:n], from)
		}
	}()
	fmt.Println("listening")
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			io.Copy(c, c)
		}()
	}
}

func errStr(err error) string {
	if err == nil {
		return "ok"
	}
	return err.Error()
}

func check() {
	fmt.Println("mount=" + errStr(syscall.Mount("tmpfs", "/tmp", "tmpfs", 0, "")))
	fmt.Println("unshare=" + errStr(syscall.Unshare(syscall.CLONE_NEWNS)))
	fmt.Println("setns=" + errStr(func() error { _, _, e := syscall.Syscall(308, 0, 0, 0); return e }()))
	_, _, e := syscall.RawSyscall(syscall.SYS_PTRACE, 0, 1, 0)
	fmt.Println("ptrace=" + errStr(e))
	// A nested user namespace would hand back capabilities.
	pid, _, e := syscall.RawSyscall(syscall.SYS_CLONE, syscall.CLONE_NEWUSER|uintptr(syscall.SIGCHLD), 0, 0)
	if e == 0 && pid == 0 {
		os.Exit(0)
	}
	fmt.Println("userns=" + errStr(e))
	fmt.Println("chown=" + errStr(syscall.Chown("/tmp", 0, 0)))
	c, err := net.DialTimeout("tcp", os.Getenv("PROBE_ADDR"), 5*time.Second)
	if err != nil {
		fmt.Println("listener=" + errStr(err))
		return
	}
	fmt.Fprintln(c, "ping")
	line, err := bufio.NewReader(c).ReadString('\n')
	c.Close()
	fmt.Printf("listener=%q %s\n", line, errStr(err))
}
