package streams

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/lease"
	"skiff.dev/skiff/internal/errs"
)

// trackLoop resyncs the lane resources at once, on every trigger and every
// ShardSyncInterval, until ctx ends or a component fails.
func (s *Service) trackLoop(ctx context.Context, errc <-chan error) error {
	for {
		if err := s.track(ctx); err != nil && ctx.Err() == nil {
			s.log.Warn("tracking stream shards", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case err := <-errc:
			return err
		case <-s.trigger:
		case <-s.cfg.After(s.cfg.ShardSyncInterval):
		}
	}
}

// track sets the lane resources to what the mappings and their shards
// want, and keeps one watcher per stream of an enabled mapping.
func (s *Service) track(ctx context.Context) error {
	s.mu.Lock()
	ms := make([]*skiffv1.EventSourceMapping, 0, len(s.mappings))
	for id, m := range s.mappings {
		_ = id
		ms = append(ms, m)
	}
	s.mu.Unlock()
	want := map[string]bool{}
	streams := map[string]bool{}
	var list []error
	for _, m := range ms {
		if !m.GetEnabled() {
			continue
		}
		lanes, err := s.wantedLanes(ctx, m)
		if err != nil {
			list = append(list, fmt.Errorf("mapping %s: %w", m.GetUuid(), err))
			// Keep what it has: a failed listing is no reason to stop.
			lanes = nil
			s.keepExisting(ctx, m.GetUuid(), want)
		}
		for _, l := range lanes {
			want[l.resource()] = true
		}
		if m.GetEnabled() {
			streams[m.GetStream()] = true
		}
	}
	s.syncWatches(ctx, streams)
	have, err := s.ls.Resources(ctx)
	if err != nil {
		return errors.Join(append(list, err)...)
	}
	added := false
	for r := range want {
		if _, ok := have[r]; !ok {
			if err := s.ls.SetDesired(ctx, r, 1); err != nil {
				list = append(list, err)
			} else {
				added = true
			}
		}
	}
	if added {
		// New lanes: acquire them now rather than at the next tick.
		select {
		case s.keepNow <- struct{}{}:
		default:
		}
	}
	for r := range have {
		if !want[r] && strings.HasPrefix(r, ResourcePrefix) {
			if err := s.ls.RemoveResource(ctx, r); err != nil {
				list = append(list, err)
			}
		}
	}
	return errors.Join(list...)
}

// keepExisting adds the current resources of a mapping to want (used when
// its shards could not be listed).
func (s *Service) keepExisting(ctx context.Context, uuid string, want map[string]bool) {
	have, err := s.ls.Resources(ctx)
	if err != nil {
		return
	}
	for r := range have {
		if l, ok := parseResource(r); ok && l.uuid == uuid {
			want[r] = true
		}
	}
}

// wantedLanes returns the lanes of m that should be polled now: every lane
// not at shard end of every shard whose listed parents are all at shard
// end. A mapping whose stream is gone is disabled.
func (s *Service) wantedLanes(ctx context.Context, m *skiffv1.EventSourceMapping) ([]lane, error) {
	id := m.GetUuid()
	shards, err := s.data.Shards(ctx, m.GetStream())
	if errs.IsNotFound(err) {
		return nil, s.disable(ctx, id, fmt.Sprintf("stream %s was deleted", m.GetStream()))
	}
	if err != nil {
		return nil, err
	}
	// First sight: fix the LATEST origin before any lane starts.
	if _, err := s.cps.origin(ctx, id, s.cfg.Now()); err != nil {
		return nil, err
	}
	cps, err := s.cps.mapping(ctx, id)
	if err != nil {
		return nil, err
	}
	p := lanes(m)
	listed := make(map[string]bool, len(shards))
	for _, sh := range shards {
		listed[sh.GetShardId()] = true
	}
	ended := func(shard string) bool {
		for i := range p {
			if !cps[shard+"."+strconv.Itoa(i)].Ended {
				return false
			}
		}
		return true
	}
	var out []lane
	for _, sh := range shards {
		sid := sh.GetShardId()
		if ended(sid) {
			continue
		}
		ready := true
		for _, parent := range []string{sh.GetParentShardId(), sh.GetAdjacentParentShardId()} {
			if parent != "" && listed[parent] && !ended(parent) {
				ready = false
			}
		}
		if !ready {
			continue
		}
		for i := range p {
			if !cps[sid+"."+strconv.Itoa(i)].Ended {
				out = append(out, lane{uuid: id, shard: sid, n: i})
			}
		}
	}
	return out, nil
}

// lanes is a mapping's parallelization factor.
func lanes(m *skiffv1.EventSourceMapping) int {
	return max(1, int(m.GetParallelizationFactor()))
}

// syncWatches keeps one watcher per stream in streams (when the store can
// watch): a signal wakes the stream's pollers and, when the shards
// changed, resyncs the resources.
func (s *Service) syncWatches(ctx context.Context, streams map[string]bool) {
	wt, ok := s.data.(Watcher)
	if !ok {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.running {
		return
	}
	for st, cancel := range s.watches {
		if !streams[st] {
			cancel()
			delete(s.watches, st)
		}
	}
	for st := range streams {
		if _, ok := s.watches[st]; ok {
			continue
		}
		wctx, cancel := context.WithCancel(s.runCtx)
		s.watches[st] = cancel
		go s.watchStream(wctx, wt, st)
	}
}

func (s *Service) watchStream(ctx context.Context, wt Watcher, stream string) {
	ch, err := wt.Watch(ctx, stream)
	if err != nil {
		if ctx.Err() == nil {
			s.log.Warn("watching a stream: polling only", "stream", stream, "err", err)
		}
		return
	}
	last := ""
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-ch:
			if !ok {
				return
			}
		}
		s.wake(stream)
		shards, err := s.data.Shards(ctx, stream)
		if err != nil {
			s.kick()
			continue
		}
		fp := shardPrint(shards)
		if fp != last {
			if last != "" {
				s.kick()
			}
			last = fp
		}
	}
}

// shardPrint summarises the shard set and which shards are open.
func shardPrint(shards []*skiffv1.Shard) string {
	var b strings.Builder
	for _, sh := range shards {
		b.WriteString(sh.GetShardId())
		if sh.GetOpen() {
			b.WriteByte('+')
		}
		b.WriteByte(',')
	}
	return b.String()
}

// ShardEnded is the call a poller makes when its lane reached the end of
// its closed shard: it checkpoints the end (fenced by l) and resyncs the
// resources, which drops the lane and, once every lane of every parent
// ended, starts the children.
func (s *Service) ShardEnded(ctx context.Context, l lease.Lease, seq uint64) error {
	ln, ok := parseResource(l.Resource)
	if !ok {
		return errs.Invalid("resource", "%q is not a stream lane", l.Resource)
	}
	_, err := s.cps.commit(ctx, ln, Checkpoint{Seq: seq, Epoch: l.Epoch, Holder: l.Holder, Ended: true}, func(ctx context.Context) error { return s.ls.Check(ctx, l) })
	if err != nil {
		return err
	}
	s.met.shardEnds.Inc()
	s.log.Info("shard end reached", "uuid", ln.uuid, "shard", ln.shard, "lane", ln.n, "sequence", seq)
	s.kick()
	return nil
}
