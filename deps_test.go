package skiff_test

import (
	"go/build"
	"os/exec"
	"strings"
	"testing"
)

// TestDependencyRules keeps the architecture true: the kernel-facing
// packages never import the agent or the gateway, and the gateway never
// imports kernel-facing code (it must build and run on any OS).
func TestDependencyRules(t *testing.T) {
	rules := []struct {
		pkgs      string // go list pattern
		forbidden []string
	}{
		{"./vmm/...", []string{"skiff.dev/skiff/agent", "skiff.dev/skiff/gateway"}},
		{"./netns/...", []string{"skiff.dev/skiff/agent", "skiff.dev/skiff/gateway"}},
		{"./ebpf/...", []string{"skiff.dev/skiff/agent", "skiff.dev/skiff/gateway"}},
		{"./gossip/...", []string{"skiff.dev/skiff/agent", "skiff.dev/skiff/gateway"}},
		{"./gateway/...", []string{"skiff.dev/skiff/vmm", "skiff.dev/skiff/netns", "skiff.dev/skiff/ebpf", "skiff.dev/skiff/agent"}},
	}
	for _, r := range rules {
		out, err := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}}", r.pkgs).CombinedOutput()
		if err != nil {
			t.Fatalf("go list %s: %v\n%s", r.pkgs, err, out)
		}
		for _, dep := range strings.Fields(string(out)) {
			for _, f := range r.forbidden {
				if dep == f || strings.HasPrefix(dep, f+"/") {
					t.Errorf("%s depends on %s, which it must not import", r.pkgs, dep)
				}
			}
		}
	}
}

// TestPackageComments requires a package comment on every package.
func TestPackageComments(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", "{{.Dir}}", "./...").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, dir := range strings.Fields(string(out)) {
		pkg, err := build.ImportDir(dir, build.ImportComment)
		if err != nil {
			t.Errorf("%s: %v", dir, err)
			continue
		}
		if strings.TrimSpace(pkg.Doc) == "" {
			t.Errorf("package %s (%s) has no package comment", pkg.Name, dir)
		}
	}
}
