package main

import (
	"encoding/base64"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
)

// Defaults of a queue's settings, as the gateway applies them to unset
// fields; shown next to unset values.
const (
	defaultVisibility  = 30
	defaultRetention   = 345600
	defaultMaxMessage  = 262144
	defaultReceiveWait = 0
	defaultDelay       = 0
)

func (a *app) queueCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "queue",
		Short: "Manage message queues (SQS-like) and their messages",
		Long: lines(
			"Queues hold messages with SQS semantics: a received message is invisible for",
			"the visibility timeout and comes back unless it is deleted; after the maximum",
			"number of receives it moves to the dead-letter queue. FIFO queues (names ending",
			"in .fifo) keep the order within each message group and drop duplicates.",
			"Map a queue to a function with 'skiff esm create'."),
		Args: cobra.ArbitraryArgs,
		RunE: groupRun,
		// A group: its usage line has no flags of its own.
		DisableFlagsInUseLine: true,
	}
	c.AddCommand(
		a.queueCreateCmd(),
		a.queueListCmd(),
		a.queueAttrsCmd(),
		a.queueSendCmd(),
		a.queueReceiveCmd(),
		a.queueDeleteMessageCmd(),
		a.queuePurgeCmd(),
		a.queueRedriveCmd(),
		a.queueDeleteCmd(),
	)
	return c
}

func (a *app) queueCreateCmd() *cobra.Command {
	var (
		fifo, contentDedup                          bool
		visibility, retention, delay, maxSize, wait int32
		dlq                                         string
		maxReceives                                 int32
	)
	c := &cobra.Command{
		Use:   "create NAME [flags]",
		Short: "Create a queue",
		Long: lines(
			"Create a queue. Settings not given take the gateway's defaults: visibility",
			"timeout 30 s, retention 345600 s (4 days), no delay, messages up to 262144",
			"bytes, no long poll. A FIFO queue needs --fifo and a name ending in .fifo;",
			"its dead-letter queue must be FIFO too."),
		Example: lines(
			"  skiff queue create jobs-dlq",
			"  skiff queue create jobs --visibility-timeout 60 --dlq jobs-dlq --max-receives 5",
			"  skiff queue create orders.fifo --fifo --content-dedup"),
		Args: checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			fl := c.Flags()
			cfg := &skiffv1.QueueConfig{Fifo: fifo, ContentBasedDeduplication: contentDedup}
			for _, o := range []struct {
				flag string
				val  int32
				dst  **int32
			}{
				{"visibility-timeout", visibility, &cfg.VisibilityTimeoutSeconds},
				{"retention", retention, &cfg.MessageRetentionSeconds},
				{"delay", delay, &cfg.DelaySeconds},
				{"max-message-size", maxSize, &cfg.MaximumMessageBytes},
				{"receive-wait", wait, &cfg.ReceiveWaitSeconds},
			} {
				if fl.Changed(o.flag) {
					*o.dst = &o.val
				}
			}
			switch {
			case dlq != "" && !fl.Changed("max-receives"):
				return usagef(c, "--dlq needs --max-receives: the receives after which a message moves to the dead-letter queue")
			case dlq == "" && fl.Changed("max-receives"):
				return usagef(c, "--max-receives needs --dlq: the dead-letter queue messages move to")
			case dlq != "":
				cfg.RedrivePolicy = &skiffv1.RedrivePolicy{DeadLetterQueue: strings.TrimPrefix(dlq, "queue:"), MaxReceiveCount: maxReceives}
			}
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.queues.CreateQueue(c.Context(), connect.NewRequest(&skiffv1.CreateQueueRequest{Name: args[0], Config: cfg}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			t := newTable(a.stdout)
			queueRows(t, resp.Msg.GetQueue())
			return t.flush()
		},
	}
	fl := c.Flags()
	fl.BoolVar(&fifo, "fifo", false, "a FIFO queue (the name must end in .fifo)")
	fl.BoolVar(&contentDedup, "content-dedup", false, "FIFO: deduplicate by a SHA-256 of the body when a message has no deduplication id")
	fl.Int32Var(&visibility, "visibility-timeout", 0, "seconds a received message stays invisible, 0-43200 (default 30)")
	fl.Int32Var(&retention, "retention", 0, "seconds a message is kept, 60-1209600 (default 345600)")
	fl.Int32Var(&delay, "delay", 0, "seconds a new message stays invisible, 0-900 (default 0)")
	fl.Int32Var(&maxSize, "max-message-size", 0, "largest message body in bytes, 1024-262144 (default 262144)")
	fl.Int32Var(&wait, "receive-wait", 0, "default long-poll wait of receives in seconds, 0-20 (default 0)")
	fl.StringVar(&dlq, "dlq", "", "dead-letter queue that messages move to after --max-receives receives")
	fl.Int32Var(&maxReceives, "max-receives", 0, "receives after which a message moves to the --dlq, 1-1000")
	return c
}

func (a *app) queueListCmd() *cobra.Command {
	var prefix string
	c := &cobra.Command{
		Use:   "list",
		Short: "List queues",
		Args:  checkArgs(cobra.NoArgs),
		RunE: func(c *cobra.Command, _ []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.queues.ListQueues(c.Context(), connect.NewRequest(&skiffv1.ListQueuesRequest{Prefix: prefix}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			t := newTable(a.stdout)
			t.row("NAME", "TYPE", "VISIBILITY", "RETENTION", "DELAY", "DEAD-LETTER QUEUE", "CREATED")
			for _, q := range resp.Msg.GetQueues() {
				cfg := q.GetConfig()
				t.row(q.GetName(), queueType(cfg),
					strconv.Itoa(int(optInt(cfg.VisibilityTimeoutSeconds, defaultVisibility)))+"s",
					strconv.Itoa(int(optInt(cfg.MessageRetentionSeconds, defaultRetention)))+"s",
					strconv.Itoa(int(optInt(cfg.DelaySeconds, defaultDelay)))+"s",
					redrive(cfg.GetRedrivePolicy()), q.GetCreated())
			}
			return t.flush()
		},
	}
	c.Flags().StringVar(&prefix, "prefix", "", "list only queues whose name starts with this")
	return c
}

func (a *app) queueAttrsCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "attrs NAME",
		Aliases: []string{"get"},
		Short:   "Show a queue's settings and approximate message counts",
		Example: "  skiff queue attrs jobs -o json",
		Args:    checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.queues.GetQueueAttributes(c.Context(), connect.NewRequest(&skiffv1.GetQueueAttributesRequest{Name: args[0]}))
			if err != nil {
				return err
			}
			m := resp.Msg
			if a.json() {
				return writeJSON(a.stdout, m)
			}
			t := newTable(a.stdout)
			queueRows(t, m.GetQueue())
			t.row("Messages available:", strconv.FormatInt(m.GetApproximateMessages(), 10))
			t.row("Messages in flight:", strconv.FormatInt(m.GetApproximateMessagesNotVisible(), 10))
			t.row("Messages delayed:", strconv.FormatInt(m.GetApproximateMessagesDelayed(), 10))
			t.row("Oldest message age:", strconv.FormatInt(m.GetOldestMessageAgeSeconds(), 10)+" s")
			return t.flush()
		},
	}
}

// queueRows adds a queue's settings to t, a field per line, with the
// defaults of unset settings.
func queueRows(t *table, q *skiffv1.Queue) {
	cfg := q.GetConfig()
	t.row("Name:", q.GetName())
	t.row("ARN:", q.GetArn())
	t.row("Type:", queueType(cfg))
	t.row("Visibility timeout:", optSeconds(cfg.VisibilityTimeoutSeconds, defaultVisibility))
	t.row("Retention:", optSeconds(cfg.MessageRetentionSeconds, defaultRetention))
	t.row("Delay:", optSeconds(cfg.DelaySeconds, defaultDelay))
	size := strconv.Itoa(defaultMaxMessage) + " bytes (default)"
	if cfg.MaximumMessageBytes != nil {
		size = strconv.Itoa(int(cfg.GetMaximumMessageBytes())) + " bytes"
	}
	t.row("Maximum message size:", size)
	t.row("Receive wait:", optSeconds(cfg.ReceiveWaitSeconds, defaultReceiveWait))
	t.row("Dead-letter queue:", redrive(cfg.GetRedrivePolicy()))
	if cfg.GetFifo() {
		t.row("Content-based deduplication:", strconv.FormatBool(cfg.GetContentBasedDeduplication()))
	}
	t.row("Created:", q.GetCreated())
}

func queueType(cfg *skiffv1.QueueConfig) string {
	if cfg.GetFifo() {
		return "fifo"
	}
	return "standard"
}

// redrive renders a redrive policy as "DLQ after N receives", or "-".
func redrive(p *skiffv1.RedrivePolicy) string {
	if p.GetDeadLetterQueue() == "" {
		return "-"
	}
	return fmt.Sprintf("%s after %d receives", p.GetDeadLetterQueue(), p.GetMaxReceiveCount())
}

func optInt(p *int32, def int32) int32 {
	if p == nil {
		return def
	}
	return *p
}

// optSeconds renders an optional number of seconds, naming the default
// when it is unset.
func optSeconds(p *int32, def int) string {
	if p == nil {
		return strconv.Itoa(def) + " s (default)"
	}
	return strconv.Itoa(int(*p)) + " s"
}

func (a *app) queueSendCmd() *cobra.Command {
	var (
		group, dedupID string
		delay          int32
		attrs          []string
	)
	c := &cobra.Command{
		Use:   "send NAME (BODY | @FILE | -)",
		Short: "Send a message to a queue",
		Long: lines(
			"Send a message. The body is the argument, the content of FILE with @FILE, or",
			"standard input with -.",
			"",
			"--attr NAME=VALUE adds a String message attribute; NAME:TYPE=VALUE gives the",
			"type: String, Number or Binary (VALUE in base64), optionally with a .suffix."),
		Example: lines(
			`  skiff queue send jobs '{"id":1}'`,
			"  skiff queue send jobs @job.json --delay 30 --attr source=cli --attr priority:Number=5",
			`  skiff queue send orders.fifo '{"order":7}' --group customer-42 --dedup-id order-7`,
			"  cat job.json | skiff queue send jobs -"),
		Args: checkArgs(cobra.ExactArgs(2)),
		RunE: func(c *cobra.Command, args []string) error {
			ma, err := parseAttrs(attrs)
			if err != nil {
				return usageErr(c, err)
			}
			body, err := a.readBody(args[1])
			if err != nil {
				return err
			}
			req := &skiffv1.SendMessageRequest{
				Queue: args[0], Body: body, MessageAttributes: ma,
				MessageGroupId: group, MessageDeduplicationId: dedupID,
			}
			if c.Flags().Changed("delay") {
				req.DelaySeconds = &delay
			}
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.queues.SendMessage(c.Context(), connect.NewRequest(req))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			t := newTable(a.stdout)
			t.row("Message ID:", resp.Msg.GetMessageId())
			t.row("MD5 of body:", resp.Msg.GetMd5OfBody())
			if resp.Msg.GetSequenceNumber() != "" {
				t.row("Sequence number:", resp.Msg.GetSequenceNumber())
			}
			return t.flush()
		},
	}
	fl := c.Flags()
	fl.StringVar(&group, "group", "", "FIFO: message group id (required on FIFO queues)")
	fl.StringVar(&dedupID, "dedup-id", "", "FIFO: deduplication id (required unless the queue deduplicates by content)")
	fl.Int32Var(&delay, "delay", 0, "seconds the message stays invisible, 0-900, overriding the queue's delay (not on FIFO queues)")
	fl.StringArrayVar(&attrs, "attr", nil, "message attribute NAME[:TYPE]=VALUE (repeatable)")
	return c
}

// readBody resolves a message body argument: literal text, @FILE, or - for
// stdin. A body is text: it must be valid UTF-8.
func (a *app) readBody(arg string) (string, error) {
	b, err := a.readArg(arg, "the message body")
	if err != nil {
		return "", err
	}
	if !utf8.Valid(b) {
		return "", errors.New("the message body is not valid UTF-8 text")
	}
	return string(b), nil
}

// parseAttrs turns NAME[:TYPE]=VALUE pairs into message attributes. TYPE is
// String (the default), Number or Binary, optionally with a .suffix; a
// Binary value is base64.
func parseAttrs(kvs []string) (map[string]*skiffv1.MessageAttribute, error) {
	if len(kvs) == 0 {
		return nil, nil
	}
	out := make(map[string]*skiffv1.MessageAttribute, len(kvs))
	for _, kv := range kvs {
		key, val, ok := strings.Cut(kv, "=")
		name, typ, typed := strings.Cut(key, ":")
		if !typed {
			typ = "String"
		}
		if !ok || name == "" || typ == "" {
			return nil, fmt.Errorf("invalid --attr %q: want NAME=VALUE or NAME:TYPE=VALUE", kv)
		}
		if _, dup := out[name]; dup {
			return nil, fmt.Errorf("--attr %s given twice", name)
		}
		attr := &skiffv1.MessageAttribute{DataType: typ}
		switch base, _, _ := strings.Cut(typ, "."); base {
		case "String", "Number":
			attr.StringValue = val
		case "Binary":
			b, err := base64.StdEncoding.DecodeString(val)
			if err != nil {
				return nil, fmt.Errorf("invalid --attr %q: a Binary value must be base64: %w", kv, err)
			}
			attr.BinaryValue = b
		default:
			return nil, fmt.Errorf("invalid --attr %q: type %q is not String, Number or Binary", kv, typ)
		}
		out[name] = attr
	}
	return out, nil
}

func (a *app) queueReceiveCmd() *cobra.Command {
	var (
		maxMessages, wait, visibility int32
		del                           bool
	)
	c := &cobra.Command{
		Use:   "receive NAME [flags]",
		Short: "Receive messages and print them, each body in full",
		Long: lines(
			"Receive up to --max messages and print each: its id, receipt handle and",
			"attributes, then the body in full. Received messages are invisible for the",
			"visibility timeout and then come back, unless they are deleted: with --delete",
			"(after printing), or with 'skiff queue delete-message NAME RECEIPT_HANDLE'.",
			"Nothing to receive is not an error: 'no messages' goes to stderr."),
		Example: lines(
			"  skiff queue receive jobs --max 10 --wait 20",
			"  skiff queue receive jobs --delete -o json | jq -r '.messages[].body'"),
		Args: checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			req := &skiffv1.ReceiveMessageRequest{Queue: args[0], MaxMessages: maxMessages}
			if c.Flags().Changed("wait") {
				req.WaitSeconds = &wait
			}
			if c.Flags().Changed("visibility-timeout") {
				req.VisibilityTimeoutSeconds = &visibility
			}
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.queues.ReceiveMessage(c.Context(), connect.NewRequest(req))
			if err != nil {
				return err
			}
			msgs := resp.Msg.GetMessages()
			if err := a.writeMessages(resp.Msg); err != nil {
				return err
			}
			if !del || len(msgs) == 0 {
				return nil
			}
			return a.deleteReceived(c, cl, args[0], msgs)
		},
	}
	fl := c.Flags()
	fl.Int32Var(&maxMessages, "max", 1, "most messages to receive, 1-10")
	fl.Int32Var(&wait, "wait", 0, "long poll: seconds to wait for a message, 0-20 (default the queue's receive wait)")
	fl.Int32Var(&visibility, "visibility-timeout", 0, "seconds these messages stay invisible, 0-43200 (default the queue's)")
	fl.BoolVar(&del, "delete", false, "delete the messages after printing them")
	return c
}

// deleteReceived deletes the messages just received, in one batch.
func (a *app) deleteReceived(c *cobra.Command, cl *clients, queue string, msgs []*skiffv1.Message) error {
	req := &skiffv1.DeleteMessageBatchRequest{Queue: queue}
	ids := make(map[string]string, len(msgs)) // batch entry id -> message id
	for i, m := range msgs {
		id := strconv.Itoa(i)
		ids[id] = m.GetMessageId()
		req.Entries = append(req.Entries, &skiffv1.DeleteMessageBatchEntry{Id: id, ReceiptHandle: m.GetReceiptHandle()})
	}
	resp, err := cl.queues.DeleteMessageBatch(c.Context(), connect.NewRequest(req))
	if err != nil {
		return fmt.Errorf("deleting the received messages: %w", err)
	}
	failed := resp.Msg.GetFailed()
	if len(failed) == 0 {
		return nil
	}
	var parts []string
	for _, f := range failed {
		parts = append(parts, fmt.Sprintf("%s: %s (%s)", ids[f.GetId()], f.GetMessage(), f.GetCode()))
	}
	return fmt.Errorf("deleting %d of %d received messages failed: %s", len(failed), len(msgs), strings.Join(parts, "; "))
}

// writeMessages prints received messages: JSON, or for each a field per
// line, a blank line and the body in full.
func (a *app) writeMessages(resp *skiffv1.ReceiveMessageResponse) error {
	if a.json() {
		return writeJSON(a.stdout, resp)
	}
	msgs := resp.GetMessages()
	if len(msgs) == 0 {
		_, err := fmt.Fprintln(a.stderr, "no messages")
		return err
	}
	for i, m := range msgs {
		if i > 0 {
			if _, err := fmt.Fprintln(a.stdout); err != nil {
				return err
			}
		}
		t := newTable(a.stdout)
		t.row("Message ID:", m.GetMessageId())
		t.row("Receipt handle:", m.GetReceiptHandle())
		t.row("MD5 of body:", m.GetMd5OfBody())
		attrs := m.GetAttributes()
		for _, k := range slices.Sorted(maps.Keys(attrs)) {
			t.row(k+":", systemAttr(k, attrs[k]))
		}
		mas := m.GetMessageAttributes()
		for _, k := range slices.Sorted(maps.Keys(mas)) {
			t.row("Attribute "+k+":", attrValue(mas[k]))
		}
		if err := t.flush(); err != nil {
			return err
		}
		if _, err := fmt.Fprintln(a.stdout); err != nil {
			return err
		}
		if err := writeLine(a.stdout, []byte(m.GetBody())); err != nil {
			return err
		}
	}
	return nil
}

// systemAttr renders a message's system attribute: timestamps (epoch
// milliseconds) also as UTC times.
func systemAttr(k, v string) string {
	if !strings.HasSuffix(k, "Timestamp") {
		return v
	}
	ms, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return v
	}
	return v + " (" + time.UnixMilli(ms).UTC().Format("2006-01-02T15:04:05.000Z") + ")"
}

// attrValue renders a message attribute as "value (Type)", binary values in
// base64.
func attrValue(m *skiffv1.MessageAttribute) string {
	v := m.GetStringValue()
	if strings.HasPrefix(m.GetDataType(), "Binary") {
		v = base64.StdEncoding.EncodeToString(m.GetBinaryValue())
	}
	return v + " (" + m.GetDataType() + ")"
}

func (a *app) queueDeleteMessageCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "delete-message NAME RECEIPT_HANDLE...",
		Short:   "Delete received messages by their receipt handles",
		Example: "  skiff queue delete-message jobs AQEBwJnKyrHigUMZj6rYigCgxlaS3SLy0a...",
		Args:    checkArgs(cobra.MinimumNArgs(2)),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			for _, h := range args[1:] {
				_, err := cl.queues.DeleteMessage(c.Context(), connect.NewRequest(&skiffv1.DeleteMessageRequest{Queue: args[0], ReceiptHandle: h}))
				if err != nil {
					return err
				}
			}
			if a.json() {
				return writeJSON(a.stdout, &skiffv1.DeleteMessageResponse{})
			}
			_, err = fmt.Fprintf(a.stdout, "deleted %d %s from %s\n", len(args)-1, plural(len(args)-1, "message"), args[0])
			return err
		},
	}
}

func (a *app) queuePurgeCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "purge NAME",
		Short: "Delete every message in a queue",
		Args:  checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.queues.PurgeQueue(c.Context(), connect.NewRequest(&skiffv1.PurgeQueueRequest{Name: args[0]}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			_, err = fmt.Fprintf(a.stdout, "purged queue %s\n", args[0])
			return err
		},
	}
}

func (a *app) queueRedriveCmd() *cobra.Command {
	var to string
	c := &cobra.Command{
		Use:   "redrive DLQ [--to QUEUE]",
		Short: "Move the messages of a dead-letter queue back to a queue",
		Long: lines(
			"Move every message of a dead-letter queue to --to, by default to the source",
			"queue whose redrive policy names the dead-letter queue (an error when there",
			"is not exactly one)."),
		Example: lines(
			"  skiff queue redrive jobs-dlq",
			"  skiff queue redrive jobs-dlq --to jobs-retry"),
		Args: checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.queues.RedriveQueue(c.Context(), connect.NewRequest(&skiffv1.RedriveQueueRequest{
				DeadLetterQueue: args[0], Destination: strings.TrimPrefix(to, "queue:"),
			}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			dest := to
			if dest == "" {
				dest = "its source queue"
			}
			n := resp.Msg.GetMoved()
			_, err = fmt.Fprintf(a.stdout, "moved %d %s from %s to %s\n", n, plural(int(n), "message"), args[0], dest)
			return err
		},
	}
	c.Flags().StringVar(&to, "to", "", "the queue to move the messages to (default the source queue)")
	return c
}

func (a *app) queueDeleteCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a queue and its messages",
		Args:  checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.queues.DeleteQueue(c.Context(), connect.NewRequest(&skiffv1.DeleteQueueRequest{Name: args[0]}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			_, err = fmt.Fprintf(a.stdout, "deleted queue %s\n", args[0])
			return err
		},
	}
}

// plural is word, with an s unless n is 1.
func plural(n int, word string) string {
	if n == 1 {
		return word
	}
	return word + "s"
}
