package store

import (
	"context"
	"sync"
	"sync/atomic"

	"github.com/nats-io/nats.go/jetstream"

	"skiff.dev/skiff/internal/errs"
)

// watcher feeds every change of a KV bucket to an apply function, which
// keeps an in-memory cache current (including writes by other gateways).
type watcher struct {
	w        jetstream.KeyWatcher
	done     chan struct{}
	once     sync.Once
	stopping atomic.Bool
}

// watch starts watching kv and returns once the current contents have been
// applied (the watcher's initial nil marker).
func (s *Store) watch(ctx context.Context, kv jetstream.KeyValue, apply func(jetstream.KeyValueEntry)) (*watcher, error) {
	kw, err := kv.WatchAll(context.Background())
	if err != nil {
		return nil, errs.Unavailable("watching kv bucket %s: %w", kv.Bucket(), err)
	}
	w := &watcher{w: kw, done: make(chan struct{})}
	ready := make(chan struct{})
	go func() {
		defer close(w.done)
		readied := false
		for e := range kw.Updates() {
			if e == nil {
				if !readied {
					readied = true
					close(ready)
				}
				continue
			}
			apply(e)
		}
		if !readied {
			close(ready)
		}
		if !w.stopping.Load() {
			// The cache no longer sees other gateways' writes.
			s.log.Error("kv watcher ended unexpectedly; cache may go stale", "bucket", kv.Bucket())
		}
	}()
	select {
	case <-ready:
		select {
		case <-w.done:
			return nil, errs.Unavailable("watching kv bucket %s: watcher ended during initial load", kv.Bucket())
		default:
		}
		return w, nil
	case <-ctx.Done():
		w.stop()
		return nil, wrapErr(ctx.Err(), "loading kv bucket %s", kv.Bucket())
	}
}

// stop ends the watcher and waits for its goroutine.
func (w *watcher) stop() {
	w.once.Do(func() {
		w.stopping.Store(true)
		_ = w.w.Stop()
		<-w.done
	})
}
