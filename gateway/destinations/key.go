package destinations

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// keyBytes is the entropy of a signing key; the file holds it as
// 2*keyBytes lower-case hex characters.
const keyBytes = 32

// EnsureSigningKey returns the webhook signing key kept at path (by
// convention <data-dir>/webhook.key), creating it on first use: 32 random
// bytes written as 64 hex characters and a newline, mode 0600. The key is the
// file's 64 hex characters themselves, so a webhook receiver uses the file's
// text verbatim as its HMAC secret. The file is created atomically (a
// concurrent caller gets the same key), and a file readable by others is
// tightened to 0600. A file that does not hold such a key is an error: it is
// never overwritten.
func EnsureSigningKey(path string) ([]byte, error) {
	for range 2 {
		key, err := readKey(path)
		if !errors.Is(err, fs.ErrNotExist) {
			return key, err
		}
		if err := createKey(path); err != nil && !errors.Is(err, fs.ErrExist) {
			return nil, err
		}
		// Created, or another process created it first: read it back.
	}
	return readKey(path)
}

func readKey(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("signing key %s: %w", path, err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("signing key %s is not a regular file", path)
	}
	if st.Mode().Perm()&0o077 != 0 {
		if err := f.Chmod(0o600); err != nil {
			return nil, fmt.Errorf("restricting signing key %s to its owner: %w", path, err)
		}
	}
	b, err := io.ReadAll(io.LimitReader(f, 4*keyBytes))
	if err != nil {
		return nil, fmt.Errorf("reading signing key %s: %w", path, err)
	}
	key := bytes.TrimSpace(b)
	if len(key) != 2*keyBytes {
		return nil, fmt.Errorf("signing key %s holds %d characters, want %d hex characters", path, len(key), 2*keyBytes)
	}
	if _, err := hex.DecodeString(string(key)); err != nil {
		return nil, fmt.Errorf("signing key %s is not hex: %w", path, err)
	}
	return key, nil
}

// createKey writes a new key to a temporary file and links it into place,
// failing with fs.ErrExist when path already exists.
func createKey(path string) error {
	raw := make([]byte, keyBytes)
	if _, err := rand.Read(raw); err != nil {
		return fmt.Errorf("generating signing key: %w", err)
	}
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, ".webhook.key-*") // mode 0600
	if err != nil {
		return fmt.Errorf("creating signing key: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.WriteString(hex.EncodeToString(raw) + "\n"); err != nil {
		tmp.Close()
		return fmt.Errorf("writing signing key: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("syncing signing key: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("writing signing key: %w", err)
	}
	if err := os.Link(tmp.Name(), path); err != nil {
		return err // fs.ErrExist when another process won
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}
