package netns

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"
)

// BlockBits is the size of the address block each sandbox gets: a /30,
// with the network address, the host side (.1), the sandbox side (.2) and
// the broadcast address.
const BlockBits = 30

// Block is one sandbox's address block.
type Block struct {
	Index  int          // position in the subnet; names the sandbox's link
	Prefix netip.Prefix // the /30
	Host   netip.Addr   // host side of the veth: the sandbox's gateway
	Peer   netip.Addr   // sandbox side of the veth
}

// Blocks hands out the /30 blocks of a subnet. A released block is reused
// only after every block never used has been handed out, and then oldest
// release first, so an address is reused as late as possible (conntrack
// entries of its previous owner expire meanwhile).
type Blocks struct {
	subnet netip.Prefix
	n      int // blocks in the subnet

	mu    sync.Mutex
	next  int          // guarded by mu: the first block never handed out
	freed []int        // guarded by mu: released blocks, oldest first
	used  map[int]bool // guarded by mu
}

// NewBlocks carves subnet (IPv4, at most a /30) into /30 blocks.
func NewBlocks(subnet netip.Prefix) (*Blocks, error) {
	if !subnet.IsValid() || !subnet.Addr().Is4() {
		return nil, fmt.Errorf("subnet %s: must be an IPv4 prefix", subnet)
	}
	if subnet.Bits() > BlockBits {
		return nil, fmt.Errorf("subnet %s: must be a /%d or larger", subnet, BlockBits)
	}
	if subnet.Bits() < 8 {
		return nil, fmt.Errorf("subnet %s: larger than a /8", subnet)
	}
	return &Blocks{subnet: subnet.Masked(), n: 1 << (BlockBits - subnet.Bits()), used: map[int]bool{}}, nil
}

// Subnet is the subnet the blocks are carved from.
func (b *Blocks) Subnet() netip.Prefix { return b.subnet }

// Len is the number of blocks in the subnet.
func (b *Blocks) Len() int { return b.n }

// ErrExhausted reports that every block is in use.
var ErrExhausted = errors.New("no free sandbox address block")

// Get reserves a block.
func (b *Blocks) Get() (Block, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var i int
	switch {
	case b.next < b.n:
		i = b.next
		b.next++
	case len(b.freed) > 0:
		i = b.freed[0]
		b.freed = b.freed[1:]
	default:
		return Block{}, fmt.Errorf("%w in %s (%d in use)", ErrExhausted, b.subnet, len(b.used))
	}
	b.used[i] = true
	return b.block(i), nil
}

// Put releases a block; releasing one that is not in use does nothing.
func (b *Blocks) Put(blk Block) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.used[blk.Index] {
		return
	}
	delete(b.used, blk.Index)
	b.freed = append(b.freed, blk.Index)
}

// InUse is the number of blocks reserved.
func (b *Blocks) InUse() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.used)
}

func (b *Blocks) block(i int) Block {
	base := b.subnet.Addr().As4()
	v := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
	v += uint32(i) << (32 - BlockBits)
	addr := func(off uint32) netip.Addr {
		x := v + off
		return netip.AddrFrom4([4]byte{byte(x >> 24), byte(x >> 16), byte(x >> 8), byte(x)})
	}
	return Block{Index: i, Prefix: netip.PrefixFrom(addr(0), BlockBits), Host: addr(1), Peer: addr(2)}
}
