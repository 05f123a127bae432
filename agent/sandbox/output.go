package sandbox

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"os"
	"sync"
	"time"
)

// output captures a sandbox's stdout and stderr, which share one pipe as
// Lambda merges them. A reader goroutine drains the pipe into a bounded
// buffer. To attribute output exactly to an invocation, Sync writes a
// per-sandbox marker into the pipe and waits for the reader to reach it:
// the pipe is FIFO, so everything the function wrote before it answered has
// been read when the marker arrives.
type output struct {
	r, w   *os.File
	marker []byte
	max    int
	synced chan struct{}

	mu  sync.Mutex
	buf []byte // guarded by mu: output not yet taken, at most max bytes (the tail)
}

func newOutput(max int) (*output, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	tok := make([]byte, 8)
	_, _ = rand.Read(tok)
	o := &output{
		r: r, w: w, max: max,
		marker: []byte("\x00skiff-sync-" + hex.EncodeToString(tok) + "\x00"),
		synced: make(chan struct{}, 1),
	}
	go o.read()
	return o, nil
}

// writer is the file handed to the sandbox as stdout and stderr.
func (o *output) writer() *os.File { return o.w }

func (o *output) read() {
	chunk := make([]byte, 32<<10)
	for {
		n, err := o.r.Read(chunk)
		if n > 0 {
			o.append(chunk[:n])
		}
		if err != nil {
			_ = o.r.Close()
			return
		}
	}
}

func (o *output) append(p []byte) {
	o.mu.Lock()
	start := len(o.buf) - len(o.marker)
	if start < 0 {
		start = 0
	}
	o.buf = append(o.buf, p...)
	found := false
	for {
		i := bytes.Index(o.buf[start:], o.marker)
		if i < 0 {
			break
		}
		i += start
		o.buf = append(o.buf[:i], o.buf[i+len(o.marker):]...)
		start = i
		found = true
	}
	if over := len(o.buf) - o.max; over > 0 {
		// Keep the tail, but never cut a partial marker at the end.
		o.buf = append(o.buf[:0], o.buf[over:]...)
	}
	o.mu.Unlock()
	if found {
		select {
		case o.synced <- struct{}{}:
		default:
		}
	}
}

// Sync waits until everything written to the pipe before the call has been
// read, or until timeout passes.
func (o *output) Sync(timeout time.Duration) bool {
	select { // drop a stale signal
	case <-o.synced:
	default:
	}
	if _, err := o.w.Write(o.marker); err != nil {
		return false
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-o.synced:
		return true
	case <-t.C:
		return false
	}
}

// Take returns the captured output and resets the buffer.
func (o *output) Take() []byte {
	o.mu.Lock()
	defer o.mu.Unlock()
	b := o.buf
	o.buf = nil
	return b
}

// Close closes the agent's write end; the reader ends once the sandbox's
// copies are closed too.
func (o *output) Close() error { return o.w.Close() }
