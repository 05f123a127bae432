package destinations

import (
	"bytes"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

func TestEnsureSigningKeyCreatesAndReuses(t *testing.T) {
	path := filepath.Join(t.TempDir(), "webhook.key")
	key, err := EnsureSigningKey(path)
	if err != nil {
		t.Fatalf("EnsureSigningKey: %v", err)
	}
	if len(key) != 64 {
		t.Fatalf("key is %d bytes, want 64 hex characters", len(key))
	}
	raw, err := hex.DecodeString(string(key))
	if err != nil || len(raw) != 32 {
		t.Fatalf("key %q does not hold 32 hex-encoded bytes: %v", key, err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if perm := st.Mode().Perm(); perm != 0o600 {
		t.Errorf("key file mode = %o, want 600", perm)
	}
	file, _ := os.ReadFile(path)
	if got, want := string(file), string(key)+"\n"; got != want {
		t.Errorf("key file = %q, want %q", got, want)
	}
	again, err := EnsureSigningKey(path)
	if err != nil {
		t.Fatalf("EnsureSigningKey again: %v", err)
	}
	if !bytes.Equal(again, key) {
		t.Errorf("second call returned another key: got %q, want %q", again, key)
	}
	other, err := EnsureSigningKey(filepath.Join(t.TempDir(), "webhook.key"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(other, key) {
		t.Errorf("two data directories got the same key %q", key)
	}
	if _, err := New(Config{SigningKey: key}, nil, nil); err != nil {
		t.Errorf("New with the ensured key: %v", err)
	}
	left, _ := filepath.Glob(filepath.Join(filepath.Dir(path), ".webhook.key-*"))
	if len(left) != 0 {
		t.Errorf("temporary files left behind: %v", left)
	}
}

func TestEnsureSigningKeyConcurrentCallersAgree(t *testing.T) {
	path := filepath.Join(t.TempDir(), "webhook.key")
	const n = 8
	keys := make([][]byte, n)
	errList := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { keys[i], errList[i] = EnsureSigningKey(path) })
	}
	wg.Wait()
	for i := range n {
		if errList[i] != nil {
			t.Fatalf("caller %d: %v", i, errList[i])
		}
		if !bytes.Equal(keys[i], keys[0]) {
			t.Errorf("caller %d got %q, caller 0 got %q", i, keys[i], keys[0])
		}
	}
}

func TestEnsureSigningKeyExistingFiles(t *testing.T) {
	good := strings.Repeat("ab", 32)
	tests := []struct {
		name     string
		content  string
		mode     os.FileMode
		wantKey  string
		wantErr  string
		wantMode os.FileMode
	}{
		{name: "kept", content: good + "\n", mode: 0o600, wantKey: good, wantMode: 0o600},
		{name: "no newline", content: good, mode: 0o600, wantKey: good, wantMode: 0o600},
		{name: "readable by others is tightened", content: good + "\n", mode: 0o644, wantKey: good, wantMode: 0o600},
		{name: "too short", content: "abcd\n", mode: 0o600, wantErr: "holds 4 characters", wantMode: 0o600},
		{name: "empty", content: "", mode: 0o600, wantErr: "holds 0 characters", wantMode: 0o600},
		{name: "not hex", content: strings.Repeat("zz", 32), mode: 0o600, wantErr: "not hex", wantMode: 0o600},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "webhook.key")
			if err := os.WriteFile(path, []byte(tt.content), tt.mode); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(path, tt.mode); err != nil { // past the umask
				t.Fatal(err)
			}
			key, err := EnsureSigningKey(path)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("EnsureSigningKey = %q, %v; want an error containing %q", key, err, tt.wantErr)
				}
				if b, _ := os.ReadFile(path); string(b) != tt.content {
					t.Errorf("a bad key file was changed: got %q, want %q", b, tt.content)
				}
			} else if err != nil || string(key) != tt.wantKey {
				t.Errorf("EnsureSigningKey = %q, %v; want %q", key, err, tt.wantKey)
			}
			st, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if perm := st.Mode().Perm(); perm != tt.wantMode {
				t.Errorf("mode = %o, want %o", perm, tt.wantMode)
			}
		})
	}
}

func TestEnsureSigningKeyRefusesDirectory(t *testing.T) {
	path := filepath.Join(t.TempDir(), "webhook.key")
	if err := os.Mkdir(path, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := EnsureSigningKey(path); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("EnsureSigningKey on a directory = %v, want a not-a-regular-file error", err)
	}
}
