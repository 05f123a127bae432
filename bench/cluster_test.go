package main

import (
	"errors"
	"io"
	"strings"
	"testing"
	"time"
)

func TestParseFlagsCluster(t *testing.T) {
	c, err := parseFlags([]string{"-only", "cluster"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.sync || c.async || c.network || c.streams || !c.cluster {
		t.Errorf("-only cluster: got sync %v async %v network %v streams %v cluster %v", c.sync, c.async, c.network, c.streams, c.cluster)
	}
	if c, err = parseFlags(nil, io.Discard); err != nil || !c.cluster {
		t.Errorf("defaults: cluster %v, error %v; want the cluster section in make bench", c.cluster, err)
	}
	if _, err := parseFlags([]string{"-only", "clusters"}, io.Discard); err == nil || !strings.Contains(err.Error(), "cluster") {
		t.Errorf("-only clusters: got error %v, want one listing cluster", err)
	}
}

func TestClusterReport(t *testing.T) {
	cfg, err := parseFlags([]string{"-only", "cluster", "-warm", "100"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	r := &results{cfg: cfg, cluster: &clusterResult{
		hopWarm: latencies{n: 100, p50: 2 * time.Millisecond, p99: 6 * time.Millisecond, mean: 3 * time.Millisecond},
		devWarm: latencies{n: 100, p50: time.Millisecond, p99: 3 * time.Millisecond, mean: time.Millisecond},
		hopTput: throughput{concurrency: 8, perSecond: 500},
		devTput: throughput{concurrency: 8, perSecond: 1000},
		detect:  []time.Duration{800 * time.Millisecond, 1200 * time.Millisecond, 700 * time.Millisecond},
		takeovers: []gatewayTakeover{
			{victim: "gw0", resources: 6, lanes: 4, dead: 600 * time.Millisecond, held: 1500 * time.Millisecond, takeovers: 4},
			{victim: "gw1", resources: 5, lanes: 3, dead: 700 * time.Millisecond, held: 2500 * time.Millisecond, takeovers: 3},
		},
		placement: []placementCase{{name: "warm", perOp: 20 * time.Microsecond, lat: latencies{p50: 18 * time.Microsecond, p99: 60 * time.Microsecond}, warmRate: 0.98}},
	}}
	var b strings.Builder
	if err := r.writeMarkdown(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"| Warm invoke p50 / p99 (sequential, n=100 each) | 2.00 ms / 6.00 ms | 1.00 ms / 3.00 ms | 2.00 / 2.00 |",
		"| 0.50 |", // throughput ratio
		"| Agent kill -9 → dead in gw0's `ListMembers` | 800 ms | 1200 ms | 800 ms, 1200 ms, 700 ms |",
		// The worst detection decides the target.
		"| Agent failure detected (kill -9 → dead in the gateway's view), max of 3 | 1200 ms | ≤ 1 s | MISS |",
		"| Gateway lease takeover (kill -9 → the survivor holds every lease), max of 2 | 2500 ms | ≤ 3 s | PASS |",
		"gw0: 6 resources (4 stream lanes), 4 takeovers; gw1: 5 resources (3 stream lanes), 3 takeovers",
		"| `placement.Choose`, mean (`testing.Benchmark`) | 20.0 µs |",
		"100 sequential warm invokes of each",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q; got:\n%s", want, out)
		}
	}
	// Nothing measured is no pass.
	r.cluster = &clusterResult{}
	b.Reset()
	if err := r.writeMarkdown(&b); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(b.String(), "PASS") {
		t.Errorf("an empty cluster result passes a target:\n%s", b.String())
	}
}

func TestAlternate(t *testing.T) {
	var calls []string
	a := func() (time.Duration, error) { calls = append(calls, "a"); return time.Millisecond, nil }
	b := func() (time.Duration, error) { calls = append(calls, "b"); return 2 * time.Millisecond, nil }
	la, lb, err := alternate(a, b, 1, 5, 2)
	if err != nil {
		t.Fatal(err)
	}
	if la.n != 5 || lb.n != 5 || la.p50 != time.Millisecond || lb.p50 != 2*time.Millisecond {
		t.Errorf("got a %+v, b %+v; want 5 samples each of 1 ms and 2 ms", la, lb)
	}
	// Warm-up a b, round 1 (3 each) a first, round 2 (2 each) b first.
	if got, want := strings.Join(calls, ""), "ab"+"aaabbb"+"bbaa"; got != want {
		t.Errorf("call order %s, want %s", got, want)
	}
	boom := errors.New("boom")
	fail := func() (time.Duration, error) { return 0, boom }
	if _, _, err := alternate(a, fail, 0, 4, 2); !errors.Is(err, boom) {
		t.Errorf("a failing call: got %v, want boom", err)
	}
}

func TestHeldResources(t *testing.T) {
	future := time.Now().Add(time.Minute)
	past := time.Now().Add(-time.Second)
	slots := []leaseSlot{
		{Resource: "async:a", Slot: 0, Holder: "gw0/async", Expires: future},
		{Resource: "async:a", Slot: 1, Holder: "gw1/async", Expires: future},
		{Resource: "stream:x", Holder: "gw0/streams", Expires: past}, // expired
		{Resource: "stream:y", Holder: "gw10/streams", Expires: future},
		{Resource: "stream:z"}, // free
	}
	got := heldResources(slots, "gw0")
	if len(got) != 1 || !got["async:a"] {
		t.Errorf("gw0 holds %v, want only async:a (stream:x expired, gw10 is another gateway)", got)
	}
	if got := heldResources(slots, "gw1"); len(got) != 1 || !got["async:a"] {
		t.Errorf("gw1 holds %v, want async:a", got)
	}
}
