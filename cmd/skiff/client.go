package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"connectrpc.com/connect"

	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
)

// DefaultDataDir returns the directory `skiff dev` keeps its state in when
// --data-dir is not given, and where the client looks for the admin key:
// $SKIFF_DATA_DIR, else $XDG_DATA_HOME/skiff, else ~/.local/share/skiff.
func DefaultDataDir() string {
	return defaultDataDir(os.Getenv, os.UserHomeDir)
}

func defaultDataDir(getenv func(string) string, home func() (string, error)) string {
	if d := getenv(envDataDir); d != "" {
		return d
	}
	if d := getenv("XDG_DATA_HOME"); d != "" {
		return filepath.Join(d, "skiff")
	}
	h, err := home()
	if err != nil || h == "" {
		// No home: fall back to a directory relative to the working one
		// rather than failing every command.
		return ".skiff"
	}
	return filepath.Join(h, ".local", "share", "skiff")
}

// clients are the generated Connect clients of one gateway.
type clients struct {
	fn      skiffv1connect.FunctionServiceClient
	invoke  skiffv1connect.InvokeServiceClient
	keys    skiffv1connect.KeyServiceClient
	logs    skiffv1connect.LogServiceClient
	queues  skiffv1connect.QueueServiceClient
	esm     skiffv1connect.EventSourceServiceClient
	streams skiffv1connect.StreamServiceClient
	cluster skiffv1connect.ClusterServiceClient
}

// dial resolves the endpoint and the API key and builds the clients. It
// does not connect: the first RPC does.
func (a *app) dial() (*clients, error) {
	raw := a.flagEndpoint
	if raw == "" {
		raw = a.getenv(envEndpoint)
	}
	if raw == "" {
		raw = defaultEndpoint
	}
	endpoint, err := normalizeEndpoint(raw)
	if err != nil {
		return nil, &usageError{err: err, path: "skiff"}
	}
	a.endpoint = endpoint
	key, err := a.apiKey()
	if err != nil {
		return nil, err
	}
	hc := newHTTPClient(endpoint, a.flagProtocol == "grpc")
	opts := []connect.ClientOption{connect.WithInterceptors(bearer(key))}
	if a.flagProtocol == "grpc" {
		opts = append(opts, connect.WithGRPC())
	}
	return &clients{
		fn:      skiffv1connect.NewFunctionServiceClient(hc, endpoint, opts...),
		invoke:  skiffv1connect.NewInvokeServiceClient(hc, endpoint, opts...),
		keys:    skiffv1connect.NewKeyServiceClient(hc, endpoint, opts...),
		logs:    skiffv1connect.NewLogServiceClient(hc, endpoint, opts...),
		queues:  skiffv1connect.NewQueueServiceClient(hc, endpoint, opts...),
		esm:     skiffv1connect.NewEventSourceServiceClient(hc, endpoint, opts...),
		streams: skiffv1connect.NewStreamServiceClient(hc, endpoint, opts...),
		cluster: skiffv1connect.NewClusterServiceClient(hc, endpoint, opts...),
	}, nil
}

// normalizeEndpoint accepts a URL, or host:port meaning http://host:port.
func normalizeEndpoint(raw string) (string, error) {
	if !strings.Contains(raw, "://") {
		raw = "http://" + raw
	}
	u, err := url.Parse(raw)
	if err != nil {
		return "", fmt.Errorf("invalid endpoint %q: %w", raw, err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "", fmt.Errorf("invalid endpoint %q: want http://host:port or https://host:port", raw)
	}
	return strings.TrimRight(u.String(), "/"), nil
}

// apiKey is --api-key, else $SKIFF_API_KEY, else the admin key that
// `skiff dev` wrote to the default data dir, else none.
func (a *app) apiKey() (string, error) {
	if a.flagAPIKey != "" {
		return a.flagAPIKey, nil
	}
	if k := a.getenv(envAPIKey); k != "" {
		return k, nil
	}
	path := filepath.Join(defaultDataDir(a.getenv, a.homeDir), adminKeyFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("reading the admin key: %w (pass --api-key or set %s)", err, envAPIKey)
	}
	return strings.TrimSpace(string(b)), nil
}

// newHTTPClient returns a keep-alive client. gRPC over http:// needs
// HTTP/2 with prior knowledge (h2c); Connect uses HTTP/1.1 there, so it
// also works through proxies that do not speak h2c. Over https both
// negotiate HTTP/2 with ALPN.
func newHTTPClient(endpoint string, grpc bool) *http.Client {
	tr := &http.Transport{
		Proxy: http.ProxyFromEnvironment,
		DialContext: (&net.Dialer{
			Timeout:   10 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		MaxIdleConns:          16,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
		Protocols:             new(http.Protocols),
	}
	if grpc && strings.HasPrefix(endpoint, "http://") {
		tr.Protocols.SetUnencryptedHTTP2(true)
	} else {
		tr.Protocols.SetHTTP1(true)
		tr.Protocols.SetHTTP2(true)
	}
	return &http.Client{Transport: tr}
}

// bearer is an interceptor that sends the API key as
// `Authorization: Bearer <key>` on every call, unary and streaming.
func bearer(key string) connect.Interceptor { return authInterceptor{key: key} }

type authInterceptor struct{ key string }

func (i authInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if i.key != "" {
			req.Header().Set("Authorization", "Bearer "+i.key)
		}
		return next(ctx, req)
	}
}

func (i authInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		if i.key != "" {
			conn.RequestHeader().Set("Authorization", "Bearer "+i.key)
		}
		return conn
	}
}

func (authInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}
