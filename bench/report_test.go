package main

import (
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"skiff.dev/skiff/gateway/async"
)

func TestParseFlagsSections(t *testing.T) {
	tests := []struct {
		args        []string
		sync, async bool
		durability  []async.Durability
		wantErr     bool
	}{
		{args: nil, sync: true, async: true, durability: []async.Durability{async.DurabilityAlways, async.DurabilityInterval}},
		{args: []string{"-sections", "async", "-durability", "interval"}, async: true, durability: []async.Durability{async.DurabilityInterval}},
		{args: []string{"-sections", "sync"}, sync: true, durability: []async.Durability{async.DurabilityAlways, async.DurabilityInterval}},
		{args: []string{"-sections", "both"}, wantErr: true},
		{args: []string{"-durability", "never"}, wantErr: true},
		{args: []string{"-durability", ""}, wantErr: true},
		{args: []string{"-e2e-duration", "500ms"}, wantErr: true},
		{args: []string{"-async-clients", "0"}, wantErr: true},
	}
	for _, tt := range tests {
		c, err := parseFlags(tt.args, io.Discard)
		if (err != nil) != tt.wantErr {
			t.Errorf("parseFlags(%q): got error %v, want error %v", tt.args, err, tt.wantErr)
			continue
		}
		if err != nil {
			continue
		}
		if c.sync != tt.sync || c.async != tt.async || !slices.Equal(c.durability, tt.durability) {
			t.Errorf("parseFlags(%q): got sync %v async %v durability %v, want %v %v %v", tt.args, c.sync, c.async, c.durability, tt.sync, tt.async, tt.durability)
		}
	}
}

func TestAsyncReport(t *testing.T) {
	cfg, err := parseFlags([]string{"-sections", "async"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	r := &results{cfg: cfg, async: []asyncResult{
		{
			durability: "always",
			raw:        load{events: 100, perSecond: 1000},
			accept:     load{events: 100, perSecond: 600},
			drain:      time.Second,
			e2e:        e2eResult{sent: 10, rate: 1000, lat: latencies{n: 10, p50: 2 * time.Millisecond}, bySecond: []time.Duration{time.Millisecond, 3 * time.Millisecond}},
		},
		{
			durability: "interval",
			raw:        load{events: 100, perSecond: 1000},
			accept:     load{events: 100, perSecond: 400},
			drain:      time.Second,
			e2e:        e2eResult{sent: 10, rate: 1000, lat: latencies{n: 9, p50: 2 * time.Millisecond}, missing: 1},
		},
	}}
	var b strings.Builder
	if err := r.writeMarkdown(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"| Async invoke | durability always | durability interval |",
		"| Accept rate / JetStream publish rate | 0.60 | 0.40 |",
		"| Async accept rate / JetStream publish rate, durability always | 0.60 | ≥ 0.50 | PASS |",
		"| Async accept rate / JetStream publish rate, durability interval | 0.40 | ≥ 0.50 | MISS |",
		"| Async end to end p50 at 1000 events/s, durability always | 2.00 ms | ≤ 5 ms | PASS |",
		// An event without its record fails the target whatever the p50.
		"| Async end to end p50 at 1000 events/s, durability interval | 2.00 ms | ≤ 5 ms | MISS |",
		"| End to end p50 of the events sent in each second | 1.00 ms, 3.00 ms |  |",
		"1 of the 10 measured events had no success record",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q; got:\n%s", want, out)
		}
	}
	for _, absent := range []string{"Emulator", "Cold start"} {
		if strings.Contains(out, absent) {
			t.Errorf("async-only report has %q", absent)
		}
	}
}

func TestParseFlagsStreams(t *testing.T) {
	c, err := parseFlags([]string{"-only", "streams", "-stream-durability", "interval"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.sync || c.async || c.network || !c.streams || !slices.Equal(c.streamDurability, []async.Durability{async.DurabilityInterval}) {
		t.Errorf("-only streams: got sync %v async %v network %v streams %v durability %v", c.sync, c.async, c.network, c.streams, c.streamDurability)
	}
	c, err = parseFlags(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !c.streams || !slices.Equal(c.streamDurability, []async.Durability{async.DurabilityAlways, async.DurabilityInterval}) {
		t.Errorf("defaults: streams %v durability %v, want true and always,interval", c.streams, c.streamDurability)
	}
	for _, args := range [][]string{
		{"-only", "stream"},
		{"-stream-durability", "sometimes"},
		{"-stream-records", "10"},
		{"-stream-age-duration", "1s"},
	} {
		if _, err := parseFlags(args, io.Discard); err == nil {
			t.Errorf("parseFlags(%q): no error", args)
		}
	}
}

func TestStreamsReport(t *testing.T) {
	cfg, err := parseFlags([]string{"-only", "streams"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	r := &results{cfg: cfg, streams: &streamsResult{
		runs: []streamRun{{
			durability: async.DurabilityAlways,
			tput: []streamTput{
				{shards: 1, records: 1000, write: time.Second, took: time.Second, first: 100 * time.Millisecond, steady: 60000, rate: 1000, rawTook: time.Second, rawRate: 120000},
				{shards: 8, records: 4000, write: time.Second, took: time.Second, steady: 80000, rate: 4000, rawRate: 160000},
			},
			age: ageResult{target: 48000, achieved: 40000, d: 10 * time.Second, samples: 900, p50: 3 * time.Millisecond, p99: 20 * time.Millisecond},
		}},
		takeover: takeoverResult{lanes: 8, restart: 400 * time.Millisecond, held: 1500 * time.Millisecond},
	}}
	var b strings.Builder
	if err := r.writeMarkdown(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"| Stream mapping (batch 100, no-op function) | 1 shard(s), durability always | 8 shard(s), durability always |",
		"| First batch → every record processed and checkpointed | **60000 records/s** (60000 per shard) | **80000 records/s** (10000 per shard) |",
		"| skiff / JetStream consume rate | 0.500 | 0.500 |",
		"| Stream records/s per shard, 1 shard(s), batch 100, durability always | 60000 | ≥ 50000 | PASS |",
		"| Stream records/s per shard, 8 shard(s), batch 100, durability always | 10000 | ≥ 50000 | MISS |",
		"| Stream lease takeover after a kill -9 (kill → every lane polled again, restart included) | 1500 ms | ≤ 2 s | PASS |",
		"IteratorAge p50 / p99 / max, writing 48000 records/s",
		"not counted (the restarted process has the same holder name)",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q; got:\n%s", want, out)
		}
	}
}
