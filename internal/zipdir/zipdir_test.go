package zipdir

import (
	"archive/zip"
	"bytes"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// zipItem is an archive entry as read back.
type zipItem struct {
	Name string
	Mode fs.FileMode
	Data string
}

func readZip(t *testing.T, b []byte) []zipItem {
	t.Helper()
	zr, err := zip.NewReader(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatalf("reading archive: %v", err)
	}
	var out []zipItem
	for _, f := range zr.File {
		rc, err := f.Open()
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatal(err)
		}
		mode := f.Mode()
		out = append(out, zipItem{Name: f.Name, Mode: mode & (fs.ModeSymlink | fs.ModePerm), Data: string(data)})
	}
	return out
}

func zipOf(t *testing.T, dir string) []byte {
	t.Helper()
	entries, err := Scan(dir)
	if err != nil {
		t.Fatalf("Scan: %v", err)
	}
	var buf bytes.Buffer
	if err := Write(&buf, entries, nil); err != nil {
		t.Fatalf("Write: %v", err)
	}
	return buf.Bytes()
}

func symlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

func TestZipDir(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "bootstrap"), []byte("exe"), 0o755)
	writeFile(t, filepath.Join(dir, "b", "script.sh"), []byte("#!/bin/sh"), 0o700)
	writeFile(t, filepath.Join(dir, "a.txt"), []byte("text"), 0o644)
	writeFile(t, filepath.Join(dir, "b", "c", "deep.txt"), []byte("deep"), 0o600)
	symlink(t, "bootstrap", filepath.Join(dir, "link-to-bootstrap"))
	symlink(t, "../a.txt", filepath.Join(dir, "b", "up"))
	symlink(t, "c", filepath.Join(dir, "b", "dirlink"))
	symlink(t, "does-not-exist", filepath.Join(dir, "dangling"))

	got := readZip(t, zipOf(t, dir))
	want := []zipItem{
		{Name: "a.txt", Mode: 0o644, Data: "text"},
		{Name: "b/c/deep.txt", Mode: 0o600, Data: "deep"},
		{Name: "b/dirlink", Mode: fs.ModeSymlink | 0o777, Data: "c"},
		{Name: "b/script.sh", Mode: 0o700, Data: "#!/bin/sh"},
		{Name: "b/up", Mode: fs.ModeSymlink | 0o777, Data: "../a.txt"},
		{Name: "bootstrap", Mode: 0o755, Data: "exe"},
		{Name: "dangling", Mode: fs.ModeSymlink | 0o777, Data: "does-not-exist"},
		{Name: "link-to-bootstrap", Mode: fs.ModeSymlink | 0o777, Data: "bootstrap"},
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("archive (-want +got):\n%s", d)
	}
}

func TestZipDirDeterministic(t *testing.T) {
	build := func(t *testing.T, dir string, order []string) {
		for _, n := range order {
			writeFile(t, filepath.Join(dir, n), []byte("content of "+n), 0o644)
		}
		writeFile(t, filepath.Join(dir, "bootstrap"), []byte("exe"), 0o755)
	}
	dir1, dir2 := t.TempDir(), t.TempDir()
	build(t, dir1, []string{"z", "a", "m/x", "m/a"})
	build(t, dir2, []string{"m/a", "a", "m/x", "z"})
	// Different modification times must not change the archive.
	old := time.Date(2001, 2, 3, 4, 5, 6, 0, time.UTC)
	if err := os.Chtimes(filepath.Join(dir2, "a"), old, old); err != nil {
		t.Fatal(err)
	}
	z1, z2 := zipOf(t, dir1), zipOf(t, dir2)
	if !bytes.Equal(z1, z2) {
		t.Errorf("the same tree zipped to different archives (%d and %d bytes)", len(z1), len(z2))
	}
	if again := zipOf(t, dir1); !bytes.Equal(z1, again) {
		t.Errorf("zipping twice gave different archives")
	}
	var names []string
	for _, it := range readZip(t, z1) {
		names = append(names, it.Name)
	}
	if d := cmp.Diff([]string{"a", "bootstrap", "m/a", "m/x", "z"}, names); d != "" {
		t.Errorf("entry order (-want +got):\n%s", d)
	}
}

func TestZipDirRejects(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, dir string)
		want  string
	}{
		{"absolute symlink", func(t *testing.T, dir string) {
			symlink(t, "/etc/passwd", filepath.Join(dir, "pw"))
		}, "symlink pw points to the absolute path /etc/passwd"},
		{"symlink up and out", func(t *testing.T, dir string) {
			symlink(t, "../../outside", filepath.Join(dir, "sub", "out"))
		}, "symlink sub/out -> ../../outside points outside the directory"},
		{"fifo", func(t *testing.T, dir string) {
			if err := mkfifo(filepath.Join(dir, "pipe")); err != nil {
				t.Skipf("mkfifo: %v", err)
			}
		}, "pipe: unsupported file type"},
		{"not a directory", nil, "is not a directory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFile(t, filepath.Join(dir, "bootstrap"), []byte("exe"), 0o755)
			if tt.setup != nil {
				tt.setup(t, dir)
			} else {
				dir = filepath.Join(dir, "bootstrap")
			}
			_, err := Scan(dir)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Scan error = %v, want one containing %q", err, tt.want)
			}
		})
	}
}

func TestZipDirEscapeViaLinkedDir(t *testing.T) {
	// d1/d2/x -> ../../e (inside), and y -> d1/d2/x/../../.. : lexically
	// "." but really two levels above e, i.e. outside.
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "e", "f"), []byte("f"), 0o644)
	symlink(t, "../../e", filepath.Join(dir, "d1", "d2", "x"))
	symlink(t, "d1/d2/x/../../..", filepath.Join(dir, "y"))
	if _, err := Scan(dir); err == nil || !strings.Contains(err.Error(), "symlink y") {
		t.Errorf("Scan error = %v, want symlink y rejected", err)
	}
}

func writeFile(t *testing.T, path string, data []byte, mode os.FileMode) string {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // umask-proof
		t.Fatal(err)
	}
	return path
}
