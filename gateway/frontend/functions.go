package frontend

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"strings"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/internal/errs"
)

const (
	defaultPageSize = 50
	maxPageSize     = 1000
	pageTokenPrefix = "p1:"
	bootstrapNeeded = "runtime provided needs an executable file named bootstrap at the archive root"
)

// functionService implements skiffv1connect.FunctionServiceHandler.
type functionService struct {
	f *Frontend
}

var _ skiffv1connect.FunctionServiceHandler = (*functionService)(nil)

func (s *functionService) CreateFunction(ctx context.Context, req *connect.Request[skiffv1.CreateFunctionRequest]) (*connect.Response[skiffv1.CreateFunctionResponse], error) {
	fn, err := s.f.createFunction(ctx, req.Msg.GetName(), req.Msg.GetConfig(), req.Msg.GetZipFile())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.CreateFunctionResponse{Function: fn}), nil
}

func (s *functionService) UploadFunction(ctx context.Context, stream *connect.ClientStream[skiffv1.UploadFunctionRequest]) (*connect.Response[skiffv1.UploadFunctionResponse], error) {
	if !stream.Receive() {
		if err := stream.Err(); err != nil {
			return nil, err
		}
		return nil, errs.Invalid("header", "the upload is empty: the first message must carry the header")
	}
	h := stream.Msg().GetHeader()
	if h == nil {
		return nil, errs.Invalid("header", "the first message of an upload must carry the header")
	}
	if err := validateName("name", h.GetName()); err != nil {
		return nil, err
	}
	limit := s.f.cfg.MaxUploadBytes
	if h.GetSize() < 0 || h.GetSize() > limit {
		return nil, errs.Invalid("size", "archive size %d is outside 0-%d bytes", h.GetSize(), limit)
	}
	create := h.GetCreate() || h.GetConfig() != nil
	if create {
		// Validate the configuration before reading the archive.
		if _, err := normalizeConfig(h.GetConfig()); err != nil {
			return nil, err
		}
	}
	buf := make([]byte, 0, min(h.GetSize(), 16<<20))
	for stream.Receive() {
		msg := stream.Msg()
		if msg.GetHeader() != nil {
			return nil, errs.Invalid("header", "an upload carries exactly one header, in its first message")
		}
		chunk := msg.GetChunk()
		if int64(len(buf))+int64(len(chunk)) > limit {
			return nil, errs.Invalid("zip_file", "archive is over the %d-byte upload limit", limit)
		}
		buf = append(buf, chunk...)
	}
	if err := stream.Err(); err != nil {
		return nil, err
	}
	if h.GetSize() > 0 && int64(len(buf)) != h.GetSize() {
		return nil, errs.Invalid("size", "received %d bytes, the header announced %d", len(buf), h.GetSize())
	}
	var (
		fn  *skiffv1.Function
		err error
	)
	if create {
		fn, err = s.f.createFunction(ctx, h.GetName(), h.GetConfig(), buf)
	} else {
		fn, err = s.f.updateCode(ctx, h.GetName(), buf, 0)
	}
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.UploadFunctionResponse{Function: fn}), nil
}

func (s *functionService) GetFunction(ctx context.Context, req *connect.Request[skiffv1.GetFunctionRequest]) (*connect.Response[skiffv1.GetFunctionResponse], error) {
	if err := validateName("name", req.Msg.GetName()); err != nil {
		return nil, err
	}
	fn, err := s.f.st.GetFunction(ctx, req.Msg.GetName())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.GetFunctionResponse{Function: cloneFn(fn)}), nil
}

func (s *functionService) ListFunctions(ctx context.Context, req *connect.Request[skiffv1.ListFunctionsRequest]) (*connect.Response[skiffv1.ListFunctionsResponse], error) {
	size := int(req.Msg.GetPageSize())
	if size == 0 {
		size = defaultPageSize
	}
	if size < 1 || size > maxPageSize {
		return nil, errs.Invalid("page_size", "page_size %d is outside 1-%d", size, maxPageSize)
	}
	after, err := decodePageToken(req.Msg.GetPageToken())
	if err != nil {
		return nil, err
	}
	fns, next, err := s.f.st.ListFunctions(ctx, after, size)
	if err != nil {
		return nil, err
	}
	out := &skiffv1.ListFunctionsResponse{Functions: make([]*skiffv1.Function, 0, len(fns))}
	for _, fn := range fns {
		out.Functions = append(out.Functions, cloneFn(fn))
	}
	if next != "" {
		out.NextPageToken = base64.RawURLEncoding.EncodeToString([]byte(pageTokenPrefix + next))
	}
	return connect.NewResponse(out), nil
}

func decodePageToken(tok string) (string, error) {
	if tok == "" {
		return "", nil
	}
	b, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil || !strings.HasPrefix(string(b), pageTokenPrefix) {
		return "", errs.Invalid("page_token", "page_token is malformed: pass next_page_token from the previous page")
	}
	after := strings.TrimPrefix(string(b), pageTokenPrefix)
	if validateName("page_token", after) != nil {
		return "", errs.Invalid("page_token", "page_token is malformed: pass next_page_token from the previous page")
	}
	return after, nil
}

func (s *functionService) UpdateFunctionCode(ctx context.Context, req *connect.Request[skiffv1.UpdateFunctionCodeRequest]) (*connect.Response[skiffv1.UpdateFunctionCodeResponse], error) {
	fn, err := s.f.updateCode(ctx, req.Msg.GetName(), req.Msg.GetZipFile(), req.Msg.GetRevisionId())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.UpdateFunctionCodeResponse{Function: fn}), nil
}

func (s *functionService) UpdateFunctionConfiguration(ctx context.Context, req *connect.Request[skiffv1.UpdateFunctionConfigurationRequest]) (*connect.Response[skiffv1.UpdateFunctionConfigurationResponse], error) {
	m := req.Msg
	if err := validateName("name", m.GetName()); err != nil {
		return nil, err
	}
	cur, err := s.f.st.GetFunction(ctx, m.GetName())
	if err != nil {
		return nil, err
	}
	if err := checkRevision(cur, m.GetRevisionId()); err != nil {
		return nil, err
	}
	cfg, err := mergeConfig(cur.GetConfig(), m.GetConfig(), m.GetUpdateMask())
	if err != nil {
		return nil, err
	}
	next := cloneFn(cur)
	next.Config = cfg
	next.LastModified = s.f.timestamp()
	if m.GetRevisionId() != 0 {
		next.Revision = m.GetRevisionId()
	}
	out, err := s.f.st.UpdateFunction(ctx, next)
	if err != nil {
		return nil, err
	}
	s.f.retire(ctx, out)
	return connect.NewResponse(&skiffv1.UpdateFunctionConfigurationResponse{Function: cloneFn(out)}), nil
}

func (s *functionService) DeleteFunction(ctx context.Context, req *connect.Request[skiffv1.DeleteFunctionRequest]) (*connect.Response[skiffv1.DeleteFunctionResponse], error) {
	name := req.Msg.GetName()
	if err := validateName("name", name); err != nil {
		return nil, err
	}
	if err := s.f.st.DeleteFunction(ctx, name); err != nil {
		return nil, err
	}
	s.f.deleteEventConfig(ctx, name)
	// A deleted reservation returns to the unreserved pool.
	s.f.adm.invalidate()
	if st, ok := s.f.fns.Load(name); ok {
		st.(*fnState).spec.Store(nil)
	}
	if err := s.f.rt.Retire(ctx, name, ""); err != nil {
		s.f.log.Warn("retiring sandboxes of a deleted function", "function", name, "err", err)
	}
	return connect.NewResponse(&skiffv1.DeleteFunctionResponse{}), nil
}

func (s *functionService) PutFunctionConcurrency(ctx context.Context, req *connect.Request[skiffv1.PutFunctionConcurrencyRequest]) (*connect.Response[skiffv1.PutFunctionConcurrencyResponse], error) {
	name, n := req.Msg.GetName(), req.Msg.GetReservedConcurrentExecutions()
	if err := validateName("name", name); err != nil {
		return nil, err
	}
	account := s.f.cfg.AccountConcurrency
	if n < 0 || int(n) > account {
		return nil, errs.Invalid("reserved_concurrent_executions", "reserved_concurrent_executions %d is outside 0-%d", n, account)
	}
	if err := s.f.setReserved(ctx, name, &n); err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.PutFunctionConcurrencyResponse{ReservedConcurrentExecutions: n}), nil
}

func (s *functionService) DeleteFunctionConcurrency(ctx context.Context, req *connect.Request[skiffv1.DeleteFunctionConcurrencyRequest]) (*connect.Response[skiffv1.DeleteFunctionConcurrencyResponse], error) {
	if err := validateName("name", req.Msg.GetName()); err != nil {
		return nil, err
	}
	if err := s.f.setReserved(ctx, req.Msg.GetName(), nil); err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.DeleteFunctionConcurrencyResponse{}), nil
}

// setReserved sets (n != nil) or clears a function's reserved concurrency,
// keeping the unreserved pool at or above its floor. Changes are serialized
// so two reservations cannot both pass the floor check.
func (f *Frontend) setReserved(ctx context.Context, name string, n *int32) error {
	f.concMu.Lock()
	defer f.concMu.Unlock()
	cur, err := f.st.GetFunction(ctx, name)
	if err != nil {
		return err
	}
	if n != nil {
		sum, err := f.st.SumReserved(ctx)
		if err != nil {
			return err
		}
		old := int64(cur.GetReservedConcurrency())
		total := sum - old + int64(*n)
		if left := int64(f.cfg.AccountConcurrency) - total; left < int64(f.cfg.UnreservedMin) {
			return errs.Invalid("reserved_concurrent_executions",
				"reserving %d for function %s would leave %d of the account's %d concurrent executions unreserved (%d reserved in total); at least %d must stay unreserved",
				*n, name, left, f.cfg.AccountConcurrency, total, f.cfg.UnreservedMin)
		}
	} else if cur.ReservedConcurrency == nil {
		return nil
	}
	next := cloneFn(cur)
	next.ReservedConcurrency = n
	next.LastModified = f.timestamp()
	if _, err := f.st.UpdateFunction(ctx, next); err != nil {
		return err
	}
	f.adm.invalidate()
	return nil
}

// createFunction validates and stores a new function: code first, then the
// metadata.
func (f *Frontend) createFunction(ctx context.Context, name string, cfg *skiffv1.FunctionConfig, zip []byte) (*skiffv1.Function, error) {
	if err := validateName("name", name); err != nil {
		return nil, err
	}
	cfg, err := normalizeConfig(cfg)
	if err != nil {
		return nil, err
	}
	if err := f.validateCode(zip); err != nil {
		return nil, err
	}
	if _, err := f.st.GetFunction(ctx, name); err == nil {
		return nil, errs.New(errs.KindAlreadyExists, "function %s already exists", name)
	} else if !errs.IsNotFound(err) {
		return nil, err
	}
	sum, err := f.st.PutCode(ctx, zip)
	if err != nil {
		return nil, err
	}
	fn := &skiffv1.Function{
		Name:         name,
		Arn:          f.arn(name),
		Config:       cfg,
		CodeSha256:   sum,
		CodeSize:     int64(len(zip)),
		Version:      latest,
		LastModified: f.timestamp(),
	}
	out, err := f.st.CreateFunction(ctx, fn)
	if err != nil {
		return nil, err
	}
	return cloneFn(out), nil
}

// updateCode replaces a function's code (expectRev != 0: only at that
// revision) and retires the sandboxes running the old code.
func (f *Frontend) updateCode(ctx context.Context, name string, zip []byte, expectRev uint64) (*skiffv1.Function, error) {
	if err := validateName("name", name); err != nil {
		return nil, err
	}
	if err := f.validateCode(zip); err != nil {
		return nil, err
	}
	cur, err := f.st.GetFunction(ctx, name)
	if err != nil {
		return nil, err
	}
	if err := checkRevision(cur, expectRev); err != nil {
		return nil, err
	}
	sum, err := f.st.PutCode(ctx, zip)
	if err != nil {
		return nil, err
	}
	next := cloneFn(cur)
	next.CodeSha256 = sum
	next.CodeSize = int64(len(zip))
	next.LastModified = f.timestamp()
	if expectRev != 0 {
		next.Revision = expectRev
	}
	out, err := f.st.UpdateFunction(ctx, next)
	if err != nil {
		return nil, err
	}
	f.retire(ctx, out)
	return cloneFn(out), nil
}

// validateCode checks an archive. Every accepted runtime is a custom
// runtime, so the archive needs an executable bootstrap.
func (f *Frontend) validateCode(zip []byte) error {
	if len(zip) == 0 {
		return errs.Invalid("zip_file", "zip_file is required: the function's code as a zip archive")
	}
	if f.cfg.ValidateCode == nil {
		return nil
	}
	hasBootstrap, err := f.cfg.ValidateCode(zip)
	if err != nil {
		var e *errs.Error
		if errors.As(err, &e) && e.Kind == errs.KindInvalidArgument && e.Field != "" {
			return err
		}
		return errs.Invalid("zip_file", "invalid code archive: %w", err)
	}
	if !hasBootstrap {
		return errs.Invalid("zip_file", bootstrapNeeded)
	}
	return nil
}

// checkRevision fails with a conflict when the caller expects a revision
// the function is no longer at.
func checkRevision(cur *skiffv1.Function, expect uint64) error {
	if expect != 0 && cur.GetRevision() != expect {
		return errs.Conflict("function %s is at revision %d, not %d: it was changed concurrently", cur.GetName(), cur.GetRevision(), expect)
	}
	return nil
}

// retire asks the router to stop the function's sandboxes that run an
// older code or configuration. The change is already stored, so a failure
// is logged, not returned: the router never reuses a sandbox of another
// config key.
func (f *Frontend) retire(ctx context.Context, fn *skiffv1.Function) {
	key := configKey(fn)
	if err := f.rt.Retire(ctx, fn.GetName(), key); err != nil {
		f.log.Warn("retiring old sandboxes", "function", fn.GetName(), "err", err)
	}
}

func (f *Frontend) timestamp() string { return f.now().UTC().Format(time.RFC3339Nano) }

// configKey identifies a function's code and configuration: hex sha256 over
// the name, the code digest and the deterministic encoding of the config.
func configKey(fn *skiffv1.Function) string {
	cfg, err := proto.MarshalOptions{Deterministic: true}.Marshal(fn.GetConfig())
	if err != nil {
		// A FunctionConfig always marshals; keep the key unique anyway.
		cfg = []byte(fn.GetLastModified())
	}
	h := sha256.New()
	h.Write([]byte(fn.GetName()))
	h.Write([]byte{0})
	h.Write([]byte(fn.GetCodeSha256()))
	h.Write([]byte{0})
	h.Write(cfg)
	return hex.EncodeToString(h.Sum(nil))
}

func cloneFn(fn *skiffv1.Function) *skiffv1.Function {
	return proto.Clone(fn).(*skiffv1.Function)
}
