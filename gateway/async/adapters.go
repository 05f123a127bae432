package async

import (
	"context"
	"encoding/base64"
	"strings"
	"unicode/utf8"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/gateway/destinations"
)

// QueueSender sends a message to a customer queue (*queue.Manager).
type QueueSender interface {
	Send(ctx context.Context, req *skiffv1.SendMessageRequest) (*skiffv1.SendMessageResponse, error)
}

// QueueDLQ adapts a customer queue sender to DLQ. The body is the event's
// payload; a payload that is not UTF-8 text is sent base64-encoded with
// the attribute ContentEncoding=base64. On a FIFO queue the group is
// "dead-letters" and the deduplication id the request id, so an event
// dead-lettered twice by at-least-once processing is stored once.
type QueueDLQ struct{ Queues QueueSender }

var _ DLQ = QueueDLQ{}

// Send sends one dead letter.
func (d QueueDLQ) Send(ctx context.Context, queue string, body []byte, attrs map[string]string) error {
	req := &skiffv1.SendMessageRequest{Queue: queue, MessageAttributes: map[string]*skiffv1.MessageAttribute{}}
	if utf8.Valid(body) {
		req.Body = string(body)
	} else {
		req.Body = base64.StdEncoding.EncodeToString(body)
		attrs = mapWith(attrs, "ContentEncoding", "base64")
	}
	if req.Body == "" {
		req.Body = "null" // queues refuse empty bodies; Lambda's payload default is null
	}
	for k, v := range attrs {
		if v == "" {
			continue
		}
		typ := "String"
		if k == "ErrorCode" {
			typ = "Number"
		}
		req.MessageAttributes[k] = &skiffv1.MessageAttribute{DataType: typ, StringValue: v}
	}
	if strings.HasSuffix(queue, ".fifo") {
		req.MessageGroupId = "dead-letters"
		req.MessageDeduplicationId = attrs["RequestID"]
	}
	_, err := d.Queues.Send(ctx, req)
	return err
}

func mapWith(m map[string]string, k, v string) map[string]string {
	out := make(map[string]string, len(m)+1)
	for a, b := range m {
		out[a] = b
	}
	out[k] = v
	return out
}

// FunctionGetter looks a function up (*store.Store, errs.NotFound when
// missing).
type FunctionGetter interface {
	GetFunction(ctx context.Context, name string) (*skiffv1.Function, error)
}

// DestinationInvoker adapts a Service to destinations.AsyncInvoker: the
// function destination accepts an event into the async queues.
type DestinationInvoker struct {
	*Service
	Functions FunctionGetter
}

var _ destinations.AsyncInvoker = DestinationInvoker{}

// Exists reports whether a function exists (errs.NotFound otherwise).
func (d DestinationInvoker) Exists(ctx context.Context, function string) error {
	_, err := d.Functions.GetFunction(ctx, function)
	return err
}
