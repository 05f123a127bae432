// Package ebpf will hold the TCX egress-policy and byte-accounting programs
// attached to sandbox veths (the sandbox networking issue). Sandboxes built
// by the single-host issue have loopback-only network namespaces and need no
// programs yet.
package ebpf
