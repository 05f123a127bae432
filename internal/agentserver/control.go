package agentserver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/internal/errs"
)

// ControlSocket is the name of the agent's local control socket in its
// data dir: a unix socket (mode 0600, in a 0700 directory, so only the
// agent's user reaches it) serving AgentService's Status and Drain, for
// `skiff agent drain` on the host.
const ControlSocket = "agent.sock"

// maxSocketPath is the room in sockaddr_un.sun_path.
const maxSocketPath = 107

// controlPath returns the control socket's path in dataDir.
func controlPath(dataDir string) (string, error) {
	p := filepath.Join(dataDir, ControlSocket)
	if len(p) > maxSocketPath {
		return "", errs.Invalid("data_dir", "data dir path is too long for the control socket %s (%d bytes, at most %d)", p, len(p), maxSocketPath)
	}
	return p, nil
}

// listenControl listens on the control socket, refusing when another
// agent answers on it (two agents must not share a data dir: each would
// reclaim the other's sandboxes).
func listenControl(path string) (net.Listener, error) {
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		_ = c.Close()
		return nil, fmt.Errorf("another agent is running on this data dir (it answers on %s)", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("removing the stale control socket: %w", err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	return ln, nil
}

// controlHandler serves only Status and Drain of an AgentService.
type controlHandler struct {
	skiffv1connect.UnimplementedAgentServiceHandler
	svc skiffv1connect.AgentServiceHandler
}

func (h controlHandler) Status(ctx context.Context, req *connect.Request[skiffv1.StatusRequest]) (*connect.Response[skiffv1.StatusResponse], error) {
	return h.svc.Status(ctx, req)
}

func (h controlHandler) Drain(ctx context.Context, req *connect.Request[skiffv1.DrainRequest]) (*connect.Response[skiffv1.DrainResponse], error) {
	return h.svc.Drain(ctx, req)
}

// ControlClient returns an AgentService client for the control socket of
// the agent running on dataDir (Status and Drain only).
func ControlClient(dataDir string) (skiffv1connect.AgentServiceClient, error) {
	path, err := controlPath(dataDir)
	if err != nil {
		return nil, err
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}
	return skiffv1connect.NewAgentServiceClient(&http.Client{Transport: tr}, "http://agent", connect.WithReadMaxBytes(16<<20)), nil
}
