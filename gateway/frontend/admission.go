package frontend

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"skiff.dev/skiff/internal/errs"
)

// admission is the concurrency check of Lambda's front end. A function with
// reserved concurrency R runs at most R invocations at once (R == 0: none);
// the other functions share the unreserved pool, AccountConcurrency minus
// the sum of all reservations. Counters are in memory and atomic: admit
// and release take no lock on the hot path. With several gateways, a
// Budget keeps the limits exact cluster-wide: each admission also takes a
// slot of this gateway's leased share (gateway/budget).
type admission struct {
	account     int64
	sumReserved func(context.Context) (int64, error)
	budget      Budget // nil: this gateway is the only one

	unreserved atomic.Int64 // in-flight invocations admitted from the unreserved pool
	limit      atomic.Int64 // size of the unreserved pool; valid when fresh
	fresh      atomic.Bool

	refreshMu sync.Mutex // one store read at a time when the pool size is stale
}

func newAdmission(account int, sumReserved func(context.Context) (int64, error), budget Budget) *admission {
	return &admission{account: int64(account), sumReserved: sumReserved, budget: budget}
}

// Budget is the cluster-wide half of admission (gateway/budget): a slot
// of a limit shared by every gateway.
type Budget interface {
	// Acquire takes a slot of scope, whose limit is limit; false means
	// the cluster is at the limit.
	Acquire(ctx context.Context, scope string, limit int64) (bool, error)
	// Release gives back a slot Acquire took.
	Release(scope string)
}

// Budget scopes: the unreserved pool, and one per function with reserved
// concurrency.
const budgetUnreserved = "unreserved"

func budgetFunction(name string) string { return "fn/" + name }

// ticket is an admitted invocation; release it exactly once.
type ticket struct {
	st         *fnState
	unreserved bool
	scope      string // the budget scope taken, if any
}

// admit takes a slot for one invocation of the function whose state is st
// and whose reserved concurrency is reserved (nil when none is set).
func (a *admission) admit(ctx context.Context, name string, st *fnState, reserved *int32) (ticket, error) {
	if reserved != nil {
		r := int64(*reserved)
		if st.inflight.Add(1) > r {
			st.inflight.Add(-1)
			return ticket{}, errs.Throttled(retryHint(), "rate exceeded: function %s is at its reserved concurrency of %d", name, r)
		}
		t := ticket{st: st}
		if a.budget != nil {
			scope := budgetFunction(name)
			if ok, err := a.budget.Acquire(ctx, scope, r); !ok || err != nil {
				st.inflight.Add(-1)
				if err != nil {
					return ticket{}, err
				}
				return ticket{}, errs.Throttled(retryHint(), "rate exceeded: function %s is at its reserved concurrency of %d across the gateways", name, r)
			}
			t.scope = scope
		}
		return t, nil
	}
	limit, err := a.poolSize(ctx)
	if err != nil {
		return ticket{}, err
	}
	if a.unreserved.Add(1) > limit {
		a.unreserved.Add(-1)
		return ticket{}, errs.Throttled(retryHint(), "rate exceeded: the account's unreserved concurrency of %d is in use", limit)
	}
	t := ticket{st: st, unreserved: true}
	if a.budget != nil {
		if ok, err := a.budget.Acquire(ctx, budgetUnreserved, limit); !ok || err != nil {
			a.unreserved.Add(-1)
			if err != nil {
				return ticket{}, err
			}
			return ticket{}, errs.Throttled(retryHint(), "rate exceeded: the account's unreserved concurrency of %d is in use across the gateways", limit)
		}
		t.scope = budgetUnreserved
	}
	st.inflight.Add(1)
	return t, nil
}

// release returns the slot of an admitted invocation.
func (a *admission) release(t ticket) {
	t.st.inflight.Add(-1)
	if t.unreserved {
		a.unreserved.Add(-1)
	}
	if t.scope != "" {
		a.budget.Release(t.scope)
	}
}

// poolSize returns the size of the unreserved pool, reading the sum of
// reservations from the store only when a change made it stale.
func (a *admission) poolSize(ctx context.Context) (int64, error) {
	if a.fresh.Load() {
		return a.limit.Load(), nil
	}
	a.refreshMu.Lock()
	defer a.refreshMu.Unlock()
	if a.fresh.Load() {
		return a.limit.Load(), nil
	}
	sum, err := a.sumReserved(ctx)
	if err != nil {
		return 0, fmt.Errorf("reading reserved concurrency: %w", err)
	}
	a.limit.Store(a.account - sum)
	a.fresh.Store(true)
	return a.account - sum, nil
}

// invalidate makes the next unreserved admission re-read the reservations.
// Call it after every change of a reservation (and after deletes).
func (a *admission) invalidate() {
	a.refreshMu.Lock()
	a.fresh.Store(false)
	a.refreshMu.Unlock()
}

// retryHint is the delay a throttled caller is told to wait: 100 ms to
// 500 ms, jittered so throttled callers do not return in lockstep.
func retryHint() time.Duration {
	return 100*time.Millisecond + rand.N(400*time.Millisecond)
}
