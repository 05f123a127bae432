package e2e

import (
	"archive/zip"
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/internal/testutil"
)

// TestBadInputChangesNothing sends hostile archives and out-of-range
// settings through the real stack: each gets InvalidArgument naming the
// field, and nothing is stored.
func TestBadInputChangesNothing(t *testing.T) {
	d := startDev(t, "")
	c := d.client("connect", "")
	good := testutil.FunctionZip(t, "testfn")
	traversal := rawZip(t, map[string]string{"../evil": "x", "bootstrap": "#!/bin/sh\n"})
	noBootstrap := rawZip(t, map[string]string{"main.sh": "#!/bin/sh\n"})
	bomb := rawZip(t, map[string]string{"bootstrap": strings.Repeat("\x00", 200<<20)})
	cases := []struct {
		name  string
		fn    string
		cfg   *skiffv1.FunctionConfig
		zip   []byte
		field string
	}{
		{"bad name", "no spaces allowed", nil, good, "name"},
		{"long name", strings.Repeat("a", 65), nil, good, "name"},
		{"memory too small", "m1", &skiffv1.FunctionConfig{MemoryMb: 64}, good, "memory_mb"},
		{"memory too big", "m2", &skiffv1.FunctionConfig{MemoryMb: 10241}, good, "memory_mb"},
		{"timeout too long", "t1", &skiffv1.FunctionConfig{TimeoutSeconds: 901}, good, "timeout_seconds"},
		{"storage too small", "s1", &skiffv1.FunctionConfig{EphemeralStorageMb: 100}, good, "ephemeral_storage_mb"},
		{"reserved env", "e1", &skiffv1.FunctionConfig{Environment: map[string]string{"AWS_LAMBDA_RUNTIME_API": "x"}}, good, "environment"},
		{"runtime", "r1", &skiffv1.FunctionConfig{Runtime: "python3.12"}, good, "runtime"},
		{"not a zip", "z1", nil, []byte("this is not a zip"), ""},
		{"path traversal", "z2", nil, traversal, ""},
		{"no bootstrap", "z3", nil, noBootstrap, ""},
		{"zip bomb", "z4", nil, bomb, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			if cfg == nil {
				cfg = &skiffv1.FunctionConfig{}
			}
			if cfg.Runtime == "" {
				cfg.Runtime = "provided"
			}
			_, err := c.fn.CreateFunction(context.Background(), connect.NewRequest(&skiffv1.CreateFunctionRequest{Name: tc.fn, Config: cfg, ZipFile: tc.zip}))
			if connect.CodeOf(err) != connect.CodeInvalidArgument {
				t.Fatalf("got %v, want InvalidArgument", err)
			}
			var ce *connect.Error
			if tc.field != "" && (!errorsAs(err, &ce) || ce.Meta().Get("Skiff-Error-Field") != tc.field) {
				t.Fatalf("error %v does not name field %s", err, tc.field)
			}
		})
	}
	list, err := c.fn.ListFunctions(context.Background(), connect.NewRequest(&skiffv1.ListFunctionsRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	if n := len(list.Msg.Functions); n != 0 {
		t.Fatalf("%d functions stored after only bad requests", n)
	}
	if _, err := invoke(context.Background(), c, "nope", `{}`); connect.CodeOf(err) != connect.CodeNotFound {
		t.Fatalf("unknown function: %v, want NotFound", err)
	}
}

func rawZip(t *testing.T, files map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for name, data := range files {
		h := &zip.FileHeader{Name: name, Method: zip.Deflate}
		h.SetMode(0o755)
		w, err := zw.CreateHeader(h)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write([]byte(data)); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestKeysAndLogs: an invoke-only key invokes only its function; no key is
// refused; the invocation's log is stored and read back with TailLogs.
func TestKeysAndLogs(t *testing.T) {
	d := startDev(t, "")
	admin := d.client("grpc", "")
	createFunction(t, admin, "allowed", nil)
	createFunction(t, admin, "forbidden", nil)
	k, err := admin.keys.CreateKey(context.Background(), connect.NewRequest(&skiffv1.CreateKeyRequest{InvokeFunctions: []string{"allowed"}}))
	if err != nil {
		t.Fatal(err)
	}
	limited := d.client("connect", k.Msg.Secret)
	if r := mustInvoke(t, limited, "allowed", `{"log":"logged-by-allowed"}`); r.FunctionError != "" {
		t.Fatalf("allowed invoke failed: %s", r.Payload)
	}
	if _, err := invoke(context.Background(), limited, "forbidden", `{}`); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("invoke-only key on another function: %v, want PermissionDenied", err)
	}
	if _, err := limited.fn.DeleteFunction(context.Background(), connect.NewRequest(&skiffv1.DeleteFunctionRequest{Name: "allowed"})); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("invoke-only key deleting: %v, want PermissionDenied", err)
	}
	if _, err := invoke(context.Background(), d.client("connect", "sk_wrong"), "allowed", `{}`); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("bad key: %v, want Unauthenticated", err)
	}

	// Logs are shipped asynchronously: wait for the line to be readable.
	logs := skiffv1connect.NewLogServiceClient(httpClient(), "http://"+d.addr, connect.WithInterceptors(bearer(d.key)))
	waitFor(t, 10*time.Second, "the invocation log", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		stream, err := logs.TailLogs(ctx, connect.NewRequest(&skiffv1.TailLogsRequest{FunctionName: "allowed", Lines: 10}))
		if err != nil {
			return false
		}
		defer stream.Close()
		var all strings.Builder
		for stream.Receive() {
			all.WriteString(stream.Msg().Text)
		}
		return strings.Contains(all.String(), "logged-by-allowed") && strings.Contains(all.String(), "REPORT RequestId")
	})
}
