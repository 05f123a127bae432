// Package skiffv1 holds the Go types generated from skiff's public and
// agent APIs (api/skiff/v1/*.proto, protobuf package skiff.v1). Generated
// by `make generate`; only this file is written by hand.
package skiffv1
