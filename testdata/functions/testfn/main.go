// Command testfn is a real Lambda function built with aws-lambda-go, used by
// skiff's tests. Without an "action" in its payload it echoes the payload;
// with one it misbehaves on request.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"github.com/aws/aws-lambda-go/lambda"
	"github.com/aws/aws-lambda-go/lambdacontext"
)

type request struct {
	Action  string `json:"action"`
	Message string `json:"message"`
	Sleep   string `json:"sleep"`   // a duration, for "sleep" and "sleepwho"
	Size    int    `json:"size"`    // bytes, for "big"
	Exit    int    `json:"exit"`    // exit code, for "exit"
	Env     string `json:"env"`     // variable name prefix, for "env"
	Log     string `json:"log"`     // a line to log first
	AllocMB int    `json:"allocMB"` // for "oom"
	Addr    string `json:"addr"`    // host:port, for "tcp"
}

var started = time.Now()
var pid = os.Getpid()

func handle(ctx context.Context, raw json.RawMessage) (any, error) {
	var req request
	_ = json.Unmarshal(raw, &req)
	if req.Log != "" {
		fmt.Println(req.Log)
	}
	if h, ok := extraActions[req.Action]; ok && req.Action != "" {
		return h(ctx, raw)
	}
	if req.Action == "" && isSQSEvent(raw) {
		return handleSQS(ctx, raw)
	}
	if req.Action == "" && isKinesisEvent(raw) {
		return handleKinesis(ctx, raw)
	}
	switch req.Action {
	case "":
		return raw, nil
	case "error":
		return nil, errors.New(req.Message)
	case "panic":
		panic(req.Message)
	case "sleep":
		d, _ := time.ParseDuration(req.Sleep)
		time.Sleep(d)
		return map[string]any{"slept": req.Sleep}, nil
	case "deadline":
		dl, ok := ctx.Deadline()
		lc, _ := lambdacontext.FromContext(ctx)
		return map[string]any{"hasDeadline": ok, "remainingMs": time.Until(dl).Milliseconds(), "requestId": lc.AwsRequestID, "arn": lc.InvokedFunctionArn}, nil
	case "env":
		env := map[string]string{}
		for _, kv := range os.Environ() {
			k, v, _ := strings.Cut(kv, "=")
			if req.Env == "" || strings.HasPrefix(k, req.Env) {
				env[k] = v
			}
		}
		wd, _ := os.Getwd()
		host, _ := os.Hostname()
		return map[string]any{"env": env, "uid": os.Getuid(), "gid": os.Getgid(), "cwd": wd, "hostname": host, "pid": os.Getpid()}, nil
	case "big":
		return strings.Repeat("x", req.Size), nil
	case "exit":
		os.Exit(req.Exit)
	case "oom":
		var hold [][]byte
		for i := 0; i < req.AllocMB; i++ {
			b := make([]byte, 1<<20)
			for j := range b {
				b[j] = byte(j)
			}
			hold = append(hold, b)
		}
		return len(hold), nil
	case "sleepwho":
		// "sleep", answering with the sandbox's identity ("whoami").
		d, _ := time.ParseDuration(req.Sleep)
		time.Sleep(d)
		return map[string]any{"pid": pid, "started": started.UnixNano()}, nil
	case "whoami":
		return map[string]any{"pid": pid, "started": started.UnixNano()}, nil
	case "tcp":
		// Send size bytes to addr, close the sending side and read the reply.
		reply, err := tcpSend(req.Addr, req.Size)
		return map[string]any{"reply": reply, "error": errString(err)}, nil
	case "write":
		err := os.WriteFile(req.Message, []byte("x"), 0o644)
		return map[string]any{"error": fmt.Sprint(err)}, nil
	}
	return nil, fmt.Errorf("unknown action %q", req.Action)
}

func tcpSend(addr string, size int) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(make([]byte, size)); err != nil {
		return "", err
	}
	c.(*net.TCPConn).CloseWrite()
	b, err := io.ReadAll(c)
	return string(b), err
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func main() { lambda.Start(handle) }
