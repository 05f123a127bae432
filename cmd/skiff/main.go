// Command skiff is the one skiff binary: the command line client of a skiff
// gateway (functions, invoke, logs, API keys, concurrency, queues, event
// source mappings) and `skiff dev`, which runs a gateway and an agent in one
// process on this machine.
//
// main is thin: everything happens in run, which tests drive in-process.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"skiff.dev/skiff/vmm/jail"
)

func main() {
	// Re-executed as a sandbox's init: set the jail up and exec the
	// function, before anything else runs.
	if jail.IsInit() {
		jail.InitMain()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	code := report(ctx, os.Stderr, err)
	stop()
	os.Exit(code)
}
