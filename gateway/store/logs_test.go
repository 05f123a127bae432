package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"skiff.dev/skiff/internal/errs"
)

var logEpoch = time.Date(2026, 5, 6, 7, 8, 9, 123456789, time.UTC)

func appendLogs(t testing.TB, s *Store, function string, from, n int) {
	t.Helper()
	for i := from; i < from+n; i++ {
		e := LogEntry{
			Function:  function,
			RequestID: fmt.Sprintf("%s-%d", function, i),
			Time:      logEpoch.Add(time.Duration(i) * time.Second),
			Text:      fmt.Sprintf("START RequestId: %s-%d\nline %d\nEND\nREPORT\n", function, i, i),
		}
		if err := s.AppendLog(testCtx(t), e); err != nil {
			t.Fatalf("AppendLog: %v", err)
		}
	}
}

func readIDs(t testing.TB, s *Store, function string, last int) []string {
	t.Helper()
	var ids []string
	err := s.ReadLogs(testCtx(t), function, last, false, func(e LogEntry) error {
		ids = append(ids, e.RequestID)
		return nil
	})
	if err != nil {
		t.Fatalf("ReadLogs(%s, %d): %v", function, last, err)
	}
	return ids
}

func ids(function string, from, to int) []string {
	var out []string
	for i := from; i < to; i++ {
		out = append(out, fmt.Sprintf("%s-%d", function, i))
	}
	return out
}

func TestReadLogsLastN(t *testing.T) {
	s := openStore(t, Config{})
	// Interleave two functions so their sequences are not contiguous.
	for i := 0; i < 10; i++ {
		appendLogs(t, s, "a", i, 1)
		appendLogs(t, s, "b", i, 1)
	}
	tests := []struct {
		function string
		last     int
		want     []string
	}{
		{"a", 3, ids("a", 7, 10)},
		{"a", 1, ids("a", 9, 10)},
		{"b", 9, ids("b", 1, 10)},
		{"a", 10, ids("a", 0, 10)},
		{"a", 100, ids("a", 0, 10)},
		{"a", -1, ids("a", 0, 10)},
		{"a", 0, nil},
		{"nologs", 5, nil},
		{"nologs", -1, nil},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%s last %d", tt.function, tt.last), func(t *testing.T) {
			if diff := cmp.Diff(tt.want, readIDs(t, s, tt.function, tt.last)); diff != "" {
				t.Fatalf("request ids (-want +got):\n%s", diff)
			}
		})
	}

	var got []LogEntry
	if err := s.ReadLogs(testCtx(t), "b", 1, false, func(e LogEntry) error { got = append(got, e); return nil }); err != nil {
		t.Fatal(err)
	}
	want := []LogEntry{{Function: "b", RequestID: "b-9", Time: logEpoch.Add(9 * time.Second), Text: "START RequestId: b-9\nline 9\nEND\nREPORT\n"}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("entry (-want +got):\n%s", diff)
	}

	// An error from fn stops the read and is returned as is.
	stop := errors.New("stop")
	n := 0
	err := s.ReadLogs(testCtx(t), "a", -1, false, func(LogEntry) error { n++; return stop })
	if !errors.Is(err, stop) || n != 1 {
		t.Fatalf("fn error: got %v after %d entries, want stop after 1", err, n)
	}

	// Reads leave no consumers behind.
	info, err := s.logs.Info(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Consumers != 0 {
		t.Fatalf("consumers on LOGS after reads: got %d, want 0", info.State.Consumers)
	}
}

func TestReadLogsFollow(t *testing.T) {
	tests := []struct {
		name    string
		backlog int
		last    int
		want    []string // before the live ones
	}{
		{"after backlog", 5, 2, ids("f", 3, 5)},
		{"only new", 5, 0, nil},
		{"empty stream", 0, 3, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := openStore(t, Config{})
			appendLogs(t, s, "f", 0, tt.backlog)
			ctx, cancel := context.WithTimeout(testCtx(t), 30*time.Second)
			defer cancel()
			got := make(chan string, 100)
			done := make(chan error, 1)
			go func() {
				done <- s.ReadLogs(ctx, "f", tt.last, true, func(e LogEntry) error {
					got <- e.RequestID
					return nil
				})
			}()
			recv := func(want string) {
				t.Helper()
				select {
				case id := <-got:
					if id != want {
						t.Fatalf("got entry %s, want %s", id, want)
					}
				case err := <-done:
					t.Fatalf("ReadLogs returned %v while following", err)
				case <-time.After(10 * time.Second):
					t.Fatalf("no entry %s within 10s", want)
				}
			}
			for _, id := range tt.want {
				recv(id)
			}
			// Live entries. Once the backlog arrived (or, on an empty
			// stream, from the start) the first one appended must come
			// first. With last == 0 nothing says when the call took its
			// snapshot, so append until one arrives; it must be one of ours
			// and the rest must follow in order.
			next := 100
			appendLogs(t, s, "other", 0, 1)
			appendLogs(t, s, "f", next, 1)
			next++
			first := -1
			deadline := time.Now().Add(10 * time.Second)
			for first < 0 {
				select {
				case id := <-got:
					if _, err := fmt.Sscanf(id, "f-%d", &first); err != nil || first < 100 || first >= next {
						t.Fatalf("got entry %s, want one of f-100..f-%d", id, next-1)
					}
				case err := <-done:
					t.Fatalf("ReadLogs returned %v while following", err)
				case <-time.After(20 * time.Millisecond):
					if time.Now().After(deadline) {
						t.Fatal("no live entry within 10s")
					}
					appendLogs(t, s, "f", next, 1)
					next++
				}
			}
			if tt.last != 0 && first != 100 {
				t.Fatalf("first live entry: got f-%d, want f-100", first)
			}
			for i := first + 1; i < next; i++ {
				recv(fmt.Sprintf("f-%d", i))
			}
			appendLogs(t, s, "f", next, 1)
			recv(fmt.Sprintf("f-%d", next))
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("ReadLogs after cancel: got %v, want nil", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("ReadLogs did not return within 10s of cancel")
			}
			select {
			case id := <-got:
				t.Fatalf("unexpected extra entry %s", id)
			default:
			}
		})
	}
}

func TestReadLogsDoesNotBlockOnNewEntries(t *testing.T) {
	s := openStore(t, Config{})
	appendLogs(t, s, "f", 0, 5)
	n := 0
	err := s.ReadLogs(testCtx(t), "f", 3, false, func(e LogEntry) error {
		n++
		if n == 1 {
			appendLogs(t, s, "f", 50, 3) // after the snapshot: not part of this read
		}
		return nil
	})
	if err != nil || n != 3 {
		t.Fatalf("got %d entries, %v; want 3", n, err)
	}
}

func TestAppendLogTruncatesKeepingTail(t *testing.T) {
	s := openStore(t, Config{})
	ctx := testCtx(t)
	head := strings.Repeat("h", 100<<10)
	tail := "…the end: REPORT RequestId: r\n"
	text := head + strings.Repeat("m", 300<<10) + tail
	if err := s.AppendLog(ctx, LogEntry{Function: "big", RequestID: "r", Text: text}); err != nil {
		t.Fatal(err)
	}
	var got LogEntry
	if err := s.ReadLogs(ctx, "big", 1, false, func(e LogEntry) error { got = e; return nil }); err != nil {
		t.Fatal(err)
	}
	if len(got.Text) > MaxLogEntry {
		t.Fatalf("stored text: got %d bytes, want at most %d", len(got.Text), MaxLogEntry)
	}
	if !strings.HasSuffix(got.Text, tail) || !strings.HasPrefix(got.Text, "[skiff: ") || strings.Contains(got.Text, "hhh") {
		t.Fatalf("stored text does not keep the tail: starts %q, ends %q", got.Text[:40], got.Text[len(got.Text)-40:])
	}
	if got.Time.IsZero() {
		t.Fatal("entry without a time: got zero time, want the clock's")
	}

	// Truncation never splits a rune.
	multi := strings.Repeat("é", 200<<10)
	if tr := truncateTail(multi, 1001); len(tr) > 1001 || !strings.HasSuffix(tr, "éé") || strings.ContainsRune(tr, '\uFFFD') {
		t.Fatalf("truncateTail of runes: got %d bytes ending %q", len(tr), tr[len(tr)-4:])
	}
}

// TestLogRetentionEnforced checks the engine really drops old entries past
// LogMaxBytes.
func TestLogRetentionEnforced(t *testing.T) {
	const maxBytes = 16 << 10
	s := openStore(t, Config{LogMaxBytes: maxBytes})
	ctx := testCtx(t)
	text := strings.Repeat("x", 1000)
	for i := 0; i < 100; i++ {
		if err := s.AppendLog(ctx, LogEntry{Function: "r", RequestID: fmt.Sprint(i), Text: text}); err != nil {
			t.Fatal(err)
		}
	}
	info, err := s.logs.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Bytes > maxBytes {
		t.Fatalf("stream bytes: got %d, want at most %d", info.State.Bytes, maxBytes)
	}
	got := readIDs(t, s, "r", -1)
	if len(got) == 0 || len(got) >= 100 || got[len(got)-1] != "99" {
		t.Fatalf("retained entries: got %d ending %v, want some but not all, ending with 99", len(got), got[len(got)-1:])
	}
}

func TestReadLogsCanceled(t *testing.T) {
	s := openStore(t, Config{})
	appendLogs(t, s, "f", 0, 3)
	ctx, cancel := context.WithCancel(testCtx(t))
	cancel()
	err := s.ReadLogs(ctx, "f", 2, false, func(LogEntry) error { return nil })
	if k := errs.KindOf(err); k != errs.KindCanceled {
		t.Fatalf("canceled read: got %v (kind %v), want kind canceled", err, k)
	}
}

// TestNthLastSeqWithLaterEntries checks the start search when entries were
// appended after the snapshot end (they inflate the pending counts the
// search uses, and the scan must still be exact).
func TestNthLastSeqWithLaterEntries(t *testing.T) {
	s := openStore(t, Config{})
	appendLogs(t, s, "a", 0, 10) // sequences 1..10 in a fresh stream
	tests := []struct {
		last int
		end  uint64
		want uint64
	}{
		{3, 5, 3},
		{1, 5, 5},
		{5, 5, 1},
		{3, 10, 8},
		{9, 10, 2},
	}
	for _, tt := range tests {
		got, err := s.nthLastSeq(testCtx(t), logSubject("a"), tt.last, tt.end)
		if err != nil {
			t.Fatal(err)
		}
		if got != tt.want {
			t.Errorf("nthLastSeq(last %d, end %d): got %d, want %d", tt.last, tt.end, got, tt.want)
		}
	}
}
