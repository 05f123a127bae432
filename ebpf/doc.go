// Package ebpf enforces sandbox egress policy and counts sandbox traffic
// with eBPF programs attached to the host side of each sandbox's veth.
//
// One Manager per agent loads the programs and maps (bpf/egress.c, compiled
// by bpf2go; the generated egress_bpfel.go and .o are committed). SetGlobal
// stores the host-wide part of the policy; Attach stores one sandbox's
// Policy under its host veth ifindex (Update replaces it in place) and
// attaches two programs to that veth
// with TCX (legacy tc, a clsact qdisc with direct-action bpf filters, when
// the kernel has no TCX):
//
//   - ingress, packets from the sandbox: the policy, "out" counters, drops
//     by Reason;
//   - egress, packets to the sandbox: "in" counters only.
//
// Attach resolves the ifindex in the calling thread's network namespace:
// call it from the namespace holding the host side of the veth.
//
// # Policy
//
// For each packet from a sandbox, in order:
//
//  1. no policy for the interface, or Egress false: drop (ReasonNotAllowed);
//  2. ARP passes; IPv6 and every other non-IPv4 frame: drop
//     (ReasonNotAllowed) — disable IPv6 inside sandboxes so neighbour
//     discovery does not fill that counter;
//  3. a deny rule matches: drop (ReasonDenied);
//  4. TCP or UDP to a host service (Global.HostServices): pass;
//  5. a host address (Global.HostAddrs): pass only if an allow rule for
//     exactly that address (/32) matches, else drop (ReasonHost);
//  6. in Global.SandboxSubnet: pass only if an allow rule at least as
//     specific as the subnet matches, else drop (ReasonSandbox) — a broad
//     allow such as 10.0.0.0/8 never opens other sandboxes;
//  7. 169.254.0.0/16: drop (ReasonMetadata) unless an allow rule matches;
//     the private and special ranges of SpecialRanges: drop
//     (ReasonPrivate) unless an allow rule matches;
//  8. anything else passes.
//
// A rule with ports matches TCP and UDP by destination port, never ICMP nor
// non-first fragments (which carry no ports); a rule without ports matches
// every packet to its prefix. Up to 16 merged port ranges may cover one
// prefix of one sandbox, in the allow and in the deny rules each.
//
// # Policy updates
//
// Attachment.Update replaces a sandbox's policy in place by rewriting its
// map entries; the programs stay attached (re-attaching costs RCU grace
// periods, tens of milliseconds) and the counters run on. A packet sees
// the old or the new policy, never a mix:
//
//   - a sandbox's allow and deny rules share one LPM trie, each entry
//     holding every allow and deny rule covering its prefix, so a packet
//     reads its rules with one lookup;
//   - entries are rewritten in place, longest prefix first; prefixes only
//     the old rules had are first rewritten to the new rules' answer for
//     them, and deleted only after an RCU grace period (the kernel's trie
//     lookup is not atomic against deletes), which makes an Update that
//     drops prefixes cost milliseconds instead of microseconds;
//   - egress off is switched on only after the rules are rewritten, and
//     switched off first, leaving the (unused) rules as they were.
//
// Update validates the whole policy before touching a map: an invalid
// policy changes nothing.
//
// # Counters
//
// Bytes are IP-level: the Ethernet header is not counted. A GSO/GRO
// super-packet counts once with its one set of headers (so TCP bytes come
// within a fraction of a percent of the payload sent), and as its number of
// segments in the packet counters. Dropped packets count only in Drops.
// Counters live with the attachment: read them before Close.
//
// # Lifetimes
//
// Attachment.Close detaches the programs and deletes the sandbox's map
// entries. TCX links belong to the agent's file descriptors, so a killed
// agent leaves no TCX program behind; legacy tc filters stay on the veth
// until it is deleted (deleting a sandbox's veth removes them).
package ebpf
