package placement

import (
	"sync"
	"testing"
)

func TestLedgerNeverOvercommits(t *testing.T) {
	l := NewLedger(1024)
	var wg sync.WaitGroup
	var mu sync.Mutex
	granted := 0
	for i := 0; i < 64; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if l.Reserve(128) {
				mu.Lock()
				granted++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if granted != 8 {
		t.Fatalf("granted %d reservations of 128 MB from 1024 MB, want 8", granted)
	}
	if c, tot := l.Usage(); c != 1024 || tot != 1024 {
		t.Fatalf("usage = %d/%d, want 1024/1024", c, tot)
	}
	l.Release(128)
	if !l.Reserve(128) {
		t.Fatal("reserve after release failed")
	}
	if l.Reserve(1) {
		t.Fatal("reserve beyond total succeeded")
	}
}

func TestLedgerReleaseTooMuchPanics(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("want panic on over-release")
		}
	}()
	l := NewLedger(10)
	l.Release(1)
}
