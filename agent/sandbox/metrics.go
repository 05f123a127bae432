package sandbox

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the agent's sandbox metrics; all methods work on a nil
// registry (no metrics).
type metrics struct {
	byState    *prometheus.GaugeVec
	coldStarts *prometheus.CounterVec
	initDur    prometheus.Histogram
	states     [StateDead + 1]prometheus.Gauge
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
	for s := StateStarting; s <= StateDead; s++ {
		m.states[s] = m.byState.WithLabelValues(s.String())
	}
	if reg != nil {
		reg.MustRegister(m.byState, m.coldStarts, m.initDur)
	}
	return m
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
