package archive

import (
	"archive/zip"
	"bytes"
	"compress/flate"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-cmp/cmp"

	"skiff.dev/skiff/internal/errs"
)

// zent is an entry of a test archive.
type zent struct {
	name  string
	mode  os.FileMode // 0 means a 0644 regular file
	data  []byte
	store bool // no compression
	// raw, when set, writes data as already-compressed bytes with these
	// header fields, which may lie.
	raw          bool
	method       uint16
	flags        uint16
	uncompressed uint64
	crc          uint32
}

func mkzip(t testing.TB, ents ...zent) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for _, e := range ents {
		mode := e.mode
		if mode == 0 {
			mode = 0o644
		}
		h := &zip.FileHeader{Name: e.name, Method: zip.Deflate}
		if e.store {
			h.Method = zip.Store
		}
		h.SetMode(mode)
		var w io.Writer
		var err error
		if e.raw {
			h.Method = e.method
			h.Flags = e.flags
			h.CompressedSize64 = uint64(len(e.data))
			h.UncompressedSize64 = e.uncompressed
			h.CRC32 = e.crc
			w, err = zw.CreateRaw(h)
		} else {
			w, err = zw.CreateHeader(h)
		}
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(e.data); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func deflate(t testing.TB, r io.Reader) []byte {
	t.Helper()
	var buf bytes.Buffer
	fw, _ := flate.NewWriter(&buf, flate.BestCompression)
	if _, err := io.Copy(fw, r); err != nil {
		t.Fatal(err)
	}
	fw.Close()
	return buf.Bytes()
}

func randBytes(n int) []byte {
	var seed [32]byte
	seed[0] = byte(n)
	b := make([]byte, n)
	_, _ = rand.NewChaCha8(seed).Read(b)
	return b
}

type zeros struct{}

func (zeros) Read(b []byte) (int, error) { clear(b); return len(b), nil }

func link(name, target string) zent {
	return zent{name: name, mode: os.ModeSymlink | 0o777, data: []byte(target)}
}

func file(name, data string) zent { return zent{name: name, data: []byte(data)} }

func TestHostileArchives(t *testing.T) {
	const mib = 1 << 20
	small := Limits{MaxUnpacked: mib}
	bomb := deflate(t, io.LimitReader(zeros{}, 8*mib))
	tiny := deflate(t, strings.NewReader("hello"))

	var manySmall []zent
	for i := range 10 {
		manySmall = append(manySmall, zent{name: "f" + string(rune('a'+i%26)) + strings.Repeat("x", i), data: make([]byte, mib)})
	}

	tests := []struct {
		name    string
		zip     []byte
		lim     Limits
		wantMsg []string // substrings of the error
	}{
		{"not a zip", []byte("hello, world"), Limits{}, []string{"not a valid zip"}},
		{"empty input", nil, Limits{}, []string{"not a valid zip"}},
		{"truncated zip", mkzip(t, file("a", "x"))[:30], Limits{}, []string{"not a valid zip"}},
		{"dot-dot", mkzip(t, file("../evil", "x")), Limits{}, []string{`"../evil"`, `".."`}},
		{"dot-dot inside", mkzip(t, file("a/../../evil", "x")), Limits{}, []string{`"a/../../evil"`, `".."`}},
		{"dot-dot harmless-looking", mkzip(t, file("a/../b", "x")), Limits{}, []string{`".."`}},
		{"absolute", mkzip(t, file("/etc/cron.d/evil", "x")), Limits{}, []string{`"/etc/cron.d/evil"`, "absolute"}},
		{"backslash traversal", mkzip(t, file(`..\evil`, "x")), Limits{}, []string{"backslash"}},
		{"drive letter", mkzip(t, file(`C:/evil`, "x")), Limits{}, []string{"drive letter"}},
		{"NUL in name", mkzip(t, file("a\x00b", "x")), Limits{}, []string{"NUL"}},
		{"long element", mkzip(t, file(strings.Repeat("a", 256), "x")), Limits{}, []string{"too long"}},
		{"root as a file", mkzip(t, file(".", "")), Limits{}, []string{"root"}},
		{"symlink absolute", mkzip(t, link("etc", "/etc")), Limits{}, []string{`"etc"`, "absolute target"}},
		{"symlink up", mkzip(t, link("up", "../outside")), Limits{}, []string{`"up"`, "outside"}},
		{"symlink deep up", mkzip(t, link("a/b/up", "../../../x")), Limits{}, []string{`"a/b/up"`, "outside"}},
		{"symlink chain escape", mkzip(t, link("a/b/root", "../.."), link("m", "a/b/root/../x")), Limits{}, []string{`"m"`, "outside"}},
		{"symlink chain via abs", mkzip(t, link("a", "b"), link("b", "c/../..")), Limits{}, []string{"outside"}},
		{"symlink loop", mkzip(t, link("l1", "l2"), link("l2", "l1")), Limits{}, []string{"too many levels"}},
		{"symlink empty", mkzip(t, link("l", "")), Limits{}, []string{"empty target"}},
		{"write through symlink", mkzip(t, zent{name: "d/", mode: os.ModeDir | 0o755}, link("l", "d"), file("l/x", "x")), Limits{}, []string{`"l/x"`, "symlink"}},
		{"write through symlink first", mkzip(t, file("l/x", "x"), link("l", "/tmp")), Limits{}, []string{`"l"`}},
		{"file under file", mkzip(t, file("a", "x"), file("a/b", "y")), Limits{}, []string{`"a/b"`, "which is a file"}},
		{"duplicate", mkzip(t, file("a", "x"), file("a", "y")), Limits{}, []string{`"a"`, "duplicates"}},
		{"duplicate dir and file", mkzip(t, zent{name: "a/", mode: os.ModeDir | 0o755}, file("a", "y")), Limits{}, []string{"duplicates"}},
		{"duplicate after cleaning", mkzip(t, file("./a", "x"), file("a", "y")), Limits{}, []string{"duplicates"}},
		{"duplicate file and link", mkzip(t, file("a", "x"), link("a", "b")), Limits{}, []string{"duplicates"}},
		{"char device", mkzip(t, zent{name: "dev", mode: os.ModeDevice | os.ModeCharDevice | 0o666}), Limits{}, []string{`"dev"`, "character device"}},
		{"block device", mkzip(t, zent{name: "dev", mode: os.ModeDevice | 0o666}), Limits{}, []string{"device"}},
		{"fifo", mkzip(t, zent{name: "p", mode: os.ModeNamedPipe | 0o666}), Limits{}, []string{`"p"`, "fifo"}},
		{"socket", mkzip(t, zent{name: "s", mode: os.ModeSocket | 0o666}), Limits{}, []string{"socket"}},
		{"dir with content", mkzip(t, zent{name: "d", mode: os.ModeDir | 0o755, raw: true, method: zip.Store, data: []byte("x"), uncompressed: 1, crc: crc32.ChecksumIEEE([]byte("x"))}), Limits{}, []string{"has content"}},
		{"encrypted", mkzip(t, zent{name: "secret", raw: true, method: zip.Store, flags: 0x1, data: []byte("xxxxxxxxxxxx"), uncompressed: 12}), Limits{}, []string{`"secret"`, "encrypted"}},
		{"unknown method", mkzip(t, zent{name: "x", raw: true, method: 99, data: []byte("x"), uncompressed: 1}), Limits{}, []string{"compression method 99"}},
		{"too many files", mkzip(t, file("a", ""), file("b", ""), file("c", ""), file("d", "")), Limits{MaxFiles: 3}, []string{"4 entries", "limit of 3"}},
		{"too big, declared", mkzip(t, zent{name: "big", data: randBytes(2 * mib)}), small, []string{`"big"`, "limit"}},
		{"too big in total, declared", mkzip(t, zent{name: "a", data: randBytes(mib / 2)}, zent{name: "b", data: randBytes(mib / 2)}, zent{name: "c", data: randBytes(mib / 2)}), small, []string{`"c"`, "limit"}},
		{"ratio bomb, truthful header", mkzip(t, zent{name: "zeros", data: make([]byte, 8*mib)}), Limits{}, []string{`"zeros"`, "zip bomb"}},
		{"bomb with a lying header", mkzip(t, zent{name: "liar", raw: true, method: zip.Deflate, data: bomb, uncompressed: 1000}), small, []string{`"liar"`, "lies about its size"}},
		{"lying header, no limits hit", mkzip(t, zent{name: "liar", raw: true, method: zip.Deflate, data: tiny, uncompressed: 2000, crc: crc32.ChecksumIEEE([]byte("hello"))}), Limits{}, []string{`"liar"`, "lies about its size"}},
		{"bad checksum", mkzip(t, zent{name: "crc", raw: true, method: zip.Deflate, data: tiny, uncompressed: 5, crc: 1234}), Limits{}, []string{`"crc"`, "corrupt"}},
		{"bad deflate data", mkzip(t, zent{name: "junk", raw: true, method: zip.Deflate, data: []byte{0xff, 0xff, 0xff, 0xff}, uncompressed: 5}), Limits{}, []string{`"junk"`, "corrupt"}},
		{"many small entries, overall ratio", mkzip(t, manySmall...), Limits{}, []string{"code is a zip bomb"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, verr := Validate(tt.zip, tt.lim)
			dir := t.TempDir()
			xerr := Extract(tt.zip, dir, tt.lim)
			for what, err := range map[string]error{"Validate": verr, "Extract": xerr} {
				if err == nil {
					t.Fatalf("%s: got nil error, want one mentioning %q", what, tt.wantMsg)
				}
				if !errs.IsInvalid(err) {
					t.Errorf("%s: got %v (kind %v), want an invalid-argument error", what, err, errs.KindOf(err))
				}
				var e *errs.Error
				if errors.As(err, &e) && e.Field != "code" {
					t.Errorf("%s: field %q, want code", what, e.Field)
				}
				for _, m := range tt.wantMsg {
					if !strings.Contains(err.Error(), m) {
						t.Errorf("%s: got %q, want it to mention %q", what, err, m)
					}
				}
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Errorf("Extract left %d entries in dir, want none", len(ents))
			}
		})
	}
}

func TestValidArchives(t *testing.T) {
	exe := zent{name: "bootstrap", mode: 0o755, data: []byte("#!/bin/sh\n")}
	tests := []struct {
		name      string
		zip       []byte
		want      Info
		wantFiles map[string]string // path → "file 0644 content" | "link target" | "dir"
	}{
		{
			name: "typical",
			zip: mkzip(t, zent{name: "./", mode: os.ModeDir | 0o755}, exe, zent{name: "lib/", mode: os.ModeDir | 0o755},
				file("lib/data.txt", "data"), zent{name: "lib/run.sh", mode: 0o700, data: []byte("run")},
				link("current", "lib"), link("lib/self", "../lib/data.txt"), link("dangling", "nowhere/x"),
				zent{name: "deep/er/file", data: make([]byte, 100<<10)}), // small zero files are not bombs
			want: Info{Files: 7, Unpacked: 10 + 4 + 3 + 100<<10, HasExecutableBootstrap: true},
			wantFiles: map[string]string{
				"bootstrap":    "file 0755 #!/bin/sh\n",
				"lib":          "dir",
				"lib/data.txt": "file 0644 data",
				"lib/run.sh":   "file 0755 run",
				"current":      "link lib",
				"lib/self":     "link ../lib/data.txt",
				"dangling":     "link nowhere/x",
				"deep":         "dir",
				"deep/er":      "dir",
			},
		},
		{
			name:      "bootstrap through a symlink",
			zip:       mkzip(t, link("bootstrap", "bin/real"), zent{name: "bin/real", mode: 0o755, data: []byte("x"), store: true}),
			want:      Info{Files: 2, Unpacked: 1, HasExecutableBootstrap: true},
			wantFiles: map[string]string{"bootstrap": "link bin/real", "bin": "dir", "bin/real": "file 0755 x"},
		},
		{
			name:      "bootstrap not executable",
			zip:       mkzip(t, file("bootstrap", "x")),
			want:      Info{Files: 1, Unpacked: 1},
			wantFiles: map[string]string{"bootstrap": "file 0644 x"},
		},
		{
			name:      "bootstrap is a directory",
			zip:       mkzip(t, zent{name: "bootstrap/", mode: os.ModeDir | 0o755}),
			want:      Info{},
			wantFiles: map[string]string{"bootstrap": "dir"},
		},
		{
			name:      "no bootstrap, dot-slash names",
			zip:       mkzip(t, file("./handler.py", "print()"), file("a//b", "b")),
			want:      Info{Files: 2, Unpacked: 8},
			wantFiles: map[string]string{"handler.py": "file 0644 print()", "a": "dir", "a/b": "file 0644 b"},
		},
		{
			name: "empty archive",
			zip:  mkzip(t),
			want: Info{},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			info, err := Validate(tt.zip, Limits{})
			if err != nil {
				t.Fatalf("Validate: %v", err)
			}
			if diff := cmp.Diff(tt.want, info); diff != "" {
				t.Errorf("Info (-want +got):\n%s", diff)
			}
			dir := t.TempDir()
			if err := Extract(tt.zip, dir, Limits{}); err != nil {
				t.Fatalf("Extract: %v", err)
			}
			got := map[string]string{}
			err = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
				if err != nil || p == dir {
					return err
				}
				rel, _ := filepath.Rel(dir, p)
				fi, err := os.Lstat(p)
				if err != nil {
					return err
				}
				switch {
				case fi.IsDir():
					got[rel] = "dir"
				case fi.Mode()&os.ModeSymlink != 0:
					target, _ := os.Readlink(p)
					got[rel] = "link " + target
				default:
					b, _ := os.ReadFile(p)
					got[rel] = "file " + fmt.Sprintf("%04o", fi.Mode().Perm()) + " " + string(b)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			for k, v := range got {
				if strings.HasPrefix(v, "file 0644 \x00") { // skip big contents
					got[k] = "file 0644 zeros"
				}
			}
			want := tt.wantFiles
			if want == nil {
				want = map[string]string{}
			}
			if _, ok := want["deep/er"]; ok {
				want["deep/er/file"] = "file 0644 zeros"
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("extracted tree (-want +got):\n%s", diff)
			}
		})
	}
}

func TestExtractNeedsEmptyDir(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "x"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	err := Extract(mkzip(t, file("a", "b")), dir, Limits{})
	if errs.KindOf(err) != errs.KindFailedPrecondition {
		t.Errorf("Extract into a non-empty dir: got %v, want failed precondition", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "a")); !os.IsNotExist(err) {
		t.Errorf("Extract wrote into a non-empty dir")
	}
	if err := Extract(mkzip(t, file("a", "b")), filepath.Join(dir, "missing"), Limits{}); err == nil {
		t.Error("Extract into a missing dir: got nil error")
	}
}

func TestExtractUmask(t *testing.T) {
	// The executable bit survives whatever the umask.
	old := syscall.Umask(0o177)
	defer syscall.Umask(old)
	dir := t.TempDir()
	if err := Extract(mkzip(t, zent{name: "bootstrap", mode: 0o755, data: []byte("x")}), dir, Limits{}); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, "bootstrap"))
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != 0o755 {
		t.Errorf("bootstrap mode: got %o, want 755", got)
	}
}
