package pki

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"strings"

	"skiff.dev/skiff/internal/errs"
)

// Join token format: TokenPrefix ":" id "." secret ":" CA fingerprint, all
// lowercase hex. The id is public (listed, logged, revoked by); the secret
// is the credential; the fingerprint pins the cluster CA.
const (
	TokenPrefix    = "skiff-join-v1"
	tokenIDLen     = 12 // hex characters: 48 bits
	tokenSecretLen = 32 // hex characters: 128 bits
	fingerprintLen = 64 // hex SHA-256
	// MaxTokenLen bounds an encoded token (input is checked against it
	// before any parsing).
	MaxTokenLen = 256
	// ReasonTokenMalformed is the errs reason of a token that does not parse.
	ReasonTokenMalformed = "token_malformed"
)

// Token is a parsed join token. Its String method redacts the secret, so
// a Token printed with %v or logged never shows it; Encode returns the
// whole token.
type Token struct {
	ID            string
	Secret        string
	CAFingerprint string
}

// NewToken returns a new token with random id and secret for the CA with
// the given fingerprint.
func NewToken(caFingerprint string) (Token, error) {
	if !isHex(caFingerprint, fingerprintLen) {
		return Token{}, errs.Invalid("ca_fingerprint", "the CA fingerprint is not a hex SHA-256")
	}
	var b [tokenIDLen/2 + tokenSecretLen/2]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails
	return Token{
		ID:            hex.EncodeToString(b[:tokenIDLen/2]),
		Secret:        hex.EncodeToString(b[tokenIDLen/2:]),
		CAFingerprint: caFingerprint,
	}, nil
}

// ParseToken parses an encoded join token. Its errors never quote the
// input (it may hold a secret): an errs.KindInvalidArgument on field
// "token" with reason ReasonTokenMalformed.
func ParseToken(s string) (Token, error) {
	malformed := func(what string) (Token, error) {
		e := errs.Invalid("token", "the join token is malformed (%s): want %s:<id>.<secret>:<ca-sha256>", what, TokenPrefix)
		return Token{}, e.WithReason(ReasonTokenMalformed)
	}
	if s == "" {
		return malformed("empty")
	}
	if len(s) > MaxTokenLen {
		return malformed("too long")
	}
	s = strings.TrimSpace(s)
	parts := strings.Split(s, ":")
	if len(parts) != 3 {
		return malformed("not three ':'-separated parts")
	}
	if parts[0] != TokenPrefix {
		return malformed("unknown prefix")
	}
	id, secret, ok := strings.Cut(parts[1], ".")
	if !ok {
		return malformed("no '.' between id and secret")
	}
	if !IsTokenID(id) {
		return malformed("bad id")
	}
	if !isHex(secret, tokenSecretLen) {
		return malformed("bad secret")
	}
	if !isHex(parts[2], fingerprintLen) {
		return malformed("bad CA fingerprint")
	}
	return Token{ID: id, Secret: secret, CAFingerprint: parts[2]}, nil
}

// Encode returns the whole token, secret included.
func (t Token) Encode() string {
	return TokenPrefix + ":" + t.ID + "." + t.Secret + ":" + t.CAFingerprint
}

// String returns the token with its secret redacted.
func (t Token) String() string {
	return TokenPrefix + ":" + t.ID + ".<redacted>:" + t.CAFingerprint
}

// GoString redacts the secret for %#v too.
func (t Token) GoString() string { return "pki.Token(" + t.String() + ")" }

// LogValue redacts the secret in structured logs (slog.LogValuer), with
// any handler.
func (t Token) LogValue() slog.Value { return slog.StringValue(t.String()) }

// SecretHash is the SHA-256 of the secret: what a gateway stores.
func (t Token) SecretHash() [sha256.Size]byte { return sha256.Sum256([]byte(t.Secret)) }

// IsTokenID reports whether s is a well-formed token id.
func IsTokenID(s string) bool { return isHex(s, tokenIDLen) }

// isHex reports whether s is n lowercase hex characters.
func isHex(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}
