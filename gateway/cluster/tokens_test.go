package cluster

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"skiff.dev/skiff/gateway/store"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/pki"
)

const testFP = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

// clock is a settable clock shared by the stores of one test.
type clock struct {
	mu sync.Mutex
	t  time.Time // guarded by mu
}

func newClock() *clock { return &clock{t: time.Date(2027, 1, 2, 3, 4, 5, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// openStore opens an embedded NATS store, closed at the end of the test.
func openStore(t testing.TB) *store.Store {
	t.Helper()
	st, err := store.Open(testCtx(t), store.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatalf("store.Open: %v", err)
	}
	t.Cleanup(func() {
		if err := st.Close(); err != nil {
			t.Errorf("store Close: %v", err)
		}
	})
	return st
}

func newTokenStore(t testing.TB, js jetstream.JetStream, clk *clock, mutate func(*TokenStoreConfig)) *TokenStore {
	t.Helper()
	cfg := TokenStoreConfig{Now: clk.Now}
	if mutate != nil {
		mutate(&cfg)
	}
	s, err := NewTokenStore(testCtx(t), js, cfg)
	if err != nil {
		t.Fatalf("NewTokenStore: %v", err)
	}
	return s
}

// wantErr checks an error's kind and reason.
func wantErr(t *testing.T, what string, err error, kind errs.Kind, reason string) {
	t.Helper()
	var e *errs.Error
	if !errors.As(err, &e) || e.Kind != kind || (reason != "" && e.Reason != reason) {
		t.Errorf("%s: %v, want %v (%s)", what, err, kind, reason)
	}
}

func TestTokensSharedByGateways(t *testing.T) {
	ctx := testCtx(t)
	js := openStore(t).JetStream()
	clk := newClock()
	a, b := newTokenStore(t, js, clk, nil), newTokenStore(t, js, clk, nil)

	tok, info, err := a.Create(ctx, testFP, 0, "rack 7")
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	if info.ID != tok.ID || !info.Expires.Equal(clk.Now().Add(DefaultTokenTTL)) || info.Description != "rack 7" {
		t.Errorf("created %+v, want id %s expiring in %v", info, tok.ID, DefaultTokenTTL)
	}
	if tok.CAFingerprint != testFP {
		t.Errorf("token pins %s, want %s", tok.CAFingerprint, testFP)
	}
	// The secret is stored only hashed.
	e, err := js.KeyValue(ctx, TokenBucket)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := e.Get(ctx, tok.ID)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(raw.Value()), tok.Secret) {
		t.Error("the stored record holds the secret")
	}

	// Gateway b validates a token made on a.
	if got, err := b.Validate(ctx, tok); err != nil || got.ID != tok.ID {
		t.Fatalf("Validate on the other gateway: %+v, %v", got, err)
	}
	list, err := b.List(ctx)
	if err != nil || len(list) != 1 || list[0].State(clk.Now()) != StateValid {
		t.Fatalf("List on b: %+v, %v", list, err)
	}

	// A wrong secret and an unknown id look the same.
	wrong := tok
	wrong.Secret = strings.Repeat("0", len(tok.Secret))
	_, err = a.Validate(ctx, wrong)
	wantErr(t, "wrong secret", err, errs.KindUnauthenticated, ReasonTokenUnknown)
	if strings.Contains(err.Error(), tok.Secret) || strings.Contains(err.Error(), wrong.Secret) {
		t.Errorf("the error shows a secret: %v", err)
	}
	unknown, _ := pki.NewToken(testFP)
	_, err = a.Validate(ctx, unknown)
	wantErr(t, "unknown id", err, errs.KindUnauthenticated, ReasonTokenUnknown)

	// Revoked on b: refused on a at once, and listed as revoked.
	if err := b.Revoke(ctx, tok.ID); err != nil {
		t.Fatalf("Revoke: %v", err)
	}
	_, err = a.Validate(ctx, tok)
	wantErr(t, "revoked token", err, errs.KindPermissionDenied, ReasonTokenRevoked)
	if err := a.Revoke(ctx, tok.ID); err != nil {
		t.Errorf("revoking twice: %v", err)
	}
	list, _ = a.List(ctx)
	if len(list) != 1 || !list[0].Revoked || list[0].State(clk.Now()) != StateRevoked {
		t.Errorf("List after revoke: %+v", list)
	}
	wantErr(t, "revoke unknown", a.Revoke(ctx, unknown.ID), errs.KindNotFound, "")
	wantErr(t, "revoke bad id", a.Revoke(ctx, "../x"), errs.KindInvalidArgument, "invalid_id")
}

func TestTokenExpiryAndPruning(t *testing.T) {
	ctx := testCtx(t)
	clk := newClock()
	s := newTokenStore(t, openStore(t).JetStream(), clk, nil)
	tok, _, err := s.Create(ctx, testFP, time.Minute, "")
	if err != nil {
		t.Fatal(err)
	}
	clk.Advance(time.Minute - time.Second)
	if _, err := s.Validate(ctx, tok); err != nil {
		t.Fatalf("a second before expiry: %v", err)
	}
	clk.Advance(time.Second)
	_, err = s.Validate(ctx, tok)
	wantErr(t, "expired token", err, errs.KindPermissionDenied, ReasonTokenExpired)
	list, _ := s.List(ctx)
	if len(list) != 1 || list[0].State(clk.Now()) != StateExpired {
		t.Errorf("List after expiry: %+v", list)
	}
	// Past the retention it is pruned: no longer listed, and unknown.
	clk.Advance(DefaultTokenRetention + time.Second)
	if list, err := s.List(ctx); err != nil || len(list) != 0 {
		t.Errorf("List after the retention: %+v, %v; want empty", list, err)
	}
	_, err = s.Validate(ctx, tok)
	wantErr(t, "pruned token", err, errs.KindUnauthenticated, ReasonTokenUnknown)
}

func TestTokenCreateValidated(t *testing.T) {
	ctx := testCtx(t)
	clk := newClock()
	s := newTokenStore(t, openStore(t).JetStream(), clk, func(c *TokenStoreConfig) { c.MaxTokens = 2 })
	bad := []struct {
		field string
		ttl   time.Duration
		desc  string
		fp    string
	}{
		{"ttl_seconds", 30 * time.Second, "", testFP},
		{"ttl_seconds", MaxTokenTTL + time.Second, "", testFP},
		{"ttl_seconds", -time.Minute, "", testFP},
		{"description", time.Hour, strings.Repeat("é", MaxDescription+1), testFP},
		{"description", time.Hour, "\xff", testFP},
		{"ca_fingerprint", time.Hour, "", "abc"},
	}
	for _, b := range bad {
		_, _, err := s.Create(ctx, b.fp, b.ttl, b.desc)
		var e *errs.Error
		if !errors.As(err, &e) || e.Kind != errs.KindInvalidArgument || e.Field != b.field {
			t.Errorf("Create(ttl %v, %d-byte description): %v, want invalid %s", b.ttl, len(b.desc), err, b.field)
		}
	}
	if list, _ := s.List(ctx); len(list) != 0 {
		t.Fatalf("refused creates stored %d tokens", len(list))
	}
	for range 2 {
		if _, _, err := s.Create(ctx, testFP, time.Hour, ""); err != nil {
			t.Fatal(err)
		}
	}
	_, _, err := s.Create(ctx, testFP, time.Hour, "")
	wantErr(t, "over the limit", err, errs.KindResourceExhausted, "")
}
