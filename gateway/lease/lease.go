// Package lease is the gateway's leasing service: it assigns pollers to
// resources (async queues now; event source mappings and stream shards
// later) and heals the assignments of pollers that died.
//
// Model. A resource (an opaque string such as "async:async.shared.0" or
// "esm:<uuid>") has a desired number of slots, set with SetDesired by whoever
// owns the resource (the state manager, a mapping); each slot is held by at
// most one holder (a poller process) at a time, so n slots mean n redundant
// pollers. A holder takes free or expired slots with Acquire, keeps them by
// calling Heartbeat before they expire (Config.Expiry, default 3 s) and gives
// them back with Release. A Keeper does all of that for one holder on a
// timer and tells the poller what it gained and lost.
//
// Storage. Everything lives in the NATS KV bucket "leases":
//
//   - "want.<r>" = {"resource","slots"}: the desired slot count of resource r;
//   - "slot.<r>.<i>" = {"resource","slot","holder","epoch","expires_unix_nano"}:
//     slot i of r; holder "" means free.
//
// <r> is the resource in unpadded base64url, so any resource string is a
// valid key token. Every write of a slot is a compare-and-set on the
// revision the writer read, so of two holders racing for one slot exactly
// one wins.
//
// Fencing. Every acquisition gives the slot a new, higher epoch (a
// takeover of an expired slot too). The epoch is the fencing token: Check
// succeeds only for the holder and epoch that hold the slot now and only
// before it expires, so a poller that lost its slot has its acks and
// checkpoints rejected even if it has not noticed yet. Epochs of a slot only
// grow, also across SetDesired shrinking and RemoveResource: a deleted slot
// leaves a delete marker whose revision (a bucket-wide sequence, larger than
// any epoch the slot had) seeds the next epoch.
//
// Time. Expiry times are absolute times of the injected clock
// (Config.Now). Gateways sharing a bucket must have clocks that agree to
// well within the expiry.
package lease

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"skiff.dev/skiff/internal/errs"
)

// Defaults and limits.
const (
	DefaultExpiry = 3 * time.Second
	// MaxSlots bounds the desired slots of one resource.
	MaxSlots = 1024
	// MaxResourceLen bounds the length of a resource name in bytes.
	MaxResourceLen = 512
	// Bucket is the KV bucket the leases live in.
	Bucket = "leases"
	// ReasonLost is the errs reason of a lease that is no longer held.
	ReasonLost = "lease_lost"
)

const (
	prefixWant = "want."
	prefixSlot = "slot."
	// casAttempts bounds retries of a compare-and-set that lost a race
	// with a write that did not change the outcome (a concurrent heartbeat
	// of the same lease).
	casAttempts = 3
)

// Config configures a Service.
type Config struct {
	// Expiry is how long a slot stays held after an acquisition or a
	// heartbeat; 0 means DefaultExpiry.
	Expiry time.Duration
	// Interval is a Keeper's heartbeat and acquisition period; 0 means
	// Expiry/3. It must be shorter than Expiry.
	Interval time.Duration
	// Dead, when set, reports a holder known to be dead (for example its
	// gateway failed gossip's failure detection): its slots are taken
	// over at once instead of after their expiry. The new epoch fences
	// the holder should it be alive after all.
	Dead func(holder string) bool
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Logger receives the service's logs; nil discards them.
	Logger *slog.Logger
	// Registry receives the metrics; nil keeps them unregistered.
	Registry prometheus.Registerer
}

func (c *Config) validate() error {
	if c.Expiry < 0 {
		return errs.Invalid("expiry", "lease expiry %v is negative", c.Expiry)
	}
	if c.Interval < 0 {
		return errs.Invalid("interval", "lease heartbeat interval %v is negative", c.Interval)
	}
	expiry := c.Expiry
	if expiry == 0 {
		expiry = DefaultExpiry
	}
	if c.Interval >= expiry {
		return errs.Invalid("interval", "lease heartbeat interval %v is not shorter than the expiry %v", c.Interval, expiry)
	}
	return nil
}

func (c *Config) setDefaults() {
	if c.Expiry == 0 {
		c.Expiry = DefaultExpiry
	}
	if c.Interval == 0 {
		c.Interval = c.Expiry / 3
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// Service is the leasing service. Its methods are safe for concurrent use;
// several Services (one per gateway) may share one bucket.
type Service struct {
	cfg Config
	log *slog.Logger
	kv  jetstream.KeyValue
	m   *metrics

	kickMu  sync.Mutex
	keepers []*Keeper // guarded by kickMu
}

// New opens (creating it if needed) the "leases" bucket.
func New(ctx context.Context, js jetstream.JetStream, cfg Config) (*Service, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	cfg.setDefaults()
	m, err := newMetrics(cfg.Registry)
	if err != nil {
		return nil, errs.Internal("registering lease metrics: %w", err)
	}
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      Bucket,
		Description: "skiff poller leases: desired slots per resource and their holders",
		History:     1,
		Storage:     jetstream.FileStorage,
	})
	if err != nil {
		return nil, wrapErr(err, "opening kv bucket %s", Bucket)
	}
	return &Service{cfg: cfg, log: cfg.Logger.With("component", "lease"), kv: kv, m: m}, nil
}

// Expiry returns how long an acquisition or heartbeat keeps a slot.
func (s *Service) Expiry() time.Duration { return s.cfg.Expiry }

// Interval returns the keepers' heartbeat period.
func (s *Service) Interval() time.Duration { return s.cfg.Interval }

// Lease is one slot of a resource as a holder sees it.
type Lease struct {
	Resource string
	Slot     int
	Holder   string // "" when the slot is free
	Epoch    uint64 // the fencing token; grows with every acquisition
	Expires  time.Time
	Revision uint64 // the KV revision this copy was read or written at
}

// Key returns the KV key of l's slot, which also names the slot in logs.
func (l Lease) Key() string { return slotKey(l.Resource, l.Slot) }

// String describes l for logs.
func (l Lease) String() string {
	return fmt.Sprintf("%s[%d] holder=%q epoch=%d", l.Resource, l.Slot, l.Holder, l.Epoch)
}

// Free reports whether nobody holds l's slot at now: it was never taken,
// was released or expired.
func (l Lease) Free(now time.Time) bool { return l.Holder == "" || !now.Before(l.Expires) }

// IsLost reports whether err says a lease is no longer held (reason
// ReasonLost).
func IsLost(err error) bool {
	var e *errs.Error
	return errors.As(err, &e) && e.Reason == ReasonLost
}

func lostErr(l Lease, format string, args ...any) error {
	return errs.New(errs.KindFailedPrecondition, "lease %s lost: %s", l, fmt.Sprintf(format, args...)).WithReason(ReasonLost)
}

// SetDesired sets the number of slots resource needs (redundant pollers).
// Growing adds free slots; shrinking drops the slots numbered n and above,
// whose holders lose them at their next heartbeat. 0 keeps the resource
// with no pollers.
func (s *Service) SetDesired(ctx context.Context, resource string, slots int) error {
	if err := checkResource(resource); err != nil {
		return err
	}
	if slots < 0 || slots > MaxSlots {
		return errs.Invalid("slots", "desired slots %d of %q not in 0-%d", slots, resource, MaxSlots)
	}
	key := wantKey(resource)
	cur, err := s.kv.Get(ctx, key)
	switch {
	case err == nil:
		var w wantRecord
		if json.Unmarshal(cur.Value(), &w) == nil && w.Slots == slots {
			return nil
		}
	case !errors.Is(err, jetstream.ErrKeyNotFound):
		return wrapErr(err, "reading desired slots of %q", resource)
	}
	val, _ := json.Marshal(wantRecord{Resource: resource, Slots: slots})
	if _, err := s.kv.Put(ctx, key, val); err != nil {
		return wrapErr(err, "setting desired slots of %q", resource)
	}
	sn, err := s.snapshot(ctx, prefixSlot+encodeResource(resource)+".*")
	if err != nil {
		return err
	}
	for _, e := range sn.slots {
		if !e.deleted && e.lease.Slot >= slots {
			if err := s.deleteSlot(ctx, e); err != nil {
				return err
			}
		}
	}
	s.log.Info("desired slots set", "resource", resource, "slots", slots)
	return nil
}

// RemoveResource forgets resource: its desired count and all its slots;
// holders lose them at their next heartbeat. Removing an unknown resource
// is a no-op.
func (s *Service) RemoveResource(ctx context.Context, resource string) error {
	if err := checkResource(resource); err != nil {
		return err
	}
	if err := s.kv.Delete(ctx, wantKey(resource)); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		return wrapErr(err, "removing resource %q", resource)
	}
	sn, err := s.snapshot(ctx, prefixSlot+encodeResource(resource)+".*")
	if err != nil {
		return err
	}
	for _, e := range sn.slots {
		if !e.deleted {
			if err := s.deleteSlot(ctx, e); err != nil {
				return err
			}
		}
	}
	s.log.Info("resource removed", "resource", resource)
	return nil
}

// Resources returns the desired slot count of every resource.
func (s *Service) Resources(ctx context.Context) (map[string]int, error) {
	sn, err := s.snapshot(ctx, prefixWant+"*")
	if err != nil {
		return nil, err
	}
	out := make(map[string]int, len(sn.want))
	for r, w := range sn.want {
		out[r] = w.slots
	}
	return out, nil
}

// List returns every slot of every resource (free ones with Holder ""),
// ordered by resource and slot. Slots that were never acquired are not
// stored yet and not listed.
func (s *Service) List(ctx context.Context) ([]Lease, error) {
	sn, err := s.snapshot(ctx, prefixSlot+">")
	if err != nil {
		return nil, err
	}
	out := make([]Lease, 0, len(sn.slots))
	for _, e := range sn.slots {
		if !e.deleted {
			out = append(out, e.lease)
		}
	}
	sortLeases(out)
	return out, nil
}

// Acquire takes up to max free or expired slots of the resources match
// accepts (nil accepts all), at most one slot per resource for one holder
// (redundant pollers of a resource are different holders), and skips
// resources holder already holds a live slot of. Each slot is taken by a
// compare-and-set and gets a new epoch; taking a slot another holder let
// expire is a takeover. Calls for one holder must not run concurrently.
//
// If the engine fails after some slots were taken, Acquire returns those
// (and logs the failure); it returns an error only when it took nothing.
func (s *Service) Acquire(ctx context.Context, holder string, max int, match func(resource string) bool) ([]Lease, error) {
	if holder == "" {
		return nil, errs.Invalid("holder", "lease holder is empty")
	}
	if max < 1 {
		return nil, errs.Invalid("max", "lease acquire max %d is below 1", max)
	}
	if match == nil {
		match = func(string) bool { return true }
	}
	sn, err := s.snapshot(ctx, ">")
	if err != nil {
		return nil, err
	}
	now := s.cfg.Now()
	mine := map[string]bool{}
	for _, e := range sn.slots {
		if !e.deleted && e.lease.Holder == holder && !e.lease.Free(now) {
			mine[e.lease.Resource] = true
		}
	}
	resources := make([]string, 0, len(sn.want))
	for r, w := range sn.want {
		if w.slots > 0 && !mine[r] && match(r) {
			resources = append(resources, r)
		}
	}
	slices.Sort(resources)
	// Start at a random resource so that holders spread over resources
	// instead of all racing for the first one.
	if len(resources) > 1 {
		off := rand.IntN(len(resources))
		resources = append(resources[off:], resources[:off]...)
	}
	var out []Lease
	for _, r := range resources {
		if len(out) == max {
			break
		}
		l, ok, err := s.acquireOne(ctx, sn, r, sn.want[r].slots, holder, now)
		if err != nil {
			if len(out) == 0 {
				return nil, err
			}
			s.log.Warn("acquiring leases stopped early", "holder", holder, "acquired", len(out), "err", err)
			break
		}
		if ok {
			out = append(out, l)
		}
	}
	return out, nil
}

// acquireOne takes the first free slot of resource r it wins.
func (s *Service) acquireOne(ctx context.Context, sn *snapshot, r string, slots int, holder string, now time.Time) (Lease, bool, error) {
	for i := range slots {
		key := slotKey(r, i)
		prev, exists := sn.slots[key]
		var rev, epoch uint64 = 0, 1
		prevHolder := ""
		switch {
		case exists && prev.deleted:
			// A dropped slot: its delete marker's revision exceeds every
			// epoch it had.
			rev, epoch = prev.revision, prev.revision+1
		case exists:
			dead := !prev.lease.Free(now) && prev.lease.Holder != holder && s.cfg.Dead != nil && s.cfg.Dead(prev.lease.Holder)
			if !prev.lease.Free(now) && !dead {
				continue
			}
			rev, epoch = prev.revision, prev.lease.Epoch+1
			if dead || !now.Before(prev.lease.Expires) {
				prevHolder = prev.lease.Holder
			}
		}
		l := Lease{Resource: r, Slot: i, Holder: holder, Epoch: epoch, Expires: now.Add(s.cfg.Expiry)}
		newRev, err := s.kv.Update(ctx, key, encodeSlot(l), rev)
		if errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			continue // another holder won this slot
		}
		if err != nil {
			return Lease{}, false, wrapErr(err, "acquiring %s", key)
		}
		l.Revision = newRev
		s.m.acquired.Inc()
		if prevHolder != "" {
			s.m.takeovers.Inc()
			s.log.Info("lease taken over", "lease", l.String(), "previous_holder", prevHolder, "previous_epoch", epoch-1)
		} else {
			s.log.Debug("lease acquired", "lease", l.String())
		}
		return l, true, nil
	}
	return Lease{}, false, nil
}

// Reclaim takes back, each with a new epoch, up to max live slots recorded
// under holder whose resource match accepts: slots a previous incarnation
// of this holder held when it died. Holder names are unique among live
// processes and stable across a process's restarts (for `skiff dev`, the
// host and data dir, guarded by a lock on the data dir), so such slots
// have no live holder and waiting for their expiry would only delay the
// takeover. A fresh Keeper calls it once, before its first acquisition.
// The new epoch fences anything the dead incarnation might still have in
// flight.
func (s *Service) Reclaim(ctx context.Context, holder string, max int, match func(resource string) bool) ([]Lease, error) {
	if holder == "" {
		return nil, errs.Invalid("holder", "lease holder is empty")
	}
	if max < 1 {
		return nil, nil
	}
	if match == nil {
		match = func(string) bool { return true }
	}
	sn, err := s.snapshot(ctx, prefixSlot+">")
	if err != nil {
		return nil, err
	}
	now := s.cfg.Now()
	keys := make([]string, 0)
	for k, e := range sn.slots {
		if !e.deleted && e.lease.Holder == holder && !e.lease.Free(now) && match(e.lease.Resource) {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	var out []Lease
	for _, k := range keys {
		if len(out) == max {
			break
		}
		e := sn.slots[k]
		l := e.lease
		l.Epoch++
		l.Expires = now.Add(s.cfg.Expiry)
		rev, err := s.kv.Update(ctx, k, encodeSlot(l), e.revision)
		if errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			continue // changed since the snapshot: not ours to reclaim
		}
		if err != nil {
			if len(out) == 0 {
				return nil, wrapErr(err, "reclaiming %s", k)
			}
			s.log.Warn("reclaiming leases stopped early", "holder", holder, "reclaimed", len(out), "err", err)
			break
		}
		l.Revision = rev
		s.m.acquired.Inc()
		s.m.takeovers.Inc()
		s.log.Info("lease reclaimed from a previous incarnation", "lease", l.String(), "previous_epoch", l.Epoch-1)
		out = append(out, l)
	}
	return out, nil
}

// Heartbeat extends l by the expiry from now and returns the stored lease.
// It fails with reason ReasonLost (KindFailedPrecondition) if l's holder
// and epoch no longer hold the slot, or l expired: an expired lease is
// never revived, its holder must acquire again (with a new epoch).
func (s *Service) Heartbeat(ctx context.Context, l Lease) (Lease, error) {
	if err := checkLease(l); err != nil {
		return Lease{}, err
	}
	now := s.cfg.Now()
	for range casAttempts {
		// Always decide on the stored slot, never on the caller's copy.
		cur, err := s.get(ctx, l)
		if err != nil {
			return Lease{}, err
		}
		if err := held(l, cur, now); err != nil {
			return Lease{}, err
		}
		next := cur
		next.Expires = now.Add(s.cfg.Expiry)
		rev, err := s.kv.Update(ctx, l.Key(), encodeSlot(next), cur.Revision)
		if err == nil {
			next.Revision = rev
			return next, nil
		}
		if !errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			return Lease{}, wrapErr(err, "heartbeating %s", l.Key())
		}
	}
	return Lease{}, errs.Conflict("heartbeating %s: lost %d compare-and-set races", l.Key(), casAttempts)
}

// Release gives l's slot back (free, same epoch; the next holder gets a
// higher one). Releasing a lease that is no longer held is a no-op.
func (s *Service) Release(ctx context.Context, l Lease) error {
	if err := checkLease(l); err != nil {
		return err
	}
	for range casAttempts {
		cur, err := s.get(ctx, l)
		if IsLost(err) {
			return nil
		}
		if err != nil {
			return err
		}
		if cur.Holder != l.Holder || cur.Epoch != l.Epoch {
			return nil
		}
		next := cur
		next.Holder, next.Expires = "", time.Time{}
		_, err = s.kv.Update(ctx, l.Key(), encodeSlot(next), cur.Revision)
		if err == nil {
			s.log.Debug("lease released", "lease", l.String())
			return nil
		}
		if !errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			return wrapErr(err, "releasing %s", l.Key())
		}
	}
	return errs.Conflict("releasing %s: lost %d compare-and-set races", l.Key(), casAttempts)
}

// Check is the fencing test before a side effect (ack, checkpoint): it
// returns nil only if l's holder and epoch hold the slot now and it has not
// expired; otherwise an error with reason ReasonLost.
func (s *Service) Check(ctx context.Context, l Lease) error {
	if err := checkLease(l); err != nil {
		return err
	}
	cur, err := s.get(ctx, l)
	if err != nil {
		return err
	}
	return held(l, cur, s.cfg.Now())
}

// held reports whether cur (the stored slot) is still l's at now.
func held(l, cur Lease, now time.Time) error {
	switch {
	case cur.Holder == "":
		return lostErr(l, "the slot was released or made available")
	case cur.Holder != l.Holder || cur.Epoch != l.Epoch:
		return lostErr(l, "the slot is held by %q at epoch %d", cur.Holder, cur.Epoch)
	case !now.Before(cur.Expires):
		return lostErr(l, "it expired at %s", cur.Expires.Format(time.RFC3339Nano))
	}
	return nil
}

// get reads l's slot; a slot that is gone is a lost lease.
func (s *Service) get(ctx context.Context, l Lease) (Lease, error) {
	e, err := s.kv.Get(ctx, l.Key())
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return Lease{}, lostErr(l, "the slot was removed")
	}
	if err != nil {
		return Lease{}, wrapErr(err, "reading %s", l.Key())
	}
	cur, err := decodeSlot(e)
	if err != nil {
		return Lease{}, err
	}
	return cur, nil
}

// Sweep is the periodic health check: it makes expired slots available
// (free, same epoch), deletes slots above their resource's desired count
// or of removed resources, and updates the slot metrics. It returns how
// many expired slots it freed. Lost compare-and-set races are skipped: the
// winner acted on the slot.
func (s *Service) Sweep(ctx context.Context) (int, error) {
	sn, err := s.snapshot(ctx, ">")
	if err != nil {
		return 0, err
	}
	now := s.cfg.Now()
	s.m.sweeps.Inc()
	freed, heldN := 0, 0
	for _, e := range sn.slots {
		if e.deleted {
			continue
		}
		l := e.lease
		w, ok := sn.want[l.Resource]
		if !ok || l.Slot >= w.slots {
			if err := s.deleteSlot(ctx, e); err != nil {
				return freed, err
			}
			continue
		}
		if l.Holder == "" {
			continue
		}
		if now.Before(l.Expires) {
			heldN++
			continue
		}
		next := l
		next.Holder, next.Expires = "", time.Time{}
		_, err := s.kv.Update(ctx, l.Key(), encodeSlot(next), e.revision)
		switch {
		case errors.Is(err, jetstream.ErrKeyRevisionMismatch):
			continue
		case err != nil:
			return freed, wrapErr(err, "freeing expired %s", l.Key())
		}
		freed++
		s.m.expired.Inc()
		s.log.Info("expired lease made available", "lease", l.String(), "expired", l.Expires)
	}
	// Desired slots never acquired have no key yet: they are free too.
	desired := 0
	for _, w := range sn.want {
		desired += w.slots
	}
	freeN := max(0, desired-heldN)
	s.m.slots.WithLabelValues("held").Set(float64(heldN))
	s.m.slots.WithLabelValues("free").Set(float64(freeN))
	return freed, nil
}

// RunSweeper runs Sweep every interval (0 means the expiry) until ctx ends.
func (s *Service) RunSweeper(ctx context.Context, interval time.Duration) error {
	if interval <= 0 {
		interval = s.cfg.Expiry
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if _, err := s.Sweep(ctx); err != nil && ctx.Err() == nil {
			s.log.Warn("lease health check failed", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

func (s *Service) deleteSlot(ctx context.Context, e slotEntry) error {
	err := s.kv.Delete(ctx, e.lease.Key(), jetstream.LastRevision(e.revision))
	switch {
	case errors.Is(err, jetstream.ErrKeyRevisionMismatch):
		// Changed since the snapshot: delete whatever is there now, the
		// slot is not wanted either way.
		err = s.kv.Delete(ctx, e.lease.Key())
	case err == nil:
		s.log.Debug("lease slot dropped", "lease", e.lease.String())
		return nil
	}
	if err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		return wrapErr(err, "dropping %s", e.lease.Key())
	}
	return nil
}

// Stored values.

type wantRecord struct {
	Resource string `json:"resource"`
	Slots    int    `json:"slots"`
}

type slotRecord struct {
	Resource string `json:"resource"`
	Slot     int    `json:"slot"`
	Holder   string `json:"holder,omitempty"`
	Epoch    uint64 `json:"epoch"`
	Expires  int64  `json:"expires_unix_nano,omitempty"`
}

func encodeSlot(l Lease) []byte {
	r := slotRecord{Resource: l.Resource, Slot: l.Slot, Holder: l.Holder, Epoch: l.Epoch}
	if !l.Expires.IsZero() {
		r.Expires = l.Expires.UnixNano()
	}
	b, _ := json.Marshal(r)
	return b
}

func decodeSlot(e jetstream.KeyValueEntry) (Lease, error) {
	var r slotRecord
	if err := json.Unmarshal(e.Value(), &r); err != nil {
		return Lease{}, errs.Internal("decoding lease %s: %w", e.Key(), err)
	}
	l := Lease{Resource: r.Resource, Slot: r.Slot, Holder: r.Holder, Epoch: r.Epoch, Revision: e.Revision()}
	if r.Expires != 0 {
		l.Expires = time.Unix(0, r.Expires)
	}
	return l, nil
}

func encodeResource(r string) string { return base64.RawURLEncoding.EncodeToString([]byte(r)) }

func wantKey(r string) string { return prefixWant + encodeResource(r) }

func slotKey(r string, slot int) string {
	return prefixSlot + encodeResource(r) + "." + strconv.Itoa(slot)
}

// parseSlotKey returns the resource and slot a slot key names.
func parseSlotKey(key string) (string, int, bool) {
	rest, ok := strings.CutPrefix(key, prefixSlot)
	if !ok {
		return "", 0, false
	}
	enc, num, ok := strings.Cut(rest, ".")
	if !ok {
		return "", 0, false
	}
	r, err := base64.RawURLEncoding.DecodeString(enc)
	if err != nil {
		return "", 0, false
	}
	slot, err := strconv.Atoi(num)
	if err != nil || slot < 0 {
		return "", 0, false
	}
	return string(r), slot, true
}

// snapshot is the bucket's content (or a filtered part) at one moment.
type snapshot struct {
	want  map[string]wantEntry // by resource; live entries only
	slots map[string]slotEntry // by key; delete markers too
}

type wantEntry struct {
	slots    int
	revision uint64
}

type slotEntry struct {
	lease    Lease // Resource and Slot only when deleted
	revision uint64
	deleted  bool
}

// snapshot reads the latest entry of every key matching filter, delete
// markers included.
func (s *Service) snapshot(ctx context.Context, filter string) (*snapshot, error) {
	w, err := s.kv.Watch(ctx, filter)
	if err != nil {
		return nil, wrapErr(err, "reading leases")
	}
	defer func() { _ = w.Stop() }()
	sn := &snapshot{want: map[string]wantEntry{}, slots: map[string]slotEntry{}}
	for {
		var e jetstream.KeyValueEntry
		select {
		case <-ctx.Done():
			return nil, wrapErr(ctx.Err(), "reading leases")
		case e = <-w.Updates():
		}
		if e == nil {
			return sn, nil
		}
		deleted := e.Operation() != jetstream.KeyValuePut
		switch {
		case strings.HasPrefix(e.Key(), prefixWant):
			if deleted {
				delete(sn.want, decodeWantKey(e.Key()))
				continue
			}
			var r wantRecord
			if err := json.Unmarshal(e.Value(), &r); err != nil {
				s.log.Warn("skipping undecodable desired slots", "key", e.Key(), "err", err)
				continue
			}
			sn.want[r.Resource] = wantEntry{slots: r.Slots, revision: e.Revision()}
		case strings.HasPrefix(e.Key(), prefixSlot):
			if deleted {
				r, slot, ok := parseSlotKey(e.Key())
				if !ok {
					continue
				}
				sn.slots[e.Key()] = slotEntry{lease: Lease{Resource: r, Slot: slot}, revision: e.Revision(), deleted: true}
				continue
			}
			l, err := decodeSlot(e)
			if err != nil {
				s.log.Warn("skipping undecodable lease", "key", e.Key(), "err", err)
				continue
			}
			sn.slots[e.Key()] = slotEntry{lease: l, revision: e.Revision()}
		}
	}
}

func decodeWantKey(key string) string {
	r, _ := base64.RawURLEncoding.DecodeString(strings.TrimPrefix(key, prefixWant))
	return string(r)
}

func sortLeases(ls []Lease) {
	slices.SortFunc(ls, func(a, b Lease) int {
		if c := strings.Compare(a.Resource, b.Resource); c != 0 {
			return c
		}
		return a.Slot - b.Slot
	})
}

func checkResource(r string) error {
	if r == "" {
		return errs.Invalid("resource", "lease resource is empty")
	}
	if len(r) > MaxResourceLen {
		return errs.Invalid("resource", "lease resource is %d bytes, more than %d", len(r), MaxResourceLen)
	}
	return nil
}

func checkLease(l Lease) error {
	if err := checkResource(l.Resource); err != nil {
		return err
	}
	switch {
	case l.Holder == "":
		return errs.Invalid("holder", "lease %s has no holder", l.Key())
	case l.Slot < 0:
		return errs.Invalid("slot", "lease slot %d is negative", l.Slot)
	case l.Epoch == 0:
		return errs.Invalid("epoch", "lease %s has no epoch", l.Key())
	}
	return nil
}

// wrapErr maps an engine error: context errors keep their kind, anything
// else is Unavailable (the engine could not serve).
func wrapErr(err error, format string, args ...any) error {
	switch {
	case errors.Is(err, context.Canceled):
		return errs.New(errs.KindCanceled, format+": %w", append(args, err)...)
	case errors.Is(err, context.DeadlineExceeded):
		return errs.New(errs.KindDeadlineExceeded, format+": %w", append(args, err)...)
	}
	return errs.Unavailable(format+": %w", append(args, err)...)
}
