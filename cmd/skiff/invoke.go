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
		payload, qualifier string
		logTail, dryRun    bool
	)
	c := &cobra.Command{
		Use:   "invoke NAME",
		Short: "Invoke a function and print its response",
		Long: lines(
			"Invoke a function synchronously and print the response payload on stdout.",
			"",
			"The payload is --payload's JSON, the content of a file with --payload @FILE,",
			"or standard input with --payload -; without --payload it is {}.",
			"When the function fails, its error payload is printed on stdout and skiff",
			"exits with status 1."),
		Example: lines(
			`  skiff invoke hello --payload '{"name":"skiff"}'`,
			"  skiff invoke hello --payload @event.json --log-tail",
			"  echo '{}' | skiff invoke hello --payload -"),
		Args: checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
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
			if dryRun {
				req.InvocationType = skiffv1.InvocationType_INVOCATION_TYPE_DRY_RUN
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
	return c
}

// readPayload resolves --payload: literal JSON, @file, - for stdin, or {}
// when absent.
func (a *app) readPayload(p string) ([]byte, error) {
	switch {
	case p == "":
		return []byte("{}"), nil
	case p == "-":
		b, err := io.ReadAll(a.stdin)
		if err != nil {
			return nil, fmt.Errorf("reading the payload from stdin: %w", err)
		}
		return b, nil
	case strings.HasPrefix(p, "@"):
		b, err := os.ReadFile(p[1:])
		if err != nil {
			return nil, fmt.Errorf("reading the payload: %w", err)
		}
		return b, nil
	}
	return []byte(p), nil
}

// writeLogTail prints the base64 log tail decoded on stderr.
func (a *app) writeLogTail(enc string) {
	b, err := base64.StdEncoding.DecodeString(enc)
	if err != nil {
		b = []byte(enc) // not base64: show it as it came
	}
	_ = writeLine(a.stderr, b)
}
