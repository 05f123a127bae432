package cluster

import (
	"context"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/nats-io/nats.go/jetstream"

	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/pki"
)

// Token store defaults and limits.
const (
	// TokenBucket is the KV bucket join tokens live in.
	TokenBucket = "jointokens"
	// DefaultTokenTTL is a join token's lifetime when none is asked for.
	DefaultTokenTTL = time.Hour
	// MinTokenTTL and MaxTokenTTL bound a join token's lifetime.
	MinTokenTTL = time.Minute
	MaxTokenTTL = 7 * 24 * time.Hour
	// DefaultTokenRetention is how long expired tokens stay listed.
	DefaultTokenRetention = 24 * time.Hour
	// DefaultMaxTokens bounds the tokens kept (expired ones count until
	// pruned).
	DefaultMaxTokens = 1000
	// MaxDescription bounds a token's description, in characters.
	MaxDescription = 256
)

// Reasons of Validate's refusals (errs reasons, stable).
const (
	ReasonTokenUnknown      = "token_unknown"
	ReasonTokenExpired      = "token_expired"
	ReasonTokenRevoked      = "token_revoked"
	ReasonTokenWrongCluster = "token_wrong_cluster"
	ReasonTokenMalformed    = pki.ReasonTokenMalformed
)

// Token states as listed.
const (
	StateValid   = "valid"
	StateExpired = "expired"
	StateRevoked = "revoked"
)

// TokenStoreConfig configures a TokenStore. Zero values take the defaults.
type TokenStoreConfig struct {
	// Replicas of the bucket; 0 leaves it to the store's JetStream handle
	// (1 embedded, the cluster's replica count with external NATS).
	Replicas int
	// Retention is how long expired tokens stay listed before they are
	// pruned (DefaultTokenRetention).
	Retention time.Duration
	// MaxTokens bounds the stored tokens (DefaultMaxTokens).
	MaxTokens int
	// Now is the clock (time.Now).
	Now func() time.Time
}

// TokenStore keeps join tokens in the KV bucket TokenBucket: key = token
// id, value = a JSON record with the SHA-256 of the secret (never the
// secret), the expiry and the revoked flag. Every gateway opens the same
// bucket, so a token made on one is valid on all, and a revocation
// applies to all at once (Validate reads the bucket, no cache). Its methods
// are safe for concurrent use.
type TokenStore struct {
	kv  jetstream.KeyValue
	cfg TokenStoreConfig
}

// TokenInfo is a stored token without its secret.
type TokenInfo struct {
	ID          string
	Description string
	Created     time.Time
	Expires     time.Time
	Revoked     bool
}

// State is StateRevoked, StateExpired or StateValid at now.
func (t TokenInfo) State(now time.Time) string {
	switch {
	case t.Revoked:
		return StateRevoked
	case !now.Before(t.Expires):
		return StateExpired
	}
	return StateValid
}

// tokenRecord is the stored form.
type tokenRecord struct {
	ID           string    `json:"id"`
	SecretSHA256 string    `json:"secret_sha256"`
	Description  string    `json:"description,omitempty"`
	Created      time.Time `json:"created"`
	Expires      time.Time `json:"expires"`
	Revoked      bool      `json:"revoked,omitempty"`
}

func (r tokenRecord) info() TokenInfo {
	return TokenInfo{ID: r.ID, Description: r.Description, Created: r.Created, Expires: r.Expires, Revoked: r.Revoked}
}

// NewTokenStore opens (creating it if needed) the token bucket.
func NewTokenStore(ctx context.Context, js jetstream.JetStream, cfg TokenStoreConfig) (*TokenStore, error) {
	if js == nil {
		return nil, errors.New("token store needs a JetStream handle")
	}
	switch {
	case cfg.Replicas < 0:
		return nil, errs.Invalid("replicas", "replicas %d is negative", cfg.Replicas)
	case cfg.Retention < 0:
		return nil, errs.Invalid("retention", "token retention %v is negative", cfg.Retention)
	case cfg.MaxTokens < 0:
		return nil, errs.Invalid("max_tokens", "max tokens %d is negative", cfg.MaxTokens)
	}
	if cfg.Retention == 0 {
		cfg.Retention = DefaultTokenRetention
	}
	if cfg.MaxTokens == 0 {
		cfg.MaxTokens = DefaultMaxTokens
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      TokenBucket,
		Description: "skiff join tokens: sha256 of the secret, expiry, revoked flag",
		History:     1,
		Storage:     jetstream.FileStorage,
		Replicas:    cfg.Replicas,
	})
	if err != nil {
		return nil, wrapErr(err, "opening kv bucket %s", TokenBucket)
	}
	return &TokenStore{kv: kv, cfg: cfg}, nil
}

// Create makes a token for the CA with the given fingerprint, valid for
// ttl (0: DefaultTokenTTL). The returned Token holds the secret: show it
// once, never log it.
func (s *TokenStore) Create(ctx context.Context, caFingerprint string, ttl time.Duration, description string) (pki.Token, TokenInfo, error) {
	if ttl == 0 {
		ttl = DefaultTokenTTL
	}
	if ttl < MinTokenTTL || ttl > MaxTokenTTL {
		return pki.Token{}, TokenInfo{}, errs.Invalid("ttl_seconds", "join token lifetime %v is outside %v to %v", ttl, MinTokenTTL, MaxTokenTTL)
	}
	if !utf8.ValidString(description) {
		return pki.Token{}, TokenInfo{}, errs.Invalid("description", "description is not valid UTF-8")
	}
	if n := utf8.RuneCountInString(description); n > MaxDescription {
		return pki.Token{}, TokenInfo{}, errs.Invalid("description", "description is %d characters, over the limit of %d", n, MaxDescription)
	}
	recs, err := s.all(ctx)
	if err != nil {
		return pki.Token{}, TokenInfo{}, err
	}
	if n := len(s.prune(ctx, recs)); n >= s.cfg.MaxTokens {
		return pki.Token{}, TokenInfo{}, errs.New(errs.KindResourceExhausted, "%d join tokens are stored, the limit: revoke some or wait until they expire and are pruned", n)
	}
	tok, err := pki.NewToken(caFingerprint)
	if err != nil {
		return pki.Token{}, TokenInfo{}, err
	}
	h := tok.SecretHash()
	now := s.cfg.Now().UTC().Truncate(time.Second)
	rec := tokenRecord{ID: tok.ID, SecretSHA256: hex.EncodeToString(h[:]), Description: description, Created: now, Expires: now.Add(ttl)}
	b, err := json.Marshal(rec)
	if err != nil {
		return pki.Token{}, TokenInfo{}, errs.Internal("encoding join token: %w", err)
	}
	if _, err := s.kv.Create(ctx, tok.ID, b); err != nil {
		// A 48-bit id collision: astronomically rare; the caller retries.
		return pki.Token{}, TokenInfo{}, wrapErr(err, "storing join token %s", tok.ID)
	}
	return tok, rec.info(), nil
}

// List returns the stored tokens, newest first, after pruning those
// expired longer than the retention.
func (s *TokenStore) List(ctx context.Context) ([]TokenInfo, error) {
	recs, err := s.all(ctx)
	if err != nil {
		return nil, err
	}
	kept := s.prune(ctx, recs)
	out := make([]TokenInfo, 0, len(kept))
	for _, r := range kept {
		out = append(out, r.info())
	}
	slices.SortFunc(out, func(a, b TokenInfo) int {
		if c := b.Created.Compare(a.Created); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out, nil
}

// Revoke marks a token revoked: Validate refuses it from now on, on every
// gateway. Revoking a revoked token is not an error.
func (s *TokenStore) Revoke(ctx context.Context, id string) error {
	if !pki.IsTokenID(id) {
		return errs.Invalid("id", "%q is not a join token id (12 lowercase hex characters)", truncate(id, 32))
	}
	for attempt := 0; ; attempt++ {
		rec, rev, err := s.get(ctx, id)
		if err != nil {
			return err
		}
		if rec.Revoked {
			return nil
		}
		rec.Revoked = true
		b, err := json.Marshal(rec)
		if err != nil {
			return errs.Internal("encoding join token: %w", err)
		}
		_, err = s.kv.Update(ctx, id, b, rev)
		if err == nil {
			return nil
		}
		if !errors.Is(err, jetstream.ErrKeyExists) || attempt >= 3 {
			return wrapErr(err, "revoking join token %s", id)
		}
	}
}

// Validate checks a token: known, the secret matches, not revoked, not
// expired. Refusals are errs.KindUnauthenticated (ReasonTokenUnknown: the
// id is unknown or the secret wrong; the two are not told apart) or
// errs.KindPermissionDenied (ReasonTokenRevoked, ReasonTokenExpired).
func (s *TokenStore) Validate(ctx context.Context, tok pki.Token) (TokenInfo, error) {
	rec, _, err := s.get(ctx, tok.ID)
	if errs.IsNotFound(err) {
		return TokenInfo{}, unknownToken(tok.ID)
	}
	if err != nil {
		return TokenInfo{}, err
	}
	h := tok.SecretHash()
	if subtle.ConstantTimeCompare([]byte(hex.EncodeToString(h[:])), []byte(rec.SecretSHA256)) != 1 {
		return TokenInfo{}, unknownToken(tok.ID)
	}
	if rec.Revoked {
		return TokenInfo{}, errs.New(errs.KindPermissionDenied, "join token %s was revoked", tok.ID).WithReason(ReasonTokenRevoked)
	}
	if !s.cfg.Now().Before(rec.Expires) {
		return TokenInfo{}, errs.New(errs.KindPermissionDenied, "join token %s expired at %s", tok.ID, rec.Expires.UTC().Format(time.RFC3339)).WithReason(ReasonTokenExpired)
	}
	return rec.info(), nil
}

func unknownToken(id string) error {
	return errs.New(errs.KindUnauthenticated, "unknown join token %s (or its secret is wrong)", id).WithReason(ReasonTokenUnknown)
}

// get reads one record (errs.NotFound when missing).
func (s *TokenStore) get(ctx context.Context, id string) (tokenRecord, uint64, error) {
	e, err := s.kv.Get(ctx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return tokenRecord{}, 0, errs.NotFound("join token %s not found", id)
	}
	if err != nil {
		return tokenRecord{}, 0, wrapErr(err, "reading join token %s", id)
	}
	var rec tokenRecord
	if err := json.Unmarshal(e.Value(), &rec); err != nil {
		return tokenRecord{}, 0, errs.Internal("decoding join token %s: %w", id, err)
	}
	return rec, e.Revision(), nil
}

// tokenEntry is a record and its revision.
type tokenEntry struct {
	rec tokenRecord
	rev uint64
}

// all reads every stored record. Undecodable entries are skipped.
func (s *TokenStore) all(ctx context.Context) ([]tokenEntry, error) {
	w, err := s.kv.WatchAll(ctx, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, wrapErr(err, "listing join tokens")
	}
	defer func() { _ = w.Stop() }()
	var out []tokenEntry
	for {
		select {
		case <-ctx.Done():
			return nil, wrapErr(ctx.Err(), "listing join tokens")
		case e, ok := <-w.Updates():
			if !ok {
				return nil, errs.Unavailable("listing join tokens: the watcher stopped")
			}
			if e == nil { // the initial values are done
				return out, nil
			}
			var rec tokenRecord
			if json.Unmarshal(e.Value(), &rec) == nil && rec.ID != "" {
				out = append(out, tokenEntry{rec: rec, rev: e.Revision()})
			}
		}
	}
}

// prune deletes the records expired longer than the retention ago and
// returns the others. Deletion is best effort (compare-and-delete on the
// revision read, so a concurrent change wins); failures only delay it.
func (s *TokenStore) prune(ctx context.Context, recs []tokenEntry) []tokenRecord {
	cutoff := s.cfg.Now().Add(-s.cfg.Retention)
	out := make([]tokenRecord, 0, len(recs))
	for _, e := range recs {
		if e.rec.Expires.Before(cutoff) {
			if err := s.kv.Delete(ctx, e.rec.ID, jetstream.LastRevision(e.rev)); err == nil {
				continue
			}
		}
		out = append(out, e.rec)
	}
	return out
}

func wrapErr(err error, format string, args ...any) error {
	switch {
	case errors.Is(err, context.Canceled):
		return errs.New(errs.KindCanceled, format+": %w", append(args, err)...)
	case errors.Is(err, context.DeadlineExceeded):
		return errs.New(errs.KindDeadlineExceeded, format+": %w", append(args, err)...)
	}
	return errs.Unavailable(format+": %w", append(args, err)...)
}

// truncate bounds an input echoed in an error message.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return fmt.Sprintf("%s...", s[:n])
}
