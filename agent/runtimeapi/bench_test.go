package runtimeapi

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"strconv"
	"testing"
	"time"
)

// BenchmarkInvoke measures a warm invoke round trip over loopback TCP: Invoke
// → the runtime's parked GET /next → POST /response → Invoke returns. The
// fake runtime is a loop on a keep-alive http.Client, as aws-lambda-go's is.
func BenchmarkInvoke(b *testing.B) {
	for _, size := range []int{16, 64 << 10} {
		b.Run(byteSize(size), func(b *testing.B) {
			e := newEnv(b, Config{})
			stop := make(chan struct{})
			stopped := make(chan struct{})
			go func() {
				defer close(stopped)
				runtimeLoop(e, stop)
			}()
			defer func() { close(stop); _ = e.s.Close(); <-stopped }()

			inv := Invocation{RequestID: "bench", Deadline: time.Now().Add(time.Hour), Payload: bytes.Repeat([]byte("x"), size)}
			ctx := context.Background()
			b.SetBytes(int64(size))
			b.ReportAllocs()
			for b.Loop() {
				res, err := e.s.Invoke(ctx, inv)
				if err != nil || len(res.Payload) != size {
					b.Fatalf("Invoke: %d bytes, %v", len(res.Payload), err)
				}
			}
		})
	}
}

// runtimeLoop echoes every invocation back, like a minimal custom runtime.
func runtimeLoop(e *env, stop <-chan struct{}) {
	next := e.base + "invocation/next"
	buf := make([]byte, 0, 128<<10)
	for {
		resp, err := e.c.Get(next)
		if err != nil {
			return
		}
		buf = buf[:0]
		buf, err = readAllInto(buf, resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			return
		}
		id := resp.Header.Get(hdrRequestID)
		resp, err = e.c.Post(e.base+"invocation/"+id+"/response", "application/json", bytes.NewReader(buf))
		if err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		select {
		case <-stop:
			return
		default:
		}
	}
}

func readAllInto(buf []byte, r io.Reader) ([]byte, error) {
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			return buf, err
		}
	}
}

func byteSize(n int) string {
	if n >= 1<<10 {
		return strconv.Itoa(n>>10) + "KiB"
	}
	return strconv.Itoa(n) + "B"
}
