package main

import (
	"encoding/base64"
	"fmt"
	"io"
	"os"
	"strings"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
)

func (a *app) invokeCmd() *cobra.Command {
	var (
		payload, qualifier     string
		logTail, dryRun, async bool
	)
	c := &cobra.Command{
		Use:   "invoke NAME",
		Short: "Invoke a function and print its response",
		Long: lines(
			"Invoke a function synchronously and print the response payload on stdout.",
			"",
			"With --async the event is queued durably and only its request id is printed:",
			"the gateway runs the function later, retrying it and sending the outcome to",
			"the destinations of the function's event invoke config (skiff fn event-config).",
			"",
			"The payload is --payload's JSON, the content of a file with --payload @FILE,",
			"or standard input with --payload -; without --payload it is {}.",
			"When the function fails, its error payload is printed on stdout and skiff",
			"exits with status 1."),
		Example: lines(
			`  skiff invoke hello --payload '{"name":"skiff"}'`,
			"  skiff invoke hello --payload @event.json --log-tail",
			"  echo '{}' | skiff invoke hello --payload -",
			`  skiff invoke resize --async --payload '{"key":"cat.jpg"}'`),
		Args: checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			if async && (dryRun || logTail) {
				return usagef(c, "--async cannot be used with --dry-run or --log-tail")
			}
			body, err := a.readPayload(payload)
			if err != nil {
				return err
			}
			req := &skiffv1.InvokeRequest{
				FunctionName:   args[0],
				Qualifier:      qualifier,
				Payload:        body,
				InvocationType: skiffv1.InvocationType_INVOCATION_TYPE_REQUEST_RESPONSE,
				LogType:        skiffv1.LogType_LOG_TYPE_NONE,
			}
			switch {
			case dryRun:
				req.InvocationType = skiffv1.InvocationType_INVOCATION_TYPE_DRY_RUN
			case async:
				req.InvocationType = skiffv1.InvocationType_INVOCATION_TYPE_EVENT
			}
			if logTail {
				req.LogType = skiffv1.LogType_LOG_TYPE_TAIL
			}
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.invoke.Invoke(c.Context(), connect.NewRequest(req))
			if err != nil {
				return err
			}
			out := resp.Msg
			if async {
				return a.writeAccepted(out)
			}
			if logTail && out.GetLogResult() != "" {
				a.writeLogTail(out.GetLogResult())
			}
			if err := writeLine(a.stdout, out.GetPayload()); err != nil {
				return err
			}
			if out.GetFunctionError() != "" {
				return &functionError{kind: out.GetFunctionError()}
			}
			return nil
		},
	}
	fl := c.Flags()
	fl.StringVar(&payload, "payload", "", "JSON payload, @FILE to read it from a file, or - for stdin")
	fl.StringVar(&qualifier, "qualifier", "", "version or alias to invoke (default $LATEST)")
	fl.BoolVar(&logTail, "log-tail", false, "print the last 4 KB of the invocation's log on stderr")
	fl.BoolVar(&dryRun, "dry-run", false, "check the request and permissions without running the function")
	fl.BoolVar(&async, "async", false, "queue the event durably (invocation type Event) and print its request id")
	return c
}

// writeAccepted prints the outcome of an asynchronous invoke: the request id
// alone on a line (for scripts), or the whole response as JSON.
func (a *app) writeAccepted(out *skiffv1.InvokeResponse) error {
	if a.json() {
		return writeJSON(a.stdout, out)
	}
	if out.GetRequestId() == "" {
		return fmt.Errorf("the gateway accepted the event (status %d) but sent no request id", out.GetStatusCode())
	}
	_, err := fmt.Fprintln(a.stdout, out.GetRequestId())
	return err
}

// readPayload resolves --payload: literal JSON, @file, - for stdin, or {}
// when absent.
func (a *app) readPayload(p string) ([]byte, error) {
	if p == "" {
		return []byte("{}"), nil
	}
	return a.readArg(p, "the payload")
}

// readArg resolves an argument that may name its content elsewhere: - reads
// stdin, @FILE reads FILE, anything else is the content itself. what names
// the content in errors.
func (a *app) readArg(arg, what string) ([]byte, error) {
	switch {
	case arg == "-":
		b, err := io.ReadAll(a.stdin)
		if err != nil {
			return nil, fmt.Errorf("reading %s from stdin: %w", what, err)
		}
		return b, nil
	case strings.HasPrefix(arg, "@"):
		b, err := os.ReadFile(arg[1:])
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", what, err)
		}
		return b, nil
	}
	return []byte(arg), nil
}

// writeLogTail prints the base64 log tail decoded on stderr.
func (a *app) writeLogTail(enc string) {
	b, err := base64.StdEncoding.DecodeString(enc)
	if err != nil {
		b = []byte(enc) // not base64: show it as it came
	}
	_ = writeLine(a.stderr, b)
}
