package migrate

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/vmm"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// Strangers on a receiving port (closed at once, random bytes, a stream
// that is not a migration, a frame cut short, one that sends nothing) are
// reported and ignored; then a real migration arrives and is received,
// and a connection during it is refused as busy.
func TestReceiveIgnoresStrangers(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	addr := l.Addr().String()
	var mu sync.Mutex
	var why []string
	out := &console{}
	build, _ := emptyBuilder(out)
	type recv struct {
		t   Target
		err error
	}
	rc := make(chan recv, 1)
	go func() {
		tgt, _, _, err := Receive(l, build, nil, ReceiveOptions{
			HelloTimeout: 300 * time.Millisecond,
			Stranger: func(from net.Addr, err error) {
				mu.Lock()
				why = append(why, err.Error())
				mu.Unlock()
			},
		})
		rc <- recv{tgt, err}
	}()
	var snapHello bytes.Buffer
	h := snapshot.Header{Version: snapshot.Version, Kind: snapshot.KindSnapshot, MemSize: 64 << 20}
	if err := snapshot.NewWriter(&snapHello).WriteFrame(snapshot.FrameHeader, snapshot.EncodeHeader(nil, &h)); err != nil {
		t.Fatal(err)
	}
	strangers := []struct {
		send []byte
		want string
	}{
		{nil, "closed before the migration began"},
		{[]byte("SSH-2.0-OpenSSH_9.2\r\n"), ""},
		{snapHello.Bytes(), "where a migration was expected"},
		{snapHello.Bytes()[:7], ""},
		{nil, "no migration hello within"}, // silent: held open
	}
	var held net.Conn
	for i, s := range strangers {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.Write(s.send)
		if i == len(strangers)-1 {
			held = c
			continue
		}
		c.(*net.TCPConn).CloseWrite()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		var b [256]byte
		for {
			if _, err := c.Read(b[:]); err != nil {
				break // closed by the destination
			}
		}
		c.Close()
	}
	defer held.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		n := len(why)
		mu.Unlock()
		if n == len(strangers) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d strangers reported: %q", n, why)
		}
		time.Sleep(5 * time.Millisecond)
	}
	mu.Lock()
	all := strings.Join(why, "\n")
	mu.Unlock()
	for _, s := range strangers {
		if !strings.Contains(all, s.want) {
			t.Errorf("no stranger reported as %q:\n%s", s.want, all)
		}
	}
	select {
	case r := <-rc:
		t.Fatalf("Receive returned after strangers: %v", r.err)
	default:
	}

	// A guest that does not end by itself: the migration, however long
	// a loaded host makes it, completes while the guest runs.
	src := bootTestOS(t, "workload=counter lines=100000000 hz=200")
	waitFor(t, src, "counter 2 ")
	res, err := Send(src.m, addr, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := src.wait(t); err == nil {
		t.Fatal("the source ran on after the migration")
	}
	last := lastCounter(src.out.String())
	r := <-rc
	if r.err != nil {
		t.Fatal(r.err)
	}
	m := r.t.(*vmm.Machine)
	defer m.Close()
	dst := start(t, m, out)
	// The destination goes on where the source stopped: the two consoles
	// joined count on, no line lost or repeated at the seam.
	waitFor(t, dst, fmt.Sprintf("counter %d ", last+5))
	m.Post(func(m *vmm.Machine) error { m.Stop("the test has seen enough"); return nil })
	if err := dst.wait(t); !errors.Is(err, vmm.ErrStopped) {
		t.Fatalf("destination: %d %v\n%s", dst.st, err, out.String())
	}
	joined := src.out.String() + out.String()
	n := counterLines(joined)
	for i := range n {
		if n[i] != n[0]+i {
			t.Fatalf("the consoles joined count %v:\n%s", n, joined)
		}
	}
	if len(n) == 0 || n[len(n)-1] < last+5 {
		t.Fatalf("the consoles joined count %v:\n%s", n, joined)
	}
	t.Logf("migrated %d bytes after %d strangers", res.Bytes, len(strangers))
}

// A second migration while one is served is refused as busy.
func TestGreetBusy(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	var busy atomic.Bool
	busy.Store(true)
	go func() {
		h := snapshot.Header{Version: snapshot.Version, Kind: snapshot.KindMigration, MemSize: 2 << 20}
		snapshot.NewWriter(a).WriteFrame(snapshot.FrameHeader, snapshot.EncodeHeader(nil, &h))
		snapshot.NewReader(a).Next()
	}()
	_, err := greet(b, time.Second, &busy)
	if err == nil || !strings.Contains(err.Error(), "busy") {
		t.Fatalf("greet while busy: %v", err)
	}
}

// counterLines are the numbers of a console's whole "counter N ..." lines,
// in order (a last line without its newline is not whole).
func counterLines(out string) []int {
	var n []int
	lines := strings.Split(out, "\n")
	for _, line := range lines[:len(lines)-1] {
		var k int
		if _, err := fmt.Sscanf(line, "counter %d ", &k); err == nil {
			n = append(n, k)
		}
	}
	return n
}

func lastCounter(out string) int {
	n := counterLines(out)
	if len(n) == 0 {
		return -1
	}
	return n[len(n)-1]
}
