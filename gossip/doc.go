// Package gossip is cluster membership for skiff over hashicorp/memberlist:
// who is in the cluster (agents and gateways, with their tags), whether each
// member is alive, suspect, dead or has left, what capacity each agent has
// (memory, CPU, sandboxes, warm idle sandboxes per function version, cached
// code digests, load) and small user messages such as pollers' lease
// heartbeats.
//
// memberlist is used directly rather than through serf: skiff needs tags,
// failure detection and piggybacked messages, all of which memberlist gives
// without serf's event coalescing, Lamport clocks and snapshot files. Tags and
// the capacity summary travel together in the node's metadata (at most 512
// bytes, compact binary), so memberlist's incarnation numbers make the latest
// summary win everywhere and a joining member receives every summary in its
// first push/pull.
//
// Timers default to the LAN values of docs/DESIGN (probe 200 ms, probe
// timeout 100 ms, suspicion multiplier 2, gossip 50 ms): a stopped member of
// a small cluster is declared dead in well under a second. The suspicion
// timeout grows with log10 of the cluster size, so at 1,000 members it is
// about 1.2 s.
package gossip
