package streams

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"skiff.dev/skiff/gateway/lease"
	"skiff.dev/skiff/internal/errs"
)

// ReasonStale is the errs reason of a rejected (fenced) checkpoint write.
const ReasonStale = "checkpoint_stale"

const (
	prefixCheckpoint = "cp."
	prefixOrigin     = "origin."
	casAttempts      = 5
)

// Checkpoint is the progress of one lane.
type Checkpoint struct {
	// Seq is the stream sequence at or below which every record of the
	// lane is done.
	Seq uint64 `json:"sequence"`
	// Epoch is the lease epoch of the writer.
	Epoch  uint64 `json:"epoch"`
	Holder string `json:"holder,omitempty"`
	// Ended says the lane reached the end of its closed shard.
	Ended bool `json:"ended,omitempty"`
	// Window is the open tumbling window and its state.
	Window *Window `json:"window,omitempty"`

	revision uint64
}

// Window is a tumbling window's bounds and the state the function
// returned for it so far.
type Window struct {
	Start time.Time       `json:"start"`
	End   time.Time       `json:"end"`
	State json.RawMessage `json:"state,omitempty"`
}

// checkpoints is the "checkpoints" bucket.
type checkpoints struct{ kv jetstream.KeyValue }

func openCheckpoints(ctx context.Context, js jetstream.JetStream) (*checkpoints, error) {
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      Bucket,
		Description: "skiff stream checkpoints: progress per mapping, shard and lane",
		History:     1,
		Storage:     jetstream.FileStorage,
	})
	if err != nil {
		return nil, errs.Unavailable("opening kv bucket %s: %w", Bucket, err)
	}
	return &checkpoints{kv: kv}, nil
}

func checkpointKey(l lane) string {
	return prefixCheckpoint + l.uuid + "." + l.shard + "." + strconv.Itoa(l.n)
}

// get reads a lane's checkpoint; ok is false when there is none.
func (c *checkpoints) get(ctx context.Context, l lane) (Checkpoint, bool, error) {
	e, err := c.kv.Get(ctx, checkpointKey(l))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return Checkpoint{}, false, nil
	}
	if err != nil {
		return Checkpoint{}, false, errs.Unavailable("reading checkpoint %s: %w", checkpointKey(l), err)
	}
	cp, err := decodeCheckpoint(e)
	return cp, err == nil, err
}

func decodeCheckpoint(e jetstream.KeyValueEntry) (Checkpoint, error) {
	var cp Checkpoint
	if err := json.Unmarshal(e.Value(), &cp); err != nil {
		return Checkpoint{}, errs.Internal("decoding checkpoint %s: %w", e.Key(), err)
	}
	cp.revision = e.Revision()
	return cp, nil
}

// mapping returns the checkpoints of every lane of a mapping, by
// "<shard>.<lane>".
func (c *checkpoints) mapping(ctx context.Context, uuid string) (map[string]Checkpoint, error) {
	w, err := c.kv.Watch(ctx, prefixCheckpoint+uuid+".>", jetstream.IgnoreDeletes())
	if err != nil {
		return nil, errs.Unavailable("reading checkpoints of %s: %w", uuid, err)
	}
	defer func() { _ = w.Stop() }()
	out := map[string]Checkpoint{}
	for {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case e := <-w.Updates():
			if e == nil {
				return out, nil
			}
			cp, err := decodeCheckpoint(e)
			if err != nil {
				continue
			}
			out[strings.TrimPrefix(e.Key(), prefixCheckpoint+uuid+".")] = cp
		}
	}
}

// fence is the lease check a write runs before it lands.
type fence func(ctx context.Context) error

// commit writes next for lane l, compare-and-set and fenced: it fails
// with reason ReasonStale when the stored checkpoint has a higher epoch,
// when check fails (the writer lost its lease), or when next would move
// the checkpoint backward within one epoch. A write with a higher epoch
// than the stored one keeps the higher of the two sequences (a stale
// holder may have advanced it before the new holder fenced it out).
func (c *checkpoints) commit(ctx context.Context, l lane, next Checkpoint, check fence) (Checkpoint, error) {
	return c.commitFrom(ctx, l, Checkpoint{}, next, check)
}

// commitFrom is commit when the caller knows the stored checkpoint: last,
// the checkpoint its previous commit returned (zero when none). The first
// attempt then skips reading it: the write is compare-and-set on last's
// revision, so it lands only when last is still what is stored, and the
// checks run on last are the checks commit runs on what it reads. When
// the stored checkpoint has moved on, commitFrom reads it and goes on as
// commit.
func (c *checkpoints) commitFrom(ctx context.Context, l lane, last, next Checkpoint, check fence) (Checkpoint, error) {
	key := checkpointKey(l)
	for range casAttempts {
		var (
			cur Checkpoint
			err error
		)
		exists := last.revision != 0
		if exists {
			cur, last = last, Checkpoint{}
		} else {
			if cur, exists, err = c.get(ctx, l); err != nil {
				return Checkpoint{}, err
			}
		}
		if exists {
			switch {
			case cur.Epoch > next.Epoch:
				return Checkpoint{}, staleErr("checkpoint %s is held at epoch %d, the write has epoch %d", key, cur.Epoch, next.Epoch)
			case cur.Ended && !next.Ended:
				return Checkpoint{}, staleErr("checkpoint %s is at shard end", key)
			case cur.Epoch == next.Epoch && cur.Seq > next.Seq:
				return Checkpoint{}, staleErr("checkpoint %s would move backward from %d to %d", key, cur.Seq, next.Seq)
			case cur.Seq > next.Seq:
				next.Seq = cur.Seq
			}
		}
		if check != nil {
			if err := check(ctx); err != nil {
				return Checkpoint{}, staleErr("checkpoint %s: %v", key, err)
			}
		}
		b, _ := json.Marshal(next)
		var rev uint64
		if exists {
			rev, err = c.kv.Update(ctx, key, b, cur.revision)
		} else {
			rev, err = c.kv.Create(ctx, key, b)
		}
		if errors.Is(err, jetstream.ErrKeyRevisionMismatch) || errors.Is(err, jetstream.ErrKeyExists) {
			continue
		}
		if err != nil {
			return Checkpoint{}, errs.Unavailable("writing checkpoint %s: %w", key, err)
		}
		next.revision = rev
		return next, nil
	}
	return Checkpoint{}, errs.Conflict("writing checkpoint %s: lost %d compare-and-set races", key, casAttempts)
}

func staleErr(format string, args ...any) error {
	return errs.New(errs.KindFailedPrecondition, format, args...).WithReason(ReasonStale)
}

// IsStale reports whether err is a fenced checkpoint write.
func IsStale(err error) bool {
	var e *errs.Error
	return errors.As(err, &e) && e.Reason == ReasonStale || lease.IsLost(err)
}

// origin returns the time a mapping was first seen (LATEST starts
// there), storing now when it has none yet; the first writer wins.
func (c *checkpoints) origin(ctx context.Context, uuid string, now time.Time) (time.Time, error) {
	key := prefixOrigin + uuid
	for range casAttempts {
		e, err := c.kv.Get(ctx, key)
		if err == nil {
			t, perr := time.Parse(time.RFC3339Nano, string(e.Value()))
			if perr != nil {
				return time.Time{}, errs.Internal("decoding %s: %w", key, perr)
			}
			return t, nil
		}
		if !errors.Is(err, jetstream.ErrKeyNotFound) {
			return time.Time{}, errs.Unavailable("reading %s: %w", key, err)
		}
		_, err = c.kv.Create(ctx, key, []byte(now.UTC().Format(time.RFC3339Nano)))
		if err == nil {
			return now, nil
		}
		if !errors.Is(err, jetstream.ErrKeyExists) {
			return time.Time{}, errs.Unavailable("writing %s: %w", key, err)
		}
	}
	return time.Time{}, errs.Conflict("writing %s: lost %d races", key, casAttempts)
}

// purge deletes every checkpoint and the origin of a mapping.
func (c *checkpoints) purge(ctx context.Context, uuid string) error {
	cps, err := c.mapping(ctx, uuid)
	if err != nil {
		return err
	}
	var list []error
	for k := range cps {
		if err := c.kv.Purge(ctx, prefixCheckpoint+uuid+"."+k); err != nil {
			list = append(list, err)
		}
	}
	if err := c.kv.Purge(ctx, prefixOrigin+uuid); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		list = append(list, err)
	}
	return errors.Join(list...)
}
