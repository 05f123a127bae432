package sandbox

import (
	"sort"
	"strconv"
	"time"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
)

// RuntimeAPIAddr is where a sandbox finds the Runtime API, inside its own
// network namespace.
const RuntimeAPIAddr = "127.0.0.1:9001"

// Environment returns the process environment Lambda gives a function: the
// function's own variables, then Lambda's (which the front end forbids the
// function to set, so the order only matters for defence in depth).
func Environment(spec *skiffv1.SandboxSpec, sandboxID, region string, now time.Time) []string {
	keys := make([]string, 0, len(spec.GetEnvironment()))
	for k := range spec.GetEnvironment() {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	env := make([]string, 0, len(keys)+20)
	for _, k := range keys {
		env = append(env, k+"="+spec.GetEnvironment()[k])
	}
	version := spec.GetVersion()
	if version == "" {
		version = "$LATEST"
	}
	handler := spec.GetHandler()
	if handler == "" {
		handler = "bootstrap"
	}
	return append(env,
		"AWS_LAMBDA_RUNTIME_API="+RuntimeAPIAddr,
		"AWS_LAMBDA_FUNCTION_NAME="+spec.GetFunctionName(),
		"AWS_LAMBDA_FUNCTION_VERSION="+version,
		"AWS_LAMBDA_FUNCTION_MEMORY_SIZE="+strconv.Itoa(int(spec.GetMemoryMb())),
		"AWS_LAMBDA_LOG_GROUP_NAME=/aws/lambda/"+spec.GetFunctionName(),
		"AWS_LAMBDA_LOG_STREAM_NAME="+now.UTC().Format("2006/01/02")+"/["+version+"]"+sandboxID,
		"AWS_LAMBDA_INITIALIZATION_TYPE=on-demand",
		"AWS_REGION="+region,
		"AWS_DEFAULT_REGION="+region,
		"LAMBDA_TASK_ROOT=/var/task",
		"LAMBDA_RUNTIME_DIR=/var/runtime",
		"_HANDLER="+handler,
		"TZ=:UTC",
		"LANG=en_US.UTF-8",
		"PATH=/usr/local/bin:/usr/bin/:/bin:/opt/bin",
		"LD_LIBRARY_PATH=/lib64:/usr/lib64:/var/runtime:/var/runtime/lib:/var/task:/var/task/lib:/opt/lib",
	)
}
