package sandbox

import (
	"errors"
	"os"
	"sync"
	"syscall"
)

// output captures a sandbox's stdout and stderr, which share one pipe as
// Lambda merges them. A background goroutine drains the pipe whenever it
// becomes readable, so a chatty function never blocks on a full pipe. To
// attribute output exactly to an invocation, Sync drains the pipe itself,
// without blocking: the function wrote its output before it answered, so
// when the answer has arrived that output is already in the pipe.
type output struct {
	r, w *os.File
	raw  syscall.RawConn
	max  int

	mu     sync.Mutex
	buf    []byte // guarded by mu: output not yet taken, at most max bytes (the tail)
	chunk  []byte // guarded by mu: read buffer
	closed bool   // guarded by mu: the read end is at EOF or closed
}

func newOutput(max int) (*output, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	raw, err := r.SyscallConn()
	if err != nil {
		r.Close()
		w.Close()
		return nil, err
	}
	o := &output{r: r, w: w, raw: raw, max: max, chunk: make([]byte, 32<<10)}
	go o.pump()
	return o, nil
}

// writer is the file handed to the sandbox as stdout and stderr.
func (o *output) writer() *os.File { return o.w }

// pump drains the pipe each time it becomes readable until EOF.
func (o *output) pump() {
	_ = o.raw.Read(func(fd uintptr) bool { return o.drain(int(fd)) })
	_ = o.r.Close()
}

// drain reads what the pipe holds without blocking and reports whether
// the pipe is finished (EOF or an error).
func (o *output) drain(fd int) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return true
	}
	for {
		n, err := syscall.Read(fd, o.chunk)
		if n > 0 {
			o.buf = append(o.buf, o.chunk[:n]...)
			if over := len(o.buf) - o.max; over > 0 {
				o.buf = append(o.buf[:0], o.buf[over:]...)
			}
			continue
		}
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if errors.Is(err, syscall.EAGAIN) {
			return false
		}
		o.closed = true // n == 0: EOF, or a real error
		return true
	}
}

// Sync reads everything already written to the pipe.
func (o *output) Sync() {
	_ = o.raw.Control(func(fd uintptr) { o.drain(int(fd)) })
}

// Take returns the captured output and resets the buffer.
func (o *output) Take() []byte {
	o.mu.Lock()
	defer o.mu.Unlock()
	b := o.buf
	o.buf = nil
	return b
}

// Close closes the agent's write end; the pump ends once the sandbox's
// copies are closed too.
func (o *output) Close() error { return o.w.Close() }
