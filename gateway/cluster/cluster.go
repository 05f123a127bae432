// Package cluster is the gateway's ClusterService: it admits nodes to the
// cluster (join tokens in a NATS KV bucket shared by every gateway, node
// certificates signed by the cluster CA, internal/pki) and shows the
// members, the agents' capacity and their sandboxes.
//
// Join is the one RPC callable without an API key (gateway/frontend exempts
// it): the join token is its credential. It is checked before anything
// else is looked at, the request is bounded (the RPC read limit, the CSR
// size, a cap on concurrent joins), and the token's secret is never logged
// or echoed in an error.
//
// Membership and sandboxes come from small interfaces declared here
// (Membership, SandboxSource) that the composition root wires to the
// gossip node and to the agents.
package cluster

import (
	"cmp"
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"time"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/gossip"
	"skiff.dev/skiff/internal/errs"
	"skiff.dev/skiff/internal/pki"
)

// Membership is the gossip view the handler lists. *gossip.Node
// implements it.
type Membership interface {
	Members() []gossip.Member
}

// SandboxSource lists the sandboxes of every agent (for example by asking
// each one's AgentService.Status). Agents that could not be asked are
// returned by name in unreachable rather than failing the whole call.
type SandboxSource interface {
	Sandboxes(ctx context.Context) (sandboxes []*skiffv1.PlacedSandbox, unreachable []string, err error)
}

// Defaults and limits.
const (
	// DefaultCertTTL is the lifetime of a node certificate issued by Join.
	DefaultCertTTL = 365 * 24 * time.Hour
	// DefaultMaxConcurrentJoins bounds the Join calls served at once; more
	// are refused with ResourceExhausted.
	DefaultMaxConcurrentJoins = 16
	// MaxRequestBytes is the read limit to mount ClusterService with: a
	// CSR (pki.MaxCSRBytes), a token and a name fit well within it.
	MaxRequestBytes = 64 << 10
	// maxFilter bounds ListSandboxes' filters.
	maxFilter = 256
	// ReasonNoCA is the errs reason of Join and CreateJoinToken on a
	// gateway without the cluster CA.
	ReasonNoCA = "no_cluster_ca"
)

// Config configures a Handler.
type Config struct {
	// CA signs node certificates; nil makes Join and CreateJoinToken fail
	// with FailedPrecondition "this gateway has no cluster CA".
	CA *pki.CA
	// Tokens stores the join tokens (required).
	Tokens *TokenStore
	// Members serves ListMembers and ListHosts; nil makes them fail with
	// FailedPrecondition.
	Members Membership
	// Sandboxes serves ListSandboxes; nil makes it fail with
	// FailedPrecondition.
	Sandboxes SandboxSource
	// CertTTL is the lifetime of certificates issued by Join
	// (DefaultCertTTL).
	CertTTL time.Duration
	// MaxConcurrentJoins bounds Join calls in progress
	// (DefaultMaxConcurrentJoins).
	MaxConcurrentJoins int
	Logger             *slog.Logger
	// Now is the clock of token states (time.Now).
	Now func() time.Time
}

// Handler implements skiffv1connect.ClusterServiceHandler.
type Handler struct {
	cfg   Config
	log   *slog.Logger
	joins chan struct{} // semaphore of Join calls
}

var _ skiffv1connect.ClusterServiceHandler = (*Handler)(nil)

// New returns a Handler.
func New(cfg Config) (*Handler, error) {
	if cfg.Tokens == nil {
		return nil, errors.New("cluster handler needs a token store")
	}
	if cfg.CertTTL < 0 || cfg.CertTTL > pki.MaxCertTTL {
		return nil, errs.Invalid("cert_ttl", "certificate lifetime %v is outside (0, %v]", cfg.CertTTL, pki.MaxCertTTL)
	}
	if cfg.MaxConcurrentJoins < 0 {
		return nil, errs.Invalid("max_concurrent_joins", "max concurrent joins %d is negative", cfg.MaxConcurrentJoins)
	}
	if cfg.CertTTL == 0 {
		cfg.CertTTL = DefaultCertTTL
	}
	if cfg.MaxConcurrentJoins == 0 {
		cfg.MaxConcurrentJoins = DefaultMaxConcurrentJoins
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Handler{cfg: cfg, log: cfg.Logger.With("component", "cluster"), joins: make(chan struct{}, cfg.MaxConcurrentJoins)}, nil
}

func noCA() error {
	return errs.New(errs.KindFailedPrecondition, "this gateway has no cluster CA: start it with the CA directory from `skiff ca init`").WithReason(ReasonNoCA)
}

// Join validates the join token and signs the node's certificate request.
func (h *Handler) Join(ctx context.Context, req *connect.Request[skiffv1.JoinRequest]) (*connect.Response[skiffv1.JoinResponse], error) {
	select {
	case h.joins <- struct{}{}:
		defer func() { <-h.joins }()
	default:
		return nil, errs.New(errs.KindResourceExhausted, "too many joins in progress on this gateway: retry shortly")
	}
	ca := h.cfg.CA
	if ca == nil {
		return nil, noCA()
	}
	tok, err := pki.ParseToken(req.Msg.GetToken())
	if err != nil {
		// ParseToken's message never quotes the token.
		return nil, errs.New(errs.KindUnauthenticated, "%v", err).WithReason(ReasonTokenMalformed)
	}
	if tok.CAFingerprint != ca.Fingerprint() {
		return nil, errs.New(errs.KindUnauthenticated, "join token %s is for another cluster CA (sha256:%s), not this gateway's (sha256:%s)", tok.ID, tok.CAFingerprint, ca.Fingerprint()).WithReason(ReasonTokenWrongCluster)
	}
	if _, err := h.cfg.Tokens.Validate(ctx, tok); err != nil {
		h.log.Warn("refused a join", "token_id", tok.ID, "name", truncate(req.Msg.GetName(), pki.MaxNameLen), "peer", req.Peer().Addr, "reason", reason(err))
		return nil, err
	}
	certPEM, err := ca.Sign([]byte(req.Msg.GetCsrPem()), req.Msg.GetName(), h.cfg.CertTTL)
	if err != nil {
		return nil, err
	}
	h.log.Info("node joined", "name", req.Msg.GetName(), "token_id", tok.ID, "peer", req.Peer().Addr)
	return connect.NewResponse(&skiffv1.JoinResponse{CertPem: string(certPEM), CaPem: string(ca.CertPEM())}), nil
}

func reason(err error) string {
	var e *errs.Error
	if errors.As(err, &e) {
		return e.Reason
	}
	return "error"
}

// CreateJoinToken makes a join token for this gateway's CA.
func (h *Handler) CreateJoinToken(ctx context.Context, req *connect.Request[skiffv1.CreateJoinTokenRequest]) (*connect.Response[skiffv1.CreateJoinTokenResponse], error) {
	if h.cfg.CA == nil {
		return nil, noCA()
	}
	secs := req.Msg.GetTtlSeconds()
	if secs < 0 || secs > int64(MaxTokenTTL/time.Second) {
		return nil, errs.Invalid("ttl_seconds", "ttl_seconds %d is outside %d to %d (0 means %d)", secs, int64(MinTokenTTL/time.Second), int64(MaxTokenTTL/time.Second), int64(DefaultTokenTTL/time.Second))
	}
	tok, info, err := h.cfg.Tokens.Create(ctx, h.cfg.CA.Fingerprint(), time.Duration(secs)*time.Second, req.Msg.GetDescription())
	if err != nil {
		return nil, err
	}
	h.log.Info("created join token", "token_id", info.ID, "expires", info.Expires)
	return connect.NewResponse(&skiffv1.CreateJoinTokenResponse{
		Token:   tok.Encode(),
		Id:      info.ID,
		Expires: info.Expires.UTC().Format(time.RFC3339),
	}), nil
}

// ListJoinTokens lists the stored tokens without their secrets.
func (h *Handler) ListJoinTokens(ctx context.Context, _ *connect.Request[skiffv1.ListJoinTokensRequest]) (*connect.Response[skiffv1.ListJoinTokensResponse], error) {
	infos, err := h.cfg.Tokens.List(ctx)
	if err != nil {
		return nil, err
	}
	now := h.cfg.Now()
	out := &skiffv1.ListJoinTokensResponse{Tokens: make([]*skiffv1.JoinToken, 0, len(infos))}
	for _, t := range infos {
		out.Tokens = append(out.Tokens, &skiffv1.JoinToken{
			Id:          t.ID,
			Description: t.Description,
			Created:     t.Created.UTC().Format(time.RFC3339),
			Expires:     t.Expires.UTC().Format(time.RFC3339),
			Revoked:     t.Revoked,
			State:       t.State(now),
		})
	}
	return connect.NewResponse(out), nil
}

// RevokeJoinToken revokes a token on every gateway.
func (h *Handler) RevokeJoinToken(ctx context.Context, req *connect.Request[skiffv1.RevokeJoinTokenRequest]) (*connect.Response[skiffv1.RevokeJoinTokenResponse], error) {
	if err := h.cfg.Tokens.Revoke(ctx, req.Msg.GetId()); err != nil {
		return nil, err
	}
	h.log.Info("revoked join token", "token_id", req.Msg.GetId())
	return connect.NewResponse(&skiffv1.RevokeJoinTokenResponse{}), nil
}

func (h *Handler) members() ([]gossip.Member, error) {
	if h.cfg.Members == nil {
		return nil, errs.New(errs.KindFailedPrecondition, "this gateway has no cluster membership (it runs without gossip)").WithReason("no_membership")
	}
	ms := h.cfg.Members.Members()
	slices.SortFunc(ms, func(a, b gossip.Member) int { return strings.Compare(a.Name, b.Name) })
	return ms, nil
}

// ListMembers lists the gossip members, by name.
func (h *Handler) ListMembers(context.Context, *connect.Request[skiffv1.ListMembersRequest]) (*connect.Response[skiffv1.ListMembersResponse], error) {
	ms, err := h.members()
	if err != nil {
		return nil, err
	}
	out := &skiffv1.ListMembersResponse{Members: make([]*skiffv1.Member, 0, len(ms))}
	for _, m := range ms {
		out.Members = append(out.Members, &skiffv1.Member{
			Name:       m.Name,
			Role:       m.Tags.Role.String(),
			Address:    m.Addr,
			RpcAddress: m.Tags.RPCAddr,
			State:      m.State.String(),
			Zone:       m.Tags.Zone,
			Rack:       m.Tags.Rack,
			Version:    m.Tags.Version,
			Draining:   m.Draining,
		})
	}
	return connect.NewResponse(out), nil
}

// ListHosts lists the agents and their last reported capacity, by name.
func (h *Handler) ListHosts(context.Context, *connect.Request[skiffv1.ListHostsRequest]) (*connect.Response[skiffv1.ListHostsResponse], error) {
	ms, err := h.members()
	if err != nil {
		return nil, err
	}
	out := &skiffv1.ListHostsResponse{}
	for _, m := range ms {
		if m.Tags.Role != gossip.RoleAgent {
			continue
		}
		host := &skiffv1.Host{
			Name:       m.Name,
			RpcAddress: m.Tags.RPCAddr,
			State:      m.State.String(),
			Zone:       m.Tags.Zone,
			Rack:       m.Tags.Rack,
			Draining:   m.Draining,
			Version:    m.Tags.Version,
		}
		if c := m.Capacity; c != nil {
			host.Reported = true
			host.MemoryTotalMb, host.MemoryFreeMb = c.MemoryTotalMB, c.MemoryFreeMB
			host.CpuTotalMilli, host.CpuFreeMilli = c.CPUTotalMilli, c.CPUFreeMilli
			host.Sandboxes, host.Busy, host.Idle = int32(c.Sandboxes), int32(c.Busy), int32(c.Idle)
			host.Load = c.Load
		}
		out.Hosts = append(out.Hosts, host)
	}
	return connect.NewResponse(out), nil
}

// ListSandboxes lists the agents' sandboxes by host, function and id,
// optionally only one function's or one host's.
func (h *Handler) ListSandboxes(ctx context.Context, req *connect.Request[skiffv1.ListSandboxesRequest]) (*connect.Response[skiffv1.ListSandboxesResponse], error) {
	fn, host := req.Msg.GetFunctionName(), req.Msg.GetHost()
	if len(fn) > maxFilter {
		return nil, errs.Invalid("function_name", "function_name is %d bytes, over the limit of %d", len(fn), maxFilter)
	}
	if len(host) > maxFilter {
		return nil, errs.Invalid("host", "host is %d bytes, over the limit of %d", len(host), maxFilter)
	}
	if h.cfg.Sandboxes == nil {
		return nil, errs.New(errs.KindFailedPrecondition, "this gateway cannot list sandboxes (no agents wired)").WithReason("no_sandbox_source")
	}
	all, unreachable, err := h.cfg.Sandboxes.Sandboxes(ctx)
	if err != nil {
		return nil, err
	}
	out := &skiffv1.ListSandboxesResponse{}
	for _, s := range all {
		if (fn != "" && s.GetSandbox().GetFunctionName() != fn) || (host != "" && s.GetHost() != host) {
			continue
		}
		out.Sandboxes = append(out.Sandboxes, s)
	}
	slices.SortFunc(out.Sandboxes, func(a, b *skiffv1.PlacedSandbox) int {
		return cmp.Or(
			strings.Compare(a.GetHost(), b.GetHost()),
			strings.Compare(a.GetSandbox().GetFunctionName(), b.GetSandbox().GetFunctionName()),
			strings.Compare(a.GetSandbox().GetId(), b.GetSandbox().GetId()))
	})
	for _, u := range unreachable {
		if host == "" || u == host {
			out.UnreachableHosts = append(out.UnreachableHosts, u)
		}
	}
	slices.Sort(out.UnreachableHosts)
	return connect.NewResponse(out), nil
}
