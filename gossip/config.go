package gossip

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/hashicorp/memberlist"
)

// DefaultPort is memberlist's customary port (UDP and TCP).
const DefaultPort = 7946

// Timers tune failure detection and dissemination. Zero fields take the
// LAN defaults of LANTimers.
type Timers struct {
	ProbeInterval    time.Duration // how often each member probes a random peer
	ProbeTimeout     time.Duration // how long a direct probe waits for its ack
	SuspicionMult    int           // suspicion timeout = mult × max(1, log10 n) × ProbeInterval
	GossipInterval   time.Duration // how often queued messages are gossiped
	GossipNodes      int           // peers per gossip round
	RetransmitMult   int           // each message is sent mult × ceil(log10(n+1)) times
	PushPullInterval time.Duration // full state exchange with a random peer (anti-entropy)
	// UpdateInterval is the least time between two capacity broadcasts of
	// this member: SetCapacity calls in between are coalesced.
	UpdateInterval time.Duration
	// RefreshInterval re-announces this member's metadata even when it
	// did not change, bounding how long a lost update stays stale.
	RefreshInterval time.Duration
}

// LANTimers are the defaults: a stopped member of a small LAN cluster is
// declared dead in under a second.
func LANTimers() Timers {
	return Timers{
		ProbeInterval:    200 * time.Millisecond,
		ProbeTimeout:     100 * time.Millisecond,
		SuspicionMult:    2,
		GossipInterval:   50 * time.Millisecond,
		GossipNodes:      3,
		RetransmitMult:   4,
		PushPullInterval: 15 * time.Second,
		UpdateInterval:   100 * time.Millisecond,
		RefreshInterval:  5 * time.Second,
	}
}

func (t Timers) withDefaults() Timers {
	d := LANTimers()
	if t.ProbeInterval == 0 {
		t.ProbeInterval = d.ProbeInterval
	}
	if t.ProbeTimeout == 0 {
		t.ProbeTimeout = d.ProbeTimeout
	}
	if t.SuspicionMult == 0 {
		t.SuspicionMult = d.SuspicionMult
	}
	if t.GossipInterval == 0 {
		t.GossipInterval = d.GossipInterval
	}
	if t.GossipNodes == 0 {
		t.GossipNodes = d.GossipNodes
	}
	if t.RetransmitMult == 0 {
		t.RetransmitMult = d.RetransmitMult
	}
	if t.PushPullInterval == 0 {
		t.PushPullInterval = d.PushPullInterval
	}
	if t.UpdateInterval == 0 {
		t.UpdateInterval = d.UpdateInterval
	}
	if t.RefreshInterval == 0 {
		t.RefreshInterval = d.RefreshInterval
	}
	return t
}

// Default summary bounds (see Config).
const (
	DefaultWarmTopN        = 8
	DefaultCodeFilterBytes = 64
)

// Config configures a Node.
type Config struct {
	Name     string // unique member name (required)
	BindAddr string // default 0.0.0.0; ignored with Transport
	BindPort int    // 0 picks a free port (DefaultPort is customary); ignored with Transport
	// Transport carries memberlist's packets and streams; nil means UDP and
	// TCP on BindAddr:BindPort. Tests use a MemNetwork transport.
	Transport memberlist.Transport
	Tags      Tags
	// Key is the cluster's gossip encryption key (AES-128/192/256: 16, 24
	// or 32 bytes). Members with different keys cannot join each other.
	// Nil means plaintext.
	Key    []byte
	Timers Timers
	Logger *slog.Logger
	// WarmTopN bounds the function versions whose warm idle counts travel
	// in the summary (default DefaultWarmTopN).
	WarmTopN int
	// CodeFilterBytes is the size of the Bloom filter of cached code
	// digests (default DefaultCodeFilterBytes; 64 bytes hold ~50 digests
	// at ~1 % false positives).
	CodeFilterBytes int
	// DiscardEvents drops events instead of queueing them for Events: for
	// members that never read them (the queue is otherwise unbounded).
	DiscardEvents bool
	// SkipCapacity keeps peers' tags and state but not their capacity
	// summaries (Member.Capacity stays nil): for agents, which never
	// place work on others.
	SkipCapacity bool
	// Compress turns on memberlist's LZW compression of packets. Off by
	// default: the metadata is already compact binary, and LZW allocates
	// tens of KB per packet (in a 1,000-member simulation it dominated
	// CPU through garbage collection).
	Compress bool
}

// Validate checks the configuration once, before New uses it.
func (c *Config) Validate() error {
	var errs []error
	if c.Name == "" {
		errs = append(errs, errors.New("gossip: name is required"))
	}
	switch len(c.Key) {
	case 0, 16, 24, 32:
	default:
		errs = append(errs, fmt.Errorf("gossip: key is %d bytes, want 16, 24 or 32", len(c.Key)))
	}
	if c.BindPort < 0 || c.BindPort > 65535 {
		errs = append(errs, fmt.Errorf("gossip: bind port %d out of range", c.BindPort))
	}
	if c.WarmTopN < 0 || c.CodeFilterBytes < 0 {
		errs = append(errs, errors.New("gossip: negative summary bound"))
	}
	t := c.Timers
	if t.ProbeInterval < 0 || t.ProbeTimeout < 0 || t.GossipInterval < 0 || t.PushPullInterval < 0 || t.UpdateInterval < 0 || t.RefreshInterval < 0 || t.SuspicionMult < 0 || t.GossipNodes < 0 || t.RetransmitMult < 0 {
		errs = append(errs, errors.New("gossip: negative timer"))
	}
	if tt := t.withDefaults(); tt.ProbeTimeout >= tt.ProbeInterval {
		errs = append(errs, fmt.Errorf("gossip: probe timeout %v must be shorter than the probe interval %v", tt.ProbeTimeout, tt.ProbeInterval))
	}
	return errors.Join(errs...)
}
