package main

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
)

func TestZipDirProgress(t *testing.T) {
	dir := t.TempDir()
	for i := range largeDirFiles + 1 {
		writeFile(t, filepath.Join(dir, fmt.Sprintf("f%04d", i)), []byte("x"), 0o644)
	}
	writeFile(t, filepath.Join(dir, "bootstrap"), []byte("exe"), 0o755)
	for _, terminal := range []bool{false, true} {
		t.Run(fmt.Sprint("terminal=", terminal), func(t *testing.T) {
			s := newFakeServer(t)
			c := newCLI(t, s)
			c.terminal = terminal
			r := c.run("fn", "create", "many", "--dir", dir)
			if r.code != 0 {
				t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
			}
			shown := strings.Contains(r.stderr, "zipping")
			if shown != terminal {
				t.Errorf("progress shown = %v, want %v; stderr %q", shown, terminal, r.stderr)
			}
			_, _, msg := s.fn.last(t)
			if n := len(readZip(t, msg.(interface{ GetZipFile() []byte }).GetZipFile())); n != largeDirFiles+2 {
				t.Errorf("archive has %d entries, want %d", n, largeDirFiles+2)
			}
		})
	}
}

func TestZipDirSmallHasNoProgress(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "bootstrap"), []byte("exe"), 0o755)
	s := newFakeServer(t)
	c := newCLI(t, s)
	c.terminal = true
	r := c.run("fn", "create", "small", "--dir", dir)
	if r.code != 0 || r.stderr != "" {
		t.Errorf("got exit %d, stderr %q; want 0 and no progress for a small directory", r.code, r.stderr)
	}
}
