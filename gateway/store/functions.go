package store

import (
	"context"
	"errors"
	"sort"
	"sync"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

// functionCache is the in-memory copy of the "functions" bucket. Writes
// through this Store update it before they return (read-your-writes); the
// watcher applies everyone's writes. An entry only ever moves forward in
// revision, so a late watcher event never undoes a newer local write.
type functionCache struct {
	mu      sync.RWMutex
	entries map[string]fnEntry // guarded by mu; deleted functions stay as tombstones
}

type fnEntry struct {
	fn  *skiffv1.Function // nil for a tombstone; never mutated once cached
	rev uint64
}

func newFunctionCache() *functionCache {
	return &functionCache{entries: make(map[string]fnEntry)}
}

// apply records fn (nil: deleted) at rev unless the cache already holds
// that name at rev or later. It reports whether it changed the cache.
func (c *functionCache) apply(name string, fn *skiffv1.Function, rev uint64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cur, ok := c.entries[name]; ok && cur.rev >= rev {
		return false
	}
	c.entries[name] = fnEntry{fn: fn, rev: rev}
	return true
}

func (c *functionCache) applyEntry(e jetstream.KeyValueEntry) {
	if e.Operation() != jetstream.KeyValuePut {
		c.apply(e.Key(), nil, e.Revision())
		return
	}
	fn, err := decodeFunction(e.Value(), e.Revision())
	if err != nil {
		// A record this gateway cannot read: drop it from the cache rather
		// than serve something stale.
		c.apply(e.Key(), nil, e.Revision())
		return
	}
	c.apply(e.Key(), fn, e.Revision())
}

// known reports whether the cache has seen name at all (a deleted
// function is known, by its delete marker).
func (c *functionCache) known(name string) bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	_, ok := c.entries[name]
	return ok
}

func (c *functionCache) get(name string) (*skiffv1.Function, uint64, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	e, ok := c.entries[name]
	if !ok || e.fn == nil {
		return nil, e.rev, false
	}
	return e.fn, e.rev, true
}

func decodeFunction(b []byte, rev uint64) (*skiffv1.Function, error) {
	fn := &skiffv1.Function{}
	if err := proto.Unmarshal(b, fn); err != nil {
		return nil, err
	}
	fn.Revision = rev
	return fn, nil
}

// encodeFunction marshals fn without its revision (the revision is the KV
// revision of the record, not part of it).
func encodeFunction(fn *skiffv1.Function) ([]byte, error) {
	c := proto.CloneOf(fn)
	c.Revision = 0
	b, err := proto.Marshal(c)
	if err != nil {
		return nil, errs.Internal("encoding function %s: %w", fn.GetName(), err)
	}
	return b, nil
}

// stored returns the copy of fn the cache keeps: a clone with Revision set.
func stored(fn *skiffv1.Function, rev uint64) *skiffv1.Function {
	c := proto.CloneOf(fn)
	c.Revision = rev
	return c
}

// CreateFunction stores a new function. It fails with errs.KindAlreadyExists
// when the name is taken, and returns the stored copy with Revision set.
func (s *Store) CreateFunction(ctx context.Context, fn *skiffv1.Function) (*skiffv1.Function, error) {
	if fn == nil {
		return nil, errs.Invalid("function", "function is required")
	}
	if err := checkName("name", fn.GetName()); err != nil {
		return nil, err
	}
	b, err := encodeFunction(fn)
	if err != nil {
		return nil, err
	}
	rev, err := s.functionsKV.Create(ctx, fn.GetName(), b)
	if err != nil {
		if errors.Is(err, jetstream.ErrKeyExists) {
			return nil, errs.New(errs.KindAlreadyExists, "function %s already exists", fn.GetName())
		}
		return nil, wrapErr(err, "creating function %s", fn.GetName())
	}
	out := stored(fn, rev)
	s.fns.apply(fn.GetName(), out, rev)
	return proto.CloneOf(out), nil
}

// GetFunction returns the function from the cache (errs.NotFound when
// absent). The result is the caller's own copy.
func (s *Store) GetFunction(ctx context.Context, name string) (*skiffv1.Function, error) {
	if err := checkName("name", name); err != nil {
		return nil, err
	}
	fn, _, ok := s.fns.get(name)
	if !ok && !s.fns.known(name) {
		// Never seen here: with several gateways the function may have
		// been created through another one a moment ago, before this
		// gateway's watch delivered it. Ask the bucket.
		e, err := s.functionsKV.Get(ctx, name)
		switch {
		case errors.Is(err, jetstream.ErrKeyNotFound), errors.Is(err, jetstream.ErrKeyDeleted):
		case err != nil:
			return nil, wrapErr(err, "reading function %s", name)
		default:
			s.fns.applyEntry(e)
			fn, _, ok = s.fns.get(name)
		}
	}
	if !ok {
		return nil, errs.NotFound("function %s not found", name)
	}
	return proto.CloneOf(fn), nil
}

// UpdateFunction replaces a function if its stored revision is still
// fn.Revision (the revision the caller read): a mismatch is errs.Conflict,
// a missing function errs.NotFound, a zero revision errs.Invalid. It
// returns the stored copy with the new Revision.
func (s *Store) UpdateFunction(ctx context.Context, fn *skiffv1.Function) (*skiffv1.Function, error) {
	if fn == nil {
		return nil, errs.Invalid("function", "function is required")
	}
	name := fn.GetName()
	if err := checkName("name", name); err != nil {
		return nil, err
	}
	if fn.GetRevision() == 0 {
		return nil, errs.Invalid("revision", "updating function %s needs the revision it was read at", name)
	}
	b, err := encodeFunction(fn)
	if err != nil {
		return nil, err
	}
	rev, err := s.functionsKV.Update(ctx, name, b, fn.GetRevision())
	if err != nil {
		if errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			return nil, s.revisionError(ctx, name, fn.GetRevision())
		}
		return nil, wrapErr(err, "updating function %s", name)
	}
	out := stored(fn, rev)
	s.fns.apply(name, out, rev)
	return proto.CloneOf(out), nil
}

// revisionError explains a failed compare-and-set: the function is gone, or
// it changed since the caller's revision.
func (s *Store) revisionError(ctx context.Context, name string, want uint64) error {
	e, err := s.functionsKV.Get(ctx, name)
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound), errors.Is(err, jetstream.ErrKeyDeleted):
		return errs.NotFound("function %s not found", name)
	case err != nil:
		return errs.Conflict("function %s was changed concurrently (revision %d): %w", name, want, err)
	}
	// Keep the cache at least as new as what we just saw.
	s.fns.applyEntry(e)
	return errs.Conflict("function %s was changed concurrently (revision %d, now %d)", name, want, e.Revision())
}

// DeleteFunction removes a function; errs.NotFound when it does not exist.
func (s *Store) DeleteFunction(ctx context.Context, name string) error {
	if err := checkName("name", name); err != nil {
		return err
	}
	for {
		e, err := s.functionsKV.Get(ctx, name)
		if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
			return errs.NotFound("function %s not found", name)
		}
		if err != nil {
			return wrapErr(err, "deleting function %s", name)
		}
		err = s.functionsKV.Delete(ctx, name, jetstream.LastRevision(e.Revision()))
		if errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			continue // changed under us: look again
		}
		if err != nil {
			return wrapErr(err, "deleting function %s", name)
		}
		// The delete marker is the next record of this key after e, so any
		// later write of the name has a revision above e's.
		s.fns.apply(name, nil, e.Revision()+1)
		return nil
	}
}

// ListFunctions returns up to limit functions (all when limit <= 0) with
// names greater than after, sorted by name, from the cache. next is the
// last name returned when more remain, else "".
func (s *Store) ListFunctions(ctx context.Context, after string, limit int) (fns []*skiffv1.Function, next string, err error) {
	if after != "" {
		if err := checkName("after", after); err != nil {
			return nil, "", err
		}
	}
	s.fns.mu.RLock()
	names := make([]string, 0, len(s.fns.entries))
	for name, e := range s.fns.entries {
		if e.fn != nil && name > after {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	more := false
	if limit > 0 && len(names) > limit {
		names, more = names[:limit], true
	}
	fns = make([]*skiffv1.Function, len(names))
	for i, name := range names {
		fns[i] = s.fns.entries[name].fn
	}
	s.fns.mu.RUnlock()
	for i := range fns {
		fns[i] = proto.CloneOf(fns[i])
	}
	if more {
		next = names[len(names)-1]
	}
	return fns, next, nil
}

// SumReserved returns the sum of reserved_concurrency over all functions,
// from the cache.
func (s *Store) SumReserved(ctx context.Context) (int64, error) {
	s.fns.mu.RLock()
	defer s.fns.mu.RUnlock()
	var sum int64
	for _, e := range s.fns.entries {
		if e.fn != nil && e.fn.ReservedConcurrency != nil {
			sum += int64(e.fn.GetReservedConcurrency())
		}
	}
	return sum, nil
}
