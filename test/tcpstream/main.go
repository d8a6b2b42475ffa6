// Command tcpstream is the client of the nested tier's TCP tests: it runs
// in the L1 (a static binary in its initramfs) against a TCP echo service
// in the L2 guest (busybox nc -l -e cat).
//
// The default mode holds ONE connection (dialled once; a refused dial
// before the connection exists is retried, nothing after it) and streams
// sequence-numbered records through the echo, at most -window bytes not yet
// echoed, checking every byte that comes back against what was sent. It
// stops sending when the file -stop appears (or after -max bytes), waits
// for the last echoes, half-closes, and requires the peer's end of stream
// with nothing extra. It reports the longest time without echoed bytes
// while some were outstanding (a stall), every stall of -report or more
// with its place in L1 uptime, and writes "RX TX" (bytes) to -progress as
// it goes, for the script that picks the kill moments.
//
// -rr N measures request/response latency instead (N sequential
// -size-byte requests, each echoed in full before the next); -sink BYTES
// and -source read throughput one way (-sink writes BYTES to a service
// that discards them; -source reads a service's output to its end).
//
// Output: one result line, "STREAM-OK ...", "RR-OK ...", "SINK-OK ...",
// "SOURCE-OK ..." or "...-FAIL <why>", plus "stall ..." lines; status 0
// only with an OK line.
package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// recordSize is the size of one stream record: "%010d %020x\n".
const recordSize = 32

// record writes record i of the stream into b (recordSize bytes): its
// number and a 64-bit mix of it, so that a shifted, dropped or repeated
// byte anywhere shows.
func record(b []byte, i uint64) {
	x := i + 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	x ^= x >> 31
	copy(b, fmt.Sprintf("%010d %020x\n", i%10_000_000_000, x))
}

// streamAt fills b with the stream's bytes from offset off.
func streamAt(b []byte, off uint64) {
	var rec [recordSize]byte
	for n := 0; n < len(b); {
		i, o := (off+uint64(n))/recordSize, (off+uint64(n))%recordSize
		record(rec[:], i)
		n += copy(b[n:], rec[o:])
	}
}

// uptime is the L1's /proc/uptime in seconds (the script's clock), or -1.
func uptime() float64 {
	b, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return -1
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return -1
	}
	v, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return -1
	}
	return v
}

type config struct {
	addr     string
	window   int
	stop     string
	max      int64
	progress string
	report   time.Duration
	giveUp   time.Duration
	rr       int
	size     int
	sink     int64
	source   bool
}

func main() {
	var c config
	flag.StringVar(&c.addr, "addr", "", "HOST:PORT of the echo service")
	flag.IntVar(&c.window, "window", 16<<10, "most bytes sent and not yet echoed")
	flag.StringVar(&c.stop, "stop", "", "stop sending once this file exists")
	flag.Int64Var(&c.max, "max", 64<<20, "stop sending after this many bytes")
	flag.StringVar(&c.progress, "progress", "", "write \"RX TX\" here as the stream goes")
	flag.DurationVar(&c.report, "report", time.Second, "print every stall at least this long")
	flag.DurationVar(&c.giveUp, "give-up", 5*time.Minute, "fail after this long without an echoed byte (a hang guard)")
	flag.IntVar(&c.rr, "rr", 0, "measure N request/response round trips instead of streaming")
	flag.IntVar(&c.size, "size", 64, "request size for -rr")
	flag.Int64Var(&c.sink, "sink", 0, "write this many bytes to a discarding service and time it")
	flag.BoolVar(&c.source, "source", false, "read the service's output to its end and time it")
	flag.Parse()
	if c.addr == "" || c.window <= 0 || c.size <= 0 {
		fmt.Fprintln(os.Stderr, "tcpstream: -addr HOST:PORT is required; -window and -size must be positive")
		os.Exit(2)
	}
	mode, run := "STREAM", stream
	switch {
	case c.rr > 0:
		mode, run = "RR", roundTrips
	case c.sink > 0:
		mode, run = "SINK", sink
	case c.source:
		mode, run = "SOURCE", source
	}
	conn, dials, err := dial(c.addr)
	if err != nil {
		fmt.Printf("%s-FAIL %v\n", mode, err)
		os.Exit(1)
	}
	defer conn.Close()
	res, err := run(c, conn)
	if err != nil {
		fmt.Printf("%s-FAIL connections=1 refused-dials=%d %s: %v\n", mode, dials-1, res, err)
		os.Exit(1)
	}
	fmt.Printf("%s-OK connections=1 refused-dials=%d %s\n", mode, dials-1, res)
}

// dial connects once; only a refused or unreachable dial (no connection
// yet) is retried, for up to a minute.
func dial(addr string) (*net.TCPConn, int, error) {
	deadline := time.Now().Add(time.Minute)
	for n := 1; ; n++ {
		c, err := net.DialTimeout("tcp", addr, 20*time.Second)
		if err == nil {
			return c.(*net.TCPConn), n, nil
		}
		if time.Now().After(deadline) {
			return nil, n, fmt.Errorf("dial %s: %w (%d tries)", addr, err, n)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// stallMeter tracks the gaps between echoed bytes while some are
// outstanding.
type stallMeter struct {
	report  time.Duration
	started bool
	last    time.Time
	longest time.Duration
	endedAt float64 // L1 uptime at the end of the longest stall
	lines   int
}

func (s *stallMeter) arrived(now time.Time) {
	gap := now.Sub(s.last)
	s.last = now
	if !s.started {
		// From the first echoed byte on: the connection's start is no stall.
		s.started = true
		return
	}
	if gap < s.report && gap <= s.longest {
		return
	}
	up := uptime()
	if gap > s.longest {
		s.longest, s.endedAt = gap, up
	}
	// Bounded: a few hundred lines at most.
	if gap >= s.report && s.lines < 200 {
		s.lines++
		fmt.Printf("stall ms=%d start=%.2f end=%.2f\n", gap.Milliseconds(), up-gap.Seconds(), up)
	}
}

func (s *stallMeter) String() string {
	return fmt.Sprintf("longest-stall-ms=%d longest-stall-end=%.2f", s.longest.Milliseconds(), s.endedAt)
}

// stream is the default mode; see the package comment.
func stream(c config, conn *net.TCPConn) (string, error) {
	var (
		sent, echoed atomic.Int64
		room         = make(chan struct{}, 1) // the reader made room in the window
		stopped      atomic.Bool
		writeErr     error
		wg           sync.WaitGroup
	)
	start := time.Now()
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 1024)
		for {
			if c.stop != "" {
				if _, err := os.Stat(c.stop); err == nil {
					break
				}
			}
			off := sent.Load()
			if off >= c.max {
				break
			}
			n := min(int64(len(buf)), int64(c.window)-(off-echoed.Load()), c.max-off)
			if n <= 0 {
				select {
				case <-room:
				case <-time.After(100 * time.Millisecond):
				}
				continue
			}
			streamAt(buf[:n], uint64(off))
			// Counted before the write: the echo may be read before
			// Write returns.
			sent.Add(n)
			if _, err := conn.Write(buf[:n]); err != nil {
				writeErr = fmt.Errorf("write at byte %d: %w", off, err)
				break
			}
		}
		stopped.Store(true)
	}()

	meter := &stallMeter{report: c.report, last: time.Now()}
	buf := make([]byte, 64<<10)
	want := make([]byte, len(buf))
	lastProgress := time.Time{}
	var readErr error
	halfClosed := false
	for {
		if stopped.Load() && !halfClosed && echoed.Load() == sent.Load() {
			// Everything sent came back: end our direction; the echo
			// service's cat then ends, and so does the stream.
			wg.Wait()
			if writeErr != nil {
				break
			}
			if err := conn.CloseWrite(); err != nil {
				readErr = fmt.Errorf("half-close: %w", err)
				break
			}
			halfClosed = true
		}
		conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		n, err := conn.Read(buf)
		now := time.Now()
		if n > 0 {
			off := echoed.Load()
			if off+int64(n) > sent.Load() {
				readErr = fmt.Errorf("%d bytes came back at byte %d, only %d were sent", n, off, sent.Load())
				break
			}
			streamAt(want[:n], uint64(off))
			if i := mismatch(buf[:n], want[:n]); i >= 0 {
				at := off + int64(i)
				rec := at / recordSize
				readErr = fmt.Errorf("byte %d (record %d) differs: got %q, want %q", at, rec,
					buf[i:min(n, i+recordSize)], want[i:min(n, i+recordSize)])
				break
			}
			echoed.Add(int64(n))
			meter.arrived(now)
			select {
			case room <- struct{}{}:
			default:
			}
			if c.progress != "" && now.Sub(lastProgress) >= 100*time.Millisecond {
				lastProgress = now
				writeProgress(c.progress, echoed.Load(), sent.Load())
			}
		}
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				if echoed.Load() == sent.Load() {
					// Nothing outstanding: not a stall.
					meter.last = now
				} else if now.Sub(meter.last) > c.giveUp {
					readErr = fmt.Errorf("no echoed byte for %v (a hang guard)", c.giveUp)
					break
				}
				continue
			}
			if err == io.EOF && halfClosed {
				break
			}
			readErr = fmt.Errorf("read at byte %d: %w", echoed.Load(), err)
			break
		}
	}
	stopped.Store(true)
	conn.Close()
	wg.Wait()
	if c.progress != "" {
		writeProgress(c.progress, echoed.Load(), sent.Load())
	}
	secs := time.Since(start).Seconds()
	res := fmt.Sprintf("sent=%d echoed=%d secs=%.2f %s", sent.Load(), echoed.Load(), secs, meter)
	if readErr == nil && writeErr != nil {
		readErr = writeErr
	}
	return res, readErr
}

func mismatch(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// writeProgress replaces the progress file at once (rename), so that a
// reader never sees half a line.
func writeProgress(path string, rx, tx int64) {
	tmp := path + ".tmp"
	if os.WriteFile(tmp, []byte(fmt.Sprintf("%d %d\n", rx, tx)), 0o644) == nil {
		os.Rename(tmp, path)
	}
}

// roundTrips sends c.rr requests of c.size stream bytes, one at a time,
// each echoed in full and checked before the next.
func roundTrips(c config, conn *net.TCPConn) (string, error) {
	conn.SetNoDelay(true)
	req, got := make([]byte, c.size), make([]byte, c.size)
	lat := make([]time.Duration, 0, c.rr)
	for i := 0; i < c.rr; i++ {
		streamAt(req, uint64(i*c.size))
		t0 := time.Now()
		if _, err := conn.Write(req); err != nil {
			return fmt.Sprintf("done=%d", i), err
		}
		conn.SetReadDeadline(t0.Add(c.giveUp))
		if _, err := io.ReadFull(conn, got); err != nil {
			return fmt.Sprintf("done=%d", i), err
		}
		lat = append(lat, time.Since(t0))
		if !bytes.Equal(req, got) {
			return fmt.Sprintf("done=%d", i), fmt.Errorf("request %d came back as %q", i, got)
		}
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	var sum time.Duration
	for _, d := range lat {
		sum += d
	}
	return fmt.Sprintf("n=%d size=%d mean-us=%d p50-us=%d p90-us=%d max-us=%d", len(lat), c.size,
		(sum / time.Duration(len(lat))).Microseconds(), lat[len(lat)/2].Microseconds(),
		lat[len(lat)*9/10].Microseconds(), lat[len(lat)-1].Microseconds()), nil
}

// sink writes c.sink stream bytes and waits for the service's end of
// stream (it closes after reading ours), timing the whole.
func sink(c config, conn *net.TCPConn) (string, error) {
	buf := make([]byte, 16<<10)
	t0 := time.Now()
	var n int64
	for n < c.sink {
		k := min(int64(len(buf)), c.sink-n)
		streamAt(buf[:k], uint64(n))
		if _, err := conn.Write(buf[:k]); err != nil {
			return fmt.Sprintf("bytes=%d", n), err
		}
		n += k
	}
	if err := conn.CloseWrite(); err != nil {
		return fmt.Sprintf("bytes=%d", n), err
	}
	conn.SetReadDeadline(time.Now().Add(c.giveUp))
	extra, err := io.Copy(io.Discard, conn)
	if err != nil {
		return fmt.Sprintf("bytes=%d", n), err
	}
	secs := time.Since(t0).Seconds()
	return fmt.Sprintf("bytes=%d extra=%d secs=%.3f", n, extra, secs), nil
}

// source reads the service's output to its end, timing it from the first
// byte's request (the dial) to the end of stream.
func source(c config, conn *net.TCPConn) (string, error) {
	t0 := time.Now()
	conn.SetReadDeadline(time.Now().Add(c.giveUp))
	n, err := io.Copy(io.Discard, conn)
	if err != nil {
		return fmt.Sprintf("bytes=%d", n), err
	}
	return fmt.Sprintf("bytes=%d secs=%.3f", n, time.Since(t0).Seconds()), nil
}
