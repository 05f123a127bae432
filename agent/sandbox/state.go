package sandbox

import "fmt"

// State is a sandbox's place in its lifecycle.
type State int

// The lifecycle: Starting → Initializing → Busy (the first invocation of a
// cold start) ⇄ Idle, and from any live state to Dead.
const (
	StateStarting State = iota
	StateInitializing
	StateIdle
	StateBusy
	StateDead
)

func (s State) String() string {
	switch s {
	case StateStarting:
		return "starting"
	case StateInitializing:
		return "initializing"
	case StateIdle:
		return "idle"
	case StateBusy:
		return "busy"
	case StateDead:
		return "dead"
	}
	return fmt.Sprintf("state(%d)", int(s))
}

// transitions lists the allowed moves; anything else is a bug.
var transitions = map[State][]State{
	StateStarting:     {StateInitializing, StateDead},
	StateInitializing: {StateBusy, StateDead},
	StateBusy:         {StateIdle, StateDead},
	StateIdle:         {StateBusy, StateDead},
	StateDead:         {},
}

func canMove(from, to State) bool {
	for _, s := range transitions[from] {
		if s == to {
			return true
		}
	}
	return false
}
