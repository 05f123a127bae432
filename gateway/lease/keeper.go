package lease

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"skiff.dev/skiff/internal/errs"
)

// heartbeatParallel bounds a keeper's concurrent heartbeats.
const heartbeatParallel = 16

// Keeper keeps the leases of one holder: every interval (Config.Interval,
// default Expiry/3) it heartbeats what it holds and acquires matching free
// slots up to its maximum. It reports changes through two callbacks,
// called from Tick (never concurrently, never with a lock held; they must
// not block for long):
//
//   - gained(l): the holder now holds l; start polling l.Resource.
//   - lost(l): the holder no longer holds l (taken over, dropped, released
//     on shutdown, its resource no longer matches, or it could not be
//     heartbeated and would expire before the next tick); stop at once.
//
// A lease whose heartbeat fails for a platform reason is kept while it
// would still be alive at the next tick and reported lost otherwise, so a
// poller stops before anyone else can take its slot over.
type Keeper struct {
	s            *Service
	holder       string
	max          int
	match        func(string) bool
	gained, lost func(Lease)

	tickMu    sync.Mutex // serialises Tick (and so the callbacks)
	reclaimed bool       // the first tick reclaimed a previous incarnation's slots; guarded by tickMu

	mu   sync.Mutex
	held map[string]Lease // by Key(); guarded by mu

	kick  chan struct{} // Service.Kick: tick now
	ticks atomic.Int64  // completed ticks (tests wait on it)
}

// Kicked is signalled when the service asks its keepers to tick now (a
// holder was declared dead): a loop running Tick selects on it.
func (k *Keeper) Kicked() <-chan struct{} { return k.kick }

// NewKeeper returns a Keeper for holder that holds at most max slots of
// the resources match accepts (nil accepts all). gained and lost may be
// nil. The holder name must be unique among live holders (for example the
// gateway id and a purpose: "gw-1/async"); kept stable across restarts of
// one process, it lets the first tick reclaim at once the slots the
// previous incarnation held when it died (Service.Reclaim) instead of
// waiting for them to expire.
func (s *Service) NewKeeper(holder string, max int, match func(string) bool, gained, lost func(Lease)) *Keeper {
	if match == nil {
		match = func(string) bool { return true }
	}
	if gained == nil {
		gained = func(Lease) {}
	}
	if lost == nil {
		lost = func(Lease) {}
	}
	k := &Keeper{s: s, holder: holder, max: max, match: match, gained: gained, lost: lost, held: map[string]Lease{},
		kick: make(chan struct{}, 1)}
	s.kickMu.Lock()
	s.keepers = append(s.keepers, k)
	s.kickMu.Unlock()
	return k
}

// Kick makes every keeper of this service tick at once instead of at its
// next interval: call it when a holder was declared dead (gossip), so the
// dead holder's slots are taken over now.
func (s *Service) Kick() {
	s.kickMu.Lock()
	defer s.kickMu.Unlock()
	for _, k := range s.keepers {
		select {
		case k.kick <- struct{}{}:
		default: // a tick is pending already
		}
	}
}

// Holder returns the keeper's holder name.
func (k *Keeper) Holder() string { return k.holder }

// Held returns the leases the keeper holds, ordered by resource and slot.
func (k *Keeper) Held() []Lease {
	k.mu.Lock()
	defer k.mu.Unlock()
	out := make([]Lease, 0, len(k.held))
	for _, l := range k.held {
		out = append(out, l)
	}
	sortLeases(out)
	return out
}

func (k *Keeper) validate() error {
	if k.holder == "" {
		return errs.Invalid("holder", "lease keeper holder is empty")
	}
	if k.max < 1 {
		return errs.Invalid("max", "lease keeper max %d is below 1", k.max)
	}
	return nil
}

// Run ticks at once and then every interval until ctx ends; then it
// releases what it holds (reporting each lease lost) so that other holders
// take over without waiting for the expiry. Failed ticks are logged and
// retried at the next interval. It returns nil when ctx ends.
func (k *Keeper) Run(ctx context.Context) error {
	if err := k.validate(); err != nil {
		return err
	}
	t := time.NewTicker(k.s.cfg.Interval)
	defer t.Stop()
	for {
		if err := k.Tick(ctx); err != nil && ctx.Err() == nil {
			k.s.log.Warn("lease keeper tick failed", "holder", k.holder, "err", err)
		}
		select {
		case <-ctx.Done():
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), k.s.cfg.Interval)
			defer cancel()
			k.ReleaseAll(rctx)
			return nil
		case <-k.kick:
		case <-t.C:
		}
	}
}

// Tick runs one round: heartbeat every held lease (reporting the lost
// ones), then acquire matching slots up to the maximum (reporting the
// gained ones). The error is the acquisition's, if any; heartbeat failures
// are handled as described on Keeper.
func (k *Keeper) Tick(ctx context.Context) error {
	if err := k.validate(); err != nil {
		return err
	}
	k.tickMu.Lock()
	defer k.tickMu.Unlock()
	defer k.ticks.Add(1)

	// Heartbeats go out concurrently: one at a time, a keeper holding
	// many leases on a slow disk (each write is fsynced) could take longer
	// than the expiry to renew them all.
	held := k.Held()
	type beat struct {
		next Lease
		err  error
	}
	beats := make([]beat, len(held))
	sem := make(chan struct{}, heartbeatParallel)
	var wg sync.WaitGroup
	for i, l := range held {
		if !k.match(l.Resource) {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			beats[i].next, beats[i].err = k.s.Heartbeat(ctx, l)
		}()
	}
	wg.Wait()
	for i, l := range held {
		if !k.match(l.Resource) {
			if err := k.s.Release(ctx, l); err != nil {
				k.s.log.Warn("releasing an unmatched lease", "lease", l.String(), "err", err)
			}
			k.drop(l, false, "resource no longer matches")
			continue
		}
		next, err := beats[i].next, beats[i].err
		switch {
		case err == nil:
			k.mu.Lock()
			k.held[l.Key()] = next
			k.mu.Unlock()
		case IsLost(err):
			k.drop(l, true, err.Error())
		default:
			// The engine did not answer. Keep the lease only if it will
			// still be alive when the next tick can retry.
			now := k.s.cfg.Now()
			if now.Add(k.s.cfg.Interval).Before(l.Expires) {
				k.s.log.Warn("lease heartbeat failed; retrying next tick", "lease", l.String(), "expires", l.Expires, "err", err)
				continue
			}
			k.drop(l, true, "heartbeat failed and the lease expires before the next one: "+err.Error())
		}
	}

	if !k.reclaimed {
		got, err := k.s.Reclaim(ctx, k.holder, k.max-len(k.Held()), k.match)
		if err != nil {
			return err
		}
		k.reclaimed = true
		k.add(got)
	}

	k.mu.Lock()
	n := k.max - len(k.held)
	mine := make(map[string]bool, len(k.held))
	for _, l := range k.held {
		mine[l.Resource] = true
	}
	k.mu.Unlock()
	if n <= 0 {
		return nil
	}
	got, err := k.s.Acquire(ctx, k.holder, n, func(r string) bool { return !mine[r] && k.match(r) })
	if err != nil {
		return err
	}
	k.add(got)
	return nil
}

// add records and reports leases gained.
func (k *Keeper) add(got []Lease) {
	for _, l := range got {
		k.mu.Lock()
		k.held[l.Key()] = l
		k.mu.Unlock()
		k.s.m.held.Inc()
		k.s.log.Info("lease gained", "lease", l.String(), "expires", l.Expires)
		k.gained(l)
	}
}

// ReleaseAll releases every held lease and reports each lost.
func (k *Keeper) ReleaseAll(ctx context.Context) {
	k.tickMu.Lock()
	defer k.tickMu.Unlock()
	for _, l := range k.Held() {
		if err := k.s.Release(ctx, l); err != nil {
			k.s.log.Warn("releasing lease", "lease", l.String(), "err", err)
		}
		k.drop(l, false, "released")
	}
}

// drop forgets l and reports it lost; loss says whether it was taken from
// the holder (counted in the losses metric) rather than given up.
func (k *Keeper) drop(l Lease, loss bool, why string) {
	k.mu.Lock()
	delete(k.held, l.Key())
	k.mu.Unlock()
	k.s.m.held.Dec()
	if loss {
		k.s.m.losses.Inc()
	}
	k.s.log.Info("lease lost", "lease", l.String(), "why", why)
	k.lost(l)
}
