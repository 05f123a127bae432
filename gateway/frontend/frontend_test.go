package frontend

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/grpcreflect"
	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/testutil"
)

func TestFunctionLifecycle(t *testing.T) {
	forEachProtocol(t, Config{}, func(t *testing.T, e *env, c clients, _ []connect.ClientOption) {
		ctx := testContext(t)
		zip1 := bootstrapZip(t, "v1")
		resp, err := c.fn.CreateFunction(ctx, connect.NewRequest(&skiffv1.CreateFunctionRequest{
			Name:    "hello",
			Config:  &skiffv1.FunctionConfig{MemoryMb: 256, Environment: map[string]string{"GREETING": "hi"}, Description: "says hi"},
			ZipFile: zip1,
		}))
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(zip1)
		want := &skiffv1.Function{
			Name: "hello",
			Arn:  "arn:aws:lambda:local:000000000000:function:hello",
			Config: &skiffv1.FunctionConfig{
				Runtime: "provided", Handler: "bootstrap", MemoryMb: 256, TimeoutSeconds: 3, EphemeralStorageMb: 512,
				Environment: map[string]string{"GREETING": "hi"}, Description: "says hi", Network: "egress",
			},
			CodeSha256:   hex.EncodeToString(sum[:]),
			CodeSize:     int64(len(zip1)),
			Version:      "$LATEST",
			LastModified: t0.Format(time.RFC3339Nano),
		}
		created := resp.Msg.Function
		if created.Revision == 0 {
			t.Errorf("got revision 0 after create, want a stored revision")
		}
		if diff := cmp.Diff(want, created, protocmp.Transform(), protocmp.IgnoreFields(&skiffv1.Function{}, "revision")); diff != "" {
			t.Errorf("created function (-want +got):\n%s", diff)
		}

		_, err = c.fn.CreateFunction(ctx, connect.NewRequest(&skiffv1.CreateFunctionRequest{Name: "hello", ZipFile: zip1}))
		wantCode(t, err, connect.CodeAlreadyExists)

		got, err := c.fn.GetFunction(ctx, connect.NewRequest(&skiffv1.GetFunctionRequest{Name: "hello"}))
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(created, got.Msg.Function, protocmp.Transform()); diff != "" {
			t.Errorf("GetFunction (-want +got):\n%s", diff)
		}

		// update_mask names memory_mb: only memory changes.
		upd, err := c.fn.UpdateFunctionConfiguration(ctx, connect.NewRequest(&skiffv1.UpdateFunctionConfigurationRequest{
			Name: "hello", Config: &skiffv1.FunctionConfig{MemoryMb: 512, TimeoutSeconds: 60}, UpdateMask: []string{"memory_mb"},
		}))
		if err != nil {
			t.Fatal(err)
		}
		if g := upd.Msg.Function.Config; g.MemoryMb != 512 || g.TimeoutSeconds != 3 || g.Environment["GREETING"] != "hi" {
			t.Errorf("after masked update got memory %d timeout %d env %v, want 512, 3, GREETING=hi", g.MemoryMb, g.TimeoutSeconds, g.Environment)
		}
		// No mask: every non-zero field.
		upd, err = c.fn.UpdateFunctionConfiguration(ctx, connect.NewRequest(&skiffv1.UpdateFunctionConfigurationRequest{
			Name: "hello", Config: &skiffv1.FunctionConfig{TimeoutSeconds: 60},
		}))
		if err != nil {
			t.Fatal(err)
		}
		if g := upd.Msg.Function.Config; g.MemoryMb != 512 || g.TimeoutSeconds != 60 || g.Description != "says hi" {
			t.Errorf("after unmasked update got memory %d timeout %d description %q, want 512, 60, says hi", g.MemoryMb, g.TimeoutSeconds, g.Description)
		}
		// A masked field with a zero value resets it to its default / clears it.
		upd, err = c.fn.UpdateFunctionConfiguration(ctx, connect.NewRequest(&skiffv1.UpdateFunctionConfigurationRequest{
			Name: "hello", UpdateMask: []string{"environment", "timeout_seconds"},
		}))
		if err != nil {
			t.Fatal(err)
		}
		if g := upd.Msg.Function.Config; len(g.Environment) != 0 || g.TimeoutSeconds != 3 {
			t.Errorf("after clearing update got env %v timeout %d, want none and 3", g.Environment, g.TimeoutSeconds)
		}
		cfgKey := configKey(upd.Msg.Function)

		zip2 := bootstrapZip(t, "v2")
		code, err := c.fn.UpdateFunctionCode(ctx, connect.NewRequest(&skiffv1.UpdateFunctionCodeRequest{Name: "hello", ZipFile: zip2}))
		if err != nil {
			t.Fatal(err)
		}
		sum2 := sha256.Sum256(zip2)
		if got, want := code.Msg.Function.CodeSha256, hex.EncodeToString(sum2[:]); got != want {
			t.Errorf("code sha after update got %s, want %s", got, want)
		}
		codeKey := configKey(code.Msg.Function)
		if codeKey == cfgKey {
			t.Errorf("config key did not change with the code")
		}

		// A stale revision is refused (Aborted), and so is a conflict the store reports.
		_, err = c.fn.UpdateFunctionCode(ctx, connect.NewRequest(&skiffv1.UpdateFunctionCodeRequest{Name: "hello", ZipFile: zip1, RevisionId: created.Revision}))
		wantCode(t, err, connect.CodeAborted)
		_, err = c.fn.UpdateFunctionConfiguration(ctx, connect.NewRequest(&skiffv1.UpdateFunctionConfigurationRequest{
			Name: "hello", Config: &skiffv1.FunctionConfig{MemoryMb: 1024}, RevisionId: created.Revision,
		}))
		wantCode(t, err, connect.CodeAborted)
		// The current revision is accepted.
		if _, err := c.fn.UpdateFunctionConfiguration(ctx, connect.NewRequest(&skiffv1.UpdateFunctionConfigurationRequest{
			Name: "hello", Config: &skiffv1.FunctionConfig{MemoryMb: 1024}, RevisionId: code.Msg.Function.Revision,
		})); err != nil {
			t.Fatalf("update at the current revision: %v", err)
		}

		mustReserve(t, c, "hello", 5)
		got, err = c.fn.GetFunction(ctx, connect.NewRequest(&skiffv1.GetFunctionRequest{Name: "hello"}))
		if err != nil {
			t.Fatal(err)
		}
		if got.Msg.Function.ReservedConcurrency == nil || *got.Msg.Function.ReservedConcurrency != 5 {
			t.Errorf("got reserved concurrency %v, want 5", got.Msg.Function.ReservedConcurrency)
		}
		if _, err := c.fn.DeleteFunctionConcurrency(ctx, connect.NewRequest(&skiffv1.DeleteFunctionConcurrencyRequest{Name: "hello"})); err != nil {
			t.Fatal(err)
		}
		got, err = c.fn.GetFunction(ctx, connect.NewRequest(&skiffv1.GetFunctionRequest{Name: "hello"}))
		if err != nil {
			t.Fatal(err)
		}
		if got.Msg.Function.ReservedConcurrency != nil {
			t.Errorf("got reserved concurrency %d after delete, want none", *got.Msg.Function.ReservedConcurrency)
		}
		finalKey := configKey(got.Msg.Function)

		if _, err := c.fn.DeleteFunction(ctx, connect.NewRequest(&skiffv1.DeleteFunctionRequest{Name: "hello"})); err != nil {
			t.Fatal(err)
		}
		_, err = c.fn.GetFunction(ctx, connect.NewRequest(&skiffv1.GetFunctionRequest{Name: "hello"}))
		wantCode(t, err, connect.CodeNotFound)
		_, err = c.fn.DeleteFunction(ctx, connect.NewRequest(&skiffv1.DeleteFunctionRequest{Name: "hello"}))
		wantCode(t, err, connect.CodeNotFound)

		retires := e.rt.retireCalls()
		if len(retires) != 6 {
			t.Fatalf("got %d retire calls %v, want 6 (3 config updates, 1 code update, 1 more config update, 1 delete)", len(retires), retires)
		}
		if retires[2] != (retireCall{"hello", cfgKey}) || retires[3] != (retireCall{"hello", codeKey}) {
			t.Errorf("got retires %v, want keep keys %s then %s", retires[2:4], cfgKey, codeKey)
		}
		if retires[4] != (retireCall{"hello", finalKey}) || retires[5] != (retireCall{"hello", ""}) {
			t.Errorf("got retires %v, want keep %s then \"\" after delete", retires[4:], finalKey)
		}
	})
}

func TestUploadFunction(t *testing.T) {
	forEachProtocol(t, Config{MaxUploadBytes: 4096}, func(t *testing.T, e *env, c clients, _ []connect.ClientOption) {
		ctx := testContext(t)
		upload := func(h *skiffv1.UploadFunctionRequest_Header, data []byte, chunk int) (*skiffv1.Function, error) {
			s := c.fn.UploadFunction(ctx)
			if h != nil {
				if err := s.Send(&skiffv1.UploadFunctionRequest{Part: &skiffv1.UploadFunctionRequest_Header_{Header: h}}); err != nil {
					t.Fatal(err)
				}
			}
			for len(data) > 0 {
				n := min(chunk, len(data))
				if err := s.Send(&skiffv1.UploadFunctionRequest{Part: &skiffv1.UploadFunctionRequest_Chunk{Chunk: data[:n]}}); err != nil {
					break // the server may have answered already; CloseAndReceive reports it
				}
				data = data[n:]
			}
			resp, err := s.CloseAndReceive()
			if err != nil {
				return nil, err
			}
			return resp.Msg.Function, nil
		}
		zip1 := bootstrapZip(t, "one")
		fn, err := upload(&skiffv1.UploadFunctionRequest_Header{Name: "up", Create: true, Config: &skiffv1.FunctionConfig{MemoryMb: 256}, Size: int64(len(zip1))}, zip1, 50)
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(zip1)
		if fn.CodeSha256 != hex.EncodeToString(sum[:]) || fn.Config.MemoryMb != 256 || fn.CodeSize != int64(len(zip1)) {
			t.Errorf("got code %s size %d memory %d, want %x %d 256", fn.CodeSha256, fn.CodeSize, fn.Config.MemoryMb, sum, len(zip1))
		}
		zip2 := bootstrapZip(t, "two")
		fn, err = upload(&skiffv1.UploadFunctionRequest_Header{Name: "up"}, zip2, 64)
		if err != nil {
			t.Fatal(err)
		}
		sum = sha256.Sum256(zip2)
		if fn.CodeSha256 != hex.EncodeToString(sum[:]) || fn.Config.MemoryMb != 256 {
			t.Errorf("after code upload got code %s memory %d, want %x 256", fn.CodeSha256, fn.Config.MemoryMb, sum)
		}

		writes := e.st.writeCount()
		_, err = upload(&skiffv1.UploadFunctionRequest_Header{Name: "up", Size: int64(len(zip2)) + 1}, zip2, 64)
		wantInvalid(t, err, "size")
		_, err = upload(nil, zip2, 64)
		wantInvalid(t, err, "header")
		_, err = upload(&skiffv1.UploadFunctionRequest_Header{Name: "up"}, bytes.Repeat([]byte("x"), 5000), 1000)
		wantInvalid(t, err, "zip_file")
		_, err = upload(&skiffv1.UploadFunctionRequest_Header{Name: "bad name", Create: true}, zip2, 64)
		wantInvalid(t, err, "name")
		_, err = upload(&skiffv1.UploadFunctionRequest_Header{Name: "new", Create: true, Config: &skiffv1.FunctionConfig{TimeoutSeconds: 901}}, zip2, 64)
		wantInvalid(t, err, "timeout_seconds")
		_, err = upload(&skiffv1.UploadFunctionRequest_Header{Name: "missing"}, zip2, 64)
		wantCode(t, err, connect.CodeNotFound)
		if got := e.st.writeCount(); got != writes {
			t.Errorf("failed uploads made %d store writes, want 0", got-writes)
		}
	})
}

func TestAuth(t *testing.T) {
	forEachProtocol(t, Config{}, func(t *testing.T, e *env, admin clients, opts []connect.ClientOption) {
		ctx := testContext(t)
		mustCreate(t, admin, "fn1", nil)
		mustCreate(t, admin, "fn2", nil)

		_, err := e.clients("", opts...).inv.Invoke(ctx, invokeReq("fn1", "{}"))
		if ce := wantCode(t, err, connect.CodeUnauthenticated); !strings.Contains(ce.Message(), "missing API key") {
			t.Errorf("got message %q, want it to say missing API key", ce.Message())
		}
		_, err = e.clients("sk_nope", opts...).fn.ListFunctions(ctx, connect.NewRequest(&skiffv1.ListFunctionsRequest{}))
		if ce := wantCode(t, err, connect.CodeUnauthenticated); !strings.Contains(ce.Message(), "invalid API key") {
			t.Errorf("got message %q, want it to say invalid API key", ce.Message())
		}

		kr, err := admin.keys.CreateKey(ctx, connect.NewRequest(&skiffv1.CreateKeyRequest{Description: "ci", InvokeFunctions: []string{"fn1", "fn1"}}))
		if err != nil {
			t.Fatal(err)
		}
		if !regexp.MustCompile(`^sk_[A-Za-z0-9_-]{43}$`).MatchString(kr.Msg.Secret) || !strings.HasPrefix(kr.Msg.Key.Id, "key_") {
			t.Errorf("got secret %q id %q, want sk_<base64url of 32 bytes> and key_...", kr.Msg.Secret, kr.Msg.Key.Id)
		}
		if diff := cmp.Diff([]string{"fn1"}, kr.Msg.Key.InvokeFunctions); diff != "" {
			t.Errorf("invoke functions (-want +got):\n%s", diff)
		}
		inv := e.clients(kr.Msg.Secret, opts...)
		if _, err := inv.inv.Invoke(ctx, invokeReq("fn1", "{}")); err != nil {
			t.Fatalf("invoke-only key invoking fn1: %v", err)
		}
		_, err = inv.inv.Invoke(ctx, invokeReq("fn2", "{}"))
		if ce := wantCode(t, err, connect.CodePermissionDenied); !strings.Contains(ce.Message(), "fn2") {
			t.Errorf("got message %q, want it to name fn2", ce.Message())
		}
		_, err = inv.fn.CreateFunction(ctx, connect.NewRequest(&skiffv1.CreateFunctionRequest{Name: "fn3", ZipFile: bootstrapZip(t, "x")}))
		if ce := wantCode(t, err, connect.CodePermissionDenied); !strings.Contains(ce.Message(), "fn3") {
			t.Errorf("got message %q, want it to name fn3", ce.Message())
		}
		_, err = inv.fn.GetFunction(ctx, connect.NewRequest(&skiffv1.GetFunctionRequest{Name: "fn1"}))
		wantCode(t, err, connect.CodePermissionDenied)
		_, err = inv.keys.ListKeys(ctx, connect.NewRequest(&skiffv1.ListKeysRequest{}))
		wantCode(t, err, connect.CodePermissionDenied)
		stream, err := inv.logs.TailLogs(ctx, connect.NewRequest(&skiffv1.TailLogsRequest{FunctionName: "fn1"}))
		if err == nil {
			for stream.Receive() {
				t.Errorf("invoke-only key received a log message")
			}
			err = stream.Err()
		}
		wantCode(t, err, connect.CodePermissionDenied)

		keys, err := admin.keys.ListKeys(ctx, connect.NewRequest(&skiffv1.ListKeysRequest{}))
		if err != nil {
			t.Fatal(err)
		}
		if len(keys.Msg.Keys) != 2 {
			t.Fatalf("got %d keys, want 2 (admin and invoke)", len(keys.Msg.Keys))
		}
		if _, err := admin.keys.RevokeKey(ctx, connect.NewRequest(&skiffv1.RevokeKeyRequest{Id: kr.Msg.Key.Id})); err != nil {
			t.Fatal(err)
		}
		_, err = inv.inv.Invoke(ctx, invokeReq("fn1", "{}"))
		wantCode(t, err, connect.CodeUnauthenticated)
		_, err = admin.keys.RevokeKey(ctx, connect.NewRequest(&skiffv1.RevokeKeyRequest{Id: kr.Msg.Key.Id}))
		wantCode(t, err, connect.CodeNotFound)
	})
}

func TestHealthAndReflectionNeedNoKey(t *testing.T) {
	e := newEnv(t, Config{})
	req, err := http.NewRequest(http.MethodPost, e.url+"/grpc.health.v1.Health/Check", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := e.hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "SERVING") {
		t.Errorf("health check got %d %s, want 200 SERVING", resp.StatusCode, body)
	}

	stream := grpcreflect.NewClient(e.hc, e.url, connect.WithGRPC()).NewStream(context.Background())
	defer stream.Close()
	names, err := stream.ListServices()
	if err != nil {
		t.Fatal(err)
	}
	got := fmt.Sprint(names)
	for _, want := range []string{"skiff.v1.FunctionService", "skiff.v1.InvokeService", "skiff.v1.KeyService", "skiff.v1.LogService"} {
		if !strings.Contains(got, want) {
			t.Errorf("reflection lists %s, want it to include %s", got, want)
		}
	}
}

func TestBadInputChangesNothing(t *testing.T) {
	long := func(n int) string { return strings.Repeat("a", n) }
	good := bootstrapZip(t, "good")
	bigEnv := map[string]string{"A": strings.Repeat("x", 4096)}
	create := func(name string, cfg *skiffv1.FunctionConfig) func(context.Context, clients) error {
		return func(ctx context.Context, c clients) error {
			_, err := c.fn.CreateFunction(ctx, connect.NewRequest(&skiffv1.CreateFunctionRequest{Name: name, Config: cfg, ZipFile: good}))
			return err
		}
	}
	createZip := func(zip []byte) func(context.Context, clients) error {
		return func(ctx context.Context, c clients) error {
			_, err := c.fn.CreateFunction(ctx, connect.NewRequest(&skiffv1.CreateFunctionRequest{Name: "new", ZipFile: zip}))
			return err
		}
	}
	updateCfg := func(cfg *skiffv1.FunctionConfig, mask ...string) func(context.Context, clients) error {
		return func(ctx context.Context, c clients) error {
			_, err := c.fn.UpdateFunctionConfiguration(ctx, connect.NewRequest(&skiffv1.UpdateFunctionConfigurationRequest{Name: "ok", Config: cfg, UpdateMask: mask}))
			return err
		}
	}
	list := func(size int32, token string) func(context.Context, clients) error {
		return func(ctx context.Context, c clients) error {
			_, err := c.fn.ListFunctions(ctx, connect.NewRequest(&skiffv1.ListFunctionsRequest{PageSize: size, PageToken: token}))
			return err
		}
	}
	invoke := func(m *skiffv1.InvokeRequest) func(context.Context, clients) error {
		return func(ctx context.Context, c clients) error {
			_, err := c.inv.Invoke(ctx, connect.NewRequest(m))
			return err
		}
	}
	reserve := func(n int32) func(context.Context, clients) error {
		return func(ctx context.Context, c clients) error {
			_, err := c.fn.PutFunctionConcurrency(ctx, connect.NewRequest(&skiffv1.PutFunctionConcurrencyRequest{Name: "ok", ReservedConcurrentExecutions: n}))
			return err
		}
	}
	key := func(admin bool, fns ...string) func(context.Context, clients) error {
		return func(ctx context.Context, c clients) error {
			_, err := c.keys.CreateKey(ctx, connect.NewRequest(&skiffv1.CreateKeyRequest{Admin: admin, InvokeFunctions: fns}))
			return err
		}
	}
	noBootstrap := zipFiles(t, map[string]os.FileMode{"main": 0o755})
	notExecutable := zipFiles(t, map[string]os.FileMode{"bootstrap": 0o644})

	tests := []struct {
		name  string
		call  func(context.Context, clients) error
		field string       // InvalidArgument naming this field
		code  connect.Code // or this code, when field is empty
		msg   string       // a part of the message, when set
	}{
		{name: "empty name", call: create("", nil), field: "name"},
		{name: "name too long", call: create(long(65), nil), field: "name"},
		{name: "name with space", call: create("a b", nil), field: "name"},
		{name: "name with slash", call: create("a/b", nil), field: "name"},
		{name: "name not ascii", call: create("fünf", nil), field: "name"},
		{name: "memory too small", call: create("new", &skiffv1.FunctionConfig{MemoryMb: 127}), field: "memory_mb"},
		{name: "memory too large", call: create("new", &skiffv1.FunctionConfig{MemoryMb: 10241}), field: "memory_mb"},
		{name: "memory negative", call: create("new", &skiffv1.FunctionConfig{MemoryMb: -1}), field: "memory_mb"},
		{name: "network unknown", call: create("new", &skiffv1.FunctionConfig{Network: "bridge"}), field: "network"},
		{name: "allow with network none", call: create("new", &skiffv1.FunctionConfig{Network: "none", NetworkAllow: []string{"10.0.0.0/8"}}), field: "network_allow"},
		{name: "deny with network none", call: create("new", &skiffv1.FunctionConfig{Network: "none", NetworkDeny: []string{"10.0.0.0/8"}}), field: "network_deny"},
		{name: "allow not a cidr", call: create("new", &skiffv1.FunctionConfig{NetworkAllow: []string{"10.0.0.0/33"}}), field: "network_allow"},
		{name: "deny ipv6", call: create("new", &skiffv1.FunctionConfig{NetworkDeny: []string{"::1/128"}}), field: "network_deny"},
		{name: "allow bad port", call: create("new", &skiffv1.FunctionConfig{NetworkAllow: []string{"1.2.3.4:0"}}), field: "network_allow"},
		{name: "allow too many", call: create("new", &skiffv1.FunctionConfig{NetworkAllow: manyRules(65)}), field: "network_allow"},
		{name: "timeout too long", call: create("new", &skiffv1.FunctionConfig{TimeoutSeconds: 901}), field: "timeout_seconds"},
		{name: "timeout negative", call: create("new", &skiffv1.FunctionConfig{TimeoutSeconds: -1}), field: "timeout_seconds"},
		{name: "storage too small", call: create("new", &skiffv1.FunctionConfig{EphemeralStorageMb: 511}), field: "ephemeral_storage_mb"},
		{name: "storage too large", call: create("new", &skiffv1.FunctionConfig{EphemeralStorageMb: 10241}), field: "ephemeral_storage_mb"},
		{name: "unknown runtime", call: create("new", &skiffv1.FunctionConfig{Runtime: "python3.12"}), field: "runtime"},
		{name: "handler too long", call: create("new", &skiffv1.FunctionConfig{Handler: long(129)}), field: "handler"},
		{name: "reserved env", call: create("new", &skiffv1.FunctionConfig{Environment: map[string]string{"AWS_REGION": "x"}}), field: "environment", msg: "AWS_REGION"},
		{name: "reserved env prefix", call: create("new", &skiffv1.FunctionConfig{Environment: map[string]string{"AWS_LAMBDA_ANYTHING": "x"}}), field: "environment"},
		{name: "reserved _HANDLER", call: create("new", &skiffv1.FunctionConfig{Environment: map[string]string{"_HANDLER": "x"}}), field: "environment"},
		{name: "env key digit first", call: create("new", &skiffv1.FunctionConfig{Environment: map[string]string{"1A": "x"}}), field: "environment"},
		{name: "env key dash", call: create("new", &skiffv1.FunctionConfig{Environment: map[string]string{"A-B": "x"}}), field: "environment"},
		{name: "env too big", call: create("new", &skiffv1.FunctionConfig{Environment: bigEnv}), field: "environment"},
		{name: "description too long", call: create("new", &skiffv1.FunctionConfig{Description: long(257)}), field: "description"},
		{name: "no code", call: createZip(nil), field: "zip_file"},
		{name: "code not a zip", call: createZip([]byte("PK? not really")), field: "zip_file"},
		{name: "no bootstrap", call: createZip(noBootstrap), field: "zip_file", msg: bootstrapNeeded},
		{name: "bootstrap not executable", call: createZip(notExecutable), field: "zip_file", msg: bootstrapNeeded},
		{name: "existing name with bad config", call: create("ok", &skiffv1.FunctionConfig{MemoryMb: 1}), field: "memory_mb"},
		{name: "existing name", call: create("ok", nil), code: connect.CodeAlreadyExists},
		{name: "update code not a zip", call: func(ctx context.Context, c clients) error {
			_, err := c.fn.UpdateFunctionCode(ctx, connect.NewRequest(&skiffv1.UpdateFunctionCodeRequest{Name: "ok", ZipFile: []byte("nope")}))
			return err
		}, field: "zip_file"},
		{name: "update code of unknown function", call: func(ctx context.Context, c clients) error {
			_, err := c.fn.UpdateFunctionCode(ctx, connect.NewRequest(&skiffv1.UpdateFunctionCodeRequest{Name: "nope", ZipFile: good}))
			return err
		}, code: connect.CodeNotFound},
		{name: "update unknown mask field", call: updateCfg(&skiffv1.FunctionConfig{MemoryMb: 256}, "memory"), field: "update_mask"},
		{name: "update memory out of range", call: updateCfg(&skiffv1.FunctionConfig{MemoryMb: 99999}), field: "memory_mb"},
		{name: "update reserved env", call: updateCfg(&skiffv1.FunctionConfig{Environment: map[string]string{"LAMBDA_TASK_ROOT": "/"}}), field: "environment"},
		{name: "update nothing", call: updateCfg(nil), field: "config"},
		{name: "page size too big", call: list(1001, ""), field: "page_size"},
		{name: "page size negative", call: list(-1, ""), field: "page_size"},
		{name: "page token garbage", call: list(0, "!!!"), field: "page_token"},
		{name: "page token forged", call: list(0, base64.RawURLEncoding.EncodeToString([]byte("p1:../x"))), field: "page_token"},
		{name: "reserve negative", call: reserve(-1), field: "reserved_concurrent_executions"},
		{name: "reserve over account", call: reserve(1001), field: "reserved_concurrent_executions"},
		{name: "reserve into the unreserved floor", call: reserve(901), field: "reserved_concurrent_executions", msg: "leave 99"},
		{name: "payload over 6 MB", call: invoke(&skiffv1.InvokeRequest{FunctionName: "ok", Payload: make([]byte, 6<<20+1)}), field: "payload",
			msg: "request payload is 6291457 bytes, over the 6291456-byte limit"},
		{name: "invoke bad name", call: invoke(&skiffv1.InvokeRequest{FunctionName: "bad/name"}), field: "function_name"},
		{name: "invoke bad type", call: invoke(&skiffv1.InvokeRequest{FunctionName: "ok", InvocationType: 99}), field: "invocation_type"},
		{name: "invoke bad log type", call: invoke(&skiffv1.InvokeRequest{FunctionName: "ok", LogType: 7}), field: "log_type"},
		{name: "invoke client context too big", call: invoke(&skiffv1.InvokeRequest{FunctionName: "ok", ClientContext: long(3584)}), field: "client_context"},
		{name: "invoke unknown function", call: invoke(&skiffv1.InvokeRequest{FunctionName: "nope"}), code: connect.CodeNotFound},
		{name: "invoke unknown qualifier", call: invoke(&skiffv1.InvokeRequest{FunctionName: "ok", Qualifier: "1"}), code: connect.CodeNotFound},
		{name: "dry run unknown function", call: invoke(&skiffv1.InvokeRequest{FunctionName: "nope", InvocationType: skiffv1.InvocationType_INVOCATION_TYPE_DRY_RUN}), code: connect.CodeNotFound},
		{name: "key with bad function", call: key(false, "bad name"), field: "invoke_functions"},
		{name: "key with no function", call: key(false), field: "invoke_functions"},
		{name: "admin key with functions", call: key(true, "ok"), field: "invoke_functions"},
		{name: "revoke bad id", call: func(ctx context.Context, c clients) error {
			_, err := c.keys.RevokeKey(ctx, connect.NewRequest(&skiffv1.RevokeKeyRequest{Id: "nope"}))
			return err
		}, field: "id"},
		{name: "tail negative lines", call: func(ctx context.Context, c clients) error {
			s, err := c.logs.TailLogs(ctx, connect.NewRequest(&skiffv1.TailLogsRequest{FunctionName: "ok", Lines: -1}))
			if err != nil {
				return err
			}
			for s.Receive() {
			}
			return s.Err()
		}, field: "lines"},
		{name: "get unknown function", call: func(ctx context.Context, c clients) error {
			_, err := c.fn.GetFunction(ctx, connect.NewRequest(&skiffv1.GetFunctionRequest{Name: "nope"}))
			return err
		}, code: connect.CodeNotFound},
		{name: "delete unknown function", call: func(ctx context.Context, c clients) error {
			_, err := c.fn.DeleteFunction(ctx, connect.NewRequest(&skiffv1.DeleteFunctionRequest{Name: "nope"}))
			return err
		}, code: connect.CodeNotFound},
	}
	forEachProtocol(t, Config{}, func(t *testing.T, e *env, c clients, _ []connect.ClientOption) {
		ok := mustCreate(t, c, "ok", nil)
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				writes, calls := e.st.writeCount(), e.rt.callCount()
				err := tt.call(context.Background(), c)
				var ce *connect.Error
				if tt.field != "" {
					ce = wantInvalid(t, err, tt.field)
				} else {
					ce = wantCode(t, err, tt.code)
				}
				if tt.msg != "" && !strings.Contains(ce.Message(), tt.msg) {
					t.Errorf("got message %q, want it to contain %q", ce.Message(), tt.msg)
				}
				if got := e.st.writeCount() - writes; got != 0 {
					t.Errorf("bad input made %d store writes, want 0", got)
				}
				if got := e.rt.callCount() - calls; got != 0 {
					t.Errorf("bad input reached the router %d times, want 0", got)
				}
			})
		}
		got, err := c.fn.GetFunction(context.Background(), connect.NewRequest(&skiffv1.GetFunctionRequest{Name: "ok"}))
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(ok, got.Msg.Function, protocmp.Transform()); diff != "" {
			t.Errorf("function changed by bad input (-before +after):\n%s", diff)
		}
	})
}

// zipFiles makes an archive of small scripts with the given modes.
func zipFiles(t *testing.T, files map[string]os.FileMode) []byte {
	t.Helper()
	entries := map[string]testutil.ZipEntry{}
	for name, mode := range files {
		entries[name] = testutil.ZipEntry{Data: []byte("#!/bin/sh\n"), Mode: mode}
	}
	return testutil.ZipFiles(t, entries)
}

func TestReservedConcurrencyThrottles(t *testing.T) {
	forEachProtocol(t, Config{}, func(t *testing.T, e *env, c clients, _ []connect.ClientOption) {
		ctx := testContext(t)
		mustCreate(t, c, "r2", nil)
		mustReserve(t, c, "r2", 2)
		b := newBlocker(t)
		e.rt.setInvoke(b.invoke)

		var wg sync.WaitGroup
		errc := make(chan error, 2)
		for range 2 {
			wg.Go(func() {
				_, err := c.inv.Invoke(ctx, invokeReq("r2", "{}"))
				errc <- err
			})
		}
		b.waitEntered(t, 2)
		_, err := c.inv.Invoke(ctx, invokeReq("r2", "{}"))
		ce := wantCode(t, err, connect.CodeResourceExhausted)
		if got := ce.Meta().Get(errs.HeaderReason); got != "throttled" {
			t.Errorf("got reason %q, want throttled", got)
		}
		ms, perr := strconv.Atoi(ce.Meta().Get(errs.HeaderRetryAfter))
		if perr != nil || ms < 100 || ms > 1000 {
			t.Errorf("got retry hint %q, want 100-1000 ms", ce.Meta().Get(errs.HeaderRetryAfter))
		}
		if want := "rate exceeded: function r2 is at its reserved concurrency of 2"; !strings.Contains(ce.Message(), want) {
			t.Errorf("got message %q, want %q", ce.Message(), want)
		}
		b.unblock()
		wg.Wait()
		close(errc)
		for err := range errc {
			if err != nil {
				t.Errorf("admitted invoke failed: %v", err)
			}
		}
		// The slots are back.
		for range 2 {
			if _, err := c.inv.Invoke(ctx, invokeReq("r2", "{}")); err != nil {
				t.Errorf("invoke after release: %v", err)
			}
		}
		if got := counterValue(t, e.reg, "skiff_throttles_total", map[string]string{"function": "r2"}); got != 1 {
			t.Errorf("got skiff_throttles_total %v, want 1", got)
		}

		// Reserved 0 turns the function off.
		mustReserve(t, c, "r2", 0)
		_, err = c.inv.Invoke(ctx, invokeReq("r2", "{}"))
		wantCode(t, err, connect.CodeResourceExhausted)
	})
}

func TestUnreservedPool(t *testing.T) {
	forEachProtocol(t, Config{AccountConcurrency: 10, UnreservedMin: 4}, func(t *testing.T, e *env, c clients, _ []connect.ClientOption) {
		ctx := testContext(t)
		for _, n := range []string{"a", "b", "c"} {
			mustCreate(t, c, n, nil)
		}
		put := func(name string, n int32) error {
			_, err := c.fn.PutFunctionConcurrency(ctx, connect.NewRequest(&skiffv1.PutFunctionConcurrencyRequest{Name: name, ReservedConcurrentExecutions: n}))
			return err
		}
		mustReserve(t, c, "a", 6)
		ce := wantInvalid(t, put("b", 1), "reserved_concurrent_executions")
		for _, want := range []string{"leave 3", "account's 10", "at least 4"} {
			if !strings.Contains(ce.Message(), want) {
				t.Errorf("got message %q, want it to contain %q", ce.Message(), want)
			}
		}
		wantInvalid(t, put("a", 7), "reserved_concurrent_executions")
		mustReserve(t, c, "a", 6) // replacing a's own reservation counts it once
		mustReserve(t, c, "a", 2)
		mustReserve(t, c, "b", 4)

		// Unreserved pool: 10 - 6 = 4 for c.
		b := newBlocker(t)
		e.rt.setInvoke(b.invoke)
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				if _, err := c.inv.Invoke(ctx, invokeReq("c", "{}")); err != nil {
					t.Errorf("admitted invoke: %v", err)
				}
			})
		}
		b.waitEntered(t, 4)
		_, err := c.inv.Invoke(ctx, invokeReq("c", "{}"))
		if ce := wantCode(t, err, connect.CodeResourceExhausted); !strings.Contains(ce.Message(), "unreserved concurrency of 4") {
			t.Errorf("got message %q, want it to name the unreserved pool of 4", ce.Message())
		}
		// Reserved functions do not draw from the pool.
		wg.Go(func() {
			if _, err := c.inv.Invoke(ctx, invokeReq("a", "{}")); err != nil {
				t.Errorf("reserved function while the pool is full: %v", err)
			}
		})
		b.waitEntered(t, 1)
		// Deleting b returns its 4 to the pool: c may run 8.
		if _, err := c.fn.DeleteFunction(ctx, connect.NewRequest(&skiffv1.DeleteFunctionRequest{Name: "b"})); err != nil {
			t.Fatal(err)
		}
		for range 4 {
			wg.Go(func() {
				if _, err := c.inv.Invoke(ctx, invokeReq("c", "{}")); err != nil {
					t.Errorf("invoke with the grown pool: %v", err)
				}
			})
		}
		b.waitEntered(t, 4)
		_, err = c.inv.Invoke(ctx, invokeReq("c", "{}"))
		wantCode(t, err, connect.CodeResourceExhausted)
		if got := gaugeValue(t, e.reg, "skiff_concurrent_executions", nil); got != 9 {
			t.Errorf("got skiff_concurrent_executions %v, want 9", got)
		}
		b.unblock()
		wg.Wait()
		if got := gaugeValue(t, e.reg, "skiff_concurrent_executions", nil); got != 0 {
			t.Errorf("got skiff_concurrent_executions %v after all returned, want 0", got)
		}
	})
}

// TestAdmissionNeverExceedsReserved hammers one function with reserved
// concurrency 3 and checks the router never sees more than 3 at once.
func TestAdmissionNeverExceedsReserved(t *testing.T) {
	e := newEnv(t, Config{})
	c := e.clients(e.admin)
	mustCreate(t, c, "hot", nil)
	mustReserve(t, c, "hot", 3)
	var mu sync.Mutex
	cur, peak := 0, 0
	e.rt.setInvoke(func(ctx context.Context, req *skiffv1.AgentInvokeRequest) (*skiffv1.AgentInvokeResponse, error) {
		mu.Lock()
		cur++
		peak = max(peak, cur)
		mu.Unlock()
		for range 10 { // let other invocations in while this one "runs"
			runtime.Gosched()
		}
		mu.Lock()
		cur--
		mu.Unlock()
		return &skiffv1.AgentInvokeResponse{}, nil
	})
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			for range 50 {
				_, err := e.f.invoke(context.Background(), &skiffv1.InvokeRequest{FunctionName: "hot"}, "")
				if err != nil && !errs.IsThrottled(err) {
					t.Errorf("invoke: %v", err)
				}
			}
		})
	}
	wg.Wait()
	if peak > 3 {
		t.Errorf("router saw %d concurrent invocations, want at most 3", peak)
	}
	if peak == 0 {
		t.Errorf("no invocation ran")
	}
}

func TestPayloadLimit(t *testing.T) {
	forEachProtocol(t, Config{}, func(t *testing.T, e *env, c clients, _ []connect.ClientOption) {
		mustCreate(t, c, "big", nil)
		payload := bytes.Repeat([]byte("a"), 6<<20)
		resp, err := c.inv.Invoke(context.Background(), connect.NewRequest(&skiffv1.InvokeRequest{FunctionName: "big", Payload: payload}))
		if err != nil {
			t.Fatalf("6 MiB payload: %v", err)
		}
		if len(resp.Msg.Payload) != len(payload) {
			t.Errorf("got %d bytes back, want %d", len(resp.Msg.Payload), len(payload))
		}
		_, err = c.inv.Invoke(context.Background(), connect.NewRequest(&skiffv1.InvokeRequest{FunctionName: "big", Payload: append(payload, 'x')}))
		wantInvalid(t, err, "payload")
		if got := e.rt.callCount(); got != 1 {
			t.Errorf("router got %d calls, want 1", got)
		}
	})
}

func TestInvoke(t *testing.T) {
	forEachProtocol(t, Config{}, func(t *testing.T, e *env, c clients, _ []connect.ClientOption) {
		ctx := testContext(t)
		fn := mustCreate(t, c, "echo", &skiffv1.FunctionConfig{MemoryMb: 512, TimeoutSeconds: 7, Handler: "my.handler", Environment: map[string]string{"K": "v"}})
		log := strings.Repeat("l", 5000) + "END"
		e.rt.setInvoke(func(_ context.Context, req *skiffv1.AgentInvokeRequest) (*skiffv1.AgentInvokeResponse, error) {
			return &skiffv1.AgentInvokeResponse{Payload: []byte(`{"errorMessage":"boom"}`), FunctionError: "Unhandled", Log: log, ColdStart: true, InitDurationUs: 2500}, nil
		})
		resp, err := c.inv.Invoke(ctx, connect.NewRequest(&skiffv1.InvokeRequest{
			FunctionName: "echo", Qualifier: "$LATEST", Payload: []byte(`{"a":1}`), LogType: skiffv1.LogType_LOG_TYPE_TAIL, ClientContext: "e30=",
		}))
		if err != nil {
			t.Fatal(err)
		}
		m := resp.Msg
		uuidRe := regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
		if !uuidRe.MatchString(m.RequestId) {
			t.Errorf("got request id %q, want a v4 UUID", m.RequestId)
		}
		if got := resp.Header().Get(RequestIDHeader); got != m.RequestId {
			t.Errorf("got %s header %q, want %q", RequestIDHeader, got, m.RequestId)
		}
		wantTail := base64.StdEncoding.EncodeToString([]byte(log[len(log)-4096:]))
		if m.StatusCode != 200 || m.FunctionError != "Unhandled" || m.ExecutedVersion != "$LATEST" || m.LogResult != wantTail || string(m.Payload) != `{"errorMessage":"boom"}` {
			t.Errorf("got status %d error %q version %q payload %s tail ok %v, want 200 Unhandled $LATEST the error and the last 4 KB of the log",
				m.StatusCode, m.FunctionError, m.ExecutedVersion, m.Payload, m.LogResult == wantTail)
		}

		if n := e.rt.callCount(); n != 1 {
			t.Fatalf("router got %d calls, want 1", n)
		}
		req := e.rt.call(0)
		wantSpec := &skiffv1.SandboxSpec{
			FunctionName: "echo", FunctionArn: "arn:aws:lambda:local:000000000000:function:echo", Version: "$LATEST",
			ConfigKey: configKey(fn), CodeSha256: fn.CodeSha256, Runtime: "provided", Handler: "my.handler",
			MemoryMb: 512, TimeoutSeconds: 7, EphemeralStorageMb: 512, Environment: map[string]string{"K": "v"}, Network: "egress",
		}
		if diff := cmp.Diff(wantSpec, req.Spec, protocmp.Transform()); diff != "" {
			t.Errorf("sandbox spec (-want +got):\n%s", diff)
		}
		if req.RequestId != m.RequestId || string(req.Payload) != `{"a":1}` || req.ClientContext != "e30=" || !req.WantLog {
			t.Errorf("router request id %q payload %s context %q want_log %v, want %q {\"a\":1} e30= true", req.RequestId, req.Payload, req.ClientContext, req.WantLog, m.RequestId)
		}

		// Without TAIL there is no log in the response.
		resp, err = c.inv.Invoke(ctx, invokeReq("echo", "{}"))
		if err != nil {
			t.Fatal(err)
		}
		if resp.Msg.LogResult != "" {
			t.Errorf("got a log result without log_type TAIL")
		}
		if e.rt.call(1).Spec != e.rt.call(0).Spec {
			t.Errorf("the spec was rebuilt for an unchanged function, want it cached")
		}

		// Logs are shipped to the store, and TailLogs reads them.
		if err := e.f.Close(); err != nil {
			t.Fatal(err)
		}
		logs := e.st.logEntries()
		if len(logs) != 2 || logs[0].Function != "echo" || logs[0].RequestID != m.RequestId || logs[0].Text != log {
			t.Fatalf("got %d shipped logs (first %+v), want 2, the first for request %s", len(logs), logs, m.RequestId)
		}
		stream, err := c.logs.TailLogs(ctx, connect.NewRequest(&skiffv1.TailLogsRequest{FunctionName: "echo"}))
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for stream.Receive() {
			got = append(got, stream.Msg().RequestId)
			if stream.Msg().Timestamp != t0.Format(time.RFC3339Nano) {
				t.Errorf("got timestamp %q, want %q", stream.Msg().Timestamp, t0.Format(time.RFC3339Nano))
			}
		}
		if err := stream.Err(); err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff([]string{logs[0].RequestID, logs[1].RequestID}, got); diff != "" {
			t.Errorf("tailed request ids (-want +got):\n%s", diff)
		}
		if diff := cmp.Diff([]any{"echo", 100, false}, e.st.readLogsArgs()); diff != "" {
			t.Errorf("ReadLogs arguments (-want +got):\n%s", diff)
		}

		if got := counterValue(t, e.reg, "skiff_invocations_total", map[string]string{"function": "echo", "outcome": "error"}); got != 2 {
			t.Errorf("got %v error invocations, want 2", got)
		}
		if got := counterValue(t, e.reg, "skiff_invocation_errors_total", map[string]string{"function": "echo"}); got != 2 {
			t.Errorf("got %v invocation errors, want 2", got)
		}
		if got := counterValue(t, e.reg, "skiff_cold_starts_total", map[string]string{"function": "echo"}); got != 2 {
			t.Errorf("got %v cold starts, want 2", got)
		}
	})
}

func TestTailLogsFollow(t *testing.T) {
	forEachProtocol(t, Config{}, func(t *testing.T, e *env, c clients, _ []connect.ClientOption) {
		mustCreate(t, c, "f", nil)
		e.st.setLogs([]LogEntry{{Function: "f", RequestID: "r1", Time: t0, Text: "hello\n"}})
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		stream, err := c.logs.TailLogs(ctx, connect.NewRequest(&skiffv1.TailLogsRequest{FunctionName: "f", Lines: 5, Follow: true}))
		if err != nil {
			t.Fatal(err)
		}
		if !stream.Receive() {
			t.Fatalf("no log entry: %v", stream.Err())
		}
		if got := stream.Msg(); got.Text != "hello\n" || got.RequestId != "r1" {
			t.Errorf("got %q %q, want hello r1", got.Text, got.RequestId)
		}
		cancel()
		for stream.Receive() {
		}
		stream.Close()
		if diff := cmp.Diff([]any{"f", 5, true}, e.st.readLogsArgs()); diff != "" {
			t.Errorf("ReadLogs arguments (-want +got):\n%s", diff)
		}
		_, err = c.logs.TailLogs(context.Background(), connect.NewRequest(&skiffv1.TailLogsRequest{FunctionName: "nope"}))
		if err == nil {
			s, _ := c.logs.TailLogs(context.Background(), connect.NewRequest(&skiffv1.TailLogsRequest{FunctionName: "nope"}))
			for s.Receive() {
			}
			err = s.Err()
		}
		wantCode(t, err, connect.CodeNotFound)
	})
}

func TestDryRun(t *testing.T) {
	forEachProtocol(t, Config{}, func(t *testing.T, e *env, c clients, opts []connect.ClientOption) {
		ctx := testContext(t)
		mustCreate(t, c, "fn1", nil)
		mustCreate(t, c, "fn2", nil)
		dry := func(name string) *connect.Request[skiffv1.InvokeRequest] {
			return connect.NewRequest(&skiffv1.InvokeRequest{FunctionName: name, InvocationType: skiffv1.InvocationType_INVOCATION_TYPE_DRY_RUN})
		}
		resp, err := c.inv.Invoke(ctx, dry("fn1"))
		if err != nil {
			t.Fatal(err)
		}
		if resp.Msg.StatusCode != 204 || resp.Msg.RequestId == "" || len(resp.Msg.Payload) != 0 {
			t.Errorf("got status %d request id %q payload %q, want 204, an id, nothing", resp.Msg.StatusCode, resp.Msg.RequestId, resp.Msg.Payload)
		}
		kr, err := c.keys.CreateKey(ctx, connect.NewRequest(&skiffv1.CreateKeyRequest{InvokeFunctions: []string{"fn1"}}))
		if err != nil {
			t.Fatal(err)
		}
		inv := e.clients(kr.Msg.Secret, opts...)
		if _, err := inv.inv.Invoke(ctx, dry("fn1")); err != nil {
			t.Errorf("dry run with permission: %v", err)
		}
		_, err = inv.inv.Invoke(ctx, dry("fn2"))
		wantCode(t, err, connect.CodePermissionDenied)
		if got := e.rt.callCount(); got != 0 {
			t.Errorf("dry runs reached the router %d times, want 0", got)
		}
	})
}

func TestDeleteDuringInvoke(t *testing.T) {
	forEachProtocol(t, Config{}, func(t *testing.T, e *env, c clients, _ []connect.ClientOption) {
		ctx := testContext(t)
		mustCreate(t, c, "doomed", nil)
		b := newBlocker(t)
		e.rt.setInvoke(b.invoke)
		type result struct {
			resp *connect.Response[skiffv1.InvokeResponse]
			err  error
		}
		done := make(chan result, 1)
		go func() {
			resp, err := c.inv.Invoke(ctx, invokeReq("doomed", `"in flight"`))
			done <- result{resp, err}
		}()
		b.waitEntered(t, 1)
		if _, err := c.fn.DeleteFunction(ctx, connect.NewRequest(&skiffv1.DeleteFunctionRequest{Name: "doomed"})); err != nil {
			t.Fatal(err)
		}
		_, err := c.inv.Invoke(ctx, invokeReq("doomed", "{}"))
		wantCode(t, err, connect.CodeNotFound)
		b.unblock()
		r := <-done
		if r.err != nil {
			t.Fatalf("in-flight invoke failed after delete: %v", r.err)
		}
		if string(r.resp.Msg.Payload) != `"in flight"` || r.resp.Msg.StatusCode != 200 {
			t.Errorf("in-flight invoke got %d %s, want 200 \"in flight\"", r.resp.Msg.StatusCode, r.resp.Msg.Payload)
		}
		if got := e.rt.retireCalls(); len(got) != 1 || got[0] != (retireCall{"doomed", ""}) {
			t.Errorf("got retire calls %v, want one for doomed keeping nothing", got)
		}
	})
}

func TestListPaging(t *testing.T) {
	forEachProtocol(t, Config{}, func(t *testing.T, e *env, c clients, _ []connect.ClientOption) {
		ctx := testContext(t)
		var want []string
		for i := range 7 {
			n := fmt.Sprintf("fn-%d", i)
			mustCreate(t, c, n, nil)
			want = append(want, n)
		}
		var got []string
		var sizes []int
		token := ""
		for range 10 {
			resp, err := c.fn.ListFunctions(ctx, connect.NewRequest(&skiffv1.ListFunctionsRequest{PageSize: 3, PageToken: token}))
			if err != nil {
				t.Fatal(err)
			}
			sizes = append(sizes, len(resp.Msg.Functions))
			for _, fn := range resp.Msg.Functions {
				got = append(got, fn.Name)
			}
			token = resp.Msg.NextPageToken
			if token == "" {
				break
			}
			if strings.Contains(token, "fn-") {
				t.Errorf("page token %q shows the name: want it opaque", token)
			}
		}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("listed names (-want +got):\n%s", diff)
		}
		if diff := cmp.Diff([]int{3, 3, 1}, sizes); diff != "" {
			t.Errorf("page sizes (-want +got):\n%s", diff)
		}
		resp, err := c.fn.ListFunctions(ctx, connect.NewRequest(&skiffv1.ListFunctionsRequest{}))
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Msg.Functions) != 7 || resp.Msg.NextPageToken != "" {
			t.Errorf("default page got %d functions and token %q, want 7 and none", len(resp.Msg.Functions), resp.Msg.NextPageToken)
		}
	})
}

func TestEnsureAdminKey(t *testing.T) {
	ctx := context.Background()
	st := newFakeStore()
	newFE := func() *Frontend {
		f, err := New(Config{}, st, &fakeRouter{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	dir := filepath.Join(t.TempDir(), "data")
	path := filepath.Join(dir, "admin.key")

	secret, created, err := newFE().EnsureAdminKey(ctx, path)
	if err != nil || !created {
		t.Fatalf("first start: created %v err %v, want a new key", created, err)
	}
	if !strings.HasPrefix(secret, "sk_") {
		t.Errorf("got secret %q, want the sk_ prefix", secret)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("got key file mode %v, want 0600", fi.Mode().Perm())
	}
	di, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if di.Mode().Perm() != 0o700 {
		t.Errorf("got key directory mode %v, want 0700", di.Mode().Perm())
	}
	b, _ := os.ReadFile(path)
	if strings.TrimSpace(string(b)) != secret {
		t.Errorf("key file holds %q, want the secret", b)
	}
	keys, _ := st.ListKeys(ctx)
	h := sha256.Sum256([]byte(secret))
	if len(keys) != 1 || !keys[0].Admin || !bytes.Equal(keys[0].SecretHash, h[:]) {
		t.Fatalf("got stored keys %+v, want one admin key with the secret's hash", keys)
	}
	if bytes.Contains([]byte(fmt.Sprint(keys)), []byte(secret)) {
		t.Errorf("the store holds the secret itself")
	}

	// Restart: the key is reused.
	again, created, err := newFE().EnsureAdminKey(ctx, path)
	if err != nil || created || again != secret {
		t.Errorf("restart: got created %v err %v same secret %v, want reuse", created, err, again == secret)
	}
	if keys, _ := st.ListKeys(ctx); len(keys) != 1 {
		t.Errorf("restart made %d keys, want 1", len(keys))
	}

	// A file whose key is gone gets a fresh key.
	if err := os.WriteFile(path, []byte("sk_revoked\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	fresh, created, err := newFE().EnsureAdminKey(ctx, path)
	if err != nil || !created || fresh == secret {
		t.Errorf("stale file: got created %v err %v, want a new key", created, err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("rewritten key file mode %v, want 0600", fi.Mode().Perm())
	}
}

func TestLogShipperDropsWhenFull(t *testing.T) {
	entered := make(chan string, 10)
	unblock := make(chan struct{})
	var mu sync.Mutex
	var stored []string
	st := newFakeStore()
	st.appendLog = func(_ context.Context, e LogEntry) error {
		entered <- e.RequestID
		<-unblock
		mu.Lock()
		stored = append(stored, e.RequestID)
		mu.Unlock()
		return nil
	}
	dropped := prometheus.NewCounter(prometheus.CounterOpts{Name: "d"})
	s := newShipper(st, 1, slog.New(slog.DiscardHandler), dropped)
	s.enqueue(LogEntry{RequestID: "1"})
	if got := <-entered; got != "1" {
		t.Fatalf("got %s first, want 1", got)
	}
	s.enqueue(LogEntry{RequestID: "2"}) // queued
	s.enqueue(LogEntry{RequestID: "3"}) // queue full: dropped
	if got := metricValue(dropped); got != 1 {
		t.Errorf("got %v dropped, want 1", got)
	}
	close(unblock)
	s.close()
	mu.Lock()
	defer mu.Unlock()
	if diff := cmp.Diff([]string{"1", "2"}, stored); diff != "" {
		t.Errorf("stored logs (-want +got):\n%s", diff)
	}
	s.enqueue(LogEntry{RequestID: "4"})
	if got := metricValue(dropped); got != 2 {
		t.Errorf("got %v dropped after close, want 2", got)
	}
}

func TestConfigKey(t *testing.T) {
	base := &skiffv1.Function{Name: "f", CodeSha256: "abc", Config: &skiffv1.FunctionConfig{
		Runtime: "provided", MemoryMb: 128, Environment: map[string]string{"A": "1", "B": "2", "C": "3", "D": "4"},
	}}
	key := configKey(base)
	for range 20 {
		if got := configKey(cloneFn(base)); got != key {
			t.Fatalf("config key not deterministic: %s vs %s", got, key)
		}
	}
	changes := map[string]func(*skiffv1.Function){
		"name":        func(f *skiffv1.Function) { f.Name = "g" },
		"code":        func(f *skiffv1.Function) { f.CodeSha256 = "abd" },
		"memory":      func(f *skiffv1.Function) { f.Config.MemoryMb = 256 },
		"environment": func(f *skiffv1.Function) { f.Config.Environment["A"] = "x" },
	}
	for name, change := range changes {
		f := cloneFn(base)
		change(f)
		if configKey(f) == key {
			t.Errorf("changing the %s kept the config key", name)
		}
	}
	f := cloneFn(base)
	f.ReservedConcurrency = new(int32)
	f.Revision = 9
	if configKey(f) != key {
		t.Errorf("reserved concurrency or revision changed the config key: sandboxes would be retired for nothing")
	}
}

func TestNewRequestID(t *testing.T) {
	seen := map[string]bool{}
	re := regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
	for range 1000 {
		id := newRequestID()
		if !re.MatchString(id) {
			t.Fatalf("got %q, want a v4 UUID", id)
		}
		if seen[id] {
			t.Fatalf("duplicate id %s", id)
		}
		seen[id] = true
	}
}

// testContext bounds a test's calls, so a broken admission that lets a call
// block in the router fails the test instead of hanging it.
func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func metricValue(c prometheus.Metric) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		return -1
	}
	return m.GetCounter().GetValue()
}

// findMetric returns the metric of a family whose labels include labels.
func findMetric(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) *dto.Metric {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, fam := range fams {
		if fam.GetName() != name {
			continue
		}
	metrics:
		for _, m := range fam.GetMetric() {
			for k, v := range labels {
				found := false
				for _, lp := range m.GetLabel() {
					found = found || lp.GetName() == k && lp.GetValue() == v
				}
				if !found {
					continue metrics
				}
			}
			return m
		}
	}
	return nil
}

func counterValue(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	m := findMetric(t, reg, name, labels)
	if m == nil {
		return 0
	}
	return m.GetCounter().GetValue()
}

func gaugeValue(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	m := findMetric(t, reg, name, labels)
	if m == nil {
		return 0
	}
	return m.GetGauge().GetValue()
}

func manyRules(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("10.0.%d.0/24", i)
	}
	return out
}

// TestSmallResponsesAreNotCompressed: gzipping a small invoke response
// costs more CPU than the whole rest of the front end; only responses of
// at least compressMinBytes are compressed.
func TestSmallResponsesAreNotCompressed(t *testing.T) {
	e := newEnv(t, Config{})
	c := e.clients(e.admin)
	ctx := testContext(t)
	mustCreate(t, c, "echo", nil)
	for _, size := range []int{64, 64 << 10} {
		e.rt.setInvoke(func(_ context.Context, req *skiffv1.AgentInvokeRequest) (*skiffv1.AgentInvokeResponse, error) {
			return &skiffv1.AgentInvokeResponse{Payload: bytes.Repeat([]byte("a"), size)}, nil
		})
		body, _ := proto.Marshal(&skiffv1.InvokeRequest{FunctionName: "echo"})
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, e.url+"/skiff.v1.InvokeService/Invoke", bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/proto")
		req.Header.Set("Accept-Encoding", "gzip")
		req.Header.Set("Authorization", "Bearer "+e.admin)
		resp, err := e.hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		gz := resp.Header.Get("Content-Encoding") == "gzip"
		if want := size >= compressMinBytes; gz != want || resp.StatusCode != 200 {
			t.Errorf("%d-byte response: status %d, gzip %v, want gzip %v", size, resp.StatusCode, gz, want)
		}
	}
}
