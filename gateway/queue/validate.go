package queue

import (
	"strconv"
	"strings"
	"unicode/utf8"

	"google.golang.org/protobuf/proto"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

const fifoSuffix = ".fifo"

// validateName checks a queue name: 1-80 letters, digits, '-' and '_',
// where a FIFO queue's name ends in ".fifo" (counted in the 80).
func validateName(field, name string) error {
	base := strings.TrimSuffix(name, fifoSuffix)
	if len(name) == 0 || len(name) > 80 || base == "" {
		return errs.Invalid(field, "queue name %q is not 1-80 characters", name)
	}
	for i := 0; i < len(base); i++ {
		c := base[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return errs.Invalid(field, "queue name %q may hold only letters, digits, '-' and '_' (and a final \".fifo\")", name)
		}
	}
	return nil
}

func rangeCheck(field string, v *int32, lo, hi, def int32) (int32, error) {
	if v == nil {
		return def, nil
	}
	if *v < lo || *v > hi {
		return 0, errs.Invalid(field, "%s %d is not within %d-%d", field, *v, lo, hi)
	}
	return *v, nil
}

// normalizeConfig validates a CreateQueue config and returns it with every
// default filled in. The dead-letter queue's existence is checked by the
// caller.
func normalizeConfig(name string, in *skiffv1.QueueConfig) (*skiffv1.QueueConfig, error) {
	if in == nil {
		in = &skiffv1.QueueConfig{}
	}
	out := &skiffv1.QueueConfig{Fifo: in.GetFifo(), ContentBasedDeduplication: in.GetContentBasedDeduplication()}
	var err error
	set := func(dst **int32, field string, v *int32, lo, hi, def int32) {
		if err != nil {
			return
		}
		var n int32
		n, err = rangeCheck(field, v, lo, hi, def)
		*dst = proto.Int32(n)
	}
	set(&out.VisibilityTimeoutSeconds, "config.visibility_timeout_seconds", in.VisibilityTimeoutSeconds, 0, 43200, 30)
	set(&out.MessageRetentionSeconds, "config.message_retention_seconds", in.MessageRetentionSeconds, 60, 1209600, 345600)
	set(&out.DelaySeconds, "config.delay_seconds", in.DelaySeconds, 0, 900, 0)
	set(&out.MaximumMessageBytes, "config.maximum_message_bytes", in.MaximumMessageBytes, 1024, 262144, 262144)
	set(&out.ReceiveWaitSeconds, "config.receive_wait_seconds", in.ReceiveWaitSeconds, 0, MaxWaitSeconds, 0)
	if err != nil {
		return nil, err
	}
	isFifoName := strings.HasSuffix(name, fifoSuffix)
	switch {
	case in.GetFifo() && !isFifoName:
		return nil, errs.Invalid("name", "the name of a FIFO queue must end in %q", fifoSuffix)
	case !in.GetFifo() && isFifoName:
		return nil, errs.Invalid("config.fifo", "a queue named %q must be created with fifo set", name)
	case in.GetContentBasedDeduplication() && !in.GetFifo():
		return nil, errs.Invalid("config.content_based_deduplication", "content-based deduplication needs a FIFO queue")
	}
	if rp := in.GetRedrivePolicy(); rp != nil {
		if err := validateName("config.redrive_policy.dead_letter_queue", rp.GetDeadLetterQueue()); err != nil {
			return nil, err
		}
		if rp.GetDeadLetterQueue() == name {
			return nil, errs.Invalid("config.redrive_policy.dead_letter_queue", "a queue cannot be its own dead-letter queue")
		}
		if n := rp.GetMaxReceiveCount(); n < 1 || n > 1000 {
			return nil, errs.Invalid("config.redrive_policy.max_receive_count", "max receive count %d is not within 1-1000", n)
		}
		out.RedrivePolicy = &skiffv1.RedrivePolicy{DeadLetterQueue: rp.GetDeadLetterQueue(), MaxReceiveCount: rp.GetMaxReceiveCount()}
	}
	return out, nil
}

// sendInput is one message to send, from SendMessage or a batch entry.
type sendInput struct {
	body   string
	delay  *int32
	attrs  map[string]*skiffv1.MessageAttribute
	group  string
	dedup  string
	prefix string // field prefix for errors, "" or "entries[3]."
}

// validateSend checks a message against its queue and returns its size
// (body plus attributes, as SQS counts it).
func validateSend(q *queueMeta, in *sendInput) (int, error) {
	f := func(name string) string { return in.prefix + name }
	cfg := q.q.GetConfig()
	if in.body == "" {
		return 0, errs.Invalid(f("body"), "message body is empty")
	}
	if err := checkBodyChars(in.body); err != nil {
		return 0, errs.Invalid(f("body"), "message body: %w", err)
	}
	size := len(in.body)
	n, err := validateAttributes(f("message_attributes"), in.attrs)
	if err != nil {
		return 0, err
	}
	size += n
	if max := int(cfg.GetMaximumMessageBytes()); size > max {
		return 0, errs.Invalid(f("body"), "message of %d bytes (body and attributes) exceeds the queue's maximum of %d", size, max)
	}
	if in.delay != nil {
		if q.fifo() {
			return 0, errs.Invalid(f("delay_seconds"), "per-message delays are not allowed on FIFO queues (use the queue's delay)")
		}
		if *in.delay < 0 || *in.delay > 900 {
			return 0, errs.Invalid(f("delay_seconds"), "delay %d is not within 0-900", *in.delay)
		}
	}
	if !q.fifo() {
		if in.group != "" {
			return 0, errs.Invalid(f("message_group_id"), "message group ids are for FIFO queues")
		}
		if in.dedup != "" {
			return 0, errs.Invalid(f("message_deduplication_id"), "deduplication ids are for FIFO queues")
		}
		return size, nil
	}
	if in.group == "" {
		return 0, errs.Invalid(f("message_group_id"), "a message group id is required on a FIFO queue")
	}
	if err := checkFifoID(in.group); err != nil {
		return 0, errs.Invalid(f("message_group_id"), "message group id: %w", err)
	}
	if in.dedup == "" && !cfg.GetContentBasedDeduplication() {
		return 0, errs.Invalid(f("message_deduplication_id"), "a deduplication id is required (the queue has no content-based deduplication)")
	}
	if in.dedup != "" {
		if err := checkFifoID(in.dedup); err != nil {
			return 0, errs.Invalid(f("message_deduplication_id"), "deduplication id: %w", err)
		}
	}
	return size, nil
}

type plainError string

func (e plainError) Error() string { return string(e) }

// checkBodyChars allows what SQS allows: #x9 #xA #xD, #x20-#xD7FF,
// #xE000-#xFFFD, #x10000-#x10FFFF.
func checkBodyChars(s string) error {
	if !utf8.ValidString(s) {
		return plainError("not valid UTF-8")
	}
	for i, r := range s {
		switch {
		case r == 0x9 || r == 0xA || r == 0xD,
			r >= 0x20 && r <= 0xD7FF,
			r >= 0xE000 && r <= 0xFFFD,
			r >= 0x10000 && r <= 0x10FFFF:
		default:
			return plainError("character U+" + strconv.FormatInt(int64(r), 16) + " at byte " + strconv.Itoa(i) + " is not allowed")
		}
	}
	return nil
}

// checkFifoID allows 1-128 ASCII letters, digits and punctuation.
func checkFifoID(s string) error {
	if len(s) > 128 {
		return plainError("longer than 128 characters")
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 33 || s[i] > 126 {
			return plainError("may hold only letters, digits and punctuation")
		}
	}
	return nil
}

// validateAttributes checks message attributes and returns their size.
func validateAttributes(field string, attrs map[string]*skiffv1.MessageAttribute) (int, error) {
	if len(attrs) > MaxAttributes {
		return 0, errs.Invalid(field, "%d message attributes; at most %d are allowed", len(attrs), MaxAttributes)
	}
	size := 0
	for name, a := range attrs {
		if err := checkAttrName(name); err != nil {
			return 0, errs.Invalid(field, "message attribute name %q: %w", name, err)
		}
		if a == nil {
			return 0, errs.Invalid(field, "message attribute %q has no value", name)
		}
		dt := a.GetDataType()
		base, custom, _ := strings.Cut(dt, ".")
		if len(dt) > 256 || (strings.Contains(dt, ".") && custom == "") {
			return 0, errs.Invalid(field, "message attribute %q: bad data type %q", name, dt)
		}
		switch base {
		case "String":
			if a.GetStringValue() == "" || len(a.GetBinaryValue()) > 0 {
				return 0, errs.Invalid(field, "message attribute %q of type %s needs a string value and no binary value", name, dt)
			}
			if err := checkBodyChars(a.GetStringValue()); err != nil {
				return 0, errs.Invalid(field, "message attribute %q: %w", name, err)
			}
		case "Number":
			if len(a.GetBinaryValue()) > 0 {
				return 0, errs.Invalid(field, "message attribute %q of type %s takes no binary value", name, dt)
			}
			if _, err := strconv.ParseFloat(a.GetStringValue(), 64); err != nil {
				return 0, errs.Invalid(field, "message attribute %q: %q is not a number", name, a.GetStringValue())
			}
		case "Binary":
			if len(a.GetBinaryValue()) == 0 || a.GetStringValue() != "" {
				return 0, errs.Invalid(field, "message attribute %q of type %s needs a binary value and no string value", name, dt)
			}
		default:
			return 0, errs.Invalid(field, "message attribute %q: data type %q is not String, Number or Binary", name, dt)
		}
		size += len(name) + len(dt) + len(a.GetStringValue()) + len(a.GetBinaryValue())
	}
	return size, nil
}

func checkAttrName(name string) error {
	if name == "" || len(name) > 256 {
		return plainError("not 1-256 characters")
	}
	lower := strings.ToLower(name)
	switch {
	case strings.HasPrefix(lower, "aws.") || strings.HasPrefix(lower, "amazon."):
		return plainError("the prefixes AWS. and Amazon. are reserved")
	case strings.HasPrefix(name, ".") || strings.HasSuffix(name, ".") || strings.Contains(name, ".."):
		return plainError("periods may not start or end it or follow each other")
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return plainError("may hold only letters, digits, '-', '_' and '.'")
		}
	}
	return nil
}

// validateBatchIDs checks batch entry ids: 1-80 letters, digits, '-' and
// '_', distinct.
func validateBatchIDs(ids []string) error {
	if len(ids) == 0 || len(ids) > MaxBatchEntries {
		return errs.Invalid("entries", "a batch holds 1-%d entries, not %d", MaxBatchEntries, len(ids))
	}
	seen := map[string]bool{}
	for i, id := range ids {
		if id == "" || len(id) > 80 {
			return errs.Invalid("entries", "entry %d: id %q is not 1-80 characters", i, id)
		}
		for j := 0; j < len(id); j++ {
			c := id[j]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return errs.Invalid("entries", "entry %d: id %q may hold only letters, digits, '-' and '_'", i, id)
			}
		}
		if seen[id] {
			return errs.Invalid("entries", "entry id %q appears twice", id)
		}
		seen[id] = true
	}
	return nil
}
