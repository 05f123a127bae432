package kinesis

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"

	"skiff.dev/skiff/internal/errs"
)

// metrics are the stream metrics, by stream.
type metrics struct {
	recordsPut, bytesPut, putFailures, recordsRead *prometheus.CounterVec
	reshards                                       *prometheus.CounterVec
	openShards                                     *prometheus.GaugeVec
}

func newMetrics(reg prometheus.Registerer, _ *Store) (*metrics, error) {
	counter := func(name, help string, labels ...string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "skiff", Subsystem: "stream", Name: name, Help: help}, append([]string{"stream"}, labels...))
	}
	mt := &metrics{
		recordsPut:  counter("records_put_total", "Records stored."),
		bytesPut:    counter("bytes_put_total", "Record data bytes stored."),
		putFailures: counter("put_failures_total", "Records a put could not store (per-record errors)."),
		recordsRead: counter("records_read_total", "Records returned by reads (GetRecords and pollers)."),
		reshards:    counter("reshards_total", "Split, merge and scale operations.", "op"),
		openShards: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: "skiff", Subsystem: "stream", Name: "open_shards",
			Help: "Open shards of the stream (as this gateway last saw its shard map)."}, []string{"stream"}),
	}
	if reg == nil {
		return mt, nil
	}
	for _, c := range []prometheus.Collector{mt.recordsPut, mt.bytesPut, mt.putFailures, mt.recordsRead, mt.reshards, mt.openShards} {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) {
				continue
			}
			return nil, errs.Internal("registering stream metrics: %w", err)
		}
	}
	return mt, nil
}

func (mt *metrics) created(st *streamState) { mt.mapLoaded(st, st.m.Load()) }

func (mt *metrics) mapLoaded(st *streamState, m *shardMap) {
	if m != nil {
		mt.openShards.WithLabelValues(st.info.Name).Set(float64(len(m.open)))
	}
}

func (mt *metrics) put(stream string, bytes int) {
	mt.recordsPut.WithLabelValues(stream).Inc()
	mt.bytesPut.WithLabelValues(stream).Add(float64(bytes))
}

func (mt *metrics) read(stream string, n int) { mt.recordsRead.WithLabelValues(stream).Add(float64(n)) }

// deleted drops a deleted stream's series.
func (mt *metrics) deleted(stream string) {
	for _, c := range []*prometheus.CounterVec{mt.recordsPut, mt.bytesPut, mt.putFailures, mt.recordsRead} {
		c.DeleteLabelValues(stream)
	}
	mt.reshards.DeletePartialMatch(prometheus.Labels{"stream": stream})
	mt.openShards.DeleteLabelValues(stream)
}
