package gossip

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// State is a member's state as this node sees it.
type State uint8

// Member states.
const (
	StateAlive State = iota
	// StateSuspect: a consumer could not reach the member (MarkSuspect);
	// it stays suspect until the member's next metadata update, a rejoin
	// or ClearSuspect. memberlist's own short suspicion phase is not
	// observable through its API without a data race; a member it
	// suspects becomes dead (EventFail) within the suspicion timeout.
	StateSuspect
	StateDead
	StateLeft
)

func (s State) String() string {
	switch s {
	case StateAlive:
		return "alive"
	case StateSuspect:
		return "suspect"
	case StateDead:
		return "dead"
	case StateLeft:
		return "left"
	default:
		return "unknown"
	}
}

// Member is one member of the cluster as this node sees it.
type Member struct {
	Name     string
	Addr     string // gossip address, host:port
	Tags     Tags
	State    State
	Capacity *Summary // nil until the member reports one
	Draining bool     // the member takes no new sandboxes (SetDraining)
}

// EventType says what happened to a member.
type EventType uint8

// Event types.
const (
	EventJoin    EventType = iota + 1 // a member joined (or rejoined)
	EventLeave                        // a member left gracefully
	EventFail                         // a member was declared dead
	EventUpdate                       // a member's tags or capacity changed
	EventMessage                      // a user message arrived (Event.Message)
)

func (t EventType) String() string {
	switch t {
	case EventJoin:
		return "join"
	case EventLeave:
		return "leave"
	case EventFail:
		return "fail"
	case EventUpdate:
		return "update"
	case EventMessage:
		return "message"
	default:
		return "unknown"
	}
}

// Event is a membership change or a user message.
type Event struct {
	Type    EventType
	Member  Member   // the member concerned (for EventMessage: zero)
	Message *Message // EventMessage only
}

// Node is this process's membership in the cluster.
type Node struct {
	cfg    Config
	lim    summaryLimits
	log    *slog.Logger
	ml     *memberlist.Memberlist
	addr   string // advertised host:port, read once at New
	bcasts *memberlist.TransmitLimitedQueue
	events *eventQueue

	metaMu sync.Mutex
	meta   []byte // guarded by metaMu
	flags  byte   // flagLeaving, flagDraining; guarded by metaMu

	mu      sync.Mutex
	members map[string]*Member // guarded by mu
	seen    map[string]uint64  // last message seq per origin+key; guarded by mu
	seq     uint64             // last seq this node sent; guarded by mu
	version uint64             // changes to members; guarded by mu

	updateCh chan struct{}
	done     chan struct{}
	wg       sync.WaitGroup
	stopOnce sync.Once
}

// New starts a member. It is alone until Join.
func New(cfg Config) (*Node, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg.Timers = cfg.Timers.withDefaults()
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.WarmTopN == 0 {
		cfg.WarmTopN = DefaultWarmTopN
	}
	if cfg.CodeFilterBytes == 0 {
		cfg.CodeFilterBytes = DefaultCodeFilterBytes
	}
	n := &Node{
		cfg:      cfg,
		lim:      summaryLimits{warmTopN: cfg.WarmTopN, bloomBytes: cfg.CodeFilterBytes},
		log:      cfg.Logger.With("component", "gossip", "member", cfg.Name),
		events:   newEventQueue(),
		members:  make(map[string]*Member),
		seen:     make(map[string]uint64),
		updateCh: make(chan struct{}, 1),
		done:     make(chan struct{}),
	}
	meta, err := encodeMeta(cfg.Tags, nil, n.lim)
	if err != nil {
		return nil, fmt.Errorf("gossip: tags: %w", err)
	}
	n.meta = meta

	mc := memberlist.DefaultLANConfig()
	mc.Name = cfg.Name
	mc.BindAddr = cfg.BindAddr
	if mc.BindAddr == "" {
		mc.BindAddr = "0.0.0.0"
	}
	mc.BindPort = cfg.BindPort
	mc.AdvertisePort = cfg.BindPort
	mc.Transport = cfg.Transport
	mc.SecretKey = cfg.Key
	mc.Delegate = (*delegate)(n)
	mc.Events = (*delegate)(n)
	mc.Logger = log.New(&logWriter{log: n.log}, "", 0)
	t := cfg.Timers
	mc.ProbeInterval = t.ProbeInterval
	mc.ProbeTimeout = t.ProbeTimeout
	mc.SuspicionMult = t.SuspicionMult
	mc.GossipInterval = t.GossipInterval
	mc.GossipNodes = t.GossipNodes
	mc.RetransmitMult = t.RetransmitMult
	mc.PushPullInterval = t.PushPullInterval
	mc.EnableCompression = cfg.Compress
	mc.TCPTimeout = 10 * time.Second // push/pull and joins; probes use their own deadline
	mc.GossipToTheDeadTime = max(10*t.ProbeInterval, time.Second)

	n.bcasts = &memberlist.TransmitLimitedQueue{
		NumNodes:       func() int { return n.numMembers() },
		RetransmitMult: t.RetransmitMult,
	}
	n.wg.Add(1)
	go n.events.run(n.done, &n.wg)

	ml, err := memberlist.Create(mc)
	if err != nil {
		n.stop()
		return nil, fmt.Errorf("gossip: starting memberlist: %w", err)
	}
	n.ml = ml
	// Read the local node once, before anything updates it: memberlist
	// returns a pointer into its state, which UpdateNode rewrites.
	ln := ml.LocalNode()
	n.addr = net.JoinHostPort(ln.Addr.String(), strconv.Itoa(int(ln.Port)))
	n.wg.Add(1)
	go n.updater()
	return n, nil
}

// Name is this member's name.
func (n *Node) Name() string { return n.cfg.Name }

// Addr is this member's gossip address (host:port), to give to others'
// Join.
func (n *Node) Addr() string { return n.addr }

// Join contacts the given members (host:port) and merges their state. It
// returns how many it reached; an error only when it reached none.
func (n *Node) Join(addrs []string) (int, error) {
	k, err := n.ml.Join(addrs)
	if k > 0 {
		return k, nil
	}
	if err != nil {
		return 0, fmt.Errorf("gossip: joining %v: %w", addrs, err)
	}
	return 0, fmt.Errorf("gossip: joining %v: no member reached", addrs)
}

// Leave tells the cluster this member is leaving and waits up to timeout
// for the message to go out. Call Shutdown afterwards.
func (n *Node) Leave(timeout time.Duration) error {
	start := time.Now()
	n.metaMu.Lock()
	n.flags |= flagLeaving
	n.meta = setMetaFlags(n.meta, n.flags)
	n.metaMu.Unlock()
	// Announce the intent first so that the others record a leave, not a
	// failure, when the member goes.
	if err := n.ml.UpdateNode(timeout / 3); err != nil {
		n.log.Debug("leave intent still propagating", "err", err)
	}
	n.pushIntent(timeout / 3)
	if err := n.ml.Leave(max(timeout-time.Since(start), time.Millisecond)); err != nil {
		return fmt.Errorf("gossip: leaving: %w", err)
	}
	return nil
}

// pushIntent also hands this member's state (its leave intent) to a few
// alive members over TCP (memberlist's push/pull exchange, which Join
// runs): the UDP broadcast can be lost or, on a loaded host, still be
// queued behind the leave itself, and then the others would record a
// failure instead of a leave. It waits at most timeout.
func (n *Node) pushIntent(timeout time.Duration) {
	var addrs []string
	for _, m := range n.Members() {
		if m.Name != n.cfg.Name && m.State == StateAlive && m.Addr != "" {
			addrs = append(addrs, m.Addr)
			if len(addrs) == 3 {
				break
			}
		}
	}
	if len(addrs) == 0 || timeout <= 0 {
		return
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if _, err := n.ml.Join(addrs); err != nil {
			n.log.Debug("pushing the leave intent", "err", err)
		}
	}()
	select {
	case <-done:
	case <-time.After(timeout):
	}
}

// Shutdown stops the member without a leave message: the others detect it
// as failed. The Events channel is closed.
func (n *Node) Shutdown() error {
	err := n.ml.Shutdown()
	n.stop()
	if err != nil {
		return fmt.Errorf("gossip: shutdown: %w", err)
	}
	return nil
}

func (n *Node) stop() {
	n.stopOnce.Do(func() { close(n.done) })
	n.wg.Wait()
}

// Events delivers membership changes and user messages in order. Nothing is
// dropped: events queue in memory until read, so read them.
func (n *Node) Events() <-chan Event { return n.events.out }

// SetCapacity replaces this member's capacity summary. It fails, changing
// nothing, when tags plus summary exceed MaxMetaSize. Broadcasts are
// coalesced to one per Timers.UpdateInterval.
func (n *Node) SetCapacity(c Capacity) error {
	meta, err := encodeMeta(n.cfg.Tags, &c, n.lim)
	if err != nil {
		return fmt.Errorf("gossip: capacity: %w", err)
	}
	n.metaMu.Lock()
	n.meta = setMetaFlags(meta, n.flags)
	n.metaMu.Unlock()
	n.kick()
	return nil
}

// SetDraining flags this member as draining (it takes no new sandboxes) or
// not; placement avoids draining hosts.
func (n *Node) SetDraining(draining bool) {
	n.metaMu.Lock()
	if draining {
		n.flags |= flagDraining
	} else {
		n.flags &^= flagDraining
	}
	n.meta = setMetaFlags(n.meta, n.flags)
	n.metaMu.Unlock()
	n.kick()
}

func (n *Node) kick() {
	select {
	case n.updateCh <- struct{}{}:
	default:
	}
}

// updater broadcasts metadata changes, at most one per UpdateInterval.
// Each change is announced twice (the second time one UpdateInterval
// later): under a burst of simultaneous updates memberlist was seen to lose
// a member's first announcement, and waiting for push/pull anti-entropy
// would take PushPullInterval × log2(n/32). Every RefreshInterval the
// current metadata is announced again even if unchanged, bounding how long
// any lost update can stay stale.
func (n *Node) updater() {
	defer n.wg.Done()
	tick := time.NewTicker(n.cfg.Timers.UpdateInterval)
	defer tick.Stop()
	refresh := time.NewTicker(n.cfg.Timers.RefreshInterval)
	defer refresh.Stop()
	repeat := false
	for {
		select {
		case <-n.done:
			return
		case <-n.updateCh:
			repeat = true
		case <-refresh.C:
		case <-tick.C:
			if !repeat {
				continue
			}
			repeat = false
		}
		// The timeout only bounds how long we wait for the broadcast to
		// go out; a timeout is not a failure (the update stays queued).
		if err := n.ml.UpdateNode(n.cfg.Timers.UpdateInterval); err != nil {
			n.log.Debug("capacity update still propagating", "err", err)
		}
		select { // rate limit
		case <-n.done:
			return
		case <-tick.C:
		}
	}
}

// Members lists every member this node knows, itself included, with dead
// and left members until they rejoin.
func (n *Node) Members() []Member {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make([]Member, 0, len(n.members))
	for _, m := range n.members {
		out = append(out, *m)
	}
	return out
}

// Version counts the changes to the member view (joins, leaves,
// failures, tag and capacity updates, suspicion marks). A consumer that
// derives something from Members on a hot path (the gateway's placement
// hosts, rebuilt per invocation) can rebuild it only when Version moved.
func (n *Node) Version() uint64 {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.version
}

// Count returns how many known members are in state s.
func (n *Node) Count(s State) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	k := 0
	for _, m := range n.members {
		if m.State == s {
			k++
		}
	}
	return k
}

// Member returns one member by name.
func (n *Node) Member(name string) (Member, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	m, ok := n.members[name]
	if !ok {
		return Member{}, false
	}
	return *m, true
}

// MarkSuspect marks an alive member suspect, for example after an RPC to it
// failed. It reports whether the member was alive.
func (n *Node) MarkSuspect(name string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	m, ok := n.members[name]
	if !ok || m.State != StateAlive {
		return false
	}
	m.State = StateSuspect
	n.version++
	return true
}

// ClearSuspect makes a suspect member alive again.
func (n *Node) ClearSuspect(name string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if m, ok := n.members[name]; ok && m.State == StateSuspect {
		m.State = StateAlive
		n.version++
	}
}

func (n *Node) numMembers() int {
	if n.ml == nil {
		return 1
	}
	return n.ml.NumMembers()
}

// delegate implements memberlist's Delegate and EventDelegate. memberlist
// calls the event methods with its node lock held: they only copy.
type delegate Node

func (d *delegate) NodeMeta(limit int) []byte {
	d.metaMu.Lock()
	defer d.metaMu.Unlock()
	if len(d.meta) > limit { // cannot happen: encodeMeta enforces it
		return nil
	}
	return d.meta
}

func (d *delegate) NotifyMsg(b []byte) { (*Node)(d).receive(b) }

func (d *delegate) GetBroadcasts(overhead, limit int) [][]byte {
	return d.bcasts.GetBroadcasts(overhead, limit)
}

func (d *delegate) LocalState(bool) []byte            { return nil }
func (d *delegate) MergeRemoteState(_ []byte, _ bool) {}

func (d *delegate) NotifyJoin(nd *memberlist.Node)   { (*Node)(d).observe(nd, EventJoin) }
func (d *delegate) NotifyUpdate(nd *memberlist.Node) { (*Node)(d).observe(nd, EventUpdate) }

// NotifyLeave cannot tell a leave from a failure by itself (memberlist
// leaves Node.State unset), so Leave first gossips metadata flagged
// "leaving"; a member that goes away with that flag has left.
func (d *delegate) NotifyLeave(nd *memberlist.Node) {
	if _, flags, _ := metaFlags(nd.Meta); flags&flagLeaving != 0 {
		(*Node)(d).observe(nd, EventLeave)
		return
	}
	(*Node)(d).observe(nd, EventFail)
}

func (n *Node) observe(nd *memberlist.Node, typ EventType) {
	m := Member{Name: nd.Name, Addr: nd.Address()}
	tags, sum, err := decodeMeta(nd.Meta)
	if err != nil {
		n.log.Warn("undecodable member metadata", "peer", nd.Name, "err", err)
	}
	_, flags, _ := metaFlags(nd.Meta)
	m.Tags, m.Capacity, m.Draining = tags, sum, flags&flagDraining != 0
	if n.cfg.SkipCapacity && nd.Name != n.cfg.Name {
		m.Capacity = nil
	}
	switch typ {
	case EventLeave:
		m.State = StateLeft
	case EventFail:
		m.State = StateDead
	}
	n.mu.Lock()
	if typ == EventLeave || typ == EventFail {
		prefix := nd.Name + "\x00"
		for k := range n.seen {
			if len(k) > len(prefix) && k[:len(prefix)] == prefix {
				delete(n.seen, k)
			}
		}
	}
	stored := m
	n.members[nd.Name] = &stored
	n.version++
	n.mu.Unlock()
	if !n.cfg.DiscardEvents {
		n.events.push(Event{Type: typ, Member: m})
	}
}

// logWriter turns memberlist's "[LEVEL] memberlist: …" lines into slog.
type logWriter struct{ log *slog.Logger }

func (w *logWriter) Write(p []byte) (int, error) {
	line := bytes.TrimSpace(p)
	level := slog.LevelDebug
	for prefix, l := range map[string]slog.Level{"[ERR]": slog.LevelError, "[WARN]": slog.LevelWarn, "[INFO]": slog.LevelInfo, "[DEBUG]": slog.LevelDebug} {
		if bytes.HasPrefix(line, []byte(prefix)) {
			level = l
			line = bytes.TrimSpace(line[len(prefix):])
			break
		}
	}
	w.log.Log(context.Background(), level, string(line))
	return len(p), nil
}

var _ io.Writer = (*logWriter)(nil)

// eventQueue is an unbounded FIFO feeding a channel, so memberlist's
// callbacks never block on a slow reader.
type eventQueue struct {
	mu     sync.Mutex
	q      []Event // guarded by mu
	signal chan struct{}
	out    chan Event
}

func newEventQueue() *eventQueue {
	return &eventQueue{signal: make(chan struct{}, 1), out: make(chan Event)}
}

func (e *eventQueue) push(ev Event) {
	e.mu.Lock()
	e.q = append(e.q, ev)
	e.mu.Unlock()
	select {
	case e.signal <- struct{}{}:
	default:
	}
}

func (e *eventQueue) run(done <-chan struct{}, wg *sync.WaitGroup) {
	defer wg.Done()
	defer close(e.out)
	for {
		e.mu.Lock()
		var next Event
		have := len(e.q) > 0
		if have {
			next = e.q[0]
			e.q[0] = Event{}
			e.q = e.q[1:]
		}
		e.mu.Unlock()
		if !have {
			select {
			case <-done:
				return
			case <-e.signal:
			}
			continue
		}
		select {
		case <-done:
			return
		case e.out <- next:
		}
	}
}
