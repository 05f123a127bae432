// Package placement decides where on this host a new sandbox may go: it
// keeps the ledger of memory committed to sandboxes and never lets the
// total exceed the memory configured for them. When the host is full the
// caller may evict idle sandboxes and try again.
package placement

import (
	"fmt"
	"sync"
)

// Ledger accounts memory committed to sandboxes on one host.
type Ledger struct {
	mu        sync.Mutex
	total     int64 // MB, fixed
	committed int64 // MB, guarded by mu
}

// NewLedger returns a ledger for totalMB of sandbox memory.
func NewLedger(totalMB int64) *Ledger { return &Ledger{total: totalMB} }

// Reserve commits mb if it fits and reports whether it did.
func (l *Ledger) Reserve(mb int64) bool {
	if mb <= 0 {
		return true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.committed+mb > l.total {
		return false
	}
	l.committed += mb
	return true
}

// Release returns mb to the ledger. Releasing more than was reserved is a
// bug and panics, since it would let the host overcommit later.
func (l *Ledger) Release(mb int64) {
	if mb <= 0 {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if mb > l.committed {
		panic(fmt.Sprintf("placement: releasing %d MB with only %d MB committed", mb, l.committed))
	}
	l.committed -= mb
}

// Usage reports the committed and total memory in MB.
func (l *Ledger) Usage() (committed, total int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.committed, l.total
}
