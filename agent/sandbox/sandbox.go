package sandbox

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"skiff.dev/skiff/agent/runtimeapi"
	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/ebpf"
)

// Process is an isolated function process; vmm/jail provides the real one.
type Process interface {
	// Listener is the Runtime API listener inside the process's network
	// namespace.
	Listener() net.Listener
	// Done is closed when the process has exited.
	Done() <-chan struct{}
	// ExitReason describes how the process ended ("exit status 2",
	// "signal: killed") and whether the OOM killer ended it. Valid after Done.
	ExitReason() (reason string, oom bool)
	// MaxMemoryBytes is the peak memory of the process's cgroup.
	MaxMemoryBytes() int64
	Kill() error
	// Close kills the process and releases every resource it holds.
	Close() error
}

// LaunchSpec is what a Launcher needs to start a function process.
type LaunchSpec struct {
	ID          string
	CodeDir     string // unpacked code, mounted read-only at /var/task
	Argv, Env   []string
	MemoryMB    int
	EphemeralMB int
	Output      *os.File     // stdout and stderr
	Network     *ebpf.Policy // nil: loopback only (network "none")
}

// Launcher starts isolated processes.
type Launcher interface {
	Launch(spec LaunchSpec) (Process, error)
}

// errExited cancels a sandbox's context when its process ends.
var errExited = errors.New("sandbox process exited")

// Sandbox is one function process with its Runtime API server and log
// capture. It serves one invocation at a time.
type Sandbox struct {
	id       string
	spec     *skiffv1.SandboxSpec
	memoryMB int64
	proc     Process
	rapi     *runtimeapi.Server
	out      *output
	created  time.Time
	network  bool // launched with a network

	ctx    context.Context // canceled with errExited when the process ends
	cancel context.CancelCauseFunc

	closeOnce sync.Once
	closeErr  error

	mu          sync.Mutex
	state       State         // guarded by mu
	lastUsed    time.Time     // guarded by mu
	invocations int64         // guarded by mu
	netLast     ebpf.Counters // guarded by mu: counters at the last read
}

// ID returns the sandbox's id.
func (s *Sandbox) ID() string { return s.id }

// State returns the sandbox's current state.
func (s *Sandbox) State() State {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state
}

// move changes state, refusing transitions the lifecycle does not allow.
func (s *Sandbox) move(to State, now time.Time) (State, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	from := s.state
	if !canMove(from, to) {
		return from, fmt.Errorf("sandbox %s: illegal transition %s -> %s", s.id, from, to)
	}
	s.state = to
	if to == StateIdle || to == StateBusy {
		s.lastUsed = now
	}
	if to == StateBusy {
		s.invocations++
	}
	return from, nil
}

func (s *Sandbox) exited() bool { return s.ctx.Err() != nil }

// close releases everything the sandbox holds; safe to call many times.
func (s *Sandbox) close() error {
	s.closeOnce.Do(func() {
		s.cancel(errExited)
		var errs []error
		if err := s.rapi.Close(); err != nil {
			errs = append(errs, fmt.Errorf("closing runtime api: %w", err))
		}
		if err := s.proc.Close(); err != nil {
			errs = append(errs, fmt.Errorf("closing process: %w", err))
		}
		if err := s.out.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
			errs = append(errs, fmt.Errorf("closing output: %w", err))
		}
		s.closeErr = errors.Join(errs...)
	})
	return s.closeErr
}

// outcome is the result of one invocation on a sandbox.
type outcome struct {
	payload       []byte
	functionError string
	healthy       bool // the sandbox may serve again
	timedOut      bool
	note          string // a platform line for the log, e.g. the timeout message
	undelivered   bool   // the runtime was gone before it took the invocation
}

// invoke runs one invocation. It never returns a Go error for failures of
// the function: those are outcomes with a function error; it returns an
// error only when the caller went away.
func (s *Sandbox) invoke(ctx context.Context, inv runtimeapi.Invocation, timeout time.Duration) (outcome, error) {
	ictx, cancel := context.WithDeadline(ctx, inv.Deadline)
	defer cancel()
	stop := context.AfterFunc(s.ctx, cancel)
	defer stop()

	res, err := s.rapi.Invoke(ictx, inv)
	switch {
	case err == nil || errors.Is(err, runtimeapi.ErrResponseTooLarge):
		o := outcome{payload: res.Payload, healthy: !s.exited()}
		if res.Failed {
			o.functionError = "Unhandled"
		}
		return o, nil
	case s.exited() && errors.Is(err, runtimeapi.ErrNotDelivered):
		// The runtime exited between invocations (aws-lambda-go does after
		// a panic) and never saw this one: the caller runs it elsewhere.
		return outcome{undelivered: true}, nil
	case s.exited():
		return s.exitOutcome(inv.RequestID), nil
	case ctx.Err() != nil:
		_ = s.proc.Kill() // the runtime is mid-invocation: it cannot be reused
		return outcome{}, ctx.Err()
	case errors.Is(ictx.Err(), context.DeadlineExceeded):
		_ = s.proc.Kill()
		msg := fmt.Sprintf("%s %s Task timed out after %.2f seconds",
			time.Now().UTC().Format("2006-01-02T15:04:05.000Z"), inv.RequestID, timeout.Seconds())
		return outcome{
			payload:       jsonError("", msg),
			functionError: "Unhandled",
			timedOut:      true,
			note:          msg,
		}, nil
	}
	_ = s.proc.Kill()
	return outcome{
		payload:       jsonError("Runtime.Unknown", fmt.Sprintf("RequestId: %s Error: %v", inv.RequestID, err)),
		functionError: "Unhandled",
	}, nil
}

// exitOutcome describes a process that ended mid-invocation or mid-init.
func (s *Sandbox) exitOutcome(requestID string) outcome {
	<-s.proc.Done()
	reason, oom := s.proc.ExitReason()
	typ := "Runtime.ExitError"
	if oom {
		typ = "Runtime.OutOfMemory"
	}
	msg := fmt.Sprintf("RequestId: %s Error: Runtime exited with error: %s", requestID, reason)
	return outcome{payload: jsonError(typ, msg), functionError: "Unhandled", note: msg}
}

// jsonError renders Lambda's error payload.
func jsonError(errorType, message string) []byte {
	var b strings.Builder
	b.WriteString(`{"errorMessage":`)
	b.WriteString(quote(message))
	if errorType != "" {
		b.WriteString(`,"errorType":`)
		b.WriteString(quote(errorType))
	}
	b.WriteString("}")
	return []byte(b.String())
}
