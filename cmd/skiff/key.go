package main

import (
	"fmt"
	"strconv"
	"strings"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
)

func (a *app) keyCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "key",
		Short: "Manage API keys (admin only)",
		Args:  cobra.ArbitraryArgs,
		RunE:  groupRun,
		// A group: its usage line has no flags of its own.
		DisableFlagsInUseLine: true,
	}
	c.AddCommand(a.keyCreateCmd(), a.keyListCmd(), a.keyRevokeCmd())
	return c
}

func (a *app) keyCreateCmd() *cobra.Command {
	var (
		invoke      []string
		admin       bool
		description string
	)
	c := &cobra.Command{
		Use:   "create (--invoke FN[,FN...] | --admin)",
		Short: "Create an API key and print its secret (shown only once)",
		Example: lines(
			"  skiff key create --invoke hello,resize --description 'web frontend'",
			"  skiff key create --admin"),
		Args: checkArgs(cobra.NoArgs),
		RunE: func(c *cobra.Command, _ []string) error {
			switch {
			case admin && len(invoke) > 0:
				return usagef(c, "--admin and --invoke cannot be used together: admin keys may invoke every function")
			case !admin && len(invoke) == 0:
				return usagef(c, "one of --invoke or --admin is required")
			}
			for _, fn := range invoke {
				if fn == "" {
					return usagef(c, "--invoke has an empty function name")
				}
			}
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.keys.CreateKey(c.Context(), connect.NewRequest(&skiffv1.CreateKeyRequest{
				Description: description, Admin: admin, InvokeFunctions: invoke,
			}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			k := resp.Msg.GetKey()
			t := newTable(a.stdout)
			t.row("ID:", k.GetId())
			t.row("Secret:", resp.Msg.GetSecret())
			t.row("Permissions:", permissions(k))
			if k.GetDescription() != "" {
				t.row("Description:", k.GetDescription())
			}
			if err := t.flush(); err != nil {
				return err
			}
			fmt.Fprintln(a.stderr, "Save the secret now: it is not shown again.")
			return nil
		},
	}
	c.Flags().StringSliceVar(&invoke, "invoke", nil, "functions the key may invoke (comma-separated or repeated)")
	c.Flags().BoolVar(&admin, "admin", false, "make an admin key (every operation)")
	c.Flags().StringVar(&description, "description", "", "description")
	return c
}

func permissions(k *skiffv1.ApiKey) string {
	if k.GetAdmin() {
		return "admin"
	}
	return "invoke " + strings.Join(k.GetInvokeFunctions(), ",")
}

func (a *app) keyListCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List API keys (without their secrets)",
		Args:  checkArgs(cobra.NoArgs),
		RunE: func(c *cobra.Command, _ []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.keys.ListKeys(c.Context(), connect.NewRequest(&skiffv1.ListKeysRequest{}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			t := newTable(a.stdout)
			t.row("ID", "PERMISSIONS", "CREATED", "DESCRIPTION")
			for _, k := range resp.Msg.GetKeys() {
				t.row(k.GetId(), permissions(k), k.GetCreated(), k.GetDescription())
			}
			return t.flush()
		},
	}
}

func (a *app) keyRevokeCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "revoke ID",
		Short: "Revoke an API key",
		Args:  checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.keys.RevokeKey(c.Context(), connect.NewRequest(&skiffv1.RevokeKeyRequest{Id: args[0]}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			_, err = fmt.Fprintf(a.stdout, "revoked key %s\n", args[0])
			return err
		},
	}
}

func (a *app) concurrencyCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "concurrency",
		Short: "Reserve concurrency for a function",
		Args:  cobra.ArbitraryArgs,
		RunE:  groupRun,
		// A group: its usage line has no flags of its own.
		DisableFlagsInUseLine: true,
	}
	set := &cobra.Command{
		Use:   "set NAME N",
		Short: "Reserve N concurrent executions for a function (also its maximum)",
		Example: lines(
			"  skiff concurrency set hello 10",
			"  skiff concurrency set hello 0   # stop all invocations"),
		Args: checkArgs(cobra.ExactArgs(2)),
		RunE: func(c *cobra.Command, args []string) error {
			n, err := strconv.ParseInt(args[1], 10, 32)
			if err != nil || n < 0 {
				return usagef(c, "invalid concurrency %q: want a whole number, 0 or more", args[1])
			}
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.fn.PutFunctionConcurrency(c.Context(), connect.NewRequest(&skiffv1.PutFunctionConcurrencyRequest{
				Name: args[0], ReservedConcurrentExecutions: int32(n),
			}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			_, err = fmt.Fprintf(a.stdout, "reserved concurrency of %s: %d\n", args[0], resp.Msg.GetReservedConcurrentExecutions())
			return err
		},
	}
	del := &cobra.Command{
		Use:   "delete NAME",
		Short: "Remove a function's reserved concurrency (it shares the unreserved pool again)",
		Args:  checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.fn.DeleteFunctionConcurrency(c.Context(), connect.NewRequest(&skiffv1.DeleteFunctionConcurrencyRequest{Name: args[0]}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			_, err = fmt.Fprintf(a.stdout, "removed the reserved concurrency of %s\n", args[0])
			return err
		},
	}
	c.AddCommand(set, del)
	return c
}
