package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// freeAddr returns a loopback address with a port that was free a moment ago.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	addr := ln.Addr().String()
	return addr, ln.Close()
}

// findRIE returns the emulator binary: the path given, else the one
// `make bench` installs under bin/tools, else aws-lambda-rie on PATH.
func findRIE(flagPath, repo string) (string, error) {
	if flagPath != "" {
		return flagPath, nil
	}
	p := filepath.Join(repo, "bin", "tools", "aws-lambda-rie")
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	p, err := exec.LookPath("aws-lambda-rie")
	if err != nil {
		return "", errors.New("aws-lambda-rie not found in bin/tools or on PATH: run `make bench`, which installs it")
	}
	return p, nil
}

// emulator is the AWS Lambda Runtime Interface Emulator running the echo
// bootstrap as a child process on loopback, and an HTTP/1.1 keep-alive
// client of it.
type emulator struct {
	dir    string
	pid    int
	url    string
	client *http.Client
	logs   *limitedWriter
	exited chan error
}

// startRIE starts the emulator with a copy of fn's bootstrap and waits
// until it accepts connections. The runtime itself starts on the first
// invoke.
func startRIE(ctx context.Context, rie string, fn *function) (_ *emulator, err error) {
	dir, err := os.MkdirTemp("", "skiff-bench-rie-")
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			_ = os.RemoveAll(dir)
		}
	}()
	bootstrap := filepath.Join(dir, "bootstrap")
	b, err := os.ReadFile(fn.bootstrap)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(bootstrap, b, 0o755); err != nil {
		return nil, err
	}
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	apiAddr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	e := &emulator{dir: dir, logs: &limitedWriter{n: 64 << 10}, exited: make(chan error, 1)}
	cmd := exec.Command(rie,
		"--runtime-interface-emulator-address", addr,
		"--runtime-api-address", apiAddr,
		"--log-level", "error",
		bootstrap)
	cmd.Dir = dir
	cmd.Env = []string{
		"PATH=" + os.Getenv("PATH"),
		"AWS_LAMBDA_FUNCTION_NAME=echo",
		"AWS_LAMBDA_FUNCTION_VERSION=$LATEST",
		"AWS_LAMBDA_FUNCTION_MEMORY_SIZE=128",
		"AWS_LAMBDA_FUNCTION_TIMEOUT=10",
		"AWS_REGION=us-east-1",
		"AWS_DEFAULT_REGION=us-east-1",
	}
	// The function's own output (START/END/REPORT lines per invoke) goes to
	// /dev/null; only the emulator's errors are kept, for a failure message.
	cmd.Stderr = e.logs
	// Dies with this process, should it die first.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting the emulator: %w", err)
	}
	e.pid = cmd.Process.Pid
	go func() { e.exited <- cmd.Wait() }()
	e.url = "http://" + addr + "/2015-03-31/functions/function/invocations"
	e.client = &http.Client{Transport: &http.Transport{
		MaxIdleConnsPerHost: 4,
		DisableCompression:  true,
		IdleConnTimeout:     5 * time.Minute,
	}}

	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return e, nil
		}
		select {
		case werr := <-e.exited:
			e.exited <- werr
			return nil, errors.Join(fmt.Errorf("emulator exited at start (%v): %s", werr, e.logs), e.close())
		case <-ctx.Done():
			return nil, errors.Join(ctx.Err(), e.close())
		case <-time.After(5 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return nil, errors.Join(fmt.Errorf("emulator did not listen on %s within 15s: %s", addr, e.logs), e.close())
		}
	}
}

// invoke sends the echo payload and returns the time from request to the
// whole response, checking it is the echo.
func (e *emulator) invoke(ctx context.Context) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, e.url, bytes.NewReader(echoPayload))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	start := time.Now()
	resp, err := e.client.Do(req)
	if err != nil {
		return 0, fmt.Errorf("emulator invoke: %w (log: %s)", err, e.logs)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	d := time.Since(start)
	if err != nil {
		return 0, err
	}
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("emulator answered %s: %s", resp.Status, body)
	}
	return d, checkEcho(body)
}

// close kills the emulator and the runtime it started, by pid, and
// removes its directory.
func (e *emulator) close() error {
	e.client.CloseIdleConnections()
	// The emulator starts the runtime in a process group of its own: kill
	// the runtime first so the emulator reaps it (an orphan could stay a
	// zombie), then the emulator.
	for _, c := range childrenOf(e.pid) {
		_ = syscall.Kill(c, syscall.SIGKILL)
		waitGone(c, 2*time.Second)
	}
	_ = syscall.Kill(e.pid, syscall.SIGKILL)
	var err error
	select {
	case <-e.exited:
	case <-time.After(10 * time.Second):
		err = fmt.Errorf("emulator (pid %d) did not exit after SIGKILL", e.pid)
	}
	return errors.Join(err, os.RemoveAll(e.dir))
}

// limitedWriter keeps the first n bytes written and drops the rest. It is
// safe to read while a process writes to it.
type limitedWriter struct {
	mu  sync.Mutex
	buf bytes.Buffer // guarded by mu
	n   int          // guarded by mu
}

func (l *limitedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.n > 0 {
		k := min(len(p), l.n)
		l.n -= k
		l.buf.Write(p[:k])
	}
	return len(p), nil
}

func (l *limitedWriter) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// childrenOf returns the pids of the live children of pid, from /proc.
func childrenOf(pid int) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range ents {
		c, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if ppid, ok := parentOf(c); ok && ppid == pid {
			out = append(out, c)
		}
	}
	return out
}

// parentOf reads a process's parent pid from /proc/<pid>/stat; ok is false
// when the process is gone or a zombie.
func parentOf(pid int) (ppid int, ok bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, false
	}
	// pid (comm) state ppid ...; comm may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 2 || f[0] == "Z" {
		return 0, false
	}
	ppid, err = strconv.Atoi(f[1])
	return ppid, err == nil
}

// waitGone waits up to d for pid to exit and be reaped.
func waitGone(pid int, d time.Duration) {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err != nil {
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
}
