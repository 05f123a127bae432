//go:build linux && (386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64)

package ebpf

import (
	"encoding/binary"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/testutil"
)

// updateCase is a packet and its fate under the policy before and after an
// Update (0: pass).
type updateCase struct {
	name          string
	pkt           pkt
	before, after Reason
}

// TestUpdate runs the policy program on tables of packets before and after
// Update replaces the policy in place, and checks the counters run on
// across the Update and that the rules map holds exactly the new entries.
func TestUpdate(t *testing.T) {
	testutil.RequirePrivileged(t)
	m := newManager(t)
	if err := m.SetGlobal(testGlobal); err != nil {
		t.Fatal(err)
	}
	const udp, icmp = unix.IPPROTO_UDP, unix.IPPROTO_ICMP
	for _, tc := range []struct {
		name     string
		from, to Policy
		cases    []updateCase
	}{{
		name: "allow to deny",
		from: Policy{Egress: true, Allow: mustRules(t, "10.20.0.0/16", "192.168.1.0/24:5432")},
		to:   Policy{Egress: true, Deny: mustRules(t, "10.20.0.0/16", "1.2.3.0/24:443")},
		cases: []updateCase{
			{"allowed private to denied", pkt{dst: "10.20.1.1", dport: 80}, 0, ReasonDenied},
			{"allowed private icmp to denied", pkt{proto: icmp, dst: "10.20.1.1"}, 0, ReasonDenied},
			{"allowed port to private", pkt{dst: "192.168.1.9", dport: 5432}, 0, ReasonPrivate},
			{"public to denied", pkt{dst: "1.2.3.4", dport: 443}, 0, ReasonDenied},
			{"public other port", pkt{dst: "1.2.3.4", dport: 80}, 0, 0},
			{"private stays private", pkt{dst: "10.21.0.1", dport: 80}, ReasonPrivate, ReasonPrivate},
		},
	}, {
		name: "deny removed",
		from: Policy{Egress: true, Deny: mustRules(t, "1.1.1.1", "8.8.8.0/24:53", "8.8.0.0/16:1000-2000")},
		to:   Policy{Egress: true, Deny: mustRules(t, "8.8.8.0/24:53")},
		cases: []updateCase{
			{"removed /32", pkt{dst: "1.1.1.1", dport: 443}, ReasonDenied, 0},
			{"removed /32 icmp", pkt{proto: icmp, dst: "1.1.1.1"}, ReasonDenied, 0},
			{"removed covering range", pkt{dst: "8.8.9.9", dport: 1500}, ReasonDenied, 0},
			{"removed range under kept prefix", pkt{dst: "8.8.8.8", dport: 1500}, ReasonDenied, 0},
			{"kept", pkt{proto: udp, dst: "8.8.8.8", dport: 53}, ReasonDenied, ReasonDenied},
		},
	}, {
		name: "ports changed",
		from: Policy{Egress: true, Allow: mustRules(t, "192.168.1.0/24:5432", "10.200.5.0/24:8080"), Deny: mustRules(t, "8.8.8.0/24:53")},
		to:   Policy{Egress: true, Allow: mustRules(t, "192.168.1.0/24:6000-6010", "10.200.5.0/24:9090"), Deny: mustRules(t, "8.8.8.0/24:853")},
		cases: []updateCase{
			{"old allowed port", pkt{dst: "192.168.1.5", dport: 5432}, 0, ReasonPrivate},
			{"new allowed port", pkt{dst: "192.168.1.5", dport: 6005}, ReasonPrivate, 0},
			{"new allowed range end", pkt{dst: "192.168.1.5", dport: 6010}, ReasonPrivate, 0},
			{"past new range", pkt{dst: "192.168.1.5", dport: 6011}, ReasonPrivate, ReasonPrivate},
			{"sandbox old port", pkt{dst: "10.200.5.7", dport: 8080}, 0, ReasonSandbox},
			{"sandbox new port", pkt{dst: "10.200.5.7", dport: 9090}, ReasonSandbox, 0},
			{"old denied port", pkt{proto: udp, dst: "8.8.8.8", dport: 53}, ReasonDenied, 0},
			{"new denied port", pkt{dst: "8.8.8.8", dport: 853}, 0, ReasonDenied},
		},
	}, {
		name: "egress off to on",
		from: Policy{Egress: false, Allow: mustRules(t, "0.0.0.0/0")},
		to:   Policy{Egress: true, Allow: mustRules(t, "192.168.1.0/24"), Deny: mustRules(t, "1.1.1.1")},
		cases: []updateCase{
			{"public", pkt{dst: "1.0.0.1", dport: 443}, ReasonNotAllowed, 0},
			{"arp", pkt{ethType: unix.ETH_P_ARP}, ReasonNotAllowed, 0},
			{"allowed private", pkt{dst: "192.168.1.5", dport: 22}, ReasonNotAllowed, 0},
			{"other private", pkt{dst: "192.168.2.5", dport: 22}, ReasonNotAllowed, ReasonPrivate},
			{"denied", pkt{dst: "1.1.1.1", dport: 443}, ReasonNotAllowed, ReasonDenied},
			{"host service", pkt{proto: udp, dst: "10.200.0.1", dport: 53}, ReasonNotAllowed, 0},
		},
	}, {
		name: "egress on to off",
		from: Policy{Egress: true, Allow: mustRules(t, "192.168.1.0/24")},
		to:   Policy{Egress: false, Allow: mustRules(t, "192.168.1.0/24")},
		cases: []updateCase{
			{"public", pkt{dst: "1.0.0.1", dport: 443}, 0, ReasonNotAllowed},
			{"allowed private", pkt{dst: "192.168.1.5", dport: 22}, 0, ReasonNotAllowed},
			{"arp", pkt{ethType: unix.ETH_P_ARP}, 0, ReasonNotAllowed},
		},
	}, {
		name: "nesting changed",
		from: Policy{Egress: true, Allow: mustRules(t, "10.0.0.0/8"), Deny: mustRules(t, "10.1.0.0/16")},
		to:   Policy{Egress: true, Allow: mustRules(t, "10.1.2.0/24"), Deny: mustRules(t, "10.0.0.0/8:22")},
		cases: []updateCase{
			{"was denied, now allowed", pkt{dst: "10.1.2.3", dport: 80}, ReasonDenied, 0},
			{"was denied, now private", pkt{dst: "10.1.3.3", dport: 80}, ReasonDenied, ReasonPrivate},
			{"was allowed, now private", pkt{dst: "10.5.0.1", dport: 80}, 0, ReasonPrivate},
			{"was allowed, now denied", pkt{dst: "10.5.0.1", dport: 22}, 0, ReasonDenied},
			{"deny beats allow", pkt{dst: "10.1.2.3", dport: 22}, ReasonDenied, ReasonDenied},
		},
	}, {
		name: "rules dropped",
		from: Policy{Egress: true, Allow: mustRules(t, "192.168.0.0/16", "172.16.0.0/12:80"), Deny: mustRules(t, "1.1.1.1")},
		to:   Policy{Egress: true},
		cases: []updateCase{
			{"was allowed", pkt{dst: "192.168.1.1", dport: 80}, 0, ReasonPrivate},
			{"was allowed port", pkt{dst: "172.16.1.1", dport: 80}, 0, ReasonPrivate},
			{"was denied", pkt{dst: "1.1.1.1", dport: 80}, ReasonDenied, 0},
		},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			a := storePolicy(t, m, 1, tc.from)
			want := Counters{Drops: map[Reason]uint64{}}
			run := func(phase string, fate func(updateCase) Reason) {
				t.Helper()
				for _, c := range tc.cases {
					data := c.pkt.bytes()
					got := runProg(t, m.objs.SandboxIngress, 1, data)
					if r := fate(c); r == 0 {
						want.BytesOut += uint64(len(data) - 14)
						want.PacketsOut++
						if got != verdictPass {
							t.Errorf("%s: %s: verdict %#x, want pass", phase, c.name, got)
						}
					} else {
						want.Drops[r]++
						if got != verdictDrop {
							t.Errorf("%s: %s: verdict %#x, want drop (%v)", phase, c.name, got, r)
						}
					}
				}
				if diff := cmp.Diff(want, counters(t, a)); diff != "" {
					t.Errorf("%s: counters (-want +got):\n%s", phase, diff)
				}
			}
			run("before", func(c updateCase) Reason { return c.before })
			if err := a.Update(tc.to); err != nil {
				t.Fatalf("Update: %v", err)
			}
			// The counters survive the Update untouched.
			if diff := cmp.Diff(want, counters(t, a)); diff != "" {
				t.Errorf("right after Update: counters (-want +got):\n%s", diff)
			}
			run("after", func(c updateCase) Reason { return c.after })

			// Stale entries are gone; with egress off the rules stay as
			// they were (unused).
			kept := tc.to
			if !tc.to.Egress {
				kept = tc.from
			}
			entries, err := buildEntries(kept)
			if err != nil {
				t.Fatal(err)
			}
			if got := dumpRules(t, m); !maps.Equal(got, wantRules(a, entries)) {
				t.Errorf("rules map after Update: %d entries %v, want %d", len(got), got, len(entries))
			}
		})
	}
}

// ruleVal is e as the generated type.
func ruleVal(e lpmEntry) egressRuleVal {
	var v egressRuleVal
	v.AllowN, v.DenyN = uint32(len(e.allow)), uint32(len(e.deny))
	fill := func(dst []egressPortRule, rs []portRule) {
		for i, r := range rs {
			dst[i] = egressPortRule{Lo: r.lo, Hi: r.hi, Plen: r.plen}
			if r.any {
				dst[i].AnyPort = 1
			}
		}
	}
	fill(v.Allow[:], e.allow)
	fill(v.Deny[:], e.deny)
	return v
}

// TestRuleValBytes: the hand encoding of struct rule_val matches the
// generated type's.
func TestRuleValBytes(t *testing.T) {
	if got := int(unsafe.Sizeof(egressRuleVal{})); got != ruleValSize {
		t.Fatalf("sizeof(rule_val) = %d, want %d", got, ruleValSize)
	}
	entries, err := buildEntries(Policy{
		Allow: mustRules(t, "10.0.0.0/8:80-90", "10.1.0.0/16", "10.1.2.0/24:22"),
		Deny:  mustRules(t, "0.0.0.0/0:25", "10.1.2.0/24:65535"),
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		want, err := binary.Append(nil, binary.NativeEndian, ruleVal(e))
		if err != nil {
			t.Fatal(err)
		}
		if got := ruleValBytes(e); !slices.Equal(got, want) {
			t.Errorf("%s: ruleValBytes\n got %x\nwant %x", e.prefix, got, want)
		}
	}
}

// wantRules is the rules map content entries give for a.
func wantRules(a *Attachment, entries []lpmEntry) map[egressRuleKey]egressRuleVal {
	out := map[egressRuleKey]egressRuleVal{}
	for _, e := range entries {
		out[a.ruleKey(e.prefix)] = ruleVal(e)
	}
	return out
}

func dumpRules(t testing.TB, m *Manager) map[egressRuleKey]egressRuleVal {
	t.Helper()
	out := map[egressRuleKey]egressRuleVal{}
	var k egressRuleKey
	var v egressRuleVal
	it := m.objs.Rules.Iterate()
	for it.Next(&k, &v) {
		out[k] = v
	}
	if err := it.Err(); err != nil {
		t.Fatalf("iterating rules: %v", err)
	}
	return out
}

func dumpPolicies(t testing.TB, m *Manager) map[uint32]egressPolicy {
	t.Helper()
	out := map[uint32]egressPolicy{}
	var k uint32
	var v egressPolicy
	it := m.objs.Policies.Iterate()
	for it.Next(&k, &v) {
		out[k] = v
	}
	if err := it.Err(); err != nil {
		t.Fatalf("iterating policies: %v", err)
	}
	return out
}

// TestUpdateInvalid: an Update with an invalid policy is an InvalidArgument
// error and changes neither the maps nor any verdict.
func TestUpdateInvalid(t *testing.T) {
	testutil.RequirePrivileged(t)
	m := newManager(t)
	if err := m.SetGlobal(testGlobal); err != nil {
		t.Fatal(err)
	}
	p := Policy{Egress: true, Allow: mustRules(t, "192.168.1.0/24:5432"), Deny: mustRules(t, "1.1.1.1", "8.8.8.0/24:53")}
	a := storePolicy(t, m, 1, p)
	probes := []pkt{
		{dst: "192.168.1.5", dport: 5432}, {dst: "192.168.1.5", dport: 80}, {dst: "1.1.1.1", dport: 443},
		{proto: unix.IPPROTO_UDP, dst: "8.8.8.8", dport: 53}, {dst: "1.0.0.1", dport: 443},
	}
	verdicts := func() []uint32 {
		var out []uint32
		for _, pk := range probes {
			out = append(out, runProg(t, m.objs.SandboxIngress, 1, pk.bytes()))
		}
		return out
	}
	rules, pols, vs := dumpRules(t, m), dumpPolicies(t, m), verdicts()

	var many []Rule
	for i := range maxPortRules + 1 {
		many = append(many, Rule{Prefix: netip.MustParsePrefix("1.2.3.0/24"), Ports: PortRange{uint16(10 * (i + 1)), uint16(10*(i+1) + 1)}})
	}
	good := mustRules(t, "10.0.0.0/8", "1.2.3.4:80")
	for _, bad := range []struct {
		name string
		p    Policy
	}{
		{"ipv6 allow after good rules", Policy{Egress: true, Allow: append(slices.Clone(good), Rule{Prefix: netip.MustParsePrefix("2001:db8::/32")})}},
		{"host bits in deny", Policy{Egress: true, Allow: good, Deny: []Rule{{Prefix: netip.PrefixFrom(netip.MustParseAddr("10.1.2.3"), 8)}}}},
		{"bad port range", Policy{Egress: true, Deny: []Rule{{Prefix: netip.MustParsePrefix("10.0.0.0/8"), Ports: PortRange{90, 80}}}}},
		{"too many deny ranges", Policy{Egress: true, Allow: good, Deny: many}},
		{"too many allow ranges, egress off", Policy{Egress: false, Allow: many}},
		{"zero rule", Policy{Egress: true, Allow: []Rule{{}}}},
	} {
		if err := a.Update(bad.p); !errs.IsInvalid(err) {
			t.Errorf("%s: Update error = %v, want invalid_argument", bad.name, err)
		}
		if got := dumpRules(t, m); !maps.Equal(got, rules) {
			t.Errorf("%s: rules map changed: %v, want %v", bad.name, got, rules)
		}
		if got := dumpPolicies(t, m); !maps.Equal(got, pols) {
			t.Errorf("%s: policies map changed: %v, want %v", bad.name, got, pols)
		}
		if got := verdicts(); !slices.Equal(got, vs) {
			t.Errorf("%s: verdicts %#x, want %#x", bad.name, got, vs)
		}
	}
	// The attachment still updates after the failures.
	if err := a.Update(Policy{Egress: true}); err != nil {
		t.Fatalf("Update after failed ones: %v", err)
	}
	if got := runProg(t, m.objs.SandboxIngress, 1, probes[2].bytes()); got != verdictPass {
		t.Errorf("to 1.1.1.1 after Update: verdict %#x, want pass", got)
	}
}

// TestUpdateClosed: Update after Close (of the attachment or its manager)
// fails and writes nothing back into the maps.
func TestUpdateClosed(t *testing.T) {
	testutil.RequirePrivileged(t)
	m := newManager(t)
	a := storePolicy(t, m, 1, Policy{Egress: true, Deny: mustRules(t, "1.1.1.1")})
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	err := a.Update(Policy{Egress: true, Allow: mustRules(t, "10.0.0.0/8")})
	if !errs.Is(err, errs.KindFailedPrecondition) {
		t.Errorf("Update after Close: error = %v, want failed_precondition", err)
	}
	if n := len(dumpRules(t, m)); n != 0 {
		t.Errorf("rules map has %d entries after a closed Update, want 0", n)
	}
	if n := len(dumpPolicies(t, m)); n != 0 {
		t.Errorf("policies map has %d entries after a closed Update, want 0", n)
	}

	m2, err := New(nil)
	if err != nil {
		t.Fatal(err)
	}
	b := storePolicy(t, m2, 1, Policy{Egress: true})
	if err := m2.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.Update(Policy{Egress: true}); !errs.Is(err, errs.KindFailedPrecondition) {
		t.Errorf("Update after Manager.Close: error = %v, want failed_precondition", err)
	}
}

// TestUpdateNoMix updates the policy round a cycle while another CPU runs
// the program on a packet (10.1.0.1:80) every policy of the cycle drops but
// a mix of two of them would pass: one policy's allow rules with another's
// deny rules, or one policy's covering entry without its longer one. None
// may pass.
func TestUpdateNoMix(t *testing.T) {
	testutil.RequirePrivileged(t)
	for _, tc := range []struct {
		name       string
		cycle      []Policy
		minUpdates int
	}{{
		// Only values change: map writes alone, no grace period.
		name: "same prefixes",
		cycle: []Policy{
			{Egress: true, Allow: mustRules(t, "10.0.0.0/8"), Deny: mustRules(t, "10.1.0.0/16")},
			{Egress: true, Allow: mustRules(t, "10.0.0.0/8:22"), Deny: mustRules(t, "10.1.0.0/16:443")},
			{Egress: true, Allow: mustRules(t, "10.0.0.0/8:80"), Deny: mustRules(t, "10.1.0.0/16:80")},
			{Egress: false, Allow: mustRules(t, "10.0.0.0/8"), Deny: mustRules(t, "10.1.0.0/16:22")},
		},
		minUpdates: 5000,
	}, {
		// Prefixes come and go: deletes after a grace period.
		name: "prefixes come and go",
		cycle: []Policy{
			{Egress: true, Allow: mustRules(t, "10.0.0.0/8", "10.1.2.0/24:443"), Deny: mustRules(t, "10.1.0.0/16", "8.8.8.8")},
			{Egress: true, Allow: mustRules(t, "10.2.0.0/16", "10.1.2.0/24:8443")},
			{Egress: true, Allow: mustRules(t, "10.1.0.0/16:443", "10.0.0.0/8:22"), Deny: mustRules(t, "0.0.0.0/0:80")},
			{Egress: false},
		},
		minUpdates: 200,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			m := newManager(t)
			if err := m.SetGlobal(testGlobal); err != nil {
				t.Fatal(err)
			}
			a := storePolicy(t, m, 1, tc.cycle[0])
			data := pkt{dst: "10.1.0.1", dport: 80}.bytes()
			opts := &ebpf.RunOptions{Data: data, Context: skbContext{Ifindex: 1}, Repeat: 200}

			var (
				wg      sync.WaitGroup
				mu      sync.Mutex
				updates int
				updErr  error
			)
			stop := make(chan struct{})
			wg.Go(func() {
				for i := 1; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					err := a.Update(tc.cycle[i%len(tc.cycle)])
					mu.Lock()
					updates, updErr = i, err
					mu.Unlock()
					if err != nil {
						return
					}
				}
			})
			var runs uint64
			start := time.Now()
			for {
				mu.Lock()
				n, err := updates, updErr
				mu.Unlock()
				if err != nil || n >= tc.minUpdates && time.Since(start) > 500*time.Millisecond || time.Since(start) > 30*time.Second {
					break
				}
				if _, err := m.objs.SandboxIngress.Run(opts); err != nil {
					close(stop)
					wg.Wait()
					t.Fatal(err)
				}
				runs += uint64(opts.Repeat)
			}
			close(stop)
			wg.Wait()
			if updErr != nil {
				t.Fatalf("Update: %v", updErr)
			}
			c := counters(t, a)
			var drops uint64
			for _, n := range c.Drops {
				drops += n
			}
			t.Logf("%d packets during %d updates in %v; drops %v", runs, updates, time.Since(start).Round(time.Millisecond), c.Drops)
			// A test run interrupted by a signal is rerun whole, so the
			// program may have run more often than counted here.
			if c.PacketsOut != 0 || drops < runs {
				t.Errorf("%d packets passed and %d dropped of at least %d, want none to pass", c.PacketsOut, drops, runs)
			}
			if updates < tc.minUpdates {
				t.Errorf("only %d updates ran alongside the packets, want at least %d", updates, tc.minUpdates)
			}
		})
	}
}

// TestUpdateAttached updates the policy of a real attached veth: the same
// programs stay attached (no detach) and real traffic follows the new
// policy at once.
func TestUpdateAttached(t *testing.T) {
	testutil.RequirePrivileged(t)
	for _, mode := range []string{"tcx", "tc"} {
		t.Run(mode, func(t *testing.T) {
			tn := newTestNet(t)
			startServers(t, tn.host)
			m := newManager(t)
			m.forceLegacy = mode == "tc"
			var a *Attachment
			if err := inNetns(tn.host, func() error {
				var err error
				a, err = m.Attach(tn.ifindex, Policy{Egress: true, Deny: mustRules(t, internet.String()+"/32:9000")})
				return err
			}); err != nil {
				t.Fatal(err)
			}
			progs := attachedPrograms(t, tn, mode)
			reach := func(to netip.Addr) error {
				c, err := dial(tn.sandbox, "tcp4", netip.AddrPortFrom(to, 9000), 300*time.Millisecond)
				if err == nil {
					c.Close()
				}
				return err
			}
			if err := reach(internet); err == nil {
				t.Fatalf("before Update: reached the denied %s:9000", internet)
			}
			if err := reach(internetDn); err != nil {
				t.Fatalf("before Update: %s:9000: %v", internetDn, err)
			}
			before := counters(t, a)
			if before.Drops[ReasonDenied] == 0 || before.PacketsOut == 0 {
				t.Fatalf("before Update: counters %+v, want denied drops and packets out", before)
			}

			if err := a.Update(Policy{Egress: true, Deny: mustRules(t, internetDn.String()+"/32:9000")}); err != nil {
				t.Fatalf("Update: %v", err)
			}
			if got := attachedPrograms(t, tn, mode); !slices.Equal(got, progs) {
				t.Errorf("after Update: attached %v, want the same %v", got, progs)
			}
			if err := reach(internet); err != nil {
				t.Errorf("after Update: %s:9000: %v", internet, err)
			}
			if err := reach(internetDn); err == nil {
				t.Errorf("after Update: reached the now denied %s:9000", internetDn)
			}
			after := counters(t, a)
			if after.PacketsOut <= before.PacketsOut || after.BytesOut <= before.BytesOut || after.Drops[ReasonDenied] <= before.Drops[ReasonDenied] {
				t.Errorf("counters after Update %+v did not run on from %+v", after, before)
			}

			if err := a.Update(Policy{Egress: false}); err != nil {
				t.Fatalf("Update to egress off: %v", err)
			}
			if err := reach(internet); err == nil {
				t.Errorf("egress off: reached %s:9000", internet)
			}
			if err := a.Close(); err != nil {
				t.Fatal(err)
			}
			if n := len(dumpRules(t, m)); n != 0 {
				t.Errorf("after Close: %d rules entries left", n)
			}
		})
	}
}

// BenchmarkUpdate measures replacing a sandbox's policy in place: each
// iteration times one update from a to b.
func BenchmarkUpdate(b *testing.B) {
	testutil.RequirePrivileged(b)
	m := newManager(b)
	many := func(base int) []string {
		var out []string
		for i := range 25 {
			out = append(out, fmt.Sprintf("192.168.%d.0/24:%d", i, base+i))
		}
		return out
	}
	dns := "10.200.0.1:53"
	for _, c := range []struct {
		name string
		a, b Policy
	}{
		// The jail's cold start: the default policy a pre-started sandbox
		// carries, to a function's own rules (no prefix goes away).
		{"default-to-function-rules", Policy{Egress: true, Allow: mustRules(b, dns)},
			Policy{Egress: true, Allow: mustRules(b, dns, "192.168.1.0/24:5432", "172.16.0.0/12"), Deny: mustRules(b, "1.1.1.1", "8.8.8.0/24:53")}},
		{"50-rules-ports-changed", Policy{Egress: true, Allow: mustRules(b, many(5000)...), Deny: mustRules(b, many(7000)...)},
			Policy{Egress: true, Allow: mustRules(b, many(6000)...), Deny: mustRules(b, many(8000)...)}},
		{"egress-on-to-off", Policy{Egress: true, Allow: mustRules(b, dns)}, Policy{Egress: false}},
		{"egress-off-to-on", Policy{Egress: false}, Policy{Egress: true, Allow: mustRules(b, dns)}},
		// Prefixes go away: an RCU grace period before deleting them.
		{"prefixes-removed", Policy{Egress: true, Allow: mustRules(b, dns, "192.168.1.0/24:5432")},
			Policy{Egress: true, Allow: mustRules(b, dns, "172.16.0.0/12")}},
	} {
		b.Run(c.name, func(b *testing.B) {
			for b.Loop() {
				// Untimed: a fresh attachment holding a (Close deletes its
				// entries without waiting for a grace period).
				b.StopTimer()
				a, err := storePolicyErr(m, 1, c.a)
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				if err := a.Update(c.b); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if err := a.Close(); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}
