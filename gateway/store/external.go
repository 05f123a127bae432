package store

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"skiff.dev/skiff/internal/errs"
)

// Limits on the external cluster's configuration.
const (
	// MaxURLs bounds the server URLs of an external cluster.
	MaxURLs = 32
	// MaxURLLen bounds one server URL.
	MaxURLLen = 512
	// MaxReplicas is JetStream's largest replica count.
	MaxReplicas = 5
	// DefaultExternalReplicas is the replica count of everything the store
	// creates on an external cluster when Config.Replicas is 0.
	DefaultExternalReplicas = 3

	maxCredsFileSize = 64 << 10
	maxPEMFileSize   = 1 << 20

	connectTimeout  = 5 * time.Second
	setupTimeout    = 60 * time.Second
	reconnectMin    = 100 * time.Millisecond
	reconnectMax    = 5 * time.Second
	requestAttempts = 10 * time.Second
	pingInterval    = 5 * time.Second
	maxPingsOut     = 3
)

// Auth is how the store authenticates to an external NATS cluster: at
// most one of a creds file, a user and password, or a token. None of it
// is ever logged.
type Auth struct {
	// CredsFile is a NATS .creds file (user JWT and nkey seed).
	CredsFile string
	// User and Password: both or neither.
	User     string
	Password Secret
	// Token is a server authorization token.
	Token Secret
}

func (a Auth) empty() bool {
	return a.CredsFile == "" && a.User == "" && a.Password == "" && a.Token == ""
}

// TLSFiles are the PEM files for TLS to an external NATS cluster.
type TLSFiles struct {
	// CAFile holds the CA certificates the servers' certificates must
	// chain to; empty means the system roots.
	CAFile string
	// CertFile and KeyFile are the client certificate and its key, for
	// servers that verify clients: both or neither.
	CertFile string
	KeyFile  string
}

func (t TLSFiles) empty() bool { return t.CAFile == "" && t.CertFile == "" && t.KeyFile == "" }

// Secret is a string that never prints: fmt verbs and slog show
// "[redacted]".
type Secret string

const redacted = "[redacted]"

// Format implements fmt.Formatter for every verb.
func (Secret) Format(f fmt.State, _ rune) { _, _ = io.WriteString(f, redacted) }

// LogValue implements slog.LogValuer.
func (Secret) LogValue() slog.Value { return slog.StringValue(redacted) }

// MarshalText keeps the secret out of JSON and text encodings.
func (Secret) MarshalText() ([]byte, error) { return []byte(redacted), nil }

// ParseURLs parses a comma-separated list of NATS server URLs (the value
// of `--nats`): nats:// or tls:// URLs with a host and an optional port,
// without credentials, paths or queries (credentials go in Config.Auth).
// Spaces around the commas are ignored; an empty list is an error.
func ParseURLs(list string) ([]string, error) {
	if len(list) > MaxURLs*(MaxURLLen+1) {
		return nil, errs.Invalid("nats", "nats server list is %d bytes, over the %d-byte limit", len(list), MaxURLs*(MaxURLLen+1))
	}
	var urls []string
	for part := range strings.SplitSeq(list, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		urls = append(urls, part)
	}
	if len(urls) == 0 {
		return nil, errs.Invalid("nats", "no nats server url in %q", list)
	}
	if err := checkURLs("nats", urls); err != nil {
		return nil, err
	}
	return urls, nil
}

// checkURLs validates server URLs, naming field in errors.
func checkURLs(field string, urls []string) error {
	if len(urls) > MaxURLs {
		return errs.Invalid(field, "%d nats server urls, over the limit of %d", len(urls), MaxURLs)
	}
	seen := make(map[string]bool, len(urls))
	for _, raw := range urls {
		if err := checkURL(field, raw); err != nil {
			return err
		}
		if seen[raw] {
			return errs.Invalid(field, "nats server url %q is listed twice", raw)
		}
		seen[raw] = true
	}
	return nil
}

func checkURL(field, raw string) error {
	if len(raw) > MaxURLLen {
		return errs.Invalid(field, "nats server url of %d bytes, over the %d-byte limit", len(raw), MaxURLLen)
	}
	u, err := url.Parse(raw)
	if err != nil {
		// url.Parse quotes the input, which may hold a password.
		return errs.Invalid(field, "nats server url is not a url (want nats://host:port)")
	}
	if u.User != nil {
		return errs.Invalid(field, "nats server url of host %s has credentials in it: pass a creds file, a user and password or a token separately", u.Host)
	}
	if u.Scheme != "nats" && u.Scheme != "tls" {
		return errs.Invalid(field, "nats server url %q: scheme %q is not nats or tls", raw, u.Scheme)
	}
	if u.Hostname() == "" {
		return errs.Invalid(field, "nats server url %q has no host", raw)
	}
	if p := u.Port(); p != "" {
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 || n > 65535 {
			return errs.Invalid(field, "nats server url %q: port %q is not 1-65535", raw, p)
		}
	} else if strings.HasSuffix(u.Host, ":") {
		return errs.Invalid(field, "nats server url %q has an empty port", raw)
	}
	if (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "" {
		return errs.Invalid(field, "nats server url %q has a path, query or fragment", raw)
	}
	return nil
}

// validateExternal checks the settings of an external cluster; the files
// are read once here so that a bad one is reported by name.
func (c *Config) validateExternal() error {
	if err := checkURLs("urls", c.URLs); err != nil {
		return err
	}
	if c.ListenAddr != "" {
		return errs.Invalid("listen_addr", "a nats listen address is for the embedded server, not with an external cluster")
	}
	if c.Replicas < 0 || c.Replicas > MaxReplicas {
		return errs.Invalid("replicas", "replicas %d is not 1-%d", c.Replicas, MaxReplicas)
	}
	a := c.Auth
	methods := 0
	if a.CredsFile != "" {
		methods++
		if err := checkFile("creds_file", a.CredsFile, maxCredsFileSize); err != nil {
			return err
		}
	}
	if a.User != "" || a.Password != "" {
		methods++
		if a.User == "" || a.Password == "" {
			return errs.Invalid("user", "a nats user needs both a user name and a password")
		}
		if len(a.User) > 256 || len(a.Password) > 1024 {
			return errs.Invalid("user", "nats user or password too long (limits 256 and 1024 bytes)")
		}
	}
	if a.Token != "" {
		methods++
		if len(a.Token) > 1024 {
			return errs.Invalid("token", "nats token too long (limit 1024 bytes)")
		}
	}
	if methods > 1 {
		return errs.Invalid("auth", "give one of a nats creds file, a user and password, or a token, not %d of them", methods)
	}
	t := c.TLS
	if t.CAFile != "" {
		if err := checkFile("tls_ca", t.CAFile, maxPEMFileSize); err != nil {
			return err
		}
		pem, err := os.ReadFile(t.CAFile)
		if err != nil {
			return errs.Invalid("tls_ca", "reading nats ca file %s: %v", t.CAFile, err)
		}
		if !x509.NewCertPool().AppendCertsFromPEM(pem) {
			return errs.Invalid("tls_ca", "nats ca file %s holds no PEM certificate", t.CAFile)
		}
	}
	if (t.CertFile == "") != (t.KeyFile == "") {
		return errs.Invalid("tls_cert", "a nats client certificate needs both a cert file and a key file")
	}
	if t.CertFile != "" {
		if err := checkFile("tls_cert", t.CertFile, maxPEMFileSize); err != nil {
			return err
		}
		if err := checkFile("tls_key", t.KeyFile, maxPEMFileSize); err != nil {
			return err
		}
		if _, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile); err != nil {
			// The error names no key material.
			return errs.Invalid("tls_cert", "loading nats client certificate %s with key %s: %v", t.CertFile, t.KeyFile, err)
		}
	}
	return nil
}

// checkFile reports a missing, non-regular or oversized file by field.
func checkFile(field, path string, limit int64) error {
	fi, err := os.Stat(path)
	if err != nil {
		return errs.Invalid(field, "%s file: %v", field, err)
	}
	if !fi.Mode().IsRegular() {
		return errs.Invalid(field, "%s file %s is not a regular file", field, path)
	}
	if fi.Size() > limit {
		return errs.Invalid(field, "%s file %s is %d bytes, over the %d-byte limit", field, path, fi.Size(), limit)
	}
	return nil
}

// reconnectDelay is the wait after every server of the list failed once:
// exponential from reconnectMin to reconnectMax, with ±20% jitter so that
// many gateways do not reconnect in lockstep.
func reconnectDelay(attempts int) time.Duration {
	d := reconnectMax
	if attempts < 16 {
		d = min(reconnectMin<<attempts, reconnectMax)
	}
	jitter := time.Duration(rand.Int64N(int64(d)/5*2+1)) - d/5
	return d + jitter
}

// connectExternal connects to the cluster in s.cfg.URLs. The connection
// reconnects forever; the first connect fails at once when no server
// answers.
func (s *Store) connectExternal() (*nats.Conn, error) {
	log := s.log
	opts := []nats.Option{
		nats.Name("skiff-gateway-store"),
		nats.Timeout(connectTimeout),
		nats.MaxReconnects(-1),
		nats.CustomReconnectDelay(reconnectDelay),
		// A server cut off by a partition does not reset the connection:
		// missed pings are what tells, within about 15 s (the default is
		// minutes).
		nats.PingInterval(pingInterval),
		nats.MaxPingsOutstanding(maxPingsOut),
		nats.DisconnectErrHandler(func(nc *nats.Conn, err error) {
			if err != nil {
				log.Warn("disconnected from nats", "server", nc.ConnectedServerName(), "err", err)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.Info("reconnected to nats", "server", nc.ConnectedServerName(), "url", nc.ConnectedUrlRedacted())
		}),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subject := ""
			if sub != nil {
				subject = sub.Subject
			}
			log.Warn("nats async error", "subject", subject, "err", err)
		}),
	}
	a := s.cfg.Auth
	switch {
	case a.CredsFile != "":
		opts = append(opts, nats.UserCredentials(a.CredsFile))
	case a.User != "":
		opts = append(opts, nats.UserInfo(a.User, string(a.Password)))
	case a.Token != "":
		opts = append(opts, nats.Token(string(a.Token)))
	}
	t := s.cfg.TLS
	if t.CAFile != "" {
		opts = append(opts, nats.RootCAs(t.CAFile))
	}
	if t.CertFile != "" {
		opts = append(opts, nats.ClientCert(t.CertFile, t.KeyFile))
	}
	list := strings.Join(s.cfg.URLs, ",")
	nc, err := nats.Connect(list, opts...)
	if err != nil {
		if errors.Is(err, nats.ErrAuthorization) || errors.Is(err, nats.ErrAuthExpired) || errors.Is(err, nats.ErrAuthRevoked) {
			return nil, errs.New(errs.KindUnauthenticated, "nats cluster %s refused the store's credentials: %w", list, err)
		}
		return nil, errs.Unavailable("no nats server reachable at %s: %w", list, err)
	}
	if mp := nc.MaxPayload(); mp < MaxPayload {
		nc.Close()
		return nil, errs.New(errs.KindFailedPrecondition, "nats server %s allows messages of %d bytes; skiff needs max_payload of at least %d (8MB) on every server", nc.ConnectedServerName(), mp, MaxPayload)
	}
	return nc, nil
}

// transient reports an error that an election or a reconnect explains:
// the JetStream API is worth asking again.
func transient(err error) bool {
	var jsErr jetstream.JetStreamError
	if errors.As(err, &jsErr) && jsErr.APIError() != nil {
		apiErr := jsErr.APIError()
		switch apiErr.ErrorCode {
		case jetstream.JSErrCodeJetStreamNotEnabled, jetstream.JSErrCodeJetStreamNotEnabledForAccount:
			return false // configuration, not an election
		}
		// 503: "JetStream system temporarily unavailable", no meta leader
		// or stream leader yet; 408 and 500 with a timeout: a peer is
		// catching up.
		// 10005 "no suitable peers for placement, peer offline": a server
		// of a forming or recovering cluster is not back yet (without
		// "offline" it is a cluster too small for the replicas: setupErr).
		desc := strings.ToLower(apiErr.Description)
		return apiErr.Code == 503 || apiErr.Code == 408 || (apiErr.Code == 500 && strings.Contains(desc, "timeout")) ||
			(apiErr.ErrorCode == 10005 && strings.Contains(desc, "offline"))
	}
	return errors.Is(err, nats.ErrNoResponders) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrConnectionReconnecting)
}

// setup runs one JetStream setup call; on an external cluster it retries
// transient failures (a leader election in progress) with backoff until
// ctx ends or setupTimeout passes. Each attempt gets its own deadline so a
// request lost during an election does not take the whole budget.
func (s *Store) setup(ctx context.Context, fn func(ctx context.Context) error) error {
	if len(s.cfg.URLs) == 0 {
		return fn(ctx)
	}
	ctx, cancel := context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	wait := reconnectMin
	for {
		actx, acancel := context.WithTimeout(ctx, requestAttempts)
		err := fn(actx)
		acancel()
		if err == nil || !transient(err) || ctx.Err() != nil {
			return err
		}
		s.log.Debug("jetstream not ready; retrying", "err", err, "in", wait)
		select {
		case <-ctx.Done():
			return err
		case <-time.After(wait):
		}
		wait = min(2*wait, reconnectMax)
	}
}

// replicated is the JetStream handle the store hands out: streams, KV
// buckets and object stores created or updated through it get the store's
// replica count when their config leaves Replicas at 0.
type replicated struct {
	jetstream.JetStream
	replicas int
	// retry runs a create or update, retrying what an election or a
	// forming cluster explains (Store.setup); nil runs it once.
	retry func(ctx context.Context, fn func(ctx context.Context) error) error
}

// retried runs fn through r.retry.
func retried[T any](ctx context.Context, r replicated, fn func(context.Context) (T, error)) (T, error) {
	if r.retry == nil {
		return fn(ctx)
	}
	var out T
	err := r.retry(ctx, func(ctx context.Context) (err error) {
		out, err = fn(ctx)
		return err
	})
	return out, err
}

func (r replicated) CreateStream(ctx context.Context, cfg jetstream.StreamConfig) (jetstream.Stream, error) {
	cfg.Replicas = r.n(cfg.Replicas)
	return retried(ctx, r, func(ctx context.Context) (jetstream.Stream, error) { return r.JetStream.CreateStream(ctx, cfg) })
}

func (r replicated) UpdateStream(ctx context.Context, cfg jetstream.StreamConfig) (jetstream.Stream, error) {
	cfg.Replicas = r.n(cfg.Replicas)
	return retried(ctx, r, func(ctx context.Context) (jetstream.Stream, error) { return r.JetStream.UpdateStream(ctx, cfg) })
}

func (r replicated) CreateOrUpdateStream(ctx context.Context, cfg jetstream.StreamConfig) (jetstream.Stream, error) {
	cfg.Replicas = r.n(cfg.Replicas)
	return retried(ctx, r, func(ctx context.Context) (jetstream.Stream, error) { return r.JetStream.CreateOrUpdateStream(ctx, cfg) })
}

func (r replicated) CreateKeyValue(ctx context.Context, cfg jetstream.KeyValueConfig) (jetstream.KeyValue, error) {
	cfg.Replicas = r.n(cfg.Replicas)
	return retried(ctx, r, func(ctx context.Context) (jetstream.KeyValue, error) { return r.JetStream.CreateKeyValue(ctx, cfg) })
}

func (r replicated) UpdateKeyValue(ctx context.Context, cfg jetstream.KeyValueConfig) (jetstream.KeyValue, error) {
	cfg.Replicas = r.n(cfg.Replicas)
	return retried(ctx, r, func(ctx context.Context) (jetstream.KeyValue, error) { return r.JetStream.UpdateKeyValue(ctx, cfg) })
}

func (r replicated) CreateOrUpdateKeyValue(ctx context.Context, cfg jetstream.KeyValueConfig) (jetstream.KeyValue, error) {
	cfg.Replicas = r.n(cfg.Replicas)
	return retried(ctx, r, func(ctx context.Context) (jetstream.KeyValue, error) {
		return r.JetStream.CreateOrUpdateKeyValue(ctx, cfg)
	})
}

func (r replicated) CreateObjectStore(ctx context.Context, cfg jetstream.ObjectStoreConfig) (jetstream.ObjectStore, error) {
	cfg.Replicas = r.n(cfg.Replicas)
	return retried(ctx, r, func(ctx context.Context) (jetstream.ObjectStore, error) {
		return r.JetStream.CreateObjectStore(ctx, cfg)
	})
}

func (r replicated) UpdateObjectStore(ctx context.Context, cfg jetstream.ObjectStoreConfig) (jetstream.ObjectStore, error) {
	cfg.Replicas = r.n(cfg.Replicas)
	return retried(ctx, r, func(ctx context.Context) (jetstream.ObjectStore, error) {
		return r.JetStream.UpdateObjectStore(ctx, cfg)
	})
}

func (r replicated) CreateOrUpdateObjectStore(ctx context.Context, cfg jetstream.ObjectStoreConfig) (jetstream.ObjectStore, error) {
	cfg.Replicas = r.n(cfg.Replicas)
	return retried(ctx, r, func(ctx context.Context) (jetstream.ObjectStore, error) {
		return r.JetStream.CreateOrUpdateObjectStore(ctx, cfg)
	})
}

func (r replicated) n(asked int) int {
	if asked == 0 {
		return r.replicas
	}
	return asked
}
