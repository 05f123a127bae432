package main

import (
	"archive/zip"
	"bytes"
	"crypto/rand"
	"encoding/json"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

func writeFile(t *testing.T, path string, data []byte, mode os.FileMode) string {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // umask-proof
		t.Fatal(err)
	}
	return path
}

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestFnCreateInline(t *testing.T) {
	for _, proto := range protocols {
		t.Run(proto, func(t *testing.T) {
			s := newFakeServer(t)
			c := newCLI(t, s)
			zip := writeFile(t, filepath.Join(t.TempDir(), "fn.zip"), []byte("PK-not-really-a-zip"), 0o644)
			r := c.run("--protocol", proto, "fn", "create", "hello", "--zip", zip,
				"--memory", "256", "--timeout", "10", "--ephemeral-storage", "1024", "--handler", "main",
				"--env", "A=1", "--env", "B=x=y", "--description", "says hello")
			if r.code != 0 {
				t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
			}
			proc, h, msg := s.fn.last(t)
			if proc != "CreateFunction" {
				t.Fatalf("got call %s, want CreateFunction", proc)
			}
			if got, want := h.Get("Authorization"), "Bearer test-key"; got != want {
				t.Errorf("Authorization = %q, want %q", got, want)
			}
			if got := s.fn.protocols(); got[0] != proto {
				t.Errorf("server saw protocol %q, want %q", got[0], proto)
			}
			want := &skiffv1.CreateFunctionRequest{
				Name: "hello",
				Config: &skiffv1.FunctionConfig{
					Runtime: "provided", Handler: "main", MemoryMb: 256, TimeoutSeconds: 10, EphemeralStorageMb: 1024,
					Environment: map[string]string{"A": "1", "B": "x=y"}, Description: "says hello",
				},
				ZipFile: []byte("PK-not-really-a-zip"),
			}
			if d := cmp.Diff(want, msg, protocmp.Transform()); d != "" {
				t.Errorf("request (-want +got):\n%s", d)
			}
			for _, s := range []string{"Name:", "hello", "256 MB", "10 s", "A=1", "B=x=y"} {
				if !strings.Contains(r.stdout, s) {
					t.Errorf("stdout lacks %q:\n%s", s, r.stdout)
				}
			}
		})
	}
}

func TestFnCreateDefaults(t *testing.T) {
	s := newFakeServer(t)
	c := newCLI(t, s)
	zip := writeFile(t, filepath.Join(t.TempDir(), "fn.zip"), []byte("zip"), 0o644)
	if r := c.run("fn", "create", "hello", "--zip", zip); r.code != 0 {
		t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
	}
	_, _, msg := s.fn.last(t)
	want := &skiffv1.FunctionConfig{Runtime: "provided", Handler: "bootstrap"}
	if d := cmp.Diff(want, msg.(*skiffv1.CreateFunctionRequest).GetConfig(), protocmp.Transform()); d != "" {
		t.Errorf("config (-want +got):\n%s", d)
	}
}

// TestFnCreateStreams checks that archives over 4 MB go through
// UploadFunction: the header first, then 1 MiB chunks that add up.
func TestFnCreateStreams(t *testing.T) {
	for _, proto := range protocols {
		t.Run(proto, func(t *testing.T) {
			s := newFakeServer(t)
			c := newCLI(t, s)
			data := randomBytes(t, 4<<20+300_000)
			zip := writeFile(t, filepath.Join(t.TempDir(), "big.zip"), data, 0o644)
			r := c.run("--protocol", proto, "fn", "create", "big", "--zip", zip, "--memory", "512", "--env", "K=V")
			if r.code != 0 {
				t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
			}
			proc, h, msg := s.fn.last(t)
			if proc != "UploadFunction" {
				t.Fatalf("got call %s, want UploadFunction", proc)
			}
			if got, want := h.Get("Authorization"), "Bearer test-key"; got != want {
				t.Errorf("Authorization = %q, want %q", got, want)
			}
			u := msg.(*upload)
			wantHeader := &skiffv1.UploadFunctionRequest_Header{
				Name: "big", Create: true, Size: int64(len(data)),
				Config: &skiffv1.FunctionConfig{Runtime: "provided", Handler: "bootstrap", MemoryMb: 512, Environment: map[string]string{"K": "V"}},
			}
			if d := cmp.Diff(wantHeader, u.header, protocmp.Transform()); d != "" {
				t.Errorf("header (-want +got):\n%s", d)
			}
			wantOrder := []string{"header", "chunk", "chunk", "chunk", "chunk", "chunk"}
			if d := cmp.Diff(wantOrder, u.order); d != "" {
				t.Errorf("message order (-want +got):\n%s", d)
			}
			for i, ch := range u.chunks {
				want := 1 << 20
				if i == len(u.chunks)-1 {
					want = 300_000
				}
				if len(ch) != want {
					t.Errorf("chunk %d has %d bytes, want %d", i, len(ch), want)
				}
			}
			if !bytes.Equal(u.data(), data) {
				t.Errorf("uploaded data differs from the archive")
			}
			if !strings.Contains(r.stdout, "big") {
				t.Errorf("stdout lacks the function:\n%s", r.stdout)
			}
			if r.stderr != "" {
				t.Errorf("stderr = %q, want nothing when it is not a terminal", r.stderr)
			}
		})
	}
}

func TestFnCreateStreamRejected(t *testing.T) {
	for _, proto := range protocols {
		t.Run(proto, func(t *testing.T) {
			s := newFakeServer(t)
			s.fn.fail = errs.Invalid("code", "the archive unpacks to more than 250 MB")
			zip := writeFile(t, filepath.Join(t.TempDir(), "bomb.zip"), randomBytes(t, 6<<20), 0o644)
			r := newCLI(t, s).run("--protocol", proto, "fn", "create", "bomb", "--zip", zip)
			want := "skiff: the archive unpacks to more than 250 MB (reason: invalid_code, field: code)\n"
			if r.code != exitError || r.stderr != want {
				t.Errorf("got exit %d, stderr %q; want 1 and %q", r.code, r.stderr, want)
			}
			_, _, msg := s.fn.last(t)
			if h := msg.(*upload).header; h.GetName() != "bomb" || h.GetSize() != 6<<20 {
				t.Errorf("header %v, want name bomb and size %d", h, 6<<20)
			}
		})
	}
}

func TestFnCreateAtLimitIsInline(t *testing.T) {
	s := newFakeServer(t)
	c := newCLI(t, s)
	zip := writeFile(t, filepath.Join(t.TempDir(), "edge.zip"), randomBytes(t, 4<<20), 0o644)
	if r := c.run("fn", "create", "edge", "--zip", zip); r.code != 0 {
		t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
	}
	if proc, _, _ := s.fn.last(t); proc != "CreateFunction" {
		t.Errorf("a 4 MiB archive went through %s, want CreateFunction", proc)
	}
}

func TestFnUpdateCode(t *testing.T) {
	tests := []struct {
		name     string
		size     int
		wantProc string
	}{
		{"inline", 1000, "UpdateFunctionCode"},
		{"streamed", 5 << 20, "UploadFunction"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newFakeServer(t)
			c := newCLI(t, s)
			c.terminal = true
			data := randomBytes(t, tt.size)
			zip := writeFile(t, filepath.Join(t.TempDir(), "code.zip"), data, 0o644)
			r := c.run("fn", "update-code", "hello", "--zip", zip)
			if r.code != 0 {
				t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
			}
			// On a terminal, streamed uploads show progress; inline ones are quick.
			if shown, want := strings.Contains(r.stderr, "uploading"), tt.wantProc == "UploadFunction"; shown != want {
				t.Errorf("upload progress shown = %v, want %v; stderr %q", shown, want, r.stderr)
			}
			proc, _, msg := s.fn.last(t)
			if proc != tt.wantProc {
				t.Fatalf("got call %s, want %s", proc, tt.wantProc)
			}
			switch m := msg.(type) {
			case *skiffv1.UpdateFunctionCodeRequest:
				if m.GetName() != "hello" || !bytes.Equal(m.GetZipFile(), data) {
					t.Errorf("got name %q and %d bytes, want hello and the archive", m.GetName(), len(m.GetZipFile()))
				}
			case *upload:
				want := &skiffv1.UploadFunctionRequest_Header{Name: "hello", Size: int64(len(data))}
				if d := cmp.Diff(want, m.header, protocmp.Transform()); d != "" {
					t.Errorf("header (-want +got):\n%s", d)
				}
				if len(m.chunks) != 5 || !bytes.Equal(m.data(), data) {
					t.Errorf("got %d chunks, want 5 adding up to the archive", len(m.chunks))
				}
			}
		})
	}
}

func TestFnCreateFromDir(t *testing.T) {
	s := newFakeServer(t)
	c := newCLI(t, s)
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "bootstrap"), []byte("#!/bin/sh\n"), 0o755)
	writeFile(t, filepath.Join(dir, "lib", "data.txt"), []byte("data"), 0o644)
	if r := c.run("fn", "create", "hello", "--dir", dir); r.code != 0 {
		t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
	}
	_, _, msg := s.fn.last(t)
	got := readZip(t, msg.(*skiffv1.CreateFunctionRequest).GetZipFile())
	want := []zipItem{
		{Name: "bootstrap", Mode: 0o755, Data: "#!/bin/sh\n"},
		{Name: "lib/data.txt", Mode: 0o644, Data: "data"},
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("archive (-want +got):\n%s", d)
	}
}

func TestFnCreateUsageErrors(t *testing.T) {
	zip := writeFile(t, filepath.Join(t.TempDir(), "fn.zip"), []byte("zip"), 0o644)
	dir := t.TempDir()
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no code", []string{"fn", "create", "hello"}, "one of --zip or --dir is required"},
		{"both", []string{"fn", "create", "hello", "--zip", zip, "--dir", dir}, "cannot be used together"},
		{"no name", []string{"fn", "create", "--zip", zip}, "accepts 1 arg"},
		{"bad env", []string{"fn", "create", "hello", "--zip", zip, "--env", "NOEQUALS"}, `invalid --env "NOEQUALS"`},
		{"dup env", []string{"fn", "create", "hello", "--zip", zip, "--env", "A=1", "--env", "A=2"}, "--env A given twice"},
		{"bad memory", []string{"fn", "create", "hello", "--zip", zip, "--memory", "lots"}, "invalid argument"},
		{"unknown flag", []string{"fn", "create", "hello", "--zip", zip, "--bogus"}, "unknown flag: --bogus"},
		{"bad output", []string{"-o", "yaml", "fn", "list"}, `invalid --output "yaml"`},
		{"bad protocol", []string{"--protocol", "http3", "fn", "list"}, `invalid --protocol "http3"`},
		{"unknown command", []string{"fn", "craete"}, `unknown command "craete" for "skiff fn" (did you mean "create"?)`},
		{"unknown top command", []string{"bogus"}, `unknown command "bogus" for "skiff"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newFakeServer(t)
			r := newCLI(t, s).run(tt.args...)
			if r.code != exitUsage {
				t.Errorf("exit code %d, want %d; stderr: %s", r.code, exitUsage, r.stderr)
			}
			if !strings.Contains(r.stderr, "skiff: ") || !strings.Contains(r.stderr, tt.want) {
				t.Errorf("stderr %q lacks %q", r.stderr, tt.want)
			}
			if !strings.Contains(r.stderr, "--help' for usage") {
				t.Errorf("stderr %q lacks the help hint", r.stderr)
			}
			if n := s.fn.count(); n != 0 {
				t.Errorf("the server got %d calls, want none", n)
			}
		})
	}
}

func TestFnUpdateConfigMask(t *testing.T) {
	tests := []struct {
		name     string
		args     []string
		wantMask []string
		wantCfg  *skiffv1.FunctionConfig
	}{
		{"memory only", []string{"--memory", "512"}, []string{"memory_mb"}, &skiffv1.FunctionConfig{MemoryMb: 512}},
		{
			"several", []string{"--timeout", "30", "--env", "A=1", "--description", "", "--ephemeral-storage", "2048"},
			[]string{"timeout_seconds", "ephemeral_storage_mb", "environment", "description"},
			&skiffv1.FunctionConfig{TimeoutSeconds: 30, EphemeralStorageMb: 2048, Environment: map[string]string{"A": "1"}},
		},
		{"handler", []string{"--handler", "h"}, []string{"handler"}, &skiffv1.FunctionConfig{Handler: "h"}},
		{
			"network", []string{"--network", "egress", "--allow", "10.0.0.0/8:5432", "--allow", "192.168.1.1", "--deny", "1.2.3.4/32"},
			[]string{"network", "network_allow", "network_deny"},
			&skiffv1.FunctionConfig{Network: "egress", NetworkAllow: []string{"10.0.0.0/8:5432", "192.168.1.1"}, NetworkDeny: []string{"1.2.3.4/32"}},
		},
		// Setting a value to zero is still a change the mask must carry.
		{"explicit zero", []string{"--memory", "0"}, []string{"memory_mb"}, &skiffv1.FunctionConfig{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newFakeServer(t)
			r := newCLI(t, s).run(append([]string{"fn", "update-config", "hello"}, tt.args...)...)
			if r.code != 0 {
				t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
			}
			_, _, msg := s.fn.last(t)
			want := &skiffv1.UpdateFunctionConfigurationRequest{Name: "hello", Config: tt.wantCfg, UpdateMask: tt.wantMask}
			if d := cmp.Diff(want, msg, protocmp.Transform()); d != "" {
				t.Errorf("request (-want +got):\n%s", d)
			}
		})
	}
	t.Run("nothing", func(t *testing.T) {
		s := newFakeServer(t)
		r := newCLI(t, s).run("fn", "update-config", "hello")
		if r.code != exitUsage || !strings.Contains(r.stderr, "nothing to update") {
			t.Errorf("got exit %d, stderr %q; want %d and 'nothing to update'", r.code, r.stderr, exitUsage)
		}
		if s.fn.count() != 0 {
			t.Errorf("the server got a call, want none")
		}
	})
}

func TestFnListFollowsPages(t *testing.T) {
	for _, proto := range protocols {
		t.Run(proto, func(t *testing.T) {
			s := newFakeServer(t)
			s.fn.pages = map[string]*skiffv1.ListFunctionsResponse{
				"":   {Functions: []*skiffv1.Function{fnFor("a"), fnFor("b")}, NextPageToken: "p2"},
				"p2": {Functions: []*skiffv1.Function{fnFor("c")}, NextPageToken: "p3"},
				"p3": {Functions: []*skiffv1.Function{fnFor("d")}},
			}
			c := newCLI(t, s)

			r := c.run("--protocol", proto, "fn", "list")
			if r.code != 0 {
				t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
			}
			if n := s.fn.count(); n != 3 {
				t.Errorf("got %d ListFunctions calls, want 3", n)
			}
			lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
			if len(lines) != 5 || !strings.HasPrefix(lines[0], "NAME") {
				t.Fatalf("table has %d lines, want a header and 4 rows:\n%s", len(lines), r.stdout)
			}
			for i, name := range []string{"a", "b", "c", "d"} {
				if f := strings.Fields(lines[i+1]); f[0] != name {
					t.Errorf("row %d is %q, want function %s", i, lines[i+1], name)
				}
			}

			r = c.run("--protocol", proto, "fn", "list", "--output", "json")
			if r.code != 0 {
				t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
			}
			var out struct {
				Functions []struct {
					Name   string `json:"name"`
					Config struct {
						MemoryMb int `json:"memoryMb"`
					} `json:"config"`
				} `json:"functions"`
			}
			if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
				t.Fatalf("json output does not parse: %v\n%s", err, r.stdout)
			}
			var names []string
			for _, f := range out.Functions {
				names = append(names, f.Name)
				if f.Config.MemoryMb != 128 {
					t.Errorf("function %s memoryMb = %d, want 128", f.Name, f.Config.MemoryMb)
				}
			}
			if d := cmp.Diff([]string{"a", "b", "c", "d"}, names); d != "" {
				t.Errorf("names (-want +got):\n%s", d)
			}
		})
	}
}

func TestFnListRepeatedToken(t *testing.T) {
	s := newFakeServer(t)
	s.fn.pages = map[string]*skiffv1.ListFunctionsResponse{
		"":  {Functions: []*skiffv1.Function{fnFor("a")}, NextPageToken: "x"},
		"x": {Functions: []*skiffv1.Function{fnFor("b")}, NextPageToken: "x"},
	}
	r := newCLI(t, s).run("fn", "list")
	if r.code != exitError || !strings.Contains(r.stderr, `repeated page token "x"`) {
		t.Errorf("got exit %d, stderr %q; want 1 and a repeated-token error", r.code, r.stderr)
	}
}

func TestFnGetAndDelete(t *testing.T) {
	s := newFakeServer(t)
	c := newCLI(t, s)

	r := c.run("fn", "get", "hello")
	if r.code != 0 {
		t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
	}
	if _, _, msg := s.fn.last(t); !proto.Equal(msg.(proto.Message), &skiffv1.GetFunctionRequest{Name: "hello"}) {
		t.Errorf("got request %v, want name hello", msg)
	}
	for _, want := range []string{"Reserved concurrency:  7", "A=1", "B=2"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("stdout lacks %q:\n%s", want, r.stdout)
		}
	}
	if !strings.Contains(r.stdout, "Environment:") || !strings.HasSuffix(strings.Fields(lineWith(r.stdout, "Environment:"))[1], "A=1") {
		t.Errorf("the Environment line does not start with A=1:\n%s", r.stdout)
	}
	if strings.Index(r.stdout, "A=1") > strings.Index(r.stdout, "B=2") {
		t.Errorf("environment not sorted:\n%s", r.stdout)
	}

	r = c.run("fn", "get", "hello", "-o", "json")
	var f struct {
		Name                string `json:"name"`
		ReservedConcurrency int    `json:"reservedConcurrency"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &f); err != nil || f.Name != "hello" || f.ReservedConcurrency != 7 {
		t.Errorf("json output %q (err %v), want name hello and reservedConcurrency 7", r.stdout, err)
	}

	r = c.run("fn", "delete", "hello")
	if r.code != 0 || r.stdout != "deleted function hello\n" {
		t.Errorf("delete: exit %d, stdout %q; want 0 and a confirmation", r.code, r.stdout)
	}
	if proc, _, msg := s.fn.last(t); proc != "DeleteFunction" || msg.(*skiffv1.DeleteFunctionRequest).GetName() != "hello" {
		t.Errorf("got %s %v, want DeleteFunction of hello", proc, msg)
	}
}

func TestServerErrors(t *testing.T) {
	tests := []struct {
		name    string
		fail    error
		args    []string
		wantErr []string
	}{
		{
			"not found", nil, []string{"fn", "get", "missing"},
			[]string{`skiff: function "missing" not found (reason: not_found)`},
		},
		{
			"invalid field", errs.Invalid("memory_mb", "memory 64 MB is out of range 128-10240"),
			[]string{"fn", "update-config", "x", "--memory", "64"},
			[]string{"skiff: memory 64 MB is out of range 128-10240 (reason: invalid_memory_mb, field: memory_mb)"},
		},
		{
			"throttled", errs.Throttled(250*time.Millisecond, "reserved concurrency of x reached"),
			[]string{"fn", "update-config", "x", "--memory", "256"},
			[]string{"skiff: reserved concurrency of x reached (reason: throttled, retry after 250ms)"},
		},
		{
			"conflict", errs.Conflict("function x changed concurrently"),
			[]string{"fn", "update-config", "x", "--memory", "256"},
			[]string{"skiff: function x changed concurrently (reason: conflict)"},
		},
	}
	for _, tt := range tests {
		for _, proto := range protocols {
			t.Run(tt.name+"/"+proto, func(t *testing.T) {
				s := newFakeServer(t)
				s.fn.fail = tt.fail
				r := newCLI(t, s).run(append([]string{"--protocol", proto}, tt.args...)...)
				if r.code != exitError {
					t.Errorf("exit code %d, want 1", r.code)
				}
				for _, w := range tt.wantErr {
					if !strings.Contains(r.stderr, w) {
						t.Errorf("stderr %q lacks %q", r.stderr, w)
					}
				}
				if r.stdout != "" {
					t.Errorf("stdout = %q, want nothing", r.stdout)
				}
			})
		}
	}
}

func TestUnreachableEndpoint(t *testing.T) {
	c := newCLI(t, nil)
	c.env[envEndpoint] = "127.0.0.1:1" // nothing listens on port 1; host:port means http://
	r := c.run("fn", "list")
	if r.code != exitError {
		t.Errorf("exit code %d, want 1", r.code)
	}
	for _, w := range []string{"skiff: ", "code: unavailable", "hint: is a skiff gateway running at http://127.0.0.1:1?"} {
		if !strings.Contains(r.stderr, w) {
			t.Errorf("stderr %q lacks %q", r.stderr, w)
		}
	}
}

// lineWith returns the first line of s containing sub.
func lineWith(s, sub string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			return l
		}
	}
	return ""
}

type zipItem struct {
	Name string
	Mode fs.FileMode
	Data string
}

func readZip(t *testing.T, b []byte) []zipItem {
	t.Helper()
	zr, err := zip.NewReader(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatalf("reading archive: %v", err)
	}
	var out []zipItem
	for _, f := range zr.File {
		rc, err := f.Open()
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatal(err)
		}
		mode := f.Mode()
		out = append(out, zipItem{Name: f.Name, Mode: mode & (fs.ModeSymlink | fs.ModePerm), Data: string(data)})
	}
	return out
}
