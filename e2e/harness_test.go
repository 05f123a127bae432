package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/internal/testutil"
)

// skiffBinary builds cmd/skiff once per test run.
func skiffBinary(t *testing.T) string { return testutil.SkiffBinary(t) }

// dev is a running `skiff dev` process.
type dev struct {
	t       *testing.T
	cmd     *exec.Cmd
	dataDir string
	addr    string
	key     string
	out     *syncBuffer
	done    chan struct{}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// startDev starts `skiff dev` on dataDir (a new one when empty) and waits
// until it serves.
func startDev(t *testing.T, dataDir string, extra ...string) *dev {
	t.Helper()
	testutil.RequirePrivileged(t)
	if dataDir == "" {
		dataDir = t.TempDir()
	}
	d := &dev{t: t, dataDir: dataDir, addr: freeAddr(t), out: &syncBuffer{}, done: make(chan struct{})}
	args := append([]string{"dev", "--data-dir", dataDir, "--listen", d.addr, "--log-level", "debug",
		"--sandbox-subnet", subnetFor(dataDir)}, extra...)
	d.cmd = exec.Command(skiffBinary(t), args...)
	d.cmd.Stdout, d.cmd.Stderr = d.out, d.out
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = d.cmd.Wait(); close(d.done) }()
	t.Cleanup(func() {
		d.stop()
		if t.Failed() {
			t.Logf("skiff dev output:\n%s", d.out.String())
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		if key, err := os.ReadFile(filepath.Join(dataDir, "admin.key")); err == nil && len(key) > 0 {
			d.key = strings.TrimSpace(string(key))
			if strings.Contains(d.out.String(), "listening on") {
				break
			}
		}
		select {
		case <-d.done:
			t.Fatalf("skiff dev exited early: %v\n%s", d.cmd.ProcessState, d.out.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("skiff dev did not start within 60s:\n%s", d.out.String())
		}
	}
	return d
}

var (
	subnetMu sync.Mutex
	subnets  = map[string]string{}
)

// subnetFor gives each data dir its own sandbox subnet: a dev process that
// just stopped may still hold veths in its subnet while the kernel frees
// them, and a restart on the same data dir reclaims its own.
func subnetFor(dataDir string) string {
	subnetMu.Lock()
	defer subnetMu.Unlock()
	if s, ok := subnets[dataDir]; ok {
		return s
	}
	s := fmt.Sprintf("10.%d.%d.0/22", 200+len(subnets)/64, (len(subnets)%64)*4)
	subnets[dataDir] = s
	return s
}

// stop ends the process gracefully (SIGTERM), or kills it after a while.
func (d *dev) stop() {
	select {
	case <-d.done:
		return
	default:
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(30 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.done
	}
}

// kill ends the process with SIGKILL, as a crash would.
func (d *dev) kill() {
	_ = d.cmd.Process.Kill()
	<-d.done
}

type clients struct {
	fn     skiffv1connect.FunctionServiceClient
	invoke skiffv1connect.InvokeServiceClient
	keys   skiffv1connect.KeyServiceClient
	queue  skiffv1connect.QueueServiceClient
	esm    skiffv1connect.EventSourceServiceClient
	stream skiffv1connect.StreamServiceClient
	logs   skiffv1connect.LogServiceClient
}

var protocols = []string{"connect", "grpc"}

// client returns API clients speaking protocol ("connect" or "grpc") with
// the given key (the admin key when empty).
func (d *dev) client(protocol, key string) clients {
	if key == "" {
		key = d.key
	}
	hc := httpClient()
	opts := []connect.ClientOption{connect.WithInterceptors(bearer(key)), connect.WithSendMaxBytes(64 << 20), connect.WithReadMaxBytes(64 << 20)}
	if protocol == "grpc" {
		opts = append(opts, connect.WithGRPC())
	}
	base := "http://" + d.addr
	return clients{
		fn:     skiffv1connect.NewFunctionServiceClient(hc, base, opts...),
		invoke: skiffv1connect.NewInvokeServiceClient(hc, base, opts...),
		keys:   skiffv1connect.NewKeyServiceClient(hc, base, opts...),
		queue:  skiffv1connect.NewQueueServiceClient(hc, base, opts...),
		esm:    skiffv1connect.NewEventSourceServiceClient(hc, base, opts...),
		stream: skiffv1connect.NewStreamServiceClient(hc, base, opts...),
		logs:   skiffv1connect.NewLogServiceClient(hc, base, opts...),
	}
}

func httpClient() *http.Client {
	return &http.Client{Transport: &http.Transport{
		Protocols:           h2c(),
		MaxIdleConnsPerHost: 64,
		TLSClientConfig:     &tls.Config{},
	}}
}

func h2c() *http.Protocols {
	p := new(http.Protocols)
	p.SetUnencryptedHTTP2(true)
	return p
}

type bearer string

func (b bearer) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, r connect.AnyRequest) (connect.AnyResponse, error) {
		r.Header().Set("Authorization", "Bearer "+string(b))
		return next(ctx, r)
	}
}

func (b bearer) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, s connect.Spec) connect.StreamingClientConn {
		c := next(ctx, s)
		c.RequestHeader().Set("Authorization", "Bearer "+string(b))
		return c
	}
}

func (b bearer) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

// createFunction creates a function from the test function zip.
func createFunction(t *testing.T, c clients, name string, cfg *skiffv1.FunctionConfig) *skiffv1.Function {
	t.Helper()
	if cfg == nil {
		cfg = &skiffv1.FunctionConfig{}
	}
	if cfg.Runtime == "" {
		cfg.Runtime = "provided"
	}
	resp, err := c.fn.CreateFunction(context.Background(), connect.NewRequest(&skiffv1.CreateFunctionRequest{
		Name: name, Config: cfg, ZipFile: testutil.FunctionZip(t, "testfn"),
	}))
	if err != nil {
		t.Fatalf("creating %s: %v", name, err)
	}
	return resp.Msg.GetFunction()
}

func invoke(ctx context.Context, c clients, name, payload string) (*skiffv1.InvokeResponse, error) {
	resp, err := c.invoke.Invoke(ctx, connect.NewRequest(&skiffv1.InvokeRequest{
		FunctionName: name, Payload: []byte(payload), LogType: skiffv1.LogType_LOG_TYPE_TAIL,
	}))
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}

func mustInvoke(t *testing.T, c clients, name, payload string) *skiffv1.InvokeResponse {
	t.Helper()
	r, err := invoke(context.Background(), c, name, payload)
	if err != nil {
		t.Fatalf("invoking %s with %.80s: %v", name, payload, err)
	}
	return r
}

func TestMain(m *testing.M) {
	code := m.Run()
	testutil.RemoveSkiffBinary()
	os.Exit(code)
}
