package pki

import (
	"context"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/internal/errs"
)

// JoinRequest is what Join needs.
type JoinRequest struct {
	// Gateway is the URL of a gateway's public listener: https://host:port.
	Gateway string
	// Token is the join token from `skiff token create`.
	Token string
	// Name is the node's name (its certificate's common name).
	Name string
	// Hosts are the DNS names and IP addresses the node is reached at
	// (its certificate's subject alternative names).
	Hosts []string
	// Dir receives CAFile, CertFile and KeyFile (0600).
	Dir string
}

// maxJoinResponse bounds the gateway's answer (two certificates).
const maxJoinResponse = 64 << 10

// Join obtains a node certificate from a gateway with a join token: it
// makes a key and a certificate signing request, calls
// ClusterService.Join over TLS, trusting the gateway only if its
// certificate chain includes the CA the token pins (no system roots, no
// prior CA), checks the answer and writes Dir/ca.crt, node.crt and node.key
// (0600). Errors name the field (errs.Invalid: "gateway", "token", "name",
// "hosts", "dir"); the gateway's refusals keep their kind and reason
// (for example token_expired).
func Join(ctx context.Context, req JoinRequest) error {
	gw, err := gatewayURL(req.Gateway)
	if err != nil {
		return err
	}
	tok, err := ParseToken(req.Token)
	if err != nil {
		return err
	}
	if req.Dir == "" {
		return errs.Invalid("dir", "the certificate directory is empty")
	}
	key, csrPEM, err := newKeyAndCSR(req.Name, req.Hosts)
	if err != nil {
		return err
	}
	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second}).DialContext,
		TLSHandshakeTimeout: 10 * time.Second,
		TLSClientConfig:     pinnedTLS(tok.CAFingerprint),
		ForceAttemptHTTP2:   true,
	}
	defer tr.CloseIdleConnections()
	cl := skiffv1connect.NewClusterServiceClient(&http.Client{Transport: tr}, gw, connect.WithReadMaxBytes(maxJoinResponse))
	resp, err := cl.Join(ctx, connect.NewRequest(&skiffv1.JoinRequest{
		Token:  tok.Encode(),
		CsrPem: string(csrPEM),
		Name:   req.Name,
	}))
	if err != nil {
		return joinErr(gw, errs.FromConnect(err))
	}
	caPEM, certPEM, err := checkJoined(tok.CAFingerprint, []byte(resp.Msg.GetCaPem()), []byte(resp.Msg.GetCertPem()), key.Public())
	if err != nil {
		return fmt.Errorf("joining through %s: %w", gw, err)
	}
	return writeNode(req.Dir, key, certPEM, caPEM)
}

// joinErr keeps a refusal's errs kind and reason and says where it came
// from.
func joinErr(gw string, err error) error {
	var e *errs.Error
	if errors.As(err, &e) {
		out := errs.New(e.Kind, "joining the cluster through %s: %w", gw, err)
		out.Reason, out.Field, out.Retry = e.Reason, e.Field, e.Retry
		return out
	}
	return fmt.Errorf("joining the cluster through %s: %w", gw, err)
}

func gatewayURL(raw string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "https" || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return "", errs.Invalid("gateway", "gateway %q is not an https://host:port URL (joining needs TLS)", raw)
	}
	return strings.TrimRight(u.String(), "/"), nil
}

// pinnedTLS trusts a server whose certificate chain includes the CA with
// the given fingerprint and whose leaf that CA issued for server
// authentication. Host names are not checked: the pin is the trust anchor.
func pinnedTLS(caFingerprint string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		NextProtos: []string{"h2", "http/1.1"},
		// Verification is VerifyConnection's: the standard verification
		// would need the CA that joining obtains.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			return verifyPinned(cs.PeerCertificates, caFingerprint)
		},
	}
}

func verifyPinned(chain []*x509.Certificate, caFingerprint string) error {
	if len(chain) == 0 {
		return errors.New("the gateway presented no certificate")
	}
	var ca *x509.Certificate
	for _, c := range chain[1:] {
		if subtle.ConstantTimeCompare([]byte(fingerprint(c.Raw)), []byte(caFingerprint)) == 1 {
			ca = c
			break
		}
	}
	if ca == nil {
		return fmt.Errorf("the gateway's certificate chain does not include the cluster CA sha256:%s that the join token pins: wrong gateway, wrong token, or someone in between", caFingerprint)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		return fmt.Errorf("the gateway's certificate was not issued by the pinned cluster CA: %w", err)
	}
	return nil
}

// checkJoined checks the gateway's answer: the CA is the pinned one and the
// certificate is for our key, issued by that CA. It returns the two
// certificates re-encoded (only them: nothing else the answer held).
func checkJoined(caFingerprint string, caPEM, certPEM []byte, pub any) (ca, cert []byte, err error) {
	cas, err := parseCerts(caPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("the gateway's CA certificate: %w", err)
	}
	c := cas[0]
	if fingerprint(c.Raw) != caFingerprint {
		return nil, nil, errors.New("the gateway answered with a CA other than the one the join token pins")
	}
	certs, err := parseCerts(certPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("the gateway's node certificate: %w", err)
	}
	leaf := certs[0]
	if !publicKeysEqual(leaf.PublicKey, pub) {
		return nil, nil, errors.New("the gateway's node certificate is not for this node's key")
	}
	roots := x509.NewCertPool()
	roots.AddCert(c)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, nil, fmt.Errorf("the gateway's node certificate does not verify against the cluster CA: %w", err)
	}
	return encodeCert(c.Raw), encodeCert(leaf.Raw), nil
}
