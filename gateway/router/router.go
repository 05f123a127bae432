// Package router is the worker manager's front half on the gateway: it
// forwards invocations to an agent and broadcasts sandbox retirement to
// every agent. With one host (`skiff dev`) it has one agent, called
// in-process; the cluster issue adds placement across many.
package router

import (
	"context"
	"errors"
	"fmt"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

// Agent is what the router needs of an agent: the AgentService, whether as
// a Connect client or, in-process, the handler itself.
type Agent interface {
	Invoke(context.Context, *connect.Request[skiffv1.AgentInvokeRequest]) (*connect.Response[skiffv1.AgentInvokeResponse], error)
	Retire(context.Context, *connect.Request[skiffv1.RetireRequest]) (*connect.Response[skiffv1.RetireResponse], error)
}

// Router routes invocations to agents.
type Router struct {
	agents []Agent
}

// New returns a router over the given agents.
func New(agents ...Agent) (*Router, error) {
	if len(agents) == 0 {
		return nil, errors.New("router: at least one agent is required")
	}
	return &Router{agents: agents}, nil
}

// Invoke runs req on an agent. Errors keep their kind whether the agent
// answered in-process or over the network.
func (r *Router) Invoke(ctx context.Context, req *skiffv1.AgentInvokeRequest) (*skiffv1.AgentInvokeResponse, error) {
	resp, err := r.agents[0].Invoke(ctx, connect.NewRequest(req))
	if err != nil {
		return nil, errs.FromConnect(err)
	}
	return resp.Msg, nil
}

// Retire asks every agent to stop the function's sandboxes whose
// configuration is not keep.
func (r *Router) Retire(ctx context.Context, function, keep string) error {
	var all []error
	for i, a := range r.agents {
		if _, err := a.Retire(ctx, connect.NewRequest(&skiffv1.RetireRequest{FunctionName: function, KeepConfigKey: keep})); err != nil {
			all = append(all, fmt.Errorf("agent %d: %w", i, errs.FromConnect(err)))
		}
	}
	return errors.Join(all...)
}
