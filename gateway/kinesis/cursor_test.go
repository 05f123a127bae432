package kinesis

import "testing"

func TestAckInfo(t *testing.T) {
	tests := []struct {
		reply        string
		seq, pending uint64
		ok           bool
	}{
		{"$JS.ACK.KINESIS_x.c1.1.42.7.1700000000000000000.3", 42, 3, true},
		{"$JS.ACK.dom.acc.KINESIS_x.c1.1.42.7.1700000000000000000.3.rand", 42, 3, true},
		{"$JS.ACK.dom.acc.KINESIS_x.c1.1.42.7.1700000000000000000.3.rand.more.and.more.tokens.than.sixteen", 42, 3, true},
		{"$JS.ACK.KINESIS_x.c1.1.x.7.1700000000000000000.3", 0, 0, false},
		{"$JS.ACK.KINESIS_x.c1.1.42.7.1700000000000000000", 0, 0, false},
		{"$JS.NAK.KINESIS_x.c1.1.42.7.1700000000000000000.3", 0, 0, false},
		{"", 0, 0, false},
		{"inbox.1", 0, 0, false},
	}
	for _, tt := range tests {
		seq, pending, ok := ackInfo(tt.reply)
		if ok != tt.ok || (ok && (seq != tt.seq || pending != tt.pending)) {
			t.Errorf("ackInfo(%q) = %d, %d, %v; want %d, %d, %v", tt.reply, seq, pending, ok, tt.seq, tt.pending, tt.ok)
		}
	}
}
