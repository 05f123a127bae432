package cluster

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/gateway/frontend"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/pki"
)

// noRouter is the front end's worker manager in tests that invoke nothing.
type noRouter struct{}

func (noRouter) Invoke(context.Context, *skiffv1.AgentInvokeRequest) (*skiffv1.AgentInvokeResponse, error) {
	return nil, errs.Unavailable("no agents in this test")
}

func (noRouter) Retire(context.Context, string, string) error { return nil }

// logBuffer collects a test's logs.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer // guarded by mu
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func newCA(t testing.TB) *pki.CA {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca")
	if err := pki.InitCA(dir); err != nil {
		t.Fatal(err)
	}
	ca, err := pki.LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// gateway is a real front end with ClusterService over TLS on 127.0.0.1,
// on an embedded NATS store, with a cluster CA.
type gateway struct {
	url      string
	ca       *pki.CA
	dir      string // the gateway's own node identity
	clk      *clock
	logs     *logBuffer
	adminKey string
	client   *http.Client // trusts the cluster CA, presents no certificate
}

func startGateway(t testing.TB) *gateway {
	t.Helper()
	ctx := testCtx(t)
	st := openStore(t)
	g := &gateway{ca: newCA(t), dir: filepath.Join(t.TempDir(), "gw"), clk: newClock(), logs: &logBuffer{}}
	log := slog.New(slog.NewTextHandler(g.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	tokens := newTokenStore(t, st.JetStream(), g.clk, nil)
	h, err := New(Config{CA: g.ca, Tokens: tokens, Logger: log, Now: g.clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	fe, err := frontend.New(frontend.Config{Cluster: h, Logger: log}, st, noRouter{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = fe.Close() })
	g.adminKey, _, err = fe.EnsureAdminKey(ctx, filepath.Join(t.TempDir(), "admin.key"))
	if err != nil {
		t.Fatal(err)
	}
	if err := g.ca.IssueNode(g.dir, "gw-1", []string{"127.0.0.1"}, time.Hour); err != nil {
		t.Fatal(err)
	}
	tlsCfg, err := pki.LoadPublicTLS(g.dir)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	fe.Mount(mux)
	srv := httptest.NewUnstartedServer(mux)
	srv.TLS = tlsCfg
	srv.StartTLS()
	t.Cleanup(srv.Close)
	g.url = srv.URL
	pool := x509.NewCertPool()
	pool.AddCert(g.ca.Certificate())
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}
	t.Cleanup(tr.CloseIdleConnections)
	g.client = &http.Client{Transport: tr}
	return g
}

// cluster returns a ClusterService client sending key ("" for none).
func (g *gateway) cluster(key string) skiffv1connect.ClusterServiceClient {
	return skiffv1connect.NewClusterServiceClient(g.client, g.url, connect.WithInterceptors(bearer(key)))
}

func bearer(key string) connect.UnaryInterceptorFunc {
	return func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			if key != "" {
				req.Header().Set("Authorization", "Bearer "+key)
			}
			return next(ctx, req)
		}
	}
}

func (g *gateway) createToken(t *testing.T, ttl int64) pki.Token {
	t.Helper()
	resp, err := g.cluster(g.adminKey).CreateJoinToken(testCtx(t), connect.NewRequest(&skiffv1.CreateJoinTokenRequest{TtlSeconds: ttl, Description: "test"}))
	if err != nil {
		t.Fatalf("CreateJoinToken: %v", err)
	}
	tok, err := pki.ParseToken(resp.Msg.GetToken())
	if err != nil {
		t.Fatalf("the created token does not parse: %v", err)
	}
	if tok.ID != resp.Msg.GetId() || tok.CAFingerprint != g.ca.Fingerprint() {
		t.Errorf("token %v: id %s, want %s; pin %s, want the CA's %s", tok, tok.ID, resp.Msg.GetId(), tok.CAFingerprint, g.ca.Fingerprint())
	}
	return tok
}

func TestJoinEndToEnd(t *testing.T) {
	g := startGateway(t)
	ctx := testCtx(t)
	tok := g.createToken(t, 0)

	// The agent joins with the token alone: no API key, no CA yet.
	agentDir := filepath.Join(t.TempDir(), "agent")
	err := pki.Join(ctx, pki.JoinRequest{Gateway: g.url, Token: tok.Encode(), Name: "agent-1", Hosts: []string{"127.0.0.1"}, Dir: agentDir})
	if err != nil {
		t.Fatalf("Join: %v", err)
	}
	for f, mode := range map[string]os.FileMode{pki.CAFile: 0o644, pki.CertFile: 0o644, pki.KeyFile: 0o600} {
		fi, err := os.Stat(filepath.Join(agentDir, f))
		if err != nil || fi.Mode().Perm() != mode {
			t.Errorf("%s: %v, mode %v; want %o", f, err, fi.Mode().Perm(), mode)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(agentDir, pki.CAFile)); !bytes.Equal(b, g.ca.CertPEM()) {
		t.Error("the joined node's ca.crt is not the cluster CA")
	}

	// The joined identity works for mutual TLS with the gateway's.
	srvCfg, err := pki.LoadServerTLS(agentDir)
	if err != nil {
		t.Fatalf("LoadServerTLS of the joined agent: %v", err)
	}
	agent := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, r.TLS.PeerCertificates[0].Subject.CommonName)
	}))
	agent.TLS = srvCfg
	agent.StartTLS()
	defer agent.Close()
	cliCfg, err := pki.LoadClientTLS(g.dir)
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{TLSClientConfig: cliCfg}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get(agent.URL)
	if err != nil {
		t.Fatalf("gateway → joined agent over mTLS: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "gw-1" {
		t.Errorf("the agent saw client %q, want gw-1", body)
	}

	// Listed without its secret.
	list, err := g.cluster(g.adminKey).ListJoinTokens(ctx, connect.NewRequest(&skiffv1.ListJoinTokensRequest{}))
	if err != nil || len(list.Msg.GetTokens()) != 1 || list.Msg.GetTokens()[0].GetState() != StateValid {
		t.Fatalf("ListJoinTokens: %v, %v", list, err)
	}
	if strings.Contains(list.Msg.String(), tok.Secret) {
		t.Error("ListJoinTokens shows the secret")
	}
	if strings.Contains(g.logs.String(), tok.Secret) {
		t.Errorf("the gateway logged the secret:\n%s", g.logs.String())
	}
	if !strings.Contains(g.logs.String(), "node joined") {
		t.Errorf("the join was not logged:\n%s", g.logs.String())
	}
}

func TestJoinRefused(t *testing.T) {
	g := startGateway(t)
	ctx := testCtx(t)
	join := func(tok string) error {
		return pki.Join(ctx, pki.JoinRequest{Gateway: g.url, Token: tok, Name: "agent-1", Dir: filepath.Join(t.TempDir(), "agent")})
	}
	var secrets []string

	revoked := g.createToken(t, 0)
	secrets = append(secrets, revoked.Secret)
	if _, err := g.cluster(g.adminKey).RevokeJoinToken(ctx, connect.NewRequest(&skiffv1.RevokeJoinTokenRequest{Id: revoked.ID})); err != nil {
		t.Fatal(err)
	}
	wantErr(t, "revoked token", join(revoked.Encode()), errs.KindPermissionDenied, ReasonTokenRevoked)

	expired := g.createToken(t, 60)
	secrets = append(secrets, expired.Secret)
	g.clk.Advance(61 * time.Second)
	err := join(expired.Encode())
	wantErr(t, "expired token", err, errs.KindPermissionDenied, ReasonTokenExpired)
	if err != nil && !strings.Contains(err.Error(), "expired") {
		t.Errorf("the refusal does not say expired: %v", err)
	}

	wrongSecret := g.createToken(t, 0)
	secrets = append(secrets, wrongSecret.Secret)
	wrongSecret.Secret = strings.Repeat("a", len(wrongSecret.Secret))
	wantErr(t, "wrong secret", join(wrongSecret.Encode()), errs.KindUnauthenticated, ReasonTokenUnknown)

	// Refusals the client cannot cause through pki.Join: sent directly.
	other := newCA(t)
	foreign, _ := pki.NewToken(other.Fingerprint())
	cl := g.cluster("")
	_, err = cl.Join(ctx, connect.NewRequest(&skiffv1.JoinRequest{Token: foreign.Encode(), Name: "agent-1", CsrPem: "x"}))
	wantErr(t, "token of another cluster", errs.FromConnect(err), errs.KindUnauthenticated, ReasonTokenWrongCluster)
	_, err = cl.Join(ctx, connect.NewRequest(&skiffv1.JoinRequest{Token: "skiff-join-v1:garbage", Name: "agent-1", CsrPem: "x"}))
	wantErr(t, "malformed token", errs.FromConnect(err), errs.KindUnauthenticated, ReasonTokenMalformed)
	good := g.createToken(t, 0)
	secrets = append(secrets, good.Secret)
	_, err = cl.Join(ctx, connect.NewRequest(&skiffv1.JoinRequest{Token: good.Encode(), Name: "agent-1", CsrPem: "not a csr"}))
	wantErr(t, "bad csr", errs.FromConnect(err), errs.KindInvalidArgument, "invalid_csr_pem")
	_, err = cl.Join(ctx, connect.NewRequest(&skiffv1.JoinRequest{Token: good.Encode(), Name: "agent-1", CsrPem: strings.Repeat("A", MaxRequestBytes)}))
	if connect.CodeOf(err) != connect.CodeResourceExhausted {
		t.Errorf("a request over the read limit: %v, want ResourceExhausted", err)
	}

	// The other RPCs need an admin key.
	_, err = cl.CreateJoinToken(ctx, connect.NewRequest(&skiffv1.CreateJoinTokenRequest{}))
	if connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Errorf("CreateJoinToken without a key: %v, want Unauthenticated", err)
	}
	_, err = cl.ListJoinTokens(ctx, connect.NewRequest(&skiffv1.ListJoinTokensRequest{}))
	if connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Errorf("ListJoinTokens without a key: %v, want Unauthenticated", err)
	}
	keys := skiffv1connect.NewKeyServiceClient(g.client, g.url, connect.WithInterceptors(bearer(g.adminKey)))
	k, err := keys.CreateKey(ctx, connect.NewRequest(&skiffv1.CreateKeyRequest{InvokeFunctions: []string{"hello"}}))
	if err != nil {
		t.Fatal(err)
	}
	_, err = g.cluster(k.Msg.GetSecret()).CreateJoinToken(ctx, connect.NewRequest(&skiffv1.CreateJoinTokenRequest{}))
	if connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Errorf("CreateJoinToken with an invoke-only key: %v, want PermissionDenied", err)
	}

	logs := g.logs.String()
	for _, s := range secrets {
		if strings.Contains(logs, s) {
			t.Errorf("the gateway logged a secret:\n%s", logs)
		}
	}
	if !strings.Contains(logs, "refused a join") {
		t.Errorf("refusals were not logged:\n%s", logs)
	}
}

func TestNoCA(t *testing.T) {
	ctx := testCtx(t)
	h, err := New(Config{Tokens: newTokenStore(t, openStore(t).JetStream(), newClock(), nil)})
	if err != nil {
		t.Fatal(err)
	}
	tok, _ := pki.NewToken(testFP)
	_, err = h.Join(ctx, connect.NewRequest(&skiffv1.JoinRequest{Token: tok.Encode()}))
	wantErr(t, "Join", err, errs.KindFailedPrecondition, ReasonNoCA)
	if err != nil && !strings.Contains(err.Error(), "this gateway has no cluster CA") {
		t.Errorf("Join: %v", err)
	}
	_, err = h.CreateJoinToken(ctx, connect.NewRequest(&skiffv1.CreateJoinTokenRequest{}))
	wantErr(t, "CreateJoinToken", err, errs.KindFailedPrecondition, ReasonNoCA)
}

func TestJoinConcurrencyBounded(t *testing.T) {
	h, err := New(Config{CA: newCA(t), Tokens: newTokenStore(t, openStore(t).JetStream(), newClock(), nil), MaxConcurrentJoins: 1})
	if err != nil {
		t.Fatal(err)
	}
	h.joins <- struct{}{} // one join in progress
	_, err = h.Join(testCtx(t), connect.NewRequest(&skiffv1.JoinRequest{}))
	wantErr(t, "Join over the limit", err, errs.KindResourceExhausted, "")
	<-h.joins
	_, err = h.Join(testCtx(t), connect.NewRequest(&skiffv1.JoinRequest{}))
	wantErr(t, "Join after the other finished (no token)", err, errs.KindUnauthenticated, ReasonTokenMalformed)
}

// BenchmarkJoin is a whole join: key and CSR, TLS handshake with pinning,
// token check in KV, signing, files written.
func BenchmarkJoin(b *testing.B) {
	g := startGateway(b)
	resp, err := g.cluster(g.adminKey).CreateJoinToken(testCtx(b), connect.NewRequest(&skiffv1.CreateJoinTokenRequest{}))
	if err != nil {
		b.Fatal(err)
	}
	dir := b.TempDir()
	for b.Loop() {
		if err := pki.Join(b.Context(), pki.JoinRequest{Gateway: g.url, Token: resp.Msg.GetToken(), Name: "agent-1", Hosts: []string{"127.0.0.1"}, Dir: dir}); err != nil {
			b.Fatal(err)
		}
	}
}
