package destinations

import (
	"errors"
	"strings"
	"testing"

	"skiff.dev/skiff/internal/errs"
)

func TestParseTarget(t *testing.T) {
	tests := []struct {
		in      string
		want    Target
		wantErr string // substring; "" means success
	}{
		{in: "queue:orders", want: Target{Kind: KindQueue, Name: "orders"}},
		{in: "queue:orders-dlq_1.fifo", want: Target{Kind: KindQueue, Name: "orders-dlq_1.fifo"}},
		{in: "queue:" + strings.Repeat("q", 80), want: Target{Kind: KindQueue, Name: strings.Repeat("q", 80)}},
		{in: "function:hello", want: Target{Kind: KindFunction, Name: "hello"}},
		{in: "function:" + strings.Repeat("f", 64), want: Target{Kind: KindFunction, Name: strings.Repeat("f", 64)}},
		{in: "https://hooks.example.com/skiff?token=x", want: Target{Kind: KindWebhook, URL: "https://hooks.example.com/skiff?token=x"}},
		{in: "https://hooks.example.com:8443/", want: Target{Kind: KindWebhook, URL: "https://hooks.example.com:8443/"}},
		{in: "http://127.0.0.1:8080/hook", want: Target{Kind: KindWebhook, URL: "http://127.0.0.1:8080/hook"}},
		{in: "http://127.9.9.9/hook", want: Target{Kind: KindWebhook, URL: "http://127.9.9.9/hook"}},
		{in: "http://[::1]:9000/hook", want: Target{Kind: KindWebhook, URL: "http://[::1]:9000/hook"}},
		{in: "http://localhost/hook", want: Target{Kind: KindWebhook, URL: "http://localhost/hook"}},

		{in: "", wantErr: "empty"},
		{in: "queue:", wantErr: "name is empty"},
		{in: "queue:.fifo", wantErr: "nothing before"},
		{in: "queue:" + strings.Repeat("q", 81), wantErr: "over the limit of 80"},
		{in: "queue:a b", wantErr: "may only contain"},
		{in: "queue:a.b", wantErr: "may only contain"},
		{in: "function:", wantErr: "name is empty"},
		{in: "function:x.fifo", wantErr: "may only contain"},
		{in: "function:" + strings.Repeat("f", 65), wantErr: "over the limit of 64"},
		{in: "function:a/b", wantErr: "may only contain"},
		{in: "sqs:orders", wantErr: "is not"},
		{in: "Queue:orders", wantErr: "is not"},
		{in: "ftp://example.com", wantErr: "is not"},
		{in: "orders", wantErr: "is not"},
		{in: "http://example.com/hook", wantErr: "must use https"},
		{in: "http://10.0.0.1/hook", wantErr: "must use https"},
		{in: "https://", wantErr: "no host"},
		{in: "https://:443/x", wantErr: "no host"},
		{in: "https://user:pw@example.com/", wantErr: "credentials"},
		{in: "https://example.com/#frag", wantErr: "fragment"},
		{in: "https://example.com:99999/", wantErr: "port"},
		{in: "https://exa mple.com/", wantErr: "webhook URL"},
		{in: "https://example.com/" + strings.Repeat("p", 2048), wantErr: "over the limit of 2048"},
	}
	for _, tt := range tests {
		t.Run(truncate(tt.in, 40), func(t *testing.T) {
			got, err := ParseTarget(tt.in)
			if tt.wantErr != "" {
				if err == nil {
					t.Fatalf("ParseTarget(%q) = %+v, want an error containing %q", tt.in, got, tt.wantErr)
				}
				if !errs.IsInvalid(err) {
					t.Errorf("ParseTarget(%q) error kind = %v, want invalid_argument", tt.in, errs.KindOf(err))
				}
				var e *errs.Error
				if !errors.As(err, &e) || e.Field != "destination" {
					t.Errorf("ParseTarget(%q) error field = %v, want destination", tt.in, e)
				}
				if !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("ParseTarget(%q) error = %q, want it to contain %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseTarget(%q): %v", tt.in, err)
			}
			if got != tt.want {
				t.Errorf("ParseTarget(%q) = %+v, want %+v", tt.in, got, tt.want)
			}
			if s := got.String(); s != tt.in {
				t.Errorf("String() = %q, want %q", s, tt.in)
			}
		})
	}
}

func TestRedact(t *testing.T) {
	if got, want := redact("https://h.example/p?token=secret"), "https://h.example/p"; got != want {
		t.Errorf("redact = %q, want %q", got, want)
	}
}

func FuzzParseTarget(f *testing.F) {
	for _, s := range []string{"queue:a", "function:b", "https://x.example/y?z", "http://127.0.0.1:1/", "queue:.fifo", "http://[::1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, err := ParseTarget(s)
		if err != nil {
			if !errs.IsInvalid(err) {
				t.Fatalf("ParseTarget(%q) error kind = %v, want invalid_argument", s, errs.KindOf(err))
			}
			return
		}
		again, err := ParseTarget(got.String())
		if err != nil || again != got {
			t.Fatalf("ParseTarget(String()) of %q = %+v, %v; want %+v", s, again, err, got)
		}
	})
}
