package destinations

import (
	"net"
	"net/url"
	"strings"

	"skiff.dev/skiff/internal/errs"
)

// Kinds of target.
const (
	KindQueue    = "queue"
	KindFunction = "function"
	KindWebhook  = "webhook"
)

// Limits on targets.
const (
	maxQueueName    = 80
	maxFunctionName = 64
	maxURL          = 2048
)

// Target is a parsed destination.
type Target struct {
	Kind string // KindQueue, KindFunction or KindWebhook
	Name string // the queue or function name
	URL  string // the webhook URL
}

// String returns the target in the form ParseTarget reads.
func (t Target) String() string {
	if t.Kind == KindWebhook {
		return t.URL
	}
	return t.Kind + ":" + t.Name
}

// ParseTarget parses a destination: "queue:NAME", "function:NAME", or a
// webhook URL. Webhooks must use https, except that plain http is allowed to
// loopback hosts (127.0.0.0/8, ::1, localhost), where nothing crosses a
// network; URLs with credentials or a fragment are refused (the target is
// stored and shown in the function's configuration). Errors are
// errs.Invalid("destination").
func ParseTarget(s string) (Target, error) {
	switch {
	case s == "":
		return Target{}, errs.Invalid("destination", "destination is empty")
	case strings.HasPrefix(s, "queue:"):
		name := strings.TrimPrefix(s, "queue:")
		if err := checkName("queue", name, maxQueueName, true); err != nil {
			return Target{}, err
		}
		return Target{Kind: KindQueue, Name: name}, nil
	case strings.HasPrefix(s, "function:"):
		name := strings.TrimPrefix(s, "function:")
		if err := checkName("function", name, maxFunctionName, false); err != nil {
			return Target{}, err
		}
		return Target{Kind: KindFunction, Name: name}, nil
	case strings.HasPrefix(s, "https://"), strings.HasPrefix(s, "http://"):
		if err := checkURL(s); err != nil {
			return Target{}, err
		}
		return Target{Kind: KindWebhook, URL: s}, nil
	}
	return Target{}, errs.Invalid("destination", "destination %q is not \"queue:NAME\", \"function:NAME\" or an http(s) URL", truncate(s, 100))
}

// checkName applies the naming rule of queues and functions: letters,
// digits, hyphens and underscores (and, for queues, a ".fifo" suffix).
func checkName(kind, name string, limit int, fifo bool) error {
	if name == "" {
		return errs.Invalid("destination", "destination %s name is empty", kind)
	}
	if len(name) > limit {
		return errs.Invalid("destination", "destination %s name is %d characters, over the limit of %d", kind, len(name), limit)
	}
	base := name
	if fifo {
		base = strings.TrimSuffix(name, ".fifo")
	}
	if base == "" {
		return errs.Invalid("destination", "destination %s name %q has nothing before \".fifo\"", kind, name)
	}
	for i := 0; i < len(base); i++ {
		c := base[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return errs.Invalid("destination", "destination %s name %q may only contain letters, digits, hyphens and underscores", kind, truncate(name, 100))
		}
	}
	return nil
}

func checkURL(s string) error {
	if len(s) > maxURL {
		return errs.Invalid("destination", "webhook URL is %d characters, over the limit of %d", len(s), maxURL)
	}
	u, err := url.Parse(s)
	if err != nil {
		return errs.Invalid("destination", "webhook URL: %w", err)
	}
	switch {
	case u.Host == "" || u.Hostname() == "":
		return errs.Invalid("destination", "webhook URL %q has no host", truncate(s, 100))
	case u.User != nil:
		return errs.Invalid("destination", "webhook URL must not carry credentials")
	case u.Fragment != "" || strings.Contains(s, "#"):
		return errs.Invalid("destination", "webhook URL must not have a fragment")
	case u.Scheme == "http" && !loopback(u.Hostname()):
		return errs.Invalid("destination", "webhook URL must use https (plain http is allowed only to loopback hosts)")
	}
	if p := u.Port(); p != "" {
		if n, ok := atoi(p); !ok || n < 1 || n > 65535 {
			return errs.Invalid("destination", "webhook URL port %q is out of range", p)
		}
	}
	return nil
}

func loopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func atoi(s string) (int, bool) {
	if s == "" || len(s) > 5 {
		return 0, false
	}
	n := 0
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
		n = n*10 + int(s[i]-'0')
	}
	return n, true
}

// redact returns a URL without its query, for logs and errors (a query may
// carry a token).
func redact(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "<invalid url>"
	}
	u.RawQuery, u.ForceQuery, u.User, u.Fragment = "", false, nil, ""
	return u.String()
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
