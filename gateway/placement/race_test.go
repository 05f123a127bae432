//go:build race

package placement

// raceEnabled scales the gossip simulation down under the race detector,
// which slows every memberlist several times.
const raceEnabled = true
