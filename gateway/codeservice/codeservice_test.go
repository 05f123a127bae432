package codeservice

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"
	"time"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/pki"
)

type memCode map[string][]byte

func (m memCode) FetchCode(_ context.Context, d string) ([]byte, error) {
	if b, ok := m[d]; ok {
		return b, nil
	}
	return nil, errs.NotFound("no code %s", d)
}

// serve runs the handler behind a TLS listener that, like a gateway's,
// asks for client certificates of the cluster CA without requiring them,
// and returns a client that presents a node certificate when withCert.
func serve(t *testing.T, code Code, withCert bool) skiffv1connect.CodeServiceClient {
	t.Helper()
	dir := t.TempDir()
	caDir, gwDir, agentDir := filepath.Join(dir, "ca"), filepath.Join(dir, "gw"), filepath.Join(dir, "agent")
	if err := pki.InitCA(caDir); err != nil {
		t.Fatal(err)
	}
	ca, err := pki.LoadCA(caDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []struct{ dir, name string }{{gwDir, "gw"}, {agentDir, "agent"}} {
		if err := ca.IssueNode(n.dir, n.name, []string{"127.0.0.1"}, time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	serverTLS, err := pki.LoadPublicTLS(gwDir)
	if err != nil {
		t.Fatal(err)
	}
	clientTLS, err := pki.LoadClientTLS(agentDir)
	if err != nil {
		t.Fatal(err)
	}
	if !withCert {
		clientTLS.Certificates = nil
	}
	mux := http.NewServeMux()
	New(code).Mount(mux)
	srv := httptest.NewUnstartedServer(mux)
	srv.EnableHTTP2 = true
	srv.TLS = serverTLS
	srv.StartTLS()
	t.Cleanup(srv.Close)
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: clientTLS, ForceAttemptHTTP2: true}}
	return skiffv1connect.NewCodeServiceClient(client, srv.URL)
}

func fetch(ctx context.Context, c skiffv1connect.CodeServiceClient, digest string) ([]byte, int, error) {
	st, err := c.GetCode(ctx, connect.NewRequest(&skiffv1.GetCodeRequest{CodeSha256: digest}))
	if err != nil {
		return nil, 0, err
	}
	var buf bytes.Buffer
	n := 0
	for st.Receive() {
		if n == 0 && st.Msg().GetSize() <= 0 {
			return nil, 0, errs.Internal("first message without a size")
		}
		buf.Write(st.Msg().GetChunk())
		n++
	}
	return buf.Bytes(), n, st.Err()
}

func TestGetCode(t *testing.T) {
	zip := bytes.Repeat([]byte("0123456789abcdef"), (2*ChunkSize+ChunkSize/2)/16)
	sum := sha256.Sum256(zip)
	digest := hex.EncodeToString(sum[:])
	c := serve(t, memCode{digest: zip}, true)
	got, chunks, err := fetch(context.Background(), c, digest)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, zip) || chunks != 3 {
		t.Fatalf("got %d bytes in %d chunks, want %d bytes in 3", len(got), chunks, len(zip))
	}
	// Unknown digest: NotFound; malformed: InvalidArgument naming the field.
	if _, _, err := fetch(context.Background(), c, hex.EncodeToString(make([]byte, 32))); connect.CodeOf(err) != connect.CodeNotFound {
		t.Fatalf("unknown digest: %v, want NotFound", err)
	}
	if _, _, err := fetch(context.Background(), c, "../etc/passwd"); connect.CodeOf(err) != connect.CodeInvalidArgument {
		t.Fatalf("malformed digest: %v, want InvalidArgument", err)
	}
}

func TestGetCodeNeedsClientCert(t *testing.T) {
	c := serve(t, memCode{}, false)
	_, _, err := fetch(context.Background(), c, hex.EncodeToString(make([]byte, 32)))
	if connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("without a client certificate: %v, want Unauthenticated", err)
	}
}
