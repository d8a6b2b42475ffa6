package vmm

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/kvm"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// syncBuffer is a console buffer the test may read while the guest writes.
type syncBuffer struct {
	ch  chan struct{}
	buf bytes.Buffer
}

func newSyncBuffer() *syncBuffer { return &syncBuffer{ch: make(chan struct{}, 1)} }

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.ch <- struct{}{}
	defer func() { <-b.ch }()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.ch <- struct{}{}
	defer func() { <-b.ch }()
	return b.buf.String()
}

// startTestOS runs testos with cmdline in a LiveEnv on its own goroutine.
func startTestOS(t *testing.T, cmdline string, mem uint64) (*Machine, *syncBuffer, chan runResult) {
	t.Helper()
	kernel := buildTestOS(t)
	out := newSyncBuffer()
	m, err := New(Config{Kernel: kernel, Cmdline: cmdline, MemSize: mem, Console: out,
		Env: NewLiveEnv(nil), WallClock: time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	done := make(chan runResult, 1)
	go func() {
		status, err := m.Run()
		done <- runResult{status, err}
	}()
	return m, out, done
}

type runResult struct {
	status int
	err    error
}

func waitRun(t *testing.T, done chan runResult, out *syncBuffer) runResult {
	t.Helper()
	select {
	case r := <-done:
		return r
	case <-time.After(2 * time.Minute):
		t.Fatalf("guest hung; console:\n%s", out.String())
	}
	return runResult{}
}

// captureAll takes the state and a copy of memory on the vCPU thread.
func captureAll(t *testing.T, m *Machine) (*snapshot.State, []byte) {
	t.Helper()
	var st snapshot.State
	var mem []byte
	err := m.Do(func(m *Machine) error {
		mem = bytes.Clone(m.Memory())
		return m.CaptureState(&st)
	})
	if err != nil {
		t.Fatal(err)
	}
	return &st, mem
}

// compareStates reports every difference between two captured states, but
// the time-stamp and the MSRs that follow host time.
func compareStates(a, b *snapshot.State) []string {
	var diffs []string
	d := func(what string, x, y any) {
		if !reflect.DeepEqual(x, y) {
			diffs = append(diffs, fmt.Sprintf("%s:\n  snapshot: %+v\n  restored: %+v", what, x, y))
		}
	}
	d("header.MemSize", a.Header.MemSize, b.Header.MemSize)
	d("CPUID", a.CPUID, b.CPUID)
	d("regs", a.VCPU.Regs, b.VCPU.Regs)
	d("sregs", a.VCPU.Sregs, b.VCPU.Sregs)
	d("FPU", a.VCPU.FPU, b.VCPU.FPU)
	d("XSAVE", a.VCPU.XSave, b.VCPU.XSave)
	d("XCRs", a.VCPU.XCRs, b.VCPU.XCRs)
	d("vCPU events", a.VCPU.Events, b.VCPU.Events)
	d("debug registers", a.VCPU.DebugRegs, b.VCPU.DebugRegs)
	d("MP state", a.VCPU.MPState, b.VCPU.MPState)
	if len(a.VCPU.MSRs) != len(b.VCPU.MSRs) {
		d("MSR list", a.VCPU.MSRs, b.VCPU.MSRs)
	} else {
		for i, x := range a.VCPU.MSRs {
			y := b.VCPU.MSRs[i]
			if x.Index == msrIA32TSC && y.Index == msrIA32TSC {
				continue // the host's TSC moved on between the two captures
			}
			d(fmt.Sprintf("MSR %#x", x.Index), x, y)
		}
	}
	d("devices", a.Devices, b.Devices)
	d("machine", a.Machine, b.Machine)
	d("environment", a.Env, b.Env)
	return diffs
}

// TestRestoredStateMatchesSnapshot captures a running guest at a random
// moment, installs the state and memory into a fresh machine, captures that
// machine at once, and compares the two states field by field; then runs
// the restored guest to the end.
func TestRestoredStateMatchesSnapshot(t *testing.T) {
	for _, cmdline := range []string{
		"workload=counter lines=30 hz=200",
		"workload=compute mib=512 every=64 hz=100",
		"workload=interleave lines=30 hz=250",
	} {
		t.Run(strings.Fields(cmdline)[0], func(t *testing.T) {
			src, srcOut, srcDone := startTestOS(t, cmdline, 64<<20)
			time.Sleep(time.Duration(20+rand.IntN(150)) * time.Millisecond)
			st, mem := captureAll(t, src)
			if r := waitRun(t, srcDone, srcOut); r.err != nil || r.status != 0 {
				t.Fatalf("source: status %d, %v\n%s", r.status, r.err, srcOut.String())
			}

			out := newSyncBuffer()
			dst, err := NewEmpty(Config{MemSize: st.Header.MemSize, Console: out, Env: NewLiveEnv(nil)})
			if err != nil {
				t.Fatal(err)
			}
			defer dst.Close()
			copy(dst.Memory(), mem)
			if err := dst.Install(st); err != nil {
				t.Fatal(err)
			}
			var got snapshot.State
			if err := dst.CaptureState(&got); err != nil {
				t.Fatal(err)
			}
			if diffs := compareStates(st, &got); len(diffs) > 0 {
				t.Fatalf("restored state differs from the snapshot:\n%s", strings.Join(diffs, "\n"))
			}
			if sha256.Sum256(dst.Memory()) != sha256.Sum256(mem) {
				t.Fatal("restored memory differs")
			}
			t.Logf("snapshot at %d exits, virtual time %v, rip %#x, %d MSRs, halted %v",
				st.Machine.Stats.Exits, time.Duration(st.Env.Now), st.VCPU.Regs.RIP, len(st.VCPU.MSRs), st.Machine.Halted)

			status, err := dst.Run()
			if err != nil || status != 0 {
				t.Fatalf("restored guest: status %d, %v\n%s", status, err, out.String())
			}
			whole := srcOut.String()
			cut := int(st.Machine.Stats.ConsoleBytes)
			if !strings.HasSuffix(out.String(), "testos: PASS\n") {
				t.Fatalf("restored guest did not pass:\n%s", out.String())
			}
			if strings.HasPrefix(cmdline, "workload=compute") {
				// Deterministic apart from the ticker lines.
				if strip(whole[cut:]) != strip(out.String()) {
					t.Fatalf("restored output differs:\nsource after the snapshot:\n%s\nrestored:\n%s", whole[cut:], out.String())
				}
			}
		})
	}
}

func strip(s string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		if !strings.HasPrefix(l, "compute tick ") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

var _ = kvm.MPStateRunnable

// A pending exception captured without KVM_CAP_EXCEPTION_PAYLOAD is kept
// as the injected one, which is what KVM_SET_VCPU_EVENTS installs; with
// the payload flag, the events are KVM's own and stay as they are.
func TestNormalizeEvents(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in, out kvm.ExceptionState
		flags   uint32
	}{
		{"none", kvm.ExceptionState{}, kvm.ExceptionState{}, 0},
		{"injected", kvm.ExceptionState{Injected: 1, Nr: 6}, kvm.ExceptionState{Injected: 1, Nr: 6}, 0},
		{"pending folded", kvm.ExceptionState{Injected: 1, Pending: 1, Nr: 6}, kvm.ExceptionState{Injected: 1, Nr: 6}, 0},
		{"pending only", kvm.ExceptionState{Pending: 1, Nr: 13, HasErrorCode: 1, ErrorCode: 8}, kvm.ExceptionState{Injected: 1, Nr: 13, HasErrorCode: 1, ErrorCode: 8}, 0},
		{"payload ABI", kvm.ExceptionState{Pending: 1, Nr: 14}, kvm.ExceptionState{Pending: 1, Nr: 14}, kvm.VCPUEventValidPayload},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := kvm.VCPUEvents{Exception: tc.in, Flags: tc.flags, ExceptionHasPayload: 1, ExceptionPayload: 0x1000}
			normalizeEvents(&e)
			if e.Exception != tc.out {
				t.Errorf("exception %+v, want %+v", e.Exception, tc.out)
			}
			if tc.flags == 0 && (e.ExceptionHasPayload != 0 || e.ExceptionPayload != 0) {
				t.Errorf("payload kept without the payload ABI: %d %#x", e.ExceptionHasPayload, e.ExceptionPayload)
			}
		})
	}
}
