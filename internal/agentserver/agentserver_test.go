package agentserver

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gossip"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/pki"
)

// TestInvokeOverMutualTLS runs a real function on an agent through
// AgentService over HTTP/2 with mutual TLS, with the code fetched from the
// (test) gateway's CodeService with the agent's node certificate.
func TestInvokeOverMutualTLS(t *testing.T) {
	c := newCluster(t)
	zip, digest := testFunction(t)
	code := &codeServer{zips: map[string][]byte{digest: zip}, chunk: 64 << 10}
	ag := startAgent(t, Config{DataDir: c.agentDataDir("agent-1"), Name: "agent-1", Gateway: c.serveCode(code)})
	cl := c.agentClient(ag.addrs.RPC)

	resp, err := cl.Invoke(context.Background(), invokeReq(digest, "k1", `{"hello":"world"}`))
	if err != nil {
		t.Fatal(err)
	}
	if got := string(resp.Msg.GetPayload()); got != `{"hello":"world"}` || !resp.Msg.GetColdStart() || resp.Msg.GetHost() != "agent-1" {
		t.Fatalf("first invoke: payload %s cold %v host %q", got, resp.Msg.GetColdStart(), resp.Msg.GetHost())
	}
	if !strings.Contains(resp.Msg.GetLog(), "REPORT RequestId:") {
		t.Errorf("log has no REPORT line:\n%s", resp.Msg.GetLog())
	}
	resp, err = cl.Invoke(context.Background(), invokeReq(digest, "k1", `{"n":2}`))
	if err != nil {
		t.Fatal(err)
	}
	if string(resp.Msg.GetPayload()) != `{"n":2}` || resp.Msg.GetColdStart() {
		t.Fatalf("second invoke: payload %s cold %v, want a warm echo", resp.Msg.GetPayload(), resp.Msg.GetColdStart())
	}
	// Warm invocations through the mTLS hop, for the report.
	lat := make([]time.Duration, 0, 50)
	for range 50 {
		start := time.Now()
		if _, err := cl.Invoke(context.Background(), invokeReq(digest, "k1", `{}`)); err != nil {
			t.Fatal(err)
		}
		lat = append(lat, time.Since(start))
	}
	slices.Sort(lat)
	t.Logf("warm invoke over mTLS HTTP/2: p50 %s, p90 %s (50 calls)", lat[25], lat[45])
	if n := code.calls.Load(); n != 1 {
		t.Errorf("code fetched %d times, want once (then cached)", n)
	}

	// Unknown code: the gateway's NotFound travels back.
	unknown := invokeReq(strings.Repeat("ab", 32), "k2", `{}`)
	unknown.Msg.Spec.FunctionName = "other"
	_, err = cl.Invoke(context.Background(), unknown)
	if err == nil || !strings.Contains(err.Error(), "not found") {
		t.Errorf("invoke with unknown code: %v, want the gateway's not found", err)
	}

	// The service speaks HTTP/2.
	tc, err := pki.LoadClientTLS(c.gwDir)
	if err != nil {
		t.Fatal(err)
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: tc, ForceAttemptHTTP2: true}}
	hr, err := hc.Post("https://"+ag.addrs.RPC+"/skiff.v1.AgentService/Status", "application/json", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Host      string `json:"host"`
		Sandboxes []any  `json:"sandboxes"`
	}
	_ = json.NewDecoder(hr.Body).Decode(&st)
	hr.Body.Close()
	if hr.ProtoMajor != 2 || hr.StatusCode != 200 || st.Host != "agent-1" || len(st.Sandboxes) != 1 {
		t.Errorf("Status over raw HTTP: %s %d host %q %d sandboxes, want HTTP/2 200 agent-1 with 1 sandbox", hr.Proto, hr.StatusCode, st.Host, len(st.Sandboxes))
	}
}

// TestRefusesClientsOutsideTheCluster: no client certificate, or one of
// another CA, never reaches the service.
func TestRefusesClientsOutsideTheCluster(t *testing.T) {
	c := newCluster(t)
	zip, digest := testFunction(t)
	ag := startAgent(t, Config{DataDir: c.agentDataDir("agent-1"), Name: "agent-1",
		Gateway: c.serveCode(&codeServer{zips: map[string][]byte{digest: zip}, chunk: 1 << 20})})

	caPEM, err := os.ReadFile(filepath.Join(c.caDir, pki.CAFile))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	other := newCluster(t) // another CA: its gateway certificate
	otherTLS, err := pki.LoadClientTLS(other.gwDir)
	if err != nil {
		t.Fatal(err)
	}
	otherTLS.RootCAs = roots // trusts the agent, but is not of its cluster
	for name, tc := range map[string]*tls.Config{
		"no certificate":       {RootCAs: roots, MinVersion: tls.VersionTLS13},
		"another CA's":         otherTLS,
		"self-signed as agent": selfSigned(t, roots),
	} {
		t.Run(name, func(t *testing.T) {
			cl := agentClientTLS(t, ag.addrs.RPC, tc)
			_, err := cl.Invoke(context.Background(), invokeReq(digest, "k", `{}`))
			if err == nil {
				t.Fatal("invoke succeeded without a cluster certificate")
			}
			// The handshake itself is refused (in TLS 1.3 the client
			// learns it at its first read).
			tc := tc.Clone()
			tc.NextProtos = []string{"h2"}
			conn, err := tls.Dial("tcp", ag.addrs.RPC, tc)
			if err == nil {
				_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
				_, err = conn.Read(make([]byte, 1))
				conn.Close()
			}
			if err == nil || !strings.Contains(err.Error(), "certificate") {
				t.Errorf("TLS handshake without a cluster certificate: %v, want a certificate alert", err)
			}
		})
	}
	st, err := c.agentClient(ag.addrs.RPC).Status(context.Background(), connect.NewRequest(&skiffv1.StatusRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Msg.GetSandboxes()) != 0 {
		t.Errorf("%d sandboxes started by refused clients", len(st.Msg.GetSandboxes()))
	}
}

// selfSigned is a client certificate the client made itself, with the
// agent's own name.
func selfSigned(t *testing.T, roots *x509.CertPool) *tls.Config {
	dir := filepath.Join(t.TempDir(), "rogue")
	if err := pki.InitCA(dir); err != nil {
		t.Fatal(err)
	}
	ca, err := pki.LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := ca.IssueNode(dir, "agent-1", []string{"127.0.0.1"}, time.Hour); err != nil {
		t.Fatal(err)
	}
	tc, err := pki.LoadClientTLS(dir)
	if err != nil {
		t.Fatal(err)
	}
	tc.RootCAs = roots
	return tc
}

// TestDrainAndGossip: the agent's capacity shows up in another member's
// view; a drain (through the control socket) refuses new invocations with
// reason "draining", flags the member, lets the in-flight invocation
// finish, and Run returns nil.
func TestDrainAndGossip(t *testing.T) {
	c := newCluster(t)
	zip, digest := testFunction(t)
	key := bytes.Repeat([]byte{7}, 32)
	peer, err := gossip.New(gossip.Config{Name: "gw-1", BindAddr: "127.0.0.1", Key: key, Tags: gossip.Tags{Role: gossip.RoleGateway}})
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Shutdown()
	events := watch(peer)
	ag := startAgent(t, Config{DataDir: c.agentDataDir("agent-1"), Name: "agent-1", Zone: "z1", Rack: "r1",
		Gateway:    c.serveCode(&codeServer{zips: map[string][]byte{digest: zip}, chunk: 1 << 20}),
		GossipJoin: []string{peer.Addr()}, GossipKey: key, SandboxMemoryMB: 1536})
	cl := c.agentClient(ag.addrs.RPC)

	// Before any invocation: tags and an empty host.
	m := events.until(t, 10*time.Second, "the agent's first capacity", func(m gossip.Member) bool {
		return m.Name == "agent-1" && m.Capacity != nil
	})
	if m.Tags.Role != gossip.RoleAgent || m.Tags.RPCAddr != ag.addrs.RPCTag || m.Tags.Zone != "z1" || m.Tags.Rack != "r1" {
		t.Errorf("agent tags %+v, want role agent, rpc %s, zone z1, rack r1", m.Tags, ag.addrs.RPCTag)
	}
	if m.Capacity.MemoryTotalMB != 1536 || m.Capacity.MemoryFreeMB != 1536 || m.Capacity.Sandboxes != 0 || m.Capacity.CPUTotalMilli <= 0 {
		t.Errorf("first capacity %+v, want 1536 MB free of 1536, no sandboxes, some CPU", *m.Capacity)
	}

	if _, err := cl.Invoke(context.Background(), invokeReq(digest, "k1", `{}`)); err != nil {
		t.Fatal(err)
	}
	m = events.until(t, 10*time.Second, "a warm idle sandbox in the agent's capacity", func(m gossip.Member) bool {
		return m.Name == "agent-1" && m.Capacity != nil && m.Capacity.Idle == 1
	})
	if s := m.Capacity; s.Sandboxes != 1 || s.Busy != 0 || s.WarmIdle("k1") != 1 || !s.HasCode(digest) || s.MemoryFreeMB != 1536-128 {
		t.Errorf("capacity after one invoke: %+v warm(k1)=%d code=%v, want 1 idle sandbox of k1, the code cached, 128 MB used",
			*s, s.WarmIdle("k1"), s.HasCode(digest))
	}

	// A slow invocation in flight, then the drain.
	slow := make(chan error, 1)
	var slowResp *connect.Response[skiffv1.AgentInvokeResponse]
	go func() {
		var err error
		slowResp, err = cl.Invoke(context.Background(), invokeReq(digest, "k1", `{"action":"sleep","sleep":"2s"}`))
		slow <- err
	}()
	ctl, err := ControlClient(filepath.Dir(ag.addrs.Control))
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 60*time.Second, "the slow invocation in flight", func() (bool, error) {
		st, err := ctl.Status(context.Background(), connect.NewRequest(&skiffv1.StatusRequest{}))
		return err == nil && st.Msg.GetInFlight() == 1, err
	})
	dr, err := ctl.Drain(context.Background(), connect.NewRequest(&skiffv1.DrainRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	if dr.Msg.GetInFlight() != 1 {
		t.Fatalf("drain answered with %d in flight, want the slow one", dr.Msg.GetInFlight())
	}
	_, err = cl.Invoke(context.Background(), invokeReq(digest, "k1", `{}`))
	if kind, reason := reasonOf(err); kind != errs.KindUnavailable || reason != "draining" {
		t.Fatalf("invoke while draining: %v (kind %v reason %q), want Unavailable draining", err, kind, reason)
	}
	events.until(t, 10*time.Second, "the agent flagged draining", func(m gossip.Member) bool {
		return m.Name == "agent-1" && m.Draining
	})
	if err := <-slow; err != nil {
		t.Fatalf("in-flight invocation during the drain: %v", err)
	}
	if got := string(slowResp.Msg.GetPayload()); got != `{"slept":"2s"}` {
		t.Errorf("in-flight invocation answered %s", got)
	}
	if err := ag.wait(t, 30*time.Second); err != nil {
		t.Fatalf("Run after a complete drain: %v", err)
	}
	events.until(t, 10*time.Second, "the agent left", func(m gossip.Member) bool {
		return m.Name == "agent-1" && m.State == gossip.StateLeft
	})
	if _, err := os.Stat(ag.addrs.Control); !os.IsNotExist(err) {
		t.Errorf("control socket still there after exit: %v", err)
	}
}

// TestAbortCutsDrainShort: cancelling Run starts the drain; Abort ends it
// at once with an error, the in-flight invocation failing.
func TestAbortCutsDrainShort(t *testing.T) {
	c := newCluster(t)
	zip, digest := testFunction(t)
	ag := startAgent(t, Config{DataDir: c.agentDataDir("agent-1"), Name: "agent-1",
		Gateway: c.serveCode(&codeServer{zips: map[string][]byte{digest: zip}, chunk: 1 << 20})})
	cl := c.agentClient(ag.addrs.RPC)
	slow := make(chan error, 1)
	go func() {
		_, err := cl.Invoke(context.Background(), invokeReq(digest, "k1", `{"action":"sleep","sleep":"60s"}`))
		slow <- err
	}()
	ctl, err := ControlClient(filepath.Dir(ag.addrs.Control))
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 60*time.Second, "the slow invocation running", func() (bool, error) {
		st, err := ctl.Status(context.Background(), connect.NewRequest(&skiffv1.StatusRequest{}))
		return err == nil && len(st.Msg.GetSandboxes()) == 1 && st.Msg.GetSandboxes()[0].GetState() == "busy", err
	})
	start := time.Now()
	ag.cancel() // the first SIGTERM
	waitFor(t, 10*time.Second, "draining", func() (bool, error) {
		st, err := ctl.Status(context.Background(), connect.NewRequest(&skiffv1.StatusRequest{}))
		return err == nil && st.Msg.GetDraining(), err
	})
	ag.once.Do(func() { close(ag.abort) }) // the second
	err = ag.wait(t, 30*time.Second)
	if err == nil || !strings.Contains(err.Error(), "drain cut short") {
		t.Fatalf("Run after an abort: %v, want drain cut short", err)
	}
	if took := time.Since(start); took > 20*time.Second {
		t.Errorf("abort took %s", took)
	}
	if err := <-slow; err == nil {
		t.Error("the in-flight invocation succeeded although the drain was aborted")
	}
}
