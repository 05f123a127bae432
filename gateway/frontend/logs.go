package frontend

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
	"skiff.dev/skiff/api/gen/skiff/v1/skiffv1connect"
	"skiff.dev/skiff/internal/errs"
)

const (
	defaultTailLines = 100
	maxTailLines     = 10000
	appendTimeout    = 10 * time.Second
)

// logAppender is what the shipper needs from storage.
type logAppender interface {
	AppendLog(ctx context.Context, e LogEntry) error
}

// shipper moves invocation logs to storage off the invoke path: a bounded
// queue drained by one goroutine. When the queue is full the entry is
// dropped and counted.
type shipper struct {
	st      logAppender
	q       chan LogEntry
	quit    chan struct{}
	done    chan struct{}
	closed  atomic.Bool
	once    sync.Once
	log     *slog.Logger
	dropped prometheus.Counter
}

func newShipper(st logAppender, size int, log *slog.Logger, dropped prometheus.Counter) *shipper {
	s := &shipper{
		st:      st,
		q:       make(chan LogEntry, size),
		quit:    make(chan struct{}),
		done:    make(chan struct{}),
		log:     log,
		dropped: dropped,
	}
	go s.run()
	return s
}

// enqueue hands an entry to the shipper without blocking.
func (s *shipper) enqueue(e LogEntry) {
	if s.closed.Load() {
		s.dropped.Inc()
		return
	}
	select {
	case s.q <- e:
	default:
		s.dropped.Inc()
	}
}

func (s *shipper) run() {
	defer close(s.done)
	for {
		select {
		case e := <-s.q:
			s.append(e)
		case <-s.quit:
			for {
				select {
				case e := <-s.q:
					s.append(e)
				default:
					return
				}
			}
		}
	}
}

func (s *shipper) append(e LogEntry) {
	ctx, cancel := context.WithTimeout(context.Background(), appendTimeout)
	defer cancel()
	if err := s.st.AppendLog(ctx, e); err != nil {
		s.log.Warn("storing invocation log", "function", e.Function, "request_id", e.RequestID, "err", err)
	}
}

// close stops accepting entries and waits until the queued ones are stored.
func (s *shipper) close() {
	s.once.Do(func() {
		s.closed.Store(true)
		close(s.quit)
	})
	<-s.done
}

// logService implements skiffv1connect.LogServiceHandler.
type logService struct{ f *Frontend }

var _ skiffv1connect.LogServiceHandler = (*logService)(nil)

func (s *logService) TailLogs(ctx context.Context, req *connect.Request[skiffv1.TailLogsRequest], stream *connect.ServerStream[skiffv1.TailLogsResponse]) error {
	name := req.Msg.GetFunctionName()
	if err := validateName("function_name", name); err != nil {
		return err
	}
	lines := int(req.Msg.GetLines())
	if lines == 0 {
		lines = defaultTailLines
	}
	if lines < 1 || lines > maxTailLines {
		return errs.Invalid("lines", "lines %d is outside 1-%d", lines, maxTailLines)
	}
	if _, err := s.f.st.GetFunction(ctx, name); err != nil {
		return err
	}
	return s.f.st.ReadLogs(ctx, name, lines, req.Msg.GetFollow(), func(e LogEntry) error {
		return stream.Send(&skiffv1.TailLogsResponse{
			Text:      e.Text,
			RequestId: e.RequestID,
			Timestamp: e.Time.UTC().Format(time.RFC3339Nano),
		})
	})
}
