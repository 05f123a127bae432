// Package e2e holds skiff's end-to-end tests: they build the real skiff
// binary, start `skiff dev` as a separate process on a private data dir and
// port, and drive it through the public API with real aws-lambda-go
// functions. They need root (namespaces, cgroups) and run in CI.
package e2e
