package runtimeapi

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"
	"time"
)

// FuzzHandlers sends one arbitrary request to a server whose runtime holds
// an invocation (id "fuzz-id"): it must never panic or hang, must answer
// with a Runtime API status, and an accepted post must complete Invoke with
// exactly what was posted.
func FuzzHandlers(f *testing.F) {
	seeds := []struct {
		method, path, errType string
		known                 bool
		body                  []byte
	}{
		{"GET", "/2018-06-01/runtime/invocation/next", "", true, nil},
		{"POST", "/2018-06-01/runtime/invocation/fuzz-id/response", "", true, []byte(`{"ok":true}`)},
		{"POST", "/2018-06-01/runtime/invocation/fuzz-id/response", "", false, []byte(`chunked`)},
		{"POST", "/2018-06-01/runtime/invocation/fuzz-id/response", "", true, bytes.Repeat([]byte("x"), 70)},
		{"POST", "/2018-06-01/runtime/invocation/fuzz-id/error", "Runtime.ExitError", true, []byte(`{"errorType":"x"}`)},
		{"POST", "/2018-06-01/runtime/invocation/fuzz-id/error", "", false, []byte(`{"errorType":`)},
		{"POST", "/2018-06-01/runtime/invocation/other/response", "", true, nil},
		{"POST", "/2018-06-01/runtime/init/error", "T", true, []byte("x")},
		{"PUT", "/2018-06-01/runtime/invocation//error", "", true, nil},
		{"GET", "/2018-06-01/runtime/invocation/fuzz-id/", "", true, nil},
		{"GET", "/", "", true, nil},
		{"", "", "", false, nil},
	}
	for _, s := range seeds {
		f.Add(s.method, s.path, s.errType, s.known, s.body)
	}
	const limit = 64
	f.Fuzz(func(t *testing.T, method, path, errType string, known bool, body []byte) {
		s := NewServer(Config{MaxResponseBytes: limit})
		defer s.Close()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		out := make(chan invokeOutcome, 1)
		go func() {
			res, err := s.Invoke(ctx, Invocation{RequestID: "fuzz-id", Deadline: time.Now().Add(time.Minute)})
			out <- invokeOutcome{res, err}
		}()
		// The runtime takes the invocation.
		if rec := serve(t, s, &http.Request{Method: "GET", URL: &url.URL{Path: prefix + "invocation/next"}}); rec.Code != http.StatusOK {
			t.Fatalf("GET next: got %d", rec.Code)
		}

		req := &http.Request{
			Method: method, URL: &url.URL{Path: path}, Header: http.Header{},
			Body: io.NopCloser(bytes.NewReader(body)), ContentLength: -1,
		}
		if known {
			req.ContentLength = int64(len(body))
		}
		if errType != "" {
			req.Header.Set(hdrErrorType, errType)
		}
		rec := serve(t, s, req)
		switch rec.Code {
		case 200, 202, 400, 403, 404, 405, 413:
		default:
			t.Fatalf("%s %q: unexpected status %d", method, path, rec.Code)
		}
		if rec.Code != http.StatusAccepted && rec.Code != http.StatusRequestEntityTooLarge {
			return
		}
		if rec.Code == http.StatusRequestEntityTooLarge && path == prefix+"invocation/fuzz-id/error" {
			return // error bodies over 1 MiB: the invocation goes on
		}
		var o invokeOutcome
		select {
		case o = <-out:
		case <-time.After(5 * time.Second):
			t.Fatalf("%s %q answered %d but Invoke did not return", method, path, rec.Code)
		}
		switch {
		case rec.Code == http.StatusRequestEntityTooLarge:
			if o.res.ErrorType != ErrorTypeResponseTooLarge || len(body) <= limit {
				t.Fatalf("413 for %d bytes gave %+v", len(body), o.res)
			}
		case path == prefix+"invocation/fuzz-id/response":
			if o.res.Failed || !bytes.Equal(o.res.Payload, body) {
				t.Fatalf("response %q gave %+v", body, o.res)
			}
		case path == prefix+"invocation/fuzz-id/error":
			if !o.res.Failed || !bytes.Equal(o.res.Payload, body) || o.res.ErrorType == "" {
				t.Fatalf("error %q gave %+v", body, o.res)
			}
		default:
			t.Fatalf("%s %q accepted", method, path)
		}
	})
}

// serve runs one request through the handler and fails if it hangs.
func serve(t *testing.T, s *Server, req *http.Request) *httptest.ResponseRecorder {
	t.Helper()
	if req.Header == nil {
		req.Header = http.Header{}
	}
	if req.Body == nil {
		req.Body = http.NoBody
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req = req.WithContext(ctx)
	rec := httptest.NewRecorder()
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.ServeHTTP(rec, req)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatalf("%s %q hung", req.Method, req.URL.Path)
	}
	return rec
}
