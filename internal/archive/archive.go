// Package archive validates Lambda deployment packages (zip archives) and
// extracts them safely. The gateway calls Validate when code is uploaded;
// the agent calls Extract when it unpacks code (agent/codecache makes that
// atomic).
//
// Nothing in an archive is trusted: entry names are checked for traversal
// (.., absolute paths, backslashes), symlinks must resolve inside the root
// (following the archive's own symlinks), entries may not be duplicated,
// nested under a file or a symlink, encrypted, or be devices, fifos or
// sockets, and sizes are counted while decompressing (headers are only a
// first, cheap check) against a total limit and a compression-ratio limit.
// Every failure is an errs.Invalid on the field "code" naming the entry.
package archive

import (
	"archive/zip"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"

	"skiff.dev/skiff/internal/errs"
)

// Default limits, Lambda's.
const (
	DefaultMaxUnpacked = 250 << 20
	DefaultMaxRatio    = 100
	DefaultMaxFiles    = 20000
)

const (
	// ratioSlack is the unpacked size below which an entry (or a whole
	// archive) is never considered a ratio bomb: small files of repeated
	// bytes legitimately compress far better than 100:1.
	ratioSlack = 1 << 20
	// maxLinkTarget bounds a symlink's target (Linux's PATH_MAX).
	maxLinkTarget = 4095
	maxNameBytes  = 4095 // PATH_MAX, for an entry's whole name
	maxElemBytes  = 255  // NAME_MAX, for one path element
	maxLinkHops   = 40   // Linux's MAXSYMLINKS
	field         = "code"
)

// Limits bound what an archive may unpack to. Zero fields take the defaults.
type Limits struct {
	MaxUnpacked int64 // total bytes unpacked (default 250 MiB)
	MaxRatio    int   // unpacked/packed, per entry and overall (default 100)
	MaxFiles    int   // entries, directories included (default 20000)
}

func (l Limits) withDefaults() Limits {
	if l.MaxUnpacked <= 0 {
		l.MaxUnpacked = DefaultMaxUnpacked
	}
	if l.MaxRatio <= 0 {
		l.MaxRatio = DefaultMaxRatio
	}
	if l.MaxFiles <= 0 {
		l.MaxFiles = DefaultMaxFiles
	}
	return l
}

// Info describes a valid archive.
type Info struct {
	Files                  int   // regular files and symlinks
	Unpacked               int64 // bytes of regular files, as counted while decompressing
	HasExecutableBootstrap bool  // "bootstrap" at the root is (or links to) an executable regular file
}

type kind uint8

const (
	kindDir kind = iota + 1
	kindFile
	kindLink
)

func (k kind) String() string {
	switch k {
	case kindDir:
		return "directory"
	case kindFile:
		return "file"
	case kindLink:
		return "symlink"
	}
	return "entry"
}

type entry struct {
	f      *zip.File
	name   string // cleaned, relative, no trailing slash
	kind   kind
	exec   bool
	target string // for symlinks
}

// plan is an archive whose structure has been checked.
type plan struct {
	lim     Limits
	packed  int64
	entries []*entry
	byName  map[string]*entry
}

// Validate checks zipBytes fully, decompressing every entry, without
// writing anything.
func Validate(zipBytes []byte, lim Limits) (Info, error) {
	p, err := check(zipBytes, lim)
	if err != nil {
		return Info{}, err
	}
	unpacked, err := p.unpack(func(*entry) (io.Writer, func() error, error) { return io.Discard, nil, nil })
	if err != nil {
		return Info{}, err
	}
	return p.info(unpacked), nil
}

// Extract checks zipBytes and unpacks it into dir, which must exist and be
// empty. Files get mode 0755 when the archive gives them any executable bit,
// else 0644; directories 0755 (subject to the umask). Symlinks are created
// last, and no entry is ever written through a symlink. On error, dir is
// left empty.
func Extract(zipBytes []byte, dir string, lim Limits) (err error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return errs.New(errs.KindFailedPrecondition, "extracting code: %w", err)
	}
	if len(ents) > 0 {
		return errs.New(errs.KindFailedPrecondition, "extracting code into %s: directory is not empty", dir)
	}
	p, err := check(zipBytes, lim)
	if err != nil {
		return err
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return errs.Internal("extracting code: %w", err)
	}
	defer root.Close()
	defer func() {
		if err != nil {
			if cerr := emptyDir(dir); cerr != nil {
				err = errors.Join(err, cerr)
			}
		}
	}()

	for _, e := range p.entries {
		dirName := e.name
		if e.kind != kindDir {
			dirName = path.Dir(e.name)
		}
		if dirName != "." {
			if err := root.MkdirAll(dirName, 0o755); err != nil {
				return errs.Internal("extracting entry %q: %w", e.f.Name, err)
			}
		}
	}
	if _, err := p.unpack(func(e *entry) (io.Writer, func() error, error) {
		mode := os.FileMode(0o644)
		if e.exec {
			mode = 0o755
		}
		// O_EXCL: never open an existing file, nor follow a symlink.
		f, err := root.OpenFile(e.name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
		if err != nil {
			return nil, nil, errs.Internal("extracting entry %q: %w", e.f.Name, err)
		}
		if err := f.Chmod(mode); err != nil { // the umask must not drop the x bit
			f.Close()
			return nil, nil, errs.Internal("extracting entry %q: %w", e.f.Name, err)
		}
		return f, f.Close, nil
	}); err != nil {
		return err
	}
	for _, e := range p.entries {
		if e.kind == kindLink {
			if err := root.Symlink(e.target, e.name); err != nil {
				return errs.Internal("extracting symlink %q: %w", e.f.Name, err)
			}
		}
	}
	return nil
}

// emptyDir removes everything inside dir (never following symlinks).
func emptyDir(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	var errsOut []error
	for _, e := range ents {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			errsOut = append(errsOut, err)
		}
	}
	return errors.Join(errsOut...)
}

func invalid(format string, args ...any) error { return errs.Invalid(field, format, args...) }

// check validates everything that can be known without decompressing file
// contents (symlink targets are read: they are small).
func check(zipBytes []byte, lim Limits) (*plan, error) {
	lim = lim.withDefaults()
	zr, err := zip.NewReader(bytes.NewReader(zipBytes), int64(len(zipBytes)))
	if err != nil && !errors.Is(err, zip.ErrInsecurePath) { // insecure paths get our own, clearer error below
		return nil, invalid("code is not a valid zip archive: %w", err)
	}
	if len(zr.File) > lim.MaxFiles {
		return nil, invalid("code has %d entries, more than the limit of %d", len(zr.File), lim.MaxFiles)
	}
	p := &plan{lim: lim, packed: int64(len(zipBytes)), byName: make(map[string]*entry, len(zr.File))}
	var declared uint64
	for _, f := range zr.File {
		e, err := checkEntry(f, lim)
		if err != nil {
			return nil, err
		}
		if e == nil { // the root directory itself
			continue
		}
		if prev, ok := p.byName[e.name]; ok {
			return nil, invalid("entry %q duplicates entry %q", f.Name, prev.f.Name)
		}
		p.byName[e.name] = e
		p.entries = append(p.entries, e)
		if e.kind == kindFile {
			declared += f.UncompressedSize64 // each is ≤ MaxUnpacked: no overflow
			if declared > uint64(lim.MaxUnpacked) {
				return nil, invalid("code unpacks to more than the limit of %d bytes (declared sizes, at entry %q)", lim.MaxUnpacked, f.Name)
			}
		}
	}
	for _, e := range p.entries {
		// No entry may live under a file or a symlink: extraction would
		// write through the link, or fail.
		for d := path.Dir(e.name); d != "."; d = path.Dir(d) {
			if parent, ok := p.byName[d]; ok && parent.kind != kindDir {
				return nil, invalid("entry %q is inside %q, which is a %s", e.f.Name, parent.f.Name, parent.kind)
			}
		}
	}
	for _, e := range p.entries {
		if e.kind == kindLink {
			if _, err := p.resolve(e.name); err != nil {
				return nil, invalid("symlink %q -> %q: %w", e.f.Name, e.target, err)
			}
		}
	}
	return p, nil
}

// checkEntry checks one entry's header; it returns nil for the root
// directory ("./").
func checkEntry(f *zip.File, lim Limits) (*entry, error) {
	name, err := cleanName(f.Name)
	if err != nil {
		return nil, invalid("entry %q: %w", f.Name, err)
	}
	if f.Flags&0x1 != 0 {
		return nil, invalid("entry %q is encrypted", f.Name)
	}
	if f.Method != zip.Store && f.Method != zip.Deflate {
		return nil, invalid("entry %q uses unsupported compression method %d", f.Name, f.Method)
	}
	mode := f.Mode()
	e := &entry{f: f, name: name}
	switch {
	case mode.IsDir():
		e.kind = kindDir
		if f.UncompressedSize64 != 0 {
			return nil, invalid("directory entry %q has content", f.Name)
		}
	case mode&os.ModeSymlink != 0:
		e.kind = kindLink
	case mode.IsRegular():
		e.kind = kindFile
		e.exec = mode&0o111 != 0
	default:
		return nil, invalid("entry %q is a %s, not a file, directory or symlink", f.Name, typeName(mode))
	}
	if name == "." {
		if e.kind != kindDir {
			return nil, invalid("entry %q names the root directory", f.Name)
		}
		return nil, nil
	}
	switch e.kind {
	case kindFile:
		if f.UncompressedSize64 > uint64(lim.MaxUnpacked) {
			return nil, invalid("entry %q unpacks to %d bytes, more than the limit of %d", f.Name, f.UncompressedSize64, lim.MaxUnpacked)
		}
		if f.UncompressedSize64 > ratioSlack && f.UncompressedSize64/uint64(lim.MaxRatio) > f.CompressedSize64 {
			return nil, invalid("entry %q is a zip bomb: it unpacks to more than %d times its compressed size", f.Name, lim.MaxRatio)
		}
	case kindLink:
		if e.target, err = readLink(f); err != nil {
			return nil, invalid("symlink %q: %w", f.Name, err)
		}
	}
	return e, nil
}

func typeName(m os.FileMode) string {
	switch {
	case m&os.ModeNamedPipe != 0:
		return "fifo"
	case m&os.ModeSocket != 0:
		return "socket"
	case m&os.ModeCharDevice != 0:
		return "character device"
	case m&os.ModeDevice != 0:
		return "device"
	}
	return "special file"
}

// cleanName checks an entry name and returns it cleaned: relative, with
// "/" separators, no "." or empty elements, no trailing slash.
func cleanName(name string) (string, error) {
	switch {
	case name == "":
		return "", errors.New("empty name")
	case strings.ContainsRune(name, '\\'):
		return "", errors.New("name contains a backslash")
	case strings.ContainsRune(name, 0):
		return "", errors.New("name contains a NUL byte")
	case name[0] == '/':
		return "", errors.New("absolute path")
	case len(name) >= 2 && name[1] == ':':
		return "", errors.New("absolute (drive letter) path")
	case len(name) > maxNameBytes:
		return "", errors.New("name too long")
	}
	for _, el := range strings.Split(name, "/") {
		if el == ".." {
			return "", errors.New("path traverses \"..\"")
		}
		if len(el) > maxElemBytes {
			return "", errors.New("path element too long")
		}
	}
	return path.Clean(name), nil
}

func readLink(f *zip.File) (string, error) {
	if f.UncompressedSize64 > maxLinkTarget {
		return "", errors.New("target too long")
	}
	rc, err := f.Open()
	if err != nil {
		return "", fmt.Errorf("corrupt: %w", err)
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, maxLinkTarget+1))
	if err != nil {
		return "", fmt.Errorf("corrupt: %w", err)
	}
	t := string(b)
	switch {
	case len(b) > maxLinkTarget:
		return "", errors.New("target too long")
	case t == "":
		return "", errors.New("empty target")
	case strings.ContainsRune(t, 0):
		return "", errors.New("target contains a NUL byte")
	case t[0] == '/':
		return "", errors.New("absolute target points outside the code root")
	}
	return t, nil
}

// resolve follows name through the archive's own symlinks, as the kernel
// would inside the extracted tree, and returns where it ends. It fails when
// the path leaves the root at any step or loops.
func (p *plan) resolve(name string) (string, error) {
	var cur []string
	todo := strings.Split(name, "/")
	hops := 0
	for len(todo) > 0 {
		el := todo[0]
		todo = todo[1:]
		switch el {
		case "", ".":
			continue
		case "..":
			if len(cur) == 0 {
				return "", errors.New("target points outside the code root")
			}
			cur = cur[:len(cur)-1]
			continue
		}
		cur = append(cur, el)
		e, ok := p.byName[strings.Join(cur, "/")]
		if !ok || e.kind != kindLink {
			continue
		}
		if hops++; hops > maxLinkHops {
			return "", errors.New("too many levels of symlinks")
		}
		cur = cur[:len(cur)-1]
		if strings.HasPrefix(e.target, "/") {
			return "", errors.New("target points outside the code root")
		}
		todo = append(strings.Split(e.target, "/"), todo...)
	}
	return strings.Join(cur, "/"), nil
}

// unpack decompresses every regular file into the writer open gives it,
// counting bytes against the limits. It returns the bytes unpacked.
func (p *plan) unpack(open func(*entry) (w io.Writer, closeFn func() error, err error)) (int64, error) {
	var total int64
	for _, e := range p.entries {
		if e.kind != kindFile {
			continue
		}
		// This entry may unpack to no more than what is left of the total
		// limit, nor more than its ratio allows.
		allowed := p.lim.MaxUnpacked - total
		packed := int64(min(e.f.CompressedSize64, uint64(p.packed))) // a header may lie
		ratioAllowed := packed*int64(p.lim.MaxRatio) + ratioSlack
		if ratioAllowed < allowed {
			allowed = ratioAllowed
		}
		w, closeFn, err := open(e)
		if err != nil {
			return total, err
		}
		n, err := copyEntry(w, e.f, allowed)
		if closeFn != nil {
			if cerr := closeFn(); err == nil && cerr != nil {
				err = errs.Internal("extracting entry %q: %w", e.f.Name, cerr)
			}
		}
		total += n
		switch {
		case errors.Is(err, errTooBig):
			if allowed == ratioAllowed {
				return total, invalid("entry %q is a zip bomb: it unpacks to more than %d times its compressed size", e.f.Name, p.lim.MaxRatio)
			}
			return total, invalid("code unpacks to more than the limit of %d bytes (at entry %q)", p.lim.MaxUnpacked, e.f.Name)
		case err != nil:
			return total, err
		}
		if total > ratioSlack && total/int64(p.lim.MaxRatio) > p.packed {
			return total, invalid("code is a zip bomb: it unpacks to more than %d times its size (at entry %q)", p.lim.MaxRatio, e.f.Name)
		}
	}
	return total, nil
}

var errTooBig = errors.New("entry too big")

// copyEntry decompresses f into w, reading at most allowed bytes.
func copyEntry(w io.Writer, f *zip.File, allowed int64) (int64, error) {
	rc, err := f.Open()
	if err != nil {
		return 0, invalid("entry %q is corrupt: %w", f.Name, err)
	}
	defer rc.Close()
	r := &readErrs{r: rc}
	n, err := io.Copy(w, &io.LimitedReader{R: r, N: allowed + 1})
	switch {
	case n > allowed:
		return n, errTooBig
	case r.err != nil:
		// Decompression failed: a bad checksum, bad data, or more or less
		// data than the header declared.
		return n, invalid("entry %q is corrupt or lies about its size: %w", f.Name, r.err)
	case err != nil:
		return n, errs.Internal("extracting entry %q: %w", f.Name, err)
	}
	return n, nil
}

// readErrs records a reader's error, to tell the archive's faults from the
// writer's.
type readErrs struct {
	r   io.Reader
	err error
}

func (r *readErrs) Read(b []byte) (int, error) {
	n, err := r.r.Read(b)
	if err != nil && err != io.EOF {
		r.err = err
	}
	return n, err
}

func (p *plan) info(unpacked int64) Info {
	info := Info{Unpacked: unpacked}
	for _, e := range p.entries {
		if e.kind != kindDir {
			info.Files++
		}
	}
	if final, err := p.resolve("bootstrap"); err == nil {
		if e, ok := p.byName[final]; ok && e.kind == kindFile && e.exec {
			info.HasExecutableBootstrap = true
		}
	}
	return info
}
