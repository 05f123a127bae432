package jail

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"skiff.dev/skiff/internal/cgroup"
)

// poolCPUWeightMB scales the CPU weight of a pre-started init's cgroup
// until it is claimed: the lowest weight there is, so pre-starting inits
// uses the CPU that running sandboxes leave idle.
const poolCPUWeightMB = 1

// initPool keeps jail inits pre-started: forked into their namespaces,
// their cgroup (under a pool name, without limits yet) and listener made,
// their root built and pivoted into, each waiting on its control socket
// for a sandbox. One goroutine refills it, one init at a time, after each
// claim.
type initPool struct {
	m      *Manager
	size   int
	lnAddr string
	prefix string // cgroup names: prefix + sequence number

	kicks        chan struct{} // a claim happened: refill
	seq          atomic.Uint64
	hits, misses atomic.Uint64

	mu      sync.Mutex
	idle    []*Sandbox    // oldest first; guarded by mu
	stop    chan struct{} // closed to stop the refill goroutine; nil when not running; guarded by mu
	stopped chan struct{} // closed when the refill goroutine has returned; guarded by mu
}

func newInitPool(m *Manager, size int, lnAddr string) *initPool {
	return &initPool{
		m: m, size: size, lnAddr: lnAddr,
		// "_" never appears in sandbox IDs, so pool names cannot collide
		// with the cgroups of directly started sandboxes; the pid keeps a
		// crashed run's leftovers from colliding until Reclaim removes them.
		prefix: fmt.Sprintf("init_%d_", os.Getpid()),
		kicks:  make(chan struct{}, 1),
	}
}

// start starts refilling (if the pool is enabled and not running).
func (p *initPool) start() {
	if p.size <= 0 {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stop != nil {
		return
	}
	p.stop, p.stopped = make(chan struct{}), make(chan struct{})
	go p.refill(p.stop, p.stopped)
}

// halt stops refilling, waits for the refill goroutine and releases every
// idle init.
func (p *initPool) halt() error {
	p.mu.Lock()
	stop, stopped := p.stop, p.stopped
	p.stop, p.stopped = nil, nil
	if stop != nil {
		close(stop)
	}
	p.mu.Unlock()
	if stopped != nil {
		<-stopped
	}
	p.mu.Lock()
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	var errsOut []error
	for _, s := range idle {
		errsOut = append(errsOut, s.Close())
	}
	return errors.Join(errsOut...)
}

// take returns the oldest idle init (nil when there is none). The caller
// calls kick once its Start is done.
func (p *initPool) take() *Sandbox {
	if p.size <= 0 {
		return nil
	}
	p.mu.Lock()
	var s *Sandbox
	if len(p.idle) > 0 {
		s = p.idle[0]
		p.idle[0] = nil
		p.idle = p.idle[1:]
	}
	p.mu.Unlock()
	return s
}

// kick asks for a refill. Start calls it when its sandbox's process has
// been exec'd, so that pre-starting the next init (a fork and a re-exec of
// the agent binary) does not compete for CPU with the claim itself.
func (p *initPool) kick() {
	select {
	case p.kicks <- struct{}{}:
	default:
	}
}

func (p *initPool) idleCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.idle)
}

// refill keeps the pool full, one init at a time, until stop is closed.
func (p *initPool) refill(stop, stopped chan struct{}) {
	defer close(stopped)
	backoff := 10 * time.Millisecond
	for {
		if p.idleCount() >= p.size {
			select {
			case <-stop:
				return
			case <-p.kicks:
				continue
			}
		}
		name := p.prefix + fmt.Sprint(p.seq.Add(1))
		s, err := p.m.spawn(name, cgroup.Resources{CPUWeightMB: poolCPUWeightMB}, p.lnAddr, stop)
		if err != nil {
			select {
			case <-stop:
				return
			default:
			}
			p.m.log.Error("pre-starting a jail init", "err", err, "retry_in", backoff)
			select {
			case <-stop:
				return
			case <-time.After(backoff):
				backoff = min(2*backoff, 5*time.Second)
				continue
			}
		}
		backoff = 10 * time.Millisecond
		p.mu.Lock()
		select {
		case <-stop:
			p.mu.Unlock()
			if err := s.Close(); err != nil {
				p.m.log.Error("releasing a pre-started jail init", "err", err)
			}
			return
		default:
		}
		p.idle = append(p.idle, s)
		p.mu.Unlock()
	}
}
