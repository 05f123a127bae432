package main

import (
	"context"
	"fmt"
	"math/big"
	"strconv"
	"strings"
	"sync"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/internal/errs"
)

// fakeStreams is the stream API's fake. Shard iterators are
// "it/<shard>/<n>": the n-th batch of the shard is next.
type fakeStreams struct {
	skiffv1connect.UnimplementedStreamServiceHandler
	calls
	// shards are what ListShards and DescribeStream return.
	shards []*skiffv1.Shard
	// batches are what GetRecords returns for each shard, one per call.
	batches map[string][][]*skiffv1.Record
	// children, for a closed shard, are returned at its end (after its
	// batches); an open shard returns no records once its batches are out.
	children map[string][]string
	// empty is how many empty reads a shard answers before its batches.
	empty map[string]int
	// fail, when set, is returned by every call.
	fail error

	mu    sync.Mutex
	reads map[string]int // empty reads so far by shard; guarded by mu
}

func newFakeStreams() *fakeStreams {
	return &fakeStreams{shards: evenShards(2), reads: map[string]int{}}
}

// evenShards are n open shards splitting the hash key range evenly.
func evenShards(n int) []*skiffv1.Shard {
	space := new(big.Int).Lsh(big.NewInt(1), 128)
	var out []*skiffv1.Shard
	for i := range n {
		lo := new(big.Int).Div(new(big.Int).Mul(space, big.NewInt(int64(i))), big.NewInt(int64(n)))
		hi := new(big.Int).Div(new(big.Int).Mul(space, big.NewInt(int64(i+1))), big.NewInt(int64(n)))
		hi.Sub(hi, big.NewInt(1))
		out = append(out, &skiffv1.Shard{ShardId: fmt.Sprintf("shardId-%012d", i), StartingHashKey: lo.String(),
			EndingHashKey: hi.String(), StartingSequenceNumber: "1", Open: true})
	}
	return out
}

func streamFor(name string, retention int32, shards []*skiffv1.Shard) *skiffv1.StreamDescription {
	return &skiffv1.StreamDescription{Name: name, Arn: "arn:skiff:kinesis:local:000000000000:stream/" + name, Status: "ACTIVE",
		RetentionPeriodHours: retention, Shards: shards, Created: "2026-01-07T00:00:00Z"}
}

func (f *fakeStreams) CreateStream(_ context.Context, r *connect.Request[skiffv1.CreateStreamRequest]) (*connect.Response[skiffv1.CreateStreamResponse], error) {
	f.record("CreateStream", r.Header(), r.Peer().Protocol, r.Msg)
	if f.fail != nil {
		return nil, f.fail
	}
	return connect.NewResponse(&skiffv1.CreateStreamResponse{
		Stream: streamFor(r.Msg.GetName(), r.Msg.GetRetentionPeriodHours(), evenShards(int(r.Msg.GetShardCount()))),
	}), nil
}

func (f *fakeStreams) DeleteStream(_ context.Context, r *connect.Request[skiffv1.DeleteStreamRequest]) (*connect.Response[skiffv1.DeleteStreamResponse], error) {
	f.record("DeleteStream", r.Header(), r.Peer().Protocol, r.Msg)
	if r.Msg.GetName() == "missing" {
		return nil, errs.NotFound("stream %q not found", r.Msg.GetName())
	}
	return connect.NewResponse(&skiffv1.DeleteStreamResponse{}), nil
}

func (f *fakeStreams) DescribeStream(_ context.Context, r *connect.Request[skiffv1.DescribeStreamRequest]) (*connect.Response[skiffv1.DescribeStreamResponse], error) {
	f.record("DescribeStream", r.Header(), r.Peer().Protocol, r.Msg)
	if r.Msg.GetName() == "missing" {
		return nil, errs.NotFound("stream %q not found", r.Msg.GetName())
	}
	return connect.NewResponse(&skiffv1.DescribeStreamResponse{Stream: streamFor(r.Msg.GetName(), 48, f.shards)}), nil
}

func (f *fakeStreams) ListStreams(_ context.Context, r *connect.Request[skiffv1.ListStreamsRequest]) (*connect.Response[skiffv1.ListStreamsResponse], error) {
	f.record("ListStreams", r.Header(), r.Peer().Protocol, r.Msg)
	return connect.NewResponse(&skiffv1.ListStreamsResponse{Names: []string{"audit", "clicks"}}), nil
}

func (f *fakeStreams) ListShards(_ context.Context, r *connect.Request[skiffv1.ListShardsRequest]) (*connect.Response[skiffv1.ListShardsResponse], error) {
	f.record("ListShards", r.Header(), r.Peer().Protocol, r.Msg)
	if r.Msg.GetStream() == "missing" {
		return nil, errs.NotFound("stream %q not found", r.Msg.GetStream())
	}
	return connect.NewResponse(&skiffv1.ListShardsResponse{Shards: f.shards}), nil
}

func (f *fakeStreams) PutRecord(_ context.Context, r *connect.Request[skiffv1.PutRecordRequest]) (*connect.Response[skiffv1.PutRecordResponse], error) {
	f.record("PutRecord", r.Header(), r.Peer().Protocol, r.Msg)
	if f.fail != nil {
		return nil, f.fail
	}
	return connect.NewResponse(&skiffv1.PutRecordResponse{ShardId: "shardId-000000000001", SequenceNumber: "17"}), nil
}

func (f *fakeStreams) GetShardIterator(_ context.Context, r *connect.Request[skiffv1.GetShardIteratorRequest]) (*connect.Response[skiffv1.GetShardIteratorResponse], error) {
	f.record("GetShardIterator", r.Header(), r.Peer().Protocol, r.Msg)
	if f.fail != nil {
		return nil, f.fail
	}
	return connect.NewResponse(&skiffv1.GetShardIteratorResponse{ShardIterator: "it/" + r.Msg.GetShardId() + "/0"}), nil
}

func (f *fakeStreams) GetRecords(_ context.Context, r *connect.Request[skiffv1.GetRecordsRequest]) (*connect.Response[skiffv1.GetRecordsResponse], error) {
	f.record("GetRecords", r.Header(), r.Peer().Protocol, r.Msg)
	parts := strings.Split(r.Msg.GetShardIterator(), "/")
	if len(parts) != 3 || parts[0] != "it" {
		return nil, errs.Invalid("shard_iterator", "invalid shard iterator %q", r.Msg.GetShardIterator())
	}
	shard := parts[1]
	n, err := strconv.Atoi(parts[2])
	if err != nil {
		return nil, errs.Invalid("shard_iterator", "invalid shard iterator %q", r.Msg.GetShardIterator())
	}
	f.mu.Lock()
	waiting := f.reads[shard] < f.empty[shard]
	if waiting {
		f.reads[shard]++
	}
	f.mu.Unlock()
	batches := f.batches[shard]
	switch {
	case waiting:
		return connect.NewResponse(&skiffv1.GetRecordsResponse{NextShardIterator: r.Msg.GetShardIterator(), MillisBehindLatest: 0}), nil
	case n < len(batches):
		recs := batches[n]
		if l := int(r.Msg.GetLimit()); l > 0 && len(recs) > l {
			recs = recs[:l] // the rest of the batch is lost: tests do not read on
		}
		return connect.NewResponse(&skiffv1.GetRecordsResponse{Records: recs,
			NextShardIterator: fmt.Sprintf("it/%s/%d", shard, n+1), MillisBehindLatest: 5}), nil
	case f.children[shard] != nil:
		return connect.NewResponse(&skiffv1.GetRecordsResponse{ChildShards: f.children[shard]}), nil
	}
	return connect.NewResponse(&skiffv1.GetRecordsResponse{NextShardIterator: r.Msg.GetShardIterator()}), nil
}

func (f *fakeStreams) SplitShard(_ context.Context, r *connect.Request[skiffv1.SplitShardRequest]) (*connect.Response[skiffv1.SplitShardResponse], error) {
	f.record("SplitShard", r.Header(), r.Peer().Protocol, r.Msg)
	if f.fail != nil {
		return nil, f.fail
	}
	return connect.NewResponse(&skiffv1.SplitShardResponse{}), nil
}

func (f *fakeStreams) MergeShards(_ context.Context, r *connect.Request[skiffv1.MergeShardsRequest]) (*connect.Response[skiffv1.MergeShardsResponse], error) {
	f.record("MergeShards", r.Header(), r.Peer().Protocol, r.Msg)
	if f.fail != nil {
		return nil, f.fail
	}
	return connect.NewResponse(&skiffv1.MergeShardsResponse{}), nil
}

func (f *fakeStreams) UpdateShardCount(_ context.Context, r *connect.Request[skiffv1.UpdateShardCountRequest]) (*connect.Response[skiffv1.UpdateShardCountResponse], error) {
	f.record("UpdateShardCount", r.Header(), r.Peer().Protocol, r.Msg)
	if f.fail != nil {
		return nil, f.fail
	}
	return connect.NewResponse(&skiffv1.UpdateShardCountResponse{CurrentShardCount: int32(len(f.shards)), TargetShardCount: r.Msg.GetTargetShardCount()}), nil
}

// all returns every recorded call as "Procedure" and its request, in order.
func (c *calls) all() ([]string, []any) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.procs...), append([]any(nil), c.reqs...)
}
