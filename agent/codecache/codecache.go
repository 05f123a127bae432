// Package codecache keeps function code unpacked on the agent's disk, one
// read-only directory per code digest (sha256 of the zip). Code is fetched
// and unpacked once: concurrent requests for one digest share one fetch and
// one extraction, the fetched bytes must hash to the digest, and extraction
// happens in a temporary directory renamed into place, so a crash never
// leaves a half-unpacked directory under a digest's name (New removes the
// temporaries a crash left).
//
// Layout under the cache directory:
//
//	<sha256hex>/        unpacked code: dirs 0555, files 0444, executables 0555
//	.tmp-<sha256hex>-*  extraction or removal in progress
package codecache

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"skiff.dev/skiff/internal/archive"
	"skiff.dev/skiff/internal/errs"
)

const tmpPrefix = ".tmp-"

// Fetcher returns the code archive with a digest (the gateway's object
// store).
type Fetcher interface {
	FetchCode(ctx context.Context, sha256hex string) ([]byte, error)
}

// Cache is the code cache. It is safe for concurrent use.
type Cache struct {
	dir   string
	fetch Fetcher
	lim   archive.Limits
	log   *slog.Logger

	mu      sync.Mutex
	flights map[string]*flight // guarded by mu: unpacking in progress, by digest
}

// flight is one fetch+extract shared by every Get of a digest.
type flight struct {
	done     chan struct{}
	dir      string
	err      error
	waiters  int                // guarded by Cache.mu
	canceled bool               // guarded by Cache.mu: every waiter left, the work is canceled
	cancel   context.CancelFunc // cancels the work
}

// New opens (creating it if needed) a cache in dir, and removes what an
// interrupted extraction or removal left there.
func New(dir string, fetch Fetcher, lim archive.Limits, log *slog.Logger) (*Cache, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating code cache %s: %w", dir, err)
	}
	// The sandbox user must reach the code through the cache directory.
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating code cache %s: %w", dir, err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("reading code cache %s: %w", dir, err)
	}
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), tmpPrefix) {
			continue
		}
		if err := removeTree(filepath.Join(dir, e.Name())); err != nil {
			return nil, fmt.Errorf("removing leftover %s: %w", e.Name(), err)
		}
		log.Info("removed leftover code cache temporary", "name", e.Name())
	}
	return &Cache{dir: dir, fetch: fetch, lim: lim, log: log, flights: map[string]*flight{}}, nil
}

// Get returns the directory holding the unpacked code with digest
// sha256hex, fetching and unpacking it first if needed.
func (c *Cache) Get(ctx context.Context, sha256hex string) (string, error) {
	if err := checkDigest(sha256hex); err != nil {
		return "", err
	}
	final := filepath.Join(c.dir, sha256hex)
	if isDir(final) {
		return final, nil
	}

	c.mu.Lock()
	fl, ok := c.flights[sha256hex]
	if !ok || fl.canceled {
		// Re-check under the lock: a flight may have just finished.
		if isDir(final) {
			c.mu.Unlock()
			return final, nil
		}
		workCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		fl = &flight{done: make(chan struct{}), cancel: cancel}
		c.flights[sha256hex] = fl
		go c.run(workCtx, fl, sha256hex)
	}
	fl.waiters++
	c.mu.Unlock()

	select {
	case <-fl.done:
		return fl.dir, fl.err
	case <-ctx.Done():
		c.mu.Lock()
		if fl.waiters--; fl.waiters == 0 {
			fl.canceled = true
			fl.cancel()
		}
		c.mu.Unlock()
		return "", ctx.Err()
	}
}

// run fetches and unpacks one digest for a flight.
func (c *Cache) run(ctx context.Context, fl *flight, digest string) {
	start := time.Now()
	dir, size, err := c.unpack(ctx, digest)
	if err != nil {
		c.log.Warn("unpacking code failed", "sha256", digest, "err", err)
	} else {
		c.log.Info("code unpacked", "sha256", digest, "zip_bytes", size, "duration", time.Since(start))
	}
	c.mu.Lock()
	if c.flights[digest] == fl {
		delete(c.flights, digest)
	}
	fl.dir, fl.err = dir, err
	fl.cancel()
	c.mu.Unlock()
	close(fl.done)
}

// unpack fetches, checks and extracts one digest; it returns the final
// directory and the archive's size.
func (c *Cache) unpack(ctx context.Context, digest string) (string, int, error) {
	code, err := c.fetch.FetchCode(ctx, digest)
	if err != nil {
		return "", 0, fmt.Errorf("fetching code %s: %w", digest, err)
	}
	sum := sha256.Sum256(code)
	if got := hex.EncodeToString(sum[:]); got != digest {
		return "", 0, errs.Internal("fetched code hashes to %s, want %s", got, digest).WithReason("code_digest_mismatch")
	}
	if err := ctx.Err(); err != nil {
		return "", 0, err
	}
	tmp, err := os.MkdirTemp(c.dir, tmpPrefix+digest+"-")
	if err != nil {
		return "", 0, errs.Internal("unpacking code %s: %w", digest, err)
	}
	ok := false
	defer func() {
		if !ok {
			if err := removeTree(tmp); err != nil {
				c.log.Warn("removing a failed extraction", "dir", tmp, "err", err)
			}
		}
	}()
	if err := archive.Extract(code, tmp, c.lim); err != nil {
		return "", 0, fmt.Errorf("code %s: %w", digest, err)
	}
	if err := makeReadOnly(tmp); err != nil {
		return "", 0, errs.Internal("unpacking code %s: %w", digest, err)
	}
	// Flush the tree before it appears under its final name, so that even a
	// power loss cannot leave a digest directory with missing data.
	if err := syncFS(tmp); err != nil {
		return "", 0, errs.Internal("unpacking code %s: %w", digest, err)
	}
	final := filepath.Join(c.dir, digest)
	if err := os.Rename(tmp, final); err != nil {
		return "", 0, errs.Internal("unpacking code %s: %w", digest, err)
	}
	ok = true
	if err := syncDir(c.dir); err != nil {
		c.log.Warn("syncing the code cache directory", "err", err)
	}
	return final, len(code), nil
}

// Has reports whether the code with digest sha256hex is unpacked.
func (c *Cache) Has(sha256hex string) bool {
	return checkDigest(sha256hex) == nil && isDir(filepath.Join(c.dir, sha256hex))
}

// Digests lists the unpacked digests, sorted.
func (c *Cache) Digests() []string {
	ents, err := os.ReadDir(c.dir)
	if err != nil {
		c.log.Warn("listing the code cache", "err", err)
		return nil
	}
	var out []string
	for _, e := range ents {
		if e.IsDir() && checkDigest(e.Name()) == nil {
			out = append(out, e.Name())
		}
	}
	slices.Sort(out)
	return out
}

// Remove deletes the unpacked code of a digest; removing absent code
// succeeds. The caller makes sure no sandbox uses it.
func (c *Cache) Remove(sha256hex string) error {
	if err := checkDigest(sha256hex); err != nil {
		return err
	}
	final := filepath.Join(c.dir, sha256hex)
	// Rename first: the digest disappears at once, and a crash mid-removal
	// leaves a temporary that New removes.
	tmp := filepath.Join(c.dir, fmt.Sprintf("%s%s-rm%d", tmpPrefix, sha256hex, time.Now().UnixNano()))
	if err := os.Rename(final, tmp); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return errs.Internal("removing code %s: %w", sha256hex, err)
	}
	if err := removeTree(tmp); err != nil {
		return errs.Internal("removing code %s: %w", sha256hex, err)
	}
	return nil
}

func checkDigest(d string) error {
	if len(d) != sha256.Size*2 {
		return errs.Invalid("code_sha256", "code digest %q is not a sha256 hex digest", d)
	}
	for i := 0; i < len(d); i++ {
		if ch := d[i]; !('0' <= ch && ch <= '9' || 'a' <= ch && ch <= 'f') {
			return errs.Invalid("code_sha256", "code digest %q is not a lower-case sha256 hex digest", d)
		}
	}
	return nil
}

func isDir(p string) bool {
	fi, err := os.Lstat(p)
	return err == nil && fi.IsDir()
}

// makeReadOnly sets the final modes of an unpacked tree: directories 0555,
// executables 0555, other files 0444 (readable by the sandbox user).
// Symlinks are not followed. Directories are done last, deepest first.
func makeReadOnly(root string) error {
	var dirs []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			dirs = append(dirs, p)
		case d.Type().IsRegular():
			fi, err := d.Info()
			if err != nil {
				return err
			}
			mode := os.FileMode(0o444)
			if fi.Mode()&0o111 != 0 {
				mode = 0o555
			}
			return os.Chmod(p, mode)
		}
		return nil
	})
	if err != nil {
		return err
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := os.Chmod(dirs[i], 0o555); err != nil {
			return err
		}
	}
	return nil
}

// removeTree removes a tree made read-only by makeReadOnly: directories
// are made writable first (root does not need it; others do).
func removeTree(p string) error {
	_ = filepath.WalkDir(p, func(q string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			_ = os.Chmod(q, 0o755)
		}
		return nil
	})
	return os.RemoveAll(p)
}

func syncFS(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Syncfs(int(f.Fd()))
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}
