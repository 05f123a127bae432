package queue

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"

	"skiff.dev/skiff/internal/errs"
)

// metrics are the queue metrics: counters by queue, and depth and age
// gauges computed from the index at scrape time.
type metrics struct {
	m *Manager

	sent, received, deleted, expired, purged, redriven *prometheus.CounterVec
	deadLettered, deadLetterErrors                     *prometheus.CounterVec

	depth  *prometheus.Desc
	oldest *prometheus.Desc
}

func newMetrics(reg prometheus.Registerer, m *Manager) (*metrics, error) {
	counter := func(name, help string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "skiff", Subsystem: "queue", Name: name, Help: help}, []string{"queue"})
	}
	mt := &metrics{
		m:                m,
		sent:             counter("messages_sent_total", "Messages stored by SendMessage(Batch)."),
		received:         counter("messages_received_total", "Message receives."),
		deleted:          counter("messages_deleted_total", "Messages deleted by receipt handle."),
		expired:          counter("messages_expired_total", "Messages deleted at the end of their retention."),
		purged:           counter("purges_total", "PurgeQueue calls."),
		redriven:         counter("messages_redriven_total", "Messages moved from this dead-letter queue back to a source."),
		deadLettered:     counter("messages_dead_lettered_total", "Messages moved to the dead-letter queue after the maximum receive count."),
		deadLetterErrors: counter("dead_letter_errors_total", "Messages that could not be moved to a missing dead-letter queue."),
		depth: prometheus.NewDesc("skiff_queue_messages", "Approximate messages by state (visible, in_flight, delayed).",
			[]string{"queue", "state"}, nil),
		oldest: prometheus.NewDesc("skiff_queue_oldest_message_age_seconds", "Age of the oldest message in the queue.",
			[]string{"queue"}, nil),
	}
	if reg == nil {
		return mt, nil
	}
	for _, c := range []prometheus.Collector{mt.sent, mt.received, mt.deleted, mt.expired, mt.purged, mt.redriven, mt.deadLettered, mt.deadLetterErrors, mt} {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) {
				continue
			}
			return nil, errs.Internal("registering queue metrics: %w", err)
		}
	}
	return mt, nil
}

// forget drops a deleted queue's series.
func (mt *metrics) forget(name string) {
	for _, c := range []*prometheus.CounterVec{mt.sent, mt.received, mt.deleted, mt.expired, mt.purged, mt.redriven, mt.deadLettered, mt.deadLetterErrors} {
		c.DeleteLabelValues(name)
	}
}

// Describe implements prometheus.Collector.
func (mt *metrics) Describe(ch chan<- *prometheus.Desc) {
	ch <- mt.depth
	ch <- mt.oldest
}

// Collect implements prometheus.Collector.
func (mt *metrics) Collect(ch chan<- prometheus.Metric) {
	var live []*queueMeta
	mt.m.mu.Lock()
	for _, q := range mt.m.queues {
		if !q.deleted {
			live = append(live, q)
		}
	}
	mt.m.mu.Unlock()
	for _, q := range live {
		c := mt.m.counts(q)
		name := q.q.GetName()
		ch <- prometheus.MustNewConstMetric(mt.depth, prometheus.GaugeValue, float64(c.visible), name, "visible")
		ch <- prometheus.MustNewConstMetric(mt.depth, prometheus.GaugeValue, float64(c.inFlight), name, "in_flight")
		ch <- prometheus.MustNewConstMetric(mt.depth, prometheus.GaugeValue, float64(c.delayed), name, "delayed")
		ch <- prometheus.MustNewConstMetric(mt.oldest, prometheus.GaugeValue, float64(c.oldestAge), name)
	}
}
