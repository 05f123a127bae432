package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/testutil"
)

// TestCrashRecovery kills `skiff dev` with SIGKILL while a sandbox runs: the
// sandbox dies with it, the next start reclaims the cgroups the crashed run
// left, and every function is still there.
func TestCrashRecovery(t *testing.T) {
	dataDir := t.TempDir()
	d := startDev(t, dataDir)
	c := d.client("connect", "")
	createFunction(t, c, "survivor", &skiffv1.FunctionConfig{TimeoutSeconds: 60})
	createFunction(t, c, "other", nil)
	mustInvoke(t, c, "other", `{}`)
	go func() { _, _ = invoke(context.Background(), c, "survivor", `{"action":"sleep","sleep":"50s"}`) }()
	waitFor(t, 20*time.Second, "the long invoke to run", func() bool {
		return d.metric(t, `skiff_function_concurrent_executions{function="survivor"}`) >= 1
	})
	kids := testutil.ChildPIDs(d.cmd.Process.Pid)
	if len(kids) == 0 {
		t.Fatal("no sandbox processes found under skiff dev")
	}
	var cgroups []string
	for _, pid := range kids {
		if cg := memoryCgroup(pid); strings.Contains(cg, "/skiff/") {
			cgroups = append(cgroups, cg)
		}
	}
	d.kill()

	waitFor(t, 10*time.Second, "sandbox processes to die with the agent", func() bool {
		for _, pid := range kids {
			if alive(pid) {
				return false
			}
		}
		return true
	})

	d2 := startDev(t, dataDir)
	for _, cg := range cgroups {
		if _, err := os.Stat(cg); !os.IsNotExist(err) {
			t.Errorf("cgroup %s of the crashed run is still there after restart (err %v)", cg, err)
		}
	}
	c2 := d2.client("connect", "")
	list, err := c2.fn.ListFunctions(context.Background(), connect.NewRequest(&skiffv1.ListFunctionsRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, f := range list.Msg.Functions {
		names = append(names, f.Name)
	}
	if strings.Join(names, ",") != "other,survivor" {
		t.Fatalf("functions after the crash: %v, want other and survivor", names)
	}
	if r := mustInvoke(t, c2, "survivor", `{"back":true}`); string(r.Payload) != `{"back":true}` {
		t.Fatalf("invoke after restart: %s", r.Payload)
	}
}

func alive(pid int) bool {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return false
	}
	s := string(b)
	state := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])[0]
	return state != "Z" && state != "X"
}

// memoryCgroup returns the directory of pid's memory cgroup (v1) or its
// unified cgroup (v2).
func memoryCgroup(pid int) string {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cgroup"))
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[1] == "memory" {
			return filepath.Join("/sys/fs/cgroup/memory", parts[2])
		}
		if parts[0] == "0" && parts[1] == "" {
			if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
				return filepath.Join("/sys/fs/cgroup", parts[2])
			}
		}
	}
	return ""
}
