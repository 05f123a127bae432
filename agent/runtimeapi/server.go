// Package runtimeapi serves the AWS Lambda Runtime API (2018-06-01) to one
// sandbox: the runtime inside the sandbox long-polls
// GET /2018-06-01/runtime/invocation/next for work and posts the outcome to
// /invocation/{id}/response or /invocation/{id}/error (or, when its
// initialisation fails, to /init/error). The agent drives the other side
// with WaitInit and Invoke.
//
// One Server serves one sandbox and runs one invocation at a time. The warm
// invoke path is a hand-off between the caller of Invoke and the parked /next
// handler over channels: no goroutine per invoke, no JSON, and no
// allocation beyond net/http's own and the response body.
package runtimeapi

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"skiff.dev/skiff/internal/errs"
)

// Limits and names of the Runtime API.
const (
	// DefaultMaxResponseBytes is Lambda's 6 MB synchronous response limit,
	// exactly as Lambda enforces it (6 MiB plus 100 bytes).
	DefaultMaxResponseBytes = 6<<20 + 100
	// MaxErrorBytes bounds the bodies of /error and /init/error posts.
	MaxErrorBytes = 1 << 20

	// ErrorTypeUnhandled is the error type of a runtime-reported error that
	// names none.
	ErrorTypeUnhandled = "Unhandled"
	// ErrorTypeResponseTooLarge is the error type of a response over the
	// limit.
	ErrorTypeResponseTooLarge = "Function.ResponseSizeTooLarge"

	prefix = "/2018-06-01/runtime/"

	hdrRequestID       = "Lambda-Runtime-Aws-Request-Id"
	hdrDeadline        = "Lambda-Runtime-Deadline-Ms"
	hdrFunctionARN     = "Lambda-Runtime-Invoked-Function-Arn"
	hdrTraceID         = "Lambda-Runtime-Trace-Id"
	hdrClientContext   = "Lambda-Runtime-Client-Context"
	hdrCognitoIdentity = "Lambda-Runtime-Cognito-Identity"
	hdrErrorType       = "Lambda-Runtime-Function-Error-Type"
	hdrErrorBody       = "Lambda-Runtime-Function-Error-Body" // a trailer, base64

	bodyAccepted       = `{"status":"OK"}`
	bodyInvalidID      = `{"errorMessage":"Invalid request ID","errorType":"InvalidRequestID"}`
	bodyNotFound       = `{"errorMessage":"Not found","errorType":"NotFound"}`
	bodyMethod         = `{"errorMessage":"Method not allowed","errorType":"MethodNotAllowed"}`
	bodyBusy           = `{"errorMessage":"State transition to RuntimeReady is not allowed: an invocation is in progress","errorType":"InvalidStateTransition"}`
	bodyPolling        = `{"errorMessage":"State transition to RuntimeReady is not allowed: another request is already waiting for the next invocation","errorType":"InvalidStateTransition"}`
	bodyInitDone       = `{"errorMessage":"State transition to InitError is not allowed: the runtime has already initialised or failed","errorType":"InvalidStateTransition"}`
	bodyAfterInitError = `{"errorMessage":"State transition to RuntimeReady is not allowed: the runtime reported an init error","errorType":"InvalidStateTransition"}`
	bodyBadBody        = `{"errorMessage":"Reading the request body failed","errorType":"InvalidRequestBody"}`
)

var (
	// ErrClosed is returned by Invoke and WaitInit once Close was called.
	ErrClosed = errors.New("runtime api server closed")
	// ErrNotDelivered wraps the error of an Invoke that ended before the
	// runtime took the invocation with GET /next: the function never saw
	// it, so the caller may safely run it elsewhere.
	ErrNotDelivered = errors.New("invocation not delivered to the runtime")
	// ErrBusy is returned by Invoke when another invocation is running.
	ErrBusy = errs.New(errs.KindFailedPrecondition, "runtime api: an invocation is already in progress")
	// ErrResponseTooLarge is returned by Invoke, together with the Result
	// Lambda gives the caller (Failed, ErrorType
	// Function.ResponseSizeTooLarge), when the runtime posts a response over
	// Config.MaxResponseBytes. The sandbox stays usable.
	ErrResponseTooLarge = errors.New("function response exceeded the maximum response size")
)

// Invocation is one request handed to the runtime.
type Invocation struct {
	RequestID, FunctionARN, TraceID, ClientContext, CognitoIdentity string
	Deadline                                                        time.Time
	// Payload is the event. It must not be modified until Invoke returns,
	// nor after an abandoned Invoke while the runtime may still read it.
	Payload []byte
}

// Result is the runtime's answer to an invocation.
type Result struct {
	Payload   []byte // the response body, or the error body posted by the runtime
	ErrorType string // set when Failed: the Lambda-Runtime-Function-Error-Type header, or errorType from the body, default "Unhandled"
	Failed    bool   // true when the runtime posted /error (or the response failed)
}

// InitError is the runtime's report of a failed initialisation
// (POST /runtime/init/error).
type InitError struct {
	Type    string
	Payload []byte
}

func (e *InitError) Error() string {
	var body struct {
		Message string `json:"errorMessage"`
	}
	if json.Unmarshal(e.Payload, &body) == nil && body.Message != "" {
		return fmt.Sprintf("runtime init error %s: %s", e.Type, body.Message)
	}
	return "runtime init error " + e.Type
}

// Config configures a Server.
type Config struct {
	// MaxResponseBytes bounds the response body (default
	// DefaultMaxResponseBytes).
	MaxResponseBytes int64
	Logger           *slog.Logger
}

type state uint8

const (
	stateIdle    state = iota // no invocation
	stateQueued               // Invoke waits for the runtime's /next
	stateRunning              // the runtime has the invocation
)

// Server is the Runtime API of one sandbox. It implements http.Handler; Serve
// serves it on a listener.
type Server struct {
	log      *slog.Logger
	maxResp  int64
	srv      *http.Server
	ctJSON   []string // shared, read-only header value
	tooLarge string   // the 413 body

	handoff   chan uint64   // Invoke → /next: the sequence number of the queued invocation
	results   chan Result   // /response, /error → Invoke; capacity 1
	initDone  chan struct{} // closed at the first /next or at /init/error
	done      chan struct{} // closed by Close
	closeOnce sync.Once

	mu       sync.Mutex
	inv      Invocation // guarded by mu: the current invocation
	seq      uint64     // guarded by mu: numbers invocations
	state    state      // guarded by mu
	invoking bool       // guarded by mu: an Invoke call is in progress
	polling  bool       // guarded by mu: a /next request is parked
	started  bool       // guarded by mu: initDone is closed
	initErr  *InitError // guarded by mu
}

var _ http.Handler = (*Server)(nil)

// NewServer makes a Server.
func NewServer(cfg Config) *Server {
	if cfg.MaxResponseBytes <= 0 {
		cfg.MaxResponseBytes = DefaultMaxResponseBytes
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		log:      cfg.Logger,
		maxResp:  cfg.MaxResponseBytes,
		ctJSON:   []string{"application/json"},
		tooLarge: fmt.Sprintf(`{"errorMessage":"Exceeded maximum allowed payload size (%d bytes).","errorType":"RequestEntityTooLarge"}`, cfg.MaxResponseBytes),
		handoff:  make(chan uint64),
		results:  make(chan Result, 1),
		initDone: make(chan struct{}),
		done:     make(chan struct{}),
	}
	s.srv = &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 30 * time.Second,
		// aws-lambda-go sends an X-Ray error cause header of up to 1 MiB
		// with /error.
		MaxHeaderBytes: MaxErrorBytes + 64<<10,
		ErrorLog:       slog.NewLogLogger(cfg.Logger.Handler(), slog.LevelDebug),
	}
	return s
}

// Serve serves the Runtime API on l until Close is called; it then returns
// nil.
func (s *Server) Serve(l net.Listener) error {
	err := s.srv.Serve(l)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// Close stops the server: it closes the listener and all connections, and
// makes pending and future Invoke and WaitInit calls return ErrClosed.
func (s *Server) Close() error {
	var err error
	s.closeOnce.Do(func() {
		close(s.done)
		err = s.srv.Close()
	})
	return err
}

// WaitInit blocks until the runtime has initialised, which it signals by its
// first GET /next, and returns nil; or returns the *InitError the runtime
// posted to /init/error; or ctx's error; or ErrClosed.
func (s *Server) WaitInit(ctx context.Context) error {
	select {
	case <-s.initDone:
	case <-ctx.Done():
		return ctx.Err()
	case <-s.done:
		return ErrClosed
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.initErr != nil {
		return s.initErr
	}
	return nil
}

// Invoke hands inv to the runtime's pending (or next) GET /next and waits for
// its /response or /error. When ctx ends first, Invoke returns ctx's error
// and the invocation is abandoned: a late answer for it is refused as a
// stale request id. A response over the limit gives the Result Lambda gives
// (Failed, Function.ResponseSizeTooLarge) and ErrResponseTooLarge.
// Invocations are not queued: a concurrent Invoke fails with ErrBusy.
func (s *Server) Invoke(ctx context.Context, inv Invocation) (Result, error) {
	if inv.RequestID == "" || strings.IndexByte(inv.RequestID, '/') >= 0 {
		return Result{}, errs.Invalid("request_id", "invalid request id %q", inv.RequestID)
	}
	if inv.Deadline.IsZero() {
		return Result{}, errs.Invalid("deadline", "invocation %s has no deadline", inv.RequestID)
	}
	s.mu.Lock()
	if s.invoking {
		s.mu.Unlock()
		return Result{}, ErrBusy
	}
	s.invoking = true
	s.seq++
	seq := s.seq
	s.inv = inv
	s.state = stateQueued
	s.mu.Unlock()

	select {
	case s.handoff <- seq:
	case <-ctx.Done():
		return Result{}, s.abandon(fmt.Errorf("%w: %w", ErrNotDelivered, ctx.Err()))
	case <-s.done:
		return Result{}, s.abandon(fmt.Errorf("%w: %w", ErrNotDelivered, ErrClosed))
	}
	select {
	case res := <-s.results:
		return s.finish(res)
	case <-ctx.Done():
		return Result{}, s.abandon(ctx.Err())
	case <-s.done:
		return Result{}, s.abandon(ErrClosed)
	}
}

// finish ends a completed Invoke.
func (s *Server) finish(res Result) (Result, error) {
	s.mu.Lock()
	s.invoking = false
	s.mu.Unlock()
	if res.Failed && res.ErrorType == ErrorTypeResponseTooLarge {
		return res, ErrResponseTooLarge
	}
	return res, nil
}

// abandon ends an Invoke whose context ended. If the runtime's answer won the
// race, it was sent before the state went idle; drain it so the next
// invocation starts with an empty results channel.
func (s *Server) abandon(err error) error {
	s.mu.Lock()
	if s.state == stateIdle {
		select {
		case <-s.results:
		default:
		}
	}
	s.state = stateIdle
	s.inv = Invocation{}
	s.invoking = false
	s.mu.Unlock()
	return err
}

// ServeHTTP routes a Runtime API request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p := r.URL.Path
	if !strings.HasPrefix(p, prefix) {
		writeJSON(w, s.ctJSON, http.StatusNotFound, bodyNotFound)
		return
	}
	rest := p[len(prefix):]
	switch {
	case rest == "invocation/next":
		if r.Method != http.MethodGet {
			methodNotAllowed(w, s.ctJSON, http.MethodGet)
			return
		}
		s.next(w, r)
	case rest == "init/error":
		if r.Method != http.MethodPost {
			methodNotAllowed(w, s.ctJSON, http.MethodPost)
			return
		}
		s.initError(w, r)
	case strings.HasPrefix(rest, "invocation/"):
		rest = rest[len("invocation/"):]
		i := strings.IndexByte(rest, '/')
		if i <= 0 {
			writeJSON(w, s.ctJSON, http.StatusNotFound, bodyNotFound)
			return
		}
		id, action := rest[:i], rest[i+1:]
		if action != "response" && action != "error" {
			writeJSON(w, s.ctJSON, http.StatusNotFound, bodyNotFound)
			return
		}
		if r.Method != http.MethodPost {
			methodNotAllowed(w, s.ctJSON, http.MethodPost)
			return
		}
		if action == "response" {
			s.response(w, r, id)
		} else {
			s.invocationError(w, r, id)
		}
	default:
		writeJSON(w, s.ctJSON, http.StatusNotFound, bodyNotFound)
	}
}

// next is GET /invocation/next: a long poll for the next invocation.
func (s *Server) next(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	switch {
	case s.initErr != nil:
		s.mu.Unlock()
		writeJSON(w, s.ctJSON, http.StatusForbidden, bodyAfterInitError)
		return
	case s.state == stateRunning:
		s.mu.Unlock()
		writeJSON(w, s.ctJSON, http.StatusForbidden, bodyBusy)
		return
	case s.polling:
		s.mu.Unlock()
		writeJSON(w, s.ctJSON, http.StatusForbidden, bodyPolling)
		return
	}
	s.polling = true
	if !s.started {
		s.started = true
		close(s.initDone)
	}
	s.mu.Unlock()

	for {
		select {
		case seq := <-s.handoff:
			s.mu.Lock()
			if seq != s.seq || s.state != stateQueued {
				// Abandoned between the hand-off and now.
				s.mu.Unlock()
				continue
			}
			s.state = stateRunning
			s.polling = false
			inv := s.inv
			s.mu.Unlock()
			s.writeInvocation(w, &inv)
			return
		case <-r.Context().Done():
		case <-s.done:
		}
		s.mu.Lock()
		s.polling = false
		s.mu.Unlock()
		return
	}
}

func (s *Server) writeInvocation(w http.ResponseWriter, inv *Invocation) {
	// One backing array for all header values: one allocation, not eight.
	vals := [...]string{
		inv.RequestID, strconv.FormatInt(inv.Deadline.UnixMilli(), 10), strconv.Itoa(len(inv.Payload)),
		inv.FunctionARN, inv.TraceID, inv.ClientContext, inv.CognitoIdentity,
	}
	v := vals[:]
	h := w.Header()
	h[hdrRequestID] = v[0:1:1]
	h[hdrDeadline] = v[1:2:2]
	h["Content-Length"] = v[2:3:3]
	h["Content-Type"] = s.ctJSON
	for i, k := range [...]string{hdrFunctionARN, hdrTraceID, hdrClientContext, hdrCognitoIdentity} {
		if v[3+i] != "" {
			h[k] = v[3+i : 4+i : 4+i]
		}
	}
	w.WriteHeader(http.StatusOK)
	if _, err := w.Write(inv.Payload); err != nil {
		s.log.Debug("writing invocation to the runtime", "request_id", inv.RequestID, "err", err)
	}
}

// response is POST /invocation/{id}/response.
func (s *Server) response(w http.ResponseWriter, r *http.Request, id string) {
	if !s.isCurrent(id) {
		writeJSON(w, s.ctJSON, http.StatusBadRequest, bodyInvalidID)
		return
	}
	body, tooLarge, err := readBody(r.Body, r.ContentLength, s.maxResp)
	if err != nil {
		s.log.Debug("reading the runtime's response", "request_id", id, "err", err)
		writeJSON(w, s.ctJSON, http.StatusBadRequest, bodyBadBody)
		return
	}
	res := Result{Payload: body}
	status, reply := http.StatusAccepted, bodyAccepted
	if tooLarge {
		res = Result{
			Failed:    true,
			ErrorType: ErrorTypeResponseTooLarge,
			Payload: fmt.Appendf(nil, `{"errorMessage":"Response payload size exceeded maximum allowed payload size (%d bytes).","errorType":"%s"}`,
				s.maxResp, ErrorTypeResponseTooLarge),
		}
		status, reply = http.StatusRequestEntityTooLarge, s.tooLarge
	} else if et := r.Trailer.Get(hdrErrorType); et != "" {
		// A runtime that fails while streaming its response reports the
		// error in trailers (aws-lambda-go does).
		res = Result{Failed: true, ErrorType: et}
		res.Payload, _ = base64.StdEncoding.DecodeString(r.Trailer.Get(hdrErrorBody))
	}
	if !s.complete(id, res) {
		writeJSON(w, s.ctJSON, http.StatusBadRequest, bodyInvalidID)
		return
	}
	writeJSON(w, s.ctJSON, status, reply)
}

// invocationError is POST /invocation/{id}/error.
func (s *Server) invocationError(w http.ResponseWriter, r *http.Request, id string) {
	if !s.isCurrent(id) {
		writeJSON(w, s.ctJSON, http.StatusBadRequest, bodyInvalidID)
		return
	}
	body, tooLarge, err := readBody(r.Body, r.ContentLength, MaxErrorBytes)
	if err != nil {
		writeJSON(w, s.ctJSON, http.StatusBadRequest, bodyBadBody)
		return
	}
	if tooLarge {
		// The runtime may retry with a smaller body; the invocation stays.
		writeJSON(w, s.ctJSON, http.StatusRequestEntityTooLarge, tooLargeBody(MaxErrorBytes))
		return
	}
	res := Result{Failed: true, ErrorType: errorType(r.Header.Get(hdrErrorType), body), Payload: body}
	if !s.complete(id, res) {
		writeJSON(w, s.ctJSON, http.StatusBadRequest, bodyInvalidID)
		return
	}
	writeJSON(w, s.ctJSON, http.StatusAccepted, bodyAccepted)
}

// initError is POST /init/error.
func (s *Server) initError(w http.ResponseWriter, r *http.Request) {
	body, tooLarge, err := readBody(r.Body, r.ContentLength, MaxErrorBytes)
	if err != nil {
		writeJSON(w, s.ctJSON, http.StatusBadRequest, bodyBadBody)
		return
	}
	if tooLarge {
		writeJSON(w, s.ctJSON, http.StatusRequestEntityTooLarge, tooLargeBody(MaxErrorBytes))
		return
	}
	s.mu.Lock()
	if s.started {
		s.mu.Unlock()
		writeJSON(w, s.ctJSON, http.StatusForbidden, bodyInitDone)
		return
	}
	s.started = true
	s.initErr = &InitError{Type: errorType(r.Header.Get(hdrErrorType), body), Payload: body}
	close(s.initDone)
	s.mu.Unlock()
	s.log.Debug("runtime reported an init error", "type", s.initErr.Type)
	writeJSON(w, s.ctJSON, http.StatusAccepted, bodyAccepted)
}

// isCurrent reports whether id names the invocation the runtime holds.
func (s *Server) isCurrent(id string) bool {
	s.mu.Lock()
	ok := s.state == stateRunning && s.inv.RequestID == id
	s.mu.Unlock()
	return ok
}

// complete ends the running invocation id with res, if it still runs.
func (s *Server) complete(id string, res Result) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state != stateRunning || s.inv.RequestID != id {
		return false
	}
	s.state = stateIdle
	s.inv = Invocation{}
	// Never blocks: Invoke drains results before the next invocation starts.
	s.results <- res
	return true
}

// errorType picks the error type of an error post: the header, else the
// body's errorType, else "Unhandled".
func errorType(header string, body []byte) string {
	if header != "" {
		return header
	}
	var b struct {
		Type string `json:"errorType"`
	}
	if json.Unmarshal(body, &b) == nil && b.Type != "" {
		return b.Type
	}
	return ErrorTypeUnhandled
}

// readBody reads at most limit bytes of a body. It reports tooLarge, without
// reading further, for a body over the limit.
func readBody(r io.Reader, contentLength, limit int64) (body []byte, tooLarge bool, err error) {
	if contentLength > limit {
		return nil, true, nil
	}
	if contentLength >= 0 {
		body = make([]byte, contentLength)
		if _, err := io.ReadFull(r, body); err != nil {
			return nil, false, err
		}
		return body, false, nil
	}
	// Unknown length (chunked): grow, never past limit+1.
	body = make([]byte, 0, min(512, limit+1))
	for {
		if len(body) == cap(body) {
			if int64(len(body)) > limit {
				return nil, true, nil
			}
			grown := make([]byte, len(body), min(int64(2*cap(body)), limit+1))
			copy(grown, body)
			body = grown
		}
		n, err := r.Read(body[len(body):cap(body)])
		body = body[:len(body)+n]
		if int64(len(body)) > limit {
			return nil, true, nil
		}
		if err == io.EOF {
			return body, false, nil
		}
		if err != nil {
			return nil, false, err
		}
	}
}

func tooLargeBody(limit int64) string {
	return fmt.Sprintf(`{"errorMessage":"Exceeded maximum allowed payload size (%d bytes).","errorType":"RequestEntityTooLarge"}`, limit)
}

func writeJSON(w http.ResponseWriter, ct []string, status int, body string) {
	w.Header()["Content-Type"] = ct
	w.WriteHeader(status)
	_, _ = io.WriteString(w, body)
}

func methodNotAllowed(w http.ResponseWriter, ct []string, allow string) {
	w.Header().Set("Allow", allow)
	writeJSON(w, ct, http.StatusMethodNotAllowed, bodyMethod)
}
