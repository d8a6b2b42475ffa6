package migrate

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/guest/pvhtest"
	"github.com/ftkvm/ftkvm/vmm"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// Benchmarks of live migration and incremental checkpoints for a 256 MiB
// guest running a write-heavy workload, on the real /dev/kvm:
//
//	go test ./vmm/migrate -run '^$' -bench . -benchtime 3x
//
// The guest (32-bit, paging off, ring 0: emulated on the project's dev
// hosts, ~2 million instructions/s) first writes every page from 4 MiB to
// the end of memory, then loops over a working set, writing one word in
// every page of it per pass and doing a port write (an exit) after each
// pass. The value written changes every pass, so every pass dirties the
// whole working set.

const (
	benchMem  = 256 << 20
	benchBase = 4 << 20
	pageSize  = snapshot.PageSize
)

// writerKernel builds the guest: fill (0 = skip) pages from benchBase, then
// passes over ws pages forever.
func writerKernel(fill, ws uint32) []byte {
	le := binary.LittleEndian
	var c []byte
	imm32 := func(op []byte, v uint32) { c = append(c, op...); c = le.AppendUint32(c, v) }
	loop := func(n uint32) {
		imm32([]byte{0xbf}, benchBase) // mov edi, base
		imm32([]byte{0xb9}, n)         // mov ecx, n
		top := len(c)
		c = append(c, 0x89, 0x37)                         // mov [edi], esi
		c = append(c, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00) // add edi, 4096
		c = append(c, 0x49)                               // dec ecx
		c = append(c, 0x75, byte(top-(len(c)+2)))         // jnz top
	}
	imm32([]byte{0xbe}, 1) // mov esi, 1
	if fill > 0 {
		loop(fill)
	}
	outer := len(c)
	loop(ws)
	c = append(c, 0x46)                         // inc esi
	c = append(c, 0xe6, 0x80)                   // out 0x80, al
	c = append(c, 0xeb, byte(outer-(len(c)+2))) // jmp outer
	return pvhtest.Build(false, 0x200000, c, 0x200000, true)
}

// waitExits waits until the guest has made n exits (passes).
func waitExits(b *testing.B, m *vmm.Machine, n uint64) {
	for {
		var exits uint64
		if err := m.Do(func(m *vmm.Machine) error { exits = m.Stats.Exits; return nil }); err != nil {
			b.Fatal(err)
		}
		if exits >= n {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// BenchmarkMigrate migrates the guest live over 127.0.0.1 after it wrote
// all its memory, for working sets of several sizes. Metrics: the
// stop-and-copy pause (guest paused on the source until the destination
// confirmed), the total migration time, rounds, data sent, pages left for
// the stop-and-copy. Each iteration boots a new source; the destination's
// memory is checked against the source's final memory.
func BenchmarkMigrate(b *testing.B) {
	for _, wsMiB := range []uint32{1, 16, 64} {
		b.Run(fmt.Sprintf("mem=256MiB/ws=%dMiB", wsMiB), func(b *testing.B) {
			kernel := writerKernel((benchMem-benchBase)/pageSize, wsMiB<<20/pageSize)
			var pause, total time.Duration
			var sent int64
			var rounds, dirty int
			for range b.N {
				b.StopTimer()
				src, err := vmm.New(vmm.Config{Kernel: kernel, MemSize: benchMem, Console: io.Discard})
				if err != nil {
					b.Fatal(err)
				}
				done := make(chan error, 1)
				go func() { _, err := src.Run(); done <- err }()
				waitExits(b, src, 3) // the fill pass and a couple of working-set passes
				l, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					b.Fatal(err)
				}
				type recv struct {
					t   Target
					err error
				}
				rc := make(chan recv, 1)
				go func() {
					t, _, _, err := Receive(l, func(h snapshot.Header) (Target, error) {
						return vmm.NewEmpty(vmm.Config{MemSize: h.MemSize, Console: io.Discard})
					}, nil, ReceiveOptions{})
					rc <- recv{t, err}
				}()
				b.StartTimer()
				res, err := Send(src, l.Addr().String(), Options{})
				b.StopTimer()
				if err != nil {
					b.Fatal(err)
				}
				<-done
				r := <-rc
				if r.err != nil {
					b.Fatal(r.err)
				}
				dst := r.t.(*vmm.Machine)
				if sha256.Sum256(src.Memory()) != sha256.Sum256(dst.Memory()) {
					b.Fatal("destination memory differs from the source's")
				}
				l.Close()
				src.Close()
				dst.Close()
				pause += res.Pause
				total += res.Total
				sent += res.Bytes
				rounds += res.Rounds
				dirty += res.Dirty
			}
			n := float64(b.N)
			b.ReportMetric(float64(pause.Microseconds())/1000/n, "pause-ms")
			b.ReportMetric(float64(total.Microseconds())/1000/n, "total-ms")
			b.ReportMetric(float64(rounds)/n, "rounds")
			b.ReportMetric(float64(sent)/(1<<20)/n, "MiB-sent")
			b.ReportMetric(float64(dirty)/n, "pages-at-stop")
		})
	}
}

// ckptEnv takes an incremental checkpoint at every guest exit (the guest
// exits once per pass over its working set) and times it.
type ckptEnv struct {
	*vmm.LiveEnv
	m       *vmm.Machine
	cp      vmm.Checkpoint
	want    int
	count   int
	took    time.Duration
	encode  time.Duration
	pages   int
	started time.Time
}

func (e *ckptEnv) At(p vmm.Point, t vmm.Target) error {
	if p.Kind == vmm.PointExit {
		e.m.Post(e.checkpoint)
	}
	return e.LiveEnv.At(p, t)
}

func (e *ckptEnv) checkpoint(m *vmm.Machine) error {
	t0 := time.Now()
	if err := m.Checkpoint(&e.cp); err != nil {
		return err
	}
	d := time.Since(t0)
	t1 := time.Now()
	if err := e.cp.Write(snapshot.NewWriter(io.Discard)); err != nil {
		return err
	}
	enc := time.Since(t1)
	e.count++
	if e.count > 1 { // the first one is the full base
		e.took += d
		e.encode += enc
		e.pages += e.cp.N
	}
	if e.count > e.want {
		m.Stop("enough checkpoints")
	}
	return nil
}

// BenchmarkCheckpoint measures Machine.Checkpoint (dirty log, page copies,
// every register set and device) against the number of dirty pages: the
// guest writes n pages between two checkpoints. ns/op is one checkpoint;
// encode-ns/op is writing it as a stream (to io.Discard).
func BenchmarkCheckpoint(b *testing.B) {
	for _, n := range []uint32{1, 16, 256, 4096, 16384} {
		b.Run(fmt.Sprintf("mem=256MiB/dirty=%d", n), func(b *testing.B) {
			env := &ckptEnv{LiveEnv: vmm.NewLiveEnv(nil), want: b.N}
			m, err := vmm.New(vmm.Config{Kernel: writerKernel(0, n), MemSize: benchMem, Console: io.Discard, Env: env})
			if err != nil {
				b.Fatal(err)
			}
			defer m.Close()
			env.m = m
			b.ResetTimer()
			if _, err := m.Run(); err == nil || env.count <= b.N {
				b.Fatalf("run: %v after %d checkpoints", err, env.count)
			}
			b.StopTimer()
			per := float64(env.took.Nanoseconds()) / float64(b.N)
			b.ReportMetric(per, "ns/op")
			b.ReportMetric(float64(env.encode.Nanoseconds())/float64(b.N), "encode-ns/op")
			b.ReportMetric(float64(env.pages)/float64(b.N), "pages/op")
			if env.pages > 0 {
				b.ReportMetric(float64(env.took.Nanoseconds())/float64(env.pages), "ns/page")
			}
		})
	}
}
