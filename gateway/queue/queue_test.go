package queue

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

func i32(v int32) *int32 { return proto.Int32(v) }

func TestCreateValidation(t *testing.T) {
	e := newEnv(t)
	e.create(t, "dlq", nil)
	e.create(t, "dlq.fifo", &skiffv1.QueueConfig{Fifo: true})
	tests := []struct {
		name  string
		qname string
		cfg   *skiffv1.QueueConfig
		field string
	}{
		{"empty name", "", nil, "name"},
		{"bad char", "a b", nil, "name"},
		{"dot", "a.b", nil, "name"},
		{"too long", strings.Repeat("a", 81), nil, "name"},
		{"only suffix", ".fifo", &skiffv1.QueueConfig{Fifo: true}, "name"},
		{"fifo flag without suffix", "q", &skiffv1.QueueConfig{Fifo: true}, "name"},
		{"suffix without fifo flag", "q.fifo", nil, "config.fifo"},
		{"content dedup on standard", "q", &skiffv1.QueueConfig{ContentBasedDeduplication: true}, "config.content_based_deduplication"},
		{"visibility high", "q", &skiffv1.QueueConfig{VisibilityTimeoutSeconds: i32(43201)}, "config.visibility_timeout_seconds"},
		{"visibility negative", "q", &skiffv1.QueueConfig{VisibilityTimeoutSeconds: i32(-1)}, "config.visibility_timeout_seconds"},
		{"retention low", "q", &skiffv1.QueueConfig{MessageRetentionSeconds: i32(59)}, "config.message_retention_seconds"},
		{"retention high", "q", &skiffv1.QueueConfig{MessageRetentionSeconds: i32(1209601)}, "config.message_retention_seconds"},
		{"delay high", "q", &skiffv1.QueueConfig{DelaySeconds: i32(901)}, "config.delay_seconds"},
		{"size low", "q", &skiffv1.QueueConfig{MaximumMessageBytes: i32(1023)}, "config.maximum_message_bytes"},
		{"size high", "q", &skiffv1.QueueConfig{MaximumMessageBytes: i32(262145)}, "config.maximum_message_bytes"},
		{"wait high", "q", &skiffv1.QueueConfig{ReceiveWaitSeconds: i32(21)}, "config.receive_wait_seconds"},
		{"dlq empty", "q", &skiffv1.QueueConfig{RedrivePolicy: &skiffv1.RedrivePolicy{MaxReceiveCount: 3}}, "config.redrive_policy.dead_letter_queue"},
		{"dlq missing", "q", &skiffv1.QueueConfig{RedrivePolicy: &skiffv1.RedrivePolicy{DeadLetterQueue: "nope", MaxReceiveCount: 3}}, "config.redrive_policy.dead_letter_queue"},
		{"dlq self", "q", &skiffv1.QueueConfig{RedrivePolicy: &skiffv1.RedrivePolicy{DeadLetterQueue: "q", MaxReceiveCount: 3}}, "config.redrive_policy.dead_letter_queue"},
		{"dlq fifo for standard", "q", &skiffv1.QueueConfig{RedrivePolicy: &skiffv1.RedrivePolicy{DeadLetterQueue: "dlq.fifo", MaxReceiveCount: 3}}, "config.redrive_policy.dead_letter_queue"},
		{"dlq standard for fifo", "q.fifo", &skiffv1.QueueConfig{Fifo: true, RedrivePolicy: &skiffv1.RedrivePolicy{DeadLetterQueue: "dlq", MaxReceiveCount: 3}}, "config.redrive_policy.dead_letter_queue"},
		{"max receives 0", "q", &skiffv1.QueueConfig{RedrivePolicy: &skiffv1.RedrivePolicy{DeadLetterQueue: "dlq", MaxReceiveCount: 0}}, "config.redrive_policy.max_receive_count"},
		{"max receives 1001", "q", &skiffv1.QueueConfig{RedrivePolicy: &skiffv1.RedrivePolicy{DeadLetterQueue: "dlq", MaxReceiveCount: 1001}}, "config.redrive_policy.max_receive_count"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := e.m.Create(testCtx(t), &skiffv1.CreateQueueRequest{Name: tt.qname, Config: tt.cfg})
			wantInvalid(t, "Create", err, tt.field)
		})
	}
	var names []string
	for _, q := range e.m.List(testCtx(t), "") {
		names = append(names, q.GetName())
	}
	if diff := cmp.Diff([]string{"dlq", "dlq.fifo"}, names); diff != "" {
		t.Errorf("queues after rejected creates (-want +got):\n%s", diff)
	}
}

func TestCreateDefaultsAndIdempotence(t *testing.T) {
	e := newEnv(t)
	q := e.create(t, "orders", nil)
	want := &skiffv1.Queue{
		Name: "orders",
		Arn:  "arn:aws:sqs:local:000000000000:orders",
		Config: &skiffv1.QueueConfig{
			VisibilityTimeoutSeconds: i32(30), MessageRetentionSeconds: i32(345600), DelaySeconds: i32(0),
			MaximumMessageBytes: i32(262144), ReceiveWaitSeconds: i32(0),
		},
		Created: e.clock.Now().Format(time.RFC3339Nano),
	}
	if diff := cmp.Diff(want, q, protocmp.Transform()); diff != "" {
		t.Fatalf("created queue (-want +got):\n%s", diff)
	}
	again := e.create(t, "orders", &skiffv1.QueueConfig{VisibilityTimeoutSeconds: i32(30)})
	if diff := cmp.Diff(q, again, protocmp.Transform()); diff != "" {
		t.Errorf("re-create with the same effective config (-first +second):\n%s", diff)
	}
	_, err := e.m.Create(testCtx(t), &skiffv1.CreateQueueRequest{Name: "orders", Config: &skiffv1.QueueConfig{VisibilityTimeoutSeconds: i32(31)}})
	wantKind(t, "re-create with another config", err, errs.KindAlreadyExists)
	a, err := e.m.Attributes(testCtx(t), "orders")
	if err != nil || a.GetQueue().GetConfig().GetVisibilityTimeoutSeconds() != 30 {
		t.Errorf("after a refused re-create: visibility %d, err %v; want 30", a.GetQueue().GetConfig().GetVisibilityTimeoutSeconds(), err)
	}
	if got := e.m.List(testCtx(t), "ord"); len(got) != 1 {
		t.Errorf("List(ord): got %d queues, want 1", len(got))
	}
	if got := e.m.List(testCtx(t), "x"); len(got) != 0 {
		t.Errorf("List(x): got %d queues, want 0", len(got))
	}
	wantKind(t, "Exists(missing)", e.m.Exists(testCtx(t), "missing"), errs.KindNotFound)
	if err := e.m.Exists(testCtx(t), "orders"); err != nil {
		t.Errorf("Exists(orders): %v", err)
	}
}

func TestSendReceiveDelete(t *testing.T) {
	e := newEnv(t)
	e.create(t, "q", nil)
	sent := sendReq(t, e.m, &skiffv1.SendMessageRequest{Queue: "q", Body: "hello", MessageAttributes: map[string]*skiffv1.MessageAttribute{
		"color": {DataType: "String", StringValue: "blue"},
		"n":     {DataType: "Number.int", StringValue: "42"},
		"raw":   {DataType: "Binary", BinaryValue: []byte{0, 1, 2}},
	}})
	if sent.GetMd5OfBody() != "5d41402abc4b2a76b9719d911017c592" {
		t.Errorf("md5 of body: got %s, want 5d41402abc4b2a76b9719d911017c592", sent.GetMd5OfBody())
	}
	if sent.GetSequenceNumber() != "" {
		t.Errorf("standard queue sequence number: got %q, want empty", sent.GetSequenceNumber())
	}
	msgs := receive(t, e.m, "q", 10)
	if len(msgs) != 1 {
		t.Fatalf("receive: got %d messages, want 1", len(msgs))
	}
	got := msgs[0]
	if got.GetMessageId() != sent.GetMessageId() || got.GetBody() != "hello" || got.GetMd5OfBody() != sent.GetMd5OfBody() {
		t.Errorf("received %v, want id %s body hello", got, sent.GetMessageId())
	}
	if diff := cmp.Diff(map[string]string{
		"SentTimestamp":                    strconv.FormatInt(e.clock.Now().UnixMilli(), 10),
		"SenderId":                         "000000000000",
		"ApproximateReceiveCount":          "1",
		"ApproximateFirstReceiveTimestamp": strconv.FormatInt(e.clock.Now().UnixMilli(), 10),
	}, got.GetAttributes()); diff != "" {
		t.Errorf("attributes (-want +got):\n%s", diff)
	}
	if len(got.GetMessageAttributes()) != 3 || got.GetMessageAttributes()["n"].GetStringValue() != "42" || string(got.GetMessageAttributes()["raw"].GetBinaryValue()) != "\x00\x01\x02" {
		t.Errorf("message attributes: got %v", got.GetMessageAttributes())
	}
	if again := receive(t, e.m, "q", 10); len(again) != 0 {
		t.Errorf("second receive within the visibility timeout: got %d messages, want 0", len(again))
	}
	if a := e.attrs(t, "q"); a != [4]int64{0, 1, 0, 0} {
		t.Errorf("attributes while in flight: got %v, want [0 1 0 0]", a)
	}
	if err := e.m.Delete(testCtx(t), "q", got.GetReceiptHandle()); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if err := e.m.Delete(testCtx(t), "q", got.GetReceiptHandle()); err != nil {
		t.Errorf("Delete of a deleted message: %v, want success", err)
	}
	e.clock.Advance(time.Hour)
	if again := receive(t, e.m, "q", 10); len(again) != 0 {
		t.Errorf("receive after delete: got %d messages, want 0", len(again))
	}
	if a := e.attrs(t, "q"); a != [4]int64{0, 0, 0, 0} {
		t.Errorf("attributes after delete: got %v, want zeros", a)
	}
}

func TestVisibilityTimeoutAndStaleHandles(t *testing.T) {
	e := newEnv(t)
	e.create(t, "q", &skiffv1.QueueConfig{VisibilityTimeoutSeconds: i32(30)})
	e.send(t, "q", "m")
	first := receive(t, e.m, "q", 1)
	e.clock.Advance(29 * time.Second)
	if got := receive(t, e.m, "q", 1); len(got) != 0 {
		t.Fatalf("receive at 29s of a 30s timeout: got %d, want 0", len(got))
	}
	e.clock.Advance(time.Second)
	second := receive(t, e.m, "q", 1)
	if len(second) != 1 || second[0].GetAttributes()["ApproximateReceiveCount"] != "2" {
		t.Fatalf("receive at 30s: got %v, want the message with receive count 2", second)
	}
	if first[0].GetAttributes()["ApproximateFirstReceiveTimestamp"] != second[0].GetAttributes()["ApproximateFirstReceiveTimestamp"] {
		t.Errorf("first receive timestamp changed between receives")
	}
	err := e.m.Delete(testCtx(t), "q", first[0].GetReceiptHandle())
	wantReason(t, "Delete with the first receive's handle", err, "stale_receipt_handle")
	wantKind(t, "Delete with a stale handle", err, errs.KindFailedPrecondition)
	err = e.m.ChangeVisibility(testCtx(t), "q", first[0].GetReceiptHandle(), 0)
	wantReason(t, "ChangeVisibility with a stale handle", err, "stale_receipt_handle")
	if err := e.m.Delete(testCtx(t), "q", second[0].GetReceiptHandle()); err != nil {
		t.Fatalf("Delete with the current handle: %v", err)
	}
	e.clock.Advance(time.Hour)
	if got := receive(t, e.m, "q", 1); len(got) != 0 {
		t.Errorf("receive after delete: got %d, want 0", len(got))
	}
}

func TestVisibilityOverrideAndChange(t *testing.T) {
	e := newEnv(t)
	e.create(t, "q", nil)
	e.send(t, "q", "m")
	ctx := testCtx(t)
	msgs, err := e.m.Receive(ctx, &skiffv1.ReceiveMessageRequest{Queue: "q", VisibilityTimeoutSeconds: i32(5)})
	if err != nil || len(msgs) != 1 {
		t.Fatalf("receive with visibility 5: %v, %d messages", err, len(msgs))
	}
	e.clock.Advance(5 * time.Second)
	msgs = receive(t, e.m, "q", 1)
	if len(msgs) != 1 {
		t.Fatalf("receive after the 5s override: got %d, want 1", len(msgs))
	}
	// Extend: not visible at the queue's 30 s, visible at 100 s.
	if err := e.m.ChangeVisibility(ctx, "q", msgs[0].GetReceiptHandle(), 100*time.Second); err != nil {
		t.Fatalf("ChangeVisibility(100s): %v", err)
	}
	e.clock.Advance(31 * time.Second)
	if got := receive(t, e.m, "q", 1); len(got) != 0 {
		t.Fatalf("receive at 31s of an extended 100s: got %d, want 0", len(got))
	}
	// Back to 0: visible at once.
	if err := e.m.ChangeVisibility(ctx, "q", msgs[0].GetReceiptHandle(), 0); err != nil {
		t.Fatalf("ChangeVisibility(0): %v", err)
	}
	if a := e.attrs(t, "q"); a[0] != 1 || a[1] != 0 {
		t.Errorf("attributes after visibility 0: got %v, want 1 visible 0 in flight", a)
	}
	// Not in flight any more: changing it fails.
	err = e.m.ChangeVisibility(ctx, "q", msgs[0].GetReceiptHandle(), 10*time.Second)
	wantReason(t, "ChangeVisibility of a visible message", err, "message_not_in_flight")
	msgs = receive(t, e.m, "q", 1)
	if len(msgs) != 1 || msgs[0].GetAttributes()["ApproximateReceiveCount"] != "3" {
		t.Fatalf("receive after visibility 0: got %v, want the message, receive count 3", msgs)
	}
	// Receive with visibility 0: visible at once again.
	msgs, err = e.m.Receive(ctx, &skiffv1.ReceiveMessageRequest{Queue: "q", VisibilityTimeoutSeconds: i32(0)})
	if err != nil || len(msgs) != 0 {
		t.Fatalf("receive while in flight: %v, %d messages, want 0", err, len(msgs))
	}
	e.clock.Advance(30 * time.Second)
	msgs, err = e.m.Receive(ctx, &skiffv1.ReceiveMessageRequest{Queue: "q", VisibilityTimeoutSeconds: i32(0)})
	if err != nil || len(msgs) != 1 {
		t.Fatalf("receive with visibility 0: %v, %d messages, want 1", err, len(msgs))
	}
	if got := receive(t, e.m, "q", 1); len(got) != 1 {
		t.Fatalf("receive after a visibility-0 receive: got %d, want 1", len(got))
	}
	for _, d := range []time.Duration{-time.Second, 43201 * time.Second} {
		err := e.m.ChangeVisibility(ctx, "q", msgs[0].GetReceiptHandle(), d)
		wantInvalid(t, fmt.Sprintf("ChangeVisibility(%v)", d), err, "visibility_timeout_seconds")
	}
}

func TestDelays(t *testing.T) {
	e := newEnv(t)
	e.create(t, "delayed", &skiffv1.QueueConfig{DelaySeconds: i32(10)})
	e.create(t, "plain", nil)
	e.send(t, "delayed", "queue-delay")
	sendReq(t, e.m, &skiffv1.SendMessageRequest{Queue: "delayed", Body: "no-delay", DelaySeconds: i32(0)})
	sendReq(t, e.m, &skiffv1.SendMessageRequest{Queue: "plain", Body: "msg-delay", DelaySeconds: i32(5)})
	if a := e.attrs(t, "delayed"); a != [4]int64{1, 0, 1, 0} {
		t.Errorf("delayed queue attributes: got %v, want [1 0 1 0]", a)
	}
	if got := bodies(receive(t, e.m, "delayed", 10)); !cmp.Equal(got, []string{"no-delay"}) {
		t.Errorf("receive at 0s: got %v, want [no-delay]", got)
	}
	if got := receive(t, e.m, "plain", 10); len(got) != 0 {
		t.Errorf("receive of a 5s-delayed message at 0s: got %d, want 0", len(got))
	}
	e.clock.Advance(5 * time.Second)
	if got := bodies(receive(t, e.m, "plain", 10)); !cmp.Equal(got, []string{"msg-delay"}) {
		t.Errorf("receive at 5s: got %v, want [msg-delay]", got)
	}
	if got := receive(t, e.m, "delayed", 10); len(got) != 0 {
		t.Errorf("receive of a 10s-delayed message at 5s: got %d, want 0", len(got))
	}
	e.clock.Advance(5 * time.Second)
	if got := bodies(receive(t, e.m, "delayed", 10)); !cmp.Equal(got, []string{"queue-delay"}) {
		t.Errorf("receive at 10s: got %v, want [queue-delay]", got)
	}
	for _, d := range []int32{-1, 901} {
		_, err := e.m.Send(testCtx(t), &skiffv1.SendMessageRequest{Queue: "plain", Body: "x", DelaySeconds: i32(d)})
		wantInvalid(t, fmt.Sprintf("delay %d", d), err, "delay_seconds")
	}
}

func TestRetention(t *testing.T) {
	e := newEnv(t)
	e.create(t, "q", &skiffv1.QueueConfig{MessageRetentionSeconds: i32(60), VisibilityTimeoutSeconds: i32(120)})
	e.send(t, "q", "old")
	receive(t, e.m, "q", 1) // in flight: retention applies all the same
	e.clock.Advance(30 * time.Second)
	e.send(t, "q", "young")
	if a := e.attrs(t, "q"); a != [4]int64{1, 1, 0, 30} {
		t.Errorf("attributes at 30s: got %v, want [1 1 0 30]", a)
	}
	e.clock.Advance(30 * time.Second)
	if a := e.attrs(t, "q"); a != [4]int64{1, 0, 0, 30} {
		t.Errorf("attributes at 60s: got %v, want [1 0 0 30] (the old message expired)", a)
	}
	if n := e.m.sweep(testCtx(t)); n != 1 {
		t.Errorf("sweep at 60s: deleted %d, want 1", n)
	}
	info, err := e.m.stream.Info(testCtx(t))
	if err != nil || info.State.Msgs != 1 {
		t.Errorf("stream after the sweep: %d messages (err %v), want 1", info.State.Msgs, err)
	}
	e.clock.Advance(30 * time.Second)
	// Expired messages are never returned, swept or not.
	if got := receive(t, e.m, "q", 10); len(got) != 0 {
		t.Errorf("receive at 90s: got %v, want nothing", bodies(got))
	}
	eventually(t, "the expired message deleted from the stream", func() bool {
		info, err := e.m.stream.Info(testCtx(t))
		return err == nil && info.State.Msgs == 0
	})
}

func TestMaxMessageSizeAndBody(t *testing.T) {
	e := newEnv(t)
	e.create(t, "small", &skiffv1.QueueConfig{MaximumMessageBytes: i32(1024)})
	e.send(t, "small", strings.Repeat("x", 1024))
	tests := []struct {
		name  string
		req   *skiffv1.SendMessageRequest
		field string
	}{
		{"too big", &skiffv1.SendMessageRequest{Body: strings.Repeat("x", 1025)}, "body"},
		{"attributes count", &skiffv1.SendMessageRequest{Body: strings.Repeat("x", 1020), MessageAttributes: map[string]*skiffv1.MessageAttribute{"a": {DataType: "String", StringValue: "bc"}}}, "body"},
		{"empty", &skiffv1.SendMessageRequest{Body: ""}, "body"},
		{"bad char", &skiffv1.SendMessageRequest{Body: "a\x00b"}, "body"},
		{"bad utf8", &skiffv1.SendMessageRequest{Body: "a\xffb"}, "body"},
		{"group on standard", &skiffv1.SendMessageRequest{Body: "x", MessageGroupId: "g"}, "message_group_id"},
		{"dedup on standard", &skiffv1.SendMessageRequest{Body: "x", MessageDeduplicationId: "d"}, "message_deduplication_id"},
		{"attr type", &skiffv1.SendMessageRequest{Body: "x", MessageAttributes: map[string]*skiffv1.MessageAttribute{"a": {DataType: "Str", StringValue: "v"}}}, "message_attributes"},
		{"attr number", &skiffv1.SendMessageRequest{Body: "x", MessageAttributes: map[string]*skiffv1.MessageAttribute{"a": {DataType: "Number", StringValue: "ten"}}}, "message_attributes"},
		{"attr binary empty", &skiffv1.SendMessageRequest{Body: "x", MessageAttributes: map[string]*skiffv1.MessageAttribute{"a": {DataType: "Binary"}}}, "message_attributes"},
		{"attr string empty", &skiffv1.SendMessageRequest{Body: "x", MessageAttributes: map[string]*skiffv1.MessageAttribute{"a": {DataType: "String"}}}, "message_attributes"},
		{"attr reserved name", &skiffv1.SendMessageRequest{Body: "x", MessageAttributes: map[string]*skiffv1.MessageAttribute{"AWS.x": {DataType: "String", StringValue: "v"}}}, "message_attributes"},
		{"attr name dots", &skiffv1.SendMessageRequest{Body: "x", MessageAttributes: map[string]*skiffv1.MessageAttribute{"a..b": {DataType: "String", StringValue: "v"}}}, "message_attributes"},
		{"attr nil", &skiffv1.SendMessageRequest{Body: "x", MessageAttributes: map[string]*skiffv1.MessageAttribute{"a": nil}}, "message_attributes"},
		{"too many attrs", &skiffv1.SendMessageRequest{Body: "x", MessageAttributes: func() map[string]*skiffv1.MessageAttribute {
			m := map[string]*skiffv1.MessageAttribute{}
			for i := range 11 {
				m[fmt.Sprint("a", i)] = &skiffv1.MessageAttribute{DataType: "String", StringValue: "v"}
			}
			return m
		}()}, "message_attributes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.req.Queue = "small"
			_, err := e.m.Send(testCtx(t), tt.req)
			wantInvalid(t, "Send", err, tt.field)
		})
	}
	_, err := e.m.Send(testCtx(t), &skiffv1.SendMessageRequest{Queue: "missing", Body: "x"})
	wantKind(t, "Send to a missing queue", err, errs.KindNotFound)
	_, err = e.m.Send(testCtx(t), &skiffv1.SendMessageRequest{Queue: "bad name", Body: "x"})
	wantInvalid(t, "Send to a bad name", err, "queue")
	if a := e.attrs(t, "small"); a[0] != 1 {
		t.Errorf("messages after rejected sends: got %d, want 1", a[0])
	}
}

func TestReceiveValidation(t *testing.T) {
	e := newEnv(t)
	e.create(t, "q", nil)
	e.create(t, "other", nil)
	ctx := testCtx(t)
	for _, tt := range []struct {
		req   *skiffv1.ReceiveMessageRequest
		field string
	}{
		{&skiffv1.ReceiveMessageRequest{Queue: "q", MaxMessages: 11}, "max_messages"},
		{&skiffv1.ReceiveMessageRequest{Queue: "q", MaxMessages: -1}, "max_messages"},
		{&skiffv1.ReceiveMessageRequest{Queue: "q", WaitSeconds: i32(21)}, "wait_seconds"},
		{&skiffv1.ReceiveMessageRequest{Queue: "q", VisibilityTimeoutSeconds: i32(43201)}, "visibility_timeout_seconds"},
		{&skiffv1.ReceiveMessageRequest{Queue: ""}, "queue"},
	} {
		_, err := e.m.Receive(ctx, tt.req)
		wantInvalid(t, fmt.Sprintf("Receive(%v)", tt.req), err, tt.field)
	}
	e.send(t, "other", "x")
	msg := receive(t, e.m, "other", 1)[0]
	for _, h := range []string{"", "garbage!", msg.GetReceiptHandle()} {
		err := e.m.Delete(ctx, "q", h)
		wantInvalid(t, fmt.Sprintf("Delete(q, %q)", h), err, "receipt_handle")
	}
}

func TestRedriveToDeadLetterQueueAndBack(t *testing.T) {
	e := newEnv(t)
	e.create(t, "dlq", &skiffv1.QueueConfig{MessageRetentionSeconds: i32(1209600)})
	e.create(t, "src", &skiffv1.QueueConfig{RedrivePolicy: &skiffv1.RedrivePolicy{DeadLetterQueue: "dlq", MaxReceiveCount: 2}})
	sent := sendReq(t, e.m, &skiffv1.SendMessageRequest{Queue: "src", Body: "poison", MessageAttributes: map[string]*skiffv1.MessageAttribute{
		"k": {DataType: "String", StringValue: "v"},
	}})
	sentAt := strconv.FormatInt(e.clock.Now().UnixMilli(), 10)
	e.send(t, "src", "good")
	for i := 1; i <= 2; i++ {
		msgs := receive(t, e.m, "src", 10)
		var found bool
		for _, m := range msgs {
			if m.GetBody() == "good" {
				if err := e.m.Delete(testCtx(t), "src", m.GetReceiptHandle()); err != nil {
					t.Fatal(err)
				}
			} else if m.GetBody() == "poison" {
				found = true
				if got := m.GetAttributes()["ApproximateReceiveCount"]; got != strconv.Itoa(i) {
					t.Errorf("receive %d: receive count %s", i, got)
				}
			}
		}
		if !found {
			t.Fatalf("receive %d: poison message not received (got %v)", i, bodies(msgs))
		}
		e.clock.Advance(30 * time.Second)
	}
	// The third receive moves it.
	if got := receive(t, e.m, "src", 10); len(got) != 0 {
		t.Fatalf("third receive: got %v, want nothing (moved to the DLQ)", bodies(got))
	}
	if a := e.attrs(t, "src"); a != [4]int64{0, 0, 0, 0} {
		t.Errorf("source attributes after the move: got %v, want zeros", a)
	}
	if a := e.attrs(t, "dlq"); a[0] != 1 {
		t.Errorf("dlq attributes after the move: got %v, want 1 visible", a)
	}
	dl := receive(t, e.m, "dlq", 10)
	if len(dl) != 1 {
		t.Fatalf("dlq receive: got %d, want 1", len(dl))
	}
	if dl[0].GetMessageId() != sent.GetMessageId() || dl[0].GetBody() != "poison" ||
		dl[0].GetMessageAttributes()["k"].GetStringValue() != "v" || dl[0].GetAttributes()["SentTimestamp"] != sentAt ||
		dl[0].GetAttributes()["ApproximateReceiveCount"] != "1" {
		t.Errorf("dead-lettered message: got %v; want id %s, body poison, attribute k=v, sent %s, receive count 1", dl[0], sent.GetMessageId(), sentAt)
	}
	err := e.m.DeleteQueue(testCtx(t), "dlq")
	wantReason(t, "DeleteQueue of a queue in use as a DLQ", err, "queue_in_use")
	if err := e.m.Exists(testCtx(t), "dlq"); err != nil {
		t.Fatalf("dlq after refused delete: %v", err)
	}

	// In flight in the DLQ: not moved back until visible.
	n, err := e.m.Redrive(testCtx(t), &skiffv1.RedriveQueueRequest{DeadLetterQueue: "dlq"})
	if err != nil || n != 0 {
		t.Fatalf("redrive with the message in flight: moved %d, err %v; want 0", n, err)
	}
	e.clock.Advance(30 * time.Second)
	n, err = e.m.Redrive(testCtx(t), &skiffv1.RedriveQueueRequest{DeadLetterQueue: "dlq"})
	if err != nil || n != 1 {
		t.Fatalf("redrive: moved %d, err %v; want 1", n, err)
	}
	back := receive(t, e.m, "src", 10)
	if len(back) != 1 || back[0].GetMessageId() != sent.GetMessageId() || back[0].GetAttributes()["ApproximateReceiveCount"] != "1" {
		t.Fatalf("redriven message: got %v, want id %s with receive count 1", back, sent.GetMessageId())
	}
	if a := e.attrs(t, "dlq"); a != [4]int64{0, 0, 0, 0} {
		t.Errorf("dlq after redrive: got %v, want zeros", a)
	}

	_, err = e.m.Redrive(testCtx(t), &skiffv1.RedriveQueueRequest{DeadLetterQueue: "src"})
	wantInvalid(t, "redrive of a queue no one uses as a DLQ", err, "destination")
	_, err = e.m.Redrive(testCtx(t), &skiffv1.RedriveQueueRequest{DeadLetterQueue: "dlq", Destination: "dlq"})
	wantInvalid(t, "redrive into itself", err, "destination")
	_, err = e.m.Redrive(testCtx(t), &skiffv1.RedriveQueueRequest{DeadLetterQueue: "dlq", Destination: "nope"})
	wantKind(t, "redrive into a missing queue", err, errs.KindNotFound)
}

func TestPurgeAndDeleteQueue(t *testing.T) {
	e := newEnv(t)
	e.create(t, "q", nil)
	for i := range 3 {
		e.send(t, "q", fmt.Sprint("old", i))
	}
	receive(t, e.m, "q", 1)
	if err := e.m.Purge(testCtx(t), "q"); err != nil {
		t.Fatalf("Purge: %v", err)
	}
	if a := e.attrs(t, "q"); a != [4]int64{0, 0, 0, 0} {
		t.Errorf("attributes after purge: got %v, want zeros", a)
	}
	e.clock.Advance(time.Hour)
	if got := receive(t, e.m, "q", 10); len(got) != 0 {
		t.Errorf("receive after purge: got %v, want nothing", bodies(got))
	}
	e.send(t, "q", "new")
	if got := bodies(receive(t, e.m, "q", 10)); !cmp.Equal(got, []string{"new"}) {
		t.Errorf("receive after purge and send: got %v, want [new]", got)
	}
	// Delete and re-create: nothing of the old queue comes back.
	e.send(t, "q", "before-delete")
	if err := e.m.DeleteQueue(testCtx(t), "q"); err != nil {
		t.Fatalf("DeleteQueue: %v", err)
	}
	wantKind(t, "Exists after delete", e.m.Exists(testCtx(t), "q"), errs.KindNotFound)
	_, err := e.m.Send(testCtx(t), &skiffv1.SendMessageRequest{Queue: "q", Body: "x"})
	wantKind(t, "Send after delete", err, errs.KindNotFound)
	wantKind(t, "DeleteQueue again", e.m.DeleteQueue(testCtx(t), "q"), errs.KindNotFound)
	wantKind(t, "Purge of a missing queue", e.m.Purge(testCtx(t), "q"), errs.KindNotFound)
	e.create(t, "q", nil)
	e.clock.Advance(time.Hour)
	if got := receive(t, e.m, "q", 10); len(got) != 0 {
		t.Errorf("receive from the re-created queue: got %v, want nothing", bodies(got))
	}
}

func TestBatches(t *testing.T) {
	e := newEnv(t)
	e.create(t, "q", nil)
	ctx := testCtx(t)
	resp, err := e.m.SendBatch(ctx, &skiffv1.SendMessageBatchRequest{Queue: "q", Entries: []*skiffv1.SendMessageBatchEntry{
		{Id: "a", Body: "one"},
		{Id: "b", Body: ""},
		{Id: "c", Body: "three", DelaySeconds: i32(5)},
		{Id: "d", Body: "four", MessageAttributes: map[string]*skiffv1.MessageAttribute{"x": {DataType: "Number", StringValue: "nan?"}}},
	}})
	if err != nil {
		t.Fatalf("SendBatch: %v", err)
	}
	var okIDs []string
	for _, s := range resp.GetSuccessful() {
		okIDs = append(okIDs, s.GetId())
		if s.GetMessageId() == "" || s.GetMd5OfBody() == "" {
			t.Errorf("entry %s: no message id or md5", s.GetId())
		}
	}
	if !cmp.Equal(okIDs, []string{"a", "c"}) {
		t.Errorf("successful entries: got %v, want [a c]", okIDs)
	}
	wantFailed := []*skiffv1.BatchResultError{
		{Id: "b", Code: "invalid_body", SenderFault: true},
		{Id: "d", Code: "invalid_message_attributes", SenderFault: true},
	}
	if diff := cmp.Diff(wantFailed, resp.GetFailed(), protocmp.Transform(), protocmp.IgnoreFields(&skiffv1.BatchResultError{}, "message")); diff != "" {
		t.Errorf("failed entries (-want +got):\n%s", diff)
	}
	big := strings.Repeat("x", 200000)
	for _, tt := range []struct {
		name    string
		entries []*skiffv1.SendMessageBatchEntry
	}{
		{"empty", nil},
		{"eleven", func() []*skiffv1.SendMessageBatchEntry {
			var out []*skiffv1.SendMessageBatchEntry
			for i := range 11 {
				out = append(out, &skiffv1.SendMessageBatchEntry{Id: fmt.Sprint(i), Body: "x"})
			}
			return out
		}()},
		{"duplicate ids", []*skiffv1.SendMessageBatchEntry{{Id: "a", Body: "x"}, {Id: "a", Body: "y"}}},
		{"bad id", []*skiffv1.SendMessageBatchEntry{{Id: "a b", Body: "x"}}},
		{"too big in total", []*skiffv1.SendMessageBatchEntry{{Id: "a", Body: big}, {Id: "b", Body: big}}},
	} {
		_, err := e.m.SendBatch(ctx, &skiffv1.SendMessageBatchRequest{Queue: "q", Entries: tt.entries})
		wantInvalid(t, "SendBatch "+tt.name, err, "entries")
	}
	if a := e.attrs(t, "q"); a != [4]int64{1, 0, 1, 0} {
		t.Errorf("attributes after the batches: got %v, want [1 0 1 0]", a)
	}
	e.clock.Advance(5 * time.Second)
	msgs := receive(t, e.m, "q", 10)
	if len(msgs) != 2 {
		t.Fatalf("receive: got %d, want 2", len(msgs))
	}
	del, err := e.m.DeleteBatch(ctx, &skiffv1.DeleteMessageBatchRequest{Queue: "q", Entries: []*skiffv1.DeleteMessageBatchEntry{
		{Id: "x", ReceiptHandle: msgs[0].GetReceiptHandle()},
		{Id: "y", ReceiptHandle: "bogus"},
		{Id: "z", ReceiptHandle: msgs[1].GetReceiptHandle()},
	}})
	if err != nil {
		t.Fatalf("DeleteBatch: %v", err)
	}
	if !cmp.Equal(del.GetSuccessful(), []string{"x", "z"}) || len(del.GetFailed()) != 1 || del.GetFailed()[0].GetId() != "y" ||
		del.GetFailed()[0].GetCode() != "invalid_receipt_handle" || !del.GetFailed()[0].GetSenderFault() {
		t.Errorf("DeleteBatch: got %v", del)
	}
	_, err = e.m.DeleteBatch(ctx, &skiffv1.DeleteMessageBatchRequest{Queue: "q"})
	wantInvalid(t, "empty DeleteBatch", err, "entries")
	if a := e.attrs(t, "q"); a != [4]int64{0, 0, 0, 0} {
		t.Errorf("attributes after DeleteBatch: got %v, want zeros", a)
	}
}

func TestLongPoll(t *testing.T) {
	e := newEnv(t)
	e.create(t, "q", &skiffv1.QueueConfig{ReceiveWaitSeconds: i32(20)})
	ctx := testCtx(t)
	type result struct {
		msgs []*skiffv1.Message
		err  error
		took time.Duration
	}
	poll := func(req *skiffv1.ReceiveMessageRequest) chan result {
		ch := make(chan result, 1)
		go func() {
			start := time.Now()
			msgs, err := e.m.Receive(ctx, req)
			ch <- result{msgs, err, time.Since(start)}
		}()
		return ch
	}
	// The queue's default wait (20 s) applies: a message sent meanwhile ends it.
	ch := poll(&skiffv1.ReceiveMessageRequest{Queue: "q"})
	e.send(t, "q", "wake")
	r := <-ch
	if r.err != nil || len(r.msgs) != 1 || r.took > 5*time.Second {
		t.Fatalf("long poll with a send: %d messages, err %v, took %v", len(r.msgs), r.err, r.took)
	}
	// A visibility timeout ending (on the injected clock) ends it too.
	ch = poll(&skiffv1.ReceiveMessageRequest{Queue: "q", WaitSeconds: i32(20)})
	e.clock.Advance(30 * time.Second)
	r = <-ch
	if r.err != nil || len(r.msgs) != 1 || r.msgs[0].GetAttributes()["ApproximateReceiveCount"] != "2" {
		t.Fatalf("long poll across a visibility timeout: %v, err %v", r.msgs, r.err)
	}
	// A short wait ends empty after about the wait.
	r = <-poll(&skiffv1.ReceiveMessageRequest{Queue: "q", WaitSeconds: i32(1)})
	if r.err != nil || len(r.msgs) != 0 || r.took < time.Second || r.took > 5*time.Second {
		t.Fatalf("long poll of 1s on an empty queue: %d messages, err %v, took %v", len(r.msgs), r.err, r.took)
	}
}

func TestFIFOOrderAndGroups(t *testing.T) {
	e := newEnv(t)
	e.create(t, "q.fifo", &skiffv1.QueueConfig{Fifo: true})
	send := func(group, body string) *skiffv1.SendMessageResponse {
		return sendReq(t, e.m, &skiffv1.SendMessageRequest{Queue: "q.fifo", Body: body, MessageGroupId: group, MessageDeduplicationId: body})
	}
	r1 := send("A", "a1")
	send("A", "a2")
	send("B", "b1")
	send("A", "a3")
	if r1.GetSequenceNumber() == "" || len(r1.GetSequenceNumber()) != 20 {
		t.Errorf("sequence number: got %q, want 20 digits", r1.GetSequenceNumber())
	}
	// One message: the head of the first group.
	first := receive(t, e.m, "q.fifo", 1)
	if got := bodies(first); !cmp.Equal(got, []string{"a1"}) {
		t.Fatalf("first receive: got %v, want [a1]", got)
	}
	if first[0].GetAttributes()["MessageGroupId"] != "A" || first[0].GetAttributes()["MessageDeduplicationId"] != "a1" ||
		first[0].GetAttributes()["SequenceNumber"] != r1.GetSequenceNumber() {
		t.Errorf("FIFO attributes: got %v", first[0].GetAttributes())
	}
	// Group A has a batch in flight: only B is served.
	if got := bodies(receive(t, e.m, "q.fifo", 10)); !cmp.Equal(got, []string{"b1"}) {
		t.Fatalf("second receive: got %v, want [b1]", got)
	}
	if got := receive(t, e.m, "q.fifo", 10); len(got) != 0 {
		t.Fatalf("third receive: got %v, want nothing (both groups in flight)", bodies(got))
	}
	// a1's timeout ends without a delete: a1 comes back before a2.
	e.clock.Advance(30 * time.Second)
	again := receive(t, e.m, "q.fifo", 10)
	if got := bodies(again); !cmp.Equal(got, []string{"a1", "a2", "b1", "a3"}) {
		t.Fatalf("receive after the timeouts: got %v, want [a1 a2 b1 a3] (stream order)", got)
	}
	if again[0].GetAttributes()["ApproximateReceiveCount"] != "2" {
		t.Errorf("a1 receive count: got %s, want 2", again[0].GetAttributes()["ApproximateReceiveCount"])
	}
	// Delete a1 only: a2 and a3 are still in flight, so A stays blocked.
	if err := e.m.Delete(testCtx(t), "q.fifo", again[0].GetReceiptHandle()); err != nil {
		t.Fatal(err)
	}
	if got := receive(t, e.m, "q.fifo", 10); len(got) != 0 {
		t.Fatalf("receive with a2, a3 in flight: got %v, want nothing", bodies(got))
	}
	for _, m := range again[1:] {
		if err := e.m.Delete(testCtx(t), "q.fifo", m.GetReceiptHandle()); err != nil {
			t.Fatal(err)
		}
	}
	send("A", "a4")
	if got := bodies(receive(t, e.m, "q.fifo", 10)); !cmp.Equal(got, []string{"a4"}) {
		t.Fatalf("receive after deleting all: got %v, want [a4]", got)
	}
}

func TestFIFODeduplication(t *testing.T) {
	e := newEnv(t)
	e.create(t, "ids.fifo", &skiffv1.QueueConfig{Fifo: true})
	e.create(t, "content.fifo", &skiffv1.QueueConfig{Fifo: true, ContentBasedDeduplication: true, DelaySeconds: i32(2)})
	a := sendReq(t, e.m, &skiffv1.SendMessageRequest{Queue: "ids.fifo", Body: "x", MessageGroupId: "g", MessageDeduplicationId: "d1"})
	b := sendReq(t, e.m, &skiffv1.SendMessageRequest{Queue: "ids.fifo", Body: "other body", MessageGroupId: "g", MessageDeduplicationId: "d1"})
	if a.GetMessageId() != b.GetMessageId() || a.GetSequenceNumber() != b.GetSequenceNumber() {
		t.Errorf("duplicate send: got id %s seq %s, want the first's %s %s", b.GetMessageId(), b.GetSequenceNumber(), a.GetMessageId(), a.GetSequenceNumber())
	}
	sendReq(t, e.m, &skiffv1.SendMessageRequest{Queue: "ids.fifo", Body: "x", MessageGroupId: "g", MessageDeduplicationId: "d2"})
	// The same dedup id on another queue is another message.
	sendReq(t, e.m, &skiffv1.SendMessageRequest{Queue: "content.fifo", Body: "x", MessageGroupId: "g", MessageDeduplicationId: "d1"})
	sendReq(t, e.m, &skiffv1.SendMessageRequest{Queue: "content.fifo", Body: "y", MessageGroupId: "g"})
	sendReq(t, e.m, &skiffv1.SendMessageRequest{Queue: "content.fifo", Body: "y", MessageGroupId: "h"})
	if a := e.attrs(t, "ids.fifo"); a[0] != 2 {
		t.Errorf("ids.fifo messages: got %d, want 2", a[0])
	}
	if a := e.attrs(t, "content.fifo"); a[2] != 2 {
		t.Errorf("content.fifo delayed messages: got %d, want 2", a[2])
	}
	e.clock.Advance(2 * time.Second)
	msgs := receive(t, e.m, "content.fifo", 10)
	if got := bodies(msgs); !cmp.Equal(got, []string{"x", "y"}) {
		t.Errorf("content.fifo: got %v, want [x y]", got)
	}
	if msgs[1].GetAttributes()["MessageDeduplicationId"] != "a1fce4363854ff888cff4b8e7875d600c2682390412a8cf79b37d0b11148b0fa" {
		t.Errorf("content dedup id: got %s, want the body's sha256", msgs[1].GetAttributes()["MessageDeduplicationId"])
	}
	for _, tt := range []struct {
		name  string
		req   *skiffv1.SendMessageRequest
		field string
	}{
		{"no group", &skiffv1.SendMessageRequest{Queue: "ids.fifo", Body: "x", MessageDeduplicationId: "d"}, "message_group_id"},
		{"no dedup", &skiffv1.SendMessageRequest{Queue: "ids.fifo", Body: "x", MessageGroupId: "g"}, "message_deduplication_id"},
		{"message delay", &skiffv1.SendMessageRequest{Queue: "ids.fifo", Body: "x", MessageGroupId: "g", MessageDeduplicationId: "d", DelaySeconds: i32(0)}, "delay_seconds"},
		{"group too long", &skiffv1.SendMessageRequest{Queue: "ids.fifo", Body: "x", MessageGroupId: strings.Repeat("g", 129), MessageDeduplicationId: "d"}, "message_group_id"},
		{"dedup space", &skiffv1.SendMessageRequest{Queue: "ids.fifo", Body: "x", MessageGroupId: "g", MessageDeduplicationId: "a b"}, "message_deduplication_id"},
	} {
		_, err := e.m.Send(testCtx(t), tt.req)
		wantInvalid(t, tt.name, err, tt.field)
	}
}

func TestFIFODeadLetter(t *testing.T) {
	e := newEnv(t)
	e.create(t, "dlq.fifo", &skiffv1.QueueConfig{Fifo: true})
	e.create(t, "q.fifo", &skiffv1.QueueConfig{Fifo: true, ContentBasedDeduplication: true,
		RedrivePolicy: &skiffv1.RedrivePolicy{DeadLetterQueue: "dlq.fifo", MaxReceiveCount: 1}})
	sendReq(t, e.m, &skiffv1.SendMessageRequest{Queue: "q.fifo", Body: "p", MessageGroupId: "g"})
	sendReq(t, e.m, &skiffv1.SendMessageRequest{Queue: "q.fifo", Body: "n", MessageGroupId: "g"})
	if got := bodies(receive(t, e.m, "q.fifo", 1)); !cmp.Equal(got, []string{"p"}) {
		t.Fatalf("first receive: got %v, want [p]", got)
	}
	e.clock.Advance(30 * time.Second)
	// p exceeded its receives: it moves and the group goes on with n.
	if got := bodies(receive(t, e.m, "q.fifo", 1)); !cmp.Equal(got, []string{"n"}) {
		t.Fatalf("second receive: got %v, want [n]", got)
	}
	dl := receive(t, e.m, "dlq.fifo", 10)
	if len(dl) != 1 || dl[0].GetBody() != "p" || dl[0].GetAttributes()["MessageGroupId"] != "g" {
		t.Fatalf("dlq: got %v, want p in group g", dl)
	}
}

func TestManyReceiversTwoManagers(t *testing.T) {
	e := newEnv(t)
	other := e.manager(t) // a second gateway on the same storage
	e.create(t, "q", nil)
	const n = 200
	for i := range n {
		e.send(t, "q", strconv.Itoa(i))
	}
	eventually(t, "the second manager sees the queue and its messages", func() bool {
		a, err := other.Attributes(testCtx(t), "q")
		return err == nil && a.GetApproximateMessages() == n
	})
	type got struct {
		body string
		m    *Manager
	}
	results := make(chan []got, 8)
	for w := range 8 {
		m := e.m
		if w%2 == 1 {
			m = other
		}
		go func() {
			var mine []got
			for {
				msgs, err := m.Receive(testCtx(t), &skiffv1.ReceiveMessageRequest{Queue: "q", MaxMessages: 10, WaitSeconds: i32(0)})
				if err != nil {
					t.Errorf("Receive: %v", err)
					break
				}
				if len(msgs) == 0 {
					break
				}
				for _, msg := range msgs {
					mine = append(mine, got{msg.GetBody(), m})
					if err := m.Delete(testCtx(t), "q", msg.GetReceiptHandle()); err != nil {
						t.Errorf("Delete: %v", err)
					}
				}
			}
			results <- mine
		}()
	}
	seen := map[string]int{}
	for range 8 {
		for _, g := range <-results {
			seen[g.body]++
		}
	}
	for i := range n {
		if c := seen[strconv.Itoa(i)]; c != 1 {
			t.Errorf("message %d received %d times, want once", i, c)
		}
	}
	if len(seen) != n {
		t.Errorf("distinct messages received: got %d, want %d", len(seen), n)
	}
}

func TestPersistsAcrossRestart(t *testing.T) {
	e := newEnv(t)
	e.create(t, "q", nil)
	e.send(t, "q", "kept")
	e.send(t, "q", "inflight")
	msgs := receive(t, e.m, "q", 1)
	if len(msgs) != 1 {
		t.Fatal("no message")
	}
	if err := e.m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := e.st.Close(); err != nil {
		t.Fatal(err)
	}
	e2 := &env{clock: e.clock, dir: e.dir}
	st, err := storeOpen(t, e.dir)
	if err != nil {
		t.Fatalf("reopening the store: %v", err)
	}
	e2.st = st
	e2.m = e2.manager(t)
	if a := e2.attrs(t, "q"); a != [4]int64{1, 1, 0, 0} {
		t.Errorf("attributes after restart: got %v, want [1 1 0 0]", a)
	}
	if err := e2.m.Delete(testCtx(t), "q", msgs[0].GetReceiptHandle()); err != nil {
		t.Errorf("Delete with a handle from before the restart: %v", err)
	}
	rest := receive(t, e2.m, "q", 10)
	if len(rest) != 1 || rest[0].GetBody() == msgs[0].GetBody() {
		t.Errorf("after restart: got %v, want the other message", bodies(rest))
	}
}

// TestRapidSendReceiveDelete checks that a message deleted before the
// watcher delivered it does not come back to shadow newer ones.
func TestRapidSendReceiveDelete(t *testing.T) {
	e := newEnv(t)
	e.create(t, "q", nil)
	for i := range 100 {
		e.send(t, "q", strconv.Itoa(i))
		msgs := receive(t, e.m, "q", 1)
		if len(msgs) != 1 || msgs[0].GetBody() != strconv.Itoa(i) {
			t.Fatalf("round %d: got %v, want [%d]", i, bodies(msgs), i)
		}
		if err := e.m.Delete(testCtx(t), "q", msgs[0].GetReceiptHandle()); err != nil {
			t.Fatalf("round %d: Delete: %v", i, err)
		}
	}
	eventually(t, "the index settles at zero messages", func() bool {
		return e.attrs(t, "q") == [4]int64{}
	})
}
