//go:build unix

package store

import (
	"os"
	"path/filepath"
	"syscall"

	"skiff.dev/skiff/internal/errs"
)

// lockDataDir takes an exclusive lock on <dir>/store.lock so that two
// processes never run JetStream on the same files. The kernel drops the
// lock when the process dies, so a crash never leaves it behind.
func lockDataDir(dir string) (release func(), err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, errs.Internal("creating data dir %s: %w", dir, err)
	}
	path := filepath.Join(dir, "store.lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, errs.Internal("opening %s: %w", path, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, errs.Unavailable("data dir %s is in use by another store (%s): %w", dir, path, err)
	}
	return func() { f.Close() }, nil
}
