package store

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/store/natstest"
	"skiff.dev/skiff/internal/errs"
)

// openExternal opens a Store on the cluster and closes it at the end.
func openExternal(t *testing.T, cfg Config) *Store {
	t.Helper()
	s, err := Open(testCtx(t), cfg)
	if err != nil {
		t.Fatalf("Open on %v: %v", cfg.URLs, err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

// wantR3 checks that stream name has 3 replicas, a leader and 2 more
// peers.
func wantR3(t *testing.T, js jetstream.JetStream, name string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		st, err := js.Stream(ctx, name)
		if err != nil {
			cancel()
			t.Fatalf("stream %s: %v", name, err)
		}
		info, err := st.Info(ctx)
		cancel()
		if err != nil {
			t.Fatalf("stream %s info: %v", name, err)
		}
		if info.Config.Replicas != 3 {
			t.Fatalf("stream %s: config replicas %d, want 3", name, info.Config.Replicas)
		}
		if cl := info.Cluster; cl != nil && cl.Leader != "" && len(cl.Replicas) == 2 {
			peers := map[string]bool{cl.Leader: true}
			for _, r := range cl.Replicas {
				peers[r.Name] = true
			}
			if len(peers) == 3 {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("stream %s: cluster info %+v, want a leader and 2 other peers", name, info.Cluster)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestExternalClusterReplicates(t *testing.T) {
	c := natstest.Start(t, natstest.Config{})
	s := openExternal(t, Config{URLs: c.URLs()})
	if s.Replicas() != 3 {
		t.Fatalf("Replicas() = %d, want 3", s.Replicas())
	}
	js := s.JetStream()
	for _, name := range []string{"KV_" + bucketFunctions, "KV_" + bucketKeys, "OBJ_" + bucketCode, streamLogs} {
		wantR3(t, js, name)
	}
	ctx := testCtx(t)
	// A later component's stream, KV bucket and object store get R3 too;
	// an explicit count is kept.
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "LATER", Subjects: []string{"later.>"}}); err != nil {
		t.Fatal(err)
	}
	wantR3(t, js, "LATER")
	if _, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "later"}); err != nil {
		t.Fatal(err)
	}
	wantR3(t, js, "KV_later")
	if _, err := js.CreateObjectStore(ctx, jetstream.ObjectStoreConfig{Bucket: "laterobj"}); err != nil {
		t.Fatal(err)
	}
	wantR3(t, js, "OBJ_laterobj")
	st, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "ONE", Subjects: []string{"one.>"}, Replicas: 1})
	if err != nil {
		t.Fatal(err)
	}
	if r := st.CachedInfo().Config.Replicas; r != 1 {
		t.Fatalf("explicit Replicas 1 became %d", r)
	}

	// KV (functions, keys) and the object store (code) work, and a second
	// gateway on another node sees the writes.
	s2 := openExternal(t, Config{URLs: []string{c.Nodes[2].URL()}})
	if _, err := s.CreateFunction(ctx, &skiffv1.Function{Name: "clustered", CodeSha256: "abc"}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "second gateway sees the function", func() bool {
		fn, err := s2.GetFunction(ctx, "clustered")
		return err == nil && fn.GetCodeSha256() == "abc"
	})
	if err := s.PutKey(ctx, Key{ID: "k1", SecretHash: bytes.Repeat([]byte{7}, 32)}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "second gateway sees the key", func() bool {
		k, err := s2.KeyBySecretHash(ctx, bytes.Repeat([]byte{7}, 32))
		return err == nil && k.ID == "k1"
	})
	zip := bytes.Repeat([]byte("code"), 300_000) // several object chunks
	sum, err := s.PutCode(ctx, zip)
	if err != nil {
		t.Fatal(err)
	}
	got, err := s2.FetchCode(ctx, sum)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, zip) {
		t.Fatalf("fetched %d bytes, want the %d put", len(got), len(zip))
	}
	if err := s.AppendLog(ctx, LogEntry{Function: "clustered", RequestID: "r1", Text: "hello"}); err != nil {
		t.Fatal(err)
	}
}

// TestExternalClusterKillNode kill -9s the leader of a stream while a
// writer publishes to it and writes KV entries through the store: every
// write the cluster acknowledged is there afterwards, on every node once
// the dead one is back.
func TestExternalClusterKillNode(t *testing.T) {
	c := natstest.Start(t, natstest.Config{})
	s := openExternal(t, Config{URLs: c.URLs()})
	js := s.JetStream()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	st, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "WORK", Subjects: []string{"work.>"}, Storage: jetstream.FileStorage})
	if err != nil {
		t.Fatal(err)
	}
	wantR3(t, js, "WORK")
	info, err := st.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	victim := c.Index(info.Cluster.Leader)
	if victim < 0 {
		t.Fatalf("stream leader %q is not a node", info.Cluster.Leader)
	}

	const total = 600
	var (
		mu     sync.Mutex
		acked  = map[string]uint64{} // payload -> stream sequence
		failed int
	)
	publish := func(i int) {
		payload := "m" + strconv.Itoa(i)
		for {
			pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			// The message id makes a retry of a publish whose ack was lost
			// a duplicate the stream drops, not a second copy.
			ack, err := js.Publish(pctx, "work.x", []byte(payload), jetstream.WithMsgID(payload))
			cancel()
			if err == nil {
				mu.Lock()
				acked[payload] = ack.Sequence
				mu.Unlock()
				return
			}
			if ctx.Err() != nil {
				t.Errorf("publishing %s: %v", payload, err)
				return
			}
			mu.Lock()
			failed++
			mu.Unlock()
			time.Sleep(50 * time.Millisecond) // a failed publish may return at once: no busy loop
		}
	}
	killed := make(chan struct{})
	var killedAt, recoveredAt time.Time
	start := time.Now()
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := range total {
			if i == total/3 {
				c.Kill(victim)
				killedAt = time.Now()
				close(killed)
			}
			publish(i)
			if i == total/3 {
				recoveredAt = time.Now()
			}
			if i%50 == 0 {
				// KV writes through the store, across the failover.
				name := fmt.Sprintf("fn%d", i)
				for {
					_, err := s.CreateFunction(ctx, &skiffv1.Function{Name: name})
					if err == nil || errs.Is(err, errs.KindAlreadyExists) {
						break
					}
					if ctx.Err() != nil {
						t.Errorf("creating %s: %v", name, err)
						return
					}
					time.Sleep(50 * time.Millisecond)
				}
			}
		}
	})
	wg.Wait()
	<-killed
	if t.Failed() {
		return
	}
	t.Logf("%d publishes acknowledged in %v, %d attempts retried across the kill of %s (stream leader); the first publish after the kill took %v",
		len(acked), time.Since(start).Round(time.Millisecond), failed, c.Nodes[victim].Name, recoveredAt.Sub(killedAt).Round(time.Millisecond))

	check := func(where string, js jetstream.JetStream) {
		t.Helper()
		msgs, err := natstest.Messages(ctx, js, "WORK")
		if err != nil {
			t.Fatalf("%s: %v", where, err)
		}
		seen := map[string]bool{}
		for _, m := range msgs {
			seen[string(m)] = true
		}
		for p := range acked {
			if !seen[p] {
				t.Fatalf("%s: acknowledged message %s (seq %d) is missing", where, p, acked[p])
			}
		}
		if len(msgs) != len(acked) {
			t.Fatalf("%s: stream holds %d messages, want the %d acknowledged (no duplicates)", where, len(msgs), len(acked))
		}
		for i := 0; i < total; i += 50 {
			if _, err := s.GetFunction(ctx, fmt.Sprintf("fn%d", i)); err != nil {
				t.Fatalf("%s: function fn%d: %v", where, i, err)
			}
		}
	}
	checkStart := time.Now()
	check("after the kill", js)
	t.Logf("checked in %v", time.Since(checkStart).Round(time.Millisecond))

	// The dead node comes back on its store dir, catches up, and serves
	// every message to a client connected to it alone.
	c.Restart(victim)
	nc, err := nats.Connect(c.Nodes[victim].URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js2, _ := jetstream.New(nc)
	eventually(t, "restarted node is current", func() bool {
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second) // a lost request must not hang
		defer cancel()
		st, err := js2.Stream(ctx, "WORK")
		if err != nil {
			return false
		}
		info, err := st.Info(ctx)
		if err != nil || info.Cluster == nil {
			return false
		}
		for _, r := range info.Cluster.Replicas {
			if !r.Current {
				return false
			}
		}
		return len(info.Cluster.Replicas) == 2
	})
	check("after the restart", js2)
}

// TestExternalReconnects kills the node the store is connected to: the
// connection moves to another node and the watched caches keep seeing
// other gateways' writes.
func TestExternalReconnects(t *testing.T) {
	c := natstest.Start(t, natstest.Config{})
	s := openExternal(t, Config{URLs: []string{c.Nodes[0].URL(), c.Nodes[1].URL()}})
	other := openExternal(t, Config{URLs: []string{c.Nodes[2].URL()}})
	ctx := testCtx(t)
	connected := c.Index(s.nc.ConnectedServerName())
	if connected < 0 || connected == 2 {
		t.Fatalf("store connected to %q", s.nc.ConnectedServerName())
	}
	c.Kill(connected)
	// The write may meet a leader election (the killed node may have led
	// the bucket's stream): it is retried as a client would.
	for {
		_, err := other.CreateFunction(ctx, &skiffv1.Function{Name: "afterkill"})
		if err == nil || errs.Is(err, errs.KindAlreadyExists) {
			break
		}
		if !errs.Is(err, errs.KindUnavailable) || ctx.Err() != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	eventually(t, "store reconnected and its cache saw the write", func() bool {
		_, err := s.GetFunction(ctx, "afterkill")
		return err == nil
	})
	if name := s.nc.ConnectedServerName(); name == c.Nodes[connected].Name {
		t.Fatalf("still connected to the killed node %s", name)
	}
}

func TestExternalNoServer(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	url := "nats://" + l.Addr().String()
	l.Close()
	start := time.Now()
	_, err = Open(testCtx(t), Config{URLs: []string{url}})
	wantKind(t, "open with no server", err, errs.KindUnavailable)
	if !strings.Contains(err.Error(), url) || !strings.Contains(err.Error(), "no nats server reachable") {
		t.Fatalf("error %q does not say which servers were unreachable", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("failing took %v", d)
	}
}

func TestExternalSingleNodeNeedsReplicasOne(t *testing.T) {
	c := natstest.Start(t, natstest.Config{Nodes: 1})
	_, err := Open(testCtx(t), Config{URLs: c.URLs()})
	wantKind(t, "R3 on one server", err, errs.KindFailedPrecondition)
	if !strings.Contains(err.Error(), "3 replicas") {
		t.Fatalf("error %q does not explain the replica count", err)
	}
	s := openExternal(t, Config{URLs: c.URLs(), Replicas: 1})
	if _, err := s.CreateFunction(testCtx(t), &skiffv1.Function{Name: "single"}); err != nil {
		t.Fatal(err)
	}
}

func TestExternalSmallMaxPayload(t *testing.T) {
	c := natstest.Start(t, natstest.Config{Nodes: 1, MaxPayload: 1 << 20})
	_, err := Open(testCtx(t), Config{URLs: c.URLs(), Replicas: 1})
	wantKind(t, "1 MB max_payload", err, errs.KindFailedPrecondition)
	if !strings.Contains(err.Error(), "max_payload") {
		t.Fatalf("error %q does not name max_payload", err)
	}
}

func TestExternalUserPassword(t *testing.T) {
	c := natstest.Start(t, natstest.Config{Nodes: 1, Extra: `authorization { user: "gw", password: "s3cret-pw" }`})
	s := openExternal(t, Config{URLs: c.URLs(), Replicas: 1, Auth: Auth{User: "gw", Password: "s3cret-pw"}})
	if _, err := s.CreateFunction(testCtx(t), &skiffv1.Function{Name: "authed"}); err != nil {
		t.Fatal(err)
	}
	_, err := Open(testCtx(t), Config{URLs: c.URLs(), Replicas: 1, Auth: Auth{User: "gw", Password: "wrong-pw"}})
	wantKind(t, "wrong password", err, errs.KindUnauthenticated)
	if strings.Contains(err.Error(), "wrong-pw") || strings.Contains(err.Error(), "s3cret-pw") {
		t.Fatalf("error shows a password: %v", err)
	}
	_, err = Open(testCtx(t), Config{URLs: c.URLs(), Replicas: 1})
	wantKind(t, "no credentials", err, errs.KindUnauthenticated)
}

func TestExternalToken(t *testing.T) {
	c := natstest.Start(t, natstest.Config{Nodes: 1, Extra: `authorization { token: "tok-123456" }`})
	s := openExternal(t, Config{URLs: c.URLs(), Replicas: 1, Auth: Auth{Token: "tok-123456"}})
	if _, err := s.CreateFunction(testCtx(t), &skiffv1.Function{Name: "tokened"}); err != nil {
		t.Fatal(err)
	}
	_, err := Open(testCtx(t), Config{URLs: c.URLs(), Replicas: 1, Auth: Auth{Token: "tok-bad"}})
	wantKind(t, "wrong token", err, errs.KindUnauthenticated)
}

// TestExternalMutualTLS runs a server that requires TLS with client
// certificates of a test CA: the store connects with the CA and its
// certificate, and is refused without the certificate.
func TestExternalMutualTLS(t *testing.T) {
	dir := t.TempDir()
	pki := newTestPKI(t, dir)
	c := natstest.Start(t, natstest.Config{Nodes: 1, Extra: fmt.Sprintf("tls {\n cert_file: %q\n key_file: %q\n ca_file: %q\n verify: true\n timeout: 5\n}\n",
		pki.serverCert, pki.serverKey, pki.ca)})
	url := strings.Replace(c.URLs()[0], "nats://", "tls://", 1)
	s := openExternal(t, Config{URLs: []string{url}, Replicas: 1, TLS: TLSFiles{CAFile: pki.ca, CertFile: pki.clientCert, KeyFile: pki.clientKey}})
	if _, err := s.CreateFunction(testCtx(t), &skiffv1.Function{Name: "tls"}); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(testCtx(t), Config{URLs: []string{url}, Replicas: 1, TLS: TLSFiles{CAFile: pki.ca}}); err == nil {
		t.Fatal("connected without a client certificate")
	}
	// A CA that did not sign the server's certificate: refused.
	other := newTestPKI(t, t.TempDir())
	if _, err := Open(testCtx(t), Config{URLs: []string{url}, Replicas: 1, TLS: TLSFiles{CAFile: other.ca, CertFile: pki.clientCert, KeyFile: pki.clientKey}}); err == nil {
		t.Fatal("connected to a server whose certificate the CA did not sign")
	}
}

type testPKI struct{ ca, serverCert, serverKey, clientCert, clientKey string }

func newTestPKI(t *testing.T, dir string) testPKI {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "skiff test ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	p := testPKI{ca: filepath.Join(dir, "ca.pem")}
	writePEM(t, p.ca, "CERTIFICATE", caDER)
	issue := func(name string, serial int64, usage x509.ExtKeyUsage) (string, string) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
			IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		cert, keyFile := filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem")
		writePEM(t, cert, "CERTIFICATE", der)
		writePEM(t, keyFile, "PRIVATE KEY", keyDER)
		return cert, keyFile
	}
	p.serverCert, p.serverKey = issue("server", 2, x509.ExtKeyUsageServerAuth)
	p.clientCert, p.clientKey = issue("client", 3, x509.ExtKeyUsageClientAuth)
	return p
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}
