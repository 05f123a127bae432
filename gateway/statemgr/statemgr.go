// Package statemgr is skiff's state manager for async invoke, as Lambda's:
// it watches the backlog and age of every async queue and the functions'
// concurrency settings, gives functions with a large reserved concurrency
// a dedicated queue (and moves them back when the reservation shrinks),
// and sets the desired number of poller assignments per queue in the
// leasing service: a redundant minimum when idle, more with backlog.
//
// Reconcile is idempotent and every gateway may run it: the decisions are
// a function of the stored state, and writing the same desired state twice
// changes nothing.
package statemgr

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/async"
	"skiff.dev/skiff/internal/errs"
)

// Queues is what the state manager needs from the async queues
// (*async.Service).
type Queues interface {
	Queues(ctx context.Context) ([]async.QueueStats, error)
	Dedicated() map[string]bool
	SetDedicated(ctx context.Context, function string, on bool) error
	RemoveQueue(ctx context.Context, subject string) error
}

// Functions lists functions (*store.Store).
type Functions interface {
	ListFunctions(ctx context.Context, after string, limit int) ([]*skiffv1.Function, string, error)
}

// Leases is the leasing service's desired-state side (*lease.Service).
type Leases interface {
	SetDesired(ctx context.Context, resource string, slots int) error
	RemoveResource(ctx context.Context, resource string) error
	Resources(ctx context.Context) (map[string]int, error)
}

// Defaults of Config.
const (
	DefaultDedicatedThreshold = 100
	DefaultMinSlots           = 2
	DefaultMaxSlots           = 8
	DefaultBacklogPerSlot     = 1000
	DefaultInterval           = time.Second
	listPage                  = 500
)

// Config configures a Manager. Zero values take the defaults.
type Config struct {
	// DedicatedThreshold: a function whose reserved concurrency is at least
	// this gets a dedicated queue (default 100).
	DedicatedThreshold int
	// MinSlots is the number of poller assignments of an idle queue, for
	// redundancy (default 2).
	MinSlots int
	// MaxSlots bounds the assignments of one queue (default 8).
	MaxSlots int
	// BacklogPerSlot: one more assignment per this many backlogged events
	// (default 1000).
	BacklogPerSlot int
	// Interval is the period of Run (default 1 s).
	Interval time.Duration
	Registry prometheus.Registerer
	Logger   *slog.Logger
}

func (c *Config) setDefaults() error {
	if c.DedicatedThreshold == 0 {
		c.DedicatedThreshold = DefaultDedicatedThreshold
	}
	if c.MinSlots == 0 {
		c.MinSlots = DefaultMinSlots
	}
	if c.MaxSlots == 0 {
		c.MaxSlots = max(DefaultMaxSlots, c.MinSlots)
	}
	if c.BacklogPerSlot == 0 {
		c.BacklogPerSlot = DefaultBacklogPerSlot
	}
	if c.Interval == 0 {
		c.Interval = DefaultInterval
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	switch {
	case c.DedicatedThreshold < 1:
		return fmt.Errorf("dedicated threshold %d is below 1", c.DedicatedThreshold)
	case c.MinSlots < 1 || c.MaxSlots < c.MinSlots:
		return fmt.Errorf("slots %d-%d: need 1 ≤ min ≤ max", c.MinSlots, c.MaxSlots)
	case c.BacklogPerSlot < 1 || c.Interval < 0:
		return errors.New("backlog per slot must be positive, interval not negative")
	}
	return nil
}

// Manager is the state manager.
type Manager struct {
	cfg Config
	q   Queues
	fns Functions
	ls  Leases
	log *slog.Logger
	met *metrics
}

// New returns a Manager.
func New(cfg Config, q Queues, fns Functions, ls Leases) (*Manager, error) {
	if q == nil || fns == nil || ls == nil {
		return nil, errors.New("state manager needs queues, functions and leases")
	}
	if err := cfg.setDefaults(); err != nil {
		return nil, fmt.Errorf("state manager config: %w", err)
	}
	met, err := newMetrics(cfg.Registry)
	if err != nil {
		return nil, fmt.Errorf("registering state manager metrics: %w", err)
	}
	return &Manager{cfg: cfg, q: q, fns: fns, ls: ls, log: cfg.Logger.With("component", "statemgr"), met: met}, nil
}

// Run reconciles at once and then every Interval until ctx ends. A failed
// round is logged and retried at the next one. It returns nil when ctx
// ends.
func (m *Manager) Run(ctx context.Context) error {
	t := time.NewTicker(m.cfg.Interval)
	defer t.Stop()
	for {
		if err := m.Reconcile(ctx); err != nil && ctx.Err() == nil {
			m.log.Warn("state manager round failed", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Reconcile runs one round: route functions to dedicated or shared queues
// by their reserved concurrency, then set the desired assignments of every
// queue from its backlog, and retire drained dedicated queues.
func (m *Manager) Reconcile(ctx context.Context) error {
	want, err := m.wantDedicated(ctx)
	if err != nil {
		return err
	}
	have := m.q.Dedicated()
	var errList []error
	for fn := range want {
		if !have[fn] {
			m.log.Info("moving function to a dedicated async queue", "function", fn)
			errList = append(errList, m.q.SetDedicated(ctx, fn, true))
		}
	}
	for fn := range have {
		if !want[fn] {
			m.log.Info("moving function back to the shared async queues", "function", fn)
			errList = append(errList, m.q.SetDedicated(ctx, fn, false))
		}
	}
	if err := errors.Join(errList...); err != nil {
		return err
	}

	queues, err := m.q.Queues(ctx)
	if err != nil {
		return err
	}
	current, err := m.ls.Resources(ctx)
	if err != nil {
		return err
	}
	live := map[string]bool{}
	dedicated := 0
	for _, q := range queues {
		res := async.Resource(q.Subject)
		m.met.depth.WithLabelValues(q.Subject).Set(float64(q.Backlog))
		m.met.inFlight.WithLabelValues(q.Subject).Set(float64(q.InFlight))
		m.met.age.WithLabelValues(q.Subject).Set(q.OldestAge.Seconds())
		if q.Function != "" && !q.Routed && q.Backlog == 0 {
			// A drained dedicated queue nobody routes to: retire it.
			if err := m.ls.RemoveResource(ctx, res); err != nil {
				errList = append(errList, err)
				continue
			}
			if err := m.q.RemoveQueue(ctx, q.Subject); err != nil && !errs.Is(err, errs.KindFailedPrecondition) {
				errList = append(errList, err)
			}
			m.forget(q.Subject)
			m.log.Info("retired a drained dedicated async queue", "queue", q.Subject)
			continue
		}
		if q.Function != "" {
			dedicated++
		}
		live[res] = true
		slots := m.slots(q.Backlog)
		m.met.desired.WithLabelValues(q.Subject).Set(float64(slots))
		if current[res] != slots {
			if err := m.ls.SetDesired(ctx, res, slots); err != nil {
				errList = append(errList, err)
			}
		}
	}
	for res := range current {
		if subj, ok := async.SubjectOf(res); ok && !live[res] && strings.HasPrefix(subj, async.SubjectPrefix) {
			errList = append(errList, m.ls.RemoveResource(ctx, res))
			m.forget(subj)
		}
	}
	m.met.dedicated.Set(float64(dedicated))
	return errors.Join(errList...)
}

// slots is the desired number of poller assignments for a backlog.
func (m *Manager) slots(backlog uint64) int {
	extra := (backlog + uint64(m.cfg.BacklogPerSlot) - 1) / uint64(m.cfg.BacklogPerSlot)
	n := uint64(m.cfg.MinSlots) + extra
	return int(min(n, uint64(m.cfg.MaxSlots)))
}

func (m *Manager) forget(subject string) {
	m.met.depth.DeleteLabelValues(subject)
	m.met.inFlight.DeleteLabelValues(subject)
	m.met.age.DeleteLabelValues(subject)
	m.met.desired.DeleteLabelValues(subject)
}

// wantDedicated returns the functions whose reserved concurrency is at or
// above the threshold.
func (m *Manager) wantDedicated(ctx context.Context) (map[string]bool, error) {
	want := map[string]bool{}
	after := ""
	for {
		fns, next, err := m.fns.ListFunctions(ctx, after, listPage)
		if err != nil {
			return nil, fmt.Errorf("listing functions: %w", err)
		}
		for _, fn := range fns {
			if fn.ReservedConcurrency != nil && int(fn.GetReservedConcurrency()) >= m.cfg.DedicatedThreshold {
				want[fn.GetName()] = true
			}
		}
		if next == "" || len(fns) == 0 {
			return want, nil
		}
		after = next
	}
}

type metrics struct {
	depth, inFlight, age, desired *prometheus.GaugeVec
	dedicated                     prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		depth: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "skiff_async_queue_depth", Help: "Events stored in an async queue and not yet acknowledged.",
		}, []string{"queue"}),
		inFlight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "skiff_async_queue_in_flight", Help: "Events of an async queue delivered to a poller (running or waiting for a retry).",
		}, []string{"queue"}),
		age: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "skiff_async_queue_oldest_age_seconds", Help: "Age of the oldest event in an async queue.",
		}, []string{"queue"}),
		desired: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "skiff_async_queue_desired_assignments", Help: "Poller assignments the state manager wants for an async queue.",
		}, []string{"queue"}),
		dedicated: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "skiff_async_dedicated_queues", Help: "Dedicated per-function async queues.",
		}),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.depth, m.inFlight, m.age, m.desired, m.dedicated} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
