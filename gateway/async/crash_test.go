package async

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"skiff.dev/skiff/gateway/store"
)

const crashChildEnv = "SKIFF_ASYNC_CRASH_CHILD_DIR"

// TestAcceptCrashChild is the child of TestAcceptSurvivesKill: it accepts
// events from several goroutines as fast as it can and prints the request
// id of every acknowledged accept, until it is killed.
func TestAcceptCrashChild(t *testing.T) {
	dir := os.Getenv(crashChildEnv)
	if dir == "" {
		t.Skip("the child of TestAcceptSurvivesKill")
	}
	ctx := context.Background()
	st, err := store.Open(ctx, store.Config{DataDir: dir, SyncAlways: true})
	if err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	s, err := New(ctx, st.JetStream(), Config{})
	if err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	var mu sync.Mutex
	out := bufio.NewWriter(os.Stdout)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				rid := fmt.Sprintf("g%d-%d", g, i)
				if err := s.Accept(ctx, fmt.Sprintf("fn%d", i%5), []byte(`{"i":1}`), rid); err != nil {
					continue
				}
				mu.Lock()
				fmt.Fprintln(out, "ok", rid)
				out.Flush()
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
}

// TestAcceptSurvivesKill: every accept that was acknowledged before the
// process was killed with SIGKILL is in the stream after a reopen.
func TestAcceptSurvivesKill(t *testing.T) {
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestAcceptCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+dir)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	acked := map[string]bool{}
	sc := bufio.NewScanner(stdout)
	killed := false
	for sc.Scan() {
		line := sc.Text()
		if rid, ok := strings.CutPrefix(line, "ok "); ok {
			acked[rid] = true
		} else if strings.HasPrefix(line, "error") {
			t.Fatalf("child: %s", line)
		}
		if len(acked) == 2000 && !killed {
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			killed = true
		}
	}
	_ = cmd.Wait()
	if !killed {
		t.Fatalf("child ended after %d accepts without being killed", len(acked))
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	st, err := store.Open(ctx, store.Config{DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	s, err := New(ctx, st.JetStream(), Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	stored := map[string]bool{}
	for i := range s.cfg.SharedQueues {
		for _, rid := range streamMsgs(t, s, SharedSubject(i)) {
			stored[rid] = true
		}
	}
	missing := 0
	for rid := range acked {
		if !stored[rid] {
			missing++
		}
	}
	t.Logf("%d accepts acknowledged before SIGKILL, %d events stored after reopen", len(acked), len(stored))
	if missing > 0 {
		t.Errorf("%d of %d acknowledged events are missing after the crash", missing, len(acked))
	}
}
