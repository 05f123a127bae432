package main

import (
	"encoding/json"
	"fmt"
	"path/filepath"

	"github.com/spf13/cobra"

	"skiff.dev/skiff/internal/pki"
)

// caDirName is the CA's directory inside the data dir, the default of
// `skiff ca init --dir`.
const caDirName = "ca"

// defaultCADir is where `skiff ca init` puts the cluster CA by default:
// <data dir>/ca.
func (a *app) defaultCADir() string {
	return filepath.Join(defaultDataDir(a.getenv, a.homeDir), caDirName)
}

func (a *app) caCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "ca",
		Short: "Manage the cluster certificate authority",
		Args:  cobra.ArbitraryArgs,
		RunE:  groupRun,
		// A group: its usage line has no flags of its own.
		DisableFlagsInUseLine: true,
	}
	c.AddCommand(a.caInitCmd())
	return c
}

func (a *app) caInitCmd() *cobra.Command {
	var dir string
	c := &cobra.Command{
		Use:   "init",
		Short: "Create the cluster CA (ca.crt and ca.key) that signs gateway and agent certificates",
		Long: lines(
			"Create the cluster's certificate authority: an ECDSA P-256 key (ca.key, mode",
			"0600) and a self-signed certificate valid for ten years (ca.crt). Gateways",
			"load it to sign node certificates; agents obtain theirs with a join token",
			"from 'skiff token create'. An existing CA is never overwritten.",
			"",
			"Copy the directory to every gateway host, and keep ca.key secret: whoever",
			"holds it can admit nodes to the cluster."),
		Example: lines(
			"  skiff ca init --dir /etc/skiff/ca"),
		Args: checkArgs(cobra.NoArgs),
		RunE: func(c *cobra.Command, _ []string) error {
			if dir == "" {
				dir = a.defaultCADir()
			}
			if err := pki.InitCA(dir); err != nil {
				return err
			}
			ca, err := pki.LoadCA(dir)
			if err != nil {
				return err
			}
			if a.json() {
				b, err := json.MarshalIndent(map[string]string{"dir": dir, "fingerprint": ca.Fingerprint()}, "", "  ")
				if err != nil {
					return err
				}
				_, err = fmt.Fprintf(a.stdout, "%s\n", b)
				return err
			}
			t := newTable(a.stdout)
			t.row("Created the cluster CA in:", dir)
			t.row("Certificate:", filepath.Join(dir, pki.CAFile))
			t.row("Key (keep it secret):", filepath.Join(dir, pki.CAKeyFile))
			t.row("SHA-256 fingerprint:", ca.Fingerprint())
			t.row("Expires:", ca.Certificate().NotAfter.UTC().Format("2006-01-02"))
			return t.flush()
		},
	}
	c.Flags().StringVar(&dir, "dir", "", "directory for ca.crt and ca.key (default <data dir>/ca)")
	return c
}
