package kinesis

import (
	"encoding/json"
	"fmt"
	"sort"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

// mapDoc is the shard map as stored in a map message. Values that depend
// on the message's own stream sequence F (unknown before it is stored) are
// written relative to it: StartSeq 0 means F+1 (created by this message)
// and Closing means CloseSeq F (closed by this message).
type mapDoc struct {
	Next   int        `json:"next"`
	Shards []shardDoc `json:"shards"`
}

type shardDoc struct {
	ID       string `json:"id"`
	Parent   string `json:"parent,omitempty"`
	Adjacent string `json:"adjacent,omitempty"`
	Start    string `json:"start"`
	End      string `json:"end"`
	StartSeq uint64 `json:"start_seq,omitempty"`
	CloseSeq uint64 `json:"close_seq,omitempty"`
	Closing  bool   `json:"closing,omitempty"`
}

// shard is a resolved shard: every record of the shard has a stream
// sequence in [startSeq, closeSeq) (closeSeq 0: open).
type shard struct {
	id, parent, adjacent string
	start, end           hashKey
	startSeq, closeSeq   uint64
}

func (s *shard) open() bool { return s.closeSeq == 0 }

// proto is the wire form. EndingSequenceNumber is the end of the closed
// shard's sequence range: no record of the shard has a greater one.
func (s *shard) proto() *skiffv1.Shard {
	p := &skiffv1.Shard{
		ShardId:                s.id,
		ParentShardId:          s.parent,
		AdjacentParentShardId:  s.adjacent,
		StartingHashKey:        s.start.String(),
		EndingHashKey:          s.end.String(),
		StartingSequenceNumber: formatSeq(s.startSeq),
		Open:                   s.open(),
	}
	if !s.open() {
		p.EndingSequenceNumber = formatSeq(s.closeSeq - 1)
	}
	return p
}

// shardMap is an immutable, resolved shard map: the one stored at stream
// sequence seq.
type shardMap struct {
	seq    uint64
	next   int
	shards []*shard          // in creation order
	byID   map[string]*shard // every shard
	open   []*shard          // open shards by start hash key
}

// decodeMap resolves the map message stored at seq.
func decodeMap(data []byte, seq uint64) (*shardMap, error) {
	var d mapDoc
	if err := json.Unmarshal(data, &d); err != nil {
		return nil, errs.Internal("decoding the shard map at sequence %d: %w", seq, err)
	}
	m := &shardMap{seq: seq, next: d.Next, byID: make(map[string]*shard, len(d.Shards))}
	for _, sd := range d.Shards {
		start, err := parseHashKey(sd.Start)
		if err != nil {
			return nil, errs.Internal("shard map at sequence %d: shard %s: %w", seq, sd.ID, err)
		}
		end, err := parseHashKey(sd.End)
		if err != nil {
			return nil, errs.Internal("shard map at sequence %d: shard %s: %w", seq, sd.ID, err)
		}
		sh := &shard{id: sd.ID, parent: sd.Parent, adjacent: sd.Adjacent, start: start, end: end, startSeq: sd.StartSeq, closeSeq: sd.CloseSeq}
		if sh.startSeq == 0 {
			sh.startSeq = seq + 1
		}
		if sd.Closing {
			sh.closeSeq = seq
		}
		m.shards = append(m.shards, sh)
		m.byID[sh.id] = sh
		if sh.open() {
			m.open = append(m.open, sh)
		}
	}
	sort.Slice(m.open, func(i, j int) bool { return m.open[i].start.cmp(m.open[j].start) < 0 })
	return m, nil
}

// route returns the open shard whose hash key range holds k.
func (m *shardMap) route(k hashKey) *shard {
	i := sort.Search(len(m.open), func(i int) bool { return m.open[i].end.cmp(k) >= 0 })
	if i < len(m.open) && m.open[i].start.cmp(k) <= 0 {
		return m.open[i]
	}
	return nil
}

// children returns the shards with id as parent or adjacent parent.
func (m *shardMap) children(id string) []string {
	var out []string
	for _, s := range m.shards {
		if s.parent == id || s.adjacent == id {
			out = append(out, s.id)
		}
	}
	return out
}

func (m *shardMap) protos() []*skiffv1.Shard {
	out := make([]*skiffv1.Shard, len(m.shards))
	for i, s := range m.shards {
		out[i] = s.proto()
	}
	return out
}

// editor builds the next map from a resolved one: the mutations of one
// reshard, stored atomically as one map message.
type editor struct {
	next   int
	shards []*shardEdit
	byID   map[string]*shardEdit
}

type shardEdit struct {
	d          shardDoc
	start, end hashKey
}

func (e *shardEdit) isOpen() bool { return e.d.CloseSeq == 0 && !e.d.Closing }

func newEditor(m *shardMap) *editor {
	e := &editor{next: m.next, byID: map[string]*shardEdit{}}
	for _, s := range m.shards {
		se := &shardEdit{start: s.start, end: s.end, d: shardDoc{
			ID: s.id, Parent: s.parent, Adjacent: s.adjacent,
			Start: s.start.String(), End: s.end.String(),
			StartSeq: s.startSeq, CloseSeq: s.closeSeq,
		}}
		e.shards = append(e.shards, se)
		e.byID[s.id] = se
	}
	return e
}

// newMapDoc is the map of a new stream with n uniform shards.
func newMapDoc(n int) mapDoc {
	e := &editor{byID: map[string]*shardEdit{}}
	for i := range n {
		end := maxHashKey
		if i < n-1 {
			end = uniformBound(i+1, n).dec()
		}
		e.add(uniformBound(i, n), end, "", "")
	}
	return e.doc()
}

func (e *editor) doc() mapDoc {
	d := mapDoc{Next: e.next}
	for _, s := range e.shards {
		d.Shards = append(d.Shards, s.d)
	}
	return d
}

func (e *editor) add(start, end hashKey, parent, adjacent string) *shardEdit {
	se := &shardEdit{start: start, end: end, d: shardDoc{
		ID: shardID(e.next), Parent: parent, Adjacent: adjacent, Start: start.String(), End: end.String(),
	}}
	e.next++
	e.shards = append(e.shards, se)
	e.byID[se.d.ID] = se
	return se
}

func (e *editor) openShards() []*shardEdit {
	var out []*shardEdit
	for _, s := range e.shards {
		if s.isOpen() {
			out = append(out, s)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].start.cmp(out[j].start) < 0 })
	return out
}

func (e *editor) openShard(field, id string) (*shardEdit, error) {
	s := e.byID[id]
	if s == nil {
		return nil, errs.NotFound("shard %s not found", id)
	}
	if !s.isOpen() {
		return nil, errs.Invalid(field, "shard %s is closed", id)
	}
	return s, nil
}

// split closes s and creates its two children [start, at-1] and [at, end].
func (e *editor) split(field string, s *shardEdit, at hashKey) (left, right *shardEdit, err error) {
	if at.cmp(s.start) <= 0 || at.cmp(s.end) > 0 {
		return nil, nil, errs.Invalid(field, "new starting hash key %s is not inside shard %s's range (%s, %s]", at, s.d.ID, s.start, s.end)
	}
	s.d.Closing = true
	left = e.add(s.start, at.dec(), s.d.ID, "")
	right = e.add(at, s.end, s.d.ID, "")
	return left, right, nil
}

// merge closes a and b (adjacent) and creates their child with parent a
// and adjacent parent b.
func (e *editor) merge(field string, a, b *shardEdit) (*shardEdit, error) {
	lo, hi := a, b
	if b.start.cmp(a.start) < 0 {
		lo, hi = b, a
	}
	if lo.end == maxHashKey || lo.end.inc() != hi.start {
		return nil, errs.Invalid(field, "shards %s and %s are not adjacent", a.d.ID, b.d.ID)
	}
	a.d.Closing, b.d.Closing = true, true
	return e.add(lo.start, hi.end, a.d.ID, b.d.ID), nil
}

// scale rescales the open shards to n shards of uniform ranges with splits
// and merges, as Kinesis's UNIFORM_SCALING does: every open shard is split
// at each uniform boundary inside it, then the pieces of each uniform
// range are merged left to right. It reports whether anything changed.
func (e *editor) scale(n int) (bool, error) {
	bounds := make([]hashKey, n+1)
	for i := range n {
		bounds[i] = uniformBound(i, n)
	}
	var pieces []*shardEdit
	changed := false
	for _, s := range e.openShards() {
		cur := s
		for i := 1; i < n; i++ {
			b := bounds[i]
			if b.cmp(cur.start) > 0 && b.cmp(cur.end) <= 0 {
				left, right, err := e.split("target_shard_count", cur, b)
				if err != nil {
					return false, err
				}
				pieces = append(pieces, left)
				cur = right
				changed = true
			}
		}
		pieces = append(pieces, cur)
	}
	interval := func(k hashKey) int {
		return sort.Search(n, func(i int) bool { return i+1 < n && bounds[i+1].cmp(k) > 0 || i+1 == n })
	}
	for i := 0; i < len(pieces); {
		j := i + 1
		acc := pieces[i]
		for j < len(pieces) && interval(pieces[j].start) == interval(acc.start) {
			m, err := e.merge("target_shard_count", acc, pieces[j])
			if err != nil {
				return false, err
			}
			acc = m
			changed = true
			j++
		}
		i = j
	}
	return changed, nil
}

func shardID(i int) string { return fmt.Sprintf("shardId-%012d", i) }
