// Command probe runs inside a jail for the jail's tests: it reports what
// the sandbox lets it do, allocates memory, or connects to the agent.
package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"strconv"
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
