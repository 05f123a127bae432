package main

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/testing/protocmp"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

func i32(v int32) *int32 { return &v }

func TestQueueCreate(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want *skiffv1.QueueConfig
	}{
		{"defaults", []string{"jobs"}, &skiffv1.QueueConfig{}},
		{
			"every setting",
			[]string{"jobs", "--visibility-timeout", "60", "--retention", "86400", "--delay", "5", "--max-message-size", "2048",
				"--receive-wait", "20", "--dlq", "jobs-dlq", "--max-receives", "3"},
			&skiffv1.QueueConfig{VisibilityTimeoutSeconds: i32(60), MessageRetentionSeconds: i32(86400), DelaySeconds: i32(5),
				MaximumMessageBytes: i32(2048), ReceiveWaitSeconds: i32(20),
				RedrivePolicy: &skiffv1.RedrivePolicy{DeadLetterQueue: "jobs-dlq", MaxReceiveCount: 3}},
		},
		// An explicit zero is a setting the gateway must get.
		{"explicit zero", []string{"jobs", "--visibility-timeout", "0"}, &skiffv1.QueueConfig{VisibilityTimeoutSeconds: i32(0)}},
		{"fifo", []string{"orders.fifo", "--fifo", "--content-dedup"}, &skiffv1.QueueConfig{Fifo: true, ContentBasedDeduplication: true}},
		{
			"dlq as a target", []string{"jobs", "--dlq", "queue:jobs-dlq", "--max-receives", "5"},
			&skiffv1.QueueConfig{RedrivePolicy: &skiffv1.RedrivePolicy{DeadLetterQueue: "jobs-dlq", MaxReceiveCount: 5}},
		},
	}
	for _, tt := range tests {
		for _, proto := range protocols {
			t.Run(tt.name+"/"+proto, func(t *testing.T) {
				s := newFakeServer(t)
				r := newCLI(t, s).run(append([]string{"--protocol", proto, "queue", "create"}, tt.args...)...)
				if r.code != 0 {
					t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
				}
				_, h, msg := s.q.last(t)
				want := &skiffv1.CreateQueueRequest{Name: tt.args[0], Config: tt.want}
				if d := cmp.Diff(want, msg, protocmp.Transform()); d != "" {
					t.Errorf("request (-want +got):\n%s", d)
				}
				if h.Get("Authorization") != "Bearer test-key" {
					t.Errorf("Authorization = %q, want Bearer test-key", h.Get("Authorization"))
				}
			})
		}
	}
}

func TestQueueCreateOutput(t *testing.T) {
	s := newFakeServer(t)
	r := newCLI(t, s).run("queue", "create", "jobs", "--visibility-timeout", "60", "--dlq", "jobs-dlq", "--max-receives", "3")
	if r.code != 0 {
		t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
	}
	checkFields(t, r.stdout, map[string]string{
		"Name:":                 "jobs",
		"ARN:":                  "arn:skiff:sqs:local:000000000000:jobs",
		"Type:":                 "standard",
		"Visibility timeout:":   "60 s",
		"Retention:":            "345600 s (default)",
		"Delay:":                "0 s (default)",
		"Maximum message size:": "262144 bytes (default)",
		"Receive wait:":         "0 s (default)",
		"Dead-letter queue:":    "jobs-dlq after 3 receives",
		"Created:":              "2026-01-04T00:00:00Z",
	})
	if strings.Contains(r.stdout, "Content-based") {
		t.Errorf("a standard queue shows content-based deduplication:\n%s", r.stdout)
	}
}

func TestQueueCreateUsageErrors(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"queue", "create"}, "accepts 1 arg"},
		{[]string{"queue", "create", "jobs", "--dlq", "dead"}, "--dlq needs --max-receives"},
		{[]string{"queue", "create", "jobs", "--max-receives", "3"}, "--max-receives needs --dlq"},
		{[]string{"queue", "create", "jobs", "--delay", "soon"}, "invalid argument"},
	} {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			s := newFakeServer(t)
			r := newCLI(t, s).run(tt.args...)
			if r.code != exitUsage || !strings.Contains(r.stderr, tt.want) {
				t.Errorf("exit %d, stderr %q; want %d and %q", r.code, r.stderr, exitUsage, tt.want)
			}
			if s.q.count() != 0 {
				t.Errorf("the server got a call, want none")
			}
		})
	}
}

func TestQueueCreateServerError(t *testing.T) {
	s := newFakeServer(t)
	s.q.fail = errs.Invalid("config.visibility_timeout_seconds", "visibility timeout 50000 s is out of range 0-43200")
	r := newCLI(t, s).run("queue", "create", "jobs", "--visibility-timeout", "50000")
	want := "skiff: visibility timeout 50000 s is out of range 0-43200 (reason: invalid_config.visibility_timeout_seconds, field: config.visibility_timeout_seconds)\n"
	if r.code != 1 || r.stderr != want {
		t.Errorf("got exit %d, stderr %q; want 1, %q", r.code, r.stderr, want)
	}
}

func TestQueueSend(t *testing.T) {
	file := writeFile(t, filepath.Join(t.TempDir(), "job.json"), []byte(`{"from":"file"}`), 0o644)
	tests := []struct {
		name  string
		args  []string
		stdin string
		want  *skiffv1.SendMessageRequest
	}{
		{"literal", []string{"jobs", `{"id":1}`}, "", &skiffv1.SendMessageRequest{Queue: "jobs", Body: `{"id":1}`}},
		{"file", []string{"jobs", "@" + file}, "", &skiffv1.SendMessageRequest{Queue: "jobs", Body: `{"from":"file"}`}},
		{"stdin", []string{"jobs", "-"}, "line one\nline two\n", &skiffv1.SendMessageRequest{Queue: "jobs", Body: "line one\nline two\n"}},
		{"delay", []string{"jobs", "x", "--delay", "30"}, "", &skiffv1.SendMessageRequest{Queue: "jobs", Body: "x", DelaySeconds: i32(30)}},
		{"zero delay", []string{"jobs", "x", "--delay", "0"}, "", &skiffv1.SendMessageRequest{Queue: "jobs", Body: "x", DelaySeconds: i32(0)}},
		{
			"fifo", []string{"orders.fifo", "x", "--group", "customer-42", "--dedup-id", "order-7"}, "",
			&skiffv1.SendMessageRequest{Queue: "orders.fifo", Body: "x", MessageGroupId: "customer-42", MessageDeduplicationId: "order-7"},
		},
		{
			"attributes", []string{"jobs", "x", "--attr", "source=cli=v2", "--attr", "priority:Number=5", "--attr", "blob:Binary=AAEC", "--attr", "kind:String.custom=k"}, "",
			&skiffv1.SendMessageRequest{Queue: "jobs", Body: "x", MessageAttributes: map[string]*skiffv1.MessageAttribute{
				"source":   {DataType: "String", StringValue: "cli=v2"},
				"priority": {DataType: "Number", StringValue: "5"},
				"blob":     {DataType: "Binary", BinaryValue: []byte{0, 1, 2}},
				"kind":     {DataType: "String.custom", StringValue: "k"},
			}},
		},
	}
	for _, tt := range tests {
		for _, proto := range protocols {
			t.Run(tt.name+"/"+proto, func(t *testing.T) {
				s := newFakeServer(t)
				c := newCLI(t, s)
				c.stdin = tt.stdin
				r := c.run(append([]string{"--protocol", proto, "queue", "send"}, tt.args...)...)
				if r.code != 0 {
					t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
				}
				_, _, msg := s.q.last(t)
				if d := cmp.Diff(tt.want, msg, protocmp.Transform()); d != "" {
					t.Errorf("request (-want +got):\n%s", d)
				}
				want := map[string]string{"Message ID:": "msg-1", "MD5 of body:": "md5-1"}
				if strings.HasSuffix(tt.args[0], ".fifo") {
					want["Sequence number:"] = "18"
				}
				checkFields(t, r.stdout, want)
			})
		}
	}
}

func TestQueueSendErrors(t *testing.T) {
	binary := writeFile(t, filepath.Join(t.TempDir(), "blob"), []byte{0xff, 0xfe, 0x00}, 0o644)
	for _, tt := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"queue", "send", "jobs"}, exitUsage, "accepts 2 arg"},
		{[]string{"queue", "send", "jobs", "x", "--attr", "noequals"}, exitUsage, `invalid --attr "noequals"`},
		{[]string{"queue", "send", "jobs", "x", "--attr", "=v"}, exitUsage, `invalid --attr "=v"`},
		{[]string{"queue", "send", "jobs", "x", "--attr", "a:=v"}, exitUsage, `invalid --attr "a:=v"`},
		{[]string{"queue", "send", "jobs", "x", "--attr", "a:Weird=1"}, exitUsage, `type "Weird" is not String, Number or Binary`},
		{[]string{"queue", "send", "jobs", "x", "--attr", "a:Binary=!!"}, exitUsage, "a Binary value must be base64"},
		{[]string{"queue", "send", "jobs", "x", "--attr", "a=1", "--attr", "a=2"}, exitUsage, "--attr a given twice"},
		{[]string{"queue", "send", "jobs", "@/does/not/exist"}, 1, "skiff: reading the message body:"},
		{[]string{"queue", "send", "jobs", "@" + binary}, 1, "skiff: the message body is not valid UTF-8 text"},
	} {
		t.Run(strings.Join(tt.args[3:], " "), func(t *testing.T) {
			s := newFakeServer(t)
			r := newCLI(t, s).run(tt.args...)
			if r.code != tt.code || !strings.Contains(r.stderr, tt.want) {
				t.Errorf("exit %d, stderr %q; want %d and %q", r.code, r.stderr, tt.code, tt.want)
			}
			if s.q.count() != 0 {
				t.Errorf("the server got a call, want none")
			}
		})
	}
}

func TestQueueReceive(t *testing.T) {
	// A body longer than any terminal, with lines and tabs: printed in full.
	long := strings.Repeat("{\"row\":\"0123456789abcdef\",\"tab\":\"\t\"}\n", 200) + "end without newline"
	msgs := []*skiffv1.Message{
		{
			MessageId: "m-1", ReceiptHandle: "rh-1", Body: long, Md5OfBody: "md5-a",
			Attributes: map[string]string{"ApproximateReceiveCount": "2", "SentTimestamp": "1767225600000"},
			MessageAttributes: map[string]*skiffv1.MessageAttribute{
				"source": {DataType: "String", StringValue: "cli"},
				"blob":   {DataType: "Binary", BinaryValue: []byte{0, 1, 2}},
			},
		},
		{MessageId: "m-2", ReceiptHandle: "rh-2", Body: "second\n", Md5OfBody: "md5-b"},
	}
	for _, proto := range protocols {
		t.Run(proto, func(t *testing.T) {
			s := newFakeServer(t)
			s.q.messages = msgs
			r := newCLI(t, s).run("--protocol", proto, "queue", "receive", "jobs", "--max", "10", "--wait", "20", "--visibility-timeout", "0")
			if r.code != 0 {
				t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
			}
			_, _, msg := s.q.last(t)
			want := &skiffv1.ReceiveMessageRequest{Queue: "jobs", MaxMessages: 10, WaitSeconds: i32(20), VisibilityTimeoutSeconds: i32(0)}
			if d := cmp.Diff(want, msg, protocmp.Transform()); d != "" {
				t.Errorf("request (-want +got):\n%s", d)
			}
			wantOut := "" +
				"Message ID:               m-1\n" +
				"Receipt handle:           rh-1\n" +
				"MD5 of body:              md5-a\n" +
				"ApproximateReceiveCount:  2\n" +
				"SentTimestamp:            1767225600000 (2026-01-01T00:00:00.000Z)\n" +
				"Attribute blob:           AAEC (Binary)\n" +
				"Attribute source:         cli (String)\n" +
				"\n" +
				long + "\n" +
				"\n" +
				"Message ID:      m-2\n" +
				"Receipt handle:  rh-2\n" +
				"MD5 of body:     md5-b\n" +
				"\n" +
				"second\n"
			if r.stdout != wantOut {
				t.Errorf("stdout:\n%s\nwant:\n%s", r.stdout, wantOut)
			}
			if s.q.count() != 1 {
				t.Errorf("the server got %d calls, want only the receive", s.q.count())
			}
		})
	}
}

func TestQueueReceiveDefaults(t *testing.T) {
	s := newFakeServer(t)
	r := newCLI(t, s).run("queue", "receive", "jobs")
	if r.code != 0 || r.stdout != "" || r.stderr != "no messages\n" {
		t.Errorf("got exit %d, stdout %q, stderr %q; want 0, nothing, 'no messages'", r.code, r.stdout, r.stderr)
	}
	_, _, msg := s.q.last(t)
	// Unset wait and visibility: the queue's settings apply.
	if d := cmp.Diff(&skiffv1.ReceiveMessageRequest{Queue: "jobs", MaxMessages: 1}, msg, protocmp.Transform()); d != "" {
		t.Errorf("request (-want +got):\n%s", d)
	}

	r = newCLI(t, s).run("queue", "receive", "jobs", "-o", "json")
	var out struct {
		Messages []any `json:"messages"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil || out.Messages == nil || len(out.Messages) != 0 {
		t.Errorf("json output %q (err %v), want an empty messages list", r.stdout, err)
	}
}

func TestQueueReceiveDelete(t *testing.T) {
	for _, proto := range protocols {
		t.Run(proto, func(t *testing.T) {
			s := newFakeServer(t)
			s.q.messages = []*skiffv1.Message{
				{MessageId: "m-1", ReceiptHandle: "rh-1", Body: `{"a":1}`},
				{MessageId: "m-2", ReceiptHandle: "rh-2", Body: `{"b":2}`},
			}
			r := newCLI(t, s).run("--protocol", proto, "queue", "receive", "jobs", "--max", "2", "--delete", "-o", "json")
			if r.code != 0 {
				t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
			}
			var out struct {
				Messages []struct {
					Body string `json:"body"`
				} `json:"messages"`
			}
			if err := json.Unmarshal([]byte(r.stdout), &out); err != nil || len(out.Messages) != 2 || out.Messages[1].Body != `{"b":2}` {
				t.Errorf("json output %q (err %v), want both messages", r.stdout, err)
			}
			proc, _, msg := s.q.last(t)
			want := &skiffv1.DeleteMessageBatchRequest{Queue: "jobs", Entries: []*skiffv1.DeleteMessageBatchEntry{
				{Id: "0", ReceiptHandle: "rh-1"}, {Id: "1", ReceiptHandle: "rh-2"},
			}}
			if d := cmp.Diff(want, msg, protocmp.Transform()); proc != "DeleteMessageBatch" || d != "" {
				t.Errorf("got %s, request (-want +got):\n%s", proc, d)
			}
		})
	}
	t.Run("partial failure", func(t *testing.T) {
		s := newFakeServer(t)
		s.q.messages = []*skiffv1.Message{
			{MessageId: "m-1", ReceiptHandle: "rh-1", Body: "one"},
			{MessageId: "m-2", ReceiptHandle: "stale", Body: "two"},
		}
		r := newCLI(t, s).run("queue", "receive", "jobs", "--max", "2", "--delete")
		want := "skiff: deleting 1 of 2 received messages failed: m-2: receipt handle is stale (invalid_receipt_handle)\n"
		if r.code != 1 || r.stderr != want {
			t.Errorf("got exit %d, stderr %q; want 1, %q", r.code, r.stderr, want)
		}
		// The bodies were printed before the delete.
		if !strings.Contains(r.stdout, "\none\n") || !strings.HasSuffix(r.stdout, "\ntwo\n") {
			t.Errorf("stdout lacks the bodies:\n%s", r.stdout)
		}
	})
}

func TestQueueListAndAttrs(t *testing.T) {
	s := newFakeServer(t)
	s.q.queues = []*skiffv1.Queue{
		queueFor("jobs", &skiffv1.QueueConfig{VisibilityTimeoutSeconds: i32(60), RedrivePolicy: &skiffv1.RedrivePolicy{DeadLetterQueue: "jobs-dlq", MaxReceiveCount: 5}}),
		queueFor("jobs-dlq", nil),
		queueFor("orders.fifo", &skiffv1.QueueConfig{Fifo: true}),
	}
	c := newCLI(t, s)

	r := c.run("queue", "list")
	lines := strings.Split(strings.TrimSuffix(r.stdout, "\n"), "\n")
	if r.code != 0 || len(lines) != 4 {
		t.Fatalf("list: exit %d, stdout:\n%s", r.code, r.stdout)
	}
	for i, want := range [][]string{
		{"NAME", "TYPE", "VISIBILITY", "RETENTION", "DELAY", "DEAD-LETTER", "QUEUE", "CREATED"},
		{"jobs", "standard", "60s", "345600s", "0s", "jobs-dlq", "after", "5", "receives", "2026-01-04T00:00:00Z"},
		{"jobs-dlq", "standard", "30s", "345600s", "0s", "-", "2026-01-04T00:00:00Z"},
		{"orders.fifo", "fifo", "30s", "345600s", "0s", "-", "2026-01-04T00:00:00Z"},
	} {
		if d := cmp.Diff(want, strings.Fields(lines[i])); d != "" {
			t.Errorf("line %d (-want +got):\n%s", i, d)
		}
	}

	r = c.run("queue", "list", "--prefix", "jobs", "-o", "json")
	var listed struct {
		Queues []struct {
			Name string `json:"name"`
		} `json:"queues"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &listed); err != nil || len(listed.Queues) != 2 {
		t.Errorf("list json %q (err %v), want the 2 jobs queues", r.stdout, err)
	}
	if _, _, msg := s.q.last(t); msg.(*skiffv1.ListQueuesRequest).GetPrefix() != "jobs" {
		t.Errorf("prefix %q, want jobs", msg.(*skiffv1.ListQueuesRequest).GetPrefix())
	}

	for _, cmd := range []string{"attrs", "get"} {
		r = c.run("queue", cmd, "jobs")
		if r.code != 0 {
			t.Fatalf("%s: exit code %d, want 0; stderr: %s", cmd, r.code, r.stderr)
		}
		checkFields(t, r.stdout, map[string]string{
			"Name:":               "jobs",
			"Visibility timeout:": "60 s",
			"Dead-letter queue:":  "jobs-dlq after 5 receives",
			"Messages available:": "12",
			"Messages in flight:": "3",
			"Messages delayed:":   "1",
			"Oldest message age:": "42 s",
		})
	}
	r = c.run("queue", "attrs", "jobs", "-o", "json")
	var attrs struct {
		ApproximateMessages string `json:"approximateMessages"` // int64 is a string in protobuf JSON
	}
	if err := json.Unmarshal([]byte(r.stdout), &attrs); err != nil || attrs.ApproximateMessages != "12" {
		t.Errorf("attrs json %q (err %v), want approximateMessages 12", r.stdout, err)
	}
	r = c.run("queue", "attrs", "missing")
	if r.code != 1 || !strings.Contains(r.stderr, `skiff: queue "missing" not found (reason: not_found)`) {
		t.Errorf("attrs missing: exit %d, stderr %q", r.code, r.stderr)
	}
}

func TestQueueOperations(t *testing.T) {
	tests := []struct {
		args    []string
		wantOut string
		proc    string
		want    any
	}{
		{[]string{"purge", "jobs"}, "purged queue jobs\n", "PurgeQueue", &skiffv1.PurgeQueueRequest{Name: "jobs"}},
		{[]string{"delete", "jobs"}, "deleted queue jobs\n", "DeleteQueue", &skiffv1.DeleteQueueRequest{Name: "jobs"}},
		{
			[]string{"redrive", "jobs-dlq"}, "moved 3 messages from jobs-dlq to its source queue\n",
			"RedriveQueue", &skiffv1.RedriveQueueRequest{DeadLetterQueue: "jobs-dlq"},
		},
		{
			[]string{"redrive", "jobs-dlq", "--to", "queue:retry"}, "moved 3 messages from jobs-dlq to queue:retry\n",
			"RedriveQueue", &skiffv1.RedriveQueueRequest{DeadLetterQueue: "jobs-dlq", Destination: "retry"},
		},
		{
			[]string{"delete-message", "jobs", "rh-1"}, "deleted 1 message from jobs\n",
			"DeleteMessage", &skiffv1.DeleteMessageRequest{Queue: "jobs", ReceiptHandle: "rh-1"},
		},
	}
	for _, tt := range tests {
		for _, proto := range protocols {
			t.Run(strings.Join(tt.args, " ")+"/"+proto, func(t *testing.T) {
				s := newFakeServer(t)
				r := newCLI(t, s).run(append([]string{"--protocol", proto, "queue"}, tt.args...)...)
				if r.code != 0 || r.stdout != tt.wantOut {
					t.Errorf("exit %d, stdout %q, stderr %q; want 0 and %q", r.code, r.stdout, r.stderr, tt.wantOut)
				}
				proc, _, msg := s.q.last(t)
				if d := cmp.Diff(tt.want, msg, protocmp.Transform()); proc != tt.proc || d != "" {
					t.Errorf("got %s, want %s; request (-want +got):\n%s", proc, tt.proc, d)
				}
			})
		}
	}
}

func TestQueueDeleteMessages(t *testing.T) {
	s := newFakeServer(t)
	c := newCLI(t, s)
	r := c.run("queue", "delete-message", "jobs", "rh-1", "rh-2")
	if r.code != 0 || r.stdout != "deleted 2 messages from jobs\n" || s.q.count() != 2 {
		t.Errorf("got exit %d, stdout %q, %d calls; want 0, 2 deleted, 2 calls", r.code, r.stdout, s.q.count())
	}
	r = c.run("queue", "delete-message", "jobs", "stale", "rh-3")
	want := "skiff: receipt handle is stale (reason: invalid_receipt_handle, field: receipt_handle)\n"
	if r.code != 1 || r.stderr != want {
		t.Errorf("stale handle: exit %d, stderr %q; want 1, %q", r.code, r.stderr, want)
	}
	// It stops at the first failure.
	if s.q.count() != 3 {
		t.Errorf("the server got %d calls, want 3", s.q.count())
	}
	if r := c.run("queue", "delete", "missing"); r.code != 1 || !strings.Contains(r.stderr, `queue "missing" not found`) {
		t.Errorf("delete missing: exit %d, stderr %q", r.code, r.stderr)
	}
	for _, args := range [][]string{
		{"queue", "delete-message", "jobs"},
		{"queue", "purge"},
		{"queue", "redrive"},
		{"queue", "attrs"},
		{"queue", "list", "extra"},
		{"queue", "nope"},
	} {
		before := s.q.count()
		if r := c.run(args...); r.code != exitUsage {
			t.Errorf("%v: exit %d, want %d; stderr %q", args, r.code, exitUsage, r.stderr)
		}
		if s.q.count() != before {
			t.Errorf("%v: the server got a call, want none", args)
		}
	}
}

func TestParseAttrs(t *testing.T) {
	got, err := parseAttrs(nil)
	if err != nil || got != nil {
		t.Errorf("parseAttrs(nil) = %v, %v; want nil, nil", got, err)
	}
	got, err = parseAttrs([]string{"empty=", "n:Number.int=-1.5"})
	want := map[string]*skiffv1.MessageAttribute{
		"empty": {DataType: "String"},
		"n":     {DataType: "Number.int", StringValue: "-1.5"},
	}
	if d := cmp.Diff(want, got, protocmp.Transform()); err != nil || d != "" {
		t.Errorf("parseAttrs: err %v, (-want +got):\n%s", err, d)
	}
}
