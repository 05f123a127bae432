package gossip

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"io"
	"os"

	"skiff.dev/skiff/internal/errs"
)

// maxKeyFile bounds the gossip key file.
const maxKeyFile = 4096

// ReadKeyFile reads the cluster's gossip key (Config.Key) from path: 16, 24 or 32 raw
// bytes (AES-128/192/256), or those bytes in standard base64 (surrounding
// whitespace ignored). Content that decodes as base64 to a valid key
// length is taken as base64. The key itself never appears in errors.
func ReadKeyFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, errs.Invalid("gossip_key_file", "reading the gossip key: %v", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxKeyFile+1))
	if err != nil {
		return nil, errs.Invalid("gossip_key_file", "reading the gossip key: %v", err)
	}
	if len(b) > maxKeyFile {
		return nil, errs.Invalid("gossip_key_file", "gossip key file %s is larger than %d bytes", path, maxKeyFile)
	}
	return ParseKey(b, path)
}

// ParseKey is ReadKeyFile on the file's content; name is for
// errors.
func ParseKey(b []byte, name string) ([]byte, error) {
	if t := bytes.TrimSpace(b); len(t) > 0 {
		dec := make([]byte, base64.StdEncoding.DecodedLen(len(t)))
		if k, err := base64.StdEncoding.Decode(dec, t); err == nil && validKeyLen(k) {
			return dec[:k], nil
		}
	}
	if validKeyLen(len(b)) {
		return append([]byte(nil), b...), nil
	}
	return nil, errs.Invalid("gossip_key_file", "gossip key file %s holds %s, want 16, 24 or 32 raw bytes or their base64", name, describeLen(len(b)))
}

func validKeyLen(n int) bool { return n == 16 || n == 24 || n == 32 }

func describeLen(n int) string { return fmt.Sprintf("%d bytes", n) }
