// Package store is the gateway's storage: NATS JetStream, and the buckets
// and streams the gateway keeps in it. By default the NATS server is
// embedded and reached in-process (no TCP listener unless
// Config.ListenAddr asks for one); with Config.URLs the store connects to
// an external NATS cluster instead, shared by every gateway, and
// everything it creates is replicated (Config.Replicas, R3 by default).
//
// One file per concern:
//
//   - store.go: Config, Open and Close, the embedded server.
//   - external.go: the external cluster: URLs, credentials, TLS,
//     reconnects, and the JetStream handle that gives every stream, KV
//     bucket and object store created through it the replica count.
//   - watch.go: the KV watcher that keeps the in-memory caches current.
//   - functions.go: function metadata, KV bucket "functions", key = function
//     name, value = a proto-marshalled skiffv1.Function; reads come from a
//     watched cache with read-your-writes.
//   - code.go: code archives, object store bucket "code", object name = hex
//     sha256 of the zip (identical code is stored once).
//   - keys.go: API keys, KV bucket "apikeys", key = key id; only the sha256
//     of a secret is stored; lookups by hash come from a watched index.
//   - logs.go: function logs, stream "LOGS", subject "logs.<function>", one
//     message per invocation, retention enforced by the engine.
//
// Revisions are JetStream KV revisions (stream sequences): an update is a
// compare-and-set on the revision the caller read, so of two concurrent
// updates from one revision exactly one wins and the other gets
// errs.Conflict.
//
// Embedded, everything lives in files under Config.DataDir
// ("<DataDir>/nats"); Open on an existing directory reopens it. External,
// the cluster keeps the data and DataDir is not used.
package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"skiff.dev/skiff/internal/errs"
)

// Defaults for Config.
const (
	DefaultLogMaxAge   = 7 * 24 * time.Hour
	DefaultLogMaxBytes = int64(1 << 30)
)

// Names of the buckets and streams.
const (
	bucketFunctions = "functions"
	bucketKeys      = "apikeys"
	bucketCode      = "code"
	streamLogs      = "LOGS"
	subjectLogs     = "logs"
)

const readyTimeout = 10 * time.Second

// Config configures a Store.
type Config struct {
	// DataDir holds everything the embedded server keeps (under
	// DataDir/nats). Required unless URLs is set; unused with URLs.
	DataDir string
	// URLs, when set, are the servers of an external NATS cluster
	// (nats://host:port or tls://host:port, see ParseURLs) to connect to
	// instead of embedding a server. The connection reconnects forever
	// with backoff; Open fails when no server answers at all.
	URLs []string
	// Auth authenticates to the external cluster; never logged.
	Auth Auth
	// TLS are the PEM files for TLS to the external cluster. A CA file or
	// a client certificate makes the connection require TLS.
	TLS TLSFiles
	// Replicas is the replica count of every stream, KV bucket and object
	// store created through the store (its own and those of JetStream()
	// callers that leave Replicas at 0): 0 means DefaultExternalReplicas
	// (3) with URLs, and 1 embedded, where it can only be 1.
	Replicas int
	// Logger receives the store's and the embedded server's logs; nil
	// discards them.
	Logger *slog.Logger
	// LogMaxAge is the retention of function logs; 0 means DefaultLogMaxAge.
	LogMaxAge time.Duration
	// LogMaxBytes caps the total size of the log stream (the oldest entries
	// go first); 0 means DefaultLogMaxBytes.
	LogMaxBytes int64
	// SyncAlways makes the embedded JetStream fsync every write
	// (sync_interval "always"); false keeps the engine default (writes
	// reach the OS at once and survive a process kill; fsync is
	// periodic). An external cluster's servers have their own setting, and
	// SyncAlways is ignored there.
	SyncAlways bool
	// ListenAddr, when set ("127.0.0.1:4222"), also opens a NATS client
	// listener on the embedded server; empty means in-process connections
	// only. Not allowed with URLs.
	ListenAddr string
	// Now is the clock (log entries without a time get Now()); nil means
	// time.Now.
	Now func() time.Time
}

func (c *Config) validate() error {
	if c.LogMaxAge < 0 {
		return errs.Invalid("log_max_age", "log max age %v is negative", c.LogMaxAge)
	}
	if c.LogMaxBytes < 0 {
		return errs.Invalid("log_max_bytes", "log max bytes %d is negative", c.LogMaxBytes)
	}
	if len(c.URLs) > 0 {
		return c.validateExternal()
	}
	if c.DataDir == "" {
		return errs.Invalid("data_dir", "store data dir is required (or nats urls of an external cluster)")
	}
	if c.Replicas < 0 || c.Replicas > 1 {
		return errs.Invalid("replicas", "replicas %d: the embedded nats server is one node, so only 1 (use an external cluster for more)", c.Replicas)
	}
	if !c.Auth.empty() {
		return errs.Invalid("auth", "nats credentials are for an external cluster (urls), not the embedded server")
	}
	if !c.TLS.empty() {
		return errs.Invalid("tls", "nats tls files are for an external cluster (urls), not the embedded server")
	}
	if c.ListenAddr != "" {
		if _, _, err := splitHostPort(c.ListenAddr); err != nil {
			return errs.Invalid("listen_addr", "nats listen address %q: %w", c.ListenAddr, err)
		}
	}
	return nil
}

func (c *Config) setDefaults() {
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.LogMaxAge == 0 {
		c.LogMaxAge = DefaultLogMaxAge
	}
	if c.LogMaxBytes == 0 {
		c.LogMaxBytes = DefaultLogMaxBytes
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Replicas == 0 {
		c.Replicas = 1
		if len(c.URLs) > 0 {
			c.Replicas = DefaultExternalReplicas
		}
	}
}

func splitHostPort(addr string) (string, int, error) {
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("bad port %q", p)
	}
	return host, port, nil
}

// Store is the gateway's storage. Its methods are safe for concurrent use.
type Store struct {
	cfg Config
	log *slog.Logger

	srv *server.Server
	nc  *nats.Conn
	js  jetstream.JetStream

	functionsKV jetstream.KeyValue
	keysKV      jetstream.KeyValue
	code        jetstream.ObjectStore
	logs        jetstream.Stream

	fns  *functionCache
	keys *keyIndex

	watchers []*watcher
	unlock   func() // releases the data dir lock

	closeOnce sync.Once
	closeErr  error
}

// Open starts the embedded server on cfg.DataDir and connects to it
// in-process, or connects to the external cluster of cfg.URLs, and creates
// (or reopens) the buckets and the log stream. It returns once the caches
// hold everything already stored.
func Open(ctx context.Context, cfg Config) (*Store, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	cfg.setDefaults()
	s := &Store{cfg: cfg, log: cfg.Logger.With("component", "store"), fns: newFunctionCache(), keys: newKeyIndex()}
	if len(cfg.URLs) > 0 {
		if err := s.attach(ctx); err != nil {
			s.shutdown(false)
			return nil, err
		}
		s.log.Info("store open", "nats", strings.Join(cfg.URLs, ","), "server", s.nc.ConnectedServerName(), "replicas", cfg.Replicas)
		return s, nil
	}
	unlock, err := lockDataDir(cfg.DataDir)
	if err != nil {
		return nil, err
	}
	s.unlock = unlock
	if err := s.start(ctx); err != nil {
		s.shutdown(false)
		return nil, err
	}
	return s, nil
}

func (s *Store) start(ctx context.Context) error {
	opts := &server.Options{
		ServerName: "skiff",
		JetStream:  true,
		StoreDir:   filepath.Join(s.cfg.DataDir, "nats"),
		DontListen: true,
		NoSigs:     true,
		SyncAlways: s.cfg.SyncAlways,
		// Messages carry whole Lambda payloads (6 MB sync logs, 1 MiB
		// stream records plus their envelope): NATS's 1 MB default is
		// too small.
		MaxPayload: MaxPayload,
	}
	if s.cfg.ListenAddr != "" {
		host, port, _ := splitHostPort(s.cfg.ListenAddr)
		opts.DontListen = false
		opts.Host, opts.Port = host, port
	}
	srv, err := server.NewServer(opts)
	if err != nil {
		return errs.Internal("creating embedded nats server: %w", err)
	}
	srv.SetLoggerV2(serverLogger{s.log.With("component", "nats")}, false, false, false)
	s.srv = srv
	srv.Start()
	if !srv.ReadyForConnections(readyTimeout) {
		return errs.Unavailable("embedded nats server in %s not ready after %v", opts.StoreDir, readyTimeout)
	}
	if err := s.attach(ctx); err != nil {
		return err
	}
	s.log.Info("store open", "dir", opts.StoreDir, "listen", s.cfg.ListenAddr)
	return nil
}

// attach connects to s.srv in-process (or to the external cluster),
// creates or opens the buckets and the log stream and loads the caches.
func (s *Store) attach(ctx context.Context) error {
	var err error
	if len(s.cfg.URLs) > 0 {
		s.nc, err = s.connectExternal()
		if err != nil {
			return err
		}
	} else {
		s.nc, err = nats.Connect("", nats.InProcessServer(s.srv), nats.Name("skiff-gateway-store"))
		if err != nil {
			return errs.Unavailable("connecting to embedded nats server: %w", err)
		}
	}
	js, err := jetstream.New(s.nc)
	if err != nil {
		return errs.Internal("opening jetstream: %w", err)
	}
	s.js = replicated{JetStream: js, replicas: s.cfg.Replicas, retry: s.setup}
	err = s.setup(ctx, func(ctx context.Context) (err error) {
		s.functionsKV, err = s.js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:      bucketFunctions,
			Description: "skiff function metadata",
			History:     1,
			Storage:     jetstream.FileStorage,
		})
		return err
	})
	if err != nil {
		return s.setupErr(err, "opening kv bucket %s", bucketFunctions)
	}
	err = s.setup(ctx, func(ctx context.Context) (err error) {
		s.keysKV, err = s.js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:      bucketKeys,
			Description: "skiff api keys (secret hashes only)",
			History:     1,
			Storage:     jetstream.FileStorage,
		})
		return err
	})
	if err != nil {
		return s.setupErr(err, "opening kv bucket %s", bucketKeys)
	}
	err = s.setup(ctx, func(ctx context.Context) (err error) {
		s.code, err = s.js.CreateOrUpdateObjectStore(ctx, jetstream.ObjectStoreConfig{
			Bucket:      bucketCode,
			Description: "skiff code archives by sha256",
			Storage:     jetstream.FileStorage,
		})
		return err
	})
	if err != nil {
		return s.setupErr(err, "opening object store %s", bucketCode)
	}
	err = s.setup(ctx, func(ctx context.Context) (err error) {
		s.logs, err = s.js.CreateOrUpdateStream(ctx, s.logStreamConfig())
		return err
	})
	if err != nil {
		return s.setupErr(err, "opening stream %s", streamLogs)
	}
	if len(s.cfg.URLs) > 0 {
		if err := s.setup(ctx, s.probe); err != nil {
			return s.setupErr(err, "reading the new buckets")
		}
	}
	fw, err := s.watch(ctx, s.functionsKV, s.fns.applyEntry)
	if err != nil {
		return err
	}
	s.watchers = append(s.watchers, fw)
	kw, err := s.watch(ctx, s.keysKV, s.keys.applyEntry(s.log))
	if err != nil {
		return err
	}
	s.watchers = append(s.watchers, kw)
	return nil
}

// probe reads a missing entry from every bucket and stream: on a cluster,
// a new stream's replicas answer direct reads only a moment after it is
// created, and Open returns once they do.
func (s *Store) probe(ctx context.Context) error {
	const missing = "skiff-probe"
	for _, kv := range []jetstream.KeyValue{s.functionsKV, s.keysKV} {
		if _, err := kv.Get(ctx, missing); !errors.Is(err, jetstream.ErrKeyNotFound) {
			return err
		}
	}
	if _, err := s.code.GetInfo(ctx, missing); !errors.Is(err, jetstream.ErrObjectNotFound) {
		return err
	}
	if _, err := s.logs.GetLastMsgForSubject(ctx, logSubject(missing)); !errors.Is(err, jetstream.ErrMsgNotFound) {
		return err
	}
	return nil
}

// JetStream returns the JetStream handle, for streams and buckets that
// later components own. Streams, KV buckets and object stores created or
// updated through it with Replicas 0 get Replicas().
func (s *Store) JetStream() jetstream.JetStream { return s.js }

// Replicas is the replica count the store gives what it creates: 1
// embedded, Config.Replicas (3 by default) on an external cluster.
func (s *Store) Replicas() int { return s.cfg.Replicas }

// tooFewPeers are the JetStream error codes of a replica count the cluster
// cannot place: no suitable peers (10005), insufficient resources (10023),
// replicas on a server that is not clustered (10074).
func tooFewPeers(code jetstream.ErrorCode) bool {
	return code == 10005 || code == 10023 || code == 10074
}

// setupErr reports a failure to create the store's own buckets: with a
// hint when the cluster has too few servers for the replica count, or no
// JetStream at all.
func (s *Store) setupErr(err error, format string, args ...any) error {
	what := fmt.Sprintf(format, args...)
	if len(s.cfg.URLs) == 0 {
		return errs.Internal("%s: %w", what, err)
	}
	var jsErr jetstream.JetStreamError
	switch {
	case errors.Is(err, nats.ErrNoResponders) || errors.Is(err, jetstream.ErrJetStreamNotEnabled) || errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount):
		return errs.New(errs.KindFailedPrecondition, "%s: no JetStream on nats cluster %s for this account (enable jetstream on every server): %w", what, strings.Join(s.cfg.URLs, ","), err)
	case errors.As(err, &jsErr) && jsErr.APIError() != nil && tooFewPeers(jsErr.APIError().ErrorCode):
		return errs.New(errs.KindFailedPrecondition, "%s with %d replicas: %w (the cluster needs at least %d JetStream servers; lower replicas otherwise)", what, s.cfg.Replicas, err, s.cfg.Replicas)
	}
	if e := ctxErr(err); e != nil {
		return errs.New(errs.KindOf(e), "%s: %w", what, err)
	}
	return errs.Unavailable("%s on nats cluster %s: %w", what, strings.Join(s.cfg.URLs, ","), err)
}

// Close stops the watchers, drains the connection and shuts the embedded
// server down (JetStream flushes its files). It is safe to call twice.
func (s *Store) Close() error {
	s.closeOnce.Do(func() { s.closeErr = s.shutdown(true) })
	return s.closeErr
}

func (s *Store) shutdown(drain bool) error {
	var errList []error
	for _, w := range s.watchers {
		w.stop()
	}
	if s.nc != nil {
		if drain {
			closed := make(chan struct{})
			s.nc.SetClosedHandler(func(*nats.Conn) { close(closed) })
			if err := s.nc.Drain(); err != nil {
				errList = append(errList, fmt.Errorf("draining nats connection: %w", err))
				s.nc.Close()
			} else {
				select {
				case <-closed:
				case <-time.After(readyTimeout):
					errList = append(errList, errors.New("draining nats connection: timed out"))
					s.nc.Close()
				}
			}
		} else {
			s.nc.Close()
		}
	}
	if s.srv != nil {
		s.srv.Shutdown()
		s.srv.WaitForShutdown()
	}
	if s.unlock != nil {
		s.unlock()
	}
	if err := errors.Join(errList...); err != nil {
		return errs.Internal("closing store: %w", err)
	}
	return nil
}

// MaxPayload is the largest message the embedded server accepts.
const MaxPayload = 8 << 20

// serverLogger adapts slog to the embedded server's logger.
type serverLogger struct{ log *slog.Logger }

// Noticef logs at debug: the embedded server's notices (its banner, its
// settings) are noise in skiff's own log.
func (l serverLogger) Noticef(format string, v ...any) { l.log.Debug(fmt.Sprintf(format, v...)) }
func (l serverLogger) Warnf(format string, v ...any)   { l.log.Warn(fmt.Sprintf(format, v...)) }
func (l serverLogger) Fatalf(format string, v ...any)  { l.log.Error(fmt.Sprintf(format, v...)) }
func (l serverLogger) Errorf(format string, v ...any)  { l.log.Error(fmt.Sprintf(format, v...)) }
func (l serverLogger) Debugf(format string, v ...any)  { l.log.Debug(fmt.Sprintf(format, v...)) }
func (l serverLogger) Tracef(format string, v ...any)  {}

// validName reports whether name is a Lambda function name: 1-64 letters,
// digits, '-' and '_' (all valid in NATS keys and subject tokens).
func validName(name string) bool {
	if len(name) == 0 || len(name) > 64 {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_':
		default:
			return false
		}
	}
	return true
}

func checkName(field, name string) error {
	if !validName(name) {
		return errs.Invalid(field, "function name %q is not 1-64 letters, digits, '-' or '_'", name)
	}
	return nil
}

// ctxErr maps a context error to the taxonomy, or returns nil.
func ctxErr(err error) error {
	switch {
	case errors.Is(err, context.Canceled):
		return errs.New(errs.KindCanceled, "store: %w", err)
	case errors.Is(err, context.DeadlineExceeded):
		return errs.New(errs.KindDeadlineExceeded, "store: %w", err)
	}
	return nil
}

// wrapErr maps an engine error: context errors keep their kind, anything
// else is Unavailable (the engine could not serve).
func wrapErr(err error, format string, args ...any) error {
	if e := ctxErr(err); e != nil {
		return errs.New(errs.KindOf(e), format+": %w", append(args, err)...)
	}
	return errs.Unavailable(format+": %w", append(args, err)...)
}
