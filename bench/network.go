package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// networkResult is the sandbox networking section: the cost of egress on
// a jail start, and the eBPF policy's cost on a sandbox's TCP throughput.
type networkResult struct {
	startP50 map[string]float64 // ms by case: none, egress, egress-rules
	startP99 map[string]float64
	mbps     map[string][]float64 // MB/s samples by case: no-ebpf, ebpf
}

// benchNetwork runs the packages' own Go benchmarks, which need the
// kernel-level setup their test helpers make (a stand-in internet
// namespace, the jail's probe program): vmm/jail's BenchmarkStartNetwork
// (jail Start with a pooled init, network none vs egress vs egress with
// the function's own rules) and netns's BenchmarkThroughput (TCP from a
// sandbox namespace through its veth, with and without the eBPF programs,
// alternated count times so both see the same machine).
func benchNetwork(ctx context.Context, count int) (networkResult, error) {
	res := networkResult{startP50: map[string]float64{}, startP99: map[string]float64{}, mbps: map[string][]float64{}}
	out, err := goBench(ctx, "./vmm/jail", "BenchmarkStartNetwork", "100x", 1)
	if err != nil {
		return res, err
	}
	metric := regexp.MustCompile(`^BenchmarkStartNetwork/(\S+?)(-\d+)?\s.*?([\d.]+) running-p50-ms.*?([\d.]+) running-p99-ms.*?([\d.]+) start-p50-ms\s+([\d.]+) start-p99-ms`)
	for _, line := range out {
		if m := metric.FindStringSubmatch(line); m != nil {
			res.startP50[m[1]], _ = strconv.ParseFloat(m[5], 64)
			res.startP99[m[1]], _ = strconv.ParseFloat(m[6], 64)
		}
	}
	if len(res.startP50) == 0 {
		return res, fmt.Errorf("BenchmarkStartNetwork printed no results:\n%s", strings.Join(out, "\n"))
	}
	out, err = goBench(ctx, "./netns", "BenchmarkThroughput", "10x", count)
	if err != nil {
		return res, err
	}
	tput := regexp.MustCompile(`^BenchmarkThroughput/(\S+?)(-\d+)?\s.*?([\d.]+) MB/s`)
	for _, line := range out {
		if m := tput.FindStringSubmatch(line); m != nil {
			v, _ := strconv.ParseFloat(m[3], 64)
			res.mbps[m[1]] = append(res.mbps[m[1]], v)
		}
	}
	if len(res.mbps["ebpf"]) == 0 || len(res.mbps["no-ebpf"]) == 0 {
		return res, fmt.Errorf("BenchmarkThroughput printed no results:\n%s", strings.Join(out, "\n"))
	}
	return res, nil
}

func goBench(ctx context.Context, pkg, name, benchtime string, count int) ([]string, error) {
	cmd := exec.CommandContext(ctx, "go", "test", "-run", "^$", "-bench", "^"+name+"$", "-benchtime", benchtime,
		"-count", strconv.Itoa(count), pkg)
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("go test -bench %s %s: %w\n%s", name, pkg, err, buf.String())
	}
	var lines []string
	sc := bufio.NewScanner(&buf)
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	return lines, nil
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// egressCost is the p50 start time egress adds over network none (ms).
func (r networkResult) egressCost() float64 { return r.startP50["egress"] - r.startP50["none"] }

// ebpfOverhead is the throughput lost to the eBPF programs, as a fraction
// of the throughput without them (medians).
func (r networkResult) ebpfOverhead() float64 {
	without := median(r.mbps["no-ebpf"])
	if without == 0 {
		return 0
	}
	return 1 - median(r.mbps["ebpf"])/without
}

// markdown renders the section's table rows.
func (r networkResult) markdown() string {
	var b strings.Builder
	b.WriteString("| Sandbox networking | network none | egress | egress with its own rules |\n|---|---|---|---|\n")
	fmt.Fprintf(&b, "| Jail start with a pooled init, p50 / p99 (n=100 each) | %.2f ms / %.2f ms | %.2f ms / %.2f ms | %.2f ms / %.2f ms |\n",
		r.startP50["none"], r.startP99["none"], r.startP50["egress"], r.startP99["egress"], r.startP50["egress-rules"], r.startP99["egress-rules"])
	b.WriteString("\n| TCP throughput, sandbox → server namespace through the veth | without eBPF | with the eBPF policy |\n|---|---|---|\n")
	fmt.Fprintf(&b, "| MB/s, median of %d runs each (samples) | %.0f %v | %.0f %v |\n",
		len(r.mbps["ebpf"]), median(r.mbps["no-ebpf"]), r.mbps["no-ebpf"], median(r.mbps["ebpf"]), r.mbps["ebpf"])
	return b.String()
}
