package router

import (
	"context"
	"errors"
	"testing"

	"connectrpc.com/connect"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/internal/errs"
)

type fakeAgent struct {
	invoke func(*skiffv1.AgentInvokeRequest) (*skiffv1.AgentInvokeResponse, error)
	retire func(*skiffv1.RetireRequest) error
}

func (f fakeAgent) Invoke(_ context.Context, r *connect.Request[skiffv1.AgentInvokeRequest]) (*connect.Response[skiffv1.AgentInvokeResponse], error) {
	resp, err := f.invoke(r.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(resp), nil
}

func (f fakeAgent) Retire(_ context.Context, r *connect.Request[skiffv1.RetireRequest]) (*connect.Response[skiffv1.RetireResponse], error) {
	return connect.NewResponse(&skiffv1.RetireResponse{}), f.retire(r.Msg)
}

func TestRouterKeepsErrorKinds(t *testing.T) {
	remote := fakeAgent{invoke: func(*skiffv1.AgentInvokeRequest) (*skiffv1.AgentInvokeResponse, error) {
		// An agent across the network answers with a Connect error.
		return nil, errs.ToConnect(errs.New(errs.KindResourceExhausted, "host full"))
	}}
	r, err := New(remote)
	if err != nil {
		t.Fatal(err)
	}
	_, err = r.Invoke(context.Background(), &skiffv1.AgentInvokeRequest{})
	if !errs.Is(err, errs.KindResourceExhausted) {
		t.Fatalf("got %v (kind %v), want resource exhausted", err, errs.KindOf(err))
	}
	if _, err := New(); err == nil {
		t.Fatal("a router without agents was accepted")
	}
}

func TestRetireReachesEveryAgent(t *testing.T) {
	var got []string
	mk := func(name string, fail bool) fakeAgent {
		return fakeAgent{retire: func(r *skiffv1.RetireRequest) error {
			got = append(got, name+":"+r.FunctionName+":"+r.KeepConfigKey)
			if fail {
				return errors.New("unreachable")
			}
			return nil
		}}
	}
	r, _ := New(mk("a", false), mk("b", true), mk("c", false))
	err := r.Retire(context.Background(), "fn", "k2")
	if len(got) != 3 || got[0] != "a:fn:k2" || got[2] != "c:fn:k2" {
		t.Fatalf("retire calls %v, want all three agents", got)
	}
	if err == nil {
		t.Fatal("a failing agent's error was dropped")
	}
}
