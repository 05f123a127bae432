// Package testutil holds helpers shared by skiff's tests: the gate for
// privileged tests and the builder of real Lambda test functions.
package testutil

import (
	"archive/zip"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// PrivilegedEnv is the variable that makes privileged tests mandatory:
// with it set to 1 (make test sets it), a privileged test fails instead of
// skipping when not run as root.
const PrivilegedEnv = "SKIFF_PRIVILEGED_TESTS"

// RequirePrivileged skips t on a non-root developer machine, and fails it
// when SKIFF_PRIVILEGED_TESTS=1 says privileged tests must run.
func RequirePrivileged(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 && runtime.GOOS == "linux" {
		return
	}
	if os.Getenv(PrivilegedEnv) == "1" {
		t.Fatalf("privileged test needs root on Linux, and %s=1 forbids skipping it", PrivilegedEnv)
	}
	t.Skip("privileged test: needs root on Linux")
}

// RepoRoot returns the repository's top directory.
func RepoRoot(t testing.TB) string {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

var (
	buildMu    sync.Mutex
	buildCache = map[string][]byte{}
)

// FunctionZip builds the Lambda function in testdata/functions/<name> with
// aws-lambda-go as a custom-runtime `bootstrap` (GOOS=linux, CGO off,
// -tags lambda.norpc) and returns it zipped, as a user would deploy it.
// Builds are cached per test binary.
func FunctionZip(t testing.TB, name string) []byte {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if z, ok := buildCache[name]; ok {
		return z
	}
	bin := BuildFunction(t, name)
	z := ZipFiles(t, map[string]ZipEntry{"bootstrap": {Path: bin, Mode: 0o755}})
	buildCache[name] = z
	return z
}

// BuildFunction builds testdata/functions/<name> and returns the path of the
// static binary.
func BuildFunction(t testing.TB, name string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "bootstrap")
	cmd := exec.Command("go", "build", "-tags", "lambda.norpc", "-trimpath", "-ldflags", "-s -w", "-o", out, "./testdata/functions/"+name)
	cmd.Dir = RepoRoot(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building function %s: %v\n%s", name, err, b)
	}
	return out
}

// ZipEntry is a file to put in a test archive: the content of Path, or Data.
type ZipEntry struct {
	Path string
	Data []byte
	Mode os.FileMode
}

// ZipFiles makes a zip archive of the given entries.
func ZipFiles(t testing.TB, files map[string]ZipEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for name, e := range files {
		data := e.Data
		if e.Path != "" {
			var err error
			if data, err = os.ReadFile(e.Path); err != nil {
				t.Fatal(err)
			}
		}
		mode := e.Mode
		if mode == 0 {
			mode = 0o644
		}
		h := &zip.FileHeader{Name: name, Method: zip.Deflate}
		h.SetMode(mode)
		w, err := zw.CreateHeader(h)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(data); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// ChildPIDs lists the live processes whose parent is pid.
func ChildPIDs(pid int) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		child, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// Fields after the command name (which may hold spaces): state, ppid.
		s := string(b)
		fields := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
		if len(fields) > 1 {
			if ppid, _ := strconv.Atoi(fields[1]); ppid == pid {
				out = append(out, child)
			}
		}
	}
	return out
}

var (
	skiffMu  sync.Mutex
	skiffBin string
)

// SkiffBinary builds cmd/skiff once per test binary (CGO off, as
// released) and returns its path, for tests that run real skiff
// processes. The binary outlives the test that built it (later tests use
// it too), so it lives in a directory of the system's temporary space.
func SkiffBinary(t testing.TB) string {
	t.Helper()
	skiffMu.Lock()
	defer skiffMu.Unlock()
	if skiffBin != "" {
		return skiffBin
	}
	dir, err := os.MkdirTemp("", "skiff-test-bin")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "skiff")
	cmd := exec.Command("go", "build", "-o", path, "./cmd/skiff")
	cmd.Dir = RepoRoot(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building skiff: %v\n%s", err, out)
	}
	skiffBin = path
	return path
}

// RemoveSkiffBinary removes what SkiffBinary built; call it from TestMain
// after m.Run.
func RemoveSkiffBinary() {
	skiffMu.Lock()
	defer skiffMu.Unlock()
	if skiffBin != "" {
		_ = os.RemoveAll(filepath.Dir(skiffBin))
		skiffBin = ""
	}
}
