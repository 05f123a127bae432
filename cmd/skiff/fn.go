package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"connectrpc.com/connect"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"skiff.dev/skiff/internal/zipdir"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
)

const (
	// inlineLimit is the largest archive sent inside CreateFunction or
	// UpdateFunctionCode; larger ones are streamed with UploadFunction.
	inlineLimit = 4 << 20
	// chunkSize is the size of each UploadFunction chunk.
	chunkSize = 1 << 20
	// largeDirFiles is the file count above which zipping a directory
	// shows progress (as does a total over inlineLimit bytes).
	largeDirFiles = 1000
)

func (a *app) fnCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "fn",
		Short: "Create, update, inspect and delete functions",
		Args:  cobra.ArbitraryArgs,
		RunE:  groupRun,
		// A group: its usage line has no flags of its own.
		DisableFlagsInUseLine: true,
	}
	c.AddCommand(a.fnCreateCmd(), a.fnUpdateCodeCmd(), a.fnUpdateConfigCmd(), a.fnGetCmd(), a.fnListCmd(), a.fnDeleteCmd(), a.fnEventConfigCmd())
	return c
}

// codeFlags are --zip and --dir.
type codeFlags struct{ zip, dir string }

func (f *codeFlags) register(c *cobra.Command) {
	c.Flags().StringVar(&f.zip, "zip", "", "the code as a Lambda zip archive")
	c.Flags().StringVar(&f.dir, "dir", "", "a directory to zip and upload as the code")
}

func (f *codeFlags) check(c *cobra.Command) error {
	switch {
	case f.zip == "" && f.dir == "":
		return usagef(c, "one of --zip or --dir is required")
	case f.zip != "" && f.dir != "":
		return usagef(c, "--zip and --dir cannot be used together")
	}
	return nil
}

// load returns the archive: the --zip file, or the --dir tree zipped.
func (a *app) loadCode(f codeFlags) ([]byte, error) {
	if f.zip != "" {
		b, err := os.ReadFile(f.zip)
		if err != nil {
			return nil, fmt.Errorf("reading the code: %w", err)
		}
		return b, nil
	}
	entries, err := zipdir.Scan(f.dir)
	if err != nil {
		return nil, err
	}
	if len(entries) == 0 {
		return nil, fmt.Errorf("%s has no files to archive", f.dir)
	}
	total := zipdir.TotalSize(entries)
	var progress func(int64)
	if total > inlineLimit || len(entries) > largeDirFiles {
		if bar := a.progressBar(total, "zipping "+f.dir); bar != nil {
			progress = func(n int64) { _ = bar.Add64(n) }
			defer func() { _ = bar.Finish() }()
		}
	}
	var buf bytes.Buffer
	if err := zipdir.Write(&buf, entries, progress); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// progressBar returns a byte progress bar on stderr, or nil when stderr
// is not a terminal.
func (a *app) progressBar(total int64, desc string) *progressbar.ProgressBar {
	if !a.isTerminal(a.stderr) {
		return nil
	}
	return progressbar.NewOptions64(total,
		progressbar.OptionSetWriter(a.stderr),
		progressbar.OptionSetDescription(desc),
		progressbar.OptionShowBytes(true),
		progressbar.OptionSetWidth(30),
		progressbar.OptionClearOnFinish(),
	)
}

// configFlags are the function configuration flags.
type configFlags struct {
	runtime, handler, description string
	memory, timeout, storage      int32
	env                           []string
	network                       string
	allow, deny                   []string
}

func (f *configFlags) register(c *cobra.Command, create bool) {
	fl := c.Flags()
	if create {
		fl.StringVar(&f.runtime, "runtime", "provided", "runtime; only provided (a custom runtime with an executable bootstrap)")
		fl.StringVar(&f.handler, "handler", "bootstrap", "handler, passed to the runtime as _HANDLER")
	} else {
		fl.StringVar(&f.handler, "handler", "", "handler, passed to the runtime as _HANDLER")
	}
	fl.Int32Var(&f.memory, "memory", 0, "memory in MB, 128-10240 (default 128)")
	fl.Int32Var(&f.timeout, "timeout", 0, "timeout in seconds, 1-900 (default 3)")
	fl.Int32Var(&f.storage, "ephemeral-storage", 0, "size of /tmp in MB, 512-10240 (default 512)")
	fl.StringArrayVar(&f.env, "env", nil, "environment variable K=V (repeatable)")
	fl.StringVar(&f.description, "description", "", "description")
	fl.StringVar(&f.network, "network", "", "network access: egress (default: reach the internet) or none (loopback only)")
	fl.StringArrayVar(&f.allow, "allow", nil, "with egress, also allow CIDR[:PORT|:LOW-HIGH], e.g. private ranges or host services (repeatable)")
	fl.StringArrayVar(&f.deny, "deny", nil, "with egress, deny CIDR[:PORT|:LOW-HIGH]; deny wins (repeatable)")
}

func (f *configFlags) config(c *cobra.Command) (*skiffv1.FunctionConfig, error) {
	env, err := parseEnv(f.env)
	if err != nil {
		return nil, usageErr(c, err)
	}
	return &skiffv1.FunctionConfig{
		Runtime:            f.runtime,
		Handler:            f.handler,
		MemoryMb:           f.memory,
		TimeoutSeconds:     f.timeout,
		EphemeralStorageMb: f.storage,
		Environment:        env,
		Description:        f.description,
		Network:            f.network,
		NetworkAllow:       f.allow,
		NetworkDeny:        f.deny,
	}, nil
}

// parseEnv turns K=V pairs into a map; the value may contain '='.
func parseEnv(kvs []string) (map[string]string, error) {
	if len(kvs) == 0 {
		return nil, nil
	}
	env := make(map[string]string, len(kvs))
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("invalid --env %q: want KEY=VALUE", kv)
		}
		if _, dup := env[k]; dup {
			return nil, fmt.Errorf("--env %s given twice", k)
		}
		env[k] = v
	}
	return env, nil
}

func (a *app) fnCreateCmd() *cobra.Command {
	var code codeFlags
	var cfg configFlags
	c := &cobra.Command{
		Use:   "create NAME (--zip FILE | --dir DIR)",
		Short: "Create a function",
		Example: lines(
			"  skiff fn create hello --zip hello.zip",
			"  skiff fn create hello --dir ./build --memory 256 --timeout 10 --env GREETING=hi"),
		Args: checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			if err := code.check(c); err != nil {
				return err
			}
			conf, err := cfg.config(c)
			if err != nil {
				return err
			}
			cl, err := a.dial()
			if err != nil {
				return err
			}
			zip, err := a.loadCode(code)
			if err != nil {
				return err
			}
			var fn *skiffv1.Function
			if len(zip) > inlineLimit {
				fn, err = a.upload(c.Context(), cl, &skiffv1.UploadFunctionRequest_Header{Name: args[0], Config: conf, Create: true}, zip)
			} else {
				var resp *connect.Response[skiffv1.CreateFunctionResponse]
				resp, err = cl.fn.CreateFunction(c.Context(), connect.NewRequest(&skiffv1.CreateFunctionRequest{Name: args[0], Config: conf, ZipFile: zip}))
				if err == nil {
					fn = resp.Msg.GetFunction()
				}
			}
			if err != nil {
				return err
			}
			return a.writeFunction(fn)
		},
	}
	code.register(c)
	cfg.register(c, true)
	return c
}

func (a *app) fnUpdateCodeCmd() *cobra.Command {
	var code codeFlags
	c := &cobra.Command{
		Use:     "update-code NAME (--zip FILE | --dir DIR)",
		Short:   "Replace a function's code",
		Example: "  skiff fn update-code hello --dir ./build",
		Args:    checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			if err := code.check(c); err != nil {
				return err
			}
			cl, err := a.dial()
			if err != nil {
				return err
			}
			zip, err := a.loadCode(code)
			if err != nil {
				return err
			}
			var fn *skiffv1.Function
			if len(zip) > inlineLimit {
				fn, err = a.upload(c.Context(), cl, &skiffv1.UploadFunctionRequest_Header{Name: args[0]}, zip)
			} else {
				var resp *connect.Response[skiffv1.UpdateFunctionCodeResponse]
				resp, err = cl.fn.UpdateFunctionCode(c.Context(), connect.NewRequest(&skiffv1.UpdateFunctionCodeRequest{Name: args[0], ZipFile: zip}))
				if err == nil {
					fn = resp.Msg.GetFunction()
				}
			}
			if err != nil {
				return err
			}
			return a.writeFunction(fn)
		},
	}
	code.register(c)
	return c
}

// upload streams zip with UploadFunction: the header, then 1 MiB chunks.
func (a *app) upload(ctx context.Context, cl *clients, h *skiffv1.UploadFunctionRequest_Header, zip []byte) (*skiffv1.Function, error) {
	h.Size = int64(len(zip))
	bar := a.progressBar(h.Size, "uploading")
	stream := cl.fn.UploadFunction(ctx)
	err := stream.Send(&skiffv1.UploadFunctionRequest{Part: &skiffv1.UploadFunctionRequest_Header_{Header: h}})
	for off := 0; err == nil && off < len(zip); off += chunkSize {
		end := min(off+chunkSize, len(zip))
		err = stream.Send(&skiffv1.UploadFunctionRequest{Part: &skiffv1.UploadFunctionRequest_Chunk{Chunk: zip[off:end]}})
		if bar != nil {
			_ = bar.Add(end - off)
		}
	}
	if bar != nil {
		_ = bar.Finish()
	}
	// A send fails with io.EOF when the server ended the call early; the
	// real error comes from CloseAndReceive.
	if err != nil && !errors.Is(err, io.EOF) {
		_, _ = stream.CloseAndReceive()
		return nil, err
	}
	resp, err := stream.CloseAndReceive()
	if err != nil {
		return nil, err
	}
	return resp.Msg.GetFunction(), nil
}

func (a *app) fnUpdateConfigCmd() *cobra.Command {
	var cfg configFlags
	c := &cobra.Command{
		Use:   "update-config NAME [flags]",
		Short: "Change a function's configuration (only the flags given)",
		Example: lines(
			"  skiff fn update-config hello --memory 512",
			"  skiff fn update-config hello --env GREETING=hello --env LEVEL=debug"),
		Args: checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			conf, err := cfg.config(c)
			if err != nil {
				return err
			}
			var mask []string
			for _, m := range []struct{ flag, field string }{
				{"handler", "handler"},
				{"memory", "memory_mb"},
				{"timeout", "timeout_seconds"},
				{"ephemeral-storage", "ephemeral_storage_mb"},
				{"env", "environment"},
				{"description", "description"},
				{"network", "network"},
				{"allow", "network_allow"},
				{"deny", "network_deny"},
			} {
				if c.Flags().Changed(m.flag) {
					mask = append(mask, m.field)
				}
			}
			if len(mask) == 0 {
				return usagef(c, "nothing to update: give at least one of --handler, --memory, --timeout, --ephemeral-storage, --env, --description, --network, --allow, --deny")
			}
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.fn.UpdateFunctionConfiguration(c.Context(), connect.NewRequest(&skiffv1.UpdateFunctionConfigurationRequest{
				Name: args[0], Config: conf, UpdateMask: mask,
			}))
			if err != nil {
				return err
			}
			return a.writeFunction(resp.Msg.GetFunction())
		},
	}
	cfg.register(c, false)
	return c
}

func (a *app) fnGetCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "get NAME",
		Short:   "Show a function",
		Example: "  skiff fn get hello -o json",
		Args:    checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.fn.GetFunction(c.Context(), connect.NewRequest(&skiffv1.GetFunctionRequest{Name: args[0]}))
			if err != nil {
				return err
			}
			return a.writeFunction(resp.Msg.GetFunction())
		},
	}
}

func (a *app) fnListCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List all functions",
		Args:  checkArgs(cobra.NoArgs),
		RunE: func(c *cobra.Command, _ []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			var all []*skiffv1.Function
			seen := map[string]bool{}
			token := ""
			for {
				resp, err := cl.fn.ListFunctions(c.Context(), connect.NewRequest(&skiffv1.ListFunctionsRequest{PageToken: token}))
				if err != nil {
					return err
				}
				all = append(all, resp.Msg.GetFunctions()...)
				token = resp.Msg.GetNextPageToken()
				if token == "" {
					break
				}
				if seen[token] {
					return fmt.Errorf("listing functions: the server repeated page token %q", token)
				}
				seen[token] = true
			}
			return a.writeFunctions(all)
		},
	}
}

func (a *app) fnDeleteCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a function",
		Args:  checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.fn.DeleteFunction(c.Context(), connect.NewRequest(&skiffv1.DeleteFunctionRequest{Name: args[0]}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			_, err = fmt.Fprintf(a.stdout, "deleted function %s\n", args[0])
			return err
		},
	}
}
