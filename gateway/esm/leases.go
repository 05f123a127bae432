package esm

import (
	"context"

	"skiff.dev/skiff/gateway/lease"
)

// leaser is the part of the leasing service the pollers use. leaseService
// adapts *lease.Service to it; tests may use a fake.
type leaser interface {
	// SetDesired makes resource want n slots.
	SetDesired(ctx context.Context, resource string, slots int) error
	// RemoveResource drops a resource and its slots.
	RemoveResource(ctx context.Context, resource string) error
	// Resources returns the desired slots of every resource.
	Resources(ctx context.Context) (map[string]int, error)
	// Keep holds up to max slots of matching resources for holder until ctx
	// ends, calling gained when a slot is acquired and lost when it is lost
	// or released.
	Keep(ctx context.Context, holder string, max int, match func(resource string) bool, gained, lost func(heldSlot)) error
}

// heldSlot is one lease slot held by this gateway.
type heldSlot struct {
	// Key identifies the slot (resource and slot number).
	Key      string
	Resource string
	Slot     int
	// Epoch is the fencing token of this holding.
	Epoch uint64
	// Check returns nil while this holding (holder and epoch) still holds
	// the slot unexpired, and the leasing service's "lease_lost" error
	// otherwise.
	Check func(ctx context.Context) error
}

// leaseService adapts *lease.Service to leaser.
type leaseService struct{ s *lease.Service }

var _ leaser = leaseService{}

func (a leaseService) SetDesired(ctx context.Context, resource string, slots int) error {
	return a.s.SetDesired(ctx, resource, slots)
}

func (a leaseService) RemoveResource(ctx context.Context, resource string) error {
	return a.s.RemoveResource(ctx, resource)
}

func (a leaseService) Resources(ctx context.Context) (map[string]int, error) {
	return a.s.Resources(ctx)
}

func (a leaseService) Keep(ctx context.Context, holder string, max int, match func(string) bool, gained, lost func(heldSlot)) error {
	k := a.s.NewKeeper(holder, max, match, func(l lease.Lease) { gained(a.slot(l)) }, func(l lease.Lease) { lost(a.slot(l)) })
	return k.Run(ctx)
}

func (a leaseService) slot(l lease.Lease) heldSlot {
	return heldSlot{
		Key:      l.Key(),
		Resource: l.Resource,
		Slot:     l.Slot,
		Epoch:    l.Epoch,
		Check:    func(ctx context.Context) error { return a.s.Check(ctx, l) },
	}
}
