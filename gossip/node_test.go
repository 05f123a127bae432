package gossip

import (
	"bytes"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// recorder drains a node's events and lets a test wait for one.
type recorder struct {
	mu     sync.Mutex
	cond   *sync.Cond
	events []timedEvent
	closed bool
}

type timedEvent struct {
	Event
	at time.Time
}

func record(n *Node) *recorder {
	r := &recorder{}
	r.cond = sync.NewCond(&r.mu)
	go func() {
		for ev := range n.Events() {
			r.mu.Lock()
			r.events = append(r.events, timedEvent{ev, time.Now()})
			r.cond.Broadcast()
			r.mu.Unlock()
		}
		r.mu.Lock()
		r.closed = true
		r.cond.Broadcast()
		r.mu.Unlock()
	}()
	return r
}

// wait returns the first event matching pred, failing the test after
// timeout.
func (r *recorder) wait(t *testing.T, timeout time.Duration, what string, pred func(Event) bool) timedEvent {
	t.Helper()
	timer := time.AfterFunc(timeout, func() {
		r.mu.Lock()
		r.closed = true // wake the waiter; it reports the timeout
		r.cond.Broadcast()
		r.mu.Unlock()
	})
	defer timer.Stop()
	r.mu.Lock()
	defer r.mu.Unlock()
	for i := 0; ; i++ {
		for ; i < len(r.events); i++ {
			if pred(r.events[i].Event) {
				return r.events[i]
			}
		}
		if r.closed {
			for _, e := range r.events {
				t.Logf("event %v %s %v", e.Type, e.Member.Name, e.Member.State)
			}
			t.Fatalf("no %s event within %v", what, timeout)
		}
		r.cond.Wait()
		i--
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, timeout)
		}
		time.Sleep(5 * time.Millisecond) // polling interval, not synchronisation
	}
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func startNode(t *testing.T, mn *MemNetwork, name string, mutate func(*Config)) *Node {
	t.Helper()
	cfg := Config{
		Name:      name,
		Transport: mn.NewTransport(),
		Tags:      Tags{Role: RoleAgent, Version: "test", Zone: "z1", Rack: "r1", RPCAddr: name + ":7070"},
		Logger:    testLogger(t),
	}
	if mutate != nil {
		mutate(&cfg)
	}
	n, err := New(cfg)
	if err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	t.Cleanup(func() { _ = n.Shutdown() })
	return n
}

func cluster(t *testing.T, mn *MemNetwork, size int, mutate func(*Config)) []*Node {
	t.Helper()
	nodes := make([]*Node, size)
	for i := range nodes {
		nodes[i] = startNode(t, mn, fmt.Sprintf("n%d", i), mutate)
		if i > 0 {
			if _, err := nodes[i].Join([]string{nodes[0].Addr()}); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, n := range nodes {
		waitFor(t, 5*time.Second, n.Name()+" sees everyone", func() bool { return countState(n, StateAlive) == size })
	}
	return nodes
}

func countState(n *Node, s State) int {
	k := 0
	for _, m := range n.Members() {
		if m.State == s {
			k++
		}
	}
	return k
}

func TestJoinAndLeave(t *testing.T) {
	mn := NewMemNetwork()
	nodes := cluster(t, mn, 3, nil)
	rec := record(nodes[0])
	m, ok := nodes[0].Member("n2")
	if !ok {
		t.Fatal("n0 does not know n2")
	}
	if m.State != StateAlive || m.Tags.RPCAddr != "n2:7070" || m.Tags.Role != RoleAgent || m.Tags.Zone != "z1" {
		t.Errorf("n2 as n0 sees it: got %+v, want alive agent in z1 at n2:7070", m)
	}

	if err := nodes[2].Leave(time.Second); err != nil {
		t.Fatal(err)
	}
	if err := nodes[2].Shutdown(); err != nil {
		t.Fatal(err)
	}
	rec.wait(t, 2*time.Second, "leave of n2", func(e Event) bool { return e.Type == EventLeave && e.Member.Name == "n2" })
	for _, n := range nodes[:2] {
		waitFor(t, 2*time.Second, n.Name()+" sees n2 left", func() bool {
			m, ok := n.Member("n2")
			return ok && m.State == StateLeft
		})
	}
	if got := countState(nodes[1], StateAlive); got != 2 {
		t.Errorf("alive members after leave: got %d, want 2", got)
	}
}

func TestFailureDetectedWithinOneSecond(t *testing.T) {
	mn := NewMemNetwork()
	nodes := cluster(t, mn, 5, nil)
	recs := make([]*recorder, 4)
	for i := range recs {
		recs[i] = record(nodes[i])
	}
	const detectBound = 1500 * time.Millisecond
	victim := nodes[4]
	stopped := time.Now()
	if err := victim.Shutdown(); err != nil { // no leave message: a crash
		t.Fatal(err)
	}
	for i, r := range recs {
		ev := r.wait(t, 3*time.Second, "fail of n4", func(e Event) bool {
			return e.Member.Name == "n4" && (e.Type == EventFail || e.Type == EventLeave)
		})
		if ev.Type != EventFail {
			t.Fatalf("n%d: got %v event for n4, want fail", i, ev.Type)
		}
		took := ev.at.Sub(stopped)
		t.Logf("n%d detected n4 dead after %v", i, took)
		// The LAN timers detect a crash in ~0.75 s on an idle machine; the
		// bound leaves room for a CI host busy with other test packages
		// while still failing if detection stops being sub-second-ish.
		if took > detectBound {
			t.Errorf("n%d: detection took %v, want ≤ %v", i, took, detectBound)
		}
		if m, _ := nodes[i].Member("n4"); m.State != StateDead {
			t.Errorf("n%d: n4 state got %v, want dead", i, m.State)
		}
	}
}

func TestCapacityPropagates(t *testing.T) {
	mn := NewMemNetwork()
	nodes := cluster(t, mn, 3, nil)
	rec := record(nodes[0])
	c := Capacity{
		MemoryTotalMB: 8192, MemoryFreeMB: 6000, CPUTotalMilli: 4000, CPUFreeMilli: 2500,
		Sandboxes: 5, Busy: 2, Idle: 3, Load: 0.4,
		WarmIdle:    map[string]int{"hello:1": 2, "world:3": 1},
		CodeDigests: []string{"sha256:abc"},
	}
	if err := nodes[2].SetCapacity(c); err != nil {
		t.Fatal(err)
	}
	ev := rec.wait(t, 2*time.Second, "capacity update of n2", func(e Event) bool {
		return e.Type == EventUpdate && e.Member.Name == "n2" && e.Member.Capacity != nil
	})
	s := ev.Member.Capacity
	if s.MemoryFreeMB != 6000 || s.CPUFreeMilli != 2500 || s.Idle != 3 || s.Load != 0.4 || s.WarmIdle("hello:1") != 2 || !s.HasCode("sha256:abc") {
		t.Errorf("n2's capacity at n0: got %+v (warm hello:1=%d), want the reported one", *s, s.WarmIdle("hello:1"))
	}
	nodes[2].SetDraining(true)
	waitFor(t, 2*time.Second, "n0 sees n2 draining", func() bool {
		m, _ := nodes[0].Member("n2")
		return m.Draining && m.Capacity != nil && m.Capacity.MemoryFreeMB == 6000
	})
	if ev.Member.Tags.RPCAddr != "n2:7070" {
		t.Errorf("tags after the capacity update: got %+v", ev.Member.Tags)
	}

	// A burst of updates: every member converges on the last one.
	for free := int64(5000); free >= 1000; free -= 1000 {
		c.MemoryFreeMB = free
		if err := nodes[2].SetCapacity(c); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range nodes {
		waitFor(t, 2*time.Second, n.Name()+" sees n2's latest capacity", func() bool {
			m, ok := n.Member("n2")
			return ok && m.Capacity != nil && m.Capacity.MemoryFreeMB == 1000
		})
	}
}

func TestCapacityTooBigIsRefused(t *testing.T) {
	mn := NewMemNetwork()
	if _, err := New(Config{Name: "big", Transport: mn.NewTransport(), Tags: Tags{Zone: strings.Repeat("z", 600)}}); err == nil {
		t.Fatal("New with 600 bytes of tags: got no error, want one")
	}
	n := startNode(t, mn, "n0", func(c *Config) {
		c.Tags.Rack = strings.Repeat("r", 300)
		c.CodeFilterBytes = 200
	})
	ok := Capacity{MemoryFreeMB: 100}
	if err := n.SetCapacity(ok); err != nil {
		t.Fatalf("small capacity: %v", err)
	}
	if err := n.SetCapacity(Capacity{MemoryFreeMB: 1, CodeDigests: []string{"d"}}); err == nil {
		t.Fatal("capacity pushing metadata past 512 bytes: got no error, want one")
	}
	waitFor(t, time.Second, "own capacity", func() bool {
		m, _ := n.Member("n0")
		return m.Capacity != nil && m.Capacity.MemoryFreeMB == 100
	})
}

func TestKeyMismatchPreventsJoin(t *testing.T) {
	mn := NewMemNetwork()
	key1 := bytes.Repeat([]byte{1}, 32)
	key2 := bytes.Repeat([]byte{2}, 32)
	a := startNode(t, mn, "a", func(c *Config) { c.Key = key1 })
	b := startNode(t, mn, "b", func(c *Config) { c.Key = key2 })
	p := startNode(t, mn, "plain", nil)
	c := startNode(t, mn, "c", func(c *Config) { c.Key = key1 })

	if _, err := b.Join([]string{a.Addr()}); err == nil {
		t.Error("join with a different key: got no error, want one")
	}
	if _, err := p.Join([]string{a.Addr()}); err == nil {
		t.Error("plaintext join to an encrypted cluster: got no error, want one")
	}
	if _, err := c.Join([]string{a.Addr()}); err != nil {
		t.Fatalf("join with the same key: %v", err)
	}
	waitFor(t, 2*time.Second, "a sees c", func() bool { return countState(a, StateAlive) == 2 })
	for _, n := range []*Node{a, c} {
		for _, m := range n.Members() {
			if m.Name == "b" || m.Name == "plain" {
				t.Errorf("%s knows %s, which has the wrong key", n.Name(), m.Name)
			}
		}
	}
	if _, err := New(Config{Name: "bad", Transport: mn.NewTransport(), Key: []byte("short")}); err == nil {
		t.Error("5-byte key: got no error, want one")
	}
}

func TestMessagesSpreadAndSupersede(t *testing.T) {
	mn := NewMemNetwork()
	nodes := cluster(t, mn, 6, nil)
	recs := make([]*recorder, len(nodes))
	for i, n := range nodes {
		recs[i] = record(n)
	}
	if err := nodes[0].Broadcast("lease/q/0", []byte("epoch=3")); err != nil {
		t.Fatal(err)
	}
	if err := nodes[0].Broadcast("lease/q/0", []byte("epoch=4")); err != nil {
		t.Fatal(err)
	}
	for i, r := range recs[1:] {
		ev := r.wait(t, 2*time.Second, "heartbeat epoch=4", func(e Event) bool {
			return e.Type == EventMessage && string(e.Message.Payload) == "epoch=4"
		})
		if ev.Message.From != "n0" || ev.Message.Key != "lease/q/0" {
			t.Errorf("n%d: got message %+v, want from n0 key lease/q/0", i+1, ev.Message)
		}
	}
	if err := nodes[0].Broadcast("k", make([]byte, MaxMessageSize)); err == nil {
		t.Error("oversized message: got no error, want one")
	}
}

func TestMarkSuspect(t *testing.T) {
	mn := NewMemNetwork()
	nodes := cluster(t, mn, 2, nil)
	v0 := nodes[0].Version()
	if !nodes[0].MarkSuspect("n1") {
		t.Fatal("MarkSuspect(n1): got false, want true")
	}
	v1 := nodes[0].Version()
	if v1 <= v0 {
		t.Errorf("Version after MarkSuspect: got %d, want more than %d", v1, v0)
	}
	if nodes[0].MarkSuspect("n1") || nodes[0].Version() != v1 {
		t.Errorf("MarkSuspect of a suspect member: changed something (version %d, was %d)", nodes[0].Version(), v1)
	}
	if m, _ := nodes[0].Member("n1"); m.State != StateSuspect {
		t.Fatalf("n1: got %v, want suspect", m.State)
	}
	// The member's next update clears the suspicion.
	if err := nodes[1].SetCapacity(Capacity{MemoryFreeMB: 7}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 2*time.Second, "n1 alive again", func() bool {
		m, _ := nodes[0].Member("n1")
		return m.State == StateAlive && m.Capacity != nil
	})
	if v := nodes[0].Version(); v <= v1 {
		t.Errorf("Version after n1's update: got %d, want more than %d", v, v1)
	}
}
