package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
)

// writeJSON prints m as indented JSON with every field present, so scripts
// can rely on the keys. protojson's whitespace is deliberately unstable;
// re-indenting makes the output stable.
func writeJSON(w io.Writer, m proto.Message) error {
	b, err := protojson.MarshalOptions{EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return fmt.Errorf("encoding output: %w", err)
	}
	var out bytes.Buffer
	if err := json.Indent(&out, b, "", "  "); err != nil {
		return fmt.Errorf("encoding output: %w", err)
	}
	out.WriteByte('\n')
	_, err = w.Write(out.Bytes())
	return err
}

// table writes aligned columns.
type table struct{ tw *tabwriter.Writer }

func newTable(w io.Writer) *table {
	return &table{tw: tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)}
}

func (t *table) row(cols ...string) { fmt.Fprintln(t.tw, strings.Join(cols, "\t")) }

func (t *table) flush() error { return t.tw.Flush() }

// writeFunction prints one function: JSON, or a field per line.
func (a *app) writeFunction(f *skiffv1.Function) error {
	if a.json() {
		return writeJSON(a.stdout, f)
	}
	c := f.GetConfig()
	t := newTable(a.stdout)
	t.row("Name:", f.GetName())
	t.row("ARN:", f.GetArn())
	t.row("Runtime:", c.GetRuntime())
	t.row("Handler:", c.GetHandler())
	t.row("Memory:", mb(c.GetMemoryMb()))
	t.row("Timeout:", strconv.Itoa(int(c.GetTimeoutSeconds()))+" s")
	t.row("Ephemeral storage:", mb(c.GetEphemeralStorageMb()))
	if c.GetNetwork() != "" {
		t.row("Network:", c.GetNetwork())
	}
	for _, r := range c.GetNetworkAllow() {
		t.row("Allow:", r)
	}
	for _, r := range c.GetNetworkDeny() {
		t.row("Deny:", r)
	}
	t.row("Code size:", strconv.FormatInt(f.GetCodeSize(), 10)+" bytes")
	t.row("Code SHA-256:", f.GetCodeSha256())
	t.row("Reserved concurrency:", reserved(f))
	t.row("Version:", f.GetVersion())
	t.row("Last modified:", f.GetLastModified())
	if c.GetDescription() != "" {
		t.row("Description:", c.GetDescription())
	}
	env := c.GetEnvironment()
	for i, k := range slices.Sorted(maps.Keys(env)) {
		label := ""
		if i == 0 {
			label = "Environment:"
		}
		t.row(label, k+"="+env[k])
	}
	return t.flush()
}

// writeFunctions prints a list of functions: JSON, or one row each.
func (a *app) writeFunctions(fs []*skiffv1.Function) error {
	if a.json() {
		return writeJSON(a.stdout, &skiffv1.ListFunctionsResponse{Functions: fs})
	}
	t := newTable(a.stdout)
	t.row("NAME", "RUNTIME", "MEMORY", "TIMEOUT", "CODE SIZE", "CONCURRENCY", "LAST MODIFIED")
	for _, f := range fs {
		c := f.GetConfig()
		t.row(f.GetName(), c.GetRuntime(), mb(c.GetMemoryMb()), strconv.Itoa(int(c.GetTimeoutSeconds()))+"s",
			strconv.FormatInt(f.GetCodeSize(), 10), reserved(f), f.GetLastModified())
	}
	return t.flush()
}

func mb(v int32) string { return strconv.Itoa(int(v)) + " MB" }

func reserved(f *skiffv1.Function) string {
	if f.ReservedConcurrency == nil {
		return "-"
	}
	return strconv.Itoa(int(f.GetReservedConcurrency()))
}

// writeLine prints s and a newline unless s already ends with one.
func writeLine(w io.Writer, b []byte) error {
	if len(b) == 0 {
		return nil
	}
	if _, err := w.Write(b); err != nil {
		return err
	}
	if b[len(b)-1] != '\n' {
		_, err := io.WriteString(w, "\n")
		return err
	}
	return nil
}
