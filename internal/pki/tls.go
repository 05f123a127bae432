package pki

import (
	"crypto/tls"
	"crypto/x509"
	"path/filepath"
	"time"

	"skiff.dev/skiff/internal/errs"
)

// node is a loaded node identity.
type node struct {
	cert tls.Certificate // leaf, then the CA (so that peers can pin it)
	pool *x509.CertPool
}

// loadNode reads CertFile, KeyFile and CAFile from dir and checks that the
// certificate is the key's, was issued by the CA and is valid now.
func loadNode(dir string) (*node, error) {
	ca, _, err := readCert(filepath.Join(dir, CAFile))
	if err != nil {
		return nil, err
	}
	certPEM, err := readPEMFile(filepath.Join(dir, CertFile))
	if err != nil {
		return nil, err
	}
	keyPEM, err := readPEMFile(filepath.Join(dir, KeyFile))
	if err != nil {
		return nil, err
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, errs.New(errs.KindFailedPrecondition, "%s and %s: %w", filepath.Join(dir, CertFile), filepath.Join(dir, KeyFile), err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	if _, err := cert.Leaf.Verify(x509.VerifyOptions{
		Roots:       pool,
		CurrentTime: time.Now(),
		KeyUsages:   []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		return nil, errs.New(errs.KindFailedPrecondition, "%s is not a valid certificate of the cluster CA in %s: %w", filepath.Join(dir, CertFile), filepath.Join(dir, CAFile), err)
	}
	cert.Certificate = [][]byte{cert.Certificate[0], ca.Raw}
	return &node{cert: cert, pool: pool}, nil
}

// LoadServerTLS returns the TLS configuration of a cluster-internal server
// (an agent's RPC listener): it presents the node certificate of dir (with
// the CA after it) and requires a client certificate of the cluster CA
// (RequireAndVerifyClientCert). TLS 1.3 only; ALPN h2 and http/1.1.
func LoadServerTLS(dir string) (*tls.Config, error) {
	return loadServer(dir, tls.VersionTLS13, tls.RequireAndVerifyClientCert)
}

// loadServer is a server configuration presenting dir's node certificate
// and checking client certificates against its CA as auth says.
func loadServer(dir string, minVersion uint16, auth tls.ClientAuthType) (*tls.Config, error) {
	n, err := loadNode(dir)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   minVersion,
		Certificates: []tls.Certificate{n.cert},
		ClientAuth:   auth,
		ClientCAs:    n.pool,
		NextProtos:   []string{"h2", "http/1.1"},
	}, nil
}

// LoadPublicTLS returns the TLS configuration of a gateway's public
// listener, which also serves ClusterService.Join to agents that have no
// certificate yet: the node certificate of dir (with the CA after it, which
// joining agents pin), and client certificates optional but verified
// against the cluster CA when given. TLS 1.2 or later; ALPN h2 and
// http/1.1.
func LoadPublicTLS(dir string) (*tls.Config, error) {
	return loadServer(dir, tls.VersionTLS12, tls.VerifyClientCertIfGiven)
}

// LoadClientTLS returns the TLS configuration of a cluster-internal client:
// it presents the node certificate of dir and verifies the server against
// the cluster CA only (not the system roots), with the usual host name
// check: the server's certificate must name the host or IP address dialled
// (a node's certificate names its node name too, so a caller that dials an
// address may set ServerName to the member's name instead). TLS 1.3 only.
func LoadClientTLS(dir string) (*tls.Config, error) {
	n, err := loadNode(dir)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{n.cert},
		RootCAs:      n.pool,
	}, nil
}
