package pki

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"skiff.dev/skiff/internal/errs"
)

const testFP = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func TestTokenRoundTripAndRedaction(t *testing.T) {
	tok, err := NewToken(testFP)
	if err != nil {
		t.Fatal(err)
	}
	enc := tok.Encode()
	if !strings.HasPrefix(enc, TokenPrefix+":"+tok.ID+"."+tok.Secret+":") || !strings.HasSuffix(enc, testFP) {
		t.Errorf("Encode = %q", enc)
	}
	got, err := ParseToken(" " + enc + "\n")
	if err != nil || got != tok {
		t.Fatalf("ParseToken(Encode) = %v, %v; want %v", got, err, tok)
	}
	for _, s := range []string{tok.String(), fmt.Sprint(tok), fmt.Sprintf("%v %+v %#v %s", tok, tok, tok, tok)} {
		if strings.Contains(s, tok.Secret) {
			t.Errorf("formatted token shows the secret: %s", s)
		}
	}
	var logs strings.Builder
	slog.New(slog.NewJSONHandler(&logs, nil)).Info("token", "token", tok)
	slog.New(slog.NewTextHandler(&logs, nil)).Info("token", "token", tok)
	if strings.Contains(logs.String(), tok.Secret) || !strings.Contains(logs.String(), tok.ID) {
		t.Errorf("logged token: %s", logs.String())
	}
	other, _ := NewToken(testFP)
	if other.ID == tok.ID || other.Secret == tok.Secret {
		t.Error("two tokens share an id or secret")
	}
	if _, err := NewToken("nothex"); !errs.IsInvalid(err) {
		t.Errorf("NewToken with a bad fingerprint: %v", err)
	}
}

func TestParseTokenMalformed(t *testing.T) {
	secret := "fedcba9876543210fedcba9876543210"
	good := TokenPrefix + ":0123456789ab." + secret + ":" + testFP
	if _, err := ParseToken(good); err != nil {
		t.Fatalf("good token: %v", err)
	}
	bad := []string{
		"",
		strings.Repeat("a", MaxTokenLen+1),
		"0123456789ab." + secret,
		"skiff-join-v2:0123456789ab." + secret + ":" + testFP,
		TokenPrefix + ":0123456789ab" + secret + ":" + testFP,
		TokenPrefix + ":0123456789AB." + secret + ":" + testFP,
		TokenPrefix + ":0123456789a." + secret + ":" + testFP,
		TokenPrefix + ":0123456789ab." + secret + "0:" + testFP,
		TokenPrefix + ":0123456789ab." + secret + ":" + testFP[1:],
		TokenPrefix + ":0123456789ab." + secret + ":" + testFP + ":x",
	}
	for _, s := range bad {
		_, err := ParseToken(s)
		var e *errs.Error
		if !errors.As(err, &e) || e.Field != "token" || e.Reason != ReasonTokenMalformed {
			t.Errorf("ParseToken(%.40q): %v, want malformed", s, err)
			continue
		}
		if strings.Contains(err.Error(), secret) {
			t.Errorf("the error quotes the secret: %v", err)
		}
	}
}
