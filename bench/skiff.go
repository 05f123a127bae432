package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/internal/devserver"
)

// skiff is a running `skiff dev` (in this process) and clients of its API.
type skiff struct {
	addr    string
	key     string
	httpc   *http.Client // HTTP/1.1 keep-alive, for latency and throughput
	h2c     *http.Client // one multiplexed connection, for the memory phase
	fns     skiffv1connect.FunctionServiceClient
	inv     skiffv1connect.InvokeServiceClient
	invH2C  skiffv1connect.InvokeServiceClient
	queues  skiffv1connect.QueueServiceClient
	streams skiffv1connect.StreamServiceClient
	esm     skiffv1connect.EventSourceServiceClient
	stop    context.CancelFunc
	done    chan error
	dataDir string
}

// startSkiff runs devserver.Run (what `skiff dev` runs) on a free loopback
// port with a fresh data dir and the given async durability ("" is the
// default), and returns once it serves. With acceptGzip false the Connect
// clients do not offer gzip, so the server sends responses uncompressed.
func startSkiff(ctx context.Context, acceptGzip bool, durability string) (_ *skiff, err error) {
	dir, err := os.MkdirTemp("", "skiff-bench-")
	if err != nil {
		return nil, err
	}
	// Sandboxes run as an unprivileged user and must traverse to their code.
	if err := os.Chmod(dir, 0o711); err != nil {
		_ = os.RemoveAll(dir)
		return nil, err
	}
	rctx, cancel := context.WithCancel(ctx)
	s := &skiff{stop: cancel, done: make(chan error, 1), dataDir: dir}
	ready := make(chan string, 1)
	go func() {
		s.done <- devserver.Run(rctx, devserver.Config{
			DataDir:         dir,
			Listen:          "127.0.0.1:0",
			KeepAlive:       10 * time.Minute,
			AsyncDurability: durability,
			Logger:          slog.New(slog.DiscardHandler),
			Stdout:          io.Discard,
			Ready:           func(a string) { ready <- a },
		})
	}()
	select {
	case s.addr = <-ready:
	case err := <-s.done:
		s.done <- err
		return nil, errors.Join(fmt.Errorf("skiff dev exited at start: %w", err), s.close())
	case <-time.After(2 * time.Minute):
		return nil, errors.Join(errors.New("skiff dev did not start within 2m"), s.close())
	}
	key, err := os.ReadFile(filepath.Join(dir, "admin.key"))
	if err != nil {
		return nil, errors.Join(fmt.Errorf("reading the admin key: %w", err), s.close())
	}
	s.key = strings.TrimSpace(string(key))
	s.dial(acceptGzip)
	return s, nil
}

// dial makes the API clients of s.addr with s.key.
func (s *skiff) dial(acceptGzip bool) {
	s.httpc = &http.Client{Transport: &http.Transport{
		MaxIdleConnsPerHost: 256,
		IdleConnTimeout:     5 * time.Minute,
		DisableCompression:  true,
	}}
	h2 := &http.Transport{Protocols: new(http.Protocols)}
	h2.Protocols.SetUnencryptedHTTP2(true)
	s.h2c = &http.Client{Transport: h2}
	base := "http://" + s.addr
	opts := []connect.ClientOption{connect.WithInterceptors(bearer(s.key))}
	if !acceptGzip {
		opts = append(opts, connect.WithAcceptCompression("gzip", nil, nil))
	}
	s.fns = skiffv1connect.NewFunctionServiceClient(s.httpc, base, opts...)
	s.inv = skiffv1connect.NewInvokeServiceClient(s.httpc, base, opts...)
	s.invH2C = skiffv1connect.NewInvokeServiceClient(s.h2c, base, opts...)
	s.queues = skiffv1connect.NewQueueServiceClient(s.httpc, base, opts...)
	s.streams = skiffv1connect.NewStreamServiceClient(s.httpc, base, opts...)
	s.esm = skiffv1connect.NewEventSourceServiceClient(s.httpc, base, opts...)
}

// close stops skiff dev (it drains and closes its sandboxes) and removes
// its data dir.
func (s *skiff) close() error {
	return errors.Join(s.shutdown(), os.RemoveAll(s.dataDir), removeRunDir(s.dataDir))
}

// shutdown stops skiff dev and keeps its data dir; a second call returns
// at once.
func (s *skiff) shutdown() error {
	if s.done == nil {
		return nil
	}
	s.stop()
	var err error
	select {
	case err = <-s.done:
		if errors.Is(err, context.Canceled) {
			err = nil
		}
	case <-time.After(90 * time.Second):
		err = errors.New("skiff dev did not stop within 90s")
	}
	s.done = nil
	if s.httpc != nil {
		s.httpc.CloseIdleConnections()
		s.h2c.CloseIdleConnections()
	}
	return err
}

// removeRunDir removes the jail's per-agent run directory, which the agent
// derives from its data dir (agent.Config.RunDir's default) and leaves
// behind holding an empty root/. Only empty directories are removed: a
// mount point or a file left there makes it fail instead.
func removeRunDir(dataDir string) error {
	sum := sha256.Sum256([]byte(filepath.Join(dataDir, "agent")))
	dir := filepath.Join("/run/skiff", hex.EncodeToString(sum[:6]))
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range ents {
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil {
			return fmt.Errorf("cleaning up after the agent: %w", err)
		}
	}
	return os.Remove(dir)
}

// bearer authenticates every request with the admin key.
func bearer(key string) connect.UnaryInterceptorFunc {
	return func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			req.Header().Set("Authorization", "Bearer "+key)
			return next(ctx, req)
		}
	}
}

func (s *skiff) createFunction(ctx context.Context, name string, fn *function) error {
	return s.createFunctionEnv(ctx, name, fn, nil)
}

// createFunctionEnv creates name with environment variables env.
func (s *skiff) createFunctionEnv(ctx context.Context, name string, fn *function, env map[string]string) error {
	_, err := s.fns.CreateFunction(ctx, connect.NewRequest(&skiffv1.CreateFunctionRequest{
		Name:    name,
		ZipFile: fn.zip,
		Config:  &skiffv1.FunctionConfig{Runtime: "provided", Handler: "bootstrap", MemoryMb: 128, TimeoutSeconds: 10, Environment: env},
	}))
	if err != nil {
		return fmt.Errorf("creating function %s: %w", name, err)
	}
	return nil
}

func (s *skiff) deleteFunction(ctx context.Context, name string) error {
	if _, err := s.fns.DeleteFunction(ctx, connect.NewRequest(&skiffv1.DeleteFunctionRequest{Name: name})); err != nil {
		return fmt.Errorf("deleting function %s: %w", name, err)
	}
	return nil
}

// invoke calls Invoke through client and returns the response and the time
// from request to response.
func invoke(ctx context.Context, client skiffv1connect.InvokeServiceClient, name string, payload []byte, tail bool) (*skiffv1.InvokeResponse, time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req := &skiffv1.InvokeRequest{FunctionName: name, Payload: payload}
	if tail {
		req.LogType = skiffv1.LogType_LOG_TYPE_TAIL
	}
	start := time.Now()
	resp, err := client.Invoke(ctx, connect.NewRequest(req))
	d := time.Since(start)
	if err != nil {
		return nil, 0, fmt.Errorf("invoking %s: %w", name, err)
	}
	if fe := resp.Msg.GetFunctionError(); fe != "" {
		return nil, 0, fmt.Errorf("invoking %s: function error %s: %s", name, fe, resp.Msg.GetPayload())
	}
	return resp.Msg, d, nil
}

// echo invokes name with the echo payload and checks the answer.
func (s *skiff) echo(ctx context.Context, name string) (time.Duration, error) {
	resp, d, err := invoke(ctx, s.inv, name, echoPayload, false)
	if err != nil {
		return 0, err
	}
	return d, checkEcho(resp.GetPayload())
}

// coldResult is the cold start phase's outcome.
type coldResult struct {
	total   latencies // request to response
	init    latencies // the agent's Init Duration, from the REPORT line
	outside latencies // request to response minus Init Duration, per invoke
	notCold int       // invokes whose log had no Init Duration
}

var initDurationRE = regexp.MustCompile(`Init Duration: ([0-9.]+) ms`)

// benchCold creates n functions with the same code and invokes each once,
// so that every measured invoke starts a new sandbox; each function is
// deleted (retiring its sandbox) after its measurement. With profile set it
// CPU-profiles the whole phase.
func (s *skiff) benchCold(ctx context.Context, fn *function, n int, profile string) (coldResult, error) {
	var res coldResult
	if profile != "" {
		stop, err := startProfile(profile)
		if err != nil {
			return res, err
		}
		defer stop()
	}
	var total, initD, outside []time.Duration
	for i := -1; i < n; i++ { // i == -1: an unmeasured first one fills the code cache
		name := "cold-" + strconv.Itoa(i+1)
		if i < 0 {
			name = "cold-warmup"
		}
		if err := s.createFunction(ctx, name, fn); err != nil {
			return res, err
		}
		resp, d, err := invoke(ctx, s.inv, name, echoPayload, true)
		if err != nil {
			return res, err
		}
		if err := checkEcho(resp.GetPayload()); err != nil {
			return res, err
		}
		if err := s.deleteFunction(ctx, name); err != nil {
			return res, err
		}
		if i < 0 {
			continue
		}
		total = append(total, d)
		if v, ok := initDuration(resp.GetLogResult()); ok {
			initD = append(initD, v)
			outside = append(outside, d-v)
		} else {
			res.notCold++
		}
	}
	res.total, res.init, res.outside = summarize(total), summarize(initD), summarize(outside)
	return res, nil
}

// initDuration extracts the Init Duration of a base64 log tail's REPORT line.
func initDuration(logResult string) (time.Duration, bool) {
	b, err := base64.StdEncoding.DecodeString(logResult)
	if err != nil {
		return 0, false
	}
	m := initDurationRE.FindSubmatch(b)
	if m == nil {
		return 0, false
	}
	v, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		return 0, false
	}
	return time.Duration(v * float64(time.Millisecond)), true
}

// benchWarm measures n sequential warm invokes of skiff's function name
// and n of the emulator's, after warmup unmeasured ones each. They run in
// alternating rounds so that both see the same machine (load from other
// processes, CPU frequency). With profile set it CPU-profiles the measured
// rounds (the emulator's appear as main.(*emulator).invoke).
func (s *skiff) benchWarm(ctx context.Context, name string, em *emulator, warmup, n, rounds int, profile string) (sk, rie latencies, err error) {
	for range warmup {
		if _, err := s.echo(ctx, name); err != nil {
			return sk, rie, err
		}
		if _, err := em.invoke(ctx); err != nil {
			return sk, rie, err
		}
	}
	if profile != "" {
		stop, err := startProfile(profile)
		if err != nil {
			return sk, rie, err
		}
		defer stop()
	}
	skiffRound := func(k int, into []time.Duration) ([]time.Duration, error) {
		for range k {
			v, err := s.echo(ctx, name)
			if err != nil {
				return into, err
			}
			into = append(into, v)
		}
		return into, nil
	}
	rieRound := func(k int, into []time.Duration) ([]time.Duration, error) {
		for range k {
			v, err := em.invoke(ctx)
			if err != nil {
				return into, err
			}
			into = append(into, v)
		}
		return into, nil
	}
	ds := make([]time.Duration, 0, n)
	dr := make([]time.Duration, 0, n)
	rounds = max(1, min(rounds, n))
	for r := range rounds {
		k := n/rounds + btoi(r < n%rounds)
		first, second := skiffRound, rieRound
		a, b := &ds, &dr
		if r%2 == 1 {
			first, second = rieRound, skiffRound
			a, b = &dr, &ds
		}
		if *a, err = first(k, *a); err != nil {
			return sk, rie, err
		}
		if *b, err = second(k, *b); err != nil {
			return sk, rie, err
		}
	}
	return summarize(ds), summarize(dr), nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// startProfile starts a CPU profile into path; stop ends it.
func startProfile(path string) (stop func(), err error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, err
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}, nil
}

// throughput is one concurrency level's outcome.
type throughput struct {
	concurrency int
	perSecond   float64
	invokes     int64
	p50, p99    time.Duration
}

// benchThroughput runs, for each concurrency c, c workers invoking name
// back to back for d, after making sure c warm sandboxes exist (c
// concurrent sleeping invokes), so it measures warm throughput.
func (s *skiff) benchThroughput(ctx context.Context, name string, levels []int, d time.Duration, progress func(string)) ([]throughput, error) {
	var out []throughput
	for _, c := range levels {
		progress(fmt.Sprintf("throughput: concurrency %d (warming %d sandboxes, then %s)", c, c, d))
		if err := s.concurrently(ctx, s.inv, name, c, []byte(`{"action":"sleep","sleep":"200ms"}`)); err != nil {
			return nil, err
		}
		var (
			count atomic.Int64
			mu    sync.Mutex
			lat   []time.Duration
			first error
			wg    sync.WaitGroup
		)
		stop := time.Now().Add(d)
		start := time.Now()
		for range c {
			wg.Go(func() {
				var mine []time.Duration
				for time.Now().Before(stop) && ctx.Err() == nil {
					v, err := s.echo(ctx, name)
					if err != nil {
						mu.Lock()
						if first == nil {
							first = err
						}
						mu.Unlock()
						return
					}
					count.Add(1)
					mine = append(mine, v)
				}
				mu.Lock()
				lat = append(lat, mine...)
				mu.Unlock()
			})
		}
		wg.Wait()
		elapsed := time.Since(start)
		if first != nil {
			return nil, fmt.Errorf("throughput at concurrency %d: %w", c, first)
		}
		sum := summarize(lat)
		out = append(out, throughput{concurrency: c, invokes: count.Load(), perSecond: float64(count.Load()) / elapsed.Seconds(), p50: sum.p50, p99: sum.p99})
	}
	return out, nil
}

// concurrently runs n invokes of name with payload at once and waits.
func (s *skiff) concurrently(ctx context.Context, client skiffv1connect.InvokeServiceClient, name string, n int, payload []byte) error {
	errc := make(chan error, n)
	for range n {
		go func() {
			_, _, err := invoke(ctx, client, name, payload, false)
			errc <- err
		}()
	}
	var err error
	for range n {
		err = errors.Join(err, <-errc)
	}
	return err
}

// memoryResult is the idle sandbox memory phase's outcome.
type memoryResult struct {
	sandboxes     int     // new idle sandboxes measured
	perSandbox    float64 // bytes of Go heap and stacks per idle sandbox
	goroutines    float64 // goroutines per idle sandbox
	countedByProm bool    // sandboxes was read from skiff_sandboxes, not assumed
}

// benchMemory measures what n idle sandboxes cost the agent in this
// process: Go heap in use plus stacks, after a GC, before and after n
// concurrent sleeping invokes of a fresh function (which start n
// sandboxes that then idle). It uses the one-connection h2c client so that
// opening client connections does not count.
func (s *skiff) benchMemory(ctx context.Context, fn *function, n int) (memoryResult, error) {
	var res memoryResult
	const name = "idle"
	sleep := []byte(`{"action":"sleep","sleep":"300ms"}`)
	if err := s.createFunction(ctx, name, fn); err != nil {
		return res, err
	}
	// One unmeasured invoke: per-function state (spec and metric series,
	// the h2c connection) is not a per-sandbox cost.
	if _, _, err := invoke(ctx, s.invH2C, name, sleep, false); err != nil {
		return res, err
	}
	idleBefore, okBefore := s.idleSandboxes(ctx)
	before, gBefore := heapAndStacks()
	if err := s.concurrently(ctx, s.invH2C, name, n+1, sleep); err != nil { // one reuses the warm sandbox
		return res, err
	}
	after, gAfter := heapAndStacks()
	idleAfter, okAfter := s.idleSandboxes(ctx)
	res.sandboxes = n
	if okBefore && okAfter && idleAfter > idleBefore {
		res.sandboxes, res.countedByProm = idleAfter-idleBefore, true
	}
	res.perSandbox = float64(int64(after)-int64(before)) / float64(res.sandboxes)
	res.goroutines = float64(gAfter-gBefore) / float64(res.sandboxes)
	// Retire them now: the throughput phase needs the host's memory.
	return res, s.deleteFunction(ctx, name)
}

// heapAndStacks returns HeapInuse+StackInuse and the goroutine count after
// a full collection.
func heapAndStacks() (uint64, int) {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse + m.StackInuse, runtime.NumGoroutine()
}

// idleSandboxes reads the agent's skiff_sandboxes{state="idle"} gauge from
// /metrics; ok is false when it is not there.
func (s *skiff) idleSandboxes(ctx context.Context) (int, bool) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+s.addr+"/metrics", nil)
	if err != nil {
		return 0, false
	}
	resp, err := s.httpc.Do(req)
	if err != nil {
		return 0, false
	}
	defer resp.Body.Close()
	found, total := false, 0
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "skiff_sandboxes{") || !strings.Contains(line, `state="idle"`) {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			continue
		}
		found, total = true, total+int(v)
	}
	return total, found
}
