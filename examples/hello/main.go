// Command hello is the example function `make run` deploys: a Lambda
// function written with github.com/aws/aws-lambda-go that greets by name.
//
//	{"name":"skiff"} -> {"message":"hello, skiff!"}
//	{}               -> {"message":"hello, world!"}
//
// Build it as a custom-runtime bootstrap and zip it:
//
//	GOOS=linux CGO_ENABLED=0 go build -tags lambda.norpc -o bootstrap ./examples/hello
//	zip hello.zip bootstrap
package main

import (
	"context"

	"github.com/aws/aws-lambda-go/lambda"
)

// Request is the event hello accepts.
type Request struct {
	Name string `json:"name"`
}

// Response is what hello returns.
type Response struct {
	Message string `json:"message"`
}

func handle(_ context.Context, req Request) (Response, error) {
	name := req.Name
	if name == "" {
		name = "world"
	}
	return Response{Message: "hello, " + name + "!"}, nil
}

func main() {
	lambda.Start(handle)
}
