package archive

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"skiff.dev/skiff/internal/errs"
)

// FuzzArchive feeds arbitrary bytes to Validate and Extract: they must
// agree, fail only with invalid-argument errors, leave dir empty on failure,
// and on success leave only regular files, directories and symlinks whose
// targets are relative, all inside dir.
func FuzzArchive(f *testing.F) {
	seeds := [][]byte{
		mkzip(f, zent{name: "bootstrap", mode: 0o755, data: []byte("#!/bin/sh\necho hi\n")}, file("lib/a.txt", "a")),
		mkzip(f, link("current", "lib"), file("lib/x", "x"), link("lib/up", "../current")),
		mkzip(f, link("up", "../outside")),
		mkzip(f, link("a/b/root", "../.."), link("m", "a/b/root/../x")),
		mkzip(f, file("../evil", "x")),
		mkzip(f, file("a", "x"), file("a/b", "y")),
		mkzip(f, zent{name: "p", mode: os.ModeNamedPipe | 0o666}),
		mkzip(f, zent{name: "z", data: make([]byte, 200<<10)}),
		mkzip(f, zent{name: "s", store: true, data: []byte("stored")}),
		[]byte("PK\x03\x04"),
		nil,
	}
	for _, s := range seeds {
		f.Add(s)
	}
	lim := Limits{MaxUnpacked: 1 << 20, MaxFiles: 64}
	f.Fuzz(func(t *testing.T, data []byte) {
		info, verr := Validate(data, lim)
		dir := t.TempDir()
		xerr := Extract(data, dir, lim)
		if (verr == nil) != (xerr == nil) {
			t.Fatalf("Validate and Extract disagree: %v vs %v", verr, xerr)
		}
		for _, err := range []error{verr, xerr} {
			if err != nil && !errs.IsInvalid(err) {
				t.Fatalf("got %v (kind %v), want an invalid-argument error", err, errs.KindOf(err))
			}
		}
		n := 0
		err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err != nil || p == dir {
				return err
			}
			fi, err := os.Lstat(p)
			if err != nil {
				return err
			}
			switch {
			case fi.IsDir():
				return nil
			case fi.Mode().IsRegular():
			case fi.Mode()&os.ModeSymlink != 0:
				target, err := os.Readlink(p)
				if err != nil {
					return err
				}
				if filepath.IsAbs(target) {
					return errors.New("absolute symlink " + p + " -> " + target)
				}
				rel, _ := filepath.Rel(dir, filepath.Join(filepath.Dir(p), target))
				if rel == ".." || strings.HasPrefix(rel, "../") {
					return errors.New("escaping symlink " + p + " -> " + target)
				}
			default:
				return errors.New("special file " + p)
			}
			n++
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if xerr != nil {
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Fatalf("failed Extract (%v) left %d entries", xerr, len(ents))
			}
			return
		}
		if n != info.Files {
			t.Fatalf("extracted %d files and symlinks, Info says %d", n, info.Files)
		}
	})
}
