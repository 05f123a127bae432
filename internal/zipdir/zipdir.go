// Package zipdir zips a directory tree as a Lambda deployment archive:
// deterministic (sorted entries, fixed timestamps, so the same tree gives
// the same code digest), permission bits kept, symlinks stored as links and
// refused when they leave the tree.
package zipdir

import (
	"archive/zip"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// zipEpoch is the modification time of every archive entry, so that zipping
// the same tree twice gives the same bytes (and the same code digest).
var zipEpoch = time.Date(1980, 1, 1, 0, 0, 0, 0, time.UTC)

// Entry is one file or symlink to archive.
type Entry struct {
	name string      // slash-separated path inside the archive
	path string      // path on disk
	mode fs.FileMode // permission bits, plus ModeSymlink for links
	size int64       // bytes of content (the target, for a link)
	link string      // symlink target
}

// Scan lists the regular files and symlinks under root in a
// deterministic order (sorted by archive name). Directories are implied by
// their files. Symlinks must stay inside root; other file types are
// rejected.
func Scan(root string) ([]Entry, error) {
	realRoot, err := filepath.EvalSymlinks(root)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", root, err)
	}
	if st, err := os.Stat(realRoot); err != nil {
		return nil, fmt.Errorf("reading %s: %w", root, err)
	} else if !st.IsDir() {
		return nil, fmt.Errorf("%s is not a directory", root)
	}
	var out []Entry
	err = filepath.WalkDir(realRoot, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		rel, err := filepath.Rel(realRoot, p)
		if err != nil {
			return err
		}
		name := filepath.ToSlash(rel)
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case info.Mode().IsRegular():
			out = append(out, Entry{name: name, path: p, mode: info.Mode().Perm(), size: info.Size()})
		case info.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			if err := checkLink(realRoot, p, name, target); err != nil {
				return err
			}
			out = append(out, Entry{name: name, path: p, mode: fs.ModeSymlink | 0o777, size: int64(len(target)), link: target})
		default:
			return fmt.Errorf("%s: unsupported file type %s", name, info.Mode().Type())
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", root, err)
	}
	slices.SortFunc(out, func(a, b Entry) int { return strings.Compare(a.name, b.name) })
	return out, nil
}

// checkLink rejects a symlink that points outside the tree: skiff refuses
// such archives, so fail here with the file's name.
func checkLink(realRoot, p, name, target string) error {
	if path.IsAbs(target) || filepath.IsAbs(target) {
		return fmt.Errorf("symlink %s points to the absolute path %s; only links inside the directory can be archived", name, target)
	}
	lexical := path.Join(path.Dir(name), filepath.ToSlash(target))
	if lexical == ".." || strings.HasPrefix(lexical, "../") {
		return fmt.Errorf("symlink %s -> %s points outside the directory", name, target)
	}
	// Through other links the target may still leave the tree.
	if resolved, err := filepath.EvalSymlinks(p); err == nil {
		if rel, err := filepath.Rel(realRoot, resolved); err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
			return fmt.Errorf("symlink %s -> %s resolves outside the directory", name, target)
		}
	}
	return nil
}

// TotalSize is the sum of the entries' sizes.
func TotalSize(entries []Entry) int64 {
	var n int64
	for _, e := range entries {
		n += e.size
	}
	return n
}

// Write archives entries into w: files deflated with their permission
// bits (so executables stay executable), symlinks stored as links (the
// target as content), every entry with the same timestamp. progress, when
// not nil, is told how many content bytes were archived.
func Write(w io.Writer, entries []Entry, progress func(n int64)) error {
	zw := zip.NewWriter(w)
	for _, e := range entries {
		h := &zip.FileHeader{Name: e.name, Method: zip.Deflate, Modified: zipEpoch}
		h.SetMode(e.mode)
		if e.link != "" {
			h.Method = zip.Store
		}
		fw, err := zw.CreateHeader(h)
		if err != nil {
			return fmt.Errorf("archiving %s: %w", e.name, err)
		}
		if e.link != "" {
			if _, err := io.WriteString(fw, e.link); err != nil {
				return fmt.Errorf("archiving %s: %w", e.name, err)
			}
		} else if err := copyFile(fw, e.path, progress); err != nil {
			return fmt.Errorf("archiving %s: %w", e.name, err)
		}
		if progress != nil && e.link != "" {
			progress(e.size)
		}
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("finishing archive: %w", err)
	}
	return nil
}

func copyFile(w io.Writer, p string, progress func(int64)) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	if progress != nil {
		w = progressWriter{w, progress}
	}
	_, err = io.Copy(w, f)
	return err
}

type progressWriter struct {
	w io.Writer
	f func(int64)
}

func (p progressWriter) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	p.f(int64(n))
	return n, err
}
