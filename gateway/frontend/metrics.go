package frontend

import (
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the front end's Prometheus metrics. Labels are low
// cardinality: the function name and the outcome.
type metrics struct {
	invocations  *prometheus.CounterVec   // function, outcome
	errors       *prometheus.CounterVec   // function
	throttles    *prometheus.CounterVec   // function
	duration     *prometheus.HistogramVec // function
	coldStarts   *prometheus.CounterVec   // function
	fnConcurrent *prometheus.GaugeVec     // function
	initDuration prometheus.Histogram
	concurrent   prometheus.Gauge
	logsDropped  prometheus.Counter
}

// fnMetrics are one function's metric handles, resolved once so the invoke
// path does no label lookups.
type fnMetrics struct {
	succeeded, failed, throttled  prometheus.Counter
	errors, throttles, coldStarts prometheus.Counter
	duration                      prometheus.Observer
	concurrent                    prometheus.Gauge
}

func newMetrics(reg *prometheus.Registry) (*metrics, error) {
	m := &metrics{
		invocations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skiff_invocations_total", Help: "Invocations by function and outcome (success, error, throttled).",
		}, []string{"function", "outcome"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skiff_invocation_errors_total", Help: "Invocations that ended in a function or platform error.",
		}, []string{"function"}),
		throttles: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skiff_throttles_total", Help: "Invocations refused by concurrency admission.",
		}, []string{"function"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "skiff_invocation_duration_seconds", Help: "Time from admission to the router's answer.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 20),
		}, []string{"function"}),
		coldStarts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skiff_cold_starts_total", Help: "Invocations that needed a new sandbox.",
		}, []string{"function"}),
		fnConcurrent: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "skiff_function_concurrent_executions", Help: "Invocations in flight, by function.",
		}, []string{"function"}),
		initDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "skiff_init_duration_seconds", Help: "Init duration of cold starts.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}),
		concurrent: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "skiff_concurrent_executions", Help: "Invocations in flight on this gateway.",
		}),
		logsDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skiff_log_entries_dropped_total", Help: "Invocation logs dropped because the shipping queue was full.",
		}),
	}
	for _, c := range []prometheus.Collector{m.invocations, m.errors, m.throttles, m.duration, m.coldStarts, m.fnConcurrent, m.initDuration, m.concurrent, m.logsDropped} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func (m *metrics) forFunction(name string) fnMetrics {
	return fnMetrics{
		succeeded:  m.invocations.WithLabelValues(name, "success"),
		failed:     m.invocations.WithLabelValues(name, "error"),
		throttled:  m.invocations.WithLabelValues(name, "throttled"),
		errors:     m.errors.WithLabelValues(name),
		throttles:  m.throttles.WithLabelValues(name),
		coldStarts: m.coldStarts.WithLabelValues(name),
		duration:   m.duration.WithLabelValues(name),
		concurrent: m.fnConcurrent.WithLabelValues(name),
	}
}
