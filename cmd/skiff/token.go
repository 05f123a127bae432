package main

import (
	"fmt"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
)

func (a *app) tokenCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "token",
		Short: "Manage join tokens with which agents join the cluster (admin only)",
		Args:  cobra.ArbitraryArgs,
		RunE:  groupRun,
		// A group: its usage line has no flags of its own.
		DisableFlagsInUseLine: true,
	}
	c.AddCommand(a.tokenCreateCmd(), a.tokenListCmd(), a.tokenRevokeCmd())
	return c
}

func (a *app) tokenCreateCmd() *cobra.Command {
	var (
		ttl         time.Duration
		description string
	)
	c := &cobra.Command{
		Use:   "create",
		Short: "Create a short-lived join token and print it (shown only once)",
		Long: lines(
			"Create a join token on the gateway and print it on stdout, alone, so that it",
			"can be captured. An agent started with 'skiff agent --join TOKEN' uses it",
			"to obtain its certificate; the token pins the cluster CA's fingerprint, so",
			"the agent trusts only a gateway of this cluster. Tokens can be used more",
			"than once until they expire or are revoked."),
		Example: lines(
			"  skiff token create --ttl 30m --description 'rack 7'",
			"  TOKEN=$(skiff token create)"),
		Args: checkArgs(cobra.NoArgs),
		RunE: func(c *cobra.Command, _ []string) error {
			if ttl <= 0 || ttl%time.Second != 0 {
				return usagef(c, "invalid --ttl %v: want a positive whole number of seconds, such as 30m or 2h", ttl)
			}
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.cluster.CreateJoinToken(c.Context(), connect.NewRequest(&skiffv1.CreateJoinTokenRequest{
				TtlSeconds: int64(ttl / time.Second), Description: description,
			}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			if _, err := fmt.Fprintln(a.stdout, resp.Msg.GetToken()); err != nil {
				return err
			}
			fmt.Fprintf(a.stderr, "Join token %s expires at %s. Save it now: it is not shown again.\n", resp.Msg.GetId(), resp.Msg.GetExpires())
			return nil
		},
	}
	c.Flags().DurationVar(&ttl, "ttl", time.Hour, "lifetime of the token (1m to 168h)")
	c.Flags().StringVar(&description, "description", "", "description")
	return c
}

func (a *app) tokenListCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List join tokens (without their secrets)",
		Args:  checkArgs(cobra.NoArgs),
		RunE: func(c *cobra.Command, _ []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.cluster.ListJoinTokens(c.Context(), connect.NewRequest(&skiffv1.ListJoinTokensRequest{}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			t := newTable(a.stdout)
			t.row("ID", "STATE", "EXPIRES", "CREATED", "DESCRIPTION")
			for _, k := range resp.Msg.GetTokens() {
				t.row(k.GetId(), k.GetState(), k.GetExpires(), k.GetCreated(), k.GetDescription())
			}
			return t.flush()
		},
	}
}

func (a *app) tokenRevokeCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "revoke ID",
		Short: "Revoke a join token on every gateway",
		Args:  checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.cluster.RevokeJoinToken(c.Context(), connect.NewRequest(&skiffv1.RevokeJoinTokenRequest{Id: args[0]}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			_, err = fmt.Fprintf(a.stdout, "revoked join token %s\n", args[0])
			return err
		},
	}
}
