package kinesis

import (
	"context"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
)

// Handler returns the StreamService RPC handler. Errors are errs kinds;
// mount it with errs.Interceptor to map them to connect codes.
func (s *Store) Handler() skiffv1connect.StreamServiceHandler { return handler{s} }

type handler struct{ s *Store }

var _ skiffv1connect.StreamServiceHandler = handler{}

func (h handler) CreateStream(ctx context.Context, req *connect.Request[skiffv1.CreateStreamRequest]) (*connect.Response[skiffv1.CreateStreamResponse], error) {
	d, err := h.s.CreateStream(ctx, req.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.CreateStreamResponse{Stream: d}), nil
}

func (h handler) DeleteStream(ctx context.Context, req *connect.Request[skiffv1.DeleteStreamRequest]) (*connect.Response[skiffv1.DeleteStreamResponse], error) {
	if err := h.s.DeleteStream(ctx, req.Msg.GetName()); err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.DeleteStreamResponse{}), nil
}

func (h handler) DescribeStream(ctx context.Context, req *connect.Request[skiffv1.DescribeStreamRequest]) (*connect.Response[skiffv1.DescribeStreamResponse], error) {
	d, err := h.s.DescribeStream(ctx, req.Msg.GetName())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.DescribeStreamResponse{Stream: d}), nil
}

func (h handler) ListStreams(ctx context.Context, _ *connect.Request[skiffv1.ListStreamsRequest]) (*connect.Response[skiffv1.ListStreamsResponse], error) {
	names, err := h.s.ListStreams(ctx)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.ListStreamsResponse{Names: names}), nil
}

func (h handler) ListShards(ctx context.Context, req *connect.Request[skiffv1.ListShardsRequest]) (*connect.Response[skiffv1.ListShardsResponse], error) {
	shards, err := h.s.Shards(ctx, req.Msg.GetStream())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.ListShardsResponse{Shards: shards}), nil
}

func (h handler) PutRecord(ctx context.Context, req *connect.Request[skiffv1.PutRecordRequest]) (*connect.Response[skiffv1.PutRecordResponse], error) {
	out, err := h.s.PutRecord(ctx, req.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(out), nil
}

func (h handler) PutRecords(ctx context.Context, req *connect.Request[skiffv1.PutRecordsRequest]) (*connect.Response[skiffv1.PutRecordsResponse], error) {
	out, err := h.s.PutRecords(ctx, req.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(out), nil
}

func (h handler) GetShardIterator(ctx context.Context, req *connect.Request[skiffv1.GetShardIteratorRequest]) (*connect.Response[skiffv1.GetShardIteratorResponse], error) {
	it, err := h.s.GetShardIterator(ctx, req.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.GetShardIteratorResponse{ShardIterator: it}), nil
}

func (h handler) GetRecords(ctx context.Context, req *connect.Request[skiffv1.GetRecordsRequest]) (*connect.Response[skiffv1.GetRecordsResponse], error) {
	out, err := h.s.GetRecords(ctx, req.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(out), nil
}

func (h handler) SplitShard(ctx context.Context, req *connect.Request[skiffv1.SplitShardRequest]) (*connect.Response[skiffv1.SplitShardResponse], error) {
	if err := h.s.SplitShard(ctx, req.Msg); err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.SplitShardResponse{}), nil
}

func (h handler) MergeShards(ctx context.Context, req *connect.Request[skiffv1.MergeShardsRequest]) (*connect.Response[skiffv1.MergeShardsResponse], error) {
	if err := h.s.MergeShards(ctx, req.Msg); err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.MergeShardsResponse{}), nil
}

func (h handler) UpdateShardCount(ctx context.Context, req *connect.Request[skiffv1.UpdateShardCountRequest]) (*connect.Response[skiffv1.UpdateShardCountResponse], error) {
	cur, after, err := h.s.UpdateShardCount(ctx, req.Msg.GetStream(), int(req.Msg.GetTargetShardCount()))
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.UpdateShardCountResponse{CurrentShardCount: int32(cur), TargetShardCount: int32(after)}), nil
}
