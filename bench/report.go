package main

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Targets from the benchmark section.
const (
	targetRatio      = 1.0
	targetColdP50    = 10 * time.Millisecond
	targetIdleMemory = 1 << 20 // bytes per idle sandbox
	// Async (issue 3): accept throughput over JetStream's own publish at
	// the same durability, and end-to-end p50 at a steady 1,000 events/s.
	targetAcceptRatio = 0.5
	targetE2EP50      = 5 * time.Millisecond
)

// rieResult is what the emulator run measured.
type rieResult struct {
	first time.Duration // the first invoke, which starts the runtime
	warm  latencies
}

// results is everything one run measured.
type results struct {
	when       time.Time
	kernel     string
	load       string // /proc/loadavg at the start
	cpus       int
	goVersion  string
	cfg        config
	cold       coldResult
	warm       latencies
	throughput []throughput
	memory     memoryResult
	rie        rieResult
	async      []asyncResult // one per durability setting
	network    *networkResult
	streams    *streamsResult
	cluster    *clusterResult
	took       time.Duration
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Sysname[:]) + " " + unix.ByteSliceToString(u.Release[:])
}

// loadAverage returns the first three fields of /proc/loadavg.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], ", ")
}

func verdict(ok bool) string {
	if ok {
		return "PASS"
	}
	return "MISS"
}

func mib(b float64) string {
	switch {
	case b < 0:
		return fmt.Sprintf("%.0f B", b)
	case b < 1<<20:
		return fmt.Sprintf("%.1f KiB", b/(1<<10))
	default:
		return fmt.Sprintf("%.2f MiB", b/(1<<20))
	}
}

// ratio is skiff's warm p50 over the emulator's.
func (r *results) ratio() float64 {
	if r.rie.warm.p50 == 0 {
		return 0
	}
	return float64(r.warm.p50) / float64(r.rie.warm.p50)
}

// writeMarkdown writes the report; the same text is printed to stdout.
func (r *results) writeMarkdown(w io.Writer) error {
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, format+"\n", a...) }
	c := r.cfg
	p("# Benchmarks")
	p("")
	p("Written by `make bench` (`go run ./bench -out docs/benchmarks.md`); numbers from one run on one machine.")
	p("")
	p("- Date: %s", r.when.UTC().Format("2006-01-02 15:04 MST"))
	p("- Kernel: %s, %d CPUs, %s %s/%s", r.kernel, r.cpus, r.goVersion, runtime.GOOS, runtime.GOARCH)
	p("- Function: the aws-lambda-go echo function (`testdata/functions/testfn`, `provided` runtime, 128 MB), payload `%s`", echoPayload)
	p("- skiff: `skiff dev` in the benchmark's process (gateway, storage, agent), called through the generated Connect client over HTTP/1.1 keep-alive")
	if c.sync {
		p("- Peer: the AWS Lambda Runtime Interface Emulator running the same `bootstrap`, called with an HTTP/1.1 keep-alive client")
	}
	if c.async {
		p("- Async peer: JetStream's own synchronous publish (embedded NATS opened by `gateway/store`, a plain file stream) at the same durability, concurrency and payload")
	}
	p("- Load average at the start (1, 5, 15 min): %s; run time: %s", r.load, r.took.Round(time.Second))
	if c.sync {
		r.writeSync(p)
	}
	if c.async {
		r.writeAsync(p)
	}
	if r.network != nil {
		p("")
		p("%s", strings.TrimRight(r.network.markdown(), "\n"))
	}
	if r.streams != nil {
		r.streams.writeTable(p)
	}
	if r.cluster != nil {
		r.cluster.writeTable(p, c)
	}
	p("")
	p("| Target | Measured | Goal | Result |")
	p("|---|---|---|---|")
	if c.sync {
		p("| Warm p50 ratio skiff / emulator | %.2f | ≤ %.1f | %s |", r.ratio(), targetRatio, verdict(r.ratio() > 0 && r.ratio() <= targetRatio))
		p("| Cold start p50 | %s | ≤ %.0f ms | %s |", ms(r.cold.total.p50), float64(targetColdP50)/float64(time.Millisecond), verdict(r.cold.total.p50 <= targetColdP50))
		p("| Agent memory per idle sandbox | %s | ≤ 1 MiB | %s |", mib(r.memory.perSandbox), verdict(r.memory.perSandbox <= targetIdleMemory))
	}
	for _, a := range r.async {
		p("| Async accept rate / JetStream publish rate, durability %s | %.2f | ≥ %.2f | %s |", a.durability, a.ratio(), targetAcceptRatio, verdict(a.ratio() >= targetAcceptRatio))
	}
	for _, a := range r.async {
		p("| Async end to end p50 at %d events/s, durability %s | %s | ≤ %.0f ms | %s |", c.e2eRate, a.durability, ms(a.e2e.lat.p50), float64(targetE2EP50)/float64(time.Millisecond), verdict(a.e2e.lat.n > 0 && a.e2e.missing == 0 && a.e2e.lat.p50 <= targetE2EP50))
	}
	if n := r.network; n != nil {
		p("| Egress adds to a cold start (jail start p50, egress − none) | %.2f ms | ≤ 2 ms | %s |", n.egressCost(), verdict(n.egressCost() <= 2))
		p("| eBPF policy's TCP throughput cost (medians) | %.1f%% | ≤ 5%% | %s |", 100*n.ebpfOverhead(), verdict(n.ebpfOverhead() <= 0.05))
	}
	if r.streams != nil {
		r.streams.writeTargets(p)
	}
	if r.cluster != nil {
		r.cluster.writeTargets(p)
	}
	p("")
	p("How it is measured:")
	p("")
	if c.sync {
		p("- Cold start: %d functions with the same code, each created, invoked once (with the log tail, whose REPORT line gives the Init Duration) and deleted; one unmeasured function first fills the code cache.", c.cold)
		if r.cold.notCold > 0 {
			p("  **%d of the %d invokes had no Init Duration in their log, so may not have been cold.**", r.cold.notCold, r.cold.total.n)
		}
		p("- Warm invoke: %d sequential invokes of one function after %d unmeasured ones, and as many of the emulator, in %d alternating rounds so both see the same machine. The emulator's own logging is set to errors only.", c.warm, c.warmup, c.rounds)
		p("- Throughput: for each concurrency, as many concurrent sleeping invokes first (so that many sandboxes are warm), then that many workers invoking back to back for %s.", c.duration)
		src := "assumed from the invokes"
		if r.memory.countedByProm {
			src = "counted from the agent's `skiff_sandboxes{state=\"idle\"}` gauge"
		}
		p("- Memory: `runtime.ReadMemStats` HeapInuse+StackInuse after `runtime.GC()`, before and after %d concurrent 300 ms invokes of a fresh function (over one h2c connection) leave that many idle sandboxes (%s), divided by their number. The sandboxes' own processes are not included.", c.idle+1, src)
	}
	if c.async {
		p("- Async, for each durability (`always`: fsync before the ack; `interval`: the engine's periodic fsync), in this order:")
		p("  - JetStream publish: a fresh embedded NATS (`store.Open` with `SyncAlways` true/false), a plain file stream, %d clients each publishing %d messages of the payload back to back with `js.Publish` (after 20 unmeasured each); each latency is publish to stored ack.", c.asyncClients, c.asyncEvents)
		p("  - Accept: a fresh `skiff dev` (`devserver.Config{AsyncDurability}`), after an unmeasured warm-up (20 events per client, until the pollers processed them), %d clients each sending %d EVENT invokes of the echo function back to back through the Connect client (each with its own request id); each latency is request to the 202. The pollers process the events while the clients send, as in production: they compete for the same CPUs.", c.asyncClients, c.asyncEvents)
		p("  - Front end alone: before the accept phase, the same clients send as many DRY_RUN invokes of the same function (authenticated, validated, the function looked up; nothing stored or run): the ceiling the HTTP/Connect front end puts on the accept rate on this host.")
		p("  - Backlog: from the first accept until `skiff_async_attempts_total{outcome=\"success\"}` counts every event (polled every 20 ms).")
		p("  - End to end: EVENT invokes of a second function with payload `%s` (the test function answers `{\"t\": <handler start, unix ns>}`), whose OnSuccess destination is a skiff queue, sent open loop at %d events/s: 1 s unmeasured, then %s measured. The end-to-end latency of an event is `responsePayload.t` of its success record (matched by `requestContext.requestId`) minus the client's clock just before it sent the accept; the clocks are the same host's.", clockPayload, c.e2eRate, c.e2eDuration)
		for _, a := range r.async {
			if a.e2e.missing > 0 {
				p("  **durability %s: %d of the %d measured events had no success record within a minute.**", a.durability, a.e2e.missing, a.e2e.sent)
			}
		}
	}
	if r.network != nil {
		p("- Network: vmm/jail's `BenchmarkStartNetwork` (100 jail starts per case with a pre-started init waiting, network none / egress / egress with the function's own rules; start = `Start` returning) and netns's `BenchmarkThroughput` (64 MiB over TCP from a sandbox namespace through its veth, NAT and the host to a server namespace, without and with the eBPF programs attached, 7 runs each), run with `go test -bench` because they need those packages' kernel-level test setup.")
	}
	if r.streams != nil {
		r.streams.writeMethod(p, c)
	}
	if r.cluster != nil {
		r.cluster.writeMethod(p, c)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// writeSync writes the sync section's table.
func (r *results) writeSync(p func(string, ...any)) {
	c := r.cfg
	p("")
	p("| Measurement | skiff | Emulator |")
	p("|---|---|---|")
	p("| Cold start p50 / p99 (request to response, n=%d) | %s / %s | %s (first invoke, n=1) |", r.cold.total.n, ms(r.cold.total.p50), ms(r.cold.total.p99), ms(r.rie.first))
	if r.cold.init.n > 0 {
		p("| Agent Init Duration p50 / p99 (REPORT line) | %s / %s | |", ms(r.cold.init.p50), ms(r.cold.init.p99))
		p("| Cold start minus Init Duration p50 / p99 | %s / %s | |", ms(r.cold.outside.p50), ms(r.cold.outside.p99))
	}
	p("| Warm invoke p50 / p99 (sequential, n=%d) | %s / %s | %s / %s |", r.warm.n, ms(r.warm.p50), ms(r.warm.p99), ms(r.rie.warm.p50), ms(r.rie.warm.p99))
	for _, t := range r.throughput {
		p("| Throughput, concurrency %d (%s) | %.0f invokes/s (p50 %s, p99 %s) | |", t.concurrency, c.duration, t.perSecond, ms(t.p50), ms(t.p99))
	}
	p("| Agent memory per idle sandbox (Go heap + stacks, %d sandboxes) | %s (%.1f goroutines) | |", r.memory.sandboxes, mib(r.memory.perSandbox), r.memory.goroutines)
}

// writeAsync writes the async section's table, one column per durability.
func (r *results) writeAsync(p func(string, ...any)) {
	c := r.cfg
	row := func(label string, cell func(a asyncResult) string) {
		var b strings.Builder
		fmt.Fprintf(&b, "| %s |", label)
		for _, a := range r.async {
			fmt.Fprintf(&b, " %s |", cell(a))
		}
		p("%s", b.String())
	}
	p("")
	var head, sep strings.Builder
	head.WriteString("| Async invoke |")
	sep.WriteString("|---|")
	for _, a := range r.async {
		fmt.Fprintf(&head, " durability %s |", a.durability)
		sep.WriteString("---|")
	}
	p("%s", head.String())
	p("%s", sep.String())
	rate := func(l load) string { return fmt.Sprintf("%.0f events/s", l.perSecond) }
	pp := func(l latencies) string { return ms(l.p50) + " / " + ms(l.p99) }
	row(fmt.Sprintf("Accept rate, EVENT invokes through the front end (%d clients × %d)", c.asyncClients, c.asyncEvents), func(a asyncResult) string { return rate(a.accept) })
	row("Accept latency p50 / p99", func(a asyncResult) string { return pp(a.accept.lat) })
	row(fmt.Sprintf("JetStream synchronous publish rate, plain stream (%d clients × %d)", c.asyncClients, c.asyncEvents), func(a asyncResult) string { return rate(a.raw) })
	row("JetStream publish latency p50 / p99", func(a asyncResult) string { return pp(a.raw.lat) })
	row("Accept rate / JetStream publish rate", func(a asyncResult) string { return fmt.Sprintf("%.2f", a.ratio()) })
	row(fmt.Sprintf("Front end alone: DRY_RUN invokes, nothing stored or run (%d clients × %d), p50 / p99", c.asyncClients, c.asyncEvents), func(a asyncResult) string {
		return fmt.Sprintf("%s (%s)", rate(a.dryRun), pp(a.dryRun.lat))
	})
	row("Accept phase's events processed by the pollers (first accept to last success)", func(a asyncResult) string {
		return fmt.Sprintf("%s (%.0f events/s)", a.drain.Round(100*time.Millisecond), float64(a.accept.events)/a.drain.Seconds())
	})
	row(fmt.Sprintf("End to end, accept sent → function start, p50 / p99 (%d/s target, %s)", c.e2eRate, c.e2eDuration), func(a asyncResult) string {
		return fmt.Sprintf("%s (n=%d at %.0f/s)", pp(a.e2e.lat), a.e2e.lat.n, a.e2e.rate)
	})
	row("End to end p50 of the events sent in each second", func(a asyncResult) string {
		parts := make([]string, len(a.e2e.bySecond))
		for i, v := range a.e2e.bySecond {
			parts[i] = ms(v)
		}
		return strings.Join(parts, ", ")
	})
	row("Accept latency p50 / p99 during the end-to-end phase", func(a asyncResult) string { return pp(a.e2e.accept) })
	row("Sandboxes started during the accept phase / the end-to-end phase", func(a asyncResult) string {
		return fmt.Sprintf("%d / %d", a.acceptStat.coldStarts, a.e2e.stats.coldStarts)
	})
	row("Poller retries after a throttle or platform error, accept / end to end", func(a asyncResult) string {
		return fmt.Sprintf("%d / %d", a.acceptStat.retries, a.e2e.stats.retries)
	})
	row("Poller lease assignments lost, accept / end to end", func(a asyncResult) string {
		return fmt.Sprintf("%d / %d", a.acceptStat.leaseLosses, a.e2e.stats.leaseLosses)
	})
}

// writeFile writes the report to path.
func (r *results) writeFile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := r.writeMarkdown(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
