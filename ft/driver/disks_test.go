package driver

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/devices"
	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/ft/wire"
)

// diskGuest is a machine with disk images; nothing else of it is used.
type diskGuest struct {
	Machine
	imgs []*devices.DiskImage
}

func (d diskGuest) DiskImages() []*devices.DiskImage { return d.imgs }

// testImage writes an image of size bytes (random, or zeros) and opens it.
func testImage(t *testing.T, name string, size int, random, ro bool) (*devices.DiskImage, []byte) {
	t.Helper()
	b := make([]byte, size)
	if random {
		_, _ = rand.Read(b)
	}
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	img, err := devices.OpenDiskImage(p, ro)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return img, b
}

// sent returns the DiskData messages a primary sends for imgs, read off
// a real link.
func sent(t *testing.T, imgs []*devices.DiskImage) []wire.DiskData {
	t.Helper()
	r := New(Options{Node: ft.Config{Role: ft.RolePrimary, Timeout: time.Second}, Log: quietLog()})
	defer r.Close()
	a, b := net.Pipe()
	l := newLink(r, a, nil, nil)
	go l.writer()
	errc := make(chan error, 1)
	go func() {
		_, err := sendImages(l, imgs)
		l.closeAfterSend()
		errc <- err
	}()
	rd := wire.NewReader(b, 0)
	var out []wire.DiskData
	for {
		m, err := rd.Read()
		if err != nil {
			break
		}
		out = append(out, m.(wire.DiskData))
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	return out
}

// Rule (ft/doc.go, "Disks at a join"): the primary sends each read-write
// image whole, in order, the last chunk with its digest, and skips the
// read-only ones; a joining backup that takes them holds the primary's
// contents, and any other stream fails its install with the reason.
func TestJoinDisks(t *testing.T) {
	const size = 2*wire.MaxDiskData + 3*512 // three chunks, the last short
	src, want := testImage(t, "p0.img", size, true, false)
	ro, _ := testImage(t, "p1.img", 4096, true, true)
	msgs := sent(t, []*devices.DiskImage{src, ro})
	if len(msgs) != 3 || !msgs[2].Last || msgs[2].Digest != sha256.Sum256(want) {
		t.Fatalf("%d chunks (last %v), want 3 of disk 0 with its digest last", len(msgs), len(msgs) > 0 && msgs[len(msgs)-1].Last)
	}
	for _, tc := range []struct {
		name   string
		mutate func([]wire.DiskData) []wire.DiskData
		err    string // "" succeeds
	}{
		{"whole", func(m []wire.DiskData) []wire.DiskData { return m }, ""},
		{"none", func(m []wire.DiskData) []wire.DiskData { return nil }, "came without disk 0's contents"},
		{"cut short", func(m []wire.DiskData) []wire.DiskData { return m[:2] }, "came without disk 0's contents"},
		{"a chunk missing", func(m []wire.DiskData) []wire.DiskData { return []wire.DiskData{m[0], m[2]} }, "bytes at 2097152; 1048576 were expected"},
		{"a byte changed", func(m []wire.DiskData) []wire.DiskData {
			c := bytes.Clone(m[1].Data)
			c[7] ^= 1
			m[1].Data = c
			return m
		}, "as received has sha256"},
		{"to a read-only disk", func(m []wire.DiskData) []wire.DiskData { m[0].Disk = 1; return m }, "read-only disk 1"},
		{"to no disk", func(m []wire.DiskData) []wire.DiskData { m[0].Disk = 2; return m }, "the primary sent disk 2; this replica has 2"},
		{"past the end", func(m []wire.DiskData) []wire.DiskData { return append(m, m[2]) }, "past its last chunk"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst, _ := testImage(t, "b0.img", size, false, false)
			dro, _ := testImage(t, "b1.img", 4096, true, true)
			r := New(Options{Node: ft.Config{Role: ft.RoleBackup, Timeout: time.Second}, Log: quietLog()})
			defer r.Close()
			r.m = diskGuest{imgs: []*devices.DiskImage{dst, dro}}
			r.mu.Lock()
			for _, m := range tc.mutate(append([]wire.DiskData(nil), msgs...)) {
				r.takeDisk(m)
			}
			err := r.disksReceived()
			r.mu.Unlock()
			if tc.err == "" {
				got := make([]byte, size)
				if _, rerr := dst.ReadAt(got, 0); err != nil || rerr != nil || !bytes.Equal(got, want) {
					t.Fatalf("err %v, read %v, the image is the primary's: %v", err, rerr, bytes.Equal(got, want))
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("got %v, want an error with %q", err, tc.err)
			}
		})
	}
}
