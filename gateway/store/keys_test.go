package store

import (
	"crypto/sha256"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"skiff.dev/skiff/internal/errs"
)

func hashOf(secret string) []byte {
	h := sha256.Sum256([]byte(secret))
	return h[:]
}

func TestKeys(t *testing.T) {
	s := openStore(t, Config{})
	ctx := testCtx(t)
	created := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	admin := Key{ID: "admin", Description: "first start", SecretHash: hashOf("s-admin"), Admin: true, Created: created}
	invoker := Key{ID: "inv-1", SecretHash: hashOf("s-inv"), InvokeFunctions: []string{"fn1", "fn2"}, Created: created}
	for _, k := range []Key{invoker, admin} {
		if err := s.PutKey(ctx, k); err != nil {
			t.Fatalf("PutKey %s: %v", k.ID, err)
		}
	}

	tests := []struct {
		secret string
		want   *Key
	}{
		{"s-admin", &admin},
		{"s-inv", &invoker},
		{"s-unknown", nil},
	}
	for _, tt := range tests {
		got, err := s.KeyBySecretHash(ctx, hashOf(tt.secret))
		if tt.want == nil {
			wantKind(t, "unknown secret", err, errs.KindNotFound)
			continue
		}
		if err != nil {
			t.Fatalf("KeyBySecretHash(%s): %v", tt.secret, err)
		}
		if diff := cmp.Diff(*tt.want, got); diff != "" {
			t.Fatalf("KeyBySecretHash(%s) (-want +got):\n%s", tt.secret, diff)
		}
	}
	// The returned key is a copy.
	got, _ := s.KeyBySecretHash(ctx, hashOf("s-inv"))
	got.InvokeFunctions[0] = "evil"
	if again, _ := s.KeyBySecretHash(ctx, hashOf("s-inv")); again.InvokeFunctions[0] != "fn1" {
		t.Fatalf("mutating a returned key changed the index: got %q, want fn1", again.InvokeFunctions[0])
	}

	list, err := s.ListKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]Key{admin, invoker}, list); diff != "" {
		t.Fatalf("ListKeys (-want +got):\n%s", diff)
	}

	// Revoke: the very next lookup fails.
	if err := s.DeleteKey(ctx, "inv-1"); err != nil {
		t.Fatal(err)
	}
	_, err = s.KeyBySecretHash(ctx, hashOf("s-inv"))
	wantKind(t, "revoked key", err, errs.KindNotFound)
	wantKind(t, "revoking twice", s.DeleteKey(ctx, "inv-1"), errs.KindNotFound)
	if list, _ := s.ListKeys(ctx); len(list) != 1 || list[0].ID != "admin" {
		t.Fatalf("ListKeys after revoke: got %+v, want only admin", list)
	}

	// Replacing a key's secret drops the old hash.
	rotated := admin
	rotated.SecretHash = hashOf("s-admin-2")
	if err := s.PutKey(ctx, rotated); err != nil {
		t.Fatal(err)
	}
	_, err = s.KeyBySecretHash(ctx, hashOf("s-admin"))
	wantKind(t, "old secret after rotation", err, errs.KindNotFound)
	if k, err := s.KeyBySecretHash(ctx, hashOf("s-admin-2")); err != nil || k.ID != "admin" {
		t.Fatalf("new secret after rotation: got %+v, %v", k, err)
	}
}

func TestKeysValidated(t *testing.T) {
	s := openStore(t, Config{})
	ctx := testCtx(t)
	tests := []struct {
		name  string
		key   Key
		field string
	}{
		{"no id", Key{SecretHash: hashOf("x")}, "id"},
		{"dotted id", Key{ID: "a.b", SecretHash: hashOf("x")}, "id"},
		{"wildcard id", Key{ID: "a*", SecretHash: hashOf("x")}, "id"},
		{"no hash", Key{ID: "k"}, "secret_hash"},
		{"short hash", Key{ID: "k", SecretHash: []byte("short")}, "secret_hash"},
		{"bad function", Key{ID: "k", SecretHash: hashOf("x"), InvokeFunctions: []string{"ok", "not ok"}}, "invoke_functions"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := s.PutKey(ctx, tt.key)
			wantKind(t, "PutKey", err, errs.KindInvalidArgument)
			if e := err.(*errs.Error); e.Field != tt.field {
				t.Fatalf("field: got %q, want %q", e.Field, tt.field)
			}
		})
	}
	if list, _ := s.ListKeys(ctx); len(list) != 0 {
		t.Fatalf("keys after rejected puts: got %d, want 0", len(list))
	}
	wantKind(t, "DeleteKey bad id", s.DeleteKey(ctx, "a.b"), errs.KindInvalidArgument)
}

func TestKeyRevokeReachesOtherGateways(t *testing.T) {
	s := openStore(t, Config{})
	other := secondHandle(t, s)
	ctx := testCtx(t)
	if err := other.PutKey(ctx, Key{ID: "k", SecretHash: hashOf("sec")}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "key put through another handle is found", func() bool {
		_, err := s.KeyBySecretHash(ctx, hashOf("sec"))
		return err == nil
	})
	if err := other.DeleteKey(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "key revoked through another handle is gone", func() bool {
		_, err := s.KeyBySecretHash(ctx, hashOf("sec"))
		return errs.IsNotFound(err)
	})
}
