// Package skiff is self-hosted serverless functions for bare-metal fleets:
// AWS Lambda's architecture as one Go binary. See docs/architecture.md for
// the map of the code; this root package only holds repository-wide tests.
package skiff
