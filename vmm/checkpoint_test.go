package vmm

import (
	"bytes"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// ckptEnv takes a checkpoint at every 50th guest exit (through Post) and at
// some kick points (directly), applies each one to two shadow memories,
// one directly and one through the encoded stream, and checks both against
// guest memory, which does not change while the checkpoint is taken.
type ckptEnv struct {
	*LiveEnv
	t        *testing.T
	m        *Machine
	cp       Checkpoint
	shadow   []byte
	streamed []byte
	n, pages int
	marked   bool
	err      error
}

func (e *ckptEnv) At(p Point, t Target) error {
	switch {
	case p.Kind == PointKick && e.m.Quiescent() && e.n%3 == 1:
		if err := e.take(e.m); err != nil {
			return err
		}
	case p.Kind == PointExit && p.Exits%50 == 0:
		e.m.Post(e.take)
	}
	return e.LiveEnv.At(p, t)
}

func (e *ckptEnv) take(m *Machine) error {
	if e.n == 3 {
		// The VMM writes guest memory itself (as a DMA-ing device would)
		// and says so; the next checkpoint must carry that page.
		copy(m.Memory()[60<<20:], "written by the VMM")
		m.MarkDirty(60<<20, 18)
		e.marked = true
	}
	if err := m.Checkpoint(&e.cp); err != nil {
		return err
	}
	if e.n == 0 && (!e.cp.Full || e.cp.N != int(m.Pages())) {
		e.t.Errorf("first checkpoint: full %v, %d pages", e.cp.Full, e.cp.N)
	}
	i := 0
	ForEachPage(e.cp.Dirty, func(pfn uint64) {
		copy(e.shadow[pfn*snapshot.PageSize:][:snapshot.PageSize], e.cp.Pages[i*snapshot.PageSize:])
		i++
	})
	var buf bytes.Buffer
	if err := e.cp.Write(snapshot.NewWriter(&buf)); err != nil {
		return err
	}
	st, err := snapshot.NewStreamReader(snapshot.NewReader(&buf), func(snapshot.Header) ([]byte, error) { return e.streamed, nil }).Read()
	if err != nil {
		return err
	}
	if st.Machine.Stats != m.Stats || st.VCPU.Regs != e.cp.State.VCPU.Regs {
		e.t.Errorf("checkpoint %d: streamed state differs", e.n)
	}
	if !bytes.Equal(e.shadow, m.Memory()) || !bytes.Equal(e.streamed, m.Memory()) {
		e.t.Errorf("checkpoint %d (%d pages): shadow memory differs from guest memory", e.n, e.cp.N)
	}
	if e.marked && e.n == 3 && !bytes.Equal(e.shadow[60<<20:][:18], []byte("written by the VMM")) {
		e.t.Errorf("the page marked dirty by the VMM is not in the checkpoint")
	}
	e.n++
	if !e.cp.Full {
		e.pages += e.cp.N
	}
	return nil
}

func TestIncrementalCheckpoints(t *testing.T) {
	env := &ckptEnv{LiveEnv: NewLiveEnv(nil), t: t, shadow: make([]byte, 64<<20), streamed: make([]byte, 64<<20)}
	// Garbage in the shadows: the first checkpoint must overwrite all.
	for i := range env.shadow {
		env.shadow[i], env.streamed[i] = 0xa5, 0x5a
	}
	var out bytes.Buffer
	m, err := New(Config{Kernel: buildTestOS(t), Cmdline: "workload=interleave lines=30 hz=250", MemSize: 64 << 20,
		Console: &out, Env: env, WallClock: time.Unix(0, 0)})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	env.m = m
	if status, err := m.Run(); err != nil || status != 0 {
		t.Fatalf("status %d, %v\n%s", status, err, out.String())
	}
	if env.n < 5 {
		t.Fatalf("only %d checkpoints", env.n)
	}
	t.Logf("%d checkpoints, %d pages in the incremental ones", env.n, env.pages)
}
