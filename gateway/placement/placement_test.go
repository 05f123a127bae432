package placement

import (
	"math/rand/v2"
	"testing"

	"skiff.dev/skiff/internal/errs"
)

// contents is a fake host summary.
type contents struct {
	warm map[string]int
	code map[string]bool
}

func (c contents) WarmIdle(f string) int { return c.warm[f] }
func (c contents) HasCode(d string) bool { return c.code[d] }

func warm(fn string, n int) Contents { return contents{warm: map[string]int{fn: n}} }
func cached(d string) Contents       { return contents{code: map[string]bool{d: true}} }

func host(name, zone string, freeMB int64, load float64, c Contents) Host {
	return Host{Name: name, Zone: zone, FreeMemoryMB: freeMB, Load: load, Contents: c}
}

func TestChoose(t *testing.T) {
	req := Request{Function: "f:1", Digest: "sha256:f", MemoryMB: 512}
	with := func(mod func(*Request)) Request {
		r := req
		mod(&r)
		return r
	}
	draining := host("drain", "a", 8000, 0, warm("f:1", 5))
	draining.Draining = true
	suspect := host("sus", "a", 8000, 0, warm("f:1", 5))
	suspect.Suspect = true

	tests := []struct {
		name  string
		req   Request
		hosts []Host
		want  []string // acceptable hosts (any of them, on every seed)
		warm  bool
		rule  string
	}{
		{
			name:  "warm sandbox first, even on a loaded host without free memory",
			req:   req,
			hosts: []Host{host("idle", "a", 8000, 0, nil), host("w", "a", 0, 0.9, warm("f:1", 1))},
			want:  []string{"w"}, warm: true, rule: "warm",
		},
		{
			name:  "most warm sandboxes wins",
			req:   req,
			hosts: []Host{host("w1", "a", 8000, 0, warm("f:1", 1)), host("w3", "a", 8000, 0.5, warm("f:1", 3))},
			want:  []string{"w3"}, warm: true, rule: "warm",
		},
		{
			name:  "warm sandboxes of another version do not count",
			req:   req,
			hosts: []Host{host("other", "a", 8000, 0, warm("f:2", 4))},
			want:  []string{"other"}, rule: "two-choices",
		},
		{
			name:  "refused warm claim: cold start, same host allowed",
			req:   with(func(r *Request) { r.SkipWarm = map[string]bool{"w": true} }),
			hosts: []Host{host("w", "a", 8000, 0, contents{warm: map[string]int{"f:1": 1}, code: map[string]bool{"sha256:f": true}}), host("x", "a", 8000, 0, nil)},
			want:  []string{"w"}, rule: "code",
		},
		{
			name:  "draining and suspect hosts avoided, warm or not",
			req:   req,
			hosts: []Host{draining, suspect, host("ok", "a", 8000, 0.9, nil)},
			want:  []string{"ok"}, rule: "two-choices",
		},
		{
			name:  "code cache preferred over a less loaded host",
			req:   req,
			hosts: []Host{host("c", "a", 8000, 0.8, cached("sha256:f")), host("n1", "a", 8000, 0, nil), host("n2", "a", 8000, 0, nil)},
			want:  []string{"c"}, rule: "code",
		},
		{
			name:  "never a host without the memory, cached or warm-skipped",
			req:   with(func(r *Request) { r.MemoryMB = 2048 }),
			hosts: []Host{host("c", "a", 2047, 0, cached("sha256:f")), host("big", "a", 2048, 0.9, nil)},
			want:  []string{"big"}, rule: "two-choices",
		},
		{
			name:  "two choices: the less loaded of two",
			req:   req,
			hosts: []Host{host("busy", "a", 8000, 0.9, nil), host("calm", "a", 8000, 0.1, nil)},
			want:  []string{"calm"}, rule: "two-choices",
		},
		{
			name:  "excluded host not used after a refused cold placement",
			req:   with(func(r *Request) { r.Exclude = map[string]bool{"c": true} }),
			hosts: []Host{host("c", "a", 8000, 0, contents{warm: map[string]int{"f:1": 2}, code: map[string]bool{"sha256:f": true}}), host("other", "a", 8000, 0.7, nil)},
			want:  []string{"other"}, rule: "two-choices",
		},
		{
			name: "spread: a zone without the function first",
			req:  with(func(r *Request) { r.Sandboxes = map[string]int{"a1": 1, "b1": 1} }),
			hosts: []Host{
				host("a1", "a", 8000, 0, nil), host("a2", "a", 8000, 0, nil),
				host("b1", "b", 8000, 0, nil), host("c1", "c", 8000, 0.9, nil),
			},
			want: []string{"c1"}, rule: "spread",
		},
		{
			name: "spread: within the zone, a host without the function",
			req:  with(func(r *Request) { r.Sandboxes = map[string]int{"a1": 2, "b1": 1} }),
			hosts: []Host{
				host("a1", "a", 8000, 0, nil), host("b1", "b", 8000, 0, nil), host("b2", "b", 8000, 0.5, nil),
			},
			want: []string{"b2"}, rule: "spread",
		},
		{
			name: "spread beats the code cache; the cache breaks the tie",
			req:  with(func(r *Request) { r.Sandboxes = map[string]int{"c": 3} }),
			hosts: []Host{
				host("c", "a", 8000, 0, cached("sha256:f")), host("n", "a", 8000, 0.5, nil), host("n2", "a", 8000, 0, cached("sha256:f")),
			},
			want: []string{"n2"}, rule: "code",
		},
		{
			name: "spread counts sandboxes on hosts that can take no more",
			req:  with(func(r *Request) { r.Sandboxes = map[string]int{"full": 4} }),
			hosts: []Host{
				host("full", "a", 0, 0, nil), host("a2", "a", 8000, 0, nil), host("b1", "b", 8000, 0.8, nil),
			},
			want: []string{"b1"}, rule: "spread",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for seed := range uint64(50) {
				d, err := Choose(tt.req, tt.hosts, rand.New(rand.NewPCG(seed, 1)))
				if err != nil {
					t.Fatalf("seed %d: %v", seed, err)
				}
				ok := false
				for _, w := range tt.want {
					ok = ok || d.Host == w
				}
				if !ok || d.Warm != tt.warm || d.Rule != tt.rule {
					t.Fatalf("seed %d: got %s (warm %v), want one of %v (warm %v, rule %s)", seed, d, d.Warm, tt.want, tt.warm, tt.rule)
				}
			}
		})
	}
}

func TestChooseErrors(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	hosts := []Host{host("small", "a", 256, 0, nil)}
	if _, err := Choose(Request{MemoryMB: 512}, hosts, rng); !errs.Is(err, errs.KindResourceExhausted) {
		t.Errorf("no host with the memory: got %v, want resource exhausted", err)
	}
	if _, err := Choose(Request{MemoryMB: 128, Exclude: map[string]bool{"small": true}}, hosts, rng); !errs.Is(err, errs.KindResourceExhausted) {
		t.Errorf("only host excluded: got %v, want resource exhausted", err)
	}
	if _, err := Choose(Request{MemoryMB: 0}, hosts, rng); !errs.IsInvalid(err) {
		t.Errorf("zero memory: got %v, want invalid argument", err)
	}
	if _, err := Choose(Request{MemoryMB: 128}, nil, rng); !errs.Is(err, errs.KindResourceExhausted) {
		t.Errorf("no hosts: got %v, want resource exhausted", err)
	}
}

// Power of two choices avoids the most loaded host and favours the least.
func TestTwoChoicesDistribution(t *testing.T) {
	hosts := []Host{host("l0", "a", 8000, 0.0, nil), host("l1", "a", 8000, 0.3, nil), host("l2", "a", 8000, 0.6, nil), host("l3", "a", 8000, 0.9, nil)}
	rng := rand.New(rand.NewPCG(7, 7))
	counts := map[string]int{}
	for range 10000 {
		d, err := Choose(Request{MemoryMB: 128}, hosts, rng)
		if err != nil {
			t.Fatal(err)
		}
		counts[d.Host]++
	}
	// Least loaded wins 3 of the 6 pairs (50 %), the most loaded none.
	if counts["l3"] != 0 || counts["l0"] < 4500 || counts["l0"] > 5500 {
		t.Errorf("picks: got %v, want l3 never and l0 about 5000", counts)
	}
}
