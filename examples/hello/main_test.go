package main

import (
	"archive/zip"
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-lambda-go/lambda"

	"skiff.dev/skiff/internal/testutil"
)

func TestHandle(t *testing.T) {
	tests := []struct {
		payload string
		want    string
	}{
		{`{"name":"skiff"}`, `{"message":"hello, skiff!"}`},
		{`{}`, `{"message":"hello, world!"}`},
		{`{"name":""}`, `{"message":"hello, world!"}`},
		{`{"other":1}`, `{"message":"hello, world!"}`},
	}
	// Through the library's own handler wrapping, as the runtime calls it.
	h := lambda.NewHandler(handle)
	for _, tt := range tests {
		got, err := h.Invoke(context.Background(), []byte(tt.payload))
		if err != nil {
			t.Errorf("Invoke(%s): %v", tt.payload, err)
			continue
		}
		if string(got) != tt.want {
			t.Errorf("Invoke(%s) = %s, want %s", tt.payload, got, tt.want)
		}
	}
	if _, err := h.Invoke(context.Background(), []byte(`not json`)); err == nil {
		t.Errorf("Invoke(not json) succeeded, want an error")
	}
}

// TestBuildsAsBootstrap builds the function the way `make run` does and
// checks the zip a user deploys: one executable bootstrap.
func TestBuildsAsBootstrap(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a binary")
	}
	out := filepath.Join(t.TempDir(), "bootstrap")
	cmd := exec.Command("go", "build", "-tags", "lambda.norpc", "-trimpath", "-ldflags", "-s -w", "-o", out, "./examples/hello")
	cmd.Dir = testutil.RepoRoot(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, b)
	}
	z := testutil.ZipFiles(t, map[string]testutil.ZipEntry{"bootstrap": {Path: out, Mode: 0o755}})
	zr, err := zip.NewReader(bytes.NewReader(z), int64(len(z)))
	if err != nil {
		t.Fatal(err)
	}
	if len(zr.File) != 1 || zr.File[0].Name != "bootstrap" || zr.File[0].Mode()&0o111 == 0 {
		t.Fatalf("zip holds %v, want one executable bootstrap", zr.File)
	}
	// Run it against a minimal Runtime API on loopback: one event, and the
	// response must come back to /response.
	got := make(chan string, 1)
	mux := http.NewServeMux()
	var served atomic.Bool
	mux.HandleFunc("GET /2018-06-01/runtime/invocation/next", func(w http.ResponseWriter, r *http.Request) {
		if !served.CompareAndSwap(false, true) { // no more events: hold the poll until the test ends
			<-r.Context().Done()
			return
		}
		w.Header().Set("Lambda-Runtime-Aws-Request-Id", "req-1")
		w.Header().Set("Lambda-Runtime-Deadline-Ms", strconv.FormatInt(time.Now().Add(time.Minute).UnixMilli(), 10))
		w.Header().Set("Lambda-Runtime-Invoked-Function-Arn", "arn:aws:lambda:local:000000000000:function:hello")
		_, _ = io.WriteString(w, `{"name":"runtime"}`)
	})
	mux.HandleFunc("POST /2018-06-01/runtime/invocation/req-1/response", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got <- string(b)
		w.WriteHeader(http.StatusAccepted)
	})
	api := httptest.NewServer(mux)
	defer api.Close()

	run := exec.Command(out)
	run.Env = []string{"AWS_LAMBDA_RUNTIME_API=" + strings.TrimPrefix(api.URL, "http://")}
	var logs bytes.Buffer
	run.Stdout, run.Stderr = &logs, &logs
	if err := run.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = run.Process.Kill()
		_ = run.Wait()
	}()
	select {
	case resp := <-got:
		if want := `{"message":"hello, runtime!"}`; resp != want {
			t.Errorf("response %s, want %s", resp, want)
		}
	case <-time.After(30 * time.Second):
		_ = run.Process.Kill()
		_ = run.Wait()
		t.Fatalf("no response from the function within 30s; output %q", logs.String())
	}
}
