package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/nats-io/nats.go/jetstream"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/async"
	"skiff.dev/skiff/gateway/destinations"
	"skiff.dev/skiff/gateway/frontend"
	"skiff.dev/skiff/gateway/store"
)

// Names the async phases use in each skiff dev.
const (
	sinkFunction  = "sink"  // the accept phase's events go here (echo)
	clockFunction = "clock" // the end-to-end phase's (action "now")
	recordsQueue  = "bench-records"
)

// clockPayload makes the test function answer its start time ({"t": ns}).
var clockPayload = []byte(`{"action":"now"}`)

// load is one closed-loop load's outcome: clients sending back to back.
type load struct {
	events    int
	perSecond float64
	lat       latencies
}

// e2eResult is the end-to-end phase's outcome.
type e2eResult struct {
	sent     int
	rate     float64   // achieved send rate, events/s
	lat      latencies // client send of the accept → the function's handler start
	accept   latencies // accept latency of the same events
	missing  int       // accepted events with no success record in time
	stats    phaseStats
	bySecond []time.Duration // p50 of the events sent in each second
}

// phaseStats are counters of skiff dev over one phase: sandboxes started
// and poller attempts that hit a throttle or platform error (and were put
// back with a delay).
type phaseStats struct {
	coldStarts, retries, leaseLosses int
}

func (a phaseStats) minus(b phaseStats) phaseStats {
	return phaseStats{coldStarts: a.coldStarts - b.coldStarts, retries: a.retries - b.retries, leaseLosses: a.leaseLosses - b.leaseLosses}
}

// asyncResult is what the async phases measured at one durability.
type asyncResult struct {
	durability string
	raw        load       // JetStream's own synchronous publish
	accept     load       // EVENT invokes through skiff's front end
	dryRun     load       // DRY_RUN invokes: the front end alone, nothing stored or run
	acceptStat phaseStats // from the first accept until the pollers are done
	drain      time.Duration
	e2e        e2eResult
}

// ratio is the accept rate over raw JetStream's.
func (a asyncResult) ratio() float64 {
	if a.raw.perSecond == 0 {
		return 0
	}
	return a.accept.perSecond / a.raw.perSecond
}

// benchAsync measures, for each durability, JetStream's own publish rate on
// a plain stream in an embedded server of its own, then skiff dev with that
// durability: the accept rate of EVENT invokes, the time its pollers take
// to drain them, and the end-to-end latency at a steady rate.
func benchAsync(ctx context.Context, cfg config, fn *function, progress func(string)) ([]asyncResult, error) {
	var out []asyncResult
	for _, d := range cfg.durability {
		res := asyncResult{durability: string(d)}
		progress(fmt.Sprintf("async %s: JetStream publish, plain stream (%d clients × %d)", d, cfg.asyncClients, cfg.asyncEvents))
		var err error
		if res.raw, err = benchRawPublish(ctx, d.SyncAlways(), cfg.asyncClients, cfg.asyncEvents); err != nil {
			return nil, fmt.Errorf("raw JetStream (%s): %w", d, err)
		}
		if err := benchAsyncSkiff(ctx, cfg, fn, d, &res, progress); err != nil {
			return nil, fmt.Errorf("async %s: %w", d, err)
		}
		out = append(out, res)
	}
	return out, nil
}

// benchAsyncSkiff runs one durability's phases against a fresh skiff dev.
func benchAsyncSkiff(ctx context.Context, cfg config, fn *function, d async.Durability, res *asyncResult, progress func(string)) (err error) {
	progress(fmt.Sprintf("async %s: starting skiff dev", d))
	s, err := startSkiff(ctx, cfg.acceptGzip, string(d))
	if err != nil {
		return err
	}
	defer func() {
		progress(fmt.Sprintf("async %s: stopping skiff dev", d))
		err = errors.Join(err, s.close())
	}()
	for _, name := range []string{sinkFunction, clockFunction} {
		if err := s.createFunction(ctx, name, fn); err != nil {
			return err
		}
	}
	if _, err := s.queues.CreateQueue(ctx, connect.NewRequest(&skiffv1.CreateQueueRequest{Name: recordsQueue})); err != nil {
		return fmt.Errorf("creating queue %s: %w", recordsQueue, err)
	}
	if _, err := s.fns.PutFunctionEventInvokeConfig(ctx, connect.NewRequest(&skiffv1.PutFunctionEventInvokeConfigRequest{
		FunctionName: clockFunction,
		Config:       &skiffv1.EventInvokeConfig{OnSuccess: "queue:" + recordsQueue},
	})); err != nil {
		return fmt.Errorf("putting the event invoke config of %s: %w", clockFunction, err)
	}

	// Warm up: connections, the pollers' assignments, a sandbox of each
	// function; then wait until the pollers are idle.
	progress(fmt.Sprintf("async %s: warming up (pollers, sandboxes, connections)", d))
	warm := cfg.asyncClients * 20
	if _, err := closedLoop(ctx, cfg.asyncClients, 20, func(ctx context.Context, c, i int) error {
		return s.accept(ctx, sinkFunction, echoPayload, fmt.Sprintf("warm-%d-%d", c, i))
	}); err != nil {
		return err
	}
	for i := range 10 {
		if err := s.accept(ctx, clockFunction, clockPayload, fmt.Sprintf("warm-clock-%d", i)); err != nil {
			return err
		}
	}
	succeeded := warm + 10
	if _, err := s.waitProcessed(ctx, succeeded, time.Minute); err != nil {
		return err
	}

	progress(fmt.Sprintf("async %s: front end alone, %d clients × %d DRY_RUN invokes", d, cfg.asyncClients, cfg.asyncEvents))
	if res.dryRun, err = closedLoop(ctx, cfg.asyncClients, cfg.asyncEvents, func(ctx context.Context, _, _ int) error {
		return s.dryRun(ctx, sinkFunction)
	}); err != nil {
		return err
	}

	progress(fmt.Sprintf("async %s: accept, %d clients × %d EVENT invokes", d, cfg.asyncClients, cfg.asyncEvents))
	stopProf, err := asyncProfile(cfg, d, "accept")
	if err != nil {
		return err
	}
	before, err := s.phaseStats(ctx)
	if err != nil {
		return err
	}
	began := time.Now()
	res.accept, err = closedLoop(ctx, cfg.asyncClients, cfg.asyncEvents, func(ctx context.Context, c, i int) error {
		return s.accept(ctx, sinkFunction, echoPayload, fmt.Sprintf("a-%d-%d", c, i))
	})
	stopProf()
	if err != nil {
		return err
	}
	succeeded += res.accept.events
	progress(fmt.Sprintf("async %s: waiting for the pollers to process the backlog", d))
	done, err := s.waitProcessed(ctx, succeeded, 3*time.Minute)
	if err != nil {
		return err
	}
	res.drain = done.Sub(began)
	after, err := s.phaseStats(ctx)
	if err != nil {
		return err
	}
	res.acceptStat = after.minus(before)

	progress(fmt.Sprintf("async %s: end to end at %d events/s for %s (after 1s unmeasured)", d, cfg.e2eRate, cfg.e2eDuration))
	if _, _, _, err := s.paced(ctx, "w-", cfg.e2eRate, time.Second); err != nil {
		return err
	}
	succeeded += cfg.e2eRate
	if _, err := s.waitProcessed(ctx, succeeded, time.Minute); err != nil {
		return err
	}
	if stopProf, err = asyncProfile(cfg, d, "e2e"); err != nil {
		return err
	}
	if before, err = s.phaseStats(ctx); err != nil {
		return err
	}
	sent, acceptLat, rate, err := s.paced(ctx, "e-", cfg.e2eRate, cfg.e2eDuration)
	stopProf()
	if err != nil {
		return err
	}
	starts, err := s.collectStarts(ctx, sent, time.Minute)
	if err != nil {
		return err
	}
	if after, err = s.phaseStats(ctx); err != nil {
		return err
	}
	var first time.Time
	for _, t0 := range sent {
		if first.IsZero() || t0.Before(first) {
			first = t0
		}
	}
	var e2e []time.Duration
	secs := make([][]time.Duration, int(cfg.e2eDuration/time.Second)+1)
	for id, t0 := range sent {
		if t, ok := starts[id]; ok {
			v := time.Unix(0, t).Sub(t0)
			e2e = append(e2e, v)
			i := min(int(t0.Sub(first)/time.Second), len(secs)-1)
			secs[i] = append(secs[i], v)
		}
	}
	var bySecond []time.Duration
	for _, v := range secs {
		if len(v) > 0 {
			bySecond = append(bySecond, summarize(v).p50)
		}
	}
	res.e2e = e2eResult{sent: len(sent), rate: rate, lat: summarize(e2e), accept: summarize(acceptLat), missing: len(sent) - len(e2e), stats: after.minus(before), bySecond: bySecond}
	return nil
}

// asyncProfile starts a CPU profile of one async phase when -asyncprofile
// asks for it; stop ends it.
func asyncProfile(cfg config, d async.Durability, phase string) (stop func(), err error) {
	if cfg.asyncProf == "" {
		return func() {}, nil
	}
	return startProfile(fmt.Sprintf("%s.%s.%s.pprof", cfg.asyncProf, d, phase))
}

// accept sends one EVENT invoke with the given request id and checks that
// it was accepted (202 with that id).
func (s *skiff) accept(ctx context.Context, name string, payload []byte, id string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req := connect.NewRequest(&skiffv1.InvokeRequest{FunctionName: name, Payload: payload, InvocationType: skiffv1.InvocationType_INVOCATION_TYPE_EVENT})
	req.Header().Set(frontend.AsyncRequestIDHeader, id)
	resp, err := s.inv.Invoke(ctx, req)
	if err != nil {
		return fmt.Errorf("async invoke of %s: %w", name, err)
	}
	if resp.Msg.GetStatusCode() != http.StatusAccepted || resp.Msg.GetRequestId() != id {
		return fmt.Errorf("async invoke of %s: got status %d, request id %q, want 202 and %q", name, resp.Msg.GetStatusCode(), resp.Msg.GetRequestId(), id)
	}
	return nil
}

// dryRun sends one DRY_RUN invoke (validated and authorized by the front
// end, nothing run) and checks the 204.
func (s *skiff) dryRun(ctx context.Context, name string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	resp, err := s.inv.Invoke(ctx, connect.NewRequest(&skiffv1.InvokeRequest{FunctionName: name, Payload: echoPayload, InvocationType: skiffv1.InvocationType_INVOCATION_TYPE_DRY_RUN}))
	if err != nil {
		return fmt.Errorf("dry run of %s: %w", name, err)
	}
	if resp.Msg.GetStatusCode() != http.StatusNoContent {
		return fmt.Errorf("dry run of %s: got status %d, want 204", name, resp.Msg.GetStatusCode())
	}
	return nil
}

// closedLoop runs clients goroutines, each calling send n times back to
// back, and returns the rate and the latency of the calls.
func closedLoop(ctx context.Context, clients, n int, send func(ctx context.Context, client, i int) error) (load, error) {
	var (
		mu    sync.Mutex
		lat   = make([]time.Duration, 0, clients*n)
		first error
		wg    sync.WaitGroup
	)
	start := time.Now()
	for c := range clients {
		wg.Go(func() {
			mine := make([]time.Duration, 0, n)
			var err error
			for i := 0; i < n && err == nil; i++ {
				t := time.Now()
				if err = send(ctx, c, i); err == nil {
					mine = append(mine, time.Since(t))
				}
			}
			mu.Lock()
			defer mu.Unlock()
			lat = append(lat, mine...)
			if first == nil {
				first = err
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if first != nil {
		return load{}, first
	}
	return load{events: len(lat), perSecond: float64(len(lat)) / elapsed.Seconds(), lat: summarize(lat)}, nil
}

// benchRawPublish measures JetStream's own synchronous publish (publish,
// wait for the stored ack) on a plain file stream in an embedded server
// opened the way skiff dev opens its own, with the same clients, events
// per client and payload as the accept phase, after an unmeasured warm-up.
func benchRawPublish(ctx context.Context, syncAlways bool, clients, n int) (_ load, err error) {
	dir, err := os.MkdirTemp("", "skiff-bench-nats-")
	if err != nil {
		return load{}, err
	}
	defer func() { err = errors.Join(err, os.RemoveAll(dir)) }()
	st, err := store.Open(ctx, store.Config{DataDir: dir, SyncAlways: syncAlways})
	if err != nil {
		return load{}, err
	}
	defer func() { err = errors.Join(err, st.Close()) }()
	js := st.JetStream()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "RAW", Subjects: []string{"raw"}, Storage: jetstream.FileStorage}); err != nil {
		return load{}, err
	}
	publish := func(ctx context.Context, _, _ int) error {
		_, err := js.Publish(ctx, "raw", echoPayload)
		return err
	}
	if _, err := closedLoop(ctx, clients, 20, publish); err != nil {
		return load{}, err
	}
	return closedLoop(ctx, clients, n, publish)
}

// paced sends EVENT invokes of the clock function at a steady rate for d
// (open loop: each send starts at its scheduled time, whatever the
// previous ones do) with request ids prefix+index. It returns when each
// was sent, the accept latencies and the achieved rate.
func (s *skiff) paced(ctx context.Context, prefix string, rate int, d time.Duration) (map[string]time.Time, []time.Duration, float64, error) {
	total := int(float64(rate) * d.Seconds())
	interval := time.Second / time.Duration(rate)
	var (
		mu    sync.Mutex
		sent  = make(map[string]time.Time, total)
		lat   = make([]time.Duration, 0, total)
		first error
		wg    sync.WaitGroup
	)
	sem := make(chan struct{}, 256) // bounds the sends in flight if skiff falls behind
	start := time.Now()
	var last time.Time
	for i := range total {
		if w := time.Until(start.Add(time.Duration(i) * interval)); w > 0 {
			time.Sleep(w)
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			wg.Wait()
			return nil, nil, 0, ctx.Err()
		}
		id := prefix + strconv.Itoa(i)
		wg.Go(func() {
			defer func() { <-sem }()
			t0 := time.Now()
			err := s.accept(ctx, clockFunction, clockPayload, id)
			l := time.Since(t0)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if first == nil {
					first = err
				}
				return
			}
			sent[id] = t0
			lat = append(lat, l)
		})
		last = time.Now()
	}
	wg.Wait()
	if first != nil {
		return nil, nil, 0, first
	}
	achieved := float64(total-1) / last.Sub(start).Seconds()
	return sent, lat, achieved, nil
}

// collectStarts reads the success records of the clock function from the
// records queue (deleting them) until every request id of want has one or
// timeout passes, and returns the handler start time each record's
// response carries, by request id.
func (s *skiff) collectStarts(ctx context.Context, want map[string]time.Time, timeout time.Duration) (map[string]int64, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var (
		mu     sync.Mutex
		starts = make(map[string]int64, len(want))
		first  error
		wg     sync.WaitGroup
	)
	complete := func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(starts) == len(want) || first != nil
	}
	for range 4 {
		wg.Go(func() {
			for !complete() && ctx.Err() == nil {
				err := s.receiveStarts(ctx, want, &mu, starts)
				mu.Lock()
				if err != nil && ctx.Err() == nil && first == nil {
					first = err
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return starts, first
}

// receiveStarts receives one batch of records, notes the start times of
// those in want into starts (under mu) and deletes the batch; records of
// other events (the warm-up's) are deleted too.
func (s *skiff) receiveStarts(ctx context.Context, want map[string]time.Time, mu *sync.Mutex, starts map[string]int64) error {
	wait := int32(1)
	resp, err := s.queues.ReceiveMessage(ctx, connect.NewRequest(&skiffv1.ReceiveMessageRequest{Queue: recordsQueue, MaxMessages: 10, WaitSeconds: &wait}))
	if err != nil {
		return fmt.Errorf("receiving records: %w", err)
	}
	msgs := resp.Msg.GetMessages()
	if len(msgs) == 0 {
		return nil
	}
	del := make([]*skiffv1.DeleteMessageBatchEntry, 0, len(msgs))
	for i, m := range msgs {
		del = append(del, &skiffv1.DeleteMessageBatchEntry{Id: strconv.Itoa(i), ReceiptHandle: m.GetReceiptHandle()})
		var rec destinations.Record
		if err := json.Unmarshal([]byte(m.GetBody()), &rec); err != nil {
			return fmt.Errorf("record %q: %w", m.GetBody(), err)
		}
		if rec.RequestContext.Condition != destinations.ConditionSuccess {
			return fmt.Errorf("record of %s: condition %q, want %q", rec.RequestContext.RequestID, rec.RequestContext.Condition, destinations.ConditionSuccess)
		}
		id := rec.RequestContext.RequestID
		if _, ok := want[id]; !ok {
			continue // a warm-up event's
		}
		var p struct {
			T int64 `json:"t"`
		}
		if err := json.Unmarshal(rec.ResponsePayload, &p); err != nil || p.T == 0 {
			return fmt.Errorf("record of %s: response %s has no start time", id, rec.ResponsePayload)
		}
		mu.Lock()
		if old, ok := starts[id]; !ok || p.T < old { // a duplicate delivery keeps the first start
			starts[id] = p.T
		}
		mu.Unlock()
	}
	if _, err := s.queues.DeleteMessageBatch(ctx, connect.NewRequest(&skiffv1.DeleteMessageBatchRequest{Queue: recordsQueue, Entries: del})); err != nil {
		return fmt.Errorf("deleting records: %w", err)
	}
	return nil
}

// waitProcessed waits until the pollers have invoked n events successfully
// (skiff_async_attempts_total{outcome="success"}) and returns when they
// got there (to within the polling interval).
func (s *skiff) waitProcessed(ctx context.Context, n int, timeout time.Duration) (time.Time, error) {
	deadline := time.Now().Add(timeout)
	got := 0
	for {
		v, err := s.metric(ctx, "skiff_async_attempts_total", `outcome="success"`)
		if err != nil {
			return time.Time{}, err
		}
		if got = int(v); got >= n {
			return time.Now(), nil
		}
		if time.Now().After(deadline) {
			return time.Time{}, fmt.Errorf("the pollers processed %d of %d async events within %s", got, n, timeout)
		}
		select {
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// phaseStats reads the counters of phaseStats.
func (s *skiff) phaseStats(ctx context.Context) (phaseStats, error) {
	cold, err := s.metric(ctx, "skiff_agent_cold_starts_total", "")
	if err != nil {
		return phaseStats{}, err
	}
	throttled, err := s.metric(ctx, "skiff_async_attempts_total", `outcome="throttled"`)
	if err != nil {
		return phaseStats{}, err
	}
	platform, err := s.metric(ctx, "skiff_async_attempts_total", `outcome="platform_error"`)
	if err != nil {
		return phaseStats{}, err
	}
	losses, err := s.metric(ctx, "skiff_lease_losses_total", "")
	if err != nil {
		return phaseStats{}, err
	}
	return phaseStats{coldStarts: int(cold), retries: int(throttled + platform), leaseLosses: int(losses)}, nil
}

// metric returns the sum of the series of a metric on /metrics whose
// labels contain label.
func (s *skiff) metric(ctx context.Context, name, label string) (float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+s.addr+"/metrics", nil)
	if err != nil {
		return 0, err
	}
	resp, err := s.httpc.Do(req)
	if err != nil {
		return 0, fmt.Errorf("reading metrics: %w", err)
	}
	defer resp.Body.Close()
	total := 0.0
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !(strings.HasPrefix(line, name+"{") || strings.HasPrefix(line, name+" ")) || !strings.Contains(line, label) {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			return 0, fmt.Errorf("metric line %q: %w", line, err)
		}
		total += v
	}
	return total, sc.Err()
}
