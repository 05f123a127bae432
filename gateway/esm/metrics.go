package esm

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// Results of a batch (label "result" of skiff_esm_batches_total).
const (
	resultSuccess         = "success"          // every message deleted
	resultPartial         = "partial"          // ReportBatchItemFailures named some
	resultFunctionError   = "function_error"   // the function failed: none deleted
	resultInvalidResponse = "invalid_response" // an invalid batchItemFailures response: none deleted
	resultThrottled       = "throttled"        // throttle or platform error: retried after a backoff
	resultError           = "error"            // another invoke error: retried after a backoff
)

// metrics are the pollers' Prometheus metrics. Services that share a
// registry share the collectors.
type metrics struct {
	batches         *prometheus.CounterVec
	batchSize       prometheus.Histogram
	messagesDeleted prometheus.Counter
	messagesFailed  prometheus.Counter
	deleteErrors    prometheus.Counter
	fenced          prometheus.Counter
	pollers         prometheus.Gauge
	assignments     prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		batches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skiff_esm_batches_total", Help: "Batches event source pollers invoked functions with, by result.",
		}, []string{"result"}),
		batchSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "skiff_esm_batch_size", Help: "Messages per batch invoked by event source pollers.",
			Buckets: []float64{1, 2, 5, 10, 20, 50, 100, 500, 1000, 5000, 10000},
		}),
		messagesDeleted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skiff_esm_messages_deleted_total", Help: "Messages deleted from their queue after a successful invoke.",
		}),
		messagesFailed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skiff_esm_messages_failed_total", Help: "Messages left in their queue because the function failed them.",
		}),
		deleteErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skiff_esm_delete_errors_total", Help: "Processed messages that could not be deleted (they are delivered again).",
		}),
		fenced: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skiff_esm_fenced_batches_total", Help: "Batches not deleted because the poller had lost its lease.",
		}),
		pollers: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "skiff_esm_pollers", Help: "Event source pollers running on this gateway.",
		}),
		assignments: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "skiff_esm_assignments", Help: "Event source mapping lease slots this gateway polls.",
		}),
	}
	if reg == nil {
		return m, nil
	}
	var err error
	if m.batches, err = register(reg, m.batches); err != nil {
		return nil, err
	}
	if m.batchSize, err = register(reg, m.batchSize); err != nil {
		return nil, err
	}
	for _, c := range []*prometheus.Counter{&m.messagesDeleted, &m.messagesFailed, &m.deleteErrors, &m.fenced} {
		if *c, err = register(reg, *c); err != nil {
			return nil, err
		}
	}
	for _, g := range []*prometheus.Gauge{&m.pollers, &m.assignments} {
		if *g, err = register(reg, *g); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// register registers c, or returns the collector already registered under
// its name.
func register[C prometheus.Collector](reg prometheus.Registerer, c C) (C, error) {
	err := reg.Register(c)
	if err == nil {
		return c, nil
	}
	var are prometheus.AlreadyRegisteredError
	if errors.As(err, &are) {
		if existing, ok := are.ExistingCollector.(C); ok {
			return existing, nil
		}
	}
	return c, err
}
