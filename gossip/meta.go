package gossip

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sort"

	"github.com/hashicorp/memberlist"
)

// MaxMetaSize is memberlist's limit on a node's metadata: tags plus the
// capacity summary must fit in it.
const MaxMetaSize = memberlist.MetaMaxSize

// metaVersion is the first byte of every encoded metadata blob.
const metaVersion = 1

// Role says what a member runs.
type Role uint8

// Roles.
const (
	RoleUnknown Role = iota
	RoleAgent
	RoleGateway
)

func (r Role) String() string {
	switch r {
	case RoleAgent:
		return "agent"
	case RoleGateway:
		return "gateway"
	default:
		return "unknown"
	}
}

// Tags describe a member. They travel in its metadata.
type Tags struct {
	Role    Role
	Version string // skiff version
	Zone    string
	Rack    string
	RPCAddr string // host:port of the member's Connect service
}

// Capacity is what an agent reports about itself. WarmIdle and CodeDigests
// are summarised before they travel: only the TopN function versions with
// the most idle sandboxes, and the digests as a Bloom filter.
type Capacity struct {
	MemoryTotalMB int64
	MemoryFreeMB  int64
	CPUTotalMilli int64
	CPUFreeMilli  int64
	Sandboxes     int // all sandboxes on the host
	Busy          int // sandboxes running an invocation
	Idle          int // warm idle sandboxes
	// Load is the host's load, normally in [0, 1] (busy CPU fraction or
	// load average per core); it travels with 1/1000 precision.
	Load float64
	// WarmIdle counts idle sandboxes per function version key (for
	// example "name:version" or the agent's configuration key).
	WarmIdle map[string]int
	// CodeDigests are the code digests the host has unpacked.
	CodeDigests []string
}

// Summary is a decoded capacity: the scalar fields of Capacity plus lookups
// into the summarised warm map and code filter. It is immutable.
type Summary struct {
	MemoryTotalMB int64
	MemoryFreeMB  int64
	CPUTotalMilli int64
	CPUFreeMilli  int64
	Sandboxes     int
	Busy          int
	Idle          int
	Load          float64

	warm  []warmKey // key hash and idle count, top N only (a few: a scan beats a map)
	bloom []byte
}

type warmKey struct {
	key uint64
	n   int
}

// Key is a function version key or a code digest hashed for summary
// lookups: hash it once with KeyOf and look it up in many summaries
// (placement does, over every host, for every decision).
type Key uint64

// KeyOf hashes a function version key or a code digest.
func KeyOf(s string) Key { return Key(hashKey(s)) }

// WarmIdle reports the idle warm sandboxes of a function version on the
// host, 0 when the version is not among the host's top N.
func (s *Summary) WarmIdle(function string) int {
	if s == nil || len(s.warm) == 0 {
		return 0
	}
	return s.WarmIdleKey(KeyOf(function))
}

// WarmIdleKey is WarmIdle with the key hashed by KeyOf.
func (s *Summary) WarmIdleKey(k Key) int {
	if s == nil {
		return 0
	}
	for _, e := range s.warm {
		if e.key == uint64(k) {
			return e.n
		}
	}
	return 0
}

// WarmCount is the number of function versions in the warm summary.
func (s *Summary) WarmCount() int {
	if s == nil {
		return 0
	}
	return len(s.warm)
}

// HasCode reports whether the host probably caches the digest (a Bloom
// filter: false positives are possible, false negatives are not).
func (s *Summary) HasCode(digest string) bool {
	if s == nil || len(s.bloom) == 0 {
		return false
	}
	return bloomHas(s.bloom, hashKey(digest))
}

// HasCodeKey is HasCode with the digest hashed by KeyOf.
func (s *Summary) HasCodeKey(k Key) bool {
	if s == nil || len(s.bloom) == 0 {
		return false
	}
	return bloomHas(s.bloom, uint64(k))
}

// summaryLimits bound the travelling form of a Capacity.
type summaryLimits struct {
	warmTopN   int
	bloomBytes int
}

// hashKey is the stable 64-bit hash used for warm keys and the filter.
// (FNV-1a 64, inlined: no allocation on placement's hot path.)
func hashKey(s string) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= 1099511628211
	}
	return h
}

// bloomHashes is the number of filter probes per digest.
const bloomHashes = 4

// The filter's probes are a + i·b mod bits for i < bloomHashes, with a
// and b the two halves of the digest's hash.

func bloomAdd(bloom []byte, h uint64) {
	bits := uint32(len(bloom)) * 8
	a, b := uint32(h), uint32(h>>32)|1
	for i := uint32(0); i < bloomHashes; i++ {
		j := (a + i*b) % bits
		bloom[j/8] |= 1 << (j % 8)
	}
}

func bloomHas(bloom []byte, h uint64) bool {
	bits := uint32(len(bloom)) * 8
	a, b := uint32(h), uint32(h>>32)|1
	for i := uint32(0); i < bloomHashes; i++ {
		j := (a + i*b) % bits
		if bloom[j/8]&(1<<(j%8)) == 0 {
			return false
		}
	}
	return true
}

// encodeMeta encodes tags and an optional capacity. It fails when the
// result exceeds MaxMetaSize.
func encodeMeta(t Tags, c *Capacity, lim summaryLimits) ([]byte, error) {
	b := make([]byte, 0, 256)
	b = append(b, metaVersion, 0, byte(t.Role))
	for _, s := range []string{t.Version, t.Zone, t.Rack, t.RPCAddr} {
		b = binary.AppendUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	if c == nil {
		b = append(b, 0)
	} else {
		b = append(b, 1)
		for _, v := range []int64{c.MemoryTotalMB, c.MemoryFreeMB, c.CPUTotalMilli, c.CPUFreeMilli, int64(c.Sandboxes), int64(c.Busy), int64(c.Idle)} {
			if v < 0 {
				return nil, fmt.Errorf("encoding capacity: negative value %d", v)
			}
			b = binary.AppendUvarint(b, uint64(v))
		}
		load := math.Round(c.Load * 1000)
		if math.IsNaN(load) || load < 0 {
			load = 0
		}
		b = binary.AppendUvarint(b, uint64(min(load, math.MaxUint32)))
		top := topWarm(c.WarmIdle, lim.warmTopN)
		b = binary.AppendUvarint(b, uint64(len(top)))
		for _, e := range top {
			b = binary.LittleEndian.AppendUint64(b, hashKey(e.key))
			b = binary.AppendUvarint(b, uint64(e.n))
		}
		if len(c.CodeDigests) == 0 || lim.bloomBytes == 0 {
			b = binary.AppendUvarint(b, 0)
		} else {
			bloom := make([]byte, lim.bloomBytes)
			for _, d := range c.CodeDigests {
				bloomAdd(bloom, hashKey(d))
			}
			b = binary.AppendUvarint(b, uint64(len(bloom)))
			b = append(b, bloom...)
		}
	}
	if len(b) > MaxMetaSize {
		return nil, fmt.Errorf("node metadata is %d bytes, more than memberlist's limit of %d (shorten the tags or lower WarmTopN/CodeFilterBytes)", len(b), MaxMetaSize)
	}
	return b, nil
}

type warmEntry struct {
	key string
	n   int
}

// topWarm returns the n entries with the largest counts (ties by key, so the
// encoding is deterministic), skipping counts ≤ 0.
func topWarm(m map[string]int, n int) []warmEntry {
	all := make([]warmEntry, 0, len(m))
	for k, v := range m {
		if v > 0 {
			all = append(all, warmEntry{k, v})
		}
	}
	sort.Slice(all, func(i, j int) bool {
		if all[i].n != all[j].n {
			return all[i].n > all[j].n
		}
		return all[i].key < all[j].key
	})
	if len(all) > n {
		all = all[:n]
	}
	return all
}

// Metadata flags (the byte after the version).
const (
	flagLeaving  = 1 << 0 // the member is leaving gracefully
	flagDraining = 1 << 1 // the member takes no new sandboxes
)

// metaFlags reads the flags byte of encoded metadata.
func metaFlags(b []byte) (version, flags byte, ok bool) {
	if len(b) < 2 {
		return 0, 0, false
	}
	return b[0], b[1], b[0] == metaVersion
}

// setMetaFlags returns a copy of encoded metadata with the flags byte set
// (a copy: memberlist may still hold the old slice).
func setMetaFlags(b []byte, flags byte) []byte {
	out := append([]byte(nil), b...)
	if len(out) >= 2 {
		out[1] = flags
	}
	return out
}

var errShortMeta = errors.New("truncated node metadata")

type metaReader struct {
	b   []byte
	err error
}

func (r *metaReader) byte() byte {
	if r.err != nil || len(r.b) < 1 {
		r.err = errShortMeta
		return 0
	}
	v := r.b[0]
	r.b = r.b[1:]
	return v
}

func (r *metaReader) uvarint() uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.err = errShortMeta
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *metaReader) bytes(n uint64) []byte {
	if r.err != nil || uint64(len(r.b)) < n {
		r.err = errShortMeta
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

// decodeMeta is the inverse of encodeMeta. The capacity is nil when the
// member has not reported one.
func decodeMeta(b []byte) (Tags, *Summary, error) {
	var t Tags
	if len(b) == 0 {
		return t, nil, errShortMeta
	}
	r := &metaReader{b: b}
	if v := r.byte(); v != metaVersion {
		return t, nil, fmt.Errorf("node metadata version %d, want %d", v, metaVersion)
	}
	r.byte() // flags: see metaFlags
	t.Role = Role(r.byte())
	strs := []*string{&t.Version, &t.Zone, &t.Rack, &t.RPCAddr}
	for _, s := range strs {
		*s = string(r.bytes(r.uvarint()))
	}
	if r.byte() == 0 || r.err != nil {
		return t, nil, r.err
	}
	s := &Summary{}
	s.MemoryTotalMB = int64(r.uvarint())
	s.MemoryFreeMB = int64(r.uvarint())
	s.CPUTotalMilli = int64(r.uvarint())
	s.CPUFreeMilli = int64(r.uvarint())
	s.Sandboxes = int(r.uvarint())
	s.Busy = int(r.uvarint())
	s.Idle = int(r.uvarint())
	s.Load = float64(r.uvarint()) / 1000
	n := r.uvarint()
	if n > MaxMetaSize {
		return t, nil, fmt.Errorf("node metadata: %d warm entries", n)
	}
	if n > 0 {
		s.warm = make([]warmKey, 0, min(n, uint64(len(r.b)/9)))
	}
	for i := uint64(0); i < n && r.err == nil; i++ {
		k := r.bytes(8)
		if r.err != nil {
			break
		}
		s.warm = append(s.warm, warmKey{binary.LittleEndian.Uint64(k), int(r.uvarint())})
	}
	if bl := r.bytes(r.uvarint()); len(bl) > 0 {
		s.bloom = append([]byte(nil), bl...)
	}
	if r.err != nil {
		return t, nil, r.err
	}
	return t, s, nil
}

// Summarize returns the summary other members would decode from c, with
// the given bounds (0 means the default): for an agent's own view and for
// tests and simulations.
func Summarize(c Capacity, warmTopN, codeFilterBytes int) (*Summary, error) {
	if warmTopN == 0 {
		warmTopN = DefaultWarmTopN
	}
	if codeFilterBytes == 0 {
		codeFilterBytes = DefaultCodeFilterBytes
	}
	b, err := encodeMeta(Tags{}, &c, summaryLimits{warmTopN: warmTopN, bloomBytes: codeFilterBytes})
	if err != nil {
		return nil, err
	}
	_, s, err := decodeMeta(b)
	return s, err
}
