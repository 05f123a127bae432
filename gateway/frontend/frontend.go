// Package frontend is skiff's Front End, as in Lambda's architecture: the
// Connect RPC handlers of FunctionService, InvokeService, KeyService and
// LogService, API-key authentication and authorization, validation of every
// input field, and concurrency admission (account limit and per-function
// reserved concurrency) in front of the worker manager (gateway/router).
//
// EVENT invokes are accepted into the async queues (the Async interface,
// gateway/async) and answered 202 once stored; the event invoke config
// RPCs validate and store through the same interface. InvokeSync is the
// unauthenticated in-process entry of the async and event source pollers
// into the same admission and router path.
//
// Storage and the worker manager are reached through the small Store and
// Router interfaces declared here; the composition root wires the real
// gateway/store and gateway/router implementations.
package frontend

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/grpchealth"
	"connectrpc.com/grpcreflect"
	"github.com/prometheus/client_golang/prometheus"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/gateway/store"
	"skiff.dev/skiff/internal/errs"
)

// Store is what the front end needs from storage. *store.Store implements
// it.
type Store interface {
	// CreateFunction stores a new function; errs.KindAlreadyExists when the
	// name is taken.
	CreateFunction(ctx context.Context, fn *skiffv1.Function) (*skiffv1.Function, error)
	// GetFunction returns a function (errs.NotFound when missing). The result
	// is cached and shared: callers clone before editing.
	GetFunction(ctx context.Context, name string) (*skiffv1.Function, error)
	// UpdateFunction replaces a function if fn.Revision still matches the
	// stored revision (errs.Conflict otherwise).
	UpdateFunction(ctx context.Context, fn *skiffv1.Function) (*skiffv1.Function, error)
	DeleteFunction(ctx context.Context, name string) error
	// ListFunctions returns up to limit functions with names after `after`,
	// in name order, and the cursor of the next page ("" at the end).
	ListFunctions(ctx context.Context, after string, limit int) ([]*skiffv1.Function, string, error)
	// SumReserved is the sum of the reserved concurrency of all functions.
	SumReserved(ctx context.Context) (int64, error)
	// PutCode stores a code archive and returns its hex sha256.
	PutCode(ctx context.Context, zip []byte) (string, error)
	PutKey(ctx context.Context, k Key) error
	// KeyBySecretHash finds a key by the sha256 of its secret (errs.NotFound).
	KeyBySecretHash(ctx context.Context, hash []byte) (Key, error)
	ListKeys(ctx context.Context) ([]Key, error)
	DeleteKey(ctx context.Context, id string) error
	AppendLog(ctx context.Context, e LogEntry) error
	// ReadLogs calls fn for the last `last` entries of a function's log and,
	// with follow, for new ones until ctx ends.
	ReadLogs(ctx context.Context, function string, last int, follow bool, fn func(LogEntry) error) error
}

// Key is an API key as stored: only the sha256 of its secret is kept.
type Key = store.Key

// LogEntry is the log text of one invocation.
type LogEntry = store.LogEntry

// Router is what the front end needs from the worker manager.
type Router interface {
	// Invoke runs one invocation on a sandbox of req.Spec. Errors carry
	// errs kinds and are passed to the caller as they are.
	Invoke(ctx context.Context, req *skiffv1.AgentInvokeRequest) (*skiffv1.AgentInvokeResponse, error)
	// Retire stops the function's sandboxes whose config key is not
	// keepConfigKey (all of them when it is ""), after code or configuration
	// changes and deletes.
	Retire(ctx context.Context, function, keepConfigKey string) error
}

// Config configures a Frontend. Zero values take the documented defaults.
type Config struct {
	// AccountConcurrency is the account's concurrent execution limit
	// (default 1000).
	AccountConcurrency int
	// Budget, with several gateways, keeps the concurrency limits exact
	// across them (gateway/budget); nil means this gateway admits alone.
	Budget Budget
	// UnreservedMin is the floor of the unreserved pool: reserved
	// concurrency can never push it below this (default 100).
	UnreservedMin int
	// MaxSyncPayload bounds a synchronous invoke's payload (default 6 MiB).
	MaxSyncPayload int
	// MaxUploadBytes bounds an archive streamed with UploadFunction
	// (default 256 MiB). CreateFunction's inline zip_file is bounded by the
	// RPC read limit (70 MiB).
	MaxUploadBytes int64
	// Region and AccountID go into ARNs (defaults "local", "000000000000").
	Region, AccountID string
	// ValidateCode checks a code archive and reports whether it has an
	// executable bootstrap at its root. nil accepts every archive.
	ValidateCode func(zip []byte) (hasBootstrap bool, err error)
	// Async accepts EVENT invokes and stores event invoke configs; nil
	// disables both (EVENT invokes are then invalid).
	Async Async
	// Destinations checks event destinations when an event invoke config
	// is set; nil refuses configs that name destinations.
	Destinations DestinationValidator
	// Queues and EventSources serve QueueService and EventSourceService
	// behind the same authentication (admin keys only) and error mapping;
	// nil leaves a service unmounted.
	Queues       skiffv1connect.QueueServiceHandler
	EventSources skiffv1connect.EventSourceServiceHandler
	Streams      skiffv1connect.StreamServiceHandler
	// Cluster serves ClusterService (gateway/cluster): admin keys only,
	// except Join, which needs no API key (its join token is the
	// credential, checked by the handler). nil leaves it unmounted.
	Cluster skiffv1connect.ClusterServiceHandler
	// LogQueue is the capacity of the log shipping queue (default 4096).
	LogQueue int
	// Registry receives the metrics (a private one when nil).
	Registry *prometheus.Registry
	Logger   *slog.Logger
	Now      func() time.Time
}

// Defaults and limits.
const (
	DefaultAccountConcurrency = 1000
	DefaultUnreservedMin      = 100
	DefaultMaxSyncPayload     = 6 << 20
	DefaultMaxUploadBytes     = 256 << 20
	// MaxRequestBytes is the RPC read limit of FunctionService, which bounds
	// CreateFunction's and UpdateFunctionCode's inline archives.
	MaxRequestBytes = 70 << 20
	// controlReadMax is the read limit of KeyService and LogService.
	controlReadMax = 1 << 20
	// clusterReadMax is the read limit of ClusterService, whose Join is
	// open without a key: a CSR, a token and a name.
	clusterReadMax = 64 << 10
	// keyCacheTTL bounds how long a resolved API key is trusted without
	// asking the store again (revocations on this gateway apply at once).
	keyCacheTTL = 5 * time.Second
)

func (c *Config) setDefaults() error {
	if c.AccountConcurrency == 0 {
		c.AccountConcurrency = DefaultAccountConcurrency
	}
	if c.UnreservedMin == 0 {
		c.UnreservedMin = DefaultUnreservedMin
	}
	if c.MaxSyncPayload == 0 {
		c.MaxSyncPayload = DefaultMaxSyncPayload
	}
	if c.MaxUploadBytes == 0 {
		c.MaxUploadBytes = DefaultMaxUploadBytes
	}
	if c.Region == "" {
		c.Region = "local"
	}
	if c.AccountID == "" {
		c.AccountID = "000000000000"
	}
	if c.LogQueue == 0 {
		c.LogQueue = 4096
	}
	if c.Registry == nil {
		c.Registry = prometheus.NewRegistry()
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	switch {
	case c.AccountConcurrency < 0:
		return fmt.Errorf("account concurrency %d is negative", c.AccountConcurrency)
	case c.UnreservedMin < 0 || c.UnreservedMin > c.AccountConcurrency:
		return fmt.Errorf("unreserved minimum %d is outside 0..%d", c.UnreservedMin, c.AccountConcurrency)
	case c.MaxSyncPayload < 0 || c.MaxUploadBytes < 0 || c.LogQueue < 0:
		return errors.New("payload, upload and log queue limits must not be negative")
	}
	return nil
}

// Frontend serves skiff's public RPC services.
type Frontend struct {
	cfg    Config
	st     Store
	rt     Router
	log    *slog.Logger
	now    func() time.Time
	met    *metrics
	adm    *admission
	keys   *keyCache
	ship   *shipper
	concMu sync.Mutex // serializes reserved concurrency changes (the unreserved floor check)

	fns sync.Map // function name → *fnState
}

// fnState is the front end's in-memory state for one function name: its
// in-flight counter, the cached sandbox spec and its metric handles.
type fnState struct {
	inflight atomic.Int64
	spec     atomic.Pointer[cachedSpec]
	m        fnMetrics
}

// New returns a Frontend over st and rt.
func New(cfg Config, st Store, rt Router) (*Frontend, error) {
	if st == nil || rt == nil {
		return nil, errors.New("frontend needs a store and a router")
	}
	if err := cfg.setDefaults(); err != nil {
		return nil, fmt.Errorf("frontend config: %w", err)
	}
	met, err := newMetrics(cfg.Registry)
	if err != nil {
		return nil, fmt.Errorf("registering metrics: %w", err)
	}
	f := &Frontend{
		cfg:  cfg,
		st:   st,
		rt:   rt,
		log:  cfg.Logger,
		now:  cfg.Now,
		met:  met,
		keys: newKeyCache(cfg.Now),
	}
	f.adm = newAdmission(cfg.AccountConcurrency, st.SumReserved, cfg.Budget)
	f.ship = newShipper(st, cfg.LogQueue, cfg.Logger, met.logsDropped)
	return f, nil
}

// SetEventSources sets the EventSourceService handler before Mount, for
// wiring where the handler needs the front end itself (its InvokeSync).
func (f *Frontend) SetEventSources(h skiffv1connect.EventSourceServiceHandler) {
	f.cfg.EventSources = h
}

// compressMinBytes is the smallest response the server compresses.
const compressMinBytes = 4 << 10

// Mount registers the four services (with authentication and error
// mapping), gRPC health and gRPC reflection on mux. Health and reflection
// need no key.
func (f *Frontend) Mount(mux *http.ServeMux) {
	// Compressing small messages costs more than it saves: connect-go
	// gzips every response by default, which dominated the warm invoke's
	// CPU profile for a typical small payload.
	icpt := connect.WithHandlerOptions(
		connect.WithInterceptors(errs.Interceptor(), &authInterceptor{f: f}),
		connect.WithCompressMinBytes(compressMinBytes),
	)
	mux.Handle(skiffv1connect.NewFunctionServiceHandler(&functionService{f: f}, icpt, connect.WithReadMaxBytes(MaxRequestBytes)))
	mux.Handle(skiffv1connect.NewInvokeServiceHandler(&invokeService{f}, icpt, connect.WithReadMaxBytes(2*f.cfg.MaxSyncPayload+1<<20)))
	mux.Handle(skiffv1connect.NewKeyServiceHandler(&keyService{f}, icpt, connect.WithReadMaxBytes(controlReadMax)))
	mux.Handle(skiffv1connect.NewLogServiceHandler(&logService{f}, icpt, connect.WithReadMaxBytes(controlReadMax)))
	services := []string{
		skiffv1connect.FunctionServiceName,
		skiffv1connect.InvokeServiceName,
		skiffv1connect.KeyServiceName,
		skiffv1connect.LogServiceName,
	}
	if f.cfg.Queues != nil {
		// Batches hold at most 256 KB of bodies; leave room for framing.
		mux.Handle(skiffv1connect.NewQueueServiceHandler(f.cfg.Queues, icpt, connect.WithReadMaxBytes(1<<20)))
		services = append(services, skiffv1connect.QueueServiceName)
	}
	if f.cfg.Streams != nil {
		// PutRecords carries up to 5 MiB of records.
		mux.Handle(skiffv1connect.NewStreamServiceHandler(f.cfg.Streams, icpt, connect.WithReadMaxBytes(8<<20)))
		services = append(services, skiffv1connect.StreamServiceName)
	}
	if f.cfg.Cluster != nil {
		mux.Handle(skiffv1connect.NewClusterServiceHandler(f.cfg.Cluster, icpt, connect.WithReadMaxBytes(clusterReadMax)))
		services = append(services, skiffv1connect.ClusterServiceName)
	}
	if f.cfg.EventSources != nil {
		mux.Handle(skiffv1connect.NewEventSourceServiceHandler(f.cfg.EventSources, icpt, connect.WithReadMaxBytes(controlReadMax)))
		services = append(services, skiffv1connect.EventSourceServiceName)
	}
	mux.Handle(grpchealth.NewHandler(grpchealth.NewStaticChecker(services...)))
	reflector := grpcreflect.NewStaticReflector(services...)
	mux.Handle(grpcreflect.NewHandlerV1(reflector))
	mux.Handle(grpcreflect.NewHandlerV1Alpha(reflector))
}

// Close flushes the log shipper. In-flight RPCs are the server's to drain
// before.
func (f *Frontend) Close() error {
	f.ship.close()
	return nil
}

// state returns the in-memory state of a function, creating it on first use.
func (f *Frontend) state(name string) *fnState {
	if s, ok := f.fns.Load(name); ok {
		return s.(*fnState)
	}
	s := &fnState{m: f.met.forFunction(name)}
	actual, _ := f.fns.LoadOrStore(name, s)
	return actual.(*fnState)
}

// arn returns the ARN of a function.
func (f *Frontend) arn(name string) string {
	return "arn:aws:lambda:" + f.cfg.Region + ":" + f.cfg.AccountID + ":function:" + name
}

var _ Store = (*store.Store)(nil)
