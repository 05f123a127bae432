package netns

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// firewall is skiff's own nftables table (family ip) for one agent:
//
//	table ip skiff_<tag> {
//	  chain forward {
//	    type filter hook forward priority filter; policy accept;
//	    iifname "sk<tag>*" oifname "sk<tag>*" drop    # sandbox to sandbox
//	    iifname "sk<tag>*" accept                     # sandbox egress
//	    oifname "sk<tag>*" ct state established,related accept
//	    oifname "sk<tag>*" drop                       # nothing connects in
//	  }
//	  chain postrouting {
//	    type nat hook postrouting priority srcnat; policy accept;
//	    ip saddr <subnet> oifname != "sk<tag>*" masquerade
//	  }
//	}
//
// The eBPF programs on each veth enforce the egress policy; these rules
// add NAT and keep the sandboxes unreachable from outside. Names compared
// without their terminating NUL match as a prefix, like "sk<tag>*" in nft.
type firewall struct {
	table      string
	linkPrefix string
	subnet     netip.Prefix
}

func (f firewall) tableRef() *nftables.Table {
	return &nftables.Table{Name: f.table, Family: nftables.TableFamilyIPv4}
}

// install replaces the table atomically (one netlink batch): whatever a
// previous run left there is gone afterwards.
func (f firewall) install() error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	// Adding before deleting makes the delete succeed when the table is
	// missing; the whole batch applies atomically.
	c.AddTable(f.tableRef())
	c.DelTable(f.tableRef())
	t := c.AddTable(f.tableRef())
	accept := nftables.ChainPolicyAccept
	fwd := c.AddChain(&nftables.Chain{
		Name: "forward", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept,
	})
	post := c.AddChain(&nftables.Chain{
		Name: "postrouting", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource, Policy: &accept,
	})
	drop := &expr.Verdict{Kind: expr.VerdictDrop}
	acc := &expr.Verdict{Kind: expr.VerdictAccept}
	rules := []struct {
		chain *nftables.Chain
		exprs [][]expr.Any
	}{
		{fwd, [][]expr.Any{ifname(expr.MetaKeyIIFNAME, f.linkPrefix, true), ifname(expr.MetaKeyOIFNAME, f.linkPrefix, true), {drop}}},
		{fwd, [][]expr.Any{ifname(expr.MetaKeyIIFNAME, f.linkPrefix, true), {acc}}},
		{fwd, [][]expr.Any{ifname(expr.MetaKeyOIFNAME, f.linkPrefix, true), ctState(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED), {acc}}},
		{fwd, [][]expr.Any{ifname(expr.MetaKeyOIFNAME, f.linkPrefix, true), {drop}}},
		{post, [][]expr.Any{saddrIn(f.subnet), ifname(expr.MetaKeyOIFNAME, f.linkPrefix, false), {&expr.Masq{}}}},
	}
	for _, r := range rules {
		var ex []expr.Any
		for _, e := range r.exprs {
			ex = append(ex, e...)
		}
		c.AddRule(&nftables.Rule{Table: t, Chain: r.chain, Exprs: ex})
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("installing nftables table %s: %w", f.table, err)
	}
	return nil
}

// remove deletes the table; a missing table is success.
func (f firewall) remove() error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	c.AddTable(f.tableRef())
	c.DelTable(f.tableRef())
	if err := c.Flush(); err != nil {
		return fmt.Errorf("deleting nftables table %s: %w", f.table, err)
	}
	return nil
}

// exists reports whether the table is present.
func (f firewall) exists() (bool, error) {
	c, err := nftables.New()
	if err != nil {
		return false, fmt.Errorf("nftables: %w", err)
	}
	_, err = c.ListTableOfFamily(f.table, nftables.TableFamilyIPv4)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.ENOENT):
		return false, nil
	}
	return false, err
}

// ifname matches an interface name starting with prefix (eq) or not (!eq).
func ifname(key expr.MetaKey, prefix string, eq bool) []expr.Any {
	op := expr.CmpOpEq
	if !eq {
		op = expr.CmpOpNeq
	}
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: []byte(prefix)},
	}
}

// saddrIn matches an IPv4 source address in p.
func saddrIn(p netip.Prefix) []expr.Any {
	m := make([]byte, 4)
	for i := 0; i < p.Bits(); i++ {
		m[i/8] |= 0x80 >> (i % 8)
	}
	a := p.Masked().Addr().As4()
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: m, Xor: []byte{0, 0, 0, 0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: a[:]},
	}
}

// ctState matches connections in any of the given states.
func ctState(bits uint32) []expr.Any {
	le := binaryutil.NativeEndian.PutUint32 // conntrack state is a host-order u32
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: le(bits), Xor: le(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: le(0)},
	}
}
