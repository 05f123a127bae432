package streams

import (
	"bytes"
	"encoding/json"
	"hash/fnv"
	"testing"
	"time"
)

// referenceEvent is encodeEvent's output as encoding/json writes it from
// kinesisEvent (what encodeEvent must equal byte for byte).
func referenceEvent(ec eventContext, recs []Record, w *Window, final, early bool) ([]byte, error) {
	ev := kinesisEvent{Records: make([]kinesisRecord, len(recs))}
	for i, r := range recs {
		data := r.Data
		if data == nil {
			data = []byte{}
		}
		ev.Records[i] = kinesisRecord{
			Kinesis: kinesisData{
				KinesisSchemaVersion:        "1.0",
				PartitionKey:                r.PartitionKey,
				SequenceNumber:              r.SequenceNumber,
				Data:                        data,
				ApproximateArrivalTimestamp: epochSeconds(r.Arrival),
			},
			EventSource:       "aws:kinesis",
			EventVersion:      "1.0",
			EventID:           ec.shardID + ":" + r.SequenceNumber,
			EventName:         "aws:kinesis:record",
			InvokeIdentityArn: ec.identity,
			AWSRegion:         ec.region,
			EventSourceARN:    ec.streamARN,
		}
	}
	if w != nil {
		ev.Window = &windowBounds{Start: w.Start.UTC().Format(time.RFC3339), End: w.End.UTC().Format(time.RFC3339)}
		ev.State = w.State
		if len(ev.State) == 0 {
			ev.State = json.RawMessage(`{}`)
		}
		ev.ShardID = ec.shardID
		ev.EventSourceARN = ec.streamARN
		ev.IsFinalInvokeForWindow = &final
		ev.IsWindowTerminatedEarly = &early
	}
	return json.Marshal(&ev)
}

func TestEncodeEventMatchesEncodingJSON(t *testing.T) {
	at := time.Date(2026, 1, 2, 3, 4, 5, 678_900_000, time.UTC)
	ec := eventContext{shardID: "shardId-000000000003", streamARN: "arn:aws:kinesis:local:000000000000:stream/s", region: "local", identity: "arn:aws:iam::000000000000:role/skiff-event-source"}
	odd := eventContext{shardID: "shard<&>", streamARN: "arn:\"quoted\"\\stream", region: "r\u2028", identity: "id\x01"}
	recs := []Record{
		{Seq: 1, SequenceNumber: "1", PartitionKey: "k-1", Data: []byte("hello"), Arrival: at},
		{Seq: 7, SequenceNumber: "7", PartitionKey: "key with <html> & \"quotes\"", Data: nil, Arrival: at.Add(time.Millisecond)},
		{Seq: 9, SequenceNumber: "9", PartitionKey: "ünïcödé\x00\u2029", Data: []byte{0, 1, 2, 0xff}, Arrival: time.Unix(0, 0)},
		{Seq: 12, SequenceNumber: "12", PartitionKey: "bad utf-8 \xff\xfe", Data: bytes.Repeat([]byte("x"), 1000), Arrival: time.Unix(1, 500_000_000)},
		{Seq: 13, SequenceNumber: "13", PartitionKey: "tiny", Data: []byte("y"), Arrival: time.UnixMilli(1)},
	}
	win := &Window{Start: at.Truncate(time.Minute), End: at.Truncate(time.Minute).Add(time.Minute)}
	state := &Window{Start: win.Start, End: win.End, State: json.RawMessage(`{"sum": 3, "keys": ["a"]}`)}
	cases := []struct {
		name         string
		ec           eventContext
		recs         []Record
		w            *Window
		final, early bool
	}{
		{"no records", ec, nil, nil, false, false},
		{"records", ec, recs, nil, false, false},
		{"escaped context", odd, recs, nil, false, false},
		{"window", ec, recs[:2], win, false, false},
		{"window state", ec, recs, state, false, false},
		{"final window", ec, nil, state, true, true},
	}
	for _, c := range cases {
		got, err := encodeEvent(c.ec, c.recs, c.w, c.final, c.early)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		want, err := referenceEvent(c.ec, c.recs, c.w, c.final, c.early)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s:\ngot  %s\nwant %s", c.name, got, want)
		}
	}
}

func TestLaneOfIsFNV32a(t *testing.T) {
	for _, k := range []string{"", "a", "k-001", "ünïcödé", string(bytes.Repeat([]byte("z"), 256))} {
		h := fnv.New32a()
		_, _ = h.Write([]byte(k))
		for _, p := range []int{2, 5, 10} {
			if got, want := laneOf(k, p), int(h.Sum32()%uint32(p)); got != want {
				t.Errorf("laneOf(%q, %d) = %d, want %d", k, p, got, want)
			}
		}
	}
}

func BenchmarkEncodeEvent(b *testing.B) {
	ec := eventContext{shardID: "shardId-000000000000", streamARN: "arn:aws:kinesis:local:000000000000:stream/s", region: "local", identity: "arn:aws:iam::000000000000:role/skiff-event-source"}
	recs := make([]Record, 100)
	for i := range recs {
		recs[i] = Record{Seq: uint64(1000 + i), SequenceNumber: "10000000" + string(rune('0'+i%10)), PartitionKey: "k-0123", Data: bytes.Repeat([]byte("x"), 100), Arrival: time.Now()}
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := encodeEvent(ec, recs, nil, false, false); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkEncodeEventReference(b *testing.B) {
	ec := eventContext{shardID: "shardId-000000000000", streamARN: "arn:aws:kinesis:local:000000000000:stream/s", region: "local", identity: "arn:aws:iam::000000000000:role/skiff-event-source"}
	recs := make([]Record, 100)
	for i := range recs {
		recs[i] = Record{Seq: uint64(1000 + i), SequenceNumber: "10000000" + string(rune('0'+i%10)), PartitionKey: "k-0123", Data: bytes.Repeat([]byte("x"), 100), Arrival: time.Now()}
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := referenceEvent(ec, recs, nil, false, false); err != nil {
			b.Fatal(err)
		}
	}
}
