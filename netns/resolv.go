package netns

import (
	"bufio"
	"fmt"
	"net/netip"
	"os"
	"strings"
)

// FallbackResolver is the DNS resolver sandboxes use when the host has
// none they can reach.
var FallbackResolver = netip.MustParseAddr("1.1.1.1")

// HostResolver returns the first IPv4 nameserver of a resolv.conf (e.g.
// /etc/resolv.conf) that a sandbox can reach: not a loopback address (a
// local stub such as systemd-resolved's 127.0.0.53 lives in the host's
// namespace) nor unspecified. Without one it returns FallbackResolver.
func HostResolver(path string) netip.Addr {
	f, err := os.Open(path)
	if err != nil {
		return FallbackResolver
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || fields[0] != "nameserver" {
			continue
		}
		a, err := netip.ParseAddr(fields[1])
		if err != nil || !a.Is4() || a.IsLoopback() || a.IsUnspecified() {
			continue
		}
		return a
	}
	return FallbackResolver
}

// ResolvConf is the /etc/resolv.conf of a sandbox using resolver.
func ResolvConf(resolver netip.Addr) string {
	return fmt.Sprintf("nameserver %s\noptions timeout:2 attempts:2\n", resolver)
}
