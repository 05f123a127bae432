package main

import (
	"archive/zip"
	"bytes"
	"context"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// latencies summarises a sample of request-to-response times.
type latencies struct {
	n        int
	p50, p99 time.Duration
	mean     time.Duration
}

// summarize returns the nearest-rank median and 99th percentile of d.
func summarize(d []time.Duration) latencies {
	if len(d) == 0 {
		return latencies{}
	}
	s := slices.Clone(d)
	slices.Sort(s)
	var sum time.Duration
	for _, v := range s {
		sum += v
	}
	return latencies{n: len(s), p50: rank(s, 0.50), p99: rank(s, 0.99), mean: sum / time.Duration(len(s))}
}

// rank is the nearest-rank percentile p (0-1] of the sorted sample s.
func rank(s []time.Duration, p float64) time.Duration {
	i := int(math.Ceil(p*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

// ms formats d in milliseconds with a precision that suits its size.
func ms(d time.Duration) string {
	v := float64(d) / float64(time.Millisecond)
	switch {
	case v == 0:
		return "0 ms"
	case v < 1:
		return fmt.Sprintf("%.3f ms", v)
	case v < 100:
		return fmt.Sprintf("%.2f ms", v)
	default:
		return fmt.Sprintf("%.0f ms", v)
	}
}

// function is the echo test function built once per run: the static
// bootstrap binary and its Lambda zip.
type function struct {
	bootstrap string // path of the binary
	zip       []byte
}

// buildFunction builds testdata/functions/testfn (aws-lambda-go, echoes its
// payload) as a custom runtime bootstrap under dir, exactly as the tests'
// testutil.FunctionZip does, and zips it.
func buildFunction(ctx context.Context, repo, dir string) (*function, error) {
	out := filepath.Join(dir, "bootstrap")
	cmd := exec.CommandContext(ctx, "go", "build", "-tags", "lambda.norpc", "-trimpath", "-ldflags", "-s -w", "-o", out, "./testdata/functions/testfn")
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux")
	if b, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("building the test function: %w\n%s", err, b)
	}
	bin, err := os.ReadFile(out)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	h := &zip.FileHeader{Name: "bootstrap", Method: zip.Deflate}
	h.SetMode(0o755)
	w, err := zw.CreateHeader(h)
	if err != nil {
		return nil, err
	}
	if _, err := w.Write(bin); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return &function{bootstrap: out, zip: buf.Bytes()}, nil
}

// repoRoot returns the directory of the main module (where go.mod is).
func repoRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("finding the module root: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", fmt.Errorf("not inside the skiff module: run from the repository")
	}
	return filepath.Dir(mod), nil
}

// echoPayload is the payload every latency measurement sends; the function
// echoes it.
var echoPayload = []byte(`{"x":1}`)

// checkEcho reports an unexpected response body.
func checkEcho(got []byte) error {
	if !bytes.Equal(bytes.TrimSpace(got), echoPayload) {
		return fmt.Errorf("got response %q, want the echo %q", got, echoPayload)
	}
	return nil
}
