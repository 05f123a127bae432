// Package gossip will carry cluster membership, agent capacity and lease
// heartbeats over memberlist/serf (the cluster issue). Single-host skiff
// (`skiff dev`) does not use it yet; the package exists so the layout in
// docs/architecture.md is real and the dependency rules are enforced.
package gossip
