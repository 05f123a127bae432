package sandbox

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"skiff.dev/skiff/ebpf"
)

// metrics are the agent's sandbox metrics; all methods work on a nil
// registry (no metrics).
type metrics struct {
	byState    *prometheus.GaugeVec
	coldStarts *prometheus.CounterVec
	initDur    prometheus.Histogram
	states     [StateDead + 1]prometheus.Gauge
	netBytes   *prometheus.CounterVec
	netDrops   *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		byState: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "skiff_sandboxes", Help: "Sandboxes on this agent by state.",
		}, []string{"state"}),
		coldStarts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skiff_agent_cold_starts_total", Help: "Sandboxes started for an invocation.",
		}, []string{"function"}),
		initDur: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "skiff_agent_init_duration_seconds", Help: "Time from sandbox creation to the runtime's first /next.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}),
	}
	m.netBytes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "skiff_sandbox_network_bytes_total", Help: "Bytes sandboxes sent (out) and received (in) on their veths.",
	}, []string{"direction"})
	m.netDrops = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "skiff_sandbox_network_drops_total", Help: "Packets from sandboxes dropped by the egress policy, by reason.",
	}, []string{"reason"})
	for s := StateStarting; s <= StateDead; s++ {
		m.states[s] = m.byState.WithLabelValues(s.String())
	}
	for _, r := range ebpf.Reasons() {
		m.netDrops.WithLabelValues(r.String()) // present at 0
	}
	if reg != nil {
		reg.MustRegister(m.byState, m.coldStarts, m.initDur, m.netBytes, m.netDrops)
	}
	return m
}

// network adds a sandbox's new traffic and drops.
func (m *metrics) network(d ebpf.Counters) {
	if d.BytesOut > 0 {
		m.netBytes.WithLabelValues("out").Add(float64(d.BytesOut))
	}
	if d.BytesIn > 0 {
		m.netBytes.WithLabelValues("in").Add(float64(d.BytesIn))
	}
	for r, n := range d.Drops {
		m.netDrops.WithLabelValues(r.String()).Add(float64(n))
	}
}

// moved records a transition; from < 0 means a new sandbox.
func (m *metrics) moved(from, to State) {
	if from >= 0 && from != StateDead {
		m.states[from].Dec()
	}
	if to != StateDead {
		m.states[to].Inc()
	}
}

func (m *metrics) observe(function string, cold bool, initDur time.Duration, _ bool) {
	if cold {
		m.coldStarts.WithLabelValues(function).Inc()
		m.initDur.Observe(initDur.Seconds())
	}
}
