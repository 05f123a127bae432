package ebpf

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"skiff.dev/skiff/internal/errs"
)

func TestParseRule(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    Rule
		wantErr string // substring; "" means success
	}{
		{in: "10.0.0.0/8", want: Rule{Prefix: netip.MustParsePrefix("10.0.0.0/8")}},
		{in: "1.2.3.4", want: Rule{Prefix: netip.MustParsePrefix("1.2.3.4/32")}},
		{in: "1.2.3.4/32:443", want: Rule{Prefix: netip.MustParsePrefix("1.2.3.4/32"), Ports: PortRange{443, 443}}},
		{in: "1.2.3.4:443", want: Rule{Prefix: netip.MustParsePrefix("1.2.3.4/32"), Ports: PortRange{443, 443}}},
		{in: "1.2.3.0/24:8000-8100", want: Rule{Prefix: netip.MustParsePrefix("1.2.3.0/24"), Ports: PortRange{8000, 8100}}},
		{in: "0.0.0.0/0:1-65535", want: Rule{Prefix: netip.MustParsePrefix("0.0.0.0/0"), Ports: PortRange{1, 65535}}},
		{in: " 8.8.8.8:53 ", want: Rule{Prefix: netip.MustParsePrefix("8.8.8.8/32"), Ports: PortRange{53, 53}}},
		{in: "10.1.2.3/8", wantErr: "host bits set (did you mean 10.0.0.0/8?)"},
		{in: "10.0.0.0/33", wantErr: "is not a CIDR prefix"},
		{in: "nope", wantErr: "is not an IPv4 address"},
		{in: "", wantErr: "is not an IPv4 address"},
		{in: "::1", wantErr: "only IPv4"},
		{in: "2001:db8::/32", wantErr: "only IPv4"},
		{in: "1.2.3.4:0", wantErr: "port \"0\" is not in 1-65535"},
		{in: "1.2.3.4:65536", wantErr: "port \"65536\" is not in 1-65535"},
		{in: "1.2.3.4:http", wantErr: "port \"http\" is not in 1-65535"},
		{in: "1.2.3.4:", wantErr: "port \"\" is not in 1-65535"},
		{in: "1.2.3.4:90-80", wantErr: "port range 90-80 is backwards"},
		{in: "1.2.3.4:80-", wantErr: "port \"\" is not in 1-65535"},
	} {
		got, err := ParseRule(tc.in)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("ParseRule(%q) error = %v, want one containing %q", tc.in, err, tc.wantErr)
			}
			if err != nil && !errs.IsInvalid(err) {
				t.Errorf("ParseRule(%q) error kind = %v, want invalid_argument", tc.in, errs.KindOf(err))
			}
			continue
		}
		if err != nil {
			t.Errorf("ParseRule(%q): %v", tc.in, err)
			continue
		}
		if got != tc.want {
			t.Errorf("ParseRule(%q) = %v, want %v", tc.in, got, tc.want)
		}
		// String round-trips through ParseRule.
		if again, err := ParseRule(got.String()); err != nil || again != got {
			t.Errorf("ParseRule(%q.String() = %q) = %v, %v; want %v", tc.in, got.String(), again, err, got)
		}
	}
}

func TestReasons(t *testing.T) {
	seen := map[string]bool{}
	for _, r := range Reasons() {
		if r == 0 || r >= reasonMax {
			t.Errorf("reason %d outside 1..%d: the drops array in struct counters is too small", r, reasonMax-1)
		}
		s := r.String()
		if strings.HasPrefix(s, "reason_") || seen[s] {
			t.Errorf("reason %d has name %q, want a unique name", r, s)
		}
		seen[s] = true
	}
	if got, want := Reason(42).String(), "reason_42"; got != want {
		t.Errorf("Reason(42).String() = %q, want %q", got, want)
	}
}

func TestBuildEntries(t *testing.T) {
	rule := func(s string) Rule {
		r, err := ParseRule(s)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	p := netip.MustParsePrefix
	got, err := buildEntries(Policy{
		Allow: []Rule{
			rule("10.0.0.0/8:80"),
			rule("10.0.0.0/8:81-90"), // adjacent: merges with :80
			rule("10.0.0.0/8:100-200"),
			rule("10.0.0.0/8:150-300"), // overlapping: merges
			rule("10.1.0.0/16"),
			rule("10.1.0.0/16:443"), // absorbed by the all-ports rule
			rule("10.1.2.0/24:22"),
			rule("192.168.0.0/16:5432"),
		},
		Deny: []Rule{
			rule("10.1.2.0/24:23"),    // shares an entry with an allow prefix
			rule("10.1.3.0/24"),       // its own entry, under allow 10/8 and 10.1/16
			rule("0.0.0.0/0:25"),      // covers every entry
			rule("192.168.0.0/16:22"), // same prefix as an allow rule
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	allow8 := []portRule{{lo: 80, hi: 90, plen: 8}, {lo: 100, hi: 300, plen: 8}}
	allow16 := append(slices.Clone(allow8), portRule{plen: 16, any: true})
	deny0 := portRule{lo: 25, hi: 25}
	want := []lpmEntry{
		{prefix: p("0.0.0.0/0"), deny: []portRule{deny0}},
		{prefix: p("10.0.0.0/8"), allow: allow8, deny: []portRule{deny0}},
		{prefix: p("10.1.0.0/16"), allow: allow16, deny: []portRule{deny0}},
		{prefix: p("10.1.2.0/24"), allow: append(slices.Clone(allow16), portRule{lo: 22, hi: 22, plen: 24}), deny: []portRule{deny0, {lo: 23, hi: 23, plen: 24}}},
		{prefix: p("10.1.3.0/24"), allow: allow16, deny: []portRule{deny0, {plen: 24, any: true}}},
		{prefix: p("192.168.0.0/16"), allow: []portRule{{lo: 5432, hi: 5432, plen: 16}}, deny: []portRule{deny0, {lo: 22, hi: 22, plen: 16}}},
	}
	if diff := cmp.Diff(want, got, cmp.AllowUnexported(lpmEntry{}, portRule{}), cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); diff != "" {
		t.Errorf("buildEntries mismatch (-want +got):\n%s", diff)
	}

	// Too many distinct port ranges covering one prefix.
	var many []Rule
	for i := range maxPortRules + 1 {
		many = append(many, Rule{Prefix: p("1.2.3.0/24"), Ports: PortRange{uint16(10 * (i + 1)), uint16(10*(i+1) + 1)}})
	}
	for _, pol := range []Policy{{Allow: many}, {Deny: many}} {
		if _, err := buildEntries(pol); err == nil || !errs.IsInvalid(err) {
			t.Errorf("buildEntries(%d ranges) error = %v, want invalid_argument", len(many), err)
		}
	}
	for _, bad := range []Rule{
		{Prefix: p("2001:db8::/32")},
		{Prefix: netip.PrefixFrom(netip.MustParseAddr("10.1.2.3"), 8)},
		{Prefix: p("10.0.0.0/8"), Ports: PortRange{0, 80}},
		{Prefix: p("10.0.0.0/8"), Ports: PortRange{90, 80}},
		{},
	} {
		for _, pol := range []Policy{{Allow: []Rule{bad}}, {Deny: []Rule{bad}}} {
			if _, err := buildEntries(pol); err == nil || !errs.IsInvalid(err) {
				t.Errorf("buildEntries(%+v) error = %v, want invalid_argument", pol, err)
			}
		}
	}
}

func TestSpecialRanges(t *testing.T) {
	got := SpecialRanges()
	for _, c := range []struct {
		addr string
		want Reason // 0: not special
	}{
		{"10.1.2.3", ReasonPrivate},
		{"172.31.255.255", ReasonPrivate},
		{"172.32.0.1", 0},
		{"192.168.0.1", ReasonPrivate},
		{"100.64.0.1", ReasonPrivate},
		{"100.128.0.1", 0},
		{"127.0.0.1", ReasonPrivate},
		{"0.1.2.3", ReasonPrivate},
		{"169.254.169.254", ReasonMetadata},
		{"224.0.0.251", ReasonPrivate},
		{"255.255.255.255", ReasonPrivate},
		{"8.8.8.8", 0},
		{"203.0.113.10", 0},
	} {
		var r Reason
		for p, reason := range got {
			if p.Contains(netip.MustParseAddr(c.addr)) {
				r = reason
			}
		}
		if r != c.want {
			t.Errorf("%s: special reason %v, want %v", c.addr, r, c.want)
		}
	}
}
