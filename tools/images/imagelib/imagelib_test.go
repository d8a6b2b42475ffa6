package imagelib

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/u-root/u-root/pkg/cpio"
)

func readArchive(t *testing.T, a *Archive) []cpio.Record {
	t.Helper()
	var buf bytes.Buffer
	if err := a.Write(&buf); err != nil {
		t.Fatalf("Write: %v", err)
	}
	recs, err := cpio.ReadAllRecords(cpio.Newc.Reader(bytes.NewReader(buf.Bytes())))
	if err != nil {
		t.Fatalf("reading back: %v", err)
	}
	return recs
}

func content(t *testing.T, r cpio.Record) string {
	t.Helper()
	b := make([]byte, r.FileSize)
	if r.FileSize > 0 {
		if _, err := r.ReadAt(b, 0); err != nil {
			t.Fatalf("%s: %v", r.Name, err)
		}
	}
	return string(b)
}

func TestArchiveRoundTrip(t *testing.T) {
	host := filepath.Join(t.TempDir(), "host")
	if err := os.WriteFile(host, []byte("from host"), 0o640); err != nil {
		t.Fatal(err)
	}
	a := NewArchive()
	for _, err := range []error{
		a.File("/usr/bin/tool", []byte("inline"), 0o755),
		a.HostFile("data/host", host, 0),
		a.Symlink("bin/sh", "/bin/busybox"),
		a.CharDev("dev/console", 0o600, 5, 1),
		a.Dir("tmp", 0o777),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	recs := readArchive(t, a)
	var names []string
	got := map[string]cpio.Record{}
	for _, r := range recs {
		names = append(names, r.Name)
		got[r.Name] = r
	}
	want := "bin bin/sh data data/host dev dev/console tmp usr usr/bin usr/bin/tool"
	if strings.Join(names, " ") != want {
		t.Fatalf("entries %v, want %s (parents first, sorted)", names, want)
	}
	check := func(name string, mode uint64, body string) {
		r := got[name]
		if r.Mode != mode || content(t, r) != body {
			t.Errorf("%s: mode %o body %q, want %o %q", name, r.Mode, content(t, r), mode, body)
		}
	}
	check("usr/bin/tool", cpio.S_IFREG|0o755, "inline")
	check("data/host", cpio.S_IFREG|0o640, "from host")
	check("bin/sh", cpio.S_IFLNK|0o777, "/bin/busybox")
	check("usr", cpio.S_IFDIR|0o755, "")
	check("tmp", cpio.S_IFDIR|0o777, "")
	if c := got["dev/console"]; c.Mode != cpio.S_IFCHR|0o600 || c.Rmajor != 5 || c.Rminor != 1 {
		t.Errorf("dev/console = %v", c.Info)
	}
	for _, r := range recs {
		if r.MTime != 0 || r.UID != 0 || r.GID != 0 {
			t.Errorf("%s is not reproducible: %v", r.Name, r.Info)
		}
	}
}

func TestArchiveConflicts(t *testing.T) {
	a := NewArchive()
	if err := a.Symlink("lib", "usr/lib"); err != nil {
		t.Fatal(err)
	}
	if err := a.File("lib/x", nil, 0o644); err == nil {
		t.Error("a file below a symlink was accepted")
	}
	if err := a.File("etc", nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := a.Dir("etc", 0o755); err == nil {
		t.Error("a file was turned into a directory")
	}
	if err := a.File("etc", []byte("x"), 0o644); err != nil {
		t.Errorf("replacing a file: %v", err)
	}
}

func TestMirrorHost(t *testing.T) {
	root := t.TempDir()
	// root/lib -> usr/lib (merged-/usr style), usr/lib/libx.so.1 ->
	// libx.so.1.2, share/fw/a.bin -> ../../usr/lib/libx.so.1.2.
	for _, d := range []string{"usr/lib", "share/fw"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	os.WriteFile(filepath.Join(root, "usr/lib/libx.so.1.2"), []byte("lib"), 0o644)
	os.Symlink("libx.so.1.2", filepath.Join(root, "usr/lib/libx.so.1"))
	os.Symlink("usr/lib", filepath.Join(root, "lib"))
	os.Symlink("../../usr/lib/libx.so.1.2", filepath.Join(root, "share/fw/a.bin"))
	os.Symlink("nowhere", filepath.Join(root, "share/fw/dangling"))

	a := NewArchive()
	if err := a.MirrorHost(filepath.Join(root, "lib/libx.so.1")); err != nil {
		t.Fatal(err)
	}
	if err := a.MirrorHost(filepath.Join(root, "share/fw")); err != nil {
		t.Fatal(err)
	}
	got := map[string]cpio.Record{}
	for _, r := range readArchive(t, a) {
		got["/"+r.Name] = r
	}
	links := map[string]string{
		root + "/lib":                 "usr/lib",
		root + "/usr/lib/libx.so.1":   "libx.so.1.2",
		root + "/share/fw/a.bin":      "../../usr/lib/libx.so.1.2",
		root + "/share/fw/dangling":   "nowhere",
		root + "/usr/lib/libx.so.1.2": "",
	}
	for name, target := range links {
		r, ok := got[name]
		if !ok {
			t.Errorf("missing %s", name)
			continue
		}
		if target == "" {
			if r.Mode&cpio.S_IFMT != cpio.S_IFREG || content(t, r) != "lib" {
				t.Errorf("%s: %v", name, r.Info)
			}
		} else if r.Mode&cpio.S_IFMT != cpio.S_IFLNK || content(t, r) != target {
			t.Errorf("%s -> %q, want -> %q", name, content(t, r), target)
		}
	}

	// Where the archive has a directory and the host a link (busybox's
	// /bin on a merged-/usr host), the link is followed instead.
	b := NewArchive()
	if err := b.Dir(filepath.Join(root, "lib"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := b.MirrorHost(filepath.Join(root, "lib/libx.so.1")); err != nil {
		t.Fatal(err)
	}
	if !b.Has(filepath.Join(root, "lib/libx.so.1")) {
		t.Errorf("file not placed below the existing directory")
	}
}

func TestSharedLibs(t *testing.T) {
	if _, err := exec.LookPath("ldd"); err != nil {
		t.Skip("no ldd")
	}
	libs, err := SharedLibs(context.Background(), "/bin/sh")
	if err != nil {
		t.Fatal(err)
	}
	var loader bool
	for _, l := range libs {
		loader = loader || strings.Contains(l, "ld-linux")
	}
	if !loader {
		t.Errorf("SharedLibs(/bin/sh) = %v: no dynamic loader", libs)
	}
	if _, err := os.Stat(HostBusybox); err == nil {
		if libs, err := SharedLibs(context.Background(), HostBusybox); err != nil || len(libs) != 0 {
			t.Errorf("SharedLibs(static busybox) = %v, %v", libs, err)
		}
	}
}

func TestXZPayload(t *testing.T) {
	payload := append(append([]byte{}, xzMagic...), "stream"...)
	img := make([]byte, 0x1000)
	img[0x1f1] = 3 // setup sectors: protected-mode code at 4*512
	copy(img[0x202:], "HdrS")
	binary.LittleEndian.PutUint32(img[0x248:], 0x100)
	binary.LittleEndian.PutUint32(img[0x24c:], uint32(len(payload)))
	copy(img[4*512+0x100:], payload)
	copy(img[0x300:], xzMagic) // a decoy the header must win over
	got, err := xzPayload(img)
	if err != nil || !bytes.Equal(got, payload) {
		t.Errorf("xzPayload = %q, %v; want %q", got, err, payload)
	}
	// Without a usable header, the first magic is taken.
	copy(img[0x202:], "XXXX")
	if got, err := xzPayload(img); err != nil || !bytes.HasPrefix(got, xzMagic) || len(got) != len(img)-0x300 {
		t.Errorf("fallback xzPayload: len %d, %v", len(got), err)
	}
	if _, err := xzPayload(make([]byte, 100)); err == nil {
		t.Error("no magic: want an error")
	}
}

func TestFindPVHNote(t *testing.T) {
	note := func(name string, typ uint32, desc []byte) []byte {
		var b bytes.Buffer
		binary.Write(&b, binary.LittleEndian, [3]uint32{uint32(len(name) + 1), uint32(len(desc)), typ})
		b.WriteString(name + "\x00")
		for b.Len()%4 != 0 {
			b.WriteByte(0)
		}
		b.Write(desc)
		for b.Len()%4 != 0 {
			b.WriteByte(0)
		}
		return b.Bytes()
	}
	le := binary.LittleEndian
	notes := append(note("GNU", 3, []byte("build-id")), note("Xen", 6, []byte("linux\x00"))...)
	if _, ok := findPVHNote(notes, le); ok {
		t.Error("found a PVH note where there is none")
	}
	notes = append(notes, note("Xen", xenElfnotePhys32Entry, le.AppendUint64(nil, 0x1000cd0))...)
	if e, ok := findPVHNote(notes, le); !ok || e != 0x1000cd0 {
		t.Errorf("findPVHNote = %#x, %v", e, ok)
	}
	if e, ok := findPVHNote(note("Xen", xenElfnotePhys32Entry, le.AppendUint32(nil, 0x2000)), le); !ok || e != 0x2000 {
		t.Errorf("findPVHNote (32-bit) = %#x, %v", e, ok)
	}
	if _, ok := findPVHNote(notes[:len(notes)-3], le); ok {
		t.Error("accepted a truncated note")
	}
}

// TestComputeAwk runs the guest's compute program with busybox awk and
// checks it against ComputeResult, the value tests expect from guests.
func TestComputeAwk(t *testing.T) {
	if _, err := os.Stat(HostBusybox); err != nil {
		t.Skip("needs busybox-static")
	}
	for _, n := range []int{1, 1000, 100000} {
		out, err := exec.Command(HostBusybox, "awk", "-v", fmt.Sprint("n=", n), ComputeAwk).Output()
		if err != nil {
			t.Fatal(err)
		}
		want := fmt.Sprintf("compute n=%d result=%d\n", n, ComputeResult(n))
		if string(out) != want {
			t.Errorf("awk: %q, want %q", out, want)
		}
	}
	if !strings.Contains(GuestInit, ComputeAwk) {
		t.Error("GuestInit does not use ComputeAwk")
	}
}

func TestManifest(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "f"), []byte("abc"), 0o644)
	in := map[string]string{"k": "v"}
	man := filepath.Join(dir, "m.json")
	if err := writeManifest(man, dir, in, []string{"f"}); err != nil {
		t.Fatal(err)
	}
	m, err := readManifest(man)
	if err != nil || !m.valid(dir, in) {
		t.Fatalf("fresh manifest not valid: %v", err)
	}
	if m.valid(dir, map[string]string{"k": "other"}) {
		t.Error("valid with other inputs")
	}
	os.WriteFile(filepath.Join(dir, "f"), []byte("abd"), 0o644) // same size
	if m.valid(dir, in) {
		t.Error("valid after the file changed")
	}
	var none *manifest
	if none.valid(dir, in) {
		t.Error("nil manifest valid")
	}
}

func TestCandidateErr(t *testing.T) {
	policy := func(cand string) []byte {
		return []byte(KernelPackage + ":\n  Installed: (none)\n  Candidate: " + cand + "\n  Version table:\n")
	}
	if err := candidateErr(policy(KernelDebVersion)); err != nil {
		t.Errorf("pinned candidate rejected: %v", err)
	}
	for _, p := range [][]byte{policy("6.1.999-1"), policy("(none)"), nil} {
		err := candidateErr(p)
		if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), KernelPackage+" "+KernelDebVersion) {
			t.Errorf("candidateErr(%q) = %v; want ErrUnavailable naming the pin", p, err)
		}
	}
}
