// Command bench is `make bench`: in one run on one machine it measures
// skiff's cold start, warm invoke latency, throughput and agent memory per
// idle sandbox with `skiff dev` running in this process, measures the same
// echo function under the AWS Lambda Runtime Interface Emulator as the
// peer, then measures async invoke for each durability setting (accept
// rate and latency against JetStream's own synchronous publish, and the
// end-to-end latency from accept to function start at a steady rate), then
// measures stream event source mappings (records/s end to end over a
// backlog with 1 and 8 shards against JetStream's own consume rate of the
// same records, IteratorAge at a steady rate, lease takeover after a kill
// -9 of a `skiff dev` process), then measures a cluster of real `skiff
// gateway` and `skiff agent` processes (invoke latency through a gateway
// to an agent in another network namespace against skiff dev in-process,
// failure detection, lease takeover, placement decisions at 1,000
// simulated agents), and prints tables with the ratios and the issues' targets (also written as
// markdown to -out). It reports and does not judge: a missed target still
// exits 0; only a failure to measure does not.
// It needs root (sandboxes are namespace jails).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"skiff.dev/skiff/gateway/async"
	"skiff.dev/skiff/vmm/jail"
)

func main() {
	// Sandboxes start as a re-exec of this binary (the jail's init).
	if jail.IsInit() {
		jail.InitMain()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// config is the command line.
type config struct {
	out        string
	cold       int
	warm       int
	warmup     int
	rounds     int
	duration   time.Duration
	idle       int
	rie        string
	cpuprofile string
	coldprof   string
	acceptGzip bool
	timeout    time.Duration

	sync, async  bool // sections to run
	network      bool
	streams      bool
	cluster      bool
	asyncClients int
	asyncEvents  int
	e2eRate      int
	e2eDuration  time.Duration
	asyncProf    string // CPU profile prefix of the async accept and end-to-end phases
	durability   []async.Durability

	streamRecords     int           // backlog records per shard
	streamAgeDuration time.Duration // the steady-rate IteratorAge phase
	streamsProf       string        // CPU profile prefix of the stream backlog phases
	streamDurability  []async.Durability
}

func parseFlags(args []string, stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.out, "out", "", "also write the report as markdown to this file")
	fs.IntVar(&c.cold, "cold", 100, "cold starts to measure")
	fs.IntVar(&c.warm, "warm", 2000, "sequential warm invokes to measure (skiff and the emulator)")
	fs.IntVar(&c.warmup, "warmup", 200, "unmeasured warm invokes first")
	fs.IntVar(&c.rounds, "rounds", 10, "rounds the warm invokes are split in, alternating skiff and the emulator")
	fs.DurationVar(&c.duration, "duration", 3*time.Second, "duration of each throughput level")
	fs.IntVar(&c.idle, "idle", 50, "idle sandboxes for the memory measurement")
	fs.StringVar(&c.rie, "rie", "", "aws-lambda-rie binary (default bin/tools/aws-lambda-rie, then PATH)")
	fs.StringVar(&c.cpuprofile, "cpuprofile", "", "write a CPU profile of the measured warm invokes (skiff's and the emulator client's) to this file")
	fs.StringVar(&c.coldprof, "coldprofile", "", "write a CPU profile of skiff's cold start phase (creates and deletes included) to this file")
	fs.BoolVar(&c.acceptGzip, "accept-gzip", true, "let the Connect client accept gzip responses, as connect-go's does by default (false: the server sends them uncompressed)")
	fs.DurationVar(&c.timeout, "timeout", 10*time.Minute, "give up after this long")
	durability := fs.String("durability", "always,interval", "async durability settings to measure, in this order")
	sections := fs.String("sections", "sync,async,network,streams,cluster", "sections to run: sync (invoke latency, throughput, memory), async (accept, end to end), network (egress start cost, eBPF throughput cost), streams (stream mapping records/s, IteratorAge, lease takeover), cluster (gateway → agent hop, failure detection, gateway lease takeover, placement at 1,000 agents)")
	only := fs.String("only", "", "run only these sections (same values as -sections, which it overrides)")
	fs.IntVar(&c.asyncClients, "async-clients", 12, "concurrent clients of the async accept and raw JetStream phases")
	fs.IntVar(&c.asyncEvents, "async-events", 2000, "events each async client sends")
	fs.IntVar(&c.e2eRate, "e2e-rate", 1000, "events/s of the async end-to-end phase")
	fs.DurationVar(&c.e2eDuration, "e2e-duration", 5*time.Second, "duration of the measured async end-to-end phase")
	fs.StringVar(&c.asyncProf, "asyncprofile", "", "write CPU profiles of each async accept and end-to-end phase to PREFIX.<durability>.{accept,e2e}.pprof")
	fs.IntVar(&c.streamRecords, "stream-records", 50000, "backlog records of the streams 1-shard throughput phase (the 8-shard phase gets 4 times as many)")
	fs.DurationVar(&c.streamAgeDuration, "stream-age-duration", 10*time.Second, "duration of the streams IteratorAge phase (steady writes)")
	streamDurability := fs.String("stream-durability", "always,interval", "JetStream durabilities of the streams section's in-process skiff dev runs, in this order: always (fsync every write, skiff dev's default), interval")
	fs.StringVar(&c.streamsProf, "streamsprofile", "", "write CPU profiles of the streams backlog phases to PREFIX.{1,8}shards.pprof")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if *only != "" {
		*sections = *only
	}
	for _, sec := range strings.Split(*sections, ",") {
		switch strings.TrimSpace(sec) {
		case "sync":
			c.sync = true
		case "async":
			c.async = true
		case "network":
			c.network = true
		case "streams":
			c.streams = true
		case "cluster":
			c.cluster = true
		default:
			return c, fmt.Errorf("-sections: unknown section %q (want sync, async, network, streams, cluster)", sec)
		}
	}
	for _, d := range strings.Split(*durability, ",") {
		v, err := async.ParseDurability(strings.TrimSpace(d))
		if err != nil || d == "" {
			return c, fmt.Errorf("-durability: %q is not always or interval", d)
		}
		c.durability = append(c.durability, v)
	}
	for _, d := range strings.Split(*streamDurability, ",") {
		v, err := async.ParseDurability(strings.TrimSpace(d))
		if err != nil || d == "" {
			return c, fmt.Errorf("-stream-durability: %q is not always or interval", d)
		}
		c.streamDurability = append(c.streamDurability, v)
	}
	if c.cold < 1 || c.warm < 1 || c.warmup < 0 || c.idle < 1 || c.rounds < 1 || c.duration <= 0 {
		return c, errors.New("-cold, -warm, -idle, -rounds and -duration must be positive")
	}
	if c.asyncClients < 1 || c.asyncEvents < 1 || c.e2eRate < 1 || c.e2eDuration < time.Second {
		return c, errors.New("-async-clients, -async-events and -e2e-rate must be positive, -e2e-duration at least 1s")
	}
	if c.streamRecords < 1000 || c.streamRecords > 1_000_000 || c.streamAgeDuration < 2*time.Second || c.streamAgeDuration > 10*time.Minute {
		return c, errors.New("-stream-records must be in 1000-1000000, -stream-age-duration in 2s-10m")
	}
	return c, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) (err error) {
	cfg, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return errors.New("needs root: skiff's sandboxes are namespace jails")
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	began := time.Now()
	progress := func(phase string) {
		fmt.Fprintf(stderr, "bench: [%5.1fs] %s\n", time.Since(began).Seconds(), phase)
	}
	res := &results{when: began, kernel: kernelRelease(), load: loadAverage(), cpus: runtime.NumCPU(), goVersion: runtime.Version(), cfg: cfg}

	repo, err := repoRoot(ctx)
	if err != nil {
		return err
	}
	work, err := os.MkdirTemp("", "skiff-bench-fn-")
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, os.RemoveAll(work)) }()
	progress("building the echo function")
	fn, err := buildFunction(ctx, repo, work)
	if err != nil {
		return err
	}

	if cfg.sync {
		if err := benchSync(ctx, cfg, repo, fn, res, progress); err != nil {
			return err
		}
	}
	if cfg.async {
		if res.async, err = benchAsync(ctx, cfg, fn, progress); err != nil {
			return err
		}
	}
	if cfg.network {
		progress("network: jail start none/egress, TCP throughput with and without eBPF")
		nr, err := benchNetwork(ctx, 7)
		if err != nil {
			return err
		}
		res.network = &nr
	}
	if cfg.streams {
		if res.streams, err = benchStreams(ctx, cfg, repo, fn, progress); err != nil {
			return err
		}
	}
	if cfg.cluster {
		if res.cluster, err = benchCluster(ctx, cfg, repo, fn, progress); err != nil {
			return err
		}
	}
	res.took = time.Since(began)

	if err := res.writeMarkdown(stdout); err != nil {
		return err
	}
	if cfg.out != "" {
		if err := res.writeFile(cfg.out); err != nil {
			return fmt.Errorf("writing %s: %w", cfg.out, err)
		}
		progress("wrote " + cfg.out)
	}
	return nil
}

// benchSync runs the sync section: the emulator and skiff dev.
func benchSync(ctx context.Context, cfg config, repo string, fn *function, res *results, progress func(string)) (err error) {
	rie, err := findRIE(cfg.rie, repo)
	if err != nil {
		return err
	}
	// The peer first, so that a missing emulator fails the run early. It
	// idles while skiff's cold starts run, and its warm invokes alternate
	// with skiff's.
	progress("emulator: starting " + filepath.Base(rie) + ", first invoke (starts the runtime)")
	em, err := startRIE(ctx, rie, fn)
	if err != nil {
		return fmt.Errorf("emulator: %w", err)
	}
	defer func() {
		progress("emulator: stopping")
		err = errors.Join(err, em.close())
	}()
	if res.rie.first, err = em.invoke(ctx); err != nil {
		return fmt.Errorf("emulator: first invoke: %w", err)
	}
	if err := benchSkiff(ctx, cfg, fn, em, res, progress); err != nil {
		return fmt.Errorf("skiff: %w", err)
	}
	return nil
}

// benchSkiff starts skiff dev and runs its phases in an order that keeps
// them apart: cold starts, warm latency, idle memory (whose sandboxes are
// retired after), throughput.
func benchSkiff(ctx context.Context, cfg config, fn *function, em *emulator, res *results, progress func(string)) (err error) {
	progress("skiff: starting skiff dev")
	s, err := startSkiff(ctx, cfg.acceptGzip, "")
	if err != nil {
		return err
	}
	defer func() {
		progress("skiff: stopping skiff dev (closing its sandboxes)")
		err = errors.Join(err, s.close())
	}()

	progress(fmt.Sprintf("skiff: cold starts (%d functions)", cfg.cold))
	if res.cold, err = s.benchCold(ctx, fn, cfg.cold, cfg.coldprof); err != nil {
		return err
	}

	const name = "echo"
	if err := s.createFunction(ctx, name, fn); err != nil {
		return err
	}
	progress(fmt.Sprintf("warm invokes, skiff and emulator alternating (%d warm-up, %d measured, %d rounds)", cfg.warmup, cfg.warm, cfg.rounds))
	if res.warm, res.rie.warm, err = s.benchWarm(ctx, name, em, cfg.warmup, cfg.warm, cfg.rounds, cfg.cpuprofile); err != nil {
		return err
	}

	progress(fmt.Sprintf("skiff: memory of %d idle sandboxes", cfg.idle))
	if res.memory, err = s.benchMemory(ctx, fn, cfg.idle); err != nil {
		return err
	}

	res.throughput, err = s.benchThroughput(ctx, name, []int{1, 8, 64}, cfg.duration, progress)
	return err
}
