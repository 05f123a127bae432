// Package devserver is the composition root of `skiff dev`: one process
// running the gateway (front end, storage on embedded NATS JetStream,
// router) and an agent, which the router calls in-process through the same
// AgentService interface a cluster uses over the network. Only cmd/skiff
// imports it.
package devserver

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
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"

	"skiff.dev/skiff/agent"
	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/gateway/async"
	"skiff.dev/skiff/gateway/destinations"
	"skiff.dev/skiff/gateway/esm"
	"skiff.dev/skiff/gateway/frontend"
	"skiff.dev/skiff/gateway/kinesis"
	"skiff.dev/skiff/gateway/lease"
	"skiff.dev/skiff/gateway/queue"
	"skiff.dev/skiff/gateway/router"
	"skiff.dev/skiff/gateway/statemgr"
	"skiff.dev/skiff/gateway/store"
	"skiff.dev/skiff/gateway/streams"
	"skiff.dev/skiff/internal/archive"
	"skiff.dev/skiff/internal/zipdir"
)

// Config configures `skiff dev`.
type Config struct {
	DataDir         string
	Listen          string            // default 127.0.0.1:7070
	Deploy          map[string]string // function name → zip file or directory, created or updated at start
	KeepAlive       time.Duration     // idle sandbox lifetime
	SandboxMemoryMB int               // memory for sandboxes; default half the host's
	// AsyncDurability is when an accepted async event is acknowledged:
	// "always" (after fsync; the default) or "interval" (after the
	// engine's periodic sync).
	AsyncDurability string
	// SandboxSubnet holds the sandboxes' addresses (a /30 each); zero means
	// the agent's default, 10.253.0.0/16.
	SandboxSubnet netip.Prefix
	// Resolver is the sandboxes' DNS server; zero means the host's first
	// nameserver.
	Resolver netip.Addr
	// AsyncRetryDelay is the base delay before retrying a failed async
	// event (Lambda's is about a minute, then twice that); default 1m.
	AsyncRetryDelay time.Duration
	Logger          *slog.Logger
	Stdout          io.Writer
	// Ready, when set, is called with the bound address once serving.
	Ready func(addr string)
}

// Run serves until ctx is done, then shuts down in order: stop accepting,
// drain in-flight invocations, close sandboxes, close storage.
func Run(ctx context.Context, cfg Config) (err error) {
	if cfg.DataDir == "" {
		return errors.New("dev: a data dir is required")
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
	st, err := store.Open(ctx, store.Config{DataDir: filepath.Join(cfg.DataDir, "store"), Logger: log, SyncAlways: durability.SyncAlways()})
	if err != nil {
		return fmt.Errorf("opening storage: %w", err)
	}
	defer func() { err = errors.Join(err, st.Close()) }()
	js := st.JetStream()

	ag, err := agent.New(agent.Config{
		DataDir:         filepath.Join(cfg.DataDir, "agent"),
		MemoryMB:        int64(cfg.SandboxMemoryMB),
		KeepAlive:       cfg.KeepAlive,
		NetworkSubnet:   cfg.SandboxSubnet,
		NetworkResolver: cfg.Resolver,
		Code:            st,
		Logger:          log.With("component", "agent"),
		Registry:        reg,
	})
	if err != nil {
		return fmt.Errorf("starting agent: %w", err)
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		err = errors.Join(err, ag.Close(cctx))
	}()

	rt, err := router.New(ag)
	if err != nil {
		return err
	}

	// Async invoke: the accept path, customer queues, destinations and the
	// leasing service the pollers hold their assignments with.
	asyncSvc, err := async.New(ctx, js, async.Config{RetryDelay: cfg.AsyncRetryDelay, Registry: reg, Logger: log.With("component", "async")})
	if err != nil {
		return fmt.Errorf("starting async invoke: %w", err)
	}
	defer func() { err = errors.Join(err, asyncSvc.Close()) }()
	leases, err := lease.New(ctx, js, lease.Config{Registry: reg, Logger: log.With("component", "lease")})
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

	fe, err := frontend.New(frontend.Config{
		ValidateCode: validateCode,
		Async:        asyncSvc,
		Destinations: dests,
		Queues:       queues.Handler(),
		Streams:      kin.Handler(),
		Registry:     reg,
		Logger:       log.With("component", "frontend"),
	}, st, rt)
	if err != nil {
		return fmt.Errorf("starting front end: %w", err)
	}
	defer func() { err = errors.Join(err, fe.Close()) }()

	holder := "dev-" + hostID()
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
	log.Info("skiff dev serving", "addr", addr, "data_dir", cfg.DataDir)

	if err := deploy(ctx, "http://"+addr, secret, cfg.Deploy, cfg.Stdout); err != nil {
		_ = srv.Close()
		return err
	}
	fmt.Fprintf(cfg.Stdout, "skiff dev listening on http://%s\n", addr)
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

// functionExists adapts the store to the event source mappings' check.
type functionExists struct{ st *store.Store }

func (f functionExists) Exists(ctx context.Context, name string) error {
	_, err := f.st.GetFunction(ctx, name)
	return err
}

// hostID names this process among pollers and lease holders.
func hostID() string {
	h, _ := os.Hostname()
	return fmt.Sprintf("%s-%d", h, os.Getpid())
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
