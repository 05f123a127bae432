package gossip

import (
	"bytes"
	"encoding/base64"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"skiff.dev/skiff/internal/errs"
)

func fieldOf(err error) string {
	var e *errs.Error
	if errors.As(err, &e) {
		return e.Field
	}
	return ""
}

func TestParseKey(t *testing.T) {
	for _, n := range []int{16, 24, 32} {
		raw := bytes.Repeat([]byte{0xA5}, n)
		if k, err := ParseKey(raw, "f"); err != nil || !bytes.Equal(k, raw) {
			t.Errorf("%d raw bytes: %x %v", n, k, err)
		}
		enc := []byte(" " + base64.StdEncoding.EncodeToString(raw) + "\n")
		if k, err := ParseKey(enc, "f"); err != nil || !bytes.Equal(k, raw) {
			t.Errorf("%d bytes in base64: %x %v", n, k, err)
		}
	}
	secret := "c2VjcmV0Lw==" // base64 of 7 bytes: neither a key nor a raw key length
	for name, in := range map[string][]byte{
		"empty":       nil,
		"15 bytes":    bytes.Repeat([]byte{1}, 15),
		"33 bytes":    bytes.Repeat([]byte{1}, 33),
		"base64 of 7": []byte(secret),
	} {
		_, err := ParseKey(in, "keyfile")
		if err == nil || fieldOf(err) != "gossip_key_file" || !strings.Contains(err.Error(), "keyfile") {
			t.Errorf("%s: %v, want an error naming gossip_key_file and the file", name, err)
		}
		if err != nil && len(in) > 0 && strings.Contains(err.Error(), string(in)) {
			t.Errorf("%s: the error shows the key: %v", name, err)
		}
	}
	big := filepath.Join(t.TempDir(), "big")
	if err := os.WriteFile(big, bytes.Repeat([]byte("A"), maxKeyFile+1), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadKeyFile(big); err == nil || fieldOf(err) != "gossip_key_file" {
		t.Errorf("oversized key file: %v", err)
	}
	if _, err := ReadKeyFile(filepath.Join(t.TempDir(), "missing")); err == nil || fieldOf(err) != "gossip_key_file" {
		t.Errorf("missing key file: %v", err)
	}
}
