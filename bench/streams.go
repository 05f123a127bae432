package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"connectrpc.com/connect"
	"github.com/nats-io/nats.go/jetstream"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/async"
	"skiff.dev/skiff/gateway/store"
)

// The streams section (issue 4): end-to-end records/s of a stream event
// source mapping over a backlog, IteratorAge at a steady 80% of the
// one-shard rate, lease takeover after a kill -9 of `skiff dev`, and
// JetStream's own consume rate of the same records.

// Targets of the benchmark section.
const (
	targetStreamPerShard = 50000 // records/s per shard
	targetTakeover       = 2 * time.Second
)

const (
	streamFunction  = "stream-sink" // no-op (KINESIS_NOOP)
	streamBatch     = 100
	streamDataBytes = 100
	streamKeys      = 4096 // distinct partition keys of the records
	streamWriters   = 4    // concurrent PutRecords clients writing a backlog
)

// streamTput is one backlog measurement.
type streamTput struct {
	shards   int
	records  int
	write    time.Duration // writing the backlog (PutRecords, streamWriters clients)
	took     time.Duration // mapping created → every record processed and checkpointed
	batches  int           // successful invokes
	rate     float64       // records/s end to end
	first    time.Duration // mapping created → the first batch processed
	steady   float64       // records/s from the first batch processed to the last
	rawTook  time.Duration // JetStream pull consumers, one per shard, batches of 100 (the faster of two passes)
	rawFirst time.Duration // the first pass
	rawRate  float64
	invokeMs float64 // mean invoke duration seen by the pollers (function + front end), ms
}

func (t streamTput) perShard() float64 { return t.steady / float64(t.shards) }

// ratio is skiff's steady rate over the raw consume rate.
func (t streamTput) ratio() float64 {
	if t.rawRate == 0 {
		return 0
	}
	return t.steady / t.rawRate
}

// ageResult is the steady-rate phase's outcome.
type ageResult struct {
	target   float64 // records/s asked for (80% of the one-shard rate)
	achieved float64 // records/s written
	d        time.Duration
	samples  int
	p50, p99 time.Duration // of the IteratorAge gauge, sampled every 10 ms
	max      time.Duration
	drained  time.Duration // last write → every record processed
}

// takeoverResult is the kill -9 phase's outcome.
type takeoverResult struct {
	lanes     int
	restart   time.Duration // kill → the restarted skiff dev serves
	held      time.Duration // kill → the restarted process polls every lane
	claimed   time.Duration // kill → every lane's checkpoint claimed (takeovers), 0 when not counted
	takeovers int
	resumed   time.Duration // kill → the first batch processed after the restart
	before    int           // records processed before the kill
	drained   time.Duration // kill → every record processed at least once
}

// streamRun is what one in-process skiff dev measured at one durability.
type streamRun struct {
	durability async.Durability
	tput       []streamTput // 1 shard, 8 shards
	age        ageResult
}

type streamsResult struct {
	runs     []streamRun
	takeover takeoverResult
}

// benchStreams runs the streams section: for each durability a fresh
// in-process skiff dev, then the takeover phase's process.
func benchStreams(ctx context.Context, cfg config, repo string, fn *function, progress func(string)) (*streamsResult, error) {
	res := &streamsResult{}
	for _, d := range cfg.streamDurability {
		run, err := benchStreamRun(ctx, cfg, fn, d, progress)
		if err != nil {
			return nil, fmt.Errorf("streams, durability %s: %w", d, err)
		}
		res.runs = append(res.runs, run)
	}
	progress("streams: lease takeover after kill -9 of a skiff dev process")
	var err error
	if res.takeover, err = benchTakeover(ctx, cfg, repo, fn, progress); err != nil {
		return nil, fmt.Errorf("streams, takeover: %w", err)
	}
	return res, nil
}

// backlogRecords is the backlog of a throughput phase: -stream-records for
// one shard, four times that for eight.
func backlogRecords(cfg config, shards int) int {
	if shards == 1 {
		return cfg.streamRecords
	}
	return 4 * cfg.streamRecords
}

// benchStreamRun runs the throughput and IteratorAge phases against a
// fresh skiff dev with durability d, then JetStream's consume rate of the
// same records.
func benchStreamRun(ctx context.Context, cfg config, fn *function, d async.Durability, progress func(string)) (_ streamRun, err error) {
	run := streamRun{durability: d}
	progress(fmt.Sprintf("streams %s: starting skiff dev", d))
	s, err := startSkiff(ctx, cfg.acceptGzip, string(d))
	if err != nil {
		return run, err
	}
	defer func() {
		progress(fmt.Sprintf("streams %s: stopping skiff dev", d))
		err = errors.Join(err, s.close())
	}()
	if err := s.createFunctionEnv(ctx, streamFunction, fn, map[string]string{"KINESIS_NOOP": "1"}); err != nil {
		return run, err
	}
	// One warm sandbox, so the first batch is not also a cold start.
	if _, _, err := invoke(ctx, s.inv, streamFunction, echoPayload, false); err != nil {
		return run, err
	}
	for _, shards := range []int{1, 8} {
		n := backlogRecords(cfg, shards)
		progress(fmt.Sprintf("streams %s: %d shard(s), writing a backlog of %d records", d, shards, n))
		t, err := s.streamBacklog(ctx, cfg, d, shards, n, progress)
		if err != nil {
			return run, fmt.Errorf("%d shards: %w", shards, err)
		}
		run.tput = append(run.tput, t)
	}
	rate := 0.8 * run.tput[0].steady
	progress(fmt.Sprintf("streams %s: IteratorAge at %.0f records/s (80%% of the one-shard rate) for %s", d, rate, cfg.streamAgeDuration))
	if run.age, err = s.streamAge(ctx, rate, cfg.streamAgeDuration); err != nil {
		return run, fmt.Errorf("iterator age: %w", err)
	}

	// JetStream's own consume rate of the same records, from the same
	// storage: skiff dev must be stopped first (the data dir is locked).
	progress(fmt.Sprintf("streams %s: stopping skiff dev; JetStream pull consumers over the same records", d))
	if err := s.shutdown(); err != nil {
		return run, err
	}
	for i := range run.tput {
		t := &run.tput[i]
		if t.rawTook, t.rawFirst, err = rawConsume(ctx, filepath.Join(s.dataDir, "store"), tputStream(t.shards), t.records); err != nil {
			return run, fmt.Errorf("raw consume of %s: %w", tputStream(t.shards), err)
		}
		t.rawRate = float64(t.records) / t.rawTook.Seconds()
	}
	return run, nil
}

func tputStream(shards int) string { return fmt.Sprintf("tput-%d", shards) }

// streamBacklog writes a backlog of n records to a new stream of shards
// shards, then creates a mapping (batch 100, TRIM_HORIZON) and times it
// until every record is processed.
func (s *skiff) streamBacklog(ctx context.Context, cfg config, d async.Durability, shards, n int, progress func(string)) (streamTput, error) {
	name := tputStream(shards)
	t := streamTput{shards: shards, records: n}
	if _, err := s.streams.CreateStream(ctx, connect.NewRequest(&skiffv1.CreateStreamRequest{Name: name, ShardCount: int32(shards)})); err != nil {
		return t, fmt.Errorf("creating stream %s: %w", name, err)
	}
	began := time.Now()
	if err := s.writeBacklog(ctx, name, t.records); err != nil {
		return t, err
	}
	t.write = time.Since(began)
	before, err := s.streamCounters(ctx)
	if err != nil {
		return t, err
	}
	progress(fmt.Sprintf("streams %s: %d shard(s), mapping created, processing %d records", d, shards, t.records))
	stop, err := streamsProfile(cfg, fmt.Sprintf("%s.%dshards", d, shards))
	if err != nil {
		return t, err
	}
	start := time.Now()
	m, err := s.createStreamMapping(ctx, name, "TRIM_HORIZON")
	if err != nil {
		stop()
		return t, err
	}
	first, firstN, done, err := s.waitStreamProcessed(ctx, before.records, float64(t.records), 5*time.Minute)
	stop()
	if err != nil {
		return t, err
	}
	t.took, t.first = done.Sub(start), first.Sub(start)
	t.rate = float64(t.records) / t.took.Seconds()
	if done.After(first) {
		t.steady = (float64(t.records) - firstN) / done.Sub(first).Seconds()
	}
	after, err := s.streamCounters(ctx)
	if err != nil {
		return t, err
	}
	t.batches = int(after.batches - before.batches)
	if n := after.invokes - before.invokes; n > 0 {
		t.invokeMs = 1000 * (after.invokeSecs - before.invokeSecs) / n
	}
	return t, s.deleteMapping(ctx, m)
}

// writeBacklog writes n records of streamDataBytes to stream with
// streamWriters clients, 500 a call, retrying records the calls did not
// store.
func (s *skiff) writeBacklog(ctx context.Context, stream string, n int) error {
	var (
		mu    sync.Mutex
		next  int
		first error
		wg    sync.WaitGroup
	)
	take := func() (int, int) {
		mu.Lock()
		defer mu.Unlock()
		lo := next
		next = min(n, next+500)
		return lo, next
	}
	for range streamWriters {
		wg.Go(func() {
			for {
				lo, hi := take()
				if lo == hi {
					return
				}
				if err := s.putRange(ctx, stream, lo, hi); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					next = n
					mu.Unlock()
					return
				}
			}
		})
	}
	wg.Wait()
	return first
}

// putRange stores records lo..hi-1 (partition key "k-<i mod streamKeys>")
// in one PutRecords call, again for those it did not store.
func (s *skiff) putRange(ctx context.Context, stream string, lo, hi int) error {
	data := bytes.Repeat([]byte("x"), streamDataBytes)
	var todo []int
	for i := lo; i < hi; i++ {
		todo = append(todo, i)
	}
	for attempt := 0; len(todo) > 0; attempt++ {
		if attempt == 20 {
			return fmt.Errorf("putting records: %d not stored after %d attempts", len(todo), attempt)
		}
		req := &skiffv1.PutRecordsRequest{Stream: stream, Records: make([]*skiffv1.PutRecordsEntry, len(todo))}
		for j, i := range todo {
			req.Records[j] = &skiffv1.PutRecordsEntry{PartitionKey: "k-" + strconv.Itoa(i%streamKeys), Data: data}
		}
		resp, err := s.streams.PutRecords(ctx, connect.NewRequest(req))
		if err != nil {
			return fmt.Errorf("putting records: %w", err)
		}
		var again []int
		for j, r := range resp.Msg.GetRecords() {
			if r.GetErrorCode() != "" {
				again = append(again, todo[j])
			}
		}
		todo = again
	}
	return nil
}

func (s *skiff) createStreamMapping(ctx context.Context, stream, pos string) (string, error) {
	resp, err := s.esm.CreateEventSourceMapping(ctx, connect.NewRequest(&skiffv1.CreateEventSourceMappingRequest{Mapping: &skiffv1.EventSourceMapping{
		FunctionName: streamFunction, Stream: stream, BatchSize: new(int32(streamBatch)), StartingPosition: pos,
	}}))
	if err != nil {
		return "", fmt.Errorf("creating a mapping of stream %s: %w", stream, err)
	}
	return resp.Msg.GetMapping().GetUuid(), nil
}

func (s *skiff) deleteMapping(ctx context.Context, id string) error {
	if _, err := s.esm.DeleteEventSourceMapping(ctx, connect.NewRequest(&skiffv1.DeleteEventSourceMappingRequest{Uuid: id})); err != nil {
		return fmt.Errorf("deleting mapping %s: %w", id, err)
	}
	return nil
}

// streamCounters are counters of skiff dev's /metrics the streams section
// reads.
type streamCounters struct {
	records, batches    float64
	invokes, invokeSecs float64 // sync invokes through the front end
}

func (s *skiff) streamCounters(ctx context.Context) (streamCounters, error) {
	var c streamCounters
	var err error
	if c.records, err = s.metric(ctx, "skiff_streams_records_processed_total", ""); err != nil {
		return c, err
	}
	if c.batches, err = s.metric(ctx, "skiff_streams_batches_total", `result="success"`); err != nil {
		return c, err
	}
	if c.invokes, err = s.metric(ctx, "skiff_invocation_duration_seconds_count", streamFunction); err != nil {
		return c, err
	}
	if c.invokeSecs, err = s.metric(ctx, "skiff_invocation_duration_seconds_sum", streamFunction); err != nil {
		return c, err
	}
	return c, nil
}

// waitStreamProcessed waits until skiff_streams_records_processed_total
// is n above base (polled every 20 ms) and returns when it first saw it
// above base and how far, and when it got to n.
func (s *skiff) waitStreamProcessed(ctx context.Context, base, n float64, timeout time.Duration) (first time.Time, firstN float64, done time.Time, err error) {
	deadline := time.Now().Add(timeout)
	for {
		v, err := s.metric(ctx, "skiff_streams_records_processed_total", "")
		if err != nil {
			return first, 0, done, err
		}
		now := time.Now()
		if first.IsZero() && v > base {
			first, firstN = now, v-base
		}
		if v-base >= n {
			return first, firstN, now, nil
		}
		if now.After(deadline) {
			return first, firstN, done, fmt.Errorf("%.0f of %.0f stream records processed within %s", v-base, n, timeout)
		}
		select {
		case <-ctx.Done():
			return first, firstN, done, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// streamAge writes to a one-shard stream at rate records/s for d (open
// loop: every 10 ms the records due so far, in calls of up to 500) while
// a mapping processes them, and samples the mapping's IteratorAge gauge
// every 10 ms after the first second.
func (s *skiff) streamAge(ctx context.Context, rate float64, d time.Duration) (ageResult, error) {
	res := ageResult{target: rate, d: d}
	const name = "age"
	if _, err := s.streams.CreateStream(ctx, connect.NewRequest(&skiffv1.CreateStreamRequest{Name: name, ShardCount: 1})); err != nil {
		return res, fmt.Errorf("creating stream %s: %w", name, err)
	}
	before, err := s.streamCounters(ctx)
	if err != nil {
		return res, err
	}
	m, err := s.createStreamMapping(ctx, name, "TRIM_HORIZON")
	if err != nil {
		return res, err
	}
	// The lane is polled before the writes start.
	if err := waitMetric(ctx, s, "skiff_streams_pollers", 1, 30*time.Second); err != nil {
		return res, err
	}
	var (
		samples []time.Duration
		wg      sync.WaitGroup
	)
	sctx, stopSampling := context.WithCancel(ctx)
	wg.Go(func() {
		from := time.Now().Add(time.Second)
		for sctx.Err() == nil {
			if v, err := s.metric(sctx, "skiff_streams_iterator_age_milliseconds", `mapping="`+m+`"`); err == nil && time.Now().After(from) {
				samples = append(samples, time.Duration(v*float64(time.Millisecond)))
			}
			select {
			case <-sctx.Done():
			case <-time.After(10 * time.Millisecond):
			}
		}
	})
	start := time.Now()
	sent := 0
	var werr error
	for werr == nil && time.Since(start) < d {
		due := int(rate * time.Since(start).Seconds())
		for sent < due && werr == nil {
			k := min(due-sent, 500)
			werr = s.putRange(ctx, name, sent, sent+k)
			sent += k
		}
		select {
		case <-ctx.Done():
			werr = ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
	wrote := time.Since(start)
	res.achieved = float64(sent) / wrote.Seconds()
	if werr != nil {
		stopSampling()
		wg.Wait()
		return res, werr
	}
	_, _, done, err := s.waitStreamProcessed(ctx, before.records, float64(sent), 2*time.Minute)
	stopSampling()
	wg.Wait()
	if err != nil {
		return res, err
	}
	res.drained = done.Sub(start.Add(wrote))
	sum := summarize(samples)
	res.samples, res.p50, res.p99 = sum.n, sum.p50, sum.p99
	for _, v := range samples {
		res.max = max(res.max, v)
	}
	return res, s.deleteMapping(ctx, m)
}

// waitMetric waits until a metric's sum reaches n.
func waitMetric(ctx context.Context, s *skiff, name string, n float64, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		v, err := s.metric(ctx, name, "")
		if err == nil && v >= n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s is %v, not %v, after %s (%v)", name, v, n, timeout, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// rawConsume opens the stopped skiff dev's storage (dir) and reads every
// record of the stream called name with a JetStream pull consumer
// (filtered on the shards' subjects, no acks) fetching batches of 100, twice
// (the first pass loads the storage from disk; skiff's pollers read
// records just written); it returns the faster pass's time from the first
// fetch to the last record, and the first pass's.
func rawConsume(ctx context.Context, dir, name string, want int) (best, first time.Duration, err error) {
	st, err := store.Open(ctx, store.Config{DataDir: dir})
	if err != nil {
		return 0, 0, err
	}
	defer func() { err = errors.Join(err, st.Close()) }()
	for pass := range 2 {
		d, err := rawPass(ctx, st.JetStream(), name, want)
		if err != nil {
			return 0, 0, err
		}
		if pass == 0 {
			best, first = d, d
		}
		best = min(best, d)
	}
	return best, first, nil
}

// rawPass is one pass of rawConsume.
func rawPass(ctx context.Context, js jetstream.JetStream, name string, want int) (time.Duration, error) {
	var jsName string
	lister := js.ListStreams(ctx)
	for info := range lister.Info() {
		if info.Config.Description == "skiff kinesis stream "+name {
			jsName = info.Config.Name
		}
	}
	if err := lister.Err(); err != nil {
		return 0, err
	}
	if jsName == "" {
		return 0, fmt.Errorf("no JetStream stream holds stream %s", name)
	}
	stream, err := js.Stream(ctx, jsName)
	if err != nil {
		return 0, err
	}
	info, err := stream.Info(ctx, jetstream.WithSubjectFilter(">"))
	if err != nil {
		return 0, err
	}
	// One consumer over every shard's subject, in stream order.
	filter, total := "", 0
	for subj, n := range info.State.Subjects {
		if i := strings.Index(subj, ".s."); i >= 0 {
			filter = subj[:i] + ".s.>"
			total += int(n)
		}
	}
	if total != want {
		return 0, fmt.Errorf("stream %s holds %d records, want %d", name, total, want)
	}
	c, err := stream.CreateConsumer(ctx, jetstream.ConsumerConfig{
		DeliverPolicy: jetstream.DeliverAllPolicy, AckPolicy: jetstream.AckNonePolicy,
		FilterSubject: filter, MemoryStorage: true, InactiveThreshold: 10 * time.Second,
	})
	if err != nil {
		return 0, err
	}
	start := time.Now()
	got, size := 0, 0
	for got < total {
		batch, err := c.Fetch(streamBatch, jetstream.FetchMaxWait(5*time.Second))
		if err == nil {
			for m := range batch.Messages() {
				size += len(m.Data())
				got++
			}
			err = batch.Error()
		}
		if err != nil {
			return 0, fmt.Errorf("%d of %d records: %w", got, total, err)
		}
	}
	if size == 0 {
		return 0, errors.New("the records are empty")
	}
	return time.Since(start), nil
}

// streamsProfile starts a CPU profile of one streams phase when
// -streamsprofile asks for it.
func streamsProfile(cfg config, phase string) (stop func(), err error) {
	if cfg.streamsProf == "" {
		return func() {}, nil
	}
	return startProfile(fmt.Sprintf("%s.%s.pprof", cfg.streamsProf, phase))
}

// Takeover: a `skiff dev` process of its own (cmd/skiff, built here),
// killed with SIGKILL while its pollers hold every lane mid-stream and
// restarted on the same data dir.

const (
	takeoverShards  = 8
	takeoverRecords = 2000 // per shard
	takeoverSubnet  = "10.251.0.0/22"
)

// devProc is a `skiff dev` process.
type devProc struct {
	*skiff
	cmd  *exec.Cmd
	out  *lockedBuffer
	exit chan struct{}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.b.Len() > 4<<20 { // bounded: only the start matters
		return len(p), nil
	}
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// startDevProc starts bin dev on dataDir and addr and returns once it
// serves (its admin key exists and it logged "listening on").
func startDevProc(ctx context.Context, bin, dataDir, addr string, acceptGzip bool) (*devProc, error) {
	p := &devProc{skiff: &skiff{addr: addr, dataDir: dataDir}, out: &lockedBuffer{}, exit: make(chan struct{})}
	p.cmd = exec.Command(bin, "dev", "--data-dir", dataDir, "--listen", addr, "--sandbox-subnet", takeoverSubnet)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { _ = p.cmd.Wait(); close(p.exit) }()
	deadline := time.Now().Add(time.Minute)
	for {
		if key, err := os.ReadFile(filepath.Join(dataDir, "admin.key")); err == nil && len(key) > 0 && strings.Contains(p.out.String(), "listening on") {
			p.key = strings.TrimSpace(string(key))
			break
		}
		select {
		case <-p.exit:
			return nil, fmt.Errorf("skiff dev exited at start: %v\n%s", p.cmd.ProcessState, tail(p.out.String()))
		case <-ctx.Done():
			p.kill()
			return nil, ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.kill()
			return nil, fmt.Errorf("skiff dev did not start within 1m:\n%s", tail(p.out.String()))
		}
	}
	p.dial(acceptGzip)
	return p, nil
}

func tail(s string) string {
	if len(s) > 4000 {
		return s[len(s)-4000:]
	}
	return s
}

// kill ends the process with SIGKILL, as a crash would.
func (p *devProc) kill() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.exit
	if p.httpc != nil {
		p.httpc.CloseIdleConnections()
	}
}

// stop ends the process with SIGTERM (SIGKILL after 60 s).
func (p *devProc) stop() error {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exit:
	case <-time.After(time.Minute):
		p.kill()
		return errors.New("skiff dev did not stop within 1m of SIGTERM")
	}
	if p.httpc != nil {
		p.httpc.CloseIdleConnections()
	}
	return nil
}

func freeLoopback() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// benchTakeover builds cmd/skiff, starts `skiff dev`, has a mapping of an
// 8-shard stream process a backlog with a function that sleeps 100 ms a
// batch (every lane mid-stream), kills the process with SIGKILL once every
// lane is polled and has processed a batch, restarts it on the same data
// dir and times the restart, every lane polled again, every lane's
// checkpoint claimed, the first batch and the rest of the backlog.
func benchTakeover(ctx context.Context, cfg config, repo string, fn *function, progress func(string)) (res takeoverResult, err error) {
	res.lanes = takeoverShards
	work, err := os.MkdirTemp("", "skiff-bench-takeover-")
	if err != nil {
		return res, err
	}
	defer func() { err = errors.Join(err, os.RemoveAll(work), removeRunDir(filepath.Join(work, "data"))) }()
	bin := filepath.Join(work, "skiff")
	progress("streams: building cmd/skiff")
	build := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/skiff")
	build.Dir = repo
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return res, fmt.Errorf("building skiff: %w\n%s", err, out)
	}
	dataDir := filepath.Join(work, "data")
	if err := os.Mkdir(dataDir, 0o711); err != nil {
		return res, err
	}
	if err := os.Chmod(work, 0o711); err != nil {
		return res, err
	}
	addr, err := freeLoopback()
	if err != nil {
		return res, err
	}
	p, err := startDevProc(ctx, bin, dataDir, addr, cfg.acceptGzip)
	if err != nil {
		return res, err
	}
	var running *devProc = p
	defer func() {
		if running != nil {
			err = errors.Join(err, running.stop())
		}
	}()
	if err := p.createFunctionEnv(ctx, streamFunction, fn, map[string]string{"KINESIS_NOOP": "1", "KINESIS_SLEEP": "100ms"}); err != nil {
		return res, err
	}
	const name = "takeover"
	if _, err := p.streams.CreateStream(ctx, connect.NewRequest(&skiffv1.CreateStreamRequest{Name: name, ShardCount: takeoverShards})); err != nil {
		return res, fmt.Errorf("creating stream %s: %w", name, err)
	}
	total := takeoverShards * takeoverRecords
	if err := p.writeBacklog(ctx, name, total); err != nil {
		return res, err
	}
	if _, err := p.createStreamMapping(ctx, name, "TRIM_HORIZON"); err != nil {
		return res, err
	}
	// Every lane polled and past its first batch (so it has a checkpoint).
	if err := waitMetric(ctx, p.skiff, "skiff_streams_pollers", takeoverShards, time.Minute); err != nil {
		return res, err
	}
	if err := waitMetric(ctx, p.skiff, "skiff_streams_batches_total", 2*takeoverShards, time.Minute); err != nil {
		return res, err
	}
	before, err := p.metric(ctx, "skiff_streams_records_processed_total", "")
	if err != nil {
		return res, err
	}
	res.before = int(before)
	progress(fmt.Sprintf("streams: kill -9 after %d of %d records, restarting on the same data dir", res.before, total))
	p.kill()
	running = nil
	killed := time.Now()
	p2, err := startDevProc(ctx, bin, dataDir, addr, cfg.acceptGzip)
	if err != nil {
		return res, fmt.Errorf("restarting: %w", err)
	}
	running = p2
	res.restart = time.Since(killed)
	deadline := killed.Add(time.Minute)
	for res.held == 0 || res.resumed == 0 || (res.claimed == 0 && time.Since(killed) < 15*time.Second) {
		if time.Now().After(deadline) {
			return res, fmt.Errorf("after 1m: lanes polled after %v, first batch after %v", res.held, res.resumed)
		}
		c, err := p2.counters(ctx)
		if err != nil {
			return res, err
		}
		since := time.Since(killed)
		if res.held == 0 && c.pollers >= takeoverShards {
			res.held = since
		}
		if res.claimed == 0 && c.takeovers >= takeoverShards {
			res.claimed = since
		}
		if res.resumed == 0 && c.records > 0 {
			res.resumed = since
		}
		res.takeovers = int(c.takeovers)
		time.Sleep(5 * time.Millisecond)
	}
	// Drained: every lane has reported an iterator age and all are 0
	// (caught up) after the last records.
	for {
		c, err := p2.counters(ctx)
		if err != nil {
			return res, err
		}
		if c.ageSeries >= takeoverShards && c.ageSum == 0 && c.records > 0 {
			res.drained = time.Since(killed)
			return res, nil
		}
		if time.Now().After(killed.Add(2 * time.Minute)) {
			return res, fmt.Errorf("the restarted process did not catch up within 2m (%v records processed)", c.records)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type procCounters struct {
	pollers, takeovers, records float64
	ageSeries                   int // skiff_streams_iterator_age_milliseconds series
	ageSum                      float64
}

// counters reads the takeover phase's metrics in one scrape.
func (s *skiff) counters(ctx context.Context) (procCounters, error) {
	var c procCounters
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+s.addr+"/metrics", nil)
	if err != nil {
		return c, err
	}
	resp, err := s.httpc.Do(req)
	if err != nil {
		return c, fmt.Errorf("reading metrics: %w", err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 {
			continue
		}
		v, err := strconv.ParseFloat(f[1], 64)
		if err != nil {
			continue
		}
		switch f[0] {
		case "skiff_streams_pollers":
			c.pollers = v
		case "skiff_streams_lease_takeovers_total":
			c.takeovers = v
		case "skiff_streams_records_processed_total":
			c.records = v
		default:
			if strings.HasPrefix(f[0], "skiff_streams_iterator_age_milliseconds{") {
				c.ageSeries++
				c.ageSum += v
			}
		}
	}
	return c, sc.Err()
}

// writeTable writes the streams section's tables.
func (r *streamsResult) writeTable(p func(string, ...any)) {
	type col struct {
		d string
		t streamTput
	}
	var cols []col
	for _, run := range r.runs {
		for _, t := range run.tput {
			cols = append(cols, col{string(run.durability), t})
		}
	}
	var head, sep strings.Builder
	fmt.Fprintf(&head, "| Stream mapping (batch %d, no-op function) |", streamBatch)
	sep.WriteString("|---|")
	for _, c := range cols {
		fmt.Fprintf(&head, " %d shard(s), durability %s |", c.t.shards, c.d)
		sep.WriteString("---|")
	}
	row := func(label string, cell func(t streamTput) string) {
		var b strings.Builder
		fmt.Fprintf(&b, "| %s |", label)
		for _, c := range cols {
			fmt.Fprintf(&b, " %s |", cell(c.t))
		}
		p("%s", b.String())
	}
	p("")
	p("%s", head.String())
	p("%s", sep.String())
	row("Backlog written before the mapping (PutRecords)", func(t streamTput) string {
		return fmt.Sprintf("%d records in %s (%.0f/s)", t.records, t.write.Round(10*time.Millisecond), float64(t.records)/t.write.Seconds())
	})
	row("Mapping created → first batch processed (leases, first read)", func(t streamTput) string { return ms(t.first) })
	row("First batch → every record processed and checkpointed", func(t streamTput) string {
		return fmt.Sprintf("**%.0f records/s** (%.0f per shard)", t.steady, t.perShard())
	})
	row("Mapping created → every record processed", func(t streamTput) string {
		return fmt.Sprintf("%s (%.0f records/s)", t.took.Round(10*time.Millisecond), t.rate)
	})
	row("Invokes (batches), mean invoke at the front end", func(t streamTput) string {
		return fmt.Sprintf("%d, %.2f ms", t.batches, t.invokeMs)
	})
	row("JetStream: one pull consumer, batches of 100, the same records (faster of 2 passes; first pass)", func(t streamTput) string {
		return fmt.Sprintf("%.0f records/s (%s; %s)", t.rawRate, t.rawTook.Round(time.Millisecond), t.rawFirst.Round(time.Millisecond))
	})
	row("skiff / JetStream consume rate", func(t streamTput) string { return fmt.Sprintf("%.3f", t.ratio()) })
	p("")
	p("| Stream mapping, steady writes and a crash | |")
	p("|---|---|")
	for _, run := range r.runs {
		a := run.age
		p("| Durability %s: IteratorAge p50 / p99 / max, writing %.0f records/s to 1 shard for %s (80%% of its rate; achieved %.0f/s; %d samples) | %s / %s / %s |", run.durability, a.target, a.d, a.achieved, a.samples, ms(a.p50), ms(a.p99), ms(a.max))
		p("| Durability %s: last write → every record processed | %s |", run.durability, ms(a.drained))
	}
	k := r.takeover
	p("| Kill -9 → restarted `skiff dev` serves (same data dir) | %s |", ms(k.restart))
	p("| Kill -9 → all %d lanes polled again (`skiff_streams_pollers`) | %s |", k.lanes, ms(k.held))
	claimed := "not counted (the restarted process has the same holder name)"
	if k.claimed > 0 {
		claimed = ms(k.claimed)
	}
	p("| Kill -9 → every lane's checkpoint claimed from the dead holder (`skiff_streams_lease_takeovers_total` = %d) | %s |", k.takeovers, claimed)
	p("| Kill -9 → first batch processed after the restart | %s |", ms(k.resumed))
	p("| Kill -9 → the rest of the backlog processed (%d of %d records were processed before the kill; 100 ms a batch) | %s |", k.before, takeoverShards*takeoverRecords, ms(k.drained))
}

// writeTargets writes the streams rows of the targets table.
func (r *streamsResult) writeTargets(p func(string, ...any)) {
	for _, run := range r.runs {
		for _, t := range run.tput {
			p("| Stream records/s per shard, %d shard(s), batch %d, durability %s | %.0f | ≥ %d | %s |", t.shards, streamBatch, run.durability, t.perShard(), targetStreamPerShard, verdict(t.perShard() >= targetStreamPerShard))
		}
	}
	k := r.takeover
	p("| Stream lease takeover after a kill -9 (kill → every lane polled again, restart included) | %s | ≤ %.0f s | %s |", ms(k.held), targetTakeover.Seconds(), verdict(k.held > 0 && k.held <= targetTakeover))
}

// writeMethod writes how the streams section measures.
func (r *streamsResult) writeMethod(p func(string, ...any), c config) {
	p("- Streams: for each durability (`always`: JetStream fsyncs every write, records, checkpoints and leases alike; `interval`: its periodic fsync), a fresh in-process `skiff dev`; the function is the test function with `KINESIS_NOOP` set (every invoke answers null without reading the event), with one warm sandbox first:")
	p("  - Records/s: a stream of 1 shard gets a backlog of %d records (then one of 8 shards %d), %d-byte data, %d partition keys, PutRecords of 500 from %d clients; then a mapping (batch %d, TRIM_HORIZON) is created. `skiff_streams_records_processed_total` (counted after each batch's checkpoint) is read every 20 ms: the rate is from its first increase (the first batch) to the last record; the time from the mapping's creation to the first batch (tracker, lease, first read) is reported apart.", backlogRecords(c, 1), backlogRecords(c, 8), streamDataBytes, streamKeys, streamWriters, streamBatch)
	p("  - JetStream's consume rate: after that skiff dev stops, its storage is opened (`store.Open` on the same data dir) and one pull consumer (filtered on the shards' subjects, no acks) fetches the same records in batches of %d, in stream order, in two passes (the first loads the storage from disk, while the pollers read records just written); no decoding, no function.", streamBatch)
	p("  - IteratorAge: a 1-shard stream with a running mapping gets writes at 80%% of that durability's 1-shard rate for %s (open loop: every 10 ms the records due, PutRecords of up to 500, from one client, which may not keep up: the achieved rate is shown); `skiff_streams_iterator_age_milliseconds` (the age of the last record of the last batch, 0 when caught up) is sampled every 10 ms after the first second.", c.streamAgeDuration)
	p("  - Takeover: `cmd/skiff` built and run as `skiff dev` (its own process, data dir and default durability); a mapping of an %d-shard stream works through %d records per shard with a function that sleeps 100 ms a batch; once every lane is polled and 2 batches per lane are done on average, the process gets SIGKILL and is started again on the same data dir and address. The restarted process's /metrics is read every 5 ms.", takeoverShards, takeoverRecords)
}
