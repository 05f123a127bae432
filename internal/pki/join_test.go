package pki

import (
	"context"
	"crypto/tls"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"skiff.dev/skiff/internal/errs"
)

func TestJoinRequestValidated(t *testing.T) {
	tok, _ := NewToken(testFP)
	good := JoinRequest{Gateway: "https://127.0.0.1:1", Token: tok.Encode(), Name: "agent-1", Hosts: []string{"127.0.0.1"}, Dir: t.TempDir()}
	tests := []struct {
		field  string
		mutate func(*JoinRequest)
	}{
		{"gateway", func(r *JoinRequest) { r.Gateway = "http://127.0.0.1:1" }},
		{"gateway", func(r *JoinRequest) { r.Gateway = "127.0.0.1:1" }},
		{"gateway", func(r *JoinRequest) { r.Gateway = "https://user:pw@127.0.0.1:1" }},
		{"token", func(r *JoinRequest) { r.Token = "nope" }},
		{"name", func(r *JoinRequest) { r.Name = "" }},
		{"hosts", func(r *JoinRequest) { r.Hosts = []string{"bad host"} }},
		{"dir", func(r *JoinRequest) { r.Dir = "" }},
	}
	for _, tt := range tests {
		req := good
		tt.mutate(&req)
		err := Join(t.Context(), req)
		var e *errs.Error
		if !errors.As(err, &e) || e.Kind != errs.KindInvalidArgument || e.Field != tt.field {
			t.Errorf("%s: Join: %v, want invalid %s", tt.field, err, tt.field)
		}
	}
	if entries, _ := os.ReadDir(good.Dir); len(entries) != 0 {
		t.Errorf("a refused Join wrote %d files", len(entries))
	}
}

// TestJoinPinsTheCA: a gateway whose chain lacks the pinned CA, or that
// appends the (public) pinned CA certificate to a leaf of another CA, gets
// no request: the token never leaves the node.
func TestJoinPinsTheCA(t *testing.T) {
	ca, _ := newCA(t)
	other, _ := newCA(t)
	tok, _ := NewToken(ca.Fingerprint())

	foreign, err := LoadPublicTLS(issue(t, other, "gw-x", "127.0.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	// The impostor: another CA's leaf followed by our CA's certificate.
	impostor := foreign.Clone()
	c := impostor.Certificates[0]
	c.Certificate = [][]byte{c.Certificate[0], ca.Certificate().Raw}
	impostor.Certificates = []tls.Certificate{c}

	for name, cfg := range map[string]*tls.Config{"another CA": foreign, "appended CA certificate": impostor} {
		t.Run(name, func(t *testing.T) {
			url, served, _ := mtlsServer(t, cfg)
			dir := t.TempDir()
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			err := Join(ctx, JoinRequest{Gateway: url, Token: tok.Encode(), Name: "agent-1", Dir: dir})
			if err == nil {
				t.Fatal("Join trusted a gateway outside the pinned CA")
			}
			if !strings.Contains(err.Error(), "cluster CA") {
				t.Errorf("error %v does not name the pinned CA", err)
			}
			if served.Load() != 0 {
				t.Error("the request (and its token) reached the impostor")
			}
			if _, err := os.Stat(filepath.Join(dir, KeyFile)); err == nil {
				t.Error("a failed Join wrote a key")
			}
		})
	}
}
