package netrule

import (
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	good := map[string]string{
		"10.0.0.0/8":           "10.0.0.0/8",
		"1.2.3.4":              "1.2.3.4/32",
		"1.2.3.4/32:443":       "1.2.3.4/32:443",
		"192.168.0.0/16:80-90": "192.168.0.0/16:80-90",
		" 0.0.0.0/0:53 ":       "0.0.0.0/0:53",
		"198.51.100.7:1-65535": "198.51.100.7/32:1-65535",
	}
	for in, want := range good {
		r, err := Parse(in)
		if err != nil {
			t.Errorf("Parse(%q): %v", in, err)
			continue
		}
		if r.String() != want {
			t.Errorf("Parse(%q) = %s, want %s", in, r, want)
		}
	}
	bad := map[string]string{
		"":              "not an IPv4 address",
		"nonsense":      "not an IPv4 address",
		"10.0.0.0/33":   "not a CIDR",
		"::1/128":       "only IPv4",
		"1.2.3.4:0":     "not in 1-65535",
		"1.2.3.4:70000": "not in 1-65535",
		"1.2.3.4:90-80": "backwards",
		"1.2.3.4:http":  "not in 1-65535",
		"1.2.3.4:80-":   "not in 1-65535",
	}
	for in, want := range bad {
		if _, err := Parse(in); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%q) error %v, want one containing %q", in, err, want)
		}
	}
}

func TestParseListLimit(t *testing.T) {
	list := make([]string, MaxRules+1)
	for i := range list {
		list[i] = "10.0.0.1"
	}
	if _, err := ParseList(list); err == nil {
		t.Fatal("over-long list accepted")
	}
	if rs, err := ParseList(list[:MaxRules]); err != nil || len(rs) != MaxRules {
		t.Fatalf("list of %d: %v", MaxRules, err)
	}
}
