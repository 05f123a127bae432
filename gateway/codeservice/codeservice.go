// Package codeservice serves function code archives to agents
// (CodeService): an agent that starts a sandbox whose code it has not
// cached fetches the archive by digest from a gateway, over the cluster's
// mutual TLS.
package codeservice

import (
	"context"
	"encoding/hex"
	"net/http"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/internal/errs"
)

// ChunkSize bounds one streamed message.
const ChunkSize = 1 << 20

// Code is where archives come from; *store.Store implements it.
type Code interface {
	FetchCode(ctx context.Context, sha256hex string) ([]byte, error)
}

// Handler serves CodeService.
type Handler struct{ code Code }

var _ skiffv1connect.CodeServiceHandler = (*Handler)(nil)

// New returns a CodeService handler over code.
func New(code Code) *Handler { return &Handler{code: code} }

// Mount adds the service to mux; only requests that presented a verified
// client certificate of the cluster reach it (see RequireClientCert).
func (h *Handler) Mount(mux *http.ServeMux) {
	path, handler := skiffv1connect.NewCodeServiceHandler(h, connect.WithInterceptors(errs.Interceptor()))
	mux.Handle(path, RequireClientCert(handler))
}

// GetCode streams the archive in chunks of at most ChunkSize; the first
// message carries the size.
func (h *Handler) GetCode(ctx context.Context, req *connect.Request[skiffv1.GetCodeRequest], stream *connect.ServerStream[skiffv1.GetCodeResponse]) error {
	digest := req.Msg.GetCodeSha256()
	if b, err := hex.DecodeString(digest); err != nil || len(b) != 32 {
		return errs.Invalid("code_sha256", "code_sha256 %.80q is not a hex sha256", digest)
	}
	zip, err := h.code.FetchCode(ctx, digest)
	if err != nil {
		return err
	}
	first := true
	for off := 0; first || off < len(zip); off += ChunkSize {
		msg := &skiffv1.GetCodeResponse{Chunk: zip[off:min(off+ChunkSize, len(zip))]}
		if first {
			msg.Size = int64(len(zip))
			first = false
		}
		if err := stream.Send(msg); err != nil {
			return err
		}
	}
	return nil
}

// RequireClientCert refuses (401) requests that did not present a client
// certificate verified against the cluster CA: the listener asks for one
// but, to let agents join, does not require it.
func RequireClientCert(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 {
			http.Error(w, "a client certificate of the cluster is required", http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r)
	})
}
