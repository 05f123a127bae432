// Package budget keeps concurrency limits exact across gateways. Every
// gateway admits invocations against its own leased share of each limit
// (the account's unreserved pool, a function's reserved concurrency); the
// shares of live gateways never sum above the limit, so the cluster never
// runs more than the limit at once, whichever gateways the invocations
// arrive at.
//
// Storage. One key per scope in the NATS KV bucket "budgets": a JSON
// record of every gateway's share, {holder: {n, expires}}. A gateway
// grows its share with a compare-and-set on that key, taking only what
// the unexpired shares of the others leave free; it renews its share
// every interval and gives back what it does not use (keeping a little
// headroom), so an idle gateway holds nothing for long.
//
// Failure. A gateway that dies stops renewing: its shares expire (Expiry,
// default 3 s) and the others may take them. A gateway that cannot renew
// (cut off from NATS) stops admitting under its share a margin before
// the share's stored expiry: the fence that keeps two gateways from
// spending the same slots. Invocations admitted before keep running; a
// gateway cut off from storage while they do is the one case in which
// they may overlap with new ones elsewhere, for at most their timeout.
//
// Hot path. Admitting under the share held is a mutex-guarded counter;
// only growing the share costs a round trip to NATS.
package budget

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"skiff.dev/skiff/internal/errs"
)

// Bucket is the KV bucket the shares live in.
const Bucket = "budgets"

// DefaultExpiry is how long a share outlives its last renewal.
const DefaultExpiry = 3 * time.Second

// casAttempts bounds the compare-and-set retries of one grow or renewal.
const casAttempts = 8

// Config configures a Service.
type Config struct {
	// Expiry is how long a written share stays valid; 0 means
	// DefaultExpiry.
	Expiry time.Duration
	// Interval is the renewal period; 0 means Expiry/3. It must be
	// shorter than Expiry/2 (the fence margin is one interval).
	Interval time.Duration
	// Now is the clock; nil means time.Now.
	Now      func() time.Time
	Logger   *slog.Logger
	Registry prometheus.Registerer
}

// Service is one gateway's view of the budgets.
type Service struct {
	cfg    Config
	holder string
	kv     jetstream.KeyValue
	log    *slog.Logger
	m      *metrics

	mu     sync.Mutex
	scopes map[string]*scope // guarded by mu

	kick chan *scope // scopes to renew now (Run)
}

// scope is this gateway's share of one limit.
type scope struct {
	key    string
	growMu sync.Mutex // one grow at a time

	mu       sync.Mutex
	limit    int64     // the limit as last asked
	share    int64     // slots this gateway may use
	inflight int64     // slots in use
	valid    time.Time // admit under share only before this (stored expiry − margin)
	idleAt   time.Time // when inflight last dropped to 0
	// fullUntil: a grow found nothing free; until then refuse without
	// asking NATS again (throttled callers back off longer than this).
	fullUntil time.Time
	// contended: another gateway was refused lately; a release then
	// hands unused slots back at once.
	contended bool
	// wantStored: the stored entry says this gateway wants more; a
	// renewal clears it once the demand is gone.
	wantStored bool
}

// record is a scope's stored value.
type record struct {
	Shares map[string]share `json:"shares"`
}

type share struct {
	N int64 `json:"n"`
	// Want is set by a gateway that was refused: the others shrink to
	// their fair part at their next renewal.
	Want    int64 `json:"want,omitempty"`
	Expires int64 `json:"expires_unix_nano"`
}

// New opens (creating it if needed) the budgets bucket for holder, the
// gateway's unique, stable name.
func New(ctx context.Context, js jetstream.JetStream, holder string, cfg Config) (*Service, error) {
	if holder == "" {
		return nil, errs.Invalid("holder", "budget holder is empty")
	}
	if cfg.Expiry < 0 || cfg.Interval < 0 {
		return nil, errs.Invalid("expiry", "budget expiry %v and interval %v must not be negative", cfg.Expiry, cfg.Interval)
	}
	if cfg.Expiry == 0 {
		cfg.Expiry = DefaultExpiry
	}
	if cfg.Interval == 0 {
		cfg.Interval = cfg.Expiry / 3
	}
	if 2*cfg.Interval >= cfg.Expiry {
		return nil, errs.Invalid("interval", "budget renewal interval %v must be shorter than half the expiry %v", cfg.Interval, cfg.Expiry)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	m, err := newMetrics(cfg.Registry)
	if err != nil {
		return nil, err
	}
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      Bucket,
		Description: "skiff concurrency budgets: each gateway's leased share of every limit",
		History:     1,
		Storage:     jetstream.FileStorage,
	})
	if err != nil {
		return nil, errs.Unavailable("opening kv bucket %s: %v", Bucket, err)
	}
	return &Service{cfg: cfg, holder: holder, kv: kv, log: cfg.Logger.With("component", "budget"), m: m, scopes: map[string]*scope{}, kick: make(chan *scope, 64)}, nil
}

// Interval returns the renewal period.
func (s *Service) Interval() time.Duration { return s.cfg.Interval }

func (s *Service) scope(name string) *scope {
	s.mu.Lock()
	defer s.mu.Unlock()
	sc, ok := s.scopes[name]
	if !ok {
		sc = &scope{key: base64.RawURLEncoding.EncodeToString([]byte(name))}
		s.scopes[name] = sc
	}
	return sc
}

// Acquire takes one slot of scope, whose limit is limit, for an
// invocation; false means the cluster is at the limit (throttle). Release
// every acquired slot exactly once.
func (s *Service) Acquire(ctx context.Context, name string, limit int64) (bool, error) {
	if limit <= 0 {
		return false, nil
	}
	sc := s.scope(name)
	if sc.take(s.cfg.Now(), limit) {
		return true, nil
	}
	if sc.full(s.cfg.Now()) {
		s.m.throttles.Inc()
		return false, nil
	}
	// Grow the share, one grower per scope; the others wait and retry
	// the fast path on what it got.
	sc.growMu.Lock()
	defer sc.growMu.Unlock()
	if sc.take(s.cfg.Now(), limit) {
		return true, nil
	}
	if err := s.grow(ctx, sc, limit); err != nil {
		if !errs.IsConflict(err) {
			return false, err
		}
		// Lost every race to other gateways growing at the same moment:
		// the limit is contended, which is a throttle, not an error.
	}
	now := s.cfg.Now()
	ok := sc.take(now, limit)
	if !ok {
		sc.mu.Lock()
		sc.fullUntil = now.Add(s.cfg.Interval / 10)
		sc.mu.Unlock()
		s.m.throttles.Inc()
	}
	return ok, nil
}

func (sc *scope) full(now time.Time) bool {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	return now.Before(sc.fullUntil)
}

// take admits under the share held.
func (sc *scope) take(now time.Time, limit int64) bool {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	sc.limit = limit
	if now.Before(sc.valid) && sc.inflight < sc.share && sc.inflight < limit {
		sc.inflight++
		return true
	}
	return false
}

// Release gives back a slot Acquire took.
func (s *Service) Release(name string) {
	sc := s.scope(name)
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.inflight > 0 {
		sc.inflight--
		if sc.inflight == 0 {
			sc.idleAt = s.cfg.Now()
		}
	}
	if sc.contended && sc.share > sc.inflight {
		s.kickScope(sc)
	}
}

// headroom is what a gateway keeps above its in-flight count: growing by
// it at a time keeps round trips rare while leaving most of a limit to
// the others. Small limits get none: a slot held idle by one gateway
// would throttle another for a renewal interval.
func headroom(limit int64) int64 {
	if limit < 16 {
		return 0
	}
	return limit / 8
}

// grow asks for more share: up to in-flight + 1 + headroom, bounded by
// what the others' unexpired shares leave free.
func (s *Service) grow(ctx context.Context, sc *scope, limit int64) error {
	sc.mu.Lock()
	want := min(limit, sc.inflight+1+headroom(limit))
	sc.mu.Unlock()
	return s.write(ctx, sc, func(free int64, contenders, active int) (int64, int64, int64) {
		n := min(want, free)
		if contenders > 0 {
			// Others were refused: grow no further than a fair part.
			n = min(n, max(1, limit/int64(active+1)))
		}
		sc.mu.Lock()
		stored := max(n, sc.inflight) // the stored share always covers what runs
		sc.mu.Unlock()
		if n < want {
			return stored, want, n // refused in part: tell the others
		}
		return stored, 0, n
	}, "grow")
}

// write sets this gateway's share of sc (and its unmet demand) to
// size(free, contenders) with a fresh expiry, free being what the other
// holders' unexpired shares leave of the limit, contenders the number of
// other holders that were refused lately and want more, active the number
// of other holders with an entry.
//
// size also returns the admission cap: normally n, lower when this
// gateway must shrink below what it has in flight (the stored share keeps
// counting those until they finish).
func (s *Service) write(ctx context.Context, sc *scope, size func(free int64, contenders, active int) (n, want, capN int64), why string) error {
	for attempt := range casAttempts {
		now := s.cfg.Now()
		rec := record{Shares: map[string]share{}}
		var rev uint64
		e, err := s.kv.Get(ctx, sc.key)
		switch {
		case errors.Is(err, jetstream.ErrKeyNotFound):
		case err != nil:
			return errs.Unavailable("reading budget %s: %v", sc.key, err)
		default:
			rev = e.Revision()
			if err := json.Unmarshal(e.Value(), &rec); err != nil {
				return errs.Internal("decoding budget %s: %w", sc.key, err)
			}
			if rec.Shares == nil {
				rec.Shares = map[string]share{}
			}
		}
		sc.mu.Lock()
		limit := sc.limit
		sc.mu.Unlock()
		others, contenders, active := int64(0), 0, 0
		for h, sh := range rec.Shares {
			if h == s.holder {
				continue
			}
			if sh.Expires <= now.UnixNano() {
				delete(rec.Shares, h) // expired: its slots are free again
				continue
			}
			others += sh.N
			active++
			if sh.Want > 0 {
				contenders++
			}
		}
		n, want, capN := size(max(0, limit-others), contenders, active)
		n = max(0, n)
		capN = min(max(0, capN), n)
		// Admissions go on under the share held while this write is in
		// flight: lower it now to what is about to be stored (a shrink),
		// and store at least what runs, admissions made since size looked
		// included. Otherwise a shrinking renewal stores less than runs
		// and another gateway takes the difference. A raise waits for
		// the write.
		sc.mu.Lock()
		sc.share = min(sc.share, capN)
		n = max(n, sc.inflight)
		sc.mu.Unlock()
		if cur, ok := rec.Shares[s.holder]; ok && why == "grow" && cur.N == n && cur.Want == want &&
			time.Unix(0, cur.Expires).Sub(now) > s.cfg.Expiry-s.cfg.Interval {
			// Nothing would change and the share was renewed lately: a
			// grow that finds nothing free writes nothing (the key is hot).
			sc.mu.Lock()
			sc.share = capN
			sc.valid = time.Unix(0, cur.Expires).Add(-s.cfg.Interval)
			sc.mu.Unlock()
			return nil
		}
		expires := now.Add(s.cfg.Expiry)
		if n == 0 && want == 0 {
			delete(rec.Shares, s.holder)
		} else {
			rec.Shares[s.holder] = share{N: n, Want: want, Expires: expires.UnixNano()}
		}
		b, err := json.Marshal(rec)
		if err != nil {
			return errs.Internal("encoding budget: %w", err)
		}
		if rev == 0 {
			_, err = s.kv.Create(ctx, sc.key, b)
		} else {
			_, err = s.kv.Update(ctx, sc.key, b, rev)
		}
		if errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			s.m.conflicts.Inc()
			// Back off a little, jittered, so racing gateways spread out.
			t := time.NewTimer(time.Duration(rand.Int64N(int64(time.Millisecond) * int64(attempt+1))))
			select {
			case <-ctx.Done():
				t.Stop()
				return ctx.Err()
			case <-t.C:
			}
			continue
		}
		if err != nil {
			return errs.Unavailable("writing budget %s: %v", sc.key, err)
		}
		sc.mu.Lock()
		sc.share = capN
		sc.contended = contenders > 0
		sc.wantStored = want > 0
		// The fence: stop admitting one interval before the stored
		// expiry, so clock skew and a slow renewal cannot let two
		// gateways spend the same slots.
		sc.valid = expires.Add(-s.cfg.Interval)
		sc.mu.Unlock()
		s.m.writes.WithLabelValues(why).Inc()
		return nil
	}
	return errs.Conflict("budget %s: lost %d compare-and-set races", sc.key, casAttempts)
}

// Renew renews every share this gateway holds and shrinks each to what it
// uses plus headroom; a scope idle for an expiry is given back entirely.
// Run calls it every interval.
func (s *Service) Renew(ctx context.Context) error {
	var all []error
	for _, sc := range s.all() {
		if err := s.renewScope(ctx, sc); err != nil {
			all = append(all, err)
		}
	}
	return errors.Join(all...)
}

func (s *Service) all() []*scope {
	s.mu.Lock()
	defer s.mu.Unlock()
	scopes := make([]*scope, 0, len(s.scopes))
	for _, sc := range s.scopes {
		scopes = append(scopes, sc)
	}
	return scopes
}

func (s *Service) renewScope(ctx context.Context, sc *scope) error {
	sc.growMu.Lock()
	defer sc.growMu.Unlock()
	sc.mu.Lock()
	share, inflight, limit, idleAt, wantStored := sc.share, sc.inflight, sc.limit, sc.idleAt, sc.wantStored
	sc.mu.Unlock()
	if share == 0 && inflight == 0 && !wantStored {
		return nil
	}
	now := s.cfg.Now()
	target := min(share, inflight+headroom(limit))
	if inflight == 0 && now.Sub(idleAt) >= s.cfg.Expiry {
		target = 0
	}
	return s.write(ctx, sc, func(free int64, contenders, active int) (int64, int64, int64) {
		sc.mu.Lock()
		defer sc.mu.Unlock()
		t := target
		if contenders > 0 {
			// Others were refused: admit no more than a fair part from
			// now on, nothing when idle; the stored share follows as the
			// in-flight invocations above it finish.
			t = min(t, max(1, limit/int64(active+1)))
			if sc.inflight == 0 {
				t = 0
			}
		}
		var want int64
		if now.Before(sc.fullUntil) {
			want = min(limit, sc.inflight+1+headroom(limit)) // still refused lately
		}
		// Stored: never below what is in flight, never above what is free.
		n := min(max(t, sc.inflight), max(free, sc.inflight))
		return n, want, min(t, n)
	}, "renew")
}

// Run renews every interval, and at once where another gateway was
// refused while this one holds slots it does not use, until ctx ends;
// then it gives every share back.
func (s *Service) Run(ctx context.Context) error {
	t := time.NewTicker(s.cfg.Interval)
	defer t.Stop()
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	go s.watch(watchCtx)
	for {
		select {
		case <-ctx.Done():
			s.releaseAll()
			return nil
		case <-t.C:
			if err := s.Renew(ctx); err != nil && ctx.Err() == nil {
				s.log.Warn("renewing concurrency budgets failed", "err", err)
			}
		case sc := <-s.kick:
			if err := s.renewScope(ctx, sc); err != nil && ctx.Err() == nil {
				s.log.Warn("handing back an unused concurrency share failed", "err", err)
			}
		}
	}
}

// watch follows the budgets bucket: when another gateway records that it
// was refused (Want) on a scope where this one holds unused slots, it
// kicks a renewal of that scope, which hands them back.
func (s *Service) watch(ctx context.Context) {
	w, err := s.kv.WatchAll(ctx, jetstream.UpdatesOnly())
	if err != nil {
		s.log.Warn("watching concurrency budgets failed; unused shares go back at the next renewal", "err", err)
		return
	}
	defer func() { _ = w.Stop() }()
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-w.Updates():
			if !ok {
				return
			}
			if e == nil || e.Operation() != jetstream.KeyValuePut {
				continue
			}
			var rec record
			if json.Unmarshal(e.Value(), &rec) != nil {
				continue
			}
			now := s.cfg.Now().UnixNano()
			wanted := false
			for h, sh := range rec.Shares {
				if h != s.holder && sh.Want > 0 && sh.Expires > now {
					wanted = true
				}
			}
			sc := s.byKey(e.Key())
			if sc == nil {
				continue
			}
			sc.mu.Lock()
			sc.contended = wanted
			unused := sc.share > sc.inflight
			sc.mu.Unlock()
			if wanted && unused {
				s.kickScope(sc)
			}
		}
	}
}

func (s *Service) byKey(key string) *scope {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sc := range s.scopes {
		if sc.key == key {
			return sc
		}
	}
	return nil
}

func (s *Service) kickScope(sc *scope) {
	select {
	case s.kick <- sc:
	default: // a renewal is pending already
	}
}

// releaseAll deletes this gateway's shares (a clean shutdown gives its
// budget back at once instead of after the expiry).
func (s *Service) releaseAll() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, sc := range s.all() {
		if err := s.write(ctx, sc, func(int64, int, int) (int64, int64, int64) { return 0, 0, 0 }, "release"); err != nil {
			s.log.Warn("giving a concurrency budget back", "scope", sc.key, "err", err)
		}
	}
}

// Share reports this gateway's share and in-flight count of a scope (for
// tests and metrics).
func (s *Service) Share(name string) (share, inflight int64) {
	sc := s.scope(name)
	sc.mu.Lock()
	defer sc.mu.Unlock()
	return sc.share, sc.inflight
}

type metrics struct {
	writes    *prometheus.CounterVec
	conflicts prometheus.Counter
	throttles prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		writes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skiff_budget_writes_total", Help: "Writes of this gateway's concurrency shares, by cause (grow, renew, release).",
		}, []string{"why"}),
		conflicts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skiff_budget_conflicts_total", Help: "Share writes that lost a compare-and-set race with another gateway and were retried.",
		}),
		throttles: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skiff_budget_throttles_total", Help: "Admissions refused because the other gateways' shares left nothing free.",
		}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.writes, m.conflicts, m.throttles} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("registering budget metrics: %w", err)
			}
		}
	}
	return m, nil
}
