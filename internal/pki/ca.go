// Package pki is the cluster's public key infrastructure: a cluster CA
// (`skiff ca init`), node certificates for gateways and agents, join tokens
// with which an agent obtains its certificate from a gateway, and the
// mutual TLS configurations every cluster connection uses.
//
// Files. A directory holds the CA (CAFile, and CAKeyFile on the hosts that
// sign: gateways) and a node's identity (CertFile, KeyFile, and CAFile to
// verify its peers). Private keys are written with mode 0600, certificates
// with 0644, always atomically (a temporary file renamed into place).
//
// Keys and certificates. ECDSA P-256 throughout. The CA is valid for ten
// years; a node certificate carries the node's name as its common name (and
// as a DNS name when the name is a valid one), the DNS names and IP
// addresses it was requested with, and both server and client
// authentication, because gateways and agents call each other.
//
// Join tokens ("skiff-join-v1:<id>.<secret>:<ca-sha256>", see Token) carry
// the SHA-256 of the CA certificate, so a joining agent can pin the
// gateway's certificate chain before it has the CA (as kubeadm does); the
// gateway keeps only the SHA-256 of the secret (gateway/cluster).
package pki

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"skiff.dev/skiff/internal/errs"
)

// File names in a PKI directory.
const (
	CAFile    = "ca.crt"
	CAKeyFile = "ca.key"
	CertFile  = "node.crt"
	KeyFile   = "node.key"
)

// Limits.
const (
	// CAValidity is how long a new cluster CA is valid.
	CAValidity = 10 * 365 * 24 * time.Hour
	// MaxCSRBytes bounds a PEM certificate signing request.
	MaxCSRBytes = 16 << 10
	// MaxSANs bounds the DNS names plus IP addresses of a node certificate.
	MaxSANs = 32
	// MaxNameLen bounds a node name.
	MaxNameLen = 128
	// MaxCertTTL bounds a node certificate's lifetime (it never outlives
	// the CA either).
	MaxCertTTL = 5 * 365 * 24 * time.Hour
	// clockSkew backdates certificates so that peers whose clocks run a
	// little behind accept them.
	clockSkew = 5 * time.Minute
	// maxPEMFile bounds a certificate or key file read from disk.
	maxPEMFile = 1 << 20
)

// PEM block types.
const (
	pemCert       = "CERTIFICATE"
	pemKey        = "PRIVATE KEY"
	pemCSR        = "CERTIFICATE REQUEST"
	pemCSRLegacy  = "NEW CERTIFICATE REQUEST"
	caCommonName  = "skiff cluster CA"
	certOrg       = "skiff"
	serialBits    = 128
	dirMode       = 0o700
	certFileMode  = 0o644
	secretFileMod = 0o600
)

// InitCA creates a cluster CA in dir (CAFile 0644, CAKeyFile 0600; ECDSA
// P-256, valid ten years), creating dir (0700) when needed. It refuses to
// overwrite an existing CA (errs.KindAlreadyExists): neither file may exist.
func InitCA(dir string) error {
	if dir == "" {
		return errs.Invalid("dir", "the CA directory is empty")
	}
	if err := os.MkdirAll(dir, dirMode); err != nil {
		return fmt.Errorf("creating the CA directory: %w", err)
	}
	for _, f := range []string{CAFile, CAKeyFile} {
		p := filepath.Join(dir, f)
		if _, err := os.Lstat(p); err == nil {
			return errs.New(errs.KindAlreadyExists, "a cluster CA already exists in %s (%s): refusing to overwrite it", dir, f).WithReason("ca_exists")
		} else if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("checking for an existing CA: %w", err)
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generating the CA key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: caCommonName, Organization: []string{certOrg}},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(CAValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return fmt.Errorf("creating the CA certificate: %w", err)
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return err
	}
	// The key first: a certificate without its key is useless, and both
	// are created exclusively so that a concurrent init cannot interleave.
	keyPath := filepath.Join(dir, CAKeyFile)
	if err := writeExclusive(keyPath, keyPEM, secretFileMod); err != nil {
		return err
	}
	if err := writeExclusive(filepath.Join(dir, CAFile), encodeCert(der), certFileMode); err != nil {
		_ = os.Remove(keyPath)
		return err
	}
	return nil
}

// CA is a loaded cluster CA: its certificate and signing key. Its methods
// are safe for concurrent use.
type CA struct {
	cert    *x509.Certificate
	certPEM []byte
	key     crypto.Signer
	fp      string
	now     func() time.Time
}

// LoadCA reads the CA certificate and key from dir and checks that they
// belong together.
func LoadCA(dir string) (*CA, error) {
	cert, certPEM, err := readCert(filepath.Join(dir, CAFile))
	if err != nil {
		return nil, err
	}
	if !cert.IsCA || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, errs.New(errs.KindFailedPrecondition, "%s is not a CA certificate", filepath.Join(dir, CAFile))
	}
	key, err := readKey(filepath.Join(dir, CAKeyFile))
	if err != nil {
		return nil, err
	}
	if !publicKeysEqual(cert.PublicKey, key.Public()) {
		return nil, errs.New(errs.KindFailedPrecondition, "%s does not belong to %s", filepath.Join(dir, CAKeyFile), filepath.Join(dir, CAFile))
	}
	return &CA{cert: cert, certPEM: certPEM, key: key, fp: fingerprint(cert.Raw), now: time.Now}, nil
}

// Fingerprint is the hex SHA-256 of the CA certificate's DER encoding:
// what join tokens pin.
func (ca *CA) Fingerprint() string { return ca.fp }

// CertPEM returns the CA certificate, PEM encoded.
func (ca *CA) CertPEM() []byte { return bytes.Clone(ca.certPEM) }

// Certificate returns the CA certificate (shared: do not modify it).
func (ca *CA) Certificate() *x509.Certificate { return ca.cert }

// Sign issues a node certificate (server and client authentication) for a
// PEM certificate signing request: common name name, the request's DNS
// names and IP addresses (plus name as a DNS name when it is a valid one),
// valid for ttl but never beyond the CA. Invalid input is an
// errs.KindInvalidArgument naming the field: "csr_pem", "name" or "ttl".
func (ca *CA) Sign(csrPEM []byte, name string, ttl time.Duration) (certPEM []byte, err error) {
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	if ttl <= 0 || ttl > MaxCertTTL {
		return nil, errs.Invalid("ttl", "certificate lifetime %v is outside (0, %v]", ttl, MaxCertTTL)
	}
	csr, err := parseCSR(csrPEM)
	if err != nil {
		return nil, err
	}
	dns := csr.DNSNames
	if IsDNSName(name) && !containsFold(dns, name) {
		dns = append(dns[:len(dns):len(dns)], name)
	}
	if len(dns)+len(csr.IPAddresses) > MaxSANs {
		return nil, errs.Invalid("csr_pem", "the request has %d DNS names and IP addresses, more than %d", len(dns)+len(csr.IPAddresses), MaxSANs)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	now := ca.now()
	notAfter := now.Add(ttl)
	if notAfter.After(ca.cert.NotAfter) {
		notAfter = ca.cert.NotAfter
	}
	if !notAfter.After(now) {
		return nil, errs.New(errs.KindFailedPrecondition, "the cluster CA expired on %s", ca.cert.NotAfter.UTC().Format(time.RFC3339))
	}
	usage := x509.KeyUsageDigitalSignature
	if _, ok := csr.PublicKey.(*rsa.PublicKey); ok {
		usage |= x509.KeyUsageKeyEncipherment
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: name, Organization: []string{certOrg}},
		NotBefore:    now.Add(-clockSkew),
		NotAfter:     notAfter,
		KeyUsage:     usage,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     dns,
		IPAddresses:  csr.IPAddresses,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, csr.PublicKey, ca.key)
	if err != nil {
		return nil, fmt.Errorf("signing the node certificate: %w", err)
	}
	return encodeCert(der), nil
}

// IssueNode creates a key for a node, signs its certificate (name, hosts
// as DNS names or IP addresses, ttl) and writes KeyFile (0600), CertFile
// and CAFile into dir (created 0700 when needed), replacing earlier ones.
// Gateways, which hold the CA, use it for their own certificates.
func (ca *CA) IssueNode(dir, name string, hosts []string, ttl time.Duration) error {
	if dir == "" {
		return errs.Invalid("dir", "the node certificate directory is empty")
	}
	key, csrPEM, err := newKeyAndCSR(name, hosts)
	if err != nil {
		return err
	}
	certPEM, err := ca.Sign(csrPEM, name, ttl)
	if err != nil {
		return err
	}
	return writeNode(dir, key, certPEM, ca.certPEM)
}

// writeNode writes a node's key, certificate and CA into dir.
func writeNode(dir string, key *ecdsa.PrivateKey, certPEM, caPEM []byte) error {
	keyPEM, err := encodeKey(key)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, dirMode); err != nil {
		return fmt.Errorf("creating the certificate directory: %w", err)
	}
	if err := writeAtomic(filepath.Join(dir, CAFile), caPEM, certFileMode); err != nil {
		return err
	}
	if err := writeAtomic(filepath.Join(dir, KeyFile), keyPEM, secretFileMod); err != nil {
		return err
	}
	return writeAtomic(filepath.Join(dir, CertFile), certPEM, certFileMode)
}

// newKeyAndCSR makes a P-256 key and a certificate signing request for it.
func newKeyAndCSR(name string, hosts []string) (*ecdsa.PrivateKey, []byte, error) {
	if err := ValidateName(name); err != nil {
		return nil, nil, err
	}
	dns, ips, err := splitHosts(hosts)
	if err != nil {
		return nil, nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generating the node key: %w", err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:     pkix.Name{CommonName: name},
		DNSNames:    dns,
		IPAddresses: ips,
	}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("creating the certificate request: %w", err)
	}
	return key, pem.EncodeToMemory(&pem.Block{Type: pemCSR, Bytes: der}), nil
}

// splitHosts sorts hosts into DNS names and IP addresses.
func splitHosts(hosts []string) (dns []string, ips []net.IP, err error) {
	if len(hosts) > MaxSANs-1 {
		return nil, nil, errs.Invalid("hosts", "%d hosts, more than %d", len(hosts), MaxSANs-1)
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			ips = append(ips, ip)
			continue
		}
		if !IsDNSName(h) {
			return nil, nil, errs.Invalid("hosts", "host %q is neither an IP address nor a DNS name", h)
		}
		dns = append(dns, h)
	}
	return dns, ips, nil
}

// parseCSR decodes, bounds and checks a PEM certificate signing request.
func parseCSR(b []byte) (*x509.CertificateRequest, error) {
	if len(b) == 0 {
		return nil, errs.Invalid("csr_pem", "the certificate signing request is empty")
	}
	if len(b) > MaxCSRBytes {
		return nil, errs.Invalid("csr_pem", "the certificate signing request is %d bytes, over the limit of %d", len(b), MaxCSRBytes)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || (blk.Type != pemCSR && blk.Type != pemCSRLegacy) {
		return nil, errs.Invalid("csr_pem", "csr_pem is not a PEM %q block", pemCSR)
	}
	csr, err := x509.ParseCertificateRequest(blk.Bytes)
	if err != nil {
		return nil, errs.Invalid("csr_pem", "parsing the certificate signing request: %v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, errs.Invalid("csr_pem", "the certificate signing request's signature is invalid: %v", err)
	}
	if len(csr.EmailAddresses) > 0 || len(csr.URIs) > 0 {
		return nil, errs.Invalid("csr_pem", "the certificate signing request may hold only DNS names and IP addresses, not e-mail addresses or URIs")
	}
	for _, d := range csr.DNSNames {
		if !IsDNSName(d) {
			return nil, errs.Invalid("csr_pem", "the certificate signing request names %q, which is not a DNS name (wildcards are not allowed)", d)
		}
	}
	switch k := csr.PublicKey.(type) {
	case *ecdsa.PublicKey:
		if c := k.Curve; c != elliptic.P256() && c != elliptic.P384() {
			return nil, errs.Invalid("csr_pem", "ECDSA keys must use P-256 or P-384")
		}
	case ed25519.PublicKey:
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return nil, errs.Invalid("csr_pem", "RSA keys must have at least 2048 bits, not %d", k.N.BitLen())
		}
	default:
		return nil, errs.Invalid("csr_pem", "unsupported public key type %T", csr.PublicKey)
	}
	return csr, nil
}

// ValidateName checks a node name: 1 to MaxNameLen characters of letters,
// digits, '.', '-' and '_', starting with a letter or a digit.
func ValidateName(name string) error {
	if name == "" {
		return errs.Invalid("name", "the node name is empty")
	}
	if len(name) > MaxNameLen {
		return errs.Invalid("name", "the node name is %d characters, over the limit of %d", len(name), MaxNameLen)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && (i == 0 || c != '.' && c != '-' && c != '_') {
			return errs.Invalid("name", "node name %q: use letters, digits, '.', '-' and '_', starting with a letter or digit", name)
		}
	}
	return nil
}

// IsDNSName reports whether s is a DNS name without wildcards: labels of
// letters, digits and '-', 1-63 characters each, 253 in all.
func IsDNSName(s string) bool {
	if s == "" || len(s) > 253 {
		return false
	}
	for _, l := range strings.Split(s, ".") {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return false
		}
		for i := 0; i < len(l); i++ {
			c := l[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

func containsFold(list []string, s string) bool {
	for _, v := range list {
		if strings.EqualFold(v, s) {
			return true
		}
	}
	return false
}

func newSerial() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), serialBits))
	if err != nil {
		return nil, fmt.Errorf("generating a serial number: %w", err)
	}
	return n, nil
}

// fingerprint is the hex SHA-256 of a DER certificate.
func fingerprint(der []byte) string {
	h := sha256.Sum256(der)
	return hex.EncodeToString(h[:])
}

func encodeCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: pemCert, Bytes: der})
}

func encodeKey(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encoding the private key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: pemKey, Bytes: der}), nil
}

// readPEMFile reads a bounded file.
func readPEMFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, errs.New(errs.KindFailedPrecondition, "%s does not exist", path).WithReason("pki_missing")
	}
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxPEMFile+1))
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	if len(b) > maxPEMFile {
		return nil, errs.New(errs.KindFailedPrecondition, "%s is larger than %d bytes", path, maxPEMFile)
	}
	return b, nil
}

// readCert reads the first certificate of a PEM file.
func readCert(path string) (*x509.Certificate, []byte, error) {
	b, err := readPEMFile(path)
	if err != nil {
		return nil, nil, err
	}
	certs, err := parseCerts(b)
	if err != nil {
		return nil, nil, errs.New(errs.KindFailedPrecondition, "%s: %w", path, err)
	}
	return certs[0], encodeCert(certs[0].Raw), nil
}

// parseCerts decodes every CERTIFICATE block of b (at least one).
func parseCerts(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != pemCert {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parsing a certificate: %w", err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no PEM certificate found")
	}
	return out, nil
}

// readKey reads a PKCS#8 (or SEC 1 EC) private key.
func readKey(path string) (crypto.Signer, error) {
	b, err := readPEMFile(path)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, errs.New(errs.KindFailedPrecondition, "%s holds no PEM private key", path)
	}
	var key any
	switch blk.Type {
	case pemKey:
		key, err = x509.ParsePKCS8PrivateKey(blk.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(blk.Bytes)
	default:
		return nil, errs.New(errs.KindFailedPrecondition, "%s holds a PEM %q block, not a private key", path, blk.Type)
	}
	if err != nil {
		return nil, errs.New(errs.KindFailedPrecondition, "%s: parsing the private key: %w", path, err)
	}
	s, ok := key.(crypto.Signer)
	if !ok {
		return nil, errs.New(errs.KindFailedPrecondition, "%s: unsupported private key type %T", path, key)
	}
	return s, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}

// writeExclusive writes a new file atomically, failing when path exists.
func writeExclusive(path string, data []byte, mode os.FileMode) error {
	tmp, err := writeTemp(path, data, mode)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	if err := os.Link(tmp, path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return errs.New(errs.KindAlreadyExists, "%s already exists: refusing to overwrite it", path)
		}
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return syncDir(filepath.Dir(path))
}

// writeAtomic writes path atomically, replacing it.
func writeAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := writeTemp(path, data, mode)
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return syncDir(filepath.Dir(path))
}

// writeTemp writes data with mode into a new temporary file next to path
// and syncs it.
func writeTemp(path string, data []byte, mode os.FileMode) (string, error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return "", fmt.Errorf("writing %s: %w", path, err)
	}
	name := f.Name()
	fail := func(err error) (string, error) {
		f.Close()
		os.Remove(name)
		return "", fmt.Errorf("writing %s: %w", path, err)
	}
	if err := f.Chmod(mode); err != nil {
		return fail(err)
	}
	if _, err := f.Write(data); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		os.Remove(name)
		return "", fmt.Errorf("writing %s: %w", path, err)
	}
	return name, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("syncing %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", dir, err)
	}
	return nil
}
