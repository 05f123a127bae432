package store

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"

	"skiff.dev/skiff/internal/errs"
)

func TestCodeDedupAndFetch(t *testing.T) {
	s := openStore(t, Config{})
	ctx := testCtx(t)
	zip := bytes.Repeat([]byte("PK\x03\x04 some code "), 50_000) // ~1 MB: several chunks
	sum := sha256.Sum256(zip)
	want := hex.EncodeToString(sum[:])

	d1, err := s.PutCode(ctx, zip)
	if err != nil {
		t.Fatal(err)
	}
	d2, err := s.PutCode(ctx, bytes.Clone(zip))
	if err != nil {
		t.Fatal(err)
	}
	if d1 != want || d2 != want {
		t.Fatalf("digests: got %s and %s, want %s", d1, d2, want)
	}
	other, err := s.PutCode(ctx, []byte("other code"))
	if err != nil {
		t.Fatal(err)
	}
	objs, err := s.code.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(objs) != 2 {
		t.Fatalf("objects stored: got %d, want 2 (identical code stored once)", len(objs))
	}
	st, err := s.code.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if max := uint64(len(zip)) + 64<<10; st.Size() > max {
		t.Fatalf("object store size: got %d bytes, want at most %d (one copy)", st.Size(), max)
	}

	got, err := s.FetchCode(ctx, d1)
	if err != nil || !bytes.Equal(got, zip) {
		t.Fatalf("FetchCode: got %d bytes, %v; want the %d bytes put", len(got), err, len(zip))
	}

	_, err = s.FetchCode(ctx, strings.Repeat("0", 64))
	wantKind(t, "fetching missing code", err, errs.KindNotFound)
	for _, bad := range []string{"", "abc", strings.Repeat("A", 64), strings.Repeat("g", 64), "../" + strings.Repeat("a", 61)} {
		_, err = s.FetchCode(ctx, bad)
		wantKind(t, "fetching code "+bad, err, errs.KindInvalidArgument)
		wantKind(t, "deleting code "+bad, s.DeleteCode(ctx, bad), errs.KindInvalidArgument)
	}
	_, err = s.PutCode(ctx, nil)
	wantKind(t, "putting empty code", err, errs.KindInvalidArgument)

	if err := s.DeleteCode(ctx, other); err != nil {
		t.Fatal(err)
	}
	_, err = s.FetchCode(ctx, other)
	wantKind(t, "fetching deleted code", err, errs.KindNotFound)
	if err := s.DeleteCode(ctx, other); err != nil {
		t.Fatalf("deleting deleted code: got %v, want success", err)
	}
	// Code put again after a delete is back.
	if _, err := s.PutCode(ctx, []byte("other code")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.FetchCode(ctx, other); err != nil {
		t.Fatalf("fetching re-put code: %v", err)
	}
}

func TestFetchCodeVerifiesDigest(t *testing.T) {
	s := openStore(t, Config{})
	ctx := testCtx(t)
	sum := sha256.Sum256([]byte("the real code"))
	digest := hex.EncodeToString(sum[:])
	// Corrupt: different bytes under that digest.
	if _, err := s.code.PutBytes(ctx, digest, []byte("tampered code")); err != nil {
		t.Fatal(err)
	}
	_, err := s.FetchCode(ctx, digest)
	wantKind(t, "fetching corrupt code", err, errs.KindInternal)
	if !strings.Contains(err.Error(), "corrupt") {
		t.Fatalf("error: got %q, want it to say corrupt", err)
	}
}
