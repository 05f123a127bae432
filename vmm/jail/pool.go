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

// initKind says whether a pre-started init has a veth already.
type initKind int

const (
	kindPlain initKind = iota // loopback only
	kindVeth                  // a veth (no policy yet: Start attaches it)
	numKinds
)

// initPool keeps jail inits pre-started: forked into their namespaces,
// their cgroup (under a pool name, without limits yet) and listener made,
// their root built and pivoted into, each waiting on its control socket
// for a sandbox. One goroutine refills it, one init at a time, after each
// claim.
//
// With networking, inits come in two kinds: with a veth (egress, the
// default network, so the veth is off the cold-start path) and without
// (network none: deleting a veth would cost ~30 ms). The pool starts with
// veths only and shifts one slot towards a kind each time a Start finds
// none of it idle, so its mix follows demand.
type initPool struct {
	m      *Manager
	size   int
	lnAddr string
	prefix string // cgroup names: prefix + sequence number

	kicks        chan struct{} // a claim happened: refill
	seq          atomic.Uint64
	hits, misses atomic.Uint64

	mu      sync.Mutex
	idle    [numKinds][]*Sandbox // oldest first; guarded by mu
	want    [numKinds]int        // target idle count per kind, summing to size; guarded by mu
	stop    chan struct{}        // closed to stop the refill goroutine; nil when not running; guarded by mu
	stopped chan struct{}        // closed when the refill goroutine has returned; guarded by mu
}

func newInitPool(m *Manager, size int, lnAddr string, veths bool) *initPool {
	p := &initPool{
		m: m, size: size, lnAddr: lnAddr,
		// "_" never appears in sandbox IDs, so pool names cannot collide
		// with the cgroups of directly started sandboxes; the pid keeps a
		// crashed run's leftovers from colliding until Reclaim removes them.
		prefix: fmt.Sprintf("init_%d_", os.Getpid()),
		kicks:  make(chan struct{}, 1),
	}
	if veths {
		p.want[kindVeth] = size
	} else {
		p.want[kindPlain] = size
	}
	return p
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
	p.idle = [numKinds][]*Sandbox{}
	p.mu.Unlock()
	var errsOut []error
	for _, list := range idle {
		for _, s := range list {
			errsOut = append(errsOut, s.Close())
		}
	}
	return errors.Join(errsOut...)
}

// take returns the oldest idle init of kind (nil when there is none; for
// kindVeth, an init without a veth when only those are idle: Start adds
// the veth). The caller calls kick once its Start is done.
func (p *initPool) take(kind initKind) *Sandbox {
	if p.size <= 0 {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if s := p.popLocked(kind); s != nil {
		return s
	}
	if other := 1 - kind; p.want[other] > 0 {
		p.want[other]--
		p.want[kind]++
	}
	if kind == kindVeth {
		return p.popLocked(kindPlain)
	}
	return nil
}

func (p *initPool) popLocked(kind initKind) *Sandbox {
	if len(p.idle[kind]) == 0 {
		return nil
	}
	s := p.idle[kind][0]
	p.idle[kind][0] = nil
	p.idle[kind] = p.idle[kind][1:]
	return s
}

// excessLocked removes and returns an idle init of a kind that has more
// than it wants (nil when none has).
func (p *initPool) excessLocked() *Sandbox {
	for k := kindPlain; k < numKinds; k++ {
		if len(p.idle[k]) > p.want[k] {
			return p.popLocked(k)
		}
	}
	return nil
}

// neededLocked is a kind the pool lacks, if any.
func (p *initPool) neededLocked() (initKind, bool) {
	for k := kindVeth; k >= kindPlain; k-- {
		if len(p.idle[k]) < p.want[k] {
			return k, true
		}
	}
	return 0, false
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
	return len(p.idle[kindPlain]) + len(p.idle[kindVeth])
}

func (p *initPool) idleOf(kind initKind) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.idle[kind])
}

// refill keeps the pool full, one init at a time, until stop is closed.
func (p *initPool) refill(stop, stopped chan struct{}) {
	defer close(stopped)
	backoff := 10 * time.Millisecond
	for {
		p.mu.Lock()
		excess := p.excessLocked()
		kind, needed := p.neededLocked()
		p.mu.Unlock()
		if excess != nil {
			// The mix moved to the other kind: stay within size.
			if err := excess.Close(); err != nil {
				p.m.log.Error("releasing a pre-started jail init", "err", err)
			}
			continue
		}
		if !needed {
			select {
			case <-stop:
				return
			case <-p.kicks:
				continue
			}
		}
		name := p.prefix + fmt.Sprint(p.seq.Add(1))
		s, err := p.m.spawn(name, cgroup.Resources{CPUWeightMB: poolCPUWeightMB}, p.lnAddr, stop)
		if err == nil && kind == kindVeth {
			if err = p.m.addVeth(s); err != nil {
				err = errors.Join(err, s.Close())
			}
		}
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
		p.idle[kind] = append(p.idle[kind], s)
		p.mu.Unlock()
	}
}
