//go:build !linux || !(386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64)

package ebpf

import (
	"log/slog"

	"skiff.dev/skiff/internal/errs"
)

// Manager is unavailable here: the programs are built for little-endian Linux.
type Manager struct{}

// Attachment is unavailable here.
type Attachment struct{}

func unsupported() error {
	return errs.Unavailable("ebpf: egress policy needs Linux on a little-endian cpu")
}

// New always fails on this platform.
func New(*slog.Logger) (*Manager, error) { return nil, unsupported() }

// SetGlobal always fails on this platform.
func (*Manager) SetGlobal(Global) error { return unsupported() }

// Attach always fails on this platform.
func (*Manager) Attach(int, Policy) (*Attachment, error) { return nil, unsupported() }

// Close does nothing.
func (*Manager) Close() error { return nil }

// Counters always fails on this platform.
func (*Attachment) Counters() (Counters, error) { return Counters{}, unsupported() }

// Close does nothing.
func (*Attachment) Close() error { return nil }

// Update always fails on this platform.
func (*Attachment) Update(Policy) error { return unsupported() }
