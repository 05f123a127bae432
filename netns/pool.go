package netns

import (
	"errors"
	"log/slog"
	"sync"
	"time"
)

// PoolConfig configures a Pool.
type PoolConfig struct {
	Size   int // namespaces kept ready; default 8
	Logger *slog.Logger
}

// Pool keeps fresh network namespaces (loopback up) ready, refilling in
// the background, so a sandbox start does not pay for creating one.
type Pool struct {
	log    *slog.Logger
	thread *Thread
	ready  chan *NS

	stop    chan struct{}
	stopped chan struct{}
	once    sync.Once
}

// NewPool starts a pool and its refilling goroutine.
func NewPool(cfg PoolConfig) (*Pool, error) {
	if cfg.Size <= 0 {
		cfg.Size = 8
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	th, err := newThread(cfg.Logger)
	if err != nil {
		return nil, err
	}
	p := &Pool{
		log:     cfg.Logger,
		thread:  th,
		ready:   make(chan *NS, cfg.Size),
		stop:    make(chan struct{}),
		stopped: make(chan struct{}),
	}
	go p.refill()
	return p, nil
}

func (p *Pool) refill() {
	defer close(p.stopped)
	backoff := 10 * time.Millisecond
	for {
		ns, err := p.create()
		if err != nil {
			p.log.Error("creating network namespace for the pool", "err", err, "retry_in", backoff)
			select {
			case <-p.stop:
				return
			case <-time.After(backoff):
				backoff = min(2*backoff, 5*time.Second)
				continue
			}
		}
		backoff = 10 * time.Millisecond
		select {
		case p.ready <- ns:
		case <-p.stop:
			ns.Close()
			return
		}
	}
}

func (p *Pool) create() (*NS, error) {
	var ns *NS
	err := p.thread.Run(nil, func() error {
		var err error
		ns, err = create()
		return err
	})
	return ns, err
}

// Get returns a fresh namespace with loopback up: from the pool, or
// created inline when the pool is empty. The caller owns it and closes it.
func (p *Pool) Get() (*NS, error) {
	select {
	case <-p.stop:
		return nil, errors.New("netns pool is closed")
	default:
	}
	select {
	case ns := <-p.ready:
		return ns, nil
	default:
		return p.create()
	}
}

// Close stops refilling and releases the namespaces still in the pool.
func (p *Pool) Close() error {
	p.once.Do(func() {
		close(p.stop)
		<-p.stopped
		for len(p.ready) > 0 {
			(<-p.ready).Close()
		}
		p.thread.Close()
	})
	return nil
}
