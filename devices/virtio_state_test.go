package devices

import (
	"bytes"
	"crypto/sha256"
	"os"
	"path/filepath"
	"testing"
)

// TestTransportStateRoundTrip captures a configured transport after a
// request, installs the state into a fresh transport over a copy of guest
// memory and a copy of the image taken at the capture, and checks that the
// next requests are served identically by both: same used entries, same
// guest memory, same images, same state.
func TestTransportStateRoundTrip(t *testing.T) {
	img := newTestImage(t, 64*512)
	d, _ := newBlkDriver(t, img)
	for i := range 512 {
		d.mem.b[dataAt+i] = 0xa5
	}
	if n, st := d.request(VIRTIO_BLK_T_OUT, 3, 512, false); n != 1 || st != VIRTIO_BLK_S_OK {
		t.Fatalf("write: used len %d status %d", n, st)
	}
	d.w32(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING)

	// The capture: transport state, guest memory, the image as it is now.
	state := d.tr.State()
	if state.NumQueues != 1 || !state.Queues[0].Ready || state.Queues[0].LastAvail != 1 || state.Queues[0].UsedIdx != 1 {
		t.Fatalf("captured state %+v", state)
	}
	imgData, err := os.ReadFile(img.Path())
	if err != nil {
		t.Fatal(err)
	}
	p2 := filepath.Join(t.TempDir(), "copy.img")
	if err := os.WriteFile(p2, imgData, 0o600); err != nil {
		t.Fatal(err)
	}
	img2, err := OpenDiskImage(p2, false)
	if err != nil {
		t.Fatal(err)
	}
	defer img2.Close()
	mem2 := newTestMem(len(d.mem.b))
	copy(mem2.b, d.mem.b)
	tr2 := NewMMIOTransport(NewBlock(img2, "ftkvm-test-serial"), mem2, &irqRec{}, 5)
	if err := tr2.SetState(state); err != nil {
		t.Fatal(err)
	}
	if tr2.State() != state {
		t.Fatalf("installed state %+v, captured %+v", tr2.State(), state)
	}
	d2 := &testDriver{t: t, tr: tr2, mem: mem2, avail: d.avail, used: d.used, next: d.next}

	// The same next requests on both: a write, a read of it, a flush.
	for _, dr := range []*testDriver{d, d2} {
		for i := range 1024 {
			dr.mem.b[dataAt+i] = byte(i * 7)
		}
		if n, st := dr.request(VIRTIO_BLK_T_OUT, 10, 1024, false); n != 1 || st != VIRTIO_BLK_S_OK {
			t.Fatalf("write after install: used len %d status %d", n, st)
		}
		clear(dr.mem.b[dataAt : dataAt+512])
		if n, st := dr.request(VIRTIO_BLK_T_IN, 3, 512, true); n != 513 || st != VIRTIO_BLK_S_OK {
			t.Fatalf("read after install: used len %d status %d", n, st)
		}
		if dr.mem.b[dataAt] != 0xa5 {
			t.Fatalf("read sector 3 after install: %#x, want 0xa5", dr.mem.b[dataAt])
		}
		if n, st := dr.request(VIRTIO_BLK_T_FLUSH, 0, 0, false); n != 1 || st != VIRTIO_BLK_S_OK {
			t.Fatalf("flush after install: used len %d status %d", n, st)
		}
	}
	if !bytes.Equal(d.mem.b, mem2.b) {
		t.Error("guest memory differs after the same requests")
	}
	if d.tr.State() != tr2.State() {
		t.Errorf("states differ after the same requests:\n%+v\n%+v", d.tr.State(), tr2.State())
	}
	a, _ := os.ReadFile(img.Path())
	b, _ := os.ReadFile(p2)
	if !bytes.Equal(a, b) {
		t.Error("images differ after the same requests")
	}
}

// TestTransportSetStateRefuses checks that a state for another device
// shape is refused.
func TestTransportSetStateRefuses(t *testing.T) {
	d, _ := newBlkDriver(t, newTestImage(t, 4*512))
	for _, tc := range []struct {
		name string
		mod  func(*MMIOTransportState)
	}{
		{"queue count", func(s *MMIOTransportState) { s.NumQueues = 2 }},
		{"too many queues", func(s *MMIOTransportState) { s.NumQueues = MaxVirtioQueues + 1 }},
		{"queue limit", func(s *MMIOTransportState) { s.Queues[0].Max = 8 }},
	} {
		s := d.tr.State()
		tc.mod(&s)
		if err := d.tr.SetState(s); err == nil {
			t.Errorf("%s: SetState accepted it", tc.name)
		}
	}
}

// TestDiskImageDigest: the digest is the SHA-256 of the whole file, and
// one byte changed changes it.
func TestDiskImageDigest(t *testing.T) {
	img := newTestImage(t, 300*512)
	data, err := os.ReadFile(img.Path())
	if err != nil {
		t.Fatal(err)
	}
	got, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	if got != sha256.Sum256(data) {
		t.Fatal("digest is not the SHA-256 of the image")
	}
	if _, err := img.f.WriteAt([]byte{0xff}, 1000); err != nil {
		t.Fatal(err)
	}
	if again, err := img.Digest(); err != nil || again == got {
		t.Fatalf("digest after a byte changed: %x (%v)", again, err)
	}
}
