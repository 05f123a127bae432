package async

import (
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the async invoke's Prometheus metrics.
type metrics struct {
	received     prometheus.Counter
	eventAge     prometheus.Histogram     // age at invoke (dwell time)
	outcomes     *prometheus.CounterVec   // outcome: success, error, retried, throttled, platform_error
	dropped      *prometheus.CounterVec   // reason
	dlqErrors    prometheus.Counter       // dead-letter sends that failed
	dlqSent      prometheus.Counter       // events sent to a dead-letter queue
	destFailures *prometheus.CounterVec   // kind: on_success, on_failure
	assignments  prometheus.Gauge         // poller assignments held by this gateway
	invokeTime   *prometheus.HistogramVec // outcome
	groupEvents  prometheus.Histogram     // accepts stored by one write (group commit)
	batchEvents  prometheus.Histogram     // events in a batch message a poller received
}

// Outcomes of one processing of an event (label values).
const (
	outcomeSuccess       = "success"
	outcomeRetried       = "retried"
	outcomeFailed        = "failed"
	outcomeThrottled     = "throttled"
	outcomePlatformError = "platform_error"
	outcomeAgeExceeded   = "age_exceeded"
)

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		received: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skiff_async_events_received_total", Help: "Async events accepted and stored (duplicates of a request id not counted).",
		}),
		eventAge: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "skiff_async_event_age_seconds", Help: "Age of an async event (since its first accept) when a poller invokes it: the dwell time.",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 12),
		}),
		outcomes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skiff_async_attempts_total", Help: "Async event processings by outcome (success, retried, failed, throttled, platform_error, age_exceeded).",
		}, []string{"outcome"}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skiff_async_events_dropped_total", Help: "Async events that failed with no OnFailure destination and no dead-letter queue, or were unreadable, or whose function was deleted.",
		}, []string{"reason"}),
		dlqErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skiff_async_dead_letter_errors_total", Help: "Failed events that could not be sent to their dead-letter queue.",
		}),
		dlqSent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skiff_async_dead_letter_sent_total", Help: "Failed events sent to a dead-letter queue.",
		}),
		destFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skiff_async_destination_failures_total", Help: "Invocation records that could not be delivered to their destination.",
		}, []string{"destination"}),
		assignments: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "skiff_async_poller_assignments", Help: "Async queue assignments (leases) this gateway's pollers hold.",
		}),
		invokeTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "skiff_async_invoke_seconds", Help: "Time of the synchronous invoke of an async event, by outcome.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 12),
		}, []string{"outcome"}),
		groupEvents: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "skiff_async_accept_group_events", Help: "Async accepts stored by one JetStream write (group commit): the group size.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 10),
		}),
		batchEvents: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "skiff_async_poller_batch_events", Help: "Events in each batch message the pollers received (single-event messages not counted).",
			Buckets: prometheus.ExponentialBuckets(2, 2, 9),
		}),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.received, m.eventAge, m.outcomes, m.dropped, m.dlqErrors, m.dlqSent, m.destFailures, m.assignments, m.invokeTime, m.groupEvents, m.batchEvents} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
