package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"skiff.dev/skiff/internal/errs"
)

func wantInvalid(t *testing.T, err error, field string) {
	t.Helper()
	var e *errs.Error
	if !errors.As(err, &e) || e.Kind != errs.KindInvalidArgument || e.Field != field {
		t.Fatalf("got %v, want InvalidArgument on field %s", err, field)
	}
}

func TestParseURLs(t *testing.T) {
	good := []struct {
		in   string
		want []string
	}{
		{"nats://a:4222", []string{"nats://a:4222"}},
		{"nats://a:4222,nats://b:4223, tls://c.example:4222 ,", []string{"nats://a:4222", "nats://b:4223", "tls://c.example:4222"}},
		{"nats://10.0.0.1", []string{"nats://10.0.0.1"}},
		{"nats://[::1]:4222", []string{"nats://[::1]:4222"}},
	}
	for _, tt := range good {
		got, err := ParseURLs(tt.in)
		if err != nil {
			t.Errorf("ParseURLs(%q): %v", tt.in, err)
			continue
		}
		if strings.Join(got, "|") != strings.Join(tt.want, "|") {
			t.Errorf("ParseURLs(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
	bad := []struct{ name, in string }{
		{"empty", ""},
		{"only commas", " , ,"},
		{"http scheme", "http://a:4222"},
		{"no scheme", "a:4222"},
		{"no host", "nats://:4222"},
		{"port zero", "nats://a:0"},
		{"port too big", "nats://a:65536"},
		{"port not a number", "nats://a:x"},
		{"empty port", "nats://a:"},
		{"path", "nats://a:4222/x"},
		{"query", "nats://a:4222?x=1"},
		{"duplicate", "nats://a:4222,nats://a:4222"},
		{"too long", "nats://" + strings.Repeat("a", MaxURLLen) + ":4222"},
		{"too many", strings.Repeat("nats://a:4222,", MaxURLs+1)},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseURLs(tt.in)
			wantInvalid(t, err, "nats")
		})
	}
}

func TestParseURLsKeepsPasswordsOutOfErrors(t *testing.T) {
	for _, in := range []string{"nats://bob:hunter2secret@a:4222", "nats://hunter2secret@a:4222", "nats://bob:hunter2secret@a:4222/%zz"} {
		_, err := ParseURLs(in)
		wantInvalid(t, err, "nats")
		if strings.Contains(err.Error(), "hunter2secret") {
			t.Fatalf("error shows the password: %v", err)
		}
	}
}

func TestSecretNeverPrints(t *testing.T) {
	cfg := Config{URLs: []string{"nats://a:4222"}, Auth: Auth{User: "bob", Password: "pw-hunter2", Token: "tok-hunter2"}}
	var out []string
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%d"} {
		out = append(out, fmt.Sprintf(verb, cfg), fmt.Sprintf(verb, cfg.Auth), fmt.Sprintf(verb, cfg.Auth.Password))
	}
	var logged bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&logged, nil))
	log.Info("cfg", "auth", cfg.Auth, "password", cfg.Auth.Password, "token", cfg.Auth.Token)
	log = slog.New(slog.NewTextHandler(&logged, nil))
	log.Info("cfg", "auth", cfg.Auth, "password", cfg.Auth.Password)
	out = append(out, logged.String())
	for _, s := range out {
		if strings.Contains(s, "hunter2") {
			t.Fatalf("secret printed: %s", s)
		}
	}
	if !strings.Contains(logged.String(), redacted) {
		t.Fatalf("log does not show %s: %s", redacted, logged.String())
	}
	if string(cfg.Auth.Password) != "pw-hunter2" {
		t.Fatal("the value itself must stay usable")
	}
}

func TestExternalConfigValidation(t *testing.T) {
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage.pem")
	if err := os.WriteFile(garbage, []byte("not a pem"), 0o600); err != nil {
		t.Fatal(err)
	}
	creds := filepath.Join(dir, "user.creds")
	if err := os.WriteFile(creds, []byte("creds"), 0o600); err != nil {
		t.Fatal(err)
	}
	big := filepath.Join(dir, "big.creds")
	if err := os.WriteFile(big, make([]byte, maxCredsFileSize+1), 0o600); err != nil {
		t.Fatal(err)
	}
	urls := []string{"nats://127.0.0.1:1"}
	tests := []struct {
		name  string
		cfg   Config
		field string
	}{
		{"bad url", Config{URLs: []string{"http://a"}}, "urls"},
		{"listen addr with urls", Config{URLs: urls, ListenAddr: "127.0.0.1:4222"}, "listen_addr"},
		{"replicas negative", Config{URLs: urls, Replicas: -1}, "replicas"},
		{"replicas over 5", Config{URLs: urls, Replicas: 6}, "replicas"},
		{"user without password", Config{URLs: urls, Auth: Auth{User: "bob"}}, "user"},
		{"password without user", Config{URLs: urls, Auth: Auth{Password: "x"}}, "user"},
		{"two methods", Config{URLs: urls, Auth: Auth{User: "bob", Password: "x", Token: "t"}}, "auth"},
		{"creds and token", Config{URLs: urls, Auth: Auth{CredsFile: creds, Token: "t"}}, "auth"},
		{"missing creds file", Config{URLs: urls, Auth: Auth{CredsFile: filepath.Join(dir, "none.creds")}}, "creds_file"},
		{"creds file is a dir", Config{URLs: urls, Auth: Auth{CredsFile: dir}}, "creds_file"},
		{"creds file too big", Config{URLs: urls, Auth: Auth{CredsFile: big}}, "creds_file"},
		{"token too long", Config{URLs: urls, Auth: Auth{Token: Secret(strings.Repeat("t", 1025))}}, "token"},
		{"missing ca", Config{URLs: urls, TLS: TLSFiles{CAFile: filepath.Join(dir, "none.pem")}}, "tls_ca"},
		{"ca not pem", Config{URLs: urls, TLS: TLSFiles{CAFile: garbage}}, "tls_ca"},
		{"cert without key", Config{URLs: urls, TLS: TLSFiles{CertFile: garbage}}, "tls_cert"},
		{"key without cert", Config{URLs: urls, TLS: TLSFiles{KeyFile: garbage}}, "tls_cert"},
		{"cert not pem", Config{URLs: urls, TLS: TLSFiles{CertFile: garbage, KeyFile: garbage}}, "tls_cert"},
		{"embedded with replicas 3", Config{DataDir: dir, Replicas: 3}, "replicas"},
		{"embedded with auth", Config{DataDir: dir, Auth: Auth{Token: "t"}}, "auth"},
		{"embedded with tls", Config{DataDir: dir, TLS: TLSFiles{CAFile: garbage}}, "tls"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := Open(testCtx(t), tt.cfg)
			if err == nil {
				s.Close()
				t.Fatal("Open succeeded, want an error")
			}
			wantInvalid(t, err, tt.field)
			if strings.Contains(err.Error(), "hunter2") {
				t.Fatalf("error shows a secret: %v", err)
			}
		})
	}
	// Nothing was created: the embedded cases did not touch their dir.
	if _, err := os.Stat(filepath.Join(dir, "nats")); !os.IsNotExist(err) {
		t.Fatalf("a rejected config created %s/nats: %v", dir, err)
	}
}

func TestDefaultReplicas(t *testing.T) {
	c := Config{URLs: []string{"nats://a:4222"}}
	c.setDefaults()
	if c.Replicas != DefaultExternalReplicas {
		t.Fatalf("external default replicas = %d, want %d", c.Replicas, DefaultExternalReplicas)
	}
	c = Config{DataDir: "x"}
	c.setDefaults()
	if c.Replicas != 1 {
		t.Fatalf("embedded default replicas = %d, want 1", c.Replicas)
	}
	s := openStore(t, Config{})
	if s.Replicas() != 1 {
		t.Fatalf("embedded store replicas = %d, want 1", s.Replicas())
	}
	info, err := s.logs.Info(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if info.Config.Replicas != 1 {
		t.Fatalf("embedded LOGS replicas = %d, want 1", info.Config.Replicas)
	}
}

// recordingJS records the replica counts the wrapper passes on.
type recordingJS struct {
	jetstream.JetStream // nil: only the overridden methods are called
	got                 []int
}

func (r *recordingJS) CreateStream(_ context.Context, c jetstream.StreamConfig) (jetstream.Stream, error) {
	r.got = append(r.got, c.Replicas)
	return nil, nil
}
func (r *recordingJS) UpdateStream(_ context.Context, c jetstream.StreamConfig) (jetstream.Stream, error) {
	r.got = append(r.got, c.Replicas)
	return nil, nil
}
func (r *recordingJS) CreateOrUpdateStream(_ context.Context, c jetstream.StreamConfig) (jetstream.Stream, error) {
	r.got = append(r.got, c.Replicas)
	return nil, nil
}
func (r *recordingJS) CreateKeyValue(_ context.Context, c jetstream.KeyValueConfig) (jetstream.KeyValue, error) {
	r.got = append(r.got, c.Replicas)
	return nil, nil
}
func (r *recordingJS) UpdateKeyValue(_ context.Context, c jetstream.KeyValueConfig) (jetstream.KeyValue, error) {
	r.got = append(r.got, c.Replicas)
	return nil, nil
}
func (r *recordingJS) CreateOrUpdateKeyValue(_ context.Context, c jetstream.KeyValueConfig) (jetstream.KeyValue, error) {
	r.got = append(r.got, c.Replicas)
	return nil, nil
}
func (r *recordingJS) CreateObjectStore(_ context.Context, c jetstream.ObjectStoreConfig) (jetstream.ObjectStore, error) {
	r.got = append(r.got, c.Replicas)
	return nil, nil
}
func (r *recordingJS) UpdateObjectStore(_ context.Context, c jetstream.ObjectStoreConfig) (jetstream.ObjectStore, error) {
	r.got = append(r.got, c.Replicas)
	return nil, nil
}
func (r *recordingJS) CreateOrUpdateObjectStore(_ context.Context, c jetstream.ObjectStoreConfig) (jetstream.ObjectStore, error) {
	r.got = append(r.got, c.Replicas)
	return nil, nil
}

func TestReplicatedFillsOnlyUnsetReplicas(t *testing.T) {
	rec := &recordingJS{}
	var js jetstream.JetStream = replicated{JetStream: rec, replicas: 3}
	ctx := context.Background()
	for _, asked := range []int{0, 1} {
		js.CreateStream(ctx, jetstream.StreamConfig{Replicas: asked})
		js.UpdateStream(ctx, jetstream.StreamConfig{Replicas: asked})
		js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{Replicas: asked})
		js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Replicas: asked})
		js.UpdateKeyValue(ctx, jetstream.KeyValueConfig{Replicas: asked})
		js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Replicas: asked})
		js.CreateObjectStore(ctx, jetstream.ObjectStoreConfig{Replicas: asked})
		js.UpdateObjectStore(ctx, jetstream.ObjectStoreConfig{Replicas: asked})
		js.CreateOrUpdateObjectStore(ctx, jetstream.ObjectStoreConfig{Replicas: asked})
	}
	want := "[3 3 3 3 3 3 3 3 3 1 1 1 1 1 1 1 1 1]"
	if got := fmt.Sprint(rec.got); got != want {
		t.Fatalf("replicas passed on = %s, want %s", got, want)
	}
}

func TestReconnectDelay(t *testing.T) {
	for attempts, base := range map[int]time.Duration{0: reconnectMin, 1: 2 * reconnectMin, 3: 8 * reconnectMin, 10: reconnectMax, 1000: reconnectMax} {
		for range 50 {
			d := reconnectDelay(attempts)
			if d < base*8/10 || d > base*12/10 {
				t.Fatalf("reconnectDelay(%d) = %v, want %v ±20%%", attempts, d, base)
			}
		}
	}
}

func TestTransient(t *testing.T) {
	tests := []struct {
		err  error
		want bool
	}{
		{nats.ErrNoResponders, true},
		{nats.ErrTimeout, true},
		{fmt.Errorf("x: %w", context.DeadlineExceeded), true},
		{&jetstream.APIError{Code: 503, ErrorCode: 10008, Description: "JetStream system temporarily unavailable"}, true},
		{jetstream.ErrJetStreamNotEnabled, false},
		{jetstream.ErrJetStreamNotEnabledForAccount, false},
		{&jetstream.APIError{Code: 400, ErrorCode: 10058, Description: "stream name already in use"}, false},
		{&jetstream.APIError{Code: 400, ErrorCode: 10005, Description: "no suitable peers for placement, peer offline"}, true},
		{&jetstream.APIError{Code: 400, ErrorCode: 10005, Description: "no suitable peers for placement"}, false},
		{errors.New("other"), false},
	}
	for _, tt := range tests {
		if got := transient(tt.err); got != tt.want {
			t.Errorf("transient(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
}

// flakyJS fails its first creates with a forming cluster's error.
type flakyJS struct {
	recordingJS
	fails int
}

func (f *flakyJS) CreateOrUpdateStream(ctx context.Context, c jetstream.StreamConfig) (jetstream.Stream, error) {
	if f.fails > 0 {
		f.fails--
		return nil, &jetstream.APIError{Code: 400, ErrorCode: 10005, Description: "no suitable peers for placement, peer offline"}
	}
	return f.recordingJS.CreateOrUpdateStream(ctx, c)
}

// TestReplicatedRetriesAFormingCluster: a create that meets a cluster
// whose servers are not all back yet is retried (every package creates its
// streams through the store's handle), while a cluster too small for the
// replicas fails at once.
func TestReplicatedRetriesAFormingCluster(t *testing.T) {
	s := &Store{cfg: Config{URLs: []string{"nats://127.0.0.1:4222"}}, log: slog.New(slog.DiscardHandler)}
	f := &flakyJS{fails: 2}
	js := replicated{JetStream: f, replicas: 3, retry: s.setup}
	if _, err := js.CreateOrUpdateStream(context.Background(), jetstream.StreamConfig{Name: "S"}); err != nil {
		t.Fatalf("create after 2 transient failures: %v", err)
	}
	if fmt.Sprint(f.got) != "[3]" {
		t.Fatalf("creates that went through: %v, want one with 3 replicas", f.got)
	}
	tooSmall := replicated{JetStream: &tooSmallJS{}, replicas: 3, retry: s.setup}
	if _, err := tooSmall.CreateOrUpdateStream(context.Background(), jetstream.StreamConfig{Name: "S"}); err == nil {
		t.Fatal("a cluster too small for the replicas: no error")
	}
}

type tooSmallJS struct{ recordingJS }

func (*tooSmallJS) CreateOrUpdateStream(context.Context, jetstream.StreamConfig) (jetstream.Stream, error) {
	return nil, &jetstream.APIError{Code: 400, ErrorCode: 10005, Description: "no suitable peers for placement"}
}
