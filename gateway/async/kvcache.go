package async

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"skiff.dev/skiff/internal/errs"
)

// kvCache is a bucket's content in memory, kept current by a watcher, with
// read-your-writes: a write through the cache is applied at once.
type kvCache struct {
	kv     jetstream.KeyValue
	decode func([]byte) (any, error)
	log    *slog.Logger
	cancel context.CancelFunc
	done   chan struct{}

	mu   sync.RWMutex
	vals map[string]cacheEntry // guarded by mu
}

type cacheEntry struct {
	val any
	rev uint64
}

const cacheLoadTimeout = 10 * time.Second

// newKVCache loads the bucket and watches it until stop.
func newKVCache(ctx context.Context, kv jetstream.KeyValue, decode func([]byte) (any, error), log *slog.Logger) (*kvCache, error) {
	wctx, cancel := context.WithCancel(context.Background())
	w, err := kv.WatchAll(wctx)
	if err != nil {
		cancel()
		return nil, errs.Unavailable("watching kv bucket %s: %w", kv.Bucket(), err)
	}
	c := &kvCache{kv: kv, decode: decode, log: log, cancel: cancel, done: make(chan struct{}), vals: map[string]cacheEntry{}}
	loaded := make(chan struct{})
	go c.run(wctx, w, loaded)
	select {
	case <-loaded:
		return c, nil
	case <-ctx.Done():
	case <-time.After(cacheLoadTimeout):
	}
	c.stop()
	return nil, errs.Unavailable("loading kv bucket %s: timed out", kv.Bucket())
}

func (c *kvCache) run(ctx context.Context, w jetstream.KeyWatcher, loaded chan struct{}) {
	defer close(c.done)
	defer func() { _ = w.Stop() }()
	once := sync.OnceFunc(func() { close(loaded) })
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-w.Updates():
			if !ok {
				return
			}
			if e == nil {
				once()
				continue
			}
			c.apply(e.Key(), e.Value(), e.Revision(), e.Operation() != jetstream.KeyValuePut)
		}
	}
}

// apply records a value (or its deletion) unless a newer revision is known.
func (c *kvCache) apply(key string, val []byte, rev uint64, deleted bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cur, ok := c.vals[key]; ok && cur.rev >= rev {
		return
	}
	if deleted {
		// Keep the revision so an older put arriving late is ignored.
		c.vals[key] = cacheEntry{rev: rev}
		return
	}
	v, err := c.decode(val)
	if err != nil {
		c.log.Warn("skipping undecodable kv entry", "bucket", c.kv.Bucket(), "key", key, "err", err)
		return
	}
	c.vals[key] = cacheEntry{val: v, rev: rev}
}

func (c *kvCache) get(key string) (any, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	e, ok := c.vals[key]
	if !ok || e.val == nil {
		return nil, false
	}
	return e.val, true
}

// all returns every live value.
func (c *kvCache) all() map[string]any {
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := make(map[string]any, len(c.vals))
	for k, e := range c.vals {
		if e.val != nil {
			out[k] = e.val
		}
	}
	return out
}

// put stores a value and applies it to the cache.
func (c *kvCache) put(ctx context.Context, key string, val []byte) error {
	rev, err := c.kv.Put(ctx, key, val)
	if err != nil {
		return errs.Unavailable("writing %s/%s: %w", c.kv.Bucket(), key, err)
	}
	c.apply(key, val, rev, false)
	return nil
}

// del deletes a value; deleting a missing key is not an error.
func (c *kvCache) del(ctx context.Context, key string) error {
	if err := c.kv.Delete(ctx, key); err != nil {
		return errs.Unavailable("deleting %s/%s: %w", c.kv.Bucket(), key, err)
	}
	// The delete marker's revision is not returned: look it up so the
	// cache drops the value now (the watcher confirms it later).
	if e, err := c.kv.Get(ctx, key); err == nil {
		c.apply(key, nil, e.Revision(), true)
	} else {
		c.mu.Lock()
		if cur, ok := c.vals[key]; ok {
			c.vals[key] = cacheEntry{rev: cur.rev}
		}
		c.mu.Unlock()
	}
	return nil
}

func (c *kvCache) stop() {
	c.cancel()
	<-c.done
}
