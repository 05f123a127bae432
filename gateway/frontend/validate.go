package frontend

import (
	"strings"
	"unicode/utf8"

	"google.golang.org/protobuf/proto"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/netrule"
)

// Limits of a function's configuration, as Lambda's.
const (
	minMemoryMB      = 128
	maxMemoryMB      = 10240
	minTimeout       = 1
	maxTimeout       = 900
	minEphemeralMB   = 512
	maxEphemeralMB   = 10240
	maxHandlerLen    = 128
	maxDescription   = 256
	maxEnvBytes      = 4096
	maxNameLen       = 64
	defaultMemoryMB  = 128
	defaultTimeout   = 3
	defaultEphemeral = 512
	defaultRuntime   = "provided"
	defaultHandler   = "bootstrap"
	latest           = "$LATEST"
)

// reservedEnv are the environment variables Lambda sets itself; functions
// may not set them (nor anything starting with AWS_LAMBDA_).
var reservedEnv = map[string]bool{
	"_HANDLER": true, "_X_AMZN_TRACE_ID": true, "AWS_DEFAULT_REGION": true, "AWS_REGION": true,
	"AWS_EXECUTION_ENV": true, "AWS_LAMBDA_FUNCTION_NAME": true, "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": true,
	"AWS_LAMBDA_FUNCTION_VERSION": true, "AWS_LAMBDA_INITIALIZATION_TYPE": true, "AWS_LAMBDA_LOG_GROUP_NAME": true,
	"AWS_LAMBDA_LOG_STREAM_NAME": true, "AWS_ACCESS_KEY": true, "AWS_ACCESS_KEY_ID": true,
	"AWS_SECRET_ACCESS_KEY": true, "AWS_SESSION_TOKEN": true, "AWS_LAMBDA_RUNTIME_API": true,
	"LAMBDA_TASK_ROOT": true, "LAMBDA_RUNTIME_DIR": true,
}

// runtimes are the accepted runtimes; all run a custom runtime's bootstrap.
var runtimes = map[string]bool{"provided": true, "provided.al2": true, "provided.al2023": true}

// configFields are the names update_mask accepts.
var configFields = map[string]bool{
	"runtime": true, "handler": true, "memory_mb": true, "timeout_seconds": true,
	"ephemeral_storage_mb": true, "environment": true, "description": true,
	"network": true, "network_allow": true, "network_deny": true,
}

// validateName checks a function name against Lambda's rule: 1-64 letters,
// digits, hyphens and underscores.
func validateName(field, name string) error {
	if name == "" {
		return errs.Invalid(field, "%s is required", field)
	}
	if len(name) > maxNameLen {
		return errs.Invalid(field, "function name is %d characters, over the limit of %d", len(name), maxNameLen)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return errs.Invalid(field, "function name %q may only contain letters, digits, hyphens and underscores", name)
		}
	}
	return nil
}

// normalizeConfig returns a copy of c (nil is the empty config) with the
// defaults filled in, or an error naming the first invalid field.
func normalizeConfig(c *skiffv1.FunctionConfig) (*skiffv1.FunctionConfig, error) {
	out := &skiffv1.FunctionConfig{}
	if c != nil {
		out = proto.Clone(c).(*skiffv1.FunctionConfig)
	}
	if out.Runtime == "" {
		out.Runtime = defaultRuntime
	}
	if !runtimes[out.Runtime] {
		return nil, errs.Invalid("runtime", "runtime %q is not supported: use provided, provided.al2 or provided.al2023", out.Runtime)
	}
	if out.Handler == "" {
		out.Handler = defaultHandler
	}
	if n := utf8.RuneCountInString(out.Handler); n > maxHandlerLen {
		return nil, errs.Invalid("handler", "handler is %d characters, over the limit of %d", n, maxHandlerLen)
	}
	if strings.ContainsFunc(out.Handler, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
		return nil, errs.Invalid("handler", "handler may not contain spaces or control characters")
	}
	if out.MemoryMb == 0 {
		out.MemoryMb = defaultMemoryMB
	}
	if out.MemoryMb < minMemoryMB || out.MemoryMb > maxMemoryMB {
		return nil, errs.Invalid("memory_mb", "memory_mb %d is outside %d-%d", out.MemoryMb, minMemoryMB, maxMemoryMB)
	}
	if out.TimeoutSeconds == 0 {
		out.TimeoutSeconds = defaultTimeout
	}
	if out.TimeoutSeconds < minTimeout || out.TimeoutSeconds > maxTimeout {
		return nil, errs.Invalid("timeout_seconds", "timeout_seconds %d is outside %d-%d", out.TimeoutSeconds, minTimeout, maxTimeout)
	}
	if out.EphemeralStorageMb == 0 {
		out.EphemeralStorageMb = defaultEphemeral
	}
	if out.EphemeralStorageMb < minEphemeralMB || out.EphemeralStorageMb > maxEphemeralMB {
		return nil, errs.Invalid("ephemeral_storage_mb", "ephemeral_storage_mb %d is outside %d-%d", out.EphemeralStorageMb, minEphemeralMB, maxEphemeralMB)
	}
	if err := validateEnv(out.Environment); err != nil {
		return nil, err
	}
	if err := validateNetwork(out); err != nil {
		return nil, err
	}
	if n := utf8.RuneCountInString(out.Description); n > maxDescription {
		return nil, errs.Invalid("description", "description is %d characters, over the limit of %d", n, maxDescription)
	}
	if !utf8.ValidString(out.Description) {
		return nil, errs.Invalid("description", "description is not valid UTF-8")
	}
	return out, nil
}

// validateEnv checks environment variable names, Lambda's reserved names
// and the 4 KB total size.
func validateEnv(env map[string]string) error {
	size := 0
	for k, v := range env {
		if !validEnvKey(k) {
			return errs.Invalid("environment", "environment variable name %q must start with a letter and contain only letters, digits and underscores", k)
		}
		if reservedEnv[k] || strings.HasPrefix(k, "AWS_LAMBDA_") {
			return errs.Invalid("environment", "environment variable %s is reserved by Lambda", k)
		}
		size += len(k) + len(v)
	}
	if size > maxEnvBytes {
		return errs.Invalid("environment", "environment variables total %d bytes, over the limit of %d", size, maxEnvBytes)
	}
	return nil
}

func validEnvKey(k string) bool {
	if k == "" {
		return false
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		letter := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
		if i == 0 && !letter {
			return false
		}
		if !letter && !(c >= '0' && c <= '9') && c != '_' {
			return false
		}
	}
	return true
}

// mergeConfig applies an update to the stored configuration: the fields
// named in mask, or every non-zero field of upd when mask is empty. The
// result is normalized and validated.
func mergeConfig(stored, upd *skiffv1.FunctionConfig, mask []string) (*skiffv1.FunctionConfig, error) {
	for _, m := range mask {
		if !configFields[m] {
			return nil, errs.Invalid("update_mask", "unknown field %q in update_mask", m)
		}
	}
	if upd == nil {
		upd = &skiffv1.FunctionConfig{}
	}
	set := map[string]bool{}
	if len(mask) == 0 {
		set["runtime"] = upd.Runtime != ""
		set["handler"] = upd.Handler != ""
		set["memory_mb"] = upd.MemoryMb != 0
		set["timeout_seconds"] = upd.TimeoutSeconds != 0
		set["ephemeral_storage_mb"] = upd.EphemeralStorageMb != 0
		set["environment"] = len(upd.Environment) > 0
		set["description"] = upd.Description != ""
		set["network"] = upd.Network != ""
		set["network_allow"] = len(upd.NetworkAllow) > 0
		set["network_deny"] = len(upd.NetworkDeny) > 0
	} else {
		for _, m := range mask {
			set[m] = true
		}
	}
	out := proto.Clone(stored).(*skiffv1.FunctionConfig)
	if set["runtime"] {
		out.Runtime = upd.Runtime
	}
	if set["handler"] {
		out.Handler = upd.Handler
	}
	if set["memory_mb"] {
		out.MemoryMb = upd.MemoryMb
	}
	if set["timeout_seconds"] {
		out.TimeoutSeconds = upd.TimeoutSeconds
	}
	if set["ephemeral_storage_mb"] {
		out.EphemeralStorageMb = upd.EphemeralStorageMb
	}
	if set["environment"] {
		out.Environment = upd.Environment
	}
	if set["description"] {
		out.Description = upd.Description
	}
	if set["network"] {
		out.Network = upd.Network
	}
	if set["network_allow"] {
		out.NetworkAllow = upd.NetworkAllow
	}
	if set["network_deny"] {
		out.NetworkDeny = upd.NetworkDeny
	}
	changed := false
	for _, v := range set {
		changed = changed || v
	}
	if !changed {
		return nil, errs.Invalid("config", "the update sets no field: set fields of config or name them in update_mask")
	}
	return normalizeConfig(out)
}

// Network settings.
const (
	NetworkEgress = "egress"
	NetworkNone   = "none"
)

// validateNetwork defaults network to egress (Lambda functions reach the
// internet) and checks the allow and deny lists with the same parser the
// agent's eBPF policy is built from.
func validateNetwork(c *skiffv1.FunctionConfig) error {
	switch c.Network {
	case "":
		c.Network = NetworkEgress
	case NetworkEgress, NetworkNone:
	default:
		return errs.Invalid("network", "network %q is not egress or none", c.Network)
	}
	if c.Network == NetworkNone && (len(c.NetworkAllow) > 0 || len(c.NetworkDeny) > 0) {
		field := "network_allow"
		if len(c.NetworkAllow) == 0 {
			field = "network_deny"
		}
		return errs.Invalid(field, "%s needs network egress: a function with network none reaches nothing", field)
	}
	if _, err := netrule.ParseList(c.NetworkAllow); err != nil {
		return errs.Invalid("network_allow", "network_allow: %v", err)
	}
	if _, err := netrule.ParseList(c.NetworkDeny); err != nil {
		return errs.Invalid("network_deny", "network_deny: %v", err)
	}
	return nil
}
