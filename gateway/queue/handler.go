package queue

import (
	"context"
	"time"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
)

// Handler returns the QueueService RPC handler. Errors are errs kinds;
// mount it with errs.Interceptor to map them to connect codes.
func (m *Manager) Handler() skiffv1connect.QueueServiceHandler { return handler{m} }

type handler struct{ m *Manager }

var _ skiffv1connect.QueueServiceHandler = handler{}

func (h handler) CreateQueue(ctx context.Context, req *connect.Request[skiffv1.CreateQueueRequest]) (*connect.Response[skiffv1.CreateQueueResponse], error) {
	q, err := h.m.Create(ctx, req.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.CreateQueueResponse{Queue: q}), nil
}

func (h handler) DeleteQueue(ctx context.Context, req *connect.Request[skiffv1.DeleteQueueRequest]) (*connect.Response[skiffv1.DeleteQueueResponse], error) {
	if err := h.m.DeleteQueue(ctx, req.Msg.GetName()); err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.DeleteQueueResponse{}), nil
}

func (h handler) ListQueues(ctx context.Context, req *connect.Request[skiffv1.ListQueuesRequest]) (*connect.Response[skiffv1.ListQueuesResponse], error) {
	return connect.NewResponse(&skiffv1.ListQueuesResponse{Queues: h.m.List(ctx, req.Msg.GetPrefix())}), nil
}

func (h handler) GetQueueAttributes(ctx context.Context, req *connect.Request[skiffv1.GetQueueAttributesRequest]) (*connect.Response[skiffv1.GetQueueAttributesResponse], error) {
	out, err := h.m.Attributes(ctx, req.Msg.GetName())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(out), nil
}

func (h handler) SendMessage(ctx context.Context, req *connect.Request[skiffv1.SendMessageRequest]) (*connect.Response[skiffv1.SendMessageResponse], error) {
	out, err := h.m.Send(ctx, req.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(out), nil
}

func (h handler) SendMessageBatch(ctx context.Context, req *connect.Request[skiffv1.SendMessageBatchRequest]) (*connect.Response[skiffv1.SendMessageBatchResponse], error) {
	out, err := h.m.SendBatch(ctx, req.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(out), nil
}

func (h handler) ReceiveMessage(ctx context.Context, req *connect.Request[skiffv1.ReceiveMessageRequest]) (*connect.Response[skiffv1.ReceiveMessageResponse], error) {
	msgs, err := h.m.Receive(ctx, req.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.ReceiveMessageResponse{Messages: msgs}), nil
}

func (h handler) DeleteMessage(ctx context.Context, req *connect.Request[skiffv1.DeleteMessageRequest]) (*connect.Response[skiffv1.DeleteMessageResponse], error) {
	if err := h.m.Delete(ctx, req.Msg.GetQueue(), req.Msg.GetReceiptHandle()); err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.DeleteMessageResponse{}), nil
}

func (h handler) DeleteMessageBatch(ctx context.Context, req *connect.Request[skiffv1.DeleteMessageBatchRequest]) (*connect.Response[skiffv1.DeleteMessageBatchResponse], error) {
	out, err := h.m.DeleteBatch(ctx, req.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(out), nil
}

func (h handler) ChangeMessageVisibility(ctx context.Context, req *connect.Request[skiffv1.ChangeMessageVisibilityRequest]) (*connect.Response[skiffv1.ChangeMessageVisibilityResponse], error) {
	d := time.Duration(req.Msg.GetVisibilityTimeoutSeconds()) * time.Second
	if err := h.m.ChangeVisibility(ctx, req.Msg.GetQueue(), req.Msg.GetReceiptHandle(), d); err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.ChangeMessageVisibilityResponse{}), nil
}

func (h handler) PurgeQueue(ctx context.Context, req *connect.Request[skiffv1.PurgeQueueRequest]) (*connect.Response[skiffv1.PurgeQueueResponse], error) {
	if err := h.m.Purge(ctx, req.Msg.GetName()); err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.PurgeQueueResponse{}), nil
}

func (h handler) RedriveQueue(ctx context.Context, req *connect.Request[skiffv1.RedriveQueueRequest]) (*connect.Response[skiffv1.RedriveQueueResponse], error) {
	n, err := h.m.Redrive(ctx, req.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&skiffv1.RedriveQueueResponse{Moved: n}), nil
}
