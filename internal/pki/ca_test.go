package pki

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"skiff.dev/skiff/internal/errs"
)

func newCA(t testing.TB) (*CA, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca")
	if err := InitCA(dir); err != nil {
		t.Fatalf("InitCA: %v", err)
	}
	ca, err := LoadCA(dir)
	if err != nil {
		t.Fatalf("LoadCA: %v", err)
	}
	return ca, dir
}

func fileMode(t *testing.T, path string) os.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

func TestInitCA(t *testing.T) {
	ca, dir := newCA(t)
	if m := fileMode(t, filepath.Join(dir, CAFile)); m != 0o644 {
		t.Errorf("%s mode %o, want 644", CAFile, m)
	}
	if m := fileMode(t, filepath.Join(dir, CAKeyFile)); m != 0o600 {
		t.Errorf("%s mode %o, want 600", CAKeyFile, m)
	}
	if m := fileMode(t, dir); m != 0o700 {
		t.Errorf("CA dir mode %o, want 700", m)
	}
	c := ca.Certificate()
	if !c.IsCA || c.KeyUsage&x509.KeyUsageCertSign == 0 || c.Subject.CommonName != caCommonName {
		t.Errorf("CA certificate: IsCA %v, usage %v, CN %q", c.IsCA, c.KeyUsage, c.Subject.CommonName)
	}
	if k, ok := c.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P256() {
		t.Errorf("CA key %T, want ECDSA P-256", c.PublicKey)
	}
	if life := c.NotAfter.Sub(c.NotBefore); life < CAValidity || life > CAValidity+time.Hour {
		t.Errorf("CA lifetime %v, want about %v", life, CAValidity)
	}
	raw, _ := os.ReadFile(filepath.Join(dir, CAFile))
	blk, _ := pem.Decode(raw)
	sum := sha256.Sum256(blk.Bytes)
	if got, want := ca.Fingerprint(), hex.EncodeToString(sum[:]); got != want {
		t.Errorf("Fingerprint %s, want sha256 of the DER %s", got, want)
	}
	if !bytes.Equal(ca.CertPEM(), raw) {
		t.Error("CertPEM differs from ca.crt")
	}
}

func TestInitCARefusesOverwrite(t *testing.T) {
	_, dir := newCA(t)
	before := map[string][]byte{}
	for _, f := range []string{CAFile, CAKeyFile} {
		before[f], _ = os.ReadFile(filepath.Join(dir, f))
	}
	err := InitCA(dir)
	if !errs.Is(err, errs.KindAlreadyExists) || !strings.Contains(err.Error(), "refusing to overwrite") {
		t.Fatalf("second InitCA: %v, want AlreadyExists refusing to overwrite", err)
	}
	for f, b := range before {
		if now, _ := os.ReadFile(filepath.Join(dir, f)); !bytes.Equal(now, b) {
			t.Errorf("%s changed", f)
		}
	}
	// A lone key (a half-copied CA) is refused too.
	dir2 := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir2, CAKeyFile), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := InitCA(dir2); !errs.Is(err, errs.KindAlreadyExists) {
		t.Errorf("InitCA over a lone ca.key: %v, want AlreadyExists", err)
	}
	if _, err := os.Stat(filepath.Join(dir2, CAFile)); err == nil {
		t.Error("InitCA wrote ca.crt next to a foreign ca.key")
	}
	if err := InitCA(""); !errs.IsInvalid(err) {
		t.Errorf("InitCA(\"\"): %v, want invalid", err)
	}
}

func TestLoadCAChecks(t *testing.T) {
	_, dir := newCA(t)
	_, other := newCA(t)
	// A key from another CA.
	mixed := t.TempDir()
	copyFile(t, filepath.Join(dir, CAFile), filepath.Join(mixed, CAFile))
	copyFile(t, filepath.Join(other, CAKeyFile), filepath.Join(mixed, CAKeyFile))
	if _, err := LoadCA(mixed); err == nil || !strings.Contains(err.Error(), "does not belong") {
		t.Errorf("LoadCA with a foreign key: %v", err)
	}
	if _, err := LoadCA(t.TempDir()); !errs.Is(err, errs.KindFailedPrecondition) || !strings.Contains(err.Error(), "does not exist") {
		t.Errorf("LoadCA of an empty dir: %v", err)
	}
	// A node certificate is not a CA.
	ca, _ := LoadCA(dir)
	nodeDir := t.TempDir()
	if err := ca.IssueNode(nodeDir, "n1", nil, time.Hour); err != nil {
		t.Fatal(err)
	}
	notCA := t.TempDir()
	copyFile(t, filepath.Join(nodeDir, CertFile), filepath.Join(notCA, CAFile))
	copyFile(t, filepath.Join(nodeDir, KeyFile), filepath.Join(notCA, CAKeyFile))
	if _, err := LoadCA(notCA); err == nil || !strings.Contains(err.Error(), "not a CA") {
		t.Errorf("LoadCA of a node certificate: %v", err)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func csrFor(t *testing.T, key any, tmpl *x509.CertificateRequest) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: pemCSR, Bytes: der})
}

func TestSign(t *testing.T) {
	ca, _ := newCA(t)
	now := time.Date(2027, 3, 4, 5, 6, 7, 0, time.UTC)
	ca.now = func() time.Time { return now }
	_, csr, err := newKeyAndCSR("agent-1", []string{"10.0.0.7", "agent-1.example.com", "::1"})
	if err != nil {
		t.Fatal(err)
	}
	certPEM, err := ca.Sign(csr, "agent-1", 24*time.Hour)
	if err != nil {
		t.Fatalf("Sign: %v", err)
	}
	certs, err := parseCerts(certPEM)
	if err != nil {
		t.Fatal(err)
	}
	c := certs[0]
	if c.Subject.CommonName != "agent-1" {
		t.Errorf("CN %q", c.Subject.CommonName)
	}
	if want := []string{"agent-1.example.com", "agent-1"}; !slices.Equal(c.DNSNames, want) {
		t.Errorf("DNS names %v, want %v", c.DNSNames, want)
	}
	if len(c.IPAddresses) != 2 || !c.IPAddresses[0].Equal(net.ParseIP("10.0.0.7")) || !c.IPAddresses[1].Equal(net.IPv6loopback) {
		t.Errorf("IP addresses %v", c.IPAddresses)
	}
	if !slices.Equal(c.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}) {
		t.Errorf("ext key usage %v, want server and client auth", c.ExtKeyUsage)
	}
	if !c.NotAfter.Equal(now.Add(24*time.Hour)) || !c.NotBefore.Equal(now.Add(-clockSkew)) {
		t.Errorf("validity %v to %v", c.NotBefore, c.NotAfter)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Certificate())
	for _, u := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := c.Verify(x509.VerifyOptions{Roots: roots, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{u}, DNSName: "agent-1"}); err != nil {
			t.Errorf("verify for %v: %v", u, err)
		}
	}
	// Never beyond the CA.
	ca.now = func() time.Time { return ca.Certificate().NotAfter.Add(-time.Hour) }
	certPEM, err = ca.Sign(csr, "agent-1", MaxCertTTL)
	if err != nil {
		t.Fatal(err)
	}
	certs, _ = parseCerts(certPEM)
	if !certs[0].NotAfter.Equal(ca.Certificate().NotAfter) {
		t.Errorf("NotAfter %v beyond the CA's %v", certs[0].NotAfter, ca.Certificate().NotAfter)
	}
}

func TestSignRejects(t *testing.T) {
	ca, _ := newCA(t)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	good := csrFor(t, key, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "n"}})
	p224, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	rsaSmall, _ := rsa.GenerateKey(rand.Reader, 1024)
	tampered := bytes.Clone(good)
	blk, _ := pem.Decode(tampered)
	blk.Bytes[len(blk.Bytes)-3] ^= 0xff
	tampered = pem.EncodeToMemory(blk)
	manySANs := &x509.CertificateRequest{}
	for i := range MaxSANs {
		manySANs.IPAddresses = append(manySANs.IPAddresses, net.IPv4(10, 0, 0, byte(i)))
	}
	tests := []struct {
		name, node string
		csr        []byte
		ttl        time.Duration
		field      string
		msg        string
	}{
		{"empty csr", "n", nil, time.Hour, "csr_pem", "empty"},
		{"huge csr", "n", bytes.Repeat([]byte("A"), MaxCSRBytes+1), time.Hour, "csr_pem", "over the limit"},
		{"not pem", "n", []byte("hello"), time.Hour, "csr_pem", "not a PEM"},
		{"a certificate, not a csr", "n", ca.CertPEM(), time.Hour, "csr_pem", "not a PEM"},
		{"bad signature", "n", tampered, time.Hour, "csr_pem", ""},
		{"wildcard", "n", csrFor(t, key, &x509.CertificateRequest{DNSNames: []string{"*.example.com"}}), time.Hour, "csr_pem", "wildcards"},
		{"email", "n", csrFor(t, key, &x509.CertificateRequest{EmailAddresses: []string{"a@b.c"}}), time.Hour, "csr_pem", "e-mail"},
		{"uri", "n", csrFor(t, key, &x509.CertificateRequest{URIs: []*url.URL{{Scheme: "spiffe", Host: "x"}}}), time.Hour, "csr_pem", "URIs"},
		{"too many SANs", "n", csrFor(t, key, manySANs), time.Hour, "csr_pem", "more than"},
		{"P-224", "n", csrFor(t, p224, &x509.CertificateRequest{}), time.Hour, "csr_pem", "P-256"},
		{"small RSA", "n", csrFor(t, rsaSmall, &x509.CertificateRequest{}), time.Hour, "csr_pem", "2048"},
		{"empty name", "", good, time.Hour, "name", "empty"},
		{"bad name", "a/b", good, time.Hour, "name", "letters"},
		{"name starting with a dot", ".a", good, time.Hour, "name", "letters"},
		{"long name", strings.Repeat("a", MaxNameLen+1), good, time.Hour, "name", "over the limit"},
		{"zero ttl", "n", good, 0, "ttl", "outside"},
		{"huge ttl", "n", good, MaxCertTTL + 1, "ttl", "outside"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ca.Sign(tt.csr, tt.node, tt.ttl)
			var e *errs.Error
			if !errors.As(err, &e) || e.Kind != errs.KindInvalidArgument || e.Field != tt.field {
				t.Fatalf("Sign: %v, want invalid %s", err, tt.field)
			}
			if !strings.Contains(err.Error(), tt.msg) {
				t.Errorf("error %q lacks %q", err, tt.msg)
			}
		})
	}
}

func TestIssueNode(t *testing.T) {
	ca, _ := newCA(t)
	dir := filepath.Join(t.TempDir(), "node")
	if err := ca.IssueNode(dir, "gw-1", []string{"127.0.0.1", "gw.local"}, time.Hour); err != nil {
		t.Fatalf("IssueNode: %v", err)
	}
	for f, want := range map[string]os.FileMode{CAFile: 0o644, CertFile: 0o644, KeyFile: 0o600} {
		if m := fileMode(t, filepath.Join(dir, f)); m != want {
			t.Errorf("%s mode %o, want %o", f, m, want)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(dir, CAFile)); !bytes.Equal(b, ca.CertPEM()) {
		t.Error("node ca.crt is not the CA")
	}
	first, _ := os.ReadFile(filepath.Join(dir, CertFile))
	// Reissuing replaces the identity.
	if err := ca.IssueNode(dir, "gw-1", []string{"127.0.0.1"}, time.Hour); err != nil {
		t.Fatal(err)
	}
	if second, _ := os.ReadFile(filepath.Join(dir, CertFile)); bytes.Equal(first, second) {
		t.Error("IssueNode did not replace the certificate")
	}
	if _, err := LoadServerTLS(dir); err != nil {
		t.Errorf("LoadServerTLS of the issued identity: %v", err)
	}
	if err := ca.IssueNode(dir, "gw-1", []string{"not a host"}, time.Hour); !errs.IsInvalid(err) {
		t.Errorf("IssueNode with a bad host: %v, want invalid hosts", err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".*")); len(left) != 0 {
		t.Errorf("temporary files left: %v", left)
	}
}

func TestLoadNodeChecks(t *testing.T) {
	ca, _ := newCA(t)
	other, _ := newCA(t)
	dir := t.TempDir()
	if err := ca.IssueNode(dir, "n1", nil, time.Hour); err != nil {
		t.Fatal(err)
	}
	// Swap in the other CA: the node certificate no longer verifies.
	if err := os.WriteFile(filepath.Join(dir, CAFile), other.CertPEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadClientTLS(dir); err == nil || !strings.Contains(err.Error(), "not a valid certificate of the cluster CA") {
		t.Errorf("LoadClientTLS with a foreign CA: %v", err)
	}
	// A key that is not the certificate's.
	dir2, dir3 := t.TempDir(), t.TempDir()
	_ = ca.IssueNode(dir2, "n2", nil, time.Hour)
	_ = ca.IssueNode(dir3, "n3", nil, time.Hour)
	copyFile(t, filepath.Join(dir3, KeyFile), filepath.Join(dir2, KeyFile))
	if _, err := LoadServerTLS(dir2); err == nil {
		t.Error("LoadServerTLS accepted a key that is not the certificate's")
	}
	if _, err := LoadServerTLS(t.TempDir()); !errs.Is(err, errs.KindFailedPrecondition) {
		t.Errorf("LoadServerTLS of an empty dir: %v", err)
	}
}

func BenchmarkSign(b *testing.B) {
	ca, _ := newCA(b)
	_, csr, err := newKeyAndCSR("agent-1", []string{"10.0.0.7"})
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := ca.Sign(csr, "agent-1", time.Hour); err != nil {
			b.Fatal(err)
		}
	}
}
