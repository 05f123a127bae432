package main

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/testing/protocmp"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

const (
	hash127    = "170141183460469231731687303715884105728" // 2^127
	hash127m1  = "170141183460469231731687303715884105727" // 2^127-1
	hashMax    = "340282366920938463463374607431768211455" // 2^128-1
	hash126    = "85070591730234615865843651857942052864"  // 2^126
	arrivalStr = "2026-11-27T10:00:00.000Z"
)

// wantCalls compares the recorded calls of the stream fake, in order.
func wantCalls(t *testing.T, f *fakeStreams, want []string, wantReqs []any) {
	t.Helper()
	procs, reqs := f.all()
	if d := cmp.Diff(want, procs); d != "" {
		t.Fatalf("calls (-want +got):\n%s", d)
	}
	if d := cmp.Diff(wantReqs, reqs, protocmp.Transform()); d != "" {
		t.Errorf("requests (-want +got):\n%s", d)
	}
}

func TestStreamCreate(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want *skiffv1.CreateStreamRequest
	}{
		{"shards", []string{"clicks", "--shards", "2"}, &skiffv1.CreateStreamRequest{Name: "clicks", ShardCount: 2}},
		{"retention", []string{"audit", "--shards", "1", "--retention-hours", "168"}, &skiffv1.CreateStreamRequest{Name: "audit", ShardCount: 1, RetentionPeriodHours: 168}},
	}
	for _, tt := range tests {
		for _, proto := range protocols {
			t.Run(tt.name+"/"+proto, func(t *testing.T) {
				s := newFakeServer(t)
				r := newCLI(t, s).run(append([]string{"--protocol", proto, "stream", "create"}, tt.args...)...)
				if r.code != 0 {
					t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
				}
				_, h, msg := s.st.last(t)
				if d := cmp.Diff(tt.want, msg, protocmp.Transform()); d != "" {
					t.Errorf("request (-want +got):\n%s", d)
				}
				if h.Get("Authorization") != "Bearer test-key" {
					t.Errorf("Authorization = %q, want Bearer test-key", h.Get("Authorization"))
				}
				if got := s.st.protocols(); len(got) != 1 || got[0] != proto {
					t.Errorf("server saw protocols %v, want %s", got, proto)
				}
			})
		}
	}
}

func TestStreamCreateOutput(t *testing.T) {
	s := newFakeServer(t)
	r := newCLI(t, s).run("stream", "create", "clicks", "--shards", "2")
	if r.code != 0 {
		t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
	}
	checkFields(t, r.stdout, map[string]string{
		"Name:":      "clicks",
		"ARN:":       "arn:skiff:kinesis:local:000000000000:stream/clicks",
		"Status:":    "ACTIVE",
		"Retention:": "24 h (default)",
		"Shards:":    "2 open, 2 in all",
		"Created:":   "2026-01-07T00:00:00Z",
	})
	want := [][]string{
		{"SHARD", "STATE", "PARENT", "ADJACENT", "PARENT", "HASH", "KEYS", "SEQUENCE", "NUMBERS"},
		{"shardId-000000000000", "open", "-", "-", "0-" + hash127m1, "1-…"},
		{"shardId-000000000001", "open", "-", "-", hash127 + "-" + hashMax, "1-…"},
	}
	_, table, ok := strings.Cut(r.stdout, "\n\n")
	if !ok {
		t.Fatalf("no shard table in:\n%s", r.stdout)
	}
	lines := strings.Split(strings.TrimSuffix(table, "\n"), "\n")
	if len(lines) != len(want) {
		t.Fatalf("shard table has %d lines, want %d:\n%s", len(lines), len(want), table)
	}
	for i := range want {
		if d := cmp.Diff(want[i], strings.Fields(lines[i])); d != "" {
			t.Errorf("line %d (-want +got):\n%s", i, d)
		}
	}
}

func TestStreamCreateErrors(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"stream", "create", "clicks"}, "--shards is required"},
		{[]string{"stream", "create", "--shards", "2"}, "accepts 1 arg"},
		{[]string{"stream", "create", "clicks", "--shards", "many"}, "invalid argument"},
	} {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			s := newFakeServer(t)
			r := newCLI(t, s).run(tt.args...)
			if r.code != exitUsage || !strings.Contains(r.stderr, tt.want) {
				t.Errorf("exit %d, stderr %q; want %d and %q", r.code, r.stderr, exitUsage, tt.want)
			}
			if s.st.count() != 0 {
				t.Errorf("the server got a call, want none")
			}
		})
	}
	t.Run("server", func(t *testing.T) {
		s := newFakeServer(t)
		s.st.fail = errs.Invalid("shard_count", "shard count 65 is out of range 1-64")
		r := newCLI(t, s).run("stream", "create", "clicks", "--shards", "65")
		want := "skiff: shard count 65 is out of range 1-64 (reason: invalid_shard_count, field: shard_count)\n"
		if r.code != 1 || r.stderr != want {
			t.Errorf("got exit %d, stderr %q; want 1, %q", r.code, r.stderr, want)
		}
	})
}

func TestStreamListDescribeDelete(t *testing.T) {
	s := newFakeServer(t)
	closed := evenShards(1)[0]
	closed.Open, closed.EndingSequenceNumber = false, "57"
	s.st.shards = []*skiffv1.Shard{
		closed,
		{ShardId: "shardId-000000000001", ParentShardId: "shardId-000000000000", StartingHashKey: "0", EndingHashKey: hash127m1, StartingSequenceNumber: "58", Open: true},
		{ShardId: "shardId-000000000002", ParentShardId: "shardId-000000000000", StartingHashKey: hash127, EndingHashKey: hashMax, StartingSequenceNumber: "59", Open: true},
	}
	c := newCLI(t, s)

	r := c.run("stream", "list")
	if r.code != 0 || r.stdout != "NAME\naudit\nclicks\n" {
		t.Errorf("list: exit %d, stdout %q", r.code, r.stdout)
	}
	r = c.run("stream", "list", "-o", "json")
	var listed struct {
		Names []string `json:"names"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &listed); err != nil || !cmp.Equal(listed.Names, []string{"audit", "clicks"}) {
		t.Errorf("list json %q (err %v), want both names", r.stdout, err)
	}

	for _, proto := range protocols {
		r = c.run("--protocol", proto, "stream", "describe", "clicks")
		if r.code != 0 {
			t.Fatalf("%s: describe: exit %d, stderr %s", proto, r.code, r.stderr)
		}
		if _, _, msg := s.st.last(t); !cmp.Equal(&skiffv1.DescribeStreamRequest{Name: "clicks"}, msg, protocmp.Transform()) {
			t.Errorf("%s: describe request %v, want clicks", proto, msg)
		}
	}
	checkFields(t, r.stdout, map[string]string{"Retention:": "48 h", "Shards:": "2 open, 3 in all"})
	for _, want := range [][]string{
		{"shardId-000000000000", "closed", "-", "-", "0-" + hashMax, "1-57"},
		{"shardId-000000000001", "open", "shardId-000000000000", "-", "0-" + hash127m1, "58-…"},
	} {
		found := false
		for _, l := range strings.Split(r.stdout, "\n") {
			found = found || cmp.Equal(want, strings.Fields(l))
		}
		if !found {
			t.Errorf("describe lacks the row %v:\n%s", want, r.stdout)
		}
	}
	r = c.run("stream", "describe", "clicks", "-o", "json")
	var described struct {
		Stream struct {
			Shards []struct {
				ShardID              string `json:"shardId"`
				EndingSequenceNumber string `json:"endingSequenceNumber"`
			} `json:"shards"`
		} `json:"stream"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &described); err != nil || len(described.Stream.Shards) != 3 || described.Stream.Shards[0].EndingSequenceNumber != "57" {
		t.Errorf("describe json %q (err %v), want three shards, the first ended at 57", r.stdout, err)
	}
	if r := c.run("stream", "describe", "missing"); r.code != 1 || !strings.Contains(r.stderr, `stream "missing" not found (reason: not_found)`) {
		t.Errorf("describe missing: exit %d, stderr %q", r.code, r.stderr)
	}

	for _, proto := range protocols {
		r = c.run("--protocol", proto, "stream", "delete", "clicks")
		if r.code != 0 || r.stdout != "deleted stream clicks\n" {
			t.Errorf("%s: delete: exit %d, stdout %q, stderr %q", proto, r.code, r.stdout, r.stderr)
		}
		if proc, _, msg := s.st.last(t); proc != "DeleteStream" || msg.(*skiffv1.DeleteStreamRequest).GetName() != "clicks" {
			t.Errorf("%s: got %s %v, want DeleteStream of clicks", proto, proc, msg)
		}
	}
	if r := c.run("stream", "delete", "missing"); r.code != 1 || !strings.Contains(r.stderr, "not found") {
		t.Errorf("delete missing: exit %d, stderr %q", r.code, r.stderr)
	}
	for _, args := range [][]string{{"stream", "describe"}, {"stream", "delete"}, {"stream", "list", "x"}, {"stream", "nope"}, {"stream", "delete", "a", "b"}} {
		before := s.st.count()
		if r := c.run(args...); r.code != exitUsage {
			t.Errorf("%v: exit %d, want %d; stderr %q", args, r.code, exitUsage, r.stderr)
		}
		if s.st.count() != before {
			t.Errorf("%v: the server got a call, want none", args)
		}
	}
}

func TestStreamPut(t *testing.T) {
	binary := []byte{0xff, 0x00, 0x10, '\n'}
	file := writeFile(t, filepath.Join(t.TempDir(), "click.json"), []byte(`{"page":"/"}`), 0o644)
	tests := []struct {
		name  string
		args  []string
		stdin string
		want  *skiffv1.PutRecordRequest
	}{
		{"literal", []string{"--data", `{"page":"/"}`}, "", &skiffv1.PutRecordRequest{Stream: "clicks", PartitionKey: "user-42", Data: []byte(`{"page":"/"}`)}},
		{"file", []string{"--data", "@" + file}, "", &skiffv1.PutRecordRequest{Stream: "clicks", PartitionKey: "user-42", Data: []byte(`{"page":"/"}`)}},
		{"binary stdin", []string{"--data", "-"}, string(binary), &skiffv1.PutRecordRequest{Stream: "clicks", PartitionKey: "user-42", Data: binary}},
		{"empty", []string{"--data", ""}, "", &skiffv1.PutRecordRequest{Stream: "clicks", PartitionKey: "user-42"}},
		{
			"explicit hash key", []string{"--data", "x", "--explicit-hash-key", hashMax}, "",
			&skiffv1.PutRecordRequest{Stream: "clicks", PartitionKey: "user-42", Data: []byte("x"), ExplicitHashKey: hashMax},
		},
	}
	for _, tt := range tests {
		for _, proto := range protocols {
			t.Run(tt.name+"/"+proto, func(t *testing.T) {
				s := newFakeServer(t)
				c := newCLI(t, s)
				c.stdin = tt.stdin
				r := c.run(append([]string{"--protocol", proto, "stream", "put", "clicks", "--partition-key", "user-42"}, tt.args...)...)
				if r.code != 0 {
					t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
				}
				_, _, msg := s.st.last(t)
				if d := cmp.Diff(tt.want, msg, protocmp.Transform()); d != "" {
					t.Errorf("request (-want +got):\n%s", d)
				}
				checkFields(t, r.stdout, map[string]string{"Shard ID:": "shardId-000000000001", "Sequence number:": "17"})
			})
		}
	}
}

func TestStreamPutErrors(t *testing.T) {
	for _, tt := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--data", "x"}, exitUsage, "--partition-key is required"},
		{[]string{"--partition-key", "k"}, exitUsage, "--data is required"},
		{[]string{"--partition-key", "k", "--data", "x", "--explicit-hash-key", "12ab"}, exitUsage, `invalid --explicit-hash-key: "12ab" is not a decimal number`},
		{[]string{"--partition-key", "k", "--data", "x", "--explicit-hash-key", "-1"}, exitUsage, "is not a decimal number"},
		{[]string{"--partition-key", "k", "--data", "x", "--explicit-hash-key", "340282366920938463463374607431768211456"}, exitUsage, "above the largest hash key"},
		{[]string{"--partition-key", "k", "--data", "@/does/not/exist"}, 1, "skiff: reading the record data:"},
	} {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			s := newFakeServer(t)
			r := newCLI(t, s).run(append([]string{"stream", "put", "clicks"}, tt.args...)...)
			if r.code != tt.code || !strings.Contains(r.stderr, tt.want) {
				t.Errorf("exit %d, stderr %q; want %d and %q", r.code, r.stderr, tt.code, tt.want)
			}
			if s.st.count() != 0 {
				t.Errorf("the server got a call, want none")
			}
		})
	}
	s := newFakeServer(t)
	s.st.fail = errs.Invalid("data", "data of 1048577 bytes is over the limit of 1048576")
	r := newCLI(t, s).run("stream", "put", "clicks", "--partition-key", "k", "--data", "x")
	if want := "skiff: data of 1048577 bytes is over the limit of 1048576 (reason: invalid_data, field: data)\n"; r.code != 1 || r.stderr != want {
		t.Errorf("got exit %d, stderr %q; want 1, %q", r.code, r.stderr, want)
	}
}

func rec(seq, key, data string) *skiffv1.Record {
	return &skiffv1.Record{SequenceNumber: seq, PartitionKey: key, Data: []byte(data), ApproximateArrivalTimestamp: arrivalStr}
}

// recordText is how `stream get` prints a record in a table.
func recordText(shard string, r *skiffv1.Record, size, data string) string {
	var b strings.Builder
	for _, f := range [][2]string{{"Shard ID:", shard}, {"Sequence number:", r.GetSequenceNumber()}, {"Partition key:", r.GetPartitionKey()},
		{"Arrival:", r.GetApproximateArrivalTimestamp()}, {"Data:", size}} {
		fmt.Fprintf(&b, "%-18s%s\n", f[0], f[1])
	}
	if data != "" {
		b.WriteString("\n" + data)
	}
	return b.String()
}

const (
	shard0 = "shardId-000000000000"
	shard1 = "shardId-000000000001"
	shard2 = "shardId-000000000002"
)

func TestStreamGet(t *testing.T) {
	r1, r2 := rec("1", "a", "hello"), rec("2", "b", "\xff\xfe\x00")
	r3 := rec("7", "c", "line one\n\tline two\n")
	trim := skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_TRIM_HORIZON
	gsi := func(shard string, typ skiffv1.ShardIteratorType) *skiffv1.GetShardIteratorRequest {
		return &skiffv1.GetShardIteratorRequest{Stream: "clicks", ShardId: shard, Type: typ}
	}
	gr := func(it string, limit int32) *skiffv1.GetRecordsRequest {
		return &skiffv1.GetRecordsRequest{ShardIterator: it, Limit: limit}
	}
	list := &skiffv1.ListShardsRequest{Stream: "clicks"}
	closed0 := evenShards(2)
	closed0[0].Open = false
	tests := []struct {
		name     string
		args     []string
		shards   []*skiffv1.Shard
		procs    []string
		reqs     []any
		stdout   string
		noRecord bool
	}{
		{
			name:  "every shard",
			procs: []string{"ListShards", "GetShardIterator", "GetRecords", "GetRecords", "GetShardIterator", "GetRecords", "GetRecords"},
			reqs: []any{list, gsi(shard0, trim), gr("it/"+shard0+"/0", 100), gr("it/"+shard0+"/1", 98),
				gsi(shard1, trim), gr("it/"+shard1+"/0", 98), gr("it/"+shard1+"/1", 97)},
			stdout: recordText(shard0, r1, "5 bytes", "hello\n") + "\n" + recordText(shard0, r2, "3 bytes, not UTF-8: shown in base64", "//4A\n") +
				"\n" + recordText(shard1, r3, "19 bytes", "line one\n\tline two\n"),
		},
		{
			name:  "after a sequence number",
			args:  []string{"--shard", "1", "--iterator", "after-sequence", "--sequence", "6"},
			procs: []string{"GetShardIterator", "GetRecords", "GetRecords"},
			reqs: []any{&skiffv1.GetShardIteratorRequest{Stream: "clicks", ShardId: shard1, Type: skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AFTER_SEQUENCE_NUMBER, StartingSequenceNumber: "6"},
				gr("it/"+shard1+"/0", 100), gr("it/"+shard1+"/1", 99)},
			stdout: recordText(shard1, r3, "19 bytes", "line one\n\tline two\n"),
		},
		{
			name:  "at a sequence number",
			args:  []string{"--shard", shard1, "--iterator", "AT-SEQUENCE", "--sequence", "7", "--limit", "1"},
			procs: []string{"GetShardIterator", "GetRecords"},
			reqs: []any{&skiffv1.GetShardIteratorRequest{Stream: "clicks", ShardId: shard1, Type: skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AT_SEQUENCE_NUMBER, StartingSequenceNumber: "7"},
				gr("it/"+shard1+"/0", 1)},
			stdout: recordText(shard1, r3, "19 bytes", "line one\n\tline two\n"),
		},
		{
			name:  "at a timestamp",
			args:  []string{"--shard", "0", "--iterator", "at-timestamp", "--timestamp", "2026-11-27T10:00:00Z", "--limit", "0"},
			procs: []string{"GetShardIterator", "GetRecords", "GetRecords"},
			reqs: []any{&skiffv1.GetShardIteratorRequest{Stream: "clicks", ShardId: shard0, Type: skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AT_TIMESTAMP, Timestamp: "2026-11-27T10:00:00Z"},
				gr("it/"+shard0+"/0", 0), gr("it/"+shard0+"/1", 0)},
			stdout: recordText(shard0, r1, "5 bytes", "hello\n") + "\n" + recordText(shard0, r2, "3 bytes, not UTF-8: shown in base64", "//4A\n"),
		},
		{
			name:   "latest skips closed shards",
			args:   []string{"--iterator", "latest"},
			shards: closed0,
			procs:  []string{"ListShards", "GetShardIterator", "GetRecords", "GetRecords"},
			reqs:   []any{list, gsi(shard1, skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_LATEST), gr("it/"+shard1+"/0", 100), gr("it/"+shard1+"/1", 99)},
			stdout: recordText(shard1, r3, "19 bytes", "line one\n\tline two\n"),
		},
		{
			name:   "limit",
			args:   []string{"--limit", "1"},
			procs:  []string{"ListShards", "GetShardIterator", "GetRecords"},
			reqs:   []any{list, gsi(shard0, trim), gr("it/"+shard0+"/0", 1)},
			stdout: recordText(shard0, r1, "5 bytes", "hello\n"),
		},
		{
			name:     "no records",
			args:     []string{"--shard", "2"},
			procs:    []string{"GetShardIterator", "GetRecords"},
			reqs:     []any{gsi(shard2, trim), gr("it/"+shard2+"/0", 100)},
			noRecord: true,
		},
	}
	for _, tt := range tests {
		for _, proto := range protocols {
			t.Run(tt.name+"/"+proto, func(t *testing.T) {
				s := newFakeServer(t)
				s.st.batches = map[string][][]*skiffv1.Record{shard0: {{r1, r2}}, shard1: {{r3}}}
				if tt.shards != nil {
					s.st.shards = tt.shards
				}
				r := newCLI(t, s).run(append([]string{"--protocol", proto, "stream", "get", "clicks"}, tt.args...)...)
				if r.code != 0 {
					t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
				}
				wantCalls(t, s.st, tt.procs, tt.reqs)
				if r.stdout != tt.stdout {
					t.Errorf("stdout:\n%s\nwant:\n%s", r.stdout, tt.stdout)
				}
				if got, want := r.stderr, map[bool]string{true: "no records\n"}[tt.noRecord]; got != want {
					t.Errorf("stderr %q, want %q", got, want)
				}
			})
		}
	}
}

func TestStreamGetJSON(t *testing.T) {
	s := newFakeServer(t)
	s.st.batches = map[string][][]*skiffv1.Record{shard0: {{rec("1", "a", "hello"), rec("2", "b", "\xff\x00")}}, shard1: {{rec("7", "c", "x")}}}
	r := newCLI(t, s).run("stream", "get", "clicks", "-o", "json")
	if r.code != 0 {
		t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
	}
	type record struct {
		ShardID, SequenceNumber, PartitionKey, ApproximateArrivalTimestamp string
		Data                                                               []byte
	}
	var got []record
	for _, l := range strings.Split(strings.TrimSuffix(r.stdout, "\n"), "\n") {
		var rec record
		if err := json.Unmarshal([]byte(l), &rec); err != nil {
			t.Fatalf("line %q is not JSON: %v", l, err)
		}
		got = append(got, rec)
	}
	want := []record{
		{shard0, "1", "a", arrivalStr, []byte("hello")},
		{shard0, "2", "b", arrivalStr, []byte("\xff\x00")},
		{shard1, "7", "c", arrivalStr, []byte("x")},
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("records (-want +got):\n%s", d)
	}
	if !strings.Contains(r.stdout, `"data":"aGVsbG8="`) {
		t.Errorf("data is not base64 under \"data\":\n%s", r.stdout)
	}
}

// followFake is a stream whose shard 0 is closed (its child is shard 2)
// and whose shard 1 gets its record after three empty reads.
func followFake(s *fakeServer) {
	closed := evenShards(2)
	closed[0].Open = false
	s.st.shards = closed
	s.st.batches = map[string][][]*skiffv1.Record{
		shard0: {{rec("1", "a", "one")}, {rec("2", "a", "two")}},
		shard1: {{rec("5", "b", "four")}},
		shard2: {{rec("9", "a", "three")}},
	}
	s.st.children = map[string][]string{shard0: {shard2}}
	s.st.empty = map[string]int{shard1: 3}
}

func TestStreamGetFollowLimit(t *testing.T) {
	for _, proto := range protocols {
		t.Run(proto, func(t *testing.T) {
			s := newFakeServer(t)
			followFake(s)
			r := newCLI(t, s).run("--protocol", proto, "stream", "get", "clicks", "--follow", "--limit", "3", "-o", "json")
			if r.code != 0 {
				t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
			}
			var datas []string
			for _, l := range strings.Split(strings.TrimSuffix(r.stdout, "\n"), "\n") {
				var rec struct {
					ShardID string `json:"shardId"`
					Data    []byte `json:"data"`
				}
				if err := json.Unmarshal([]byte(l), &rec); err != nil {
					t.Fatalf("line %q: %v", l, err)
				}
				datas = append(datas, rec.ShardID+":"+string(rec.Data))
			}
			// The closed shard first, then its child: shard 1 has nothing yet.
			if d := cmp.Diff([]string{shard0 + ":one", shard0 + ":two", shard2 + ":three"}, datas); d != "" {
				t.Errorf("records (-want +got):\n%s", d)
			}
			procs, reqs := s.st.all()
			var iters []*skiffv1.GetShardIteratorRequest
			for i, p := range procs {
				if p == "GetShardIterator" {
					iters = append(iters, reqs[i].(*skiffv1.GetShardIteratorRequest))
				}
			}
			trim := skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_TRIM_HORIZON
			want := []*skiffv1.GetShardIteratorRequest{
				{Stream: "clicks", ShardId: shard0, Type: trim}, {Stream: "clicks", ShardId: shard1, Type: trim}, {Stream: "clicks", ShardId: shard2, Type: trim},
			}
			if d := cmp.Diff(want, iters, protocmp.Transform()); d != "" {
				t.Errorf("iterators (-want +got):\n%s", d)
			}
		})
	}
}

func TestStreamGetFollowEndsOnInterrupt(t *testing.T) {
	s := newFakeServer(t)
	followFake(s)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	c := newCLI(t, s)
	var once sync.Once
	c.onStdout = func(out string) {
		if strings.Contains(out, "four\n") {
			once.Do(cancel)
		}
	}
	r := c.runCtx(ctx, "stream", "get", "clicks", "--iterator", "latest", "-f")
	if r.code != 0 {
		t.Errorf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
	}
	// --iterator latest reads only the open shard, which has a record after
	// three empty polls.
	if want := recordText(shard1, rec("5", "b", "four"), "4 bytes", "four\n"); r.stdout != want {
		t.Errorf("stdout:\n%s\nwant:\n%s", r.stdout, want)
	}
	procs, reqs := s.st.all()
	var limits []int32
	for i, p := range procs {
		if p == "GetRecords" {
			limits = append(limits, reqs[i].(*skiffv1.GetRecordsRequest).GetLimit())
		}
	}
	if len(limits) < 4 || limits[0] != 0 {
		t.Errorf("GetRecords limits %v, want at least four reads without a limit", limits)
	}
}

func TestStreamGetErrors(t *testing.T) {
	for _, tt := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--iterator", "oldest"}, exitUsage, `invalid --iterator "oldest"`},
		{[]string{"--iterator", "at-sequence", "--shard", "0"}, exitUsage, "--iterator at-sequence needs --sequence"},
		{[]string{"--iterator", "after-sequence", "--sequence", "5"}, exitUsage, "needs --shard"},
		{[]string{"--sequence", "5"}, exitUsage, "--sequence needs --iterator at-sequence or after-sequence"},
		{[]string{"--iterator", "at-timestamp"}, exitUsage, "--iterator at-timestamp needs --timestamp"},
		{[]string{"--timestamp", "2026-11-27T10:00:00Z"}, exitUsage, "--timestamp needs --iterator at-timestamp"},
		{[]string{"--iterator", "at-timestamp", "--timestamp", "yesterday"}, exitUsage, `invalid --timestamp "yesterday"`},
		{[]string{"--limit", "-1"}, exitUsage, "--limit must not be negative"},
		{[]string{"--limit", "many"}, exitUsage, "invalid argument"},
	} {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			s := newFakeServer(t)
			r := newCLI(t, s).run(append([]string{"stream", "get", "clicks"}, tt.args...)...)
			if r.code != tt.code || !strings.Contains(r.stderr, tt.want) {
				t.Errorf("exit %d, stderr %q; want %d and %q", r.code, r.stderr, tt.code, tt.want)
			}
			if s.st.count() != 0 {
				t.Errorf("the server got a call, want none")
			}
		})
	}
	s := newFakeServer(t)
	if r := newCLI(t, s).run("stream", "get", "missing"); r.code != 1 || !strings.Contains(r.stderr, `stream "missing" not found`) {
		t.Errorf("missing stream: exit %d, stderr %q", r.code, r.stderr)
	}
	s.st.fail = errs.Invalid("shard_id", "stream clicks has no shard shardId-000000000009")
	if r := newCLI(t, s).run("stream", "get", "clicks", "--shard", "9"); r.code != 1 || !strings.Contains(r.stderr, "skiff: stream clicks has no shard shardId-000000000009 (reason: invalid_shard_id, field: shard_id)") {
		t.Errorf("missing shard: exit %d, stderr %q", r.code, r.stderr)
	}
}

func TestMiddleHashKey(t *testing.T) {
	for _, tt := range []struct {
		start, end, want, err string
	}{
		{"0", hashMax, hash127, ""},
		{"0", hash127m1, hash126, ""},
		{"10", "11", "11", ""},
		{"10", "12", "11", ""},
		{"10", "13", "12", ""},
		{"5", "5", "", "holds a single hash key"},
		{"x", "5", "", "starting hash key"},
	} {
		got, err := middleHashKey(tt.start, tt.end)
		if got != tt.want || (err == nil) != (tt.err == "") || (err != nil && !strings.Contains(err.Error(), tt.err)) {
			t.Errorf("middleHashKey(%s, %s) = %q, %v; want %q, %q", tt.start, tt.end, got, err, tt.want, tt.err)
		}
	}
}

func TestStreamSplitMergeScale(t *testing.T) {
	list := &skiffv1.ListShardsRequest{Stream: "clicks"}
	tests := []struct {
		name   string
		args   []string
		procs  []string
		reqs   []any
		stdout string
	}{
		{
			"split in the middle", []string{"split", "clicks", "--shard", "1"}, []string{"ListShards", "SplitShard"},
			[]any{list, &skiffv1.SplitShardRequest{Stream: "clicks", ShardToSplit: shard1, NewStartingHashKey: "255211775190703847597530955573826158592"}},
			"split shard shardId-000000000001 of stream clicks at hash key 255211775190703847597530955573826158592\n",
		},
		{
			"split at", []string{"split", "clicks", "--shard", shard0, "--at", "42"}, []string{"SplitShard"},
			[]any{&skiffv1.SplitShardRequest{Stream: "clicks", ShardToSplit: shard0, NewStartingHashKey: "42"}},
			"split shard shardId-000000000000 of stream clicks at hash key 42\n",
		},
		{
			"merge", []string{"merge", "clicks", "--shard", "0", "--adjacent", shard1}, []string{"MergeShards"},
			[]any{&skiffv1.MergeShardsRequest{Stream: "clicks", ShardToMerge: shard0, AdjacentShardToMerge: shard1}},
			"merged shards shardId-000000000000 and shardId-000000000001 of stream clicks\n",
		},
		{
			"scale", []string{"scale", "clicks", "--shards", "4"}, []string{"UpdateShardCount"},
			[]any{&skiffv1.UpdateShardCountRequest{Stream: "clicks", TargetShardCount: 4}},
			"scaled stream clicks from 2 to 4 open shards\n",
		},
	}
	for _, tt := range tests {
		for _, proto := range protocols {
			t.Run(tt.name+"/"+proto, func(t *testing.T) {
				s := newFakeServer(t)
				r := newCLI(t, s).run(append([]string{"--protocol", proto, "stream"}, tt.args...)...)
				if r.code != 0 {
					t.Fatalf("exit code %d, want 0; stderr: %s", r.code, r.stderr)
				}
				wantCalls(t, s.st, tt.procs, tt.reqs)
				if r.stdout != tt.stdout {
					t.Errorf("stdout %q, want %q", r.stdout, tt.stdout)
				}
			})
		}
	}
}

func TestStreamSplitMergeScaleErrors(t *testing.T) {
	for _, tt := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"split", "clicks"}, exitUsage, "--shard is required"},
		{[]string{"split", "clicks", "--shard", "0", "--at", "half"}, exitUsage, `invalid --at: "half" is not a decimal number`},
		{[]string{"split", "--shard", "0"}, exitUsage, "accepts 1 arg"},
		{[]string{"merge", "clicks", "--shard", "0"}, exitUsage, "--adjacent is required"},
		{[]string{"merge", "clicks", "--adjacent", "0"}, exitUsage, "--shard is required"},
		{[]string{"merge", "clicks", "--shard", "1", "--adjacent", shard1}, exitUsage, "--shard and --adjacent name the same shard shardId-000000000001"},
		{[]string{"scale", "clicks"}, exitUsage, "--shards is required"},
		{[]string{"scale", "clicks", "--shards", "x"}, exitUsage, "invalid argument"},
	} {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			s := newFakeServer(t)
			r := newCLI(t, s).run(append([]string{"stream"}, tt.args...)...)
			if r.code != tt.code || !strings.Contains(r.stderr, tt.want) {
				t.Errorf("exit %d, stderr %q; want %d and %q", r.code, r.stderr, tt.code, tt.want)
			}
			if s.st.count() != 0 {
				t.Errorf("the server got a call, want none")
			}
		})
	}
	t.Run("no such shard", func(t *testing.T) {
		s := newFakeServer(t)
		r := newCLI(t, s).run("stream", "split", "clicks", "--shard", "7")
		if r.code != 1 || r.stderr != "skiff: stream clicks has no shard shardId-000000000007\n" {
			t.Errorf("exit %d, stderr %q", r.code, r.stderr)
		}
		if procs, _ := s.st.all(); !cmp.Equal(procs, []string{"ListShards"}) {
			t.Errorf("calls %v, want only ListShards", procs)
		}
	})
	t.Run("single hash key", func(t *testing.T) {
		s := newFakeServer(t)
		s.st.shards = []*skiffv1.Shard{{ShardId: shard0, StartingHashKey: "3", EndingHashKey: "3", Open: true}}
		r := newCLI(t, s).run("stream", "split", "clicks", "--shard", "0")
		if r.code != 1 || !strings.Contains(r.stderr, "holds a single hash key: it cannot be split") {
			t.Errorf("exit %d, stderr %q", r.code, r.stderr)
		}
	})
	t.Run("server", func(t *testing.T) {
		s := newFakeServer(t)
		s.st.fail = errs.Invalid("adjacent_shard_to_merge", "shards shardId-000000000000 and shardId-000000000002 are not adjacent")
		r := newCLI(t, s).run("stream", "merge", "clicks", "--shard", "0", "--adjacent", "2")
		want := "skiff: shards shardId-000000000000 and shardId-000000000002 are not adjacent (reason: invalid_adjacent_shard_to_merge, field: adjacent_shard_to_merge)\n"
		if r.code != 1 || r.stderr != want {
			t.Errorf("got exit %d, stderr %q; want 1, %q", r.code, r.stderr, want)
		}
	})
}

func TestStreamHelp(t *testing.T) {
	c := newCLI(t, nil)
	for _, args := range [][]string{
		{"stream"}, {"stream", "get", "--help"}, {"stream", "put", "--help"}, {"stream", "split", "--help"}, {"esm", "create", "--help"},
	} {
		r := c.run(args...)
		if r.code != 0 || !strings.Contains(r.stdout, "Usage:") {
			t.Errorf("%v: exit %d, stdout %q; want 0 and usage", args, r.code, r.stdout)
		}
	}
	if r := c.run("--help"); !strings.Contains(r.stdout, "\n  stream ") {
		t.Errorf("root help lacks stream:\n%s", r.stdout)
	}
}
