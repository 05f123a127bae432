package ebpf

// The programs are compiled from bpf/egress.c with clang; the generated
// egress_bpfel.go and egress_bpfel.o are committed, so building skiff needs
// no clang. `make generate` reruns this (installing clang when missing).
//go:generate go tool -modfile=../tools/go.mod bpf2go -tags linux -target bpfel -type rule_key -type rule_val -type port_rule -type policy -type global -type service_key -type special_key -type counters egress bpf/egress.c -- -Wall -Werror
