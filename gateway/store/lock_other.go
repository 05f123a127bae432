//go:build !unix

package store

import (
	"os"

	"skiff.dev/skiff/internal/errs"
)

// lockDataDir only creates the directory where flock is not available.
func lockDataDir(dir string) (release func(), err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, errs.Internal("creating data dir %s: %w", dir, err)
	}
	return func() {}, nil
}
