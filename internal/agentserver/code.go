package agentserver

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"net/http"
	"slices"
	"sync"
	"time"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/internal/archive"
	"skiff.dev/skiff/internal/errs"
)

// MaxCodeBytes bounds a code archive fetched from a gateway: no archive
// can unpack to more than archive.DefaultMaxUnpacked, and a zip is never
// larger than what it unpacks to plus its headers.
const MaxCodeBytes = archive.DefaultMaxUnpacked + 16<<20

// maxCodeChunk bounds one GetCode message (chunks are at most 1 MiB).
const maxCodeChunk = 2 << 20

// GatewayCode fetches code archives by digest from a gateway's
// CodeService, over the cluster's mutual TLS. It is the agent's
// codecache.Fetcher in a cluster.
type GatewayCode struct {
	hc      *http.Client
	primary string
	max     int64

	mu       sync.Mutex
	clients  map[string]skiffv1connect.CodeServiceClient // by base URL; guarded by mu
	gateways func() []string                             // other gateways' base URLs; guarded by mu
}

// SetGateways gives the fetcher the other gateways to try when the one it
// was configured with does not answer (from gossip: gateways come and go).
func (g *GatewayCode) SetGateways(f func() []string) {
	g.mu.Lock()
	g.gateways = f
	g.mu.Unlock()
}

func (g *GatewayCode) client(baseURL string) skiffv1connect.CodeServiceClient {
	g.mu.Lock()
	defer g.mu.Unlock()
	c, ok := g.clients[baseURL]
	if !ok {
		c = skiffv1connect.NewCodeServiceClient(g.hc, baseURL, connect.WithReadMaxBytes(maxCodeChunk))
		g.clients[baseURL] = c
	}
	return c
}

// urls is the configured gateway first, then the others.
func (g *GatewayCode) urls() []string {
	g.mu.Lock()
	f := g.gateways
	g.mu.Unlock()
	out := []string{g.primary}
	if f != nil {
		for _, u := range f() {
			if !slices.Contains(out, u) {
				out = append(out, u)
			}
		}
	}
	return out
}

// NewGatewayCode returns a fetcher for the gateway at baseURL
// (https://host:port) that presents the node certificate of clientTLS.
func NewGatewayCode(baseURL string, clientTLS *tls.Config) *GatewayCode {
	tr := &http.Transport{
		TLSClientConfig:     clientTLS,
		ForceAttemptHTTP2:   true,
		TLSHandshakeTimeout: 10 * time.Second,
		IdleConnTimeout:     90 * time.Second,
	}
	return &GatewayCode{hc: &http.Client{Transport: tr}, primary: baseURL, max: MaxCodeBytes,
		clients: map[string]skiffv1connect.CodeServiceClient{}}
}

// FetchCode streams the archive with the digest from the configured
// gateway, or, when it does not answer, from the other gateways in turn,
// and checks that it hashes to the digest. A gateway's NotFound is final:
// gateways share their storage.
func (g *GatewayCode) FetchCode(ctx context.Context, sha256hex string) ([]byte, error) {
	var last error
	for _, u := range g.urls() {
		b, err := g.fetchFrom(ctx, u, sha256hex)
		if err == nil {
			return b, nil
		}
		if ctx.Err() != nil || errs.IsNotFound(err) || errs.IsInvalid(err) {
			return nil, err
		}
		last = err
	}
	return nil, last
}

func (g *GatewayCode) fetchFrom(ctx context.Context, baseURL, sha256hex string) ([]byte, error) {
	stream, err := g.client(baseURL).GetCode(ctx, connect.NewRequest(&skiffv1.GetCodeRequest{CodeSha256: sha256hex}))
	if err != nil {
		return nil, errs.FromConnect(err)
	}
	defer stream.Close()
	var buf []byte
	size := int64(-1)
	for stream.Receive() {
		msg := stream.Msg()
		if size < 0 {
			size = msg.GetSize()
			if size < 0 || size > g.max {
				return nil, errs.Internal("gateway announced %d bytes of code %s, more than the %d allowed", size, sha256hex, g.max)
			}
			buf = make([]byte, 0, size)
		}
		if int64(len(buf)+len(msg.GetChunk())) > size {
			return nil, errs.Internal("gateway sent more than the %d bytes it announced for code %s", size, sha256hex)
		}
		buf = append(buf, msg.GetChunk()...)
	}
	if err := stream.Err(); err != nil {
		return nil, errs.FromConnect(err)
	}
	if int64(len(buf)) != size {
		return nil, errs.Unavailable("gateway sent %d of the %d bytes of code %s", len(buf), max(size, 0), sha256hex)
	}
	sum := sha256.Sum256(buf)
	if hex.EncodeToString(sum[:]) != sha256hex {
		return nil, errs.Internal("code from the gateway does not hash to %s", sha256hex)
	}
	return buf, nil
}
