package main

import (
	"context"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
)

func (a *app) logsCmd() *cobra.Command {
	var (
		follow bool
		n      int32
	)
	c := &cobra.Command{
		Use:   "logs NAME",
		Short: "Print a function's logs",
		Example: lines(
			"  skiff logs hello --lines 20",
			"  skiff logs hello -f"),
		Args: checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			if n < 0 {
				return usagef(c, "--lines must not be negative")
			}
			cl, err := a.dial()
			if err != nil {
				return err
			}
			ctx := c.Context()
			err = a.tailLogs(ctx, cl, &skiffv1.TailLogsRequest{FunctionName: args[0], Lines: n, Follow: follow})
			// Following ends when the user interrupts: that is success.
			if err != nil && follow && ctx.Err() != nil {
				return nil
			}
			return err
		},
	}
	c.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new lines as they arrive")
	c.Flags().Int32VarP(&n, "lines", "n", 50, "number of recent lines to print first")
	return c
}

func (a *app) tailLogs(ctx context.Context, cl *clients, req *skiffv1.TailLogsRequest) error {
	stream, err := cl.logs.TailLogs(ctx, connect.NewRequest(req))
	if err != nil {
		return err
	}
	defer stream.Close()
	for stream.Receive() {
		if err := writeLine(a.stdout, []byte(stream.Msg().GetText())); err != nil {
			return err
		}
	}
	return stream.Err()
}
