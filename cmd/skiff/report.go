package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"

	"skiff.dev/skiff/internal/errs"
)

// Exit codes.
const (
	exitOK          = 0
	exitError       = 1
	exitUsage       = 2
	exitInterrupted = 130
)

// functionError is a function that ran and failed; its error payload has
// already been printed on stdout.
type functionError struct{ kind string }

func (e *functionError) Error() string { return "function error: " + e.kind }

// hintError adds advice to an error, printed on its own line.
type hintError struct {
	err  error
	hint string
}

func (e *hintError) Error() string { return e.err.Error() }
func (e *hintError) Unwrap() error { return e.err }

// withHint adds advice for the errors users most often meet: no server at
// the endpoint, and no or a wrong API key.
func withHint(err error, endpoint string) error {
	var ce *connect.Error
	if !errors.As(err, &ce) || ce.Meta().Get(errs.HeaderReason) != "" {
		return err
	}
	switch ce.Code() {
	case connect.CodeUnavailable:
		return &hintError{err, fmt.Sprintf("is a skiff gateway running at %s? start one with 'skiff dev'", endpoint)}
	case connect.CodeUnauthenticated:
		return &hintError{err, "pass a key with --api-key or " + envAPIKey}
	}
	return err
}

// report prints err on stderr as "skiff: <message>" with the stable reason,
// field and retry hint when the server sent them, and returns the exit code:
// 0 for no error, 2 for usage errors, 130 when interrupted, 1 otherwise.
func report(ctx context.Context, stderr io.Writer, err error) int {
	if err == nil {
		return exitOK
	}
	var ue *usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(stderr, "skiff: %v\nRun '%s --help' for usage.\n", ue.err, ue.path)
		return exitUsage
	}
	if ctx.Err() != nil && (errors.Is(err, context.Canceled) || connect.CodeOf(err) == connect.CodeCanceled) {
		fmt.Fprintln(stderr, "skiff: interrupted")
		return exitInterrupted
	}
	fmt.Fprintf(stderr, "skiff: %s\n", describe(err))
	var he *hintError
	if errors.As(err, &he) {
		fmt.Fprintf(stderr, "hint: %s\n", he.hint)
	}
	return exitError
}

// describe renders an error, unpacking the metadata of RPC errors.
func describe(err error) string {
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return err.Error()
	}
	msg := ce.Message()
	if msg == "" {
		msg = ce.Code().String()
	}
	var details []string
	reason, field := ce.Meta().Get(errs.HeaderReason), ce.Meta().Get(errs.HeaderField)
	if reason != "" {
		details = append(details, "reason: "+reason)
	} else {
		details = append(details, "code: "+ce.Code().String())
	}
	if field != "" {
		details = append(details, "field: "+field)
	}
	if ms, perr := strconv.ParseInt(ce.Meta().Get(errs.HeaderRetryAfter), 10, 64); perr == nil && ms > 0 {
		details = append(details, "retry after "+(time.Duration(ms)*time.Millisecond).String())
	}
	return fmt.Sprintf("%s (%s)", msg, strings.Join(details, ", "))
}
