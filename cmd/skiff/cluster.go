package main

import (
	"fmt"
	"strconv"
	"strings"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
)

func (a *app) clusterCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "cluster",
		Short: "Show the cluster's members and hosts (admin only)",
		Args:  cobra.ArbitraryArgs,
		RunE:  groupRun,
		// A group: its usage line has no flags of its own.
		DisableFlagsInUseLine: true,
	}
	c.AddCommand(a.clusterMembersCmd(), a.clusterHostsCmd())
	return c
}

// memberState is a member's state, with "draining" appended when it is.
func memberState(state string, draining bool) string {
	if draining {
		return state + ",draining"
	}
	return state
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func (a *app) clusterMembersCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "members",
		Short: "List the gossip members the gateway knows: gateways and agents",
		Args:  checkArgs(cobra.NoArgs),
		RunE: func(c *cobra.Command, _ []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.cluster.ListMembers(c.Context(), connect.NewRequest(&skiffv1.ListMembersRequest{}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			t := newTable(a.stdout)
			t.row("NAME", "ROLE", "STATE", "ADDRESS", "RPC ADDRESS", "ZONE", "RACK", "VERSION")
			for _, m := range resp.Msg.GetMembers() {
				t.row(m.GetName(), m.GetRole(), memberState(m.GetState(), m.GetDraining()), m.GetAddress(),
					dash(m.GetRpcAddress()), dash(m.GetZone()), dash(m.GetRack()), dash(m.GetVersion()))
			}
			return t.flush()
		},
	}
}

func (a *app) clusterHostsCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "hosts",
		Short: "List the agents and their capacity: memory, CPU, sandboxes, load",
		Long: lines(
			"List the agents with the capacity they last reported through gossip:",
			"memory free/total, CPU cores free/total, sandboxes (busy and idle) and",
			"load. A host that has not reported yet shows '-'."),
		Args: checkArgs(cobra.NoArgs),
		RunE: func(c *cobra.Command, _ []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.cluster.ListHosts(c.Context(), connect.NewRequest(&skiffv1.ListHostsRequest{}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			t := newTable(a.stdout)
			t.row("NAME", "STATE", "ZONE", "RACK", "MEMORY FREE/TOTAL", "CPU FREE/TOTAL", "SANDBOXES", "BUSY", "IDLE", "LOAD")
			for _, h := range resp.Msg.GetHosts() {
				mem, cpu, n, busy, idle, load := "-", "-", "-", "-", "-", "-"
				if h.GetReported() {
					mem = fmt.Sprintf("%d/%d MB", h.GetMemoryFreeMb(), h.GetMemoryTotalMb())
					cpu = cores(h.GetCpuFreeMilli()) + "/" + cores(h.GetCpuTotalMilli())
					n, busy, idle = strconv.Itoa(int(h.GetSandboxes())), strconv.Itoa(int(h.GetBusy())), strconv.Itoa(int(h.GetIdle()))
					load = strconv.FormatFloat(h.GetLoad(), 'f', 2, 64)
				}
				t.row(h.GetName(), memberState(h.GetState(), h.GetDraining()), dash(h.GetZone()), dash(h.GetRack()), mem, cpu, n, busy, idle, load)
			}
			return t.flush()
		},
	}
}

// cores formats millicores as cores with up to two decimals.
func cores(milli int64) string {
	s := strconv.FormatFloat(float64(milli)/1000, 'f', 2, 64)
	s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	return s
}

func (a *app) sandboxesCmd() *cobra.Command {
	var function, host string
	c := &cobra.Command{
		Use:   "sandboxes",
		Short: "List the sandboxes of every agent: where each runs, its function and state (admin only)",
		Example: lines(
			"  skiff sandboxes",
			"  skiff sandboxes --function hello",
			"  skiff sandboxes --host agent-3"),
		Args: checkArgs(cobra.NoArgs),
		RunE: func(c *cobra.Command, _ []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.cluster.ListSandboxes(c.Context(), connect.NewRequest(&skiffv1.ListSandboxesRequest{FunctionName: function, Host: host}))
			if err != nil {
				return err
			}
			if u := resp.Msg.GetUnreachableHosts(); len(u) > 0 {
				fmt.Fprintf(a.stderr, "warning: could not reach %s: their sandboxes are not listed\n", strings.Join(u, ", "))
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			t := newTable(a.stdout)
			t.row("HOST", "SANDBOX", "FUNCTION", "STATE", "MEMORY", "INVOCATIONS", "CONFIG KEY")
			for _, p := range resp.Msg.GetSandboxes() {
				s := p.GetSandbox()
				t.row(p.GetHost(), s.GetId(), s.GetFunctionName(), s.GetState(), mb(s.GetMemoryMb()),
					strconv.FormatInt(s.GetInvocations(), 10), s.GetConfigKey())
			}
			return t.flush()
		},
	}
	c.Flags().StringVar(&function, "function", "", "only this function's sandboxes")
	c.Flags().StringVar(&host, "host", "", "only this agent's sandboxes")
	return c
}
