package frontend

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/internal/errs"
)

const (
	secretPrefix = "sk_"
	keyIDPrefix  = "key_"
	bearer       = "Bearer "
)

// principal is a resolved API key.
type principal struct {
	key    Key
	invoke map[string]bool // functions a non-admin key may invoke
}

func newPrincipal(k Key) *principal {
	p := &principal{key: k, invoke: make(map[string]bool, len(k.InvokeFunctions))}
	for _, fn := range k.InvokeFunctions {
		p.invoke[fn] = true
	}
	return p
}

type principalKey struct{}

// KeyFromContext returns the API key that authenticated the request.
func KeyFromContext(ctx context.Context) (Key, bool) {
	p, ok := ctx.Value(principalKey{}).(*principal)
	if !ok {
		return Key{}, false
	}
	return p.key, true
}

// keyCache keeps resolved keys for a short time so the invoke path does
// not ask the store for every request.
type keyCache struct {
	now func() time.Time
	mu  sync.RWMutex
	m   map[[sha256.Size]byte]cachedKey // guarded by mu
}

type cachedKey struct {
	p       *principal
	expires time.Time
}

func newKeyCache(now func() time.Time) *keyCache {
	return &keyCache{now: now, m: map[[sha256.Size]byte]cachedKey{}}
}

func (c *keyCache) get(h [sha256.Size]byte) *principal {
	c.mu.RLock()
	e, ok := c.m[h]
	c.mu.RUnlock()
	if !ok || !c.now().Before(e.expires) {
		return nil
	}
	return e.p
}

func (c *keyCache) put(h [sha256.Size]byte, p *principal) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	for k, e := range c.m { // keys are few; drop the expired ones as we go
		if !now.Before(e.expires) {
			delete(c.m, k)
		}
	}
	c.m[h] = cachedKey{p: p, expires: now.Add(keyCacheTTL)}
}

// forget drops a revoked key.
func (c *keyCache) forget(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, e := range c.m {
		if e.p.key.ID == id {
			delete(c.m, k)
		}
	}
}

// authenticate resolves the bearer secret of a request.
func (f *Frontend) authenticate(ctx context.Context, header string) (*principal, error) {
	if header == "" {
		return nil, errs.New(errs.KindUnauthenticated, "missing API key: send Authorization: Bearer <key>")
	}
	secret, ok := strings.CutPrefix(header, bearer)
	if !ok || secret == "" {
		return nil, errs.New(errs.KindUnauthenticated, "invalid API key: the Authorization header must be Bearer <key>")
	}
	h := sha256.Sum256([]byte(secret))
	if p := f.keys.get(h); p != nil {
		return p, nil
	}
	k, err := f.st.KeyBySecretHash(ctx, h[:])
	if errs.IsNotFound(err) {
		return nil, errs.New(errs.KindUnauthenticated, "invalid API key")
	}
	if err != nil {
		return nil, fmt.Errorf("checking API key: %w", err)
	}
	p := newPrincipal(k)
	f.keys.put(h, p)
	return p, nil
}

// authorize checks what a key may do: admin keys everything, other keys
// only InvokeService.Invoke on their functions.
func authorize(p *principal, procedure string, msg any) error {
	if p.key.Admin {
		return nil
	}
	if procedure == skiffv1connect.InvokeServiceInvokeProcedure {
		name := ""
		if r, ok := msg.(*skiffv1.InvokeRequest); ok {
			name = r.GetFunctionName()
		}
		if p.invoke[name] {
			return nil
		}
		return errs.New(errs.KindPermissionDenied, "API key %s may not invoke function %s", p.key.ID, name)
	}
	if n, ok := msg.(interface{ GetName() string }); ok && n.GetName() != "" {
		return errs.New(errs.KindPermissionDenied, "API key %s may only invoke functions, not call %s on function %s", p.key.ID, procedure, n.GetName())
	}
	return errs.New(errs.KindPermissionDenied, "API key %s may only invoke functions, not call %s", p.key.ID, procedure)
}

// keyless reports whether a procedure is served without an API key: only
// ClusterService.Join, whose join token is its credential (a node that
// joins has no key), checked by its handler (gateway/cluster).
func keyless(procedure string) bool {
	return procedure == skiffv1connect.ClusterServiceJoinProcedure
}

// authInterceptor authenticates every RPC but the keyless ones and
// authorizes it for the key.
type authInterceptor struct{ f *Frontend }

func (a *authInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if keyless(req.Spec().Procedure) {
			return next(ctx, req)
		}
		p, err := a.f.authenticate(ctx, req.Header().Get("Authorization"))
		if err != nil {
			return nil, err
		}
		if err := authorize(p, req.Spec().Procedure, req.Any()); err != nil {
			return nil, err
		}
		return next(context.WithValue(ctx, principalKey{}, p), req)
	}
}

func (a *authInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (a *authInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		p, err := a.f.authenticate(ctx, conn.RequestHeader().Get("Authorization"))
		if err != nil {
			return err
		}
		// No streaming RPC is open to invoke-only keys.
		if err := authorize(p, conn.Spec().Procedure, nil); err != nil {
			return err
		}
		return next(context.WithValue(ctx, principalKey{}, p), conn)
	}
}

// newSecret returns a new key's secret and id.
func newSecret() (secret, id string) {
	var b [32]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails
	var i [10]byte
	_, _ = rand.Read(i[:])
	return secretPrefix + base64.RawURLEncoding.EncodeToString(b[:]), keyIDPrefix + hex.EncodeToString(i[:])
}

func hashSecret(secret string) []byte {
	h := sha256.Sum256([]byte(secret))
	return h[:]
}

// createKey makes and stores a key and returns its secret, shown once.
func (f *Frontend) createKey(ctx context.Context, desc string, admin bool, fns []string) (Key, string, error) {
	if n := utf8.RuneCountInString(desc); n > maxDescription {
		return Key{}, "", errs.Invalid("description", "description is %d characters, over the limit of %d", n, maxDescription)
	}
	if !utf8.ValidString(desc) {
		return Key{}, "", errs.Invalid("description", "description is not valid UTF-8")
	}
	if admin && len(fns) > 0 {
		return Key{}, "", errs.Invalid("invoke_functions", "an admin key may do everything: leave invoke_functions empty")
	}
	if !admin && len(fns) == 0 {
		return Key{}, "", errs.Invalid("invoke_functions", "a key that is not admin needs the functions it may invoke")
	}
	for _, fn := range fns {
		if err := validateName("invoke_functions", fn); err != nil {
			return Key{}, "", err
		}
	}
	fns = slices.Clone(fns)
	slices.Sort(fns)
	fns = slices.Compact(fns)
	secret, id := newSecret()
	k := Key{ID: id, Description: desc, SecretHash: hashSecret(secret), Admin: admin, InvokeFunctions: fns, Created: f.now().UTC()}
	if err := f.st.PutKey(ctx, k); err != nil {
		return Key{}, "", fmt.Errorf("storing API key: %w", err)
	}
	return k, secret, nil
}

// EnsureAdminKey makes sure an admin key exists whose secret is in the file
// at path. When the file holds a valid admin key it is reused
// (created == false); otherwise a new admin key is created and its secret
// written to path with mode 0600 (its directory 0700 when created).
func (f *Frontend) EnsureAdminKey(ctx context.Context, path string) (secret string, created bool, err error) {
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		s := string(bytes.TrimSpace(b))
		if s != "" {
			k, err := f.st.KeyBySecretHash(ctx, hashSecret(s))
			if err == nil && k.Admin {
				return s, false, nil
			}
			if err != nil && !errs.IsNotFound(err) {
				return "", false, fmt.Errorf("checking the admin key in %s: %w", path, err)
			}
		}
		f.log.Warn("admin key file holds no valid admin key: creating a new one", "path", path)
	case errors.Is(err, fs.ErrNotExist):
	default:
		return "", false, fmt.Errorf("reading admin key: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return "", false, fmt.Errorf("creating admin key directory: %w", err)
	}
	k, secret, err := f.createKey(ctx, "admin key created on first start", true, nil)
	if err != nil {
		return "", false, err
	}
	if err := writeSecret(path, secret); err != nil {
		if derr := f.st.DeleteKey(ctx, k.ID); derr != nil {
			err = errors.Join(err, fmt.Errorf("removing the unwritten admin key: %w", derr))
		}
		return "", false, err
	}
	f.log.Info("created admin API key", "id", k.ID, "path", path)
	return secret, true, nil
}

// writeSecret writes a secret to path atomically with mode 0600.
func writeSecret(path, secret string) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".admin-key-*")
	if err != nil {
		return fmt.Errorf("writing admin key: %w", err)
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return fmt.Errorf("writing admin key: %w", err)
	}
	if _, err := tmp.WriteString(secret + "\n"); err != nil {
		tmp.Close()
		return fmt.Errorf("writing admin key: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("writing admin key: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("writing admin key: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("writing admin key: %w", err)
	}
	return nil
}

// keyService implements skiffv1connect.KeyServiceHandler.
type keyService struct{ f *Frontend }

var _ skiffv1connect.KeyServiceHandler = (*keyService)(nil)

func (s *keyService) CreateKey(ctx context.Context, req *connect.Request[skiffv1.CreateKeyRequest]) (*connect.Response[skiffv1.CreateKeyResponse], error) {
	k, secret, err := s.f.createKey(ctx, req.Msg.GetDescription(), req.Msg.GetAdmin(), req.Msg.GetInvokeFunctions())
	if err != nil {
		return nil, err
	}
	s.f.log.Info("created API key", "id", k.ID, "admin", k.Admin, "functions", k.InvokeFunctions)
	return connect.NewResponse(&skiffv1.CreateKeyResponse{Key: apiKey(k), Secret: secret}), nil
}

func (s *keyService) ListKeys(ctx context.Context, _ *connect.Request[skiffv1.ListKeysRequest]) (*connect.Response[skiffv1.ListKeysResponse], error) {
	keys, err := s.f.st.ListKeys(ctx)
	if err != nil {
		return nil, err
	}
	out := &skiffv1.ListKeysResponse{Keys: make([]*skiffv1.ApiKey, 0, len(keys))}
	for _, k := range keys {
		out.Keys = append(out.Keys, apiKey(k))
	}
	return connect.NewResponse(out), nil
}

func (s *keyService) RevokeKey(ctx context.Context, req *connect.Request[skiffv1.RevokeKeyRequest]) (*connect.Response[skiffv1.RevokeKeyResponse], error) {
	id := req.Msg.GetId()
	if !strings.HasPrefix(id, keyIDPrefix) || len(id) > 64 {
		return nil, errs.Invalid("id", "key id %q is not a key id (key_...)", id)
	}
	if err := s.f.st.DeleteKey(ctx, id); err != nil {
		return nil, err
	}
	s.f.keys.forget(id)
	s.f.log.Info("revoked API key", "id", id)
	return connect.NewResponse(&skiffv1.RevokeKeyResponse{}), nil
}

func apiKey(k Key) *skiffv1.ApiKey {
	return &skiffv1.ApiKey{
		Id:              k.ID,
		Description:     k.Description,
		Admin:           k.Admin,
		InvokeFunctions: slices.Clone(k.InvokeFunctions),
		Created:         k.Created.UTC().Format(time.RFC3339),
	}
}
