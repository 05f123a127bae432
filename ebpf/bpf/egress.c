// SPDX-License-Identifier: (MIT OR GPL-2.0-only)
//
// Egress policy and byte accounting for sandbox veths. Both programs run on
// the HOST side of a sandbox's veth pair and key everything by the host
// veth's ifindex (skb->ifindex):
//
//   sandbox_ingress  tc/TCX ingress: packets coming FROM the sandbox. Applies
//                    the sandbox's egress policy and counts what passes as
//                    "out" bytes; counts drops by reason.
//   sandbox_egress   tc/TCX egress: packets going TO the sandbox. Counts
//                    them as "in" bytes; never drops.
//
// Bytes are IP-level: skb->len minus the 14-byte Ethernet header. A GSO/GRO
// super-packet counts once with its one set of headers; packets count GSO
// segments. The Go side (package ebpf) owns the map layouts; keep the structs
// below in step with it (bpf2go generates the Go types from them).
//
// Self-contained: no kernel or libbpf headers, so the object only depends on
// the clang version.

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef __u16 __be16;
typedef __u32 __be32;

#define SEC(name) __attribute__((section(name), used))
#define __always_inline inline __attribute__((always_inline))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) typeof(val) *name

// UAPI constants (include/uapi/linux/bpf.h, if_ether.h, in.h, pkt_cls.h).
#define BPF_MAP_TYPE_HASH 1
#define BPF_MAP_TYPE_ARRAY 2
#define BPF_MAP_TYPE_PERCPU_HASH 5
#define BPF_MAP_TYPE_LPM_TRIE 11
#define BPF_F_NO_PREALLOC 1
#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IP_OFFSET_MASK 0x1fff
#define TC_ACT_UNSPEC (-1) // TCX_NEXT: let the next program (or the stack) decide
#define TC_ACT_SHOT 2      // TCX_DROP

#define bpf_htons(x) ((__be16)__builtin_bswap16(x))
#define bpf_ntohs(x) ((__u16)__builtin_bswap16(x))

// The prefix of the UAPI struct __sk_buff up to the last field used; the
// verifier rewrites context accesses by offset, so the layout must match.
struct __sk_buff {
	__u32 len;
	__u32 pkt_type;
	__u32 mark;
	__u32 queue_mapping;
	__u32 protocol;
	__u32 vlan_present;
	__u32 vlan_tci;
	__u32 vlan_proto;
	__u32 priority;
	__u32 ingress_ifindex;
	__u32 ifindex;
	__u32 tc_index;
	__u32 cb[5];
	__u32 hash;
	__u32 tc_classid;
	__u32 data;
	__u32 data_end;
	__u32 napi_id;
	__u32 family;
	__u32 remote_ip4;
	__u32 local_ip4;
	__u32 remote_ip6[4];
	__u32 local_ip6[4];
	__u32 remote_port;
	__u32 local_port;
	__u32 data_meta;
	__u64 flow_keys;
	__u64 tstamp;
	__u32 wire_len;
	__u32 gso_segs;
};

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_skb_load_bytes)(const void *skb, __u32 offset, void *to, __u32 len) = (void *)26;

struct iphdr {
	__u8 ihl_version; // ihl in the low nibble on little- and big-endian alike
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__u16 check;
	__be32 saddr;
	__be32 daddr;
};

// Drop reasons; the Go Reason constants mirror them.
enum reason {
	REASON_NONE = 0,
	REASON_SANDBOX = 1,
	REASON_HOST = 2,
	REASON_METADATA = 3,
	REASON_PRIVATE = 4,
	REASON_DENIED = 5,
	REASON_NOT_ALLOWED = 6,
	REASON_MALFORMED = 7,
	REASON_MAX = 8,
};

#define MAX_PORT_RULES 16
#define MAX_SANDBOXES 16384
#define MAX_RULE_PREFIXES 65536

// One allow or deny rule as stored under an LPM entry. Each entry holds its
// own rules and those of every shorter prefix that covers it, so the longest
// match alone decides. plen is the rule's own prefix length: the allow checks
// for other sandboxes and host addresses require a rule at least as specific
// as the range it opens.
struct port_rule {
	__u16 lo; // inclusive, host byte order
	__u16 hi;
	__u8 plen;
	__u8 any_port; // 1: all ports and every protocol (ICMP too)
	__u8 pad[2];
};

struct rule_key {
	__u32 prefixlen; // 32 (ifindex) + rule prefix length
	__u32 ifindex;
	__be32 addr;
};

// One LPM entry of one sandbox: the allow and the deny rules covering its
// prefix. Allow and deny share the entry so a packet reads the sandbox's
// rules with ONE lookup: Attachment.Update rewrites entries in place, and a
// packet must see one policy's rules, never one policy's deny list with
// another's allow list.
struct rule_val {
	__u32 allow_n;
	__u32 deny_n;
	struct port_rule allow[MAX_PORT_RULES];
	struct port_rule deny[MAX_PORT_RULES];
};

struct policy {
	__u8 egress; // 0: drop everything (network "none")
	__u8 pad[3];
};

struct global {
	__be32 subnet_addr;
	__be32 subnet_mask;
	__u32 subnet_plen;
	__u32 subnet_set;
};

struct service_key {
	__be32 addr;
	__be16 port; // network byte order
	__u8 proto;
	__u8 pad;
};

struct special_key {
	__u32 prefixlen;
	__be32 addr;
};

struct counters {
	__u64 bytes_in;
	__u64 bytes_out;
	__u64 packets_in;
	__u64 packets_out;
	__u64 drops[REASON_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SANDBOXES);
	__type(key, __u32);
	__type(value, struct policy);
} policies SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_RULE_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct rule_key);
	__type(value, struct rule_val);
} rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct global);
} globals SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __be32);
	__type(value, __u8);
} host_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct service_key);
	__type(value, __u8);
} host_services SEC(".maps");

// Private and special-purpose ranges; the value is the drop reason.
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 64);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct special_key);
	__type(value, __u8);
} special_ranges SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, MAX_SANDBOXES);
	__type(key, __u32);
	__type(value, struct counters);
} sandbox_counters SEC(".maps");

// rules_match reports whether one of the n rules matches the packet: an
// all-ports rule matches any packet to its prefix; a port rule matches TCP
// and UDP (first fragments) whose destination port is in its range. Rules
// shorter than min_plen are ignored.
static __always_inline int rules_match(struct port_rule *rs, __u32 n, int has_port, __u16 dport, __u32 min_plen)
{
	int found = 0;
#pragma unroll
	for (int i = 0; i < MAX_PORT_RULES; i++) {
		struct port_rule *r = &rs[i];
		if (i < n && r->plen >= min_plen &&
		    (r->any_port || (has_port && dport >= r->lo && dport <= r->hi)))
			found = 1;
	}
	return found;
}

// allowed reports whether an allow rule of v at least min_plen long matches.
static __always_inline int allowed(struct rule_val *v, int has_port, __u16 dport, __u32 min_plen)
{
	return v && rules_match(v->allow, v->allow_n, has_port, dport, min_plen);
}

// verdict returns REASON_NONE to pass the packet, or why to drop it.
static __always_inline int verdict(struct __sk_buff *skb, __u32 ifindex)
{
	struct policy *p = bpf_map_lookup_elem(&policies, &ifindex);
	if (!p || !p->egress)
		return REASON_NOT_ALLOWED;

	__u32 proto = skb->protocol;
	if (proto == bpf_htons(ETH_P_ARP))
		return REASON_NONE;
	if (proto != bpf_htons(ETH_P_IP))
		return REASON_NOT_ALLOWED; // IPv6 and anything else

	struct iphdr ip;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return REASON_MALFORMED;
	__u32 ihl = ip.ihl_version & 0x0f;
	if ((ip.ihl_version >> 4) != 4 || ihl < 5)
		return REASON_MALFORMED;

	__be32 daddr = ip.daddr;
	int has_port = 0;
	__u16 dport = 0;
	__be16 dport_be = 0;
	if ((ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP) &&
	    (bpf_ntohs(ip.frag_off) & IP_OFFSET_MASK) == 0) {
		__be16 ports[2];
		if (bpf_skb_load_bytes(skb, ETH_HLEN + ihl * 4, ports, sizeof(ports)) < 0)
			return REASON_MALFORMED;
		dport_be = ports[1];
		dport = bpf_ntohs(dport_be);
		has_port = 1;
	}

	// The sandbox's one rules lookup (see struct rule_val).
	struct rule_key key = {.prefixlen = 64, .ifindex = ifindex, .addr = daddr};
	struct rule_val *v = bpf_map_lookup_elem(&rules, &key);
	if (v && rules_match(v->deny, v->deny_n, has_port, dport, 0))
		return REASON_DENIED;

	if (has_port) {
		struct service_key sk = {.addr = daddr, .port = dport_be, .proto = ip.protocol};
		if (bpf_map_lookup_elem(&host_services, &sk))
			return REASON_NONE;
	}
	if (bpf_map_lookup_elem(&host_addrs, &daddr))
		return allowed(v, has_port, dport, 32) ? REASON_NONE : REASON_HOST;

	__u32 zero = 0;
	struct global *g = bpf_map_lookup_elem(&globals, &zero);
	if (g && g->subnet_set && (daddr & g->subnet_mask) == g->subnet_addr)
		return allowed(v, has_port, dport, g->subnet_plen) ? REASON_NONE : REASON_SANDBOX;

	struct special_key spk = {.prefixlen = 32, .addr = daddr};
	__u8 *special = bpf_map_lookup_elem(&special_ranges, &spk);
	if (special) {
		if (allowed(v, has_port, dport, 0))
			return REASON_NONE;
		return *special == REASON_METADATA ? REASON_METADATA : REASON_PRIVATE;
	}
	return REASON_NONE;
}

static __always_inline __u64 l3_bytes(struct __sk_buff *skb)
{
	__u32 len = skb->len;
	return len > ETH_HLEN ? len - ETH_HLEN : 0;
}

static __always_inline __u64 segments(struct __sk_buff *skb)
{
	__u32 segs = skb->gso_segs;
	return segs > 1 ? segs : 1;
}

SEC("tc")
int sandbox_ingress(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	int reason = verdict(skb, ifindex);
	struct counters *c = bpf_map_lookup_elem(&sandbox_counters, &ifindex);
	if (reason != REASON_NONE) {
		if (c && reason > 0 && reason < REASON_MAX)
			c->drops[reason]++;
		return TC_ACT_SHOT;
	}
	if (c) {
		c->bytes_out += l3_bytes(skb);
		c->packets_out += segments(skb);
	}
	return TC_ACT_UNSPEC;
}

SEC("tc")
int sandbox_egress(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct counters *c = bpf_map_lookup_elem(&sandbox_counters, &ifindex);
	if (c) {
		c->bytes_in += l3_bytes(skb);
		c->packets_in += segments(skb);
	}
	return TC_ACT_UNSPEC;
}

char __license[] SEC("license") = "Dual MIT/GPL";
