package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"skiff.dev/skiff/internal/gatewayserver"
)

func TestGatewayCmd(t *testing.T) {
	key := filepath.Join(t.TempDir(), "gossip.key")
	if err := os.WriteFile(key, bytes.Repeat([]byte{0xA5}, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Run("flags", func(t *testing.T) {
		c := newCLI(t, nil)
		c.env["NATS_PW"] = "s3cret"
		var got gatewayserver.ClusterConfig
		c.gateway = func(_ context.Context, cfg gatewayserver.ClusterConfig) error { got = cfg; return nil }
		r := c.run("gateway", "--data-dir", "/d", "--ca-dir", "/ca", "--name", "gw1", "--cluster-listen", "10.0.0.1:7443",
			"--gossip-bind", "10.0.0.1:7946", "--gossip-join", "10.0.0.2:7946, 10.0.0.3:7946", "--gossip-key-file", key,
			"--nats", "nats://a:4222,nats://b:4222", "--nats-user", "skiff", "--nats-password-env", "NATS_PW", "--nats-replicas", "3")
		if r.code != 0 {
			t.Fatalf("exit code %d; stderr %s", r.code, r.stderr)
		}
		if got.DataDir != "/d" || got.CADir != "/ca" || got.Name != "gw1" || got.ClusterListen != "10.0.0.1:7443" ||
			got.Gossip.BindAddr != "10.0.0.1" || got.Gossip.BindPort != 7946 || len(got.Gossip.Key) != 32 ||
			strings.Join(got.GossipJoin, ",") != "10.0.0.2:7946,10.0.0.3:7946" ||
			strings.Join(got.Store.URLs, ",") != "nats://a:4222,nats://b:4222" || got.Store.Auth.User != "skiff" ||
			got.Store.Auth.Password != "s3cret" || got.Store.Replicas != 3 || got.AsyncDurability != "always" {
			t.Errorf("config %+v", got)
		}
	})
	for _, args := range [][]string{
		{"gateway"}, // no --ca-dir
		{"gateway", "--ca-dir", "/ca", "--nats", "http://a:4222"},
		{"gateway", "--ca-dir", "/ca", "--nats", "nats://a:4222", "--async-durability", "interval"},
		{"gateway", "--ca-dir", "/ca", "--nats-user", "skiff"}, // a --nats-* flag without --nats
		{"gateway", "--ca-dir", "/ca", "--gossip-bind", "7946"},
		{"gateway", "--ca-dir", "/ca", "--gossip-join", "host-without-port"},
		{"gateway", "--ca-dir", "/ca", "--gossip-key-file", filepath.Join(t.TempDir(), "missing")},
		{"gateway", "--ca-dir", "/ca", "--cluster-listen", "7443"},
		{"gateway", "--ca-dir", "/ca", "--async-durability", "sometimes"},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			c := newCLI(t, nil)
			c.gateway = func(context.Context, gatewayserver.ClusterConfig) error { t.Error("the gateway ran"); return nil }
			if r := c.run(args...); r.code != exitUsage {
				t.Errorf("exit code %d, want %d; stderr %q", r.code, exitUsage, r.stderr)
			}
		})
	}
}
