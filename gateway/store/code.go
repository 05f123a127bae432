package store

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"

	"github.com/nats-io/nats.go/jetstream"

	"skiff.dev/skiff/internal/errs"
)

// PutCode stores a code archive under the hex sha256 of its bytes and
// returns that digest. Identical code is stored once: when the digest is
// already there, nothing is written.
func (s *Store) PutCode(ctx context.Context, zip []byte) (string, error) {
	if len(zip) == 0 {
		return "", errs.Invalid("code", "code archive is empty")
	}
	sum := sha256.Sum256(zip)
	digest := hex.EncodeToString(sum[:])
	if _, err := s.code.GetInfo(ctx, digest); err == nil {
		return digest, nil
	} else if !errors.Is(err, jetstream.ErrObjectNotFound) {
		return "", wrapErr(err, "looking up code %s", digest)
	}
	// Two concurrent puts of the same digest both write the same bytes; the
	// object store keeps one.
	if _, err := s.code.PutBytes(ctx, digest, zip); err != nil {
		return "", wrapErr(err, "storing code %s", digest)
	}
	return digest, nil
}

// FetchCode returns the archive stored under a digest (errs.NotFound when
// there is none), after checking that its bytes still hash to it.
func (s *Store) FetchCode(ctx context.Context, sha256hex string) ([]byte, error) {
	if err := checkDigest(sha256hex); err != nil {
		return nil, err
	}
	b, err := s.code.GetBytes(ctx, sha256hex)
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		return nil, errs.NotFound("code %s not found", sha256hex)
	}
	if err != nil {
		return nil, wrapErr(err, "fetching code %s", sha256hex)
	}
	sum := sha256.Sum256(b)
	if got := hex.EncodeToString(sum[:]); got != sha256hex {
		return nil, errs.Internal("code %s is corrupt: its bytes hash to %s", sha256hex, got)
	}
	return b, nil
}

// DeleteCode removes the archive stored under a digest. Deleting code that
// is not there succeeds (teardown is idempotent). The caller must know that
// no function still refers to the digest: identical code is shared.
func (s *Store) DeleteCode(ctx context.Context, sha256hex string) error {
	if err := checkDigest(sha256hex); err != nil {
		return err
	}
	err := s.code.Delete(ctx, sha256hex)
	if err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
		return wrapErr(err, "deleting code %s", sha256hex)
	}
	return nil
}

// checkDigest accepts 64 lower-case hex digits.
func checkDigest(d string) error {
	if len(d) != 2*sha256.Size {
		return errs.Invalid("code_sha256", "code digest %q is not 64 hex digits", d)
	}
	for i := 0; i < len(d); i++ {
		c := d[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return errs.Invalid("code_sha256", "code digest %q is not 64 lower-case hex digits", d)
		}
	}
	return nil
}
