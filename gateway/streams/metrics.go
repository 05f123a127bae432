package streams

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the stream pollers' Prometheus metrics. Services that share
// a registry share the collectors.
type metrics struct {
	iteratorAge   *prometheus.GaugeVec   // mapping, shard
	checkpointLag *prometheus.GaugeVec   // mapping, shard
	batches       *prometheus.CounterVec // result
	skipped       *prometheus.CounterVec // condition
	onFailure     *prometheus.CounterVec // outcome
	records       prometheus.Counter
	bisections    prometheus.Counter
	takeovers     prometheus.Counter
	fenced        prometheus.Counter
	shardEnds     prometheus.Counter
	pollers       prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		iteratorAge: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "skiff_streams_iterator_age_milliseconds", Help: "Age of the last record of the last batch a stream mapping processed, per shard (0 when caught up).",
		}, []string{"mapping", "shard"}),
		checkpointLag: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "skiff_streams_checkpoint_lag_records", Help: "Records of a lane read beyond its checkpoint and not yet processed.",
		}, []string{"mapping", "shard"}),
		batches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skiff_streams_batches_total", Help: "Invokes of stream batches, by result.",
		}, []string{"result"}),
		skipped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skiff_streams_records_skipped_total", Help: "Stream records skipped (sent to OnFailure) after their retries or age ran out.",
		}, []string{"condition"}),
		onFailure: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skiff_streams_on_failure_total", Help: "OnFailure records of skipped stream batches, by outcome.",
		}, []string{"outcome"}),
		records: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skiff_streams_records_processed_total", Help: "Stream records the function processed successfully.",
		}),
		bisections: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skiff_streams_bisections_total", Help: "Failing stream batches split in halves.",
		}),
		takeovers: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skiff_streams_lease_takeovers_total", Help: "Stream lanes this gateway took over from the checkpoint of another holder or of a dead incarnation of itself.",
		}),
		fenced: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skiff_streams_fenced_total", Help: "Stream pollers stopped because their checkpoint write was fenced (lease lost).",
		}),
		shardEnds: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skiff_streams_shard_ends_total", Help: "Lanes checkpointed at the end of their closed shard.",
		}),
		pollers: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "skiff_streams_pollers", Help: "Stream lanes this gateway polls.",
		}),
	}
	if reg == nil {
		return m, nil
	}
	var err error
	for _, g := range []**prometheus.GaugeVec{&m.iteratorAge, &m.checkpointLag} {
		if *g, err = register(reg, *g); err != nil {
			return nil, err
		}
	}
	for _, c := range []**prometheus.CounterVec{&m.batches, &m.skipped, &m.onFailure} {
		if *c, err = register(reg, *c); err != nil {
			return nil, err
		}
	}
	for _, c := range []*prometheus.Counter{&m.records, &m.bisections, &m.takeovers, &m.fenced, &m.shardEnds} {
		if *c, err = register(reg, *c); err != nil {
			return nil, err
		}
	}
	if m.pollers, err = register(reg, m.pollers); err != nil {
		return nil, err
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
