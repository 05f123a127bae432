package store

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"log/slog"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"skiff.dev/skiff/internal/errs"
)

// Key is an API key. The secret itself is never stored, only its sha256.
type Key struct {
	ID              string    `json:"id"`
	Description     string    `json:"description,omitempty"`
	SecretHash      []byte    `json:"secret_hash"`
	Admin           bool      `json:"admin,omitempty"`
	InvokeFunctions []string  `json:"invoke_functions,omitempty"`
	Created         time.Time `json:"created"`
}

func (k Key) clone() Key {
	k.SecretHash = slices.Clone(k.SecretHash)
	k.InvokeFunctions = slices.Clone(k.InvokeFunctions)
	return k
}

// keyIndex is the in-memory copy of the "apikeys" bucket, indexed by id
// and by secret hash. Like functionCache, entries only move forward in
// revision; deleted keys stay as tombstones.
type keyIndex struct {
	mu     sync.RWMutex
	byID   map[string]keyEntry // guarded by mu
	byHash map[string]string   // guarded by mu; secret hash -> id of a live key
}

type keyEntry struct {
	key  Key
	live bool
	rev  uint64
}

func newKeyIndex() *keyIndex {
	return &keyIndex{byID: make(map[string]keyEntry), byHash: make(map[string]string)}
}

// apply records k (live=false: deleted) at rev unless the index already
// holds id at rev or later.
func (x *keyIndex) apply(id string, k Key, live bool, rev uint64) {
	x.mu.Lock()
	defer x.mu.Unlock()
	cur, ok := x.byID[id]
	if ok && cur.rev >= rev {
		return
	}
	if ok && cur.live && x.byHash[string(cur.key.SecretHash)] == id {
		delete(x.byHash, string(cur.key.SecretHash))
	}
	x.byID[id] = keyEntry{key: k, live: live, rev: rev}
	if live {
		x.byHash[string(k.SecretHash)] = id
	}
}

func (x *keyIndex) applyEntry(log *slog.Logger) func(jetstream.KeyValueEntry) {
	return func(e jetstream.KeyValueEntry) {
		if e.Operation() != jetstream.KeyValuePut {
			x.apply(e.Key(), Key{}, false, e.Revision())
			return
		}
		var k Key
		if err := json.Unmarshal(e.Value(), &k); err != nil {
			log.Error("unreadable api key record; treating the key as revoked", "id", e.Key(), "err", err)
			x.apply(e.Key(), Key{}, false, e.Revision())
			return
		}
		x.apply(e.Key(), k, true, e.Revision())
	}
}

// PutKey stores (or replaces) an API key.
func (s *Store) PutKey(ctx context.Context, k Key) error {
	if err := checkKeyID(k.ID); err != nil {
		return err
	}
	if len(k.SecretHash) != sha256.Size {
		return errs.Invalid("secret_hash", "key %s: secret hash is %d bytes, want a %d-byte sha256", k.ID, len(k.SecretHash), sha256.Size)
	}
	for _, fn := range k.InvokeFunctions {
		if err := checkName("invoke_functions", fn); err != nil {
			return err
		}
	}
	k = k.clone()
	b, err := json.Marshal(k)
	if err != nil {
		return errs.Internal("encoding key %s: %w", k.ID, err)
	}
	rev, err := s.keysKV.Put(ctx, k.ID, b)
	if err != nil {
		return wrapErr(err, "storing key %s", k.ID)
	}
	s.keys.apply(k.ID, k, true, rev)
	return nil
}

// KeyBySecretHash finds the live key whose secret hashes to hash, from the
// watched index (no I/O). errs.NotFound when there is none: unknown or
// revoked. A revoke through this Store takes effect before DeleteKey
// returns; one through another gateway as soon as its watcher delivers it.
func (s *Store) KeyBySecretHash(ctx context.Context, hash []byte) (Key, error) {
	s.keys.mu.RLock()
	id, ok := s.keys.byHash[string(hash)]
	var k Key
	if ok {
		k = s.keys.byID[id].key
	}
	s.keys.mu.RUnlock()
	if !ok {
		return Key{}, errs.NotFound("no api key with that secret")
	}
	return k.clone(), nil
}

// ListKeys returns the live keys sorted by id.
func (s *Store) ListKeys(ctx context.Context) ([]Key, error) {
	s.keys.mu.RLock()
	keys := make([]Key, 0, len(s.keys.byID))
	for _, e := range s.keys.byID {
		if e.live {
			keys = append(keys, e.key.clone())
		}
	}
	s.keys.mu.RUnlock()
	sort.Slice(keys, func(i, j int) bool { return keys[i].ID < keys[j].ID })
	return keys, nil
}

// DeleteKey revokes a key; errs.NotFound when there is no such key.
func (s *Store) DeleteKey(ctx context.Context, id string) error {
	if err := checkKeyID(id); err != nil {
		return err
	}
	for {
		e, err := s.keysKV.Get(ctx, id)
		if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
			return errs.NotFound("api key %s not found", id)
		}
		if err != nil {
			return wrapErr(err, "revoking key %s", id)
		}
		err = s.keysKV.Delete(ctx, id, jetstream.LastRevision(e.Revision()))
		if errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			continue
		}
		if err != nil {
			return wrapErr(err, "revoking key %s", id)
		}
		s.keys.apply(id, Key{}, false, e.Revision()+1)
		return nil
	}
}

// checkKeyID accepts 1-64 letters, digits, '-' and '_' (valid NATS keys).
func checkKeyID(id string) error {
	if !validName(id) {
		return errs.Invalid("id", "api key id %q is not 1-64 letters, digits, '-' or '_'", id)
	}
	return nil
}
