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
	p("- Peer: the AWS Lambda Runtime Interface Emulator running the same `bootstrap`, called with an HTTP/1.1 keep-alive client")
	p("- Load average at the start (1, 5, 15 min): %s; run time: %s", r.load, r.took.Round(time.Second))
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
	p("")
	p("| Target | Measured | Goal | Result |")
	p("|---|---|---|---|")
	p("| Warm p50 ratio skiff / emulator | %.2f | ≤ %.1f | %s |", r.ratio(), targetRatio, verdict(r.ratio() > 0 && r.ratio() <= targetRatio))
	p("| Cold start p50 | %s | ≤ %.0f ms | %s |", ms(r.cold.total.p50), float64(targetColdP50)/float64(time.Millisecond), verdict(r.cold.total.p50 <= targetColdP50))
	p("| Agent memory per idle sandbox | %s | ≤ 1 MiB | %s |", mib(r.memory.perSandbox), verdict(r.memory.perSandbox <= targetIdleMemory))
	p("")
	p("How it is measured:")
	p("")
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
	_, err := io.WriteString(w, b.String())
	return err
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
