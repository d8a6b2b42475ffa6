package migrate

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/vmm"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// In-process tests of snapshot files and live migration on the real
// /dev/kvm: two machines in one test process, over 127.0.0.1.

var (
	testosOnce sync.Once
	testosELF  []byte
	testosErr  error
)

func testos(t testing.TB) []byte {
	t.Helper()
	testosOnce.Do(func() {
		dir := filepath.Join("..", "..", "guest", "testos")
		if out, err := exec.Command("make", "-s", "-C", dir).CombinedOutput(); err != nil {
			testosErr = fmt.Errorf("make testos: %v\n%s", err, out)
			return
		}
		testosELF, testosErr = os.ReadFile(filepath.Join(dir, "testos.elf"))
	})
	if testosErr != nil {
		t.Fatal(testosErr)
	}
	return testosELF
}

// console is a goroutine-safe console buffer.
type console struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (c *console) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.Write(p)
}

func (c *console) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String()
}

type running struct {
	m    *vmm.Machine
	out  *console
	done chan error
	st   int
}

func start(t *testing.T, m *vmm.Machine, out *console) *running {
	r := &running{m: m, out: out, done: make(chan error, 1)}
	go func() {
		st, err := m.Run()
		r.st = st
		r.done <- err
	}()
	return r
}

func (r *running) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-r.done:
		return err
	case <-time.After(2 * time.Minute):
		t.Fatalf("guest hung; console:\n%s", r.out.String())
	}
	return nil
}

func bootTestOS(t *testing.T, cmdline string) *running {
	t.Helper()
	out := &console{}
	m, err := vmm.New(vmm.Config{Kernel: testos(t), Cmdline: cmdline, MemSize: 64 << 20, Console: out})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return start(t, m, out)
}

// waitFor waits until the console holds s.
func waitFor(t *testing.T, r *running, s string) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); !strings.Contains(r.out.String(), s); {
		if time.Now().After(deadline) {
			t.Fatalf("console never showed %q:\n%s", s, r.out.String())
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func emptyBuilder(out io.Writer) (Build, *[]*vmm.Machine) {
	var made []*vmm.Machine
	return func(h snapshot.Header) (Target, error) {
		m, err := vmm.NewEmpty(vmm.Config{MemSize: h.MemSize, Console: out})
		if err != nil {
			return nil, err
		}
		made = append(made, m)
		return m, nil
	}, &made
}

// checkCompute checks a compute run's output: every checksum line, in
// order, exactly once, then PASS.
func checkCompute(t *testing.T, out string, mib, every int) {
	t.Helper()
	var sums []string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "compute mib=") {
			sums = append(sums, strings.Fields(l)[1])
		}
	}
	var want []string
	for k := every; k <= mib; k += every {
		want = append(want, fmt.Sprintf("mib=%d", k))
	}
	if strings.Join(sums, " ") != strings.Join(want, " ") || !strings.HasSuffix(out, "testos: PASS\n") {
		t.Fatalf("checksum lines %v, want %v; output:\n%s", sums, want, out)
	}
}

func TestSnapshotFileRoundTrip(t *testing.T) {
	const cmd = "workload=compute mib=96 every=8 hz=100"
	src := bootTestOS(t, cmd)
	waitFor(t, src, "compute mib=16 ")
	path := filepath.Join(t.TempDir(), "snap")
	res, err := WriteFile(src.m, path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := src.m.Resume(); err != nil {
		t.Fatal(err)
	}
	t.Logf("snapshot: %d bytes, %d pages, paused %v", res.Bytes, res.Pages, res.Pause)
	if err := src.wait(t); err != nil || src.st != 0 {
		t.Fatalf("source: %d %v", src.st, err)
	}
	checkCompute(t, src.out.String(), 96, 8)

	out := &console{}
	build, _ := emptyBuilder(out)
	tgt, st, err := ReadFile(path, build, nil)
	if err != nil {
		t.Fatal(err)
	}
	m := tgt.(*vmm.Machine)
	defer m.Close()
	dst := start(t, m, out)
	if err := dst.wait(t); err != nil || dst.st != 0 {
		t.Fatalf("restored: %d %v\n%s", dst.st, err, out.String())
	}
	whole := src.out.String()[:st.Machine.Stats.ConsoleBytes] + out.String()
	checkCompute(t, whole, 96, 8)
}

func TestMigrateLive(t *testing.T) {
	// Long enough (seconds) that the guest is still computing when the
	// migration ends, even on a fast, quiet machine.
	const cmd = "workload=compute mib=2048 every=128 hz=100"
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	out := &console{}
	build, _ := emptyBuilder(out)
	type recv struct {
		t   Target
		err error
	}
	rc := make(chan recv, 1)
	go func() {
		tgt, _, _, err := Receive(l, build, nil, ReceiveOptions{})
		rc <- recv{tgt, err}
	}()
	src := bootTestOS(t, cmd)
	waitFor(t, src, "compute mib=128 ")
	var rounds []Progress
	res, err := Send(src.m, l.Addr().String(), Options{Progress: func(p Progress) { rounds = append(rounds, p) }})
	if err != nil {
		t.Fatal(err)
	}
	if err := src.wait(t); !errors.Is(err, vmm.ErrStopped) {
		t.Fatalf("source Run returned %v, want ErrStopped", err)
	}
	r := <-rc
	if r.err != nil {
		t.Fatal(r.err)
	}
	m := r.t.(*vmm.Machine)
	defer m.Close()
	dst := start(t, m, out)
	if err := dst.wait(t); err != nil || dst.st != 0 {
		t.Fatalf("destination: %d %v\n%s", dst.st, err, out.String())
	}
	checkCompute(t, src.out.String()+out.String(), 2048, 128)
	t.Logf("migrated: %d bytes in %d rounds, %d pages at stop, pause %v, total %v",
		res.Bytes, res.Rounds, res.Dirty, res.Pause, res.Total)
}

// A destination that dies mid-stream: Send fails, the guest runs on.
func TestMigrateDestinationDies(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		conn, err := l.Accept()
		if err != nil {
			return
		}
		fr := snapshot.NewReader(conn)
		fr.Next() // hello
		snapshot.NewWriter(conn).WriteFrame(snapshot.FrameReady, nil)
		fr.Next() // stream header
		fr.Next() // some pages
		conn.(*net.TCPConn).SetLinger(0)
		conn.Close() // reset: the destination died
	}()
	const cmd = "workload=compute mib=64 every=8 hz=100"
	src := bootTestOS(t, cmd)
	waitFor(t, src, "compute mib=8 ")
	_, err = Send(src.m, l.Addr().String(), Options{Bandwidth: 4 << 20})
	if err == nil {
		t.Fatal("Send succeeded to a destination that died")
	}
	t.Logf("Send: %v", err)
	if st := src.m.ControlStats(); st.Paused {
		t.Fatal("guest left paused")
	}
	if err := src.wait(t); err != nil || src.st != 0 {
		t.Fatalf("source after the failed migration: %d %v", src.st, err)
	}
	checkCompute(t, src.out.String(), 64, 8)
}

// A destination that refuses the state: its reason reaches the source.
func TestMigrateRefused(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	rc := make(chan error, 1)
	go func() {
		_, _, _, err := Receive(l, func(h snapshot.Header) (Target, error) {
			return &fakeTarget{mem: make([]byte, h.MemSize), installErr: errors.New("no room for this guest")}, nil
		}, nil, ReceiveOptions{})
		rc <- err
	}()
	// A guest that does not end by itself, so the refusal, however late a
	// loaded host makes it, comes while the guest runs.
	src := bootTestOS(t, "workload=counter lines=100000000 hz=200")
	_, err = Send(src.m, l.Addr().String(), Options{})
	if err == nil || !strings.Contains(err.Error(), "no room for this guest") {
		t.Fatalf("Send: %v", err)
	}
	if err := <-rc; err == nil {
		t.Fatal("Receive succeeded")
	}
	// The source runs on after the refused migration.
	waitFor(t, src, fmt.Sprintf("counter %d ", lastCounter(src.out.String())+3))
	src.m.Post(func(m *vmm.Machine) error { m.Stop("the test has seen enough"); return nil })
	if err := src.wait(t); !errors.Is(err, vmm.ErrStopped) {
		t.Fatalf("source after the refused migration: %d %v", src.st, err)
	}
}

// A source that dies mid-stream: Serve fails with a clear error, closes
// what it built and never installs.
func TestMigrateSourceDies(t *testing.T) {
	var stream bytes.Buffer
	fw := snapshot.NewWriter(&stream)
	h := snapshot.Header{Version: snapshot.Version, Kind: snapshot.KindMigration, MemSize: 4 << 20}
	fw.WriteFrame(snapshot.FrameHeader, snapshot.EncodeHeader(nil, &h))
	sw, _ := snapshot.NewStreamWriter(fw, h)
	page := bytes.Repeat([]byte{7}, snapshot.PageSize)
	for pfn := uint64(0); pfn < 300; pfn++ {
		sw.Page(pfn, page, true)
	}
	sw.Flush()
	whole := stream.Bytes()
	for _, cut := range []int{len(whole), len(whole) - 1000, 40} {
		ft := &fakeTarget{mem: make([]byte, h.MemSize)}
		_, _, err := Serve(rw{bytes.NewReader(whole[:cut]), io.Discard}, func(snapshot.Header) (Target, error) { return ft, nil }, nil)
		if err == nil || !strings.Contains(err.Error(), "the source went away mid-migration") {
			t.Fatalf("cut at %d: %v", cut, err)
		}
		if !ft.closed || ft.installed {
			t.Fatalf("cut at %d: closed %v installed %v", cut, ft.closed, ft.installed)
		}
	}
}

type rw struct {
	io.Reader
	io.Writer
}

type fakeTarget struct {
	mem        []byte
	installErr error
	installed  bool
	closed     bool
}

func (f *fakeTarget) Memory() []byte { return f.mem }
func (f *fakeTarget) Install(*snapshot.State) error {
	if f.installErr != nil {
		return f.installErr
	}
	f.installed = true
	return nil
}
func (f *fakeTarget) Close() error { f.closed = true; return nil }

// TestRestoredStateMatchesSnapshotFile: a snapshot file taken at a random
// moment, restored into a fresh machine, whose complete state, captured at
// once, must equal the state in the file field by field (but the TSC MSR,
// which follows the host's TSC), and whose memory must equal the file's.
func TestRestoredStateMatchesSnapshotFile(t *testing.T) {
	for _, live := range []bool{false, true} {
		t.Run(fmt.Sprintf("live=%v", live), func(t *testing.T) {
			src := bootTestOS(t, "workload=interleave lines=40 hz=250")
			time.Sleep(time.Duration(20+time.Now().UnixNano()%150) * time.Millisecond)
			path := filepath.Join(t.TempDir(), "snap")
			if _, err := WriteFile(src.m, path, Options{Live: live}); err != nil {
				t.Fatal(err)
			}
			src.m.Resume()
			src.wait(t)

			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			var fileMem []byte
			want, err := snapshot.ReadFile(f, func(h snapshot.Header) ([]byte, error) {
				fileMem = make([]byte, h.MemSize)
				return fileMem, nil
			})
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			build, _ := emptyBuilder(io.Discard)
			tgt, _, err := ReadFile(path, build, nil)
			if err != nil {
				t.Fatal(err)
			}
			m := tgt.(*vmm.Machine)
			defer m.Close()
			var got snapshot.State
			if err := m.CaptureState(&got); err != nil {
				t.Fatal(err)
			}
			for i := range want.VCPU.MSRs {
				if want.VCPU.MSRs[i].Index == 0x10 && got.VCPU.MSRs[i].Index == 0x10 {
					want.VCPU.MSRs[i].Data = got.VCPU.MSRs[i].Data
				}
			}
			got.Header.Created, want.Header.Created = 0, 0
			got.Header.Kind = want.Header.Kind
			if !reflect.DeepEqual(*want, got) {
				t.Fatalf("restored state differs from the file's:\nfile:     %+v\nrestored: %+v", *want, got)
			}
			if !bytes.Equal(fileMem, m.Memory()) {
				t.Fatal("restored memory differs from the file's")
			}
			t.Logf("state equal: rip %#x, %d exits, %d MSRs, halted %v, virtual time %v",
				got.VCPU.Regs.RIP, got.Machine.Stats.Exits, len(got.VCPU.MSRs), got.Machine.Halted, time.Duration(got.Env.Now))
		})
	}
}
