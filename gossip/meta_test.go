package gossip

import (
	"fmt"
	"strings"
	"testing"
)

func TestMetaRoundTrip(t *testing.T) {
	lim := summaryLimits{warmTopN: 3, bloomBytes: 64}
	tags := Tags{Role: RoleAgent, Version: "v0.5.0", Zone: "eu-1a", Rack: "r12", RPCAddr: "10.0.0.7:7070"}
	tests := []struct {
		name string
		cap  *Capacity
	}{
		{"tags only", nil},
		{"empty capacity", &Capacity{}},
		{"full", &Capacity{
			MemoryTotalMB: 65536, MemoryFreeMB: 1024, CPUTotalMilli: 32000, CPUFreeMilli: 150,
			Sandboxes: 40, Busy: 12, Idle: 28, Load: 0.734,
			WarmIdle:    map[string]int{"a:1": 5, "b:2": 9, "c:3": 1, "d:4": 7, "e:5": 0},
			CodeDigests: []string{"sha256:aa", "sha256:bb"},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := encodeMeta(tags, tt.cap, lim)
			if err != nil {
				t.Fatal(err)
			}
			gotTags, sum, err := decodeMeta(b)
			if err != nil {
				t.Fatal(err)
			}
			if gotTags != tags {
				t.Errorf("tags: got %+v, want %+v", gotTags, tags)
			}
			if tt.cap == nil {
				if sum != nil {
					t.Errorf("capacity: got %+v, want nil", sum)
				}
				return
			}
			c := tt.cap
			got := [8]float64{float64(sum.MemoryTotalMB), float64(sum.MemoryFreeMB), float64(sum.CPUTotalMilli), float64(sum.CPUFreeMilli), float64(sum.Sandboxes), float64(sum.Busy), float64(sum.Idle), sum.Load}
			want := [8]float64{float64(c.MemoryTotalMB), float64(c.MemoryFreeMB), float64(c.CPUTotalMilli), float64(c.CPUFreeMilli), float64(c.Sandboxes), float64(c.Busy), float64(c.Idle), c.Load}
			if got != want {
				t.Errorf("scalars: got %v, want %v", got, want)
			}
			// Top 3 by count: b:2=9, d:4=7, a:1=5; c:3 is cut, e:5 (0) never travels.
			for k, w := range map[string]int{"b:2": 9, "d:4": 7, "a:1": 5, "c:3": 0, "e:5": 0, "zz": 0} {
				if c.WarmIdle == nil {
					w = 0
				}
				if g := sum.WarmIdle(k); g != w {
					t.Errorf("WarmIdle(%q): got %d, want %d", k, g, w)
				}
				if g := sum.WarmIdleKey(KeyOf(k)); g != w {
					t.Errorf("WarmIdleKey(KeyOf(%q)): got %d, want %d", k, g, w)
				}
			}
			for _, d := range c.CodeDigests {
				if !sum.HasCode(d) || !sum.HasCodeKey(KeyOf(d)) {
					t.Errorf("HasCode(%q), HasCodeKey: got false, want true", d)
				}
			}
		})
	}
}

func TestBloomFalsePositiveRate(t *testing.T) {
	bloom := make([]byte, DefaultCodeFilterBytes)
	for i := range 50 {
		bloomAdd(bloom, hashKey(fmt.Sprintf("sha256:%064d", i)))
	}
	fp := 0
	const probes = 10000
	for i := range probes {
		if bloomHas(bloom, hashKey(fmt.Sprintf("other:%d", i))) {
			fp++
		}
	}
	if rate := float64(fp) / probes; rate > 0.05 {
		t.Errorf("false positive rate with 50 digests in %d bytes: got %.3f, want ≤ 0.05", DefaultCodeFilterBytes, rate)
	}
}

func TestMetaSizeBound(t *testing.T) {
	lim := summaryLimits{warmTopN: DefaultWarmTopN, bloomBytes: DefaultCodeFilterBytes}
	many := map[string]int{}
	var digests []string
	for i := range 5000 {
		many[fmt.Sprintf("function-with-a-long-name-%d:%d", i, i%7)] = i%50 + 1
		digests = append(digests, fmt.Sprintf("sha256:%064d", i))
	}
	big := &Capacity{MemoryTotalMB: 1 << 40, MemoryFreeMB: 1 << 40, CPUTotalMilli: 1 << 40, CPUFreeMilli: 1 << 40, Sandboxes: 1 << 30, Busy: 1 << 30, Idle: 1 << 30, Load: 1e6, WarmIdle: many, CodeDigests: digests}
	normal := Tags{Role: RoleAgent, Version: "v1.2.3-rc.4+abcdef", Zone: strings.Repeat("z", 32), Rack: strings.Repeat("r", 32), RPCAddr: "[2001:db8::1234:5678]:65535"}
	b, err := encodeMeta(normal, big, lim)
	if err != nil {
		t.Fatalf("worst-case summary with realistic tags: %v", err)
	}
	if len(b) > MaxMetaSize {
		t.Fatalf("got %d bytes, want ≤ %d", len(b), MaxMetaSize)
	}
	t.Logf("worst-case metadata: %d bytes", len(b))

	huge := normal
	huge.Zone = strings.Repeat("z", 400)
	if _, err := encodeMeta(huge, big, lim); err == nil {
		t.Error("tags of 400+ bytes with a full summary: got no error, want one")
	}
	if _, err := encodeMeta(Tags{Zone: strings.Repeat("z", 600)}, nil, lim); err == nil {
		t.Error("600-byte tags: got no error, want one")
	}
	if _, err := encodeMeta(normal, &Capacity{MemoryFreeMB: -1}, lim); err == nil {
		t.Error("negative free memory: got no error, want one")
	}
}

func FuzzDecodeMeta(f *testing.F) {
	b, _ := encodeMeta(Tags{Role: RoleGateway, Zone: "a"}, &Capacity{WarmIdle: map[string]int{"x": 1}, CodeDigests: []string{"d"}}, summaryLimits{4, 16})
	f.Add(b)
	f.Add([]byte{1})
	f.Fuzz(func(t *testing.T, b []byte) {
		_, s, err := decodeMeta(b)
		if err == nil && s != nil {
			_ = s.WarmIdle("x")
			_ = s.HasCode("d")
		}
		_, _ = decodeMessage(b)
	})
}
