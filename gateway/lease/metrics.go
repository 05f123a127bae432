package lease

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the leasing service's Prometheus metrics. Services that
// share a registry share the collectors.
type metrics struct {
	held      prometheus.Gauge   // held by keepers of this process
	acquired  prometheus.Counter // every successful acquisition
	takeovers prometheus.Counter // acquisitions of a slot another holder let expire
	losses    prometheus.Counter // leases keepers reported lost
	expired   prometheus.Counter // expired slots a sweep made available
	sweeps    prometheus.Counter
	slots     *prometheus.GaugeVec // state: held, free; set by sweeps
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		held: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "skiff_lease_assignments_held", Help: "Lease assignments held by the keepers of this gateway.",
		}),
		acquired: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skiff_lease_acquisitions_total", Help: "Lease slots acquired (free, released or expired).",
		}),
		takeovers: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skiff_lease_takeovers_total", Help: "Lease slots acquired after their previous holder let them expire.",
		}),
		losses: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skiff_lease_losses_total", Help: "Lease assignments keepers of this gateway lost (heartbeat failed, taken over or dropped).",
		}),
		expired: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skiff_lease_expired_total", Help: "Expired lease slots the health check made available.",
		}),
		sweeps: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skiff_lease_sweeps_total", Help: "Lease health checks run.",
		}),
		slots: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "skiff_lease_slots", Help: "Desired lease slots by state (held, free) at the last health check.",
		}, []string{"state"}),
	}
	if reg == nil {
		return m, nil
	}
	var err error
	m.held, err = register(reg, m.held)
	if err != nil {
		return nil, err
	}
	for _, c := range []*prometheus.Counter{&m.acquired, &m.takeovers, &m.losses, &m.expired, &m.sweeps} {
		if *c, err = register(reg, *c); err != nil {
			return nil, err
		}
	}
	if m.slots, err = register(reg, m.slots); err != nil {
		return nil, err
	}
	return m, nil
}

// register registers c, or returns the collector already registered under
// its name (two services of one process on one registry share metrics).
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
