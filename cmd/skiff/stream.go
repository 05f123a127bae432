package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math/big"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	skiffv1 "skiff.dev/skiff/api/gen/skiff/v1"
)

// Defaults of a stream and of reading one.
const (
	// defaultRetentionHours is what the gateway applies to an unset
	// retention period.
	defaultRetentionHours = 24
	// defaultGetLimit is how many records `stream get` prints unless
	// --limit or --follow says otherwise.
	defaultGetLimit = 100
	// maxGetRecords is the most records one GetRecords call returns.
	maxGetRecords = 10000
	// defaultStreamPoll is how long `stream get --follow` waits after a
	// round of reads that found nothing new.
	defaultStreamPoll = time.Second
)

func (a *app) streamCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "stream",
		Short: "Manage sharded streams (Kinesis-like) and their records",
		Long: lines(
			"Streams hold records with Kinesis semantics: a record goes to the shard whose",
			"hash key range holds the MD5 of its partition key (or its explicit hash key),",
			"records are ordered within a shard and kept for the retention period, and",
			"shards split, merge and scale with parent/child lineage.",
			"Map a stream to a function with 'skiff esm create --stream'."),
		Args: cobra.ArbitraryArgs,
		RunE: groupRun,
		// A group: its usage line has no flags of its own.
		DisableFlagsInUseLine: true,
	}
	c.AddCommand(
		a.streamCreateCmd(),
		a.streamListCmd(),
		a.streamDescribeCmd(),
		a.streamPutCmd(),
		a.streamGetCmd(),
		a.streamSplitCmd(),
		a.streamMergeCmd(),
		a.streamScaleCmd(),
		a.streamDeleteCmd(),
	)
	return c
}

func (a *app) streamCreateCmd() *cobra.Command {
	var shards, retention int32
	c := &cobra.Command{
		Use:   "create NAME --shards N [--retention-hours H]",
		Short: "Create a stream",
		Long: lines(
			"Create a stream of N shards (1-64) that split the hash key range evenly.",
			"Records are kept for --retention-hours (1-8760, default 24)."),
		Example: lines(
			"  skiff stream create clicks --shards 4",
			"  skiff stream create audit --shards 1 --retention-hours 168"),
		Args: checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			if !c.Flags().Changed("shards") {
				return usagef(c, "--shards is required")
			}
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.streams.CreateStream(c.Context(), connect.NewRequest(&skiffv1.CreateStreamRequest{
				Name: args[0], ShardCount: shards, RetentionPeriodHours: retention,
			}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			return a.writeStream(resp.Msg.GetStream())
		},
	}
	c.Flags().Int32Var(&shards, "shards", 0, "number of shards, 1-64")
	c.Flags().Int32Var(&retention, "retention-hours", 0, "hours a record is kept, 1-8760 (default 24)")
	return c
}

func (a *app) streamListCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List streams",
		Args:  checkArgs(cobra.NoArgs),
		RunE: func(c *cobra.Command, _ []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.streams.ListStreams(c.Context(), connect.NewRequest(&skiffv1.ListStreamsRequest{}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			t := newTable(a.stdout)
			t.row("NAME")
			for _, n := range resp.Msg.GetNames() {
				t.row(n)
			}
			return t.flush()
		},
	}
}

func (a *app) streamDescribeCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "describe NAME",
		Short:   "Show a stream and its shards (open and closed, with lineage)",
		Example: "  skiff stream describe clicks -o json",
		Args:    checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.streams.DescribeStream(c.Context(), connect.NewRequest(&skiffv1.DescribeStreamRequest{Name: args[0]}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			return a.writeStream(resp.Msg.GetStream())
		},
	}
}

// writeStream prints a stream: a field per line, a blank line and a table
// of its shards.
func (a *app) writeStream(s *skiffv1.StreamDescription) error {
	open := 0
	for _, sh := range s.GetShards() {
		if sh.GetOpen() {
			open++
		}
	}
	retention := strconv.Itoa(defaultRetentionHours) + " h (default)"
	if s.GetRetentionPeriodHours() != 0 {
		retention = strconv.Itoa(int(s.GetRetentionPeriodHours())) + " h"
	}
	t := newTable(a.stdout)
	t.row("Name:", s.GetName())
	t.row("ARN:", s.GetArn())
	t.row("Status:", s.GetStatus())
	t.row("Retention:", retention)
	t.row("Shards:", fmt.Sprintf("%d open, %d in all", open, len(s.GetShards())))
	t.row("Created:", s.GetCreated())
	if err := t.flush(); err != nil {
		return err
	}
	if len(s.GetShards()) == 0 {
		return nil
	}
	if _, err := fmt.Fprintln(a.stdout); err != nil {
		return err
	}
	t = newTable(a.stdout)
	t.row("SHARD", "STATE", "PARENT", "ADJACENT PARENT", "HASH KEYS", "SEQUENCE NUMBERS")
	for _, sh := range s.GetShards() {
		state := "open"
		if !sh.GetOpen() {
			state = "closed"
		}
		end := sh.GetEndingSequenceNumber()
		if end == "" {
			end = "…"
		}
		t.row(sh.GetShardId(), state, orDash(sh.GetParentShardId()), orDash(sh.GetAdjacentParentShardId()),
			sh.GetStartingHashKey()+"-"+sh.GetEndingHashKey(), orDash(sh.GetStartingSequenceNumber())+"-"+end)
	}
	return t.flush()
}

func (a *app) streamDeleteCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a stream and its records (its event source mappings are disabled)",
		Args:  checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.streams.DeleteStream(c.Context(), connect.NewRequest(&skiffv1.DeleteStreamRequest{Name: args[0]}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			_, err = fmt.Fprintf(a.stdout, "deleted stream %s\n", args[0])
			return err
		},
	}
}

func (a *app) streamPutCmd() *cobra.Command {
	var key, data, hashKey string
	c := &cobra.Command{
		Use:   "put NAME --partition-key KEY --data (DATA | @FILE | -) [--explicit-hash-key H]",
		Short: "Put a record into a stream",
		Long: lines(
			"Put one record. Its data is the --data value, the content of FILE with @FILE,",
			"or standard input with -; it may be binary, up to 1 MiB. The record goes to",
			"the open shard whose hash key range holds the MD5 of the partition key, or",
			"--explicit-hash-key (a decimal 128-bit number) when given."),
		Example: lines(
			`  skiff stream put clicks --partition-key user-42 --data '{"page":"/"}'`,
			"  skiff stream put clicks --partition-key user-42 --data @click.json",
			"  gzip -c log.txt | skiff stream put logs --partition-key host-1 --data -"),
		Args: checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			switch {
			case !c.Flags().Changed("partition-key"):
				return usagef(c, "--partition-key is required")
			case !c.Flags().Changed("data"):
				return usagef(c, "--data is required: the record's data, @FILE or - for stdin")
			}
			if c.Flags().Changed("explicit-hash-key") {
				if err := checkHashKey(hashKey); err != nil {
					return usagef(c, "invalid --explicit-hash-key: %v", err)
				}
			}
			b, err := a.readArg(data, "the record data")
			if err != nil {
				return err
			}
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.streams.PutRecord(c.Context(), connect.NewRequest(&skiffv1.PutRecordRequest{
				Stream: args[0], PartitionKey: key, Data: b, ExplicitHashKey: hashKey,
			}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			t := newTable(a.stdout)
			t.row("Shard ID:", resp.Msg.GetShardId())
			t.row("Sequence number:", resp.Msg.GetSequenceNumber())
			return t.flush()
		},
	}
	fl := c.Flags()
	fl.StringVar(&key, "partition-key", "", "the partition key, 1-256 characters: its MD5 picks the shard")
	fl.StringVar(&data, "data", "", "the record's data: DATA, @FILE, or - for stdin")
	fl.StringVar(&hashKey, "explicit-hash-key", "", "a decimal 128-bit hash key that picks the shard instead of the partition key")
	return c
}

// maxHashKey is the largest 128-bit hash key, 2^128-1.
var maxHashKey = new(big.Int).Sub(new(big.Int).Lsh(big.NewInt(1), 128), big.NewInt(1))

// parseHashKey parses a decimal 128-bit hash key.
func parseHashKey(s string) (*big.Int, error) {
	n, ok := new(big.Int).SetString(s, 10)
	if !ok || strings.TrimLeft(s, "0123456789") != "" {
		return nil, fmt.Errorf("%q is not a decimal number", s)
	}
	if n.Cmp(maxHashKey) > 0 {
		return nil, fmt.Errorf("%s is above the largest hash key 2^128-1", s)
	}
	return n, nil
}

func checkHashKey(s string) error {
	_, err := parseHashKey(s)
	return err
}

// shardID accepts a shard id, or its number: 3 means shardId-000000000003.
func shardID(s string) string {
	if n, err := strconv.ParseUint(s, 10, 64); err == nil {
		return fmt.Sprintf("shardId-%012d", n)
	}
	return s
}

// iteratorTypes are the --iterator values.
var iteratorTypes = map[string]skiffv1.ShardIteratorType{
	"trim-horizon":   skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_TRIM_HORIZON,
	"latest":         skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_LATEST,
	"at-sequence":    skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AT_SEQUENCE_NUMBER,
	"after-sequence": skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AFTER_SEQUENCE_NUMBER,
	"at-timestamp":   skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AT_TIMESTAMP,
}

// getOptions are what `stream get` reads and how.
type getOptions struct {
	stream    string
	iter      skiffv1.ShardIteratorType
	sequence  string
	timestamp string
	limit     int // 0: no limit
	follow    bool
}

func (a *app) streamGetCmd() *cobra.Command {
	var (
		shard, iter, seq, ts string
		limit                int
		follow               bool
	)
	c := &cobra.Command{
		Use:   "get NAME [--shard ID] [--iterator TYPE] [--limit N] [--follow]",
		Short: "Read records and print them, each record's data in full",
		Long: lines(
			"Read records from one shard (--shard), or from every shard in turn, and print",
			"each: its shard, sequence number, partition key and arrival time, then its",
			"data in full (data that is not UTF-8 text is shown in base64). With -o json",
			"each record is one line of JSON, its data in base64.",
			"",
			"--iterator says where reading starts: trim-horizon (the oldest record kept,",
			"the default), latest (only records put from now on), at-sequence or",
			"after-sequence --sequence N (with --shard), or at-timestamp --timestamp T",
			"(RFC 3339). Without --follow it prints at most --limit records (default",
			"100) and stops when caught up; 'no records' goes to stderr when there are",
			"none. With --follow it keeps printing new records, follows closed shards",
			"into their children, and runs until interrupted (or --limit records)."),
		Example: lines(
			"  skiff stream get clicks",
			"  skiff stream get clicks --shard 0 --iterator after-sequence --sequence 42",
			"  skiff stream get clicks --iterator latest --follow",
			"  skiff stream get clicks --iterator at-timestamp --timestamp 2026-11-27T10:00:00Z -o json | jq -r .data"),
		Args: checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			fl := c.Flags()
			o := getOptions{stream: args[0], sequence: seq, timestamp: ts, limit: limit, follow: follow}
			var ok bool
			if o.iter, ok = iteratorTypes[strings.ToLower(iter)]; !ok {
				return usagef(c, "invalid --iterator %q: want trim-horizon, latest, at-sequence, after-sequence or at-timestamp", iter)
			}
			bySeq := o.iter == skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AT_SEQUENCE_NUMBER ||
				o.iter == skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AFTER_SEQUENCE_NUMBER
			byTime := o.iter == skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AT_TIMESTAMP
			switch {
			case bySeq && !fl.Changed("sequence"):
				return usagef(c, "--iterator %s needs --sequence", iter)
			case bySeq && shard == "":
				return usagef(c, "--iterator %s needs --shard: sequence numbers belong to one shard", iter)
			case !bySeq && fl.Changed("sequence"):
				return usagef(c, "--sequence needs --iterator at-sequence or after-sequence")
			case byTime && !fl.Changed("timestamp"):
				return usagef(c, "--iterator at-timestamp needs --timestamp")
			case !byTime && fl.Changed("timestamp"):
				return usagef(c, "--timestamp needs --iterator at-timestamp")
			case limit < 0:
				return usagef(c, "--limit must not be negative")
			}
			if byTime {
				if _, err := time.Parse(time.RFC3339Nano, ts); err != nil {
					return usagef(c, "invalid --timestamp %q: want an RFC 3339 time such as 2026-11-27T10:00:00Z", ts)
				}
			}
			if !fl.Changed("limit") && follow {
				o.limit = 0
			}
			cl, err := a.dial()
			if err != nil {
				return err
			}
			var shards []string
			if shard != "" {
				shards = []string{shardID(shard)}
			} else {
				resp, err := cl.streams.ListShards(c.Context(), connect.NewRequest(&skiffv1.ListShardsRequest{Stream: o.stream}))
				if err != nil {
					return err
				}
				for _, sh := range resp.Msg.GetShards() {
					// A closed shard gets no new records.
					if sh.GetOpen() || o.iter != skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_LATEST {
						shards = append(shards, sh.GetShardId())
					}
				}
			}
			if !follow {
				return a.getRecords(c.Context(), cl, o, shards)
			}
			ctx := c.Context()
			err = a.followRecords(ctx, cl, o, shards)
			// Following ends when the user interrupts: that is success.
			if err != nil && ctx.Err() != nil {
				return nil
			}
			return err
		},
	}
	fl := c.Flags()
	fl.StringVar(&shard, "shard", "", "read only this shard (an id, or its number: 3 is shardId-000000000003)")
	fl.StringVar(&iter, "iterator", "trim-horizon", "where to start: trim-horizon, latest, at-sequence, after-sequence or at-timestamp")
	fl.StringVar(&seq, "sequence", "", "the sequence number for --iterator at-sequence or after-sequence")
	fl.StringVar(&ts, "timestamp", "", "the RFC 3339 time for --iterator at-timestamp")
	fl.IntVar(&limit, "limit", defaultGetLimit, "most records to print, 0 for no limit; with --follow, no limit unless given")
	fl.BoolVarP(&follow, "follow", "f", false, "keep printing new records until interrupted")
	return c
}

// shardReader reads one shard from its iterator.
type shardReader struct {
	shard, iterator string
}

// iterator starts reading a shard as o says.
func (a *app) iterator(ctx context.Context, cl *clients, o getOptions, shard string, iter skiffv1.ShardIteratorType) (*shardReader, error) {
	req := &skiffv1.GetShardIteratorRequest{Stream: o.stream, ShardId: shard, Type: iter}
	switch iter {
	case skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AT_SEQUENCE_NUMBER, skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AFTER_SEQUENCE_NUMBER:
		req.StartingSequenceNumber = o.sequence
	case skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_AT_TIMESTAMP:
		req.Timestamp = o.timestamp
	}
	resp, err := cl.streams.GetShardIterator(ctx, connect.NewRequest(req))
	if err != nil {
		return nil, err
	}
	return &shardReader{shard: shard, iterator: resp.Msg.GetShardIterator()}, nil
}

// next reads the next records of r, at most max (0: the server's most),
// and prints them. It returns the response; r.iterator moves on.
func (a *app) next(ctx context.Context, cl *clients, r *shardReader, max int) (*skiffv1.GetRecordsResponse, error) {
	limit := int32(0)
	if max > 0 {
		limit = int32(min(max, maxGetRecords))
	}
	resp, err := cl.streams.GetRecords(ctx, connect.NewRequest(&skiffv1.GetRecordsRequest{ShardIterator: r.iterator, Limit: limit}))
	if err != nil {
		return nil, err
	}
	r.iterator = resp.Msg.GetNextShardIterator()
	return resp.Msg, nil
}

// getRecords prints the records of the shards, one shard after the other,
// until each is caught up or o.limit records are out.
func (a *app) getRecords(ctx context.Context, cl *clients, o getOptions, shards []string) error {
	printed := 0
	for _, shard := range shards {
		r, err := a.iterator(ctx, cl, o, shard, o.iter)
		if err != nil {
			return err
		}
		for r.iterator != "" && (o.limit == 0 || printed < o.limit) {
			resp, err := a.next(ctx, cl, r, o.limit-printed)
			if err != nil {
				return err
			}
			if err := a.writeRecords(r.shard, resp.GetRecords(), &printed); err != nil {
				return err
			}
			if len(resp.GetRecords()) == 0 {
				break // caught up
			}
		}
		if o.limit != 0 && printed >= o.limit {
			break
		}
	}
	if printed == 0 && !a.json() {
		_, err := fmt.Fprintln(a.stderr, "no records")
		return err
	}
	return nil
}

// followRecords reads the shards in turn, forever: a shard that ends is
// replaced by its children (read from their start), and a round that
// finds nothing waits for the poll interval.
func (a *app) followRecords(ctx context.Context, cl *clients, o getOptions, shards []string) error {
	poll := a.streamPoll
	if poll <= 0 {
		poll = defaultStreamPoll
	}
	seen := make(map[string]bool)
	var readers []*shardReader
	for _, shard := range shards {
		r, err := a.iterator(ctx, cl, o, shard, o.iter)
		if err != nil {
			return err
		}
		seen[shard] = true
		readers = append(readers, r)
	}
	printed := 0
	for len(readers) > 0 {
		got := false
		var live []*shardReader
		for _, r := range readers {
			resp, err := a.next(ctx, cl, r, o.limit-printed)
			if err != nil {
				return err
			}
			if err := a.writeRecords(r.shard, resp.GetRecords(), &printed); err != nil {
				return err
			}
			if o.limit != 0 && printed >= o.limit {
				return nil
			}
			got = got || len(resp.GetRecords()) > 0
			if r.iterator != "" {
				live = append(live, r)
				continue
			}
			// Shard end: its children hold its keys from now on.
			for _, child := range resp.GetChildShards() {
				if seen[child] {
					continue
				}
				seen[child] = true
				cr, err := a.iterator(ctx, cl, o, child, skiffv1.ShardIteratorType_SHARD_ITERATOR_TYPE_TRIM_HORIZON)
				if err != nil {
					return err
				}
				live = append(live, cr)
				got = true
			}
		}
		readers = live
		if got {
			continue
		}
		t := time.NewTimer(poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
	return nil
}

// jsonRecord is a record of `stream get -o json`: the API's Record and the
// shard it came from.
type jsonRecord struct {
	ShardID                     string `json:"shardId"`
	SequenceNumber              string `json:"sequenceNumber"`
	PartitionKey                string `json:"partitionKey"`
	ApproximateArrivalTimestamp string `json:"approximateArrivalTimestamp"`
	Data                        []byte `json:"data"` // base64
}

// writeRecords prints records of a shard and counts them in *printed: a
// line of JSON each, or a field per line, a blank line and the data in
// full, records separated by a blank line.
func (a *app) writeRecords(shard string, recs []*skiffv1.Record, printed *int) error {
	for _, r := range recs {
		if a.json() {
			b, err := json.Marshal(jsonRecord{ShardID: shard, SequenceNumber: r.GetSequenceNumber(), PartitionKey: r.GetPartitionKey(),
				ApproximateArrivalTimestamp: r.GetApproximateArrivalTimestamp(), Data: r.GetData()})
			if err != nil {
				return fmt.Errorf("encoding output: %w", err)
			}
			if _, err := fmt.Fprintf(a.stdout, "%s\n", b); err != nil {
				return err
			}
			*printed++
			continue
		}
		if *printed > 0 {
			if _, err := fmt.Fprintln(a.stdout); err != nil {
				return err
			}
		}
		data := r.GetData()
		size := strconv.Itoa(len(data)) + " " + plural(len(data), "byte")
		if !utf8.Valid(data) {
			size += ", not UTF-8: shown in base64"
			data = []byte(base64.StdEncoding.EncodeToString(data))
		}
		t := newTable(a.stdout)
		t.row("Shard ID:", shard)
		t.row("Sequence number:", r.GetSequenceNumber())
		t.row("Partition key:", r.GetPartitionKey())
		t.row("Arrival:", r.GetApproximateArrivalTimestamp())
		t.row("Data:", size)
		if err := t.flush(); err != nil {
			return err
		}
		if len(data) > 0 {
			if _, err := fmt.Fprintln(a.stdout); err != nil {
				return err
			}
			if err := writeLine(a.stdout, data); err != nil {
				return err
			}
		}
		*printed++
	}
	return nil
}

func (a *app) streamSplitCmd() *cobra.Command {
	var shard, at string
	c := &cobra.Command{
		Use:   "split NAME --shard ID [--at HASHKEY]",
		Short: "Split an open shard in two",
		Long: lines(
			"Close a shard and create two children: one with the hash keys below --at, one",
			"with --at and above. --at is a decimal hash key inside the shard's range,",
			"above its start; by default the middle of the range. Records put after the",
			"split go to the children; readers finish the parent first."),
		Example: lines(
			"  skiff stream split clicks --shard 0",
			"  skiff stream split clicks --shard shardId-000000000001 --at 170141183460469231731687303715884105728"),
		Args: checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			if shard == "" {
				return usagef(c, "--shard is required")
			}
			if c.Flags().Changed("at") {
				if err := checkHashKey(at); err != nil {
					return usagef(c, "invalid --at: %v", err)
				}
			}
			id := shardID(shard)
			cl, err := a.dial()
			if err != nil {
				return err
			}
			if at == "" {
				if at, err = a.middle(c.Context(), cl, args[0], id); err != nil {
					return err
				}
			}
			resp, err := cl.streams.SplitShard(c.Context(), connect.NewRequest(&skiffv1.SplitShardRequest{
				Stream: args[0], ShardToSplit: id, NewStartingHashKey: at,
			}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			_, err = fmt.Fprintf(a.stdout, "split shard %s of stream %s at hash key %s\n", id, args[0], at)
			return err
		},
	}
	c.Flags().StringVar(&shard, "shard", "", "the shard to split (an id, or its number)")
	c.Flags().StringVar(&at, "at", "", "the decimal hash key where the second child starts (default the middle of the shard's range)")
	return c
}

// middle is the hash key that splits a shard's range in halves: the
// second child starts at start + (end-start+1)/2.
func (a *app) middle(ctx context.Context, cl *clients, stream, shard string) (string, error) {
	resp, err := cl.streams.ListShards(ctx, connect.NewRequest(&skiffv1.ListShardsRequest{Stream: stream}))
	if err != nil {
		return "", err
	}
	for _, sh := range resp.Msg.GetShards() {
		if sh.GetShardId() != shard {
			continue
		}
		return middleHashKey(sh.GetStartingHashKey(), sh.GetEndingHashKey())
	}
	return "", fmt.Errorf("stream %s has no shard %s", stream, shard)
}

func middleHashKey(start, end string) (string, error) {
	lo, err := parseHashKey(start)
	if err != nil {
		return "", fmt.Errorf("the shard's starting hash key: %w", err)
	}
	hi, err := parseHashKey(end)
	if err != nil {
		return "", fmt.Errorf("the shard's ending hash key: %w", err)
	}
	if hi.Cmp(lo) <= 0 {
		return "", fmt.Errorf("the shard's range %s-%s holds a single hash key: it cannot be split", start, end)
	}
	half := new(big.Int).Sub(hi, lo)
	half.Add(half, big.NewInt(1)).Rsh(half, 1)
	return half.Add(half, lo).String(), nil
}

func (a *app) streamMergeCmd() *cobra.Command {
	var shard, adjacent string
	c := &cobra.Command{
		Use:   "merge NAME --shard A --adjacent B",
		Short: "Merge two open shards with adjacent hash key ranges",
		Long: lines(
			"Close two shards whose hash key ranges touch and create one child holding",
			"both ranges. Records put after the merge go to the child; readers finish",
			"both parents first."),
		Example: "  skiff stream merge clicks --shard 1 --adjacent 2",
		Args:    checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			switch {
			case shard == "":
				return usagef(c, "--shard is required")
			case adjacent == "":
				return usagef(c, "--adjacent is required")
			}
			a1, a2 := shardID(shard), shardID(adjacent)
			if a1 == a2 {
				return usagef(c, "--shard and --adjacent name the same shard %s", a1)
			}
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.streams.MergeShards(c.Context(), connect.NewRequest(&skiffv1.MergeShardsRequest{
				Stream: args[0], ShardToMerge: a1, AdjacentShardToMerge: a2,
			}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			_, err = fmt.Fprintf(a.stdout, "merged shards %s and %s of stream %s\n", a1, a2, args[0])
			return err
		},
	}
	c.Flags().StringVar(&shard, "shard", "", "one shard to merge (an id, or its number)")
	c.Flags().StringVar(&adjacent, "adjacent", "", "the shard whose hash key range is adjacent to --shard's")
	return c
}

func (a *app) streamScaleCmd() *cobra.Command {
	var shards int32
	c := &cobra.Command{
		Use:   "scale NAME --shards N",
		Short: "Rescale a stream uniformly to N open shards",
		Long: lines(
			"Split and merge shards so that the stream has N open shards (1-64) with equal",
			"hash key ranges. The old shards close; readers finish them first."),
		Example: "  skiff stream scale clicks --shards 8",
		Args:    checkArgs(cobra.ExactArgs(1)),
		RunE: func(c *cobra.Command, args []string) error {
			if !c.Flags().Changed("shards") {
				return usagef(c, "--shards is required")
			}
			cl, err := a.dial()
			if err != nil {
				return err
			}
			resp, err := cl.streams.UpdateShardCount(c.Context(), connect.NewRequest(&skiffv1.UpdateShardCountRequest{
				Stream: args[0], TargetShardCount: shards,
			}))
			if err != nil {
				return err
			}
			if a.json() {
				return writeJSON(a.stdout, resp.Msg)
			}
			_, err = fmt.Fprintf(a.stdout, "scaled stream %s from %d to %d open %s\n", args[0],
				resp.Msg.GetCurrentShardCount(), resp.Msg.GetTargetShardCount(), plural(int(resp.Msg.GetTargetShardCount()), "shard"))
			return err
		},
	}
	c.Flags().Int32Var(&shards, "shards", 0, "the number of open shards, 1-64")
	return c
}
