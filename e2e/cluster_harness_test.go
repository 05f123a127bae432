package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"skiff.dev/skiff/gateway/store/natstest"
)

// The multi-host harness: a 3-node NATS JetStream cluster of real
// nats-server processes (bin/tools/nats-server, see natstest), on
// 127.0.0.1 or one node per simulated host (netns_hosts_test.go), plus the
// checks the multi-host tests share.

// startNATS starts a 3-node cluster: on 127.0.0.1 ports when hn is nil,
// else node i inside hn's host i (which needs at least 3 hosts). It
// returns once the cluster has a meta leader every node agrees on.
func startNATS(t *testing.T, hn *hostNet) *natstest.Cluster {
	t.Helper()
	cfg := natstest.Config{Nodes: 3}
	if hn != nil {
		if len(hn.hosts) < 3 {
			t.Fatalf("startNATS: %d hosts, want at least 3", len(hn.hosts))
		}
		cfg.Hosts = hn.addrs()[:3]
		cfg.Start = func(i int, cmd *exec.Cmd) error { return hn.hosts[i].start(cmd) }
	}
	return natstest.Start(t, cfg)
}

// natsClient connects to every node of c, reconnecting forever.
func natsClient(t *testing.T, c *natstest.Cluster) jetstream.JetStream {
	t.Helper()
	// Short pings: a connection to a partitioned node is dead silently
	// (no reset), and only missed pings tell.
	nc, err := nats.Connect(strings.Join(c.URLs(), ","), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond),
		nats.PingInterval(500*time.Millisecond), nats.MaxPingsOutstanding(2))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}

// ackedWriter publishes numbered messages to a stream and records the
// ones the cluster acknowledged. A failed publish is retried with the same
// message id, so a retry whose first attempt was stored after all is
// dropped as a duplicate instead of stored twice.
type ackedWriter struct {
	js      jetstream.JetStream
	subject string

	mu      sync.Mutex
	acked   map[string]uint64 // payload -> sequence
	retries int
}

func newAckedWriter(js jetstream.JetStream, subject string) *ackedWriter {
	return &ackedWriter{js: js, subject: subject, acked: map[string]uint64{}}
}

// publish sends message i until it is acknowledged or ctx ends.
func (w *ackedWriter) publish(ctx context.Context, i int) error {
	payload := "m" + strconv.Itoa(i)
	for {
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		ack, err := w.js.Publish(pctx, w.subject, []byte(payload), jetstream.WithMsgID(payload))
		cancel()
		if err == nil {
			w.mu.Lock()
			w.acked[payload] = ack.Sequence
			w.mu.Unlock()
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("publishing %s: %w", payload, err)
		}
		w.mu.Lock()
		w.retries++
		w.mu.Unlock()
		// A publish without responders fails at once: back off a little.
		select {
		case <-ctx.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// verify reads the whole stream through js and checks that every
// acknowledged message is there, exactly once.
func (w *ackedWriter) verify(t *testing.T, ctx context.Context, js jetstream.JetStream, stream string) {
	t.Helper()
	w.mu.Lock()
	defer w.mu.Unlock()
	msgs, err := natstest.Messages(ctx, js, stream)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for _, m := range msgs {
		seen[string(m)]++
	}
	for p, seq := range w.acked {
		if seen[p] != 1 {
			t.Fatalf("stream %s: acknowledged message %s (seq %d) is there %d times, want once", stream, p, seq, seen[p])
		}
	}
	if len(msgs) != len(w.acked) {
		t.Fatalf("stream %s holds %d messages, want the %d acknowledged", stream, len(msgs), len(w.acked))
	}
}

// streamLeader is the node index leading stream.
func streamLeader(t *testing.T, ctx context.Context, c *natstest.Cluster, js jetstream.JetStream, stream string) int {
	t.Helper()
	var leader int
	waitFor(t, 30*time.Second, "stream "+stream+" has a leader and 2 current replicas", func() bool {
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second) // a lost request must not hang
		defer cancel()
		st, err := js.Stream(ctx, stream)
		if err != nil {
			return false
		}
		info, err := st.Info(ctx)
		if err != nil || info.Cluster == nil || len(info.Cluster.Replicas) != 2 {
			return false
		}
		for _, r := range info.Cluster.Replicas {
			if !r.Current {
				return false
			}
		}
		leader = c.Index(info.Cluster.Leader)
		return leader >= 0
	})
	return leader
}

// killLeaderUnderLoad publishes total messages to stream WORK and kill
// -9s the stream's leader a third of the way through; it returns the
// writer and the killed node.
func killLeaderUnderLoad(t *testing.T, ctx context.Context, c *natstest.Cluster, js jetstream.JetStream, total int) (*ackedWriter, int) {
	t.Helper()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "WORK", Subjects: []string{"work.>"}, Replicas: 3, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}
	victim := streamLeader(t, ctx, c, js, "WORK")
	w := newAckedWriter(js, "work.x")
	var killedAt time.Time
	var failover time.Duration
	for i := range total {
		if i == total/3 {
			c.Kill(victim)
			killedAt = time.Now()
		}
		if err := w.publish(ctx, i); err != nil {
			t.Fatal(err)
		}
		if i == total/3 {
			failover = time.Since(killedAt)
		}
	}
	t.Logf("%d messages acknowledged; %d publishes retried; the first publish after kill -9 of the leader %s took %v",
		len(w.acked), w.retries, c.Nodes[victim].Name, failover.Round(time.Millisecond))
	return w, victim
}

// TestHarnessNATSCluster: the 3-node cluster forms, an R3 stream keeps
// every acknowledged message across kill -9 of its leader, and the killed
// node restarts, catches up and serves them all.
func TestHarnessNATSCluster(t *testing.T) {
	c := startNATS(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	leaders := map[string]bool{}
	for i := range c.Nodes {
		l, err := c.MetaLeader(i)
		if err != nil {
			t.Fatal(err)
		}
		leaders[l] = true
	}
	if len(leaders) != 1 {
		t.Fatalf("nodes see meta leaders %v, want one", leaders)
	}
	js := natsClient(t, c)
	w, victim := killLeaderUnderLoad(t, ctx, c, js, 600)
	w.verify(t, ctx, js, "WORK")

	c.Restart(victim)
	nc, err := nats.Connect(c.Nodes[victim].URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	only, _ := jetstream.New(nc)
	streamLeader(t, ctx, c, only, "WORK") // all replicas current again
	w.verify(t, ctx, only, "WORK")
}

// TestHarnessHosts: processes run inside the host namespaces, hosts reach
// each other and the test over the bridge, and a partitioned host is
// unreachable both ways until healed, while the others keep talking.
func TestHarnessHosts(t *testing.T) {
	hn := newHostNet(t, 3)
	h0, h1, h2 := hn.hosts[0], hn.hosts[1], hn.hosts[2]

	// A process started in h1 is in h1's network namespace.
	cmd := exec.Command("sleep", "300")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := h1.start(cmd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	want, err := h1.ns.Inode()
	if err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(fmt.Sprintf("/proc/%d/ns/net", cmd.Process.Pid), &st); err != nil {
		t.Fatal(err)
	}
	if st.Ino != want {
		t.Fatalf("process netns inode %d, want host1's %d", st.Ino, want)
	}
	var self syscall.Stat_t
	if err := syscall.Stat("/proc/self/ns/net", &self); err != nil {
		t.Fatal(err)
	}
	if self.Ino == want {
		t.Fatal("host1's namespace is the test's own")
	}

	// Echo servers on h1 and h2.
	serve := func(h *host) string {
		l, err := h.listen(7000)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
			}
		}()
		return l.Addr().String()
	}
	a1, a2 := serve(h1), serve(h2)
	echo := func(c net.Conn, err error) error {
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(time.Second))
		if _, err := c.Write([]byte("ping")); err != nil {
			return err
		}
		b := make([]byte, 4)
		if _, err := io.ReadFull(c, b); err != nil {
			return err
		}
		if string(b) != "ping" {
			return fmt.Errorf("echo %q", b)
		}
		return nil
	}
	fromTest := func(addr string) error { return echo(net.DialTimeout("tcp4", addr, 300*time.Millisecond)) }
	fromHost := func(h *host, addr string) error { return echo(h.dial(addr, 300*time.Millisecond)) }

	for _, c := range []struct {
		what string
		err  error
	}{
		{"host0 -> host1", fromHost(h0, a1)},
		{"host0 -> host2", fromHost(h0, a2)},
		{"test -> host1", fromTest(a1)},
		{"host2 -> host1", fromHost(h2, a1)},
	} {
		if c.err != nil {
			t.Fatalf("%s: %v", c.what, c.err)
		}
	}

	if err := h1.partition(); err != nil {
		t.Fatal(err)
	}
	if down, err := h1.partitioned(); err != nil || !down {
		t.Fatalf("partitioned = %v, %v", down, err)
	}
	if err := fromHost(h0, a1); err == nil {
		t.Fatal("host0 reached the partitioned host1")
	}
	if err := fromTest(a1); err == nil {
		t.Fatal("the test reached the partitioned host1")
	}
	// Outbound from the partitioned host fails too.
	if err := fromHost(h1, a2); err == nil {
		t.Fatal("partitioned host1 reached host2")
	}
	if err := fromHost(h0, a2); err != nil {
		t.Fatalf("host0 -> host2 during host1's partition: %v", err)
	}

	if err := h1.heal(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "host1 reachable after heal", func() bool {
		return fromHost(h0, a1) == nil && fromTest(a1) == nil && fromHost(h1, a2) == nil
	})
}

// TestHarnessNATSOnHosts runs the cluster one node per host namespace:
// it forms over the bridge; partitioning the meta leader's host makes the
// other two elect a new leader and keep accepting R3 writes; healed, the
// node rejoins and catches up; kill -9 of a stream leader loses nothing.
func TestHarnessNATSOnHosts(t *testing.T) {
	hn := newHostNet(t, 3)
	c := startNATS(t, hn)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	for i, n := range c.Nodes {
		if n.Host != hn.hosts[i].addr.String() {
			t.Fatalf("node %s on %s, want host%d's %s", n.Name, n.Host, i, hn.hosts[i].addr)
		}
		// Its process is in the host's namespace.
		want, err := hn.hosts[i].ns.Inode()
		if err != nil {
			t.Fatal(err)
		}
		var st syscall.Stat_t
		if err := syscall.Stat(fmt.Sprintf("/proc/%d/ns/net", n.PID()), &st); err != nil {
			t.Fatal(err)
		}
		if st.Ino != want {
			t.Fatalf("%s runs in netns %d, want host%d's %d", n.Name, st.Ino, i, want)
		}
	}
	js := natsClient(t, c)

	leader, err := c.MetaLeader(0)
	if err != nil {
		t.Fatal(err)
	}
	li := c.Index(leader)
	if err := hn.hosts[li].partition(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	var newLeader string
	var views []string
	deadline := time.Now().Add(60 * time.Second)
	for {
		views = views[:0]
		var seen []string
		for i := range c.Nodes {
			if i == li {
				continue
			}
			l, err := c.MetaLeader(i)
			views = append(views, fmt.Sprintf("%s sees %q (%v)", c.Nodes[i].Name, l, err))
			if err == nil && l != "" && l != leader {
				seen = append(seen, l)
			}
		}
		if len(seen) == 2 && seen[0] == seen[1] {
			newLeader = seen[0]
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no new meta leader 60s after partitioning %s: %v", leader, views)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("meta leader %s partitioned; %s elected after %v", leader, newLeader, time.Since(start).Round(time.Millisecond))

	// R3 writes go on with two of three nodes. (The client may have been
	// connected to the partitioned node: it notices by missed pings and
	// moves; requests lost meanwhile are retried.)
	if err := natstest.Retry(ctx, func(ctx context.Context) error {
		_, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "PART", Subjects: []string{"part.>"}, Replicas: 3})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	w := newAckedWriter(js, "part.x")
	for i := range 100 {
		if err := w.publish(ctx, i); err != nil {
			t.Fatal(err)
		}
	}

	if err := hn.hosts[li].heal(); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	c.WaitReady(60 * time.Second)
	t.Logf("healed %s rejoined in %v", leader, time.Since(start).Round(time.Millisecond))
	// The healed node has every message written while it was away.
	nc, err := nats.Connect(c.Nodes[li].URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	only, _ := jetstream.New(nc)
	streamLeader(t, ctx, c, only, "PART")
	w.verify(t, ctx, only, "PART")

	// kill -9 of a stream leader on the hosts loses nothing.
	kw, _ := killLeaderUnderLoad(t, ctx, c, js, 300)
	kw.verify(t, ctx, js, "WORK")
}
