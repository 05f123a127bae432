// Package gatewayserver is the composition root both `skiff dev` and
// `skiff gateway` build on: storage (embedded NATS JetStream or an external
// cluster), the front end, async invoke, customer queues, streams, event
// source mappings, the state manager and the leasing service, served on one
// HTTP listener. The worker manager is the caller's: `skiff dev` runs an
// agent in-process, `skiff gateway` places work on remote agents.
package gatewayserver

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/gateway/async"
	"skiff.dev/skiff/gateway/budget"
	"skiff.dev/skiff/gateway/destinations"
	"skiff.dev/skiff/gateway/esm"
	"skiff.dev/skiff/gateway/frontend"
	"skiff.dev/skiff/gateway/kinesis"
	"skiff.dev/skiff/gateway/lease"
	"skiff.dev/skiff/gateway/queue"
	"skiff.dev/skiff/gateway/statemgr"
	"skiff.dev/skiff/gateway/store"
	"skiff.dev/skiff/gateway/streams"
	"skiff.dev/skiff/internal/archive"
	"skiff.dev/skiff/internal/zipdir"
)

// Workers is the worker manager as the front end uses it, with a Close
// that runs at shutdown after the front end has stopped.
type Workers interface {
	frontend.Router
	Close(ctx context.Context) error
}

// Parts are the pieces a caller's Mount may serve or wire further.
type Parts struct {
	Store    *store.Store
	Frontend *frontend.Frontend
	Registry *prometheus.Registry
	// Leases is the leasing service of the pollers (Kick it when gossip
	// declares a gateway dead).
	Leases *lease.Service
	// Background runs fn with the other background work: its error (other
	// than context.Canceled) ends the server.
	Background func(fn func(ctx context.Context) error)
}

// Config configures a gateway.
type Config struct {
	// DataDir holds the admin key, the webhook signing key and, unless
	// Store says otherwise, the embedded store.
	DataDir string
	Listen  string // default 127.0.0.1:7070
	// Name is the gateway's stable, cluster-unique name: its pollers'
	// lease holders derive from it. Default HostID(DataDir).
	Name string
	// Store configures storage; an empty DataDir there means
	// DataDir/store. SyncAlways follows AsyncDurability.
	Store  store.Config
	Deploy map[string]string // function name → zip file or directory, created or updated at start
	// AsyncDurability is when an accepted async event is acknowledged:
	// "always" (after fsync; the default) or "interval" (after the
	// engine's periodic sync).
	AsyncDurability string
	// AsyncRetryDelay is the base delay before retrying a failed async
	// event (Lambda's is about a minute, then twice that); default 1m.
	AsyncRetryDelay time.Duration
	// Workers builds the worker manager once storage is open (required).
	Workers func(ctx context.Context, st *store.Store, reg prometheus.Registerer) (Workers, error)
	// HolderDead, when set, reports a lease holder whose gateway is known
	// to be dead (gossip): its pollers' leases are taken over at once.
	HolderDead func(holder string) bool
	// LeaseExpiry is how long the pollers' leases outlive their last
	// heartbeat (0: lease.DefaultExpiry, 3 s). With gossip (HolderDead) a
	// dead gateway's leases are taken at once, so the stored heartbeat is
	// only the backstop and can be rarer.
	LeaseExpiry time.Duration
	// SharedLimits makes concurrency limits exact across every gateway of
	// the storage (gateway/budget: leased shares); off for a gateway that
	// is alone (`skiff dev`).
	SharedLimits bool
	// Cluster, when set, builds the ClusterService served on the API
	// listener (admin keys; Join needs none).
	Cluster func(ctx context.Context, st *store.Store) (skiffv1connect.ClusterServiceHandler, error)
	// Mount, when set, adds handlers to the API listener once everything
	// is built (the cluster's services).
	Mount  func(mux *http.ServeMux, p Parts) error
	Logger *slog.Logger
	Stdout io.Writer
	// Banner names the server in its logs and listening line ("skiff dev").
	Banner string
	// Ready, when set, is called with the bound address once serving.
	Ready func(addr string)
}

// Run serves until ctx is done, then shuts down in order: stop accepting,
// drain in-flight invocations, stop the workers, close storage.
func Run(ctx context.Context, cfg Config) (err error) {
	if cfg.DataDir == "" {
		return errors.New("gateway: a data dir is required")
	}
	if cfg.Workers == nil {
		return errors.New("gateway: a worker manager is required")
	}
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:7070"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Stdout == nil {
		cfg.Stdout = io.Discard
	}
	if cfg.Banner == "" {
		cfg.Banner = "skiff gateway"
	}
	if cfg.Name == "" {
		cfg.Name = HostID(cfg.DataDir)
	}
	log := cfg.Logger
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("creating data dir: %w", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	durability, err := async.ParseDurability(cfg.AsyncDurability)
	if err != nil {
		return err
	}
	stCfg := cfg.Store
	if stCfg.DataDir == "" {
		stCfg.DataDir = filepath.Join(cfg.DataDir, "store")
	}
	stCfg.Logger = log
	stCfg.SyncAlways = durability.SyncAlways()
	st, err := store.Open(ctx, stCfg)
	if err != nil {
		return fmt.Errorf("opening storage: %w", err)
	}
	defer func() { err = errors.Join(err, st.Close()) }()
	js := st.JetStream()

	workers, err := cfg.Workers(ctx, st, reg)
	if err != nil {
		return err
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		err = errors.Join(err, workers.Close(cctx))
	}()

	// Async invoke: the accept path, customer queues, destinations and the
	// leasing service the pollers hold their assignments with.
	asyncSvc, err := async.New(ctx, js, async.Config{RetryDelay: cfg.AsyncRetryDelay, Registry: reg, Logger: log.With("component", "async")})
	if err != nil {
		return fmt.Errorf("starting async invoke: %w", err)
	}
	defer func() { err = errors.Join(err, asyncSvc.Close()) }()
	leases, err := lease.New(ctx, js, lease.Config{Expiry: cfg.LeaseExpiry, Registry: reg, Logger: log.With("component", "lease"), Dead: cfg.HolderDead})
	if err != nil {
		return fmt.Errorf("starting the leasing service: %w", err)
	}
	queues, err := queue.New(ctx, js, queue.Config{Registry: reg, Logger: log.With("component", "queue")})
	if err != nil {
		return fmt.Errorf("starting queues: %w", err)
	}
	defer func() { err = errors.Join(err, queues.Close()) }()
	signingKey, err := destinations.EnsureSigningKey(filepath.Join(cfg.DataDir, "webhook.key"))
	if err != nil {
		return fmt.Errorf("webhook signing key: %w", err)
	}
	dests, err := destinations.New(destinations.Config{SigningKey: signingKey, Registry: reg, Logger: log.With("component", "destinations")},
		queues, async.DestinationInvoker{Service: asyncSvc, Functions: st})
	if err != nil {
		return fmt.Errorf("starting destinations: %w", err)
	}

	kin, err := kinesis.New(ctx, js, kinesis.Config{Registry: reg, Logger: log.With("component", "kinesis")})
	if err != nil {
		return fmt.Errorf("starting streams: %w", err)
	}
	defer func() { err = errors.Join(err, kin.Close()) }()

	var budgets *budget.Service
	if cfg.SharedLimits {
		if budgets, err = budget.New(ctx, js, cfg.Name, budget.Config{Registry: reg, Logger: log}); err != nil {
			return fmt.Errorf("starting concurrency budgets: %w", err)
		}
	}
	var clusterSvc skiffv1connect.ClusterServiceHandler
	if cfg.Cluster != nil {
		if clusterSvc, err = cfg.Cluster(ctx, st); err != nil {
			return fmt.Errorf("starting the cluster service: %w", err)
		}
	}
	fe, err := frontend.New(frontend.Config{
		Cluster:      clusterSvc,
		Budget:       frontendBudget(budgets),
		ValidateCode: validateCode,
		Async:        asyncSvc,
		Destinations: dests,
		Queues:       queues.Handler(),
		Streams:      kin.Handler(),
		Registry:     reg,
		Logger:       log.With("component", "frontend"),
	}, st, workers)
	if err != nil {
		return fmt.Errorf("starting front end: %w", err)
	}
	defer func() { err = errors.Join(err, fe.Close()) }()

	holder := cfg.Name
	esmSvc, err := esm.New(ctx, js, esm.Config{Registry: reg, Logger: log.With("component", "esm"), Streams: kin, Destinations: dests},
		queues, functionExists{st}, fe, leases, holder+"/esm")
	if err != nil {
		return fmt.Errorf("starting event source mappings: %w", err)
	}
	defer func() { err = errors.Join(err, esmSvc.Close()) }()
	streamSvc, err := streams.New(ctx, js, streams.Config{Registry: reg, Logger: log.With("component", "streams")}, kin, fe, dests, leases, holder+"/streams")
	if err != nil {
		return fmt.Errorf("starting the stream tracker: %w", err)
	}
	defer func() { err = errors.Join(err, streamSvc.Close()) }()
	fe.SetEventSources(esmSvc.Handler())
	sm, err := statemgr.New(statemgr.Config{Registry: reg, Logger: log.With("component", "statemgr")}, asyncSvc, st, leases)
	if err != nil {
		return fmt.Errorf("starting the state manager: %w", err)
	}
	pool := asyncSvc.NewPool(fe, dests, async.QueueDLQ{Queues: queues}, leases)
	keeper := leases.NewKeeper(holder+"/async", 64, async.IsResource, pool.Gained, pool.Lost)

	// Background work runs until shutdown; a failure ends the server.
	bgCtx, stopBG := context.WithCancel(context.Background())
	bg, bgCtx := errgroup.WithContext(bgCtx)
	bg.Go(func() error { return pool.Run(bgCtx, keeper, 30*time.Second) })
	bg.Go(func() error { return sm.Run(bgCtx) })
	bg.Go(func() error { return esmSvc.Run(bgCtx) })
	bg.Go(func() error { return streamSvc.Run(bgCtx) })
	bg.Go(func() error { return leases.RunSweeper(bgCtx, time.Second) })
	if budgets != nil {
		bg.Go(func() error { return budgets.Run(bgCtx) })
	}
	background := func(fn func(ctx context.Context) error) { bg.Go(func() error { return fn(bgCtx) }) }
	defer func() {
		stopBG()
		if bgErr := bg.Wait(); bgErr != nil && !errors.Is(bgErr, context.Canceled) {
			err = errors.Join(err, bgErr)
		}
	}()

	keyPath := filepath.Join(cfg.DataDir, "admin.key")
	secret, created, err := fe.EnsureAdminKey(ctx, keyPath)
	if err != nil {
		return fmt.Errorf("admin key: %w", err)
	}
	if created {
		fmt.Fprintf(cfg.Stdout, "created admin API key (shown once; also in %s):\n  %s\n", keyPath, secret)
	}

	mux := http.NewServeMux()
	fe.Mount(mux)
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	if cfg.Mount != nil {
		if err := cfg.Mount(mux, Parts{Store: st, Frontend: fe, Registry: reg, Leases: leases, Background: background}); err != nil {
			return err
		}
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", cfg.Listen, err)
	}
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		Protocols:         new(http.Protocols),
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	srv.Protocols.SetHTTP1(true)
	srv.Protocols.SetUnencryptedHTTP2(true)
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	addr := ln.Addr().String()
	log.Info(cfg.Banner+" serving", "addr", addr, "data_dir", cfg.DataDir, "name", cfg.Name)

	if err := deploy(ctx, "http://"+addr, secret, cfg.Deploy, cfg.Stdout); err != nil {
		_ = srv.Close()
		return err
	}
	fmt.Fprintf(cfg.Stdout, "%s listening on http://%s\n", cfg.Banner, addr)
	if cfg.Ready != nil {
		cfg.Ready(addr)
	}

	select {
	case err := <-serveErr:
		return fmt.Errorf("serving: %w", err)
	case <-bgCtx.Done():
		_ = srv.Close()
		return fmt.Errorf("background work stopped: %w", context.Cause(bgCtx))
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return srv.Shutdown(sctx)
}

// frontendBudget is b as the front end's Budget, nil when b is (a nil
// *budget.Service must not become a non-nil interface).
func frontendBudget(b *budget.Service) frontend.Budget {
	if b == nil {
		return nil
	}
	return b
}

// functionExists adapts the store to the event source mappings' check.
type functionExists struct{ st *store.Store }

func (f functionExists) Exists(ctx context.Context, name string) error {
	_, err := f.st.GetFunction(ctx, name)
	return err
}

// HostID names a process among pollers and lease holders by its host and
// data dir: stable across restarts (the store's lock on the data dir, or
// the cluster's unique member names, keep it unique among live processes),
// so a restarted process reclaims its dead predecessor's leases at once.
func HostID(dataDir string) string {
	h, _ := os.Hostname()
	if abs, err := filepath.Abs(dataDir); err == nil {
		dataDir = abs
	}
	sum := sha256.Sum256([]byte(dataDir))
	return fmt.Sprintf("%s-%s", h, hex.EncodeToString(sum[:4]))
}

func validateCode(zip []byte) (bool, error) {
	info, err := archive.Validate(zip, archive.Limits{})
	if err != nil {
		return false, err
	}
	return info.HasExecutableBootstrap, nil
}

// deploy creates or updates the functions named in cfg.Deploy through the
// public API, skipping those whose code is unchanged.
func deploy(ctx context.Context, endpoint, key string, fns map[string]string, stdout io.Writer) error {
	if len(fns) == 0 {
		return nil
	}
	client := skiffv1connect.NewFunctionServiceClient(http.DefaultClient, endpoint)
	auth := func(r connect.AnyRequest) { r.Header().Set("Authorization", "Bearer "+key) }
	names := make([]string, 0, len(fns))
	for n := range fns {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		code, err := readCode(fns[name])
		if err != nil {
			return fmt.Errorf("deploying %s: %w", name, err)
		}
		sum := sha256.Sum256(code)
		get := connect.NewRequest(&skiffv1.GetFunctionRequest{Name: name})
		auth(get)
		cur, err := client.GetFunction(ctx, get)
		switch {
		case err == nil && cur.Msg.GetFunction().GetCodeSha256() == hex.EncodeToString(sum[:]):
			fmt.Fprintf(stdout, "function %s is up to date\n", name)
		case err == nil:
			req := connect.NewRequest(&skiffv1.UpdateFunctionCodeRequest{Name: name, ZipFile: code})
			auth(req)
			if _, err := client.UpdateFunctionCode(ctx, req); err != nil {
				return fmt.Errorf("updating %s: %w", name, err)
			}
			fmt.Fprintf(stdout, "updated function %s\n", name)
		case connect.CodeOf(err) == connect.CodeNotFound:
			req := connect.NewRequest(&skiffv1.CreateFunctionRequest{Name: name, ZipFile: code,
				Config: &skiffv1.FunctionConfig{Runtime: "provided", Handler: "bootstrap"}})
			auth(req)
			if _, err := client.CreateFunction(ctx, req); err != nil {
				return fmt.Errorf("creating %s: %w", name, err)
			}
			fmt.Fprintf(stdout, "created function %s\n", name)
		default:
			return fmt.Errorf("deploying %s: %w", name, err)
		}
	}
	return nil
}

// readCode returns a zip archive: the file itself, or the directory zipped
// deterministically (so an unchanged tree keeps its code digest).
func readCode(path string) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if !fi.IsDir() {
		return os.ReadFile(path)
	}
	entries, err := zipdir.Scan(path)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	if err := zipdir.Write(&buf, entries, nil); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
