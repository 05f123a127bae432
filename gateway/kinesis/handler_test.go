package kinesis

import (
	"net/http"
	"net/http/httptest"
	"testing"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/internal/errs"
)

func serve(t *testing.T, s *Store) (string, *http.Client) {
	t.Helper()
	mux := http.NewServeMux()
	mux.Handle(skiffv1connect.NewStreamServiceHandler(s.Handler(), connect.WithInterceptors(errs.Interceptor())))
	srv := httptest.NewUnstartedServer(mux)
	srv.Config.Protocols = new(http.Protocols)
	srv.Config.Protocols.SetHTTP1(true)
	srv.Config.Protocols.SetUnencryptedHTTP2(true)
	srv.Start()
	t.Cleanup(srv.Close)
	tr := &http.Transport{Protocols: new(http.Protocols)}
	tr.Protocols.SetUnencryptedHTTP2(true)
	t.Cleanup(tr.CloseIdleConnections)
	return srv.URL, &http.Client{Transport: tr}
}

func TestHandlerOverConnectAndGRPC(t *testing.T) {
	for _, p := range []struct {
		name string
		opts []connect.ClientOption
	}{{"connect", nil}, {"grpc", []connect.ClientOption{connect.WithGRPC()}}} {
		t.Run(p.name, func(t *testing.T) {
			e := newEnv(t)
			url, hc := serve(t, e.s)
			c := skiffv1connect.NewStreamServiceClient(hc, url, p.opts...)
			ctx := testCtx(t)

			cr, err := c.CreateStream(ctx, connect.NewRequest(&skiffv1.CreateStreamRequest{Name: "s", ShardCount: 2}))
			if err != nil || len(cr.Msg.GetStream().GetShards()) != 2 {
				t.Fatalf("CreateStream: %v, %v", cr, err)
			}
			_, err = c.CreateStream(ctx, connect.NewRequest(&skiffv1.CreateStreamRequest{Name: "bad", ShardCount: 100}))
			if connect.CodeOf(err) != connect.CodeInvalidArgument || errs.FromConnect(err).(*errs.Error).Field != "shard_count" {
				t.Fatalf("CreateStream with 100 shards: got %v, want InvalidArgument on shard_count", err)
			}
			_, err = c.CreateStream(ctx, connect.NewRequest(&skiffv1.CreateStreamRequest{Name: "s", ShardCount: 1}))
			if connect.CodeOf(err) != connect.CodeAlreadyExists {
				t.Fatalf("CreateStream again: got %v, want AlreadyExists", err)
			}
			ls, err := c.ListStreams(ctx, connect.NewRequest(&skiffv1.ListStreamsRequest{}))
			if err != nil || len(ls.Msg.GetNames()) != 1 {
				t.Fatalf("ListStreams: %v, %v", ls, err)
			}
			pr, err := c.PutRecord(ctx, connect.NewRequest(&skiffv1.PutRecordRequest{Stream: "s", PartitionKey: "a", Data: []byte("one")}))
			if err != nil || pr.Msg.GetShardId() != "shardId-000000000000" {
				t.Fatalf("PutRecord: %v, %v", pr, err)
			}
			prs, err := c.PutRecords(ctx, connect.NewRequest(&skiffv1.PutRecordsRequest{Stream: "s", Records: []*skiffv1.PutRecordsEntry{
				{PartitionKey: "a", Data: []byte("two")}, {PartitionKey: "abc", Data: []byte("three")},
			}}))
			if err != nil || prs.Msg.GetFailedRecordCount() != 0 || len(prs.Msg.GetRecords()) != 2 {
				t.Fatalf("PutRecords: %v, %v", prs, err)
			}
			it, err := c.GetShardIterator(ctx, connect.NewRequest(&skiffv1.GetShardIteratorRequest{Stream: "s", ShardId: "shardId-000000000000",
				Type: skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_TRIM_HORIZON}))
			if err != nil {
				t.Fatalf("GetShardIterator: %v", err)
			}
			gr, err := c.GetRecords(ctx, connect.NewRequest(&skiffv1.GetRecordsRequest{ShardIterator: it.Msg.GetShardIterator()}))
			if err != nil || len(gr.Msg.GetRecords()) != 2 || string(gr.Msg.GetRecords()[1].GetData()) != "two" {
				t.Fatalf("GetRecords: %v, %v", gr, err)
			}
			if _, err := c.SplitShard(ctx, connect.NewRequest(&skiffv1.SplitShardRequest{Stream: "s", ShardToSplit: "shardId-000000000000", NewStartingHashKey: "1000"})); err != nil {
				t.Fatalf("SplitShard: %v", err)
			}
			if _, err := c.MergeShards(ctx, connect.NewRequest(&skiffv1.MergeShardsRequest{Stream: "s", ShardToMerge: "shardId-000000000002", AdjacentShardToMerge: "shardId-000000000003"})); err != nil {
				t.Fatalf("MergeShards: %v", err)
			}
			us, err := c.UpdateShardCount(ctx, connect.NewRequest(&skiffv1.UpdateShardCountRequest{Stream: "s", TargetShardCount: 4}))
			if err != nil || us.Msg.GetCurrentShardCount() != 2 || us.Msg.GetTargetShardCount() != 4 {
				t.Fatalf("UpdateShardCount: %v, %v", us, err)
			}
			gr, err = c.GetRecords(ctx, connect.NewRequest(&skiffv1.GetRecordsRequest{ShardIterator: gr.Msg.GetNextShardIterator()}))
			if err != nil || gr.Msg.GetNextShardIterator() != "" || len(gr.Msg.GetChildShards()) != 2 {
				t.Fatalf("GetRecords at shard end: %v, %v", gr, err)
			}
			lsh, err := c.ListShards(ctx, connect.NewRequest(&skiffv1.ListShardsRequest{Stream: "s"}))
			if err != nil || len(lsh.Msg.GetShards()) != 9 {
				t.Fatalf("ListShards: got %d shards, %v; want 9", len(lsh.Msg.GetShards()), err)
			}
			d, err := c.DescribeStream(ctx, connect.NewRequest(&skiffv1.DescribeStreamRequest{Name: "s"}))
			if err != nil || d.Msg.GetStream().GetName() != "s" || len(d.Msg.GetStream().GetShards()) != 9 {
				t.Fatalf("DescribeStream: %v, %v", d, err)
			}
			if _, err := c.DeleteStream(ctx, connect.NewRequest(&skiffv1.DeleteStreamRequest{Name: "s"})); err != nil {
				t.Fatalf("DeleteStream: %v", err)
			}
			_, err = c.DescribeStream(ctx, connect.NewRequest(&skiffv1.DescribeStreamRequest{Name: "s"}))
			if connect.CodeOf(err) != connect.CodeNotFound {
				t.Fatalf("DescribeStream after delete: got %v, want NotFound", err)
			}
		})
	}
}
