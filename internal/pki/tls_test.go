package pki

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// mtlsServer serves, on 127.0.0.1, the common name of the client
// certificate of each request, with the server TLS config of dir.
func mtlsServer(t *testing.T, cfg *tls.Config) (url string, served *atomic.Int64, errLog *syncBuffer) {
	t.Helper()
	served = new(atomic.Int64)
	errLog = &syncBuffer{}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		served.Add(1)
		cn := "-"
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			cn = r.TLS.PeerCertificates[0].Subject.CommonName
		}
		_, _ = io.WriteString(w, cn+" "+r.Proto)
	}))
	srv.TLS = cfg
	srv.Config.ErrorLog = log.New(errLog, "", 0)
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv.URL, served, errLog
}

// syncBuffer is a buffer safe for concurrent writes and reads.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer // guarded by mu
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// waitLog waits until the server logged want.
func waitLog(t *testing.T, b *syncBuffer, want string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(b.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("the server did not log %q; its log:\n%s", want, b.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func get(t *testing.T, cfg *tls.Config, url string) (string, error) {
	t.Helper()
	tr := &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: true}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

func issue(t *testing.T, ca *CA, name string, hosts ...string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), name)
	if err := ca.IssueNode(dir, name, hosts, time.Hour); err != nil {
		t.Fatalf("IssueNode %s: %v", name, err)
	}
	return dir
}

func TestMutualTLS(t *testing.T) {
	ca, _ := newCA(t)
	other, _ := newCA(t)
	srvCfg, err := LoadServerTLS(issue(t, ca, "agent-1", "127.0.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	url, served, errLog := mtlsServer(t, srvCfg)

	// A node of the cluster CA gets through, over HTTP/2.
	good, err := LoadClientTLS(issue(t, ca, "gw-1"))
	if err != nil {
		t.Fatal(err)
	}
	body, err := get(t, good, url)
	if err != nil || body != "gw-1 HTTP/2.0" {
		t.Fatalf("cluster client: %q, %v; want gw-1 over HTTP/2", body, err)
	}

	pool := x509.NewCertPool()
	pool.AddCert(ca.Certificate())
	otherClient, err := LoadClientTLS(issue(t, other, "intruder"))
	if err != nil {
		t.Fatal(err)
	}
	otherClient.RootCAs = pool // it trusts our server, but its certificate is foreign
	refused := []struct {
		name string
		cfg  *tls.Config
		log  string // what the server says
	}{
		{"no client certificate", &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}, "client didn't provide a certificate"},
		{"a certificate of another CA", otherClient, "certificate signed by unknown authority"},
	}
	for _, r := range refused {
		t.Run(r.name, func(t *testing.T) {
			before := served.Load()
			body, err := get(t, r.cfg, url)
			if err == nil {
				t.Fatalf("request succeeded (%q), want a refused handshake", body)
			}
			waitLog(t, errLog, r.log)
			if served.Load() != before {
				t.Error("the handler ran for a refused client")
			}
		})
	}

	// A client of another cluster refuses our server.
	foreign, err := LoadClientTLS(issue(t, other, "gw-x"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := get(t, foreign, url); err == nil || !strings.Contains(err.Error(), "unknown authority") {
		t.Errorf("client of another CA: %v, want unknown authority", err)
	}

	// The host name is checked: a server certificate without 127.0.0.1 is
	// refused unless the client names the node.
	noIP, err := LoadServerTLS(issue(t, ca, "agent-2"))
	if err != nil {
		t.Fatal(err)
	}
	url2, _, _ := mtlsServer(t, noIP)
	if _, err := get(t, good, url2); err == nil || !strings.Contains(err.Error(), "127.0.0.1") {
		t.Errorf("server certificate without the dialled IP: %v, want a host name error", err)
	}
	byName := good.Clone()
	byName.ServerName = "agent-2"
	if body, err := get(t, byName, url2); err != nil || !strings.HasPrefix(body, "gw-1 ") {
		t.Errorf("ServerName = node name: %q, %v", body, err)
	}
}

func TestPublicTLSClientCertificateOptional(t *testing.T) {
	ca, _ := newCA(t)
	other, _ := newCA(t)
	cfg, err := LoadPublicTLS(issue(t, ca, "gw-1", "127.0.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	url, _, _ := mtlsServer(t, cfg)
	pool := x509.NewCertPool()
	pool.AddCert(ca.Certificate())
	if body, err := get(t, &tls.Config{RootCAs: pool}, url); err != nil || !strings.HasPrefix(body, "- ") {
		t.Errorf("client without certificate: %q, %v; want served", body, err)
	}
	member, _ := LoadClientTLS(issue(t, ca, "agent-1"))
	if body, err := get(t, member, url); err != nil || !strings.HasPrefix(body, "agent-1 ") {
		t.Errorf("cluster client: %q, %v", body, err)
	}
	intruder, _ := LoadClientTLS(issue(t, other, "intruder"))
	intruder.RootCAs = pool
	if _, err := get(t, intruder, url); err == nil {
		t.Error("a certificate of another CA was accepted on the public listener")
	}
	// The chain carries the CA, for pinning.
	if n := len(cfg.Certificates[0].Certificate); n != 2 {
		t.Errorf("served chain has %d certificates, want leaf and CA", n)
	}
}
