package main

import (
	"context"
	"strings"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/internal/errs"
)

// The fakes of the async invoke, queue and event source mapping APIs.

func (f *fakeFunctions) PutFunctionEventInvokeConfig(_ context.Context, r *connect.Request[skiffv1.PutFunctionEventInvokeConfigRequest]) (*connect.Response[skiffv1.PutFunctionEventInvokeConfigResponse], error) {
	f.record("PutFunctionEventInvokeConfig", r.Header(), r.Peer().Protocol, r.Msg)
	if f.fail != nil {
		return nil, f.fail
	}
	cfg := proto.CloneOf(r.Msg.GetConfig()) // the recorded request stays as sent
	cfg.LastModified = "2026-01-03T00:00:00Z"
	return connect.NewResponse(&skiffv1.PutFunctionEventInvokeConfigResponse{Config: cfg}), nil
}

func (f *fakeFunctions) GetFunctionEventInvokeConfig(_ context.Context, r *connect.Request[skiffv1.GetFunctionEventInvokeConfigRequest]) (*connect.Response[skiffv1.GetFunctionEventInvokeConfigResponse], error) {
	f.record("GetFunctionEventInvokeConfig", r.Header(), r.Peer().Protocol, r.Msg)
	if r.Msg.GetFunctionName() == "missing" {
		return nil, errs.NotFound("no event invoke config for function %q", r.Msg.GetFunctionName())
	}
	age := int32(3600)
	return connect.NewResponse(&skiffv1.GetFunctionEventInvokeConfigResponse{Config: &skiffv1.EventInvokeConfig{
		MaximumEventAgeSeconds: &age, OnFailure: "queue:failed", LastModified: "2026-01-03T00:00:00Z",
	}}), nil
}

func (f *fakeFunctions) DeleteFunctionEventInvokeConfig(_ context.Context, r *connect.Request[skiffv1.DeleteFunctionEventInvokeConfigRequest]) (*connect.Response[skiffv1.DeleteFunctionEventInvokeConfigResponse], error) {
	f.record("DeleteFunctionEventInvokeConfig", r.Header(), r.Peer().Protocol, r.Msg)
	return connect.NewResponse(&skiffv1.DeleteFunctionEventInvokeConfigResponse{}), nil
}

type fakeQueues struct {
	skiffv1connect.UnimplementedQueueServiceHandler
	calls
	// queues are what ListQueues returns.
	queues []*skiffv1.Queue
	// messages are what ReceiveMessage returns.
	messages []*skiffv1.Message
	// fail, when set, is returned by every call.
	fail error
}

func queueFor(name string, cfg *skiffv1.QueueConfig) *skiffv1.Queue {
	if cfg == nil {
		cfg = &skiffv1.QueueConfig{}
	}
	return &skiffv1.Queue{Name: name, Arn: "arn:skiff:sqs:local:000000000000:" + name, Config: cfg, Created: "2026-01-04T00:00:00Z"}
}

func (f *fakeQueues) CreateQueue(_ context.Context, r *connect.Request[skiffv1.CreateQueueRequest]) (*connect.Response[skiffv1.CreateQueueResponse], error) {
	f.record("CreateQueue", r.Header(), r.Peer().Protocol, r.Msg)
	if f.fail != nil {
		return nil, f.fail
	}
	return connect.NewResponse(&skiffv1.CreateQueueResponse{Queue: queueFor(r.Msg.GetName(), r.Msg.GetConfig())}), nil
}

func (f *fakeQueues) DeleteQueue(_ context.Context, r *connect.Request[skiffv1.DeleteQueueRequest]) (*connect.Response[skiffv1.DeleteQueueResponse], error) {
	f.record("DeleteQueue", r.Header(), r.Peer().Protocol, r.Msg)
	if r.Msg.GetName() == "missing" {
		return nil, errs.NotFound("queue %q not found", r.Msg.GetName())
	}
	return connect.NewResponse(&skiffv1.DeleteQueueResponse{}), nil
}

func (f *fakeQueues) ListQueues(_ context.Context, r *connect.Request[skiffv1.ListQueuesRequest]) (*connect.Response[skiffv1.ListQueuesResponse], error) {
	f.record("ListQueues", r.Header(), r.Peer().Protocol, r.Msg)
	var out []*skiffv1.Queue
	for _, q := range f.queues {
		if strings.HasPrefix(q.GetName(), r.Msg.GetPrefix()) {
			out = append(out, q)
		}
	}
	return connect.NewResponse(&skiffv1.ListQueuesResponse{Queues: out}), nil
}

func (f *fakeQueues) GetQueueAttributes(_ context.Context, r *connect.Request[skiffv1.GetQueueAttributesRequest]) (*connect.Response[skiffv1.GetQueueAttributesResponse], error) {
	f.record("GetQueueAttributes", r.Header(), r.Peer().Protocol, r.Msg)
	if r.Msg.GetName() == "missing" {
		return nil, errs.NotFound("queue %q not found", r.Msg.GetName())
	}
	vis := int32(60)
	q := queueFor(r.Msg.GetName(), &skiffv1.QueueConfig{VisibilityTimeoutSeconds: &vis,
		RedrivePolicy: &skiffv1.RedrivePolicy{DeadLetterQueue: "jobs-dlq", MaxReceiveCount: 5}})
	return connect.NewResponse(&skiffv1.GetQueueAttributesResponse{Queue: q, ApproximateMessages: 12,
		ApproximateMessagesNotVisible: 3, ApproximateMessagesDelayed: 1, OldestMessageAgeSeconds: 42}), nil
}

func (f *fakeQueues) SendMessage(_ context.Context, r *connect.Request[skiffv1.SendMessageRequest]) (*connect.Response[skiffv1.SendMessageResponse], error) {
	f.record("SendMessage", r.Header(), r.Peer().Protocol, r.Msg)
	if f.fail != nil {
		return nil, f.fail
	}
	resp := &skiffv1.SendMessageResponse{MessageId: "msg-1", Md5OfBody: "md5-1"}
	if strings.HasSuffix(r.Msg.GetQueue(), ".fifo") {
		resp.SequenceNumber = "18"
	}
	return connect.NewResponse(resp), nil
}

func (f *fakeQueues) ReceiveMessage(_ context.Context, r *connect.Request[skiffv1.ReceiveMessageRequest]) (*connect.Response[skiffv1.ReceiveMessageResponse], error) {
	f.record("ReceiveMessage", r.Header(), r.Peer().Protocol, r.Msg)
	if f.fail != nil {
		return nil, f.fail
	}
	return connect.NewResponse(&skiffv1.ReceiveMessageResponse{Messages: f.messages}), nil
}

func (f *fakeQueues) DeleteMessage(_ context.Context, r *connect.Request[skiffv1.DeleteMessageRequest]) (*connect.Response[skiffv1.DeleteMessageResponse], error) {
	f.record("DeleteMessage", r.Header(), r.Peer().Protocol, r.Msg)
	if r.Msg.GetReceiptHandle() == "stale" {
		return nil, errs.Invalid("receipt_handle", "receipt handle is stale")
	}
	return connect.NewResponse(&skiffv1.DeleteMessageResponse{}), nil
}

// DeleteMessageBatch fails the entries whose receipt handle is "stale".
func (f *fakeQueues) DeleteMessageBatch(_ context.Context, r *connect.Request[skiffv1.DeleteMessageBatchRequest]) (*connect.Response[skiffv1.DeleteMessageBatchResponse], error) {
	f.record("DeleteMessageBatch", r.Header(), r.Peer().Protocol, r.Msg)
	resp := &skiffv1.DeleteMessageBatchResponse{}
	for _, e := range r.Msg.GetEntries() {
		if e.GetReceiptHandle() == "stale" {
			resp.Failed = append(resp.Failed, &skiffv1.BatchResultError{Id: e.GetId(), Code: "invalid_receipt_handle", Message: "receipt handle is stale", SenderFault: true})
			continue
		}
		resp.Successful = append(resp.Successful, e.GetId())
	}
	return connect.NewResponse(resp), nil
}

func (f *fakeQueues) PurgeQueue(_ context.Context, r *connect.Request[skiffv1.PurgeQueueRequest]) (*connect.Response[skiffv1.PurgeQueueResponse], error) {
	f.record("PurgeQueue", r.Header(), r.Peer().Protocol, r.Msg)
	return connect.NewResponse(&skiffv1.PurgeQueueResponse{}), nil
}

func (f *fakeQueues) RedriveQueue(_ context.Context, r *connect.Request[skiffv1.RedriveQueueRequest]) (*connect.Response[skiffv1.RedriveQueueResponse], error) {
	f.record("RedriveQueue", r.Header(), r.Peer().Protocol, r.Msg)
	return connect.NewResponse(&skiffv1.RedriveQueueResponse{Moved: 3}), nil
}

type fakeESM struct {
	skiffv1connect.UnimplementedEventSourceServiceHandler
	calls
	// mappings are what ListEventSourceMappings returns.
	mappings []*skiffv1.EventSourceMapping
	// fail, when set, is returned by every call.
	fail error
}

func (f *fakeESM) CreateEventSourceMapping(_ context.Context, r *connect.Request[skiffv1.CreateEventSourceMappingRequest]) (*connect.Response[skiffv1.CreateEventSourceMappingResponse], error) {
	f.record("CreateEventSourceMapping", r.Header(), r.Peer().Protocol, r.Msg)
	if f.fail != nil {
		return nil, f.fail
	}
	m := proto.CloneOf(r.Msg.GetMapping())
	m.Uuid, m.LastModified, m.Revision = "uuid-1", "2026-01-05T00:00:00Z", 1
	return connect.NewResponse(&skiffv1.CreateEventSourceMappingResponse{Mapping: m}), nil
}

func (f *fakeESM) GetEventSourceMapping(_ context.Context, r *connect.Request[skiffv1.GetEventSourceMappingRequest]) (*connect.Response[skiffv1.GetEventSourceMappingResponse], error) {
	f.record("GetEventSourceMapping", r.Header(), r.Peer().Protocol, r.Msg)
	if r.Msg.GetUuid() == "missing" {
		return nil, errs.NotFound("event source mapping %q not found", r.Msg.GetUuid())
	}
	if r.Msg.GetUuid() == "stream-uuid" {
		return connect.NewResponse(&skiffv1.GetEventSourceMappingResponse{Mapping: &skiffv1.EventSourceMapping{
			Uuid: r.Msg.GetUuid(), FunctionName: "counter", Stream: "clicks", StartingPosition: "AT_TIMESTAMP",
			StartingPositionTimestamp: "2026-11-27T10:00:00Z", ParallelizationFactor: i32(4), BisectBatchOnFunctionError: true,
			MaximumRetryAttempts: i32(2), OnFailure: "queue:clicks-failed", TumblingWindowSeconds: 60,
			State: "Enabled", LastModified: "2026-01-05T00:00:00Z", Revision: 2,
		}}), nil
	}
	size, conc := int32(100), int32(5)
	return connect.NewResponse(&skiffv1.GetEventSourceMappingResponse{Mapping: &skiffv1.EventSourceMapping{
		Uuid: r.Msg.GetUuid(), FunctionName: "worker", Queue: "jobs", BatchSize: &size, MaximumConcurrency: &conc,
		FunctionResponseTypes: []string{"ReportBatchItemFailures"}, State: "Disabled", LastModified: "2026-01-05T00:00:00Z", Revision: 4,
	}}), nil
}

func (f *fakeESM) ListEventSourceMappings(_ context.Context, r *connect.Request[skiffv1.ListEventSourceMappingsRequest]) (*connect.Response[skiffv1.ListEventSourceMappingsResponse], error) {
	f.record("ListEventSourceMappings", r.Header(), r.Peer().Protocol, r.Msg)
	return connect.NewResponse(&skiffv1.ListEventSourceMappingsResponse{Mappings: f.mappings}), nil
}

func (f *fakeESM) UpdateEventSourceMapping(_ context.Context, r *connect.Request[skiffv1.UpdateEventSourceMappingRequest]) (*connect.Response[skiffv1.UpdateEventSourceMappingResponse], error) {
	f.record("UpdateEventSourceMapping", r.Header(), r.Peer().Protocol, r.Msg)
	if f.fail != nil {
		return nil, f.fail
	}
	m := proto.CloneOf(r.Msg.GetMapping())
	m.Uuid, m.Queue, m.FunctionName = r.Msg.GetUuid(), "jobs", "worker"
	return connect.NewResponse(&skiffv1.UpdateEventSourceMappingResponse{Mapping: m}), nil
}

func (f *fakeESM) DeleteEventSourceMapping(_ context.Context, r *connect.Request[skiffv1.DeleteEventSourceMappingRequest]) (*connect.Response[skiffv1.DeleteEventSourceMappingResponse], error) {
	f.record("DeleteEventSourceMapping", r.Header(), r.Peer().Protocol, r.Msg)
	if r.Msg.GetUuid() == "missing" {
		return nil, errs.NotFound("event source mapping %q not found", r.Msg.GetUuid())
	}
	return connect.NewResponse(&skiffv1.DeleteEventSourceMappingResponse{}), nil
}
