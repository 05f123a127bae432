package gossip

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/memberlist"
)

// MaxMessageSize bounds a user message's key plus payload, so that it
// piggybacks on gossip packets (memberlist's UDP buffer is 1,400 bytes).
const MaxMessageSize = 512

// msgUser tags the wire form of a Message.
const msgUser = 1

// Message is a small user message spread to every member, for example a
// poller's lease heartbeat. A newer message from the same origin with the
// same Key supersedes an older one: members deliver and forward only
// messages newer than the last they saw for that origin and key.
type Message struct {
	From    string // origin member
	Key     string // what the message is about, e.g. "lease/async.shared.3/0"
	Seq     uint64 // origin's clock in ns, strictly increasing per origin
	Payload []byte
}

// Broadcast spreads a message to every member (epidemically: receivers
// forward it once). Delivery is best-effort and usually takes a few gossip
// intervals; send heartbeats more often than their expiry allows to miss.
func (n *Node) Broadcast(key string, payload []byte) error {
	if len(key)+len(payload) > MaxMessageSize {
		return fmt.Errorf("gossip: message of %d bytes exceeds %d", len(key)+len(payload), MaxMessageSize)
	}
	if key == "" {
		return errors.New("gossip: message key is required")
	}
	n.mu.Lock()
	seq := max(uint64(time.Now().UnixNano()), n.seq+1)
	n.seq = seq
	n.mu.Unlock()
	n.queue(&Message{From: n.cfg.Name, Key: key, Seq: seq, Payload: payload})
	return nil
}

func (n *Node) queue(m *Message) {
	b := make([]byte, 0, 16+len(m.From)+len(m.Key)+len(m.Payload))
	b = append(b, msgUser)
	b = binary.AppendUvarint(b, uint64(len(m.From)))
	b = append(b, m.From...)
	b = binary.AppendUvarint(b, uint64(len(m.Key)))
	b = append(b, m.Key...)
	b = binary.AppendUvarint(b, m.Seq)
	b = append(b, m.Payload...)
	n.bcasts.QueueBroadcast(&userBroadcast{name: m.From + "\x00" + m.Key, msg: b})
}

func decodeMessage(b []byte) (*Message, error) {
	r := &metaReader{b: b}
	if r.byte() != msgUser {
		return nil, errors.New("unknown user message type")
	}
	m := &Message{}
	m.From = string(r.bytes(r.uvarint()))
	m.Key = string(r.bytes(r.uvarint()))
	m.Seq = r.uvarint()
	if r.err != nil {
		return nil, r.err
	}
	m.Payload = append([]byte(nil), r.b...)
	return m, nil
}

// receive handles a user message from memberlist: deliver and forward it
// when it is newer than what this member saw.
func (n *Node) receive(b []byte) {
	m, err := decodeMessage(b)
	if err != nil {
		n.log.Warn("dropping user message", "err", err)
		return
	}
	if m.From == n.cfg.Name {
		return
	}
	k := m.From + "\x00" + m.Key
	n.mu.Lock()
	if m.Seq <= n.seen[k] {
		n.mu.Unlock()
		return
	}
	n.seen[k] = m.Seq
	n.mu.Unlock()
	n.queue(m)
	if !n.cfg.DiscardEvents {
		n.events.push(Event{Type: EventMessage, Message: m})
	}
}

// userBroadcast is a queued message; a newer one with the same name
// replaces it in the queue.
type userBroadcast struct {
	name string
	msg  []byte
}

var _ memberlist.NamedBroadcast = (*userBroadcast)(nil)

func (b *userBroadcast) Invalidates(o memberlist.Broadcast) bool {
	ob, ok := o.(*userBroadcast)
	return ok && ob.name == b.name
}
func (b *userBroadcast) Message() []byte { return b.msg }
func (b *userBroadcast) Finished()       {}
func (b *userBroadcast) Name() string    { return b.name }
