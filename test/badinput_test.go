package test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Bad input gets one clear error line on stderr and a non-zero exit, never
// a Go panic.
func TestBadInput(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	elf, err := os.ReadFile(testosELF)
	if err != nil {
		t.Fatal(err)
	}
	empty := write("empty", nil)
	truncated := write("truncated", elf[:200])
	text := write("text", []byte("#!/bin/sh\necho this is not a kernel\n"))
	// A valid ELF without the PVH note: this test binary's own ftkvm.
	noNote := ftkvmBin
	// A bzImage header claiming boot protocol 2.02 (too old for a 64-bit entry).
	old := make([]byte, 0x1000)
	copy(old[0x202:], "HdrS")
	old[0x206], old[0x207] = 0x02, 0x02
	old[0x1fe], old[0x1ff] = 0x55, 0xaa
	oldBz := write("old-bzimage", old)
	bigInitrd := write("big-initrd", make([]byte, 5<<20))
	notState := write("not-witness-state", []byte("pairs: many\n"))
	smallDisk := write("small.img", make([]byte, 100))
	oddDisk := write("odd.img", make([]byte, 1000))
	disk := write("disk.img", make([]byte, 4096))

	usage := map[string]bool{"odd memory size": true, "memory size not a size": true, "unknown flag": true,
		"missing kernel flag": true, "unknown command": true, "arbiter not etcd": true, "arbiter etcds without TLS": true}
	for _, tc := range []struct {
		name string
		args []string
		want string // in the error line
	}{
		{"no such kernel", []string{"run", "--kernel", filepath.Join(dir, "missing")}, "no such file"},
		{"empty kernel", []string{"run", "--kernel", empty}, "empty"},
		{"truncated kernel", []string{"run", "--kernel", truncated}, "malformed"},
		{"not a kernel", []string{"run", "--kernel", text}, "not an ELF or bzImage"},
		{"ELF without PVH note", []string{"run", "--kernel", noNote}, "no PVH entry note"},
		{"old bzImage", []string{"run", "--kernel", oldBz}, "too old"},
		{"memory too small for kernel", []string{"run", "--kernel", testosELF, "--mem", "2"}, "too small"},
		{"memory too small for initrd", []string{"run", "--kernel", testosELF, "--mem", "6", "--initrd", bigInitrd}, "too small"},
		{"odd memory size", []string{"run", "--kernel", testosELF, "--mem", "3"}, "multiple of 2"},
		{"memory size not a size", []string{"run", "--kernel", testosELF, "--mem", "2X"}, "not a size"},
		{"unknown flag", []string{"run", "--kernel", testosELF, "--frobnicate"}, "unknown flag"},
		{"missing kernel flag", []string{"run"}, "--kernel"},
		{"unknown command", []string{"fly"}, "unexpected argument"},
		{"no KVM device", []string{"run", "--kernel", testosELF, "--device", filepath.Join(dir, "kvm")}, "no such file"},
		{"KVM device not KVM", []string{"run", "--kernel", testosELF, "--device", "/dev/null"}, "KVM_GET_API_VERSION"},
		{"missing disk image", []string{"run", "--kernel", testosELF, "--disk", filepath.Join(dir, "missing.img")}, "no such file"},
		{"disk image too small", []string{"run", "--kernel", testosELF, "--disk", smallDisk}, "smaller than one 512-byte sector"},
		{"disk image of partial sectors", []string{"run", "--kernel", testosELF, "--disk", oddDisk}, "not a whole number of 512-byte sectors"},
		{"disk image that is a directory", []string{"run", "--kernel", testosELF, "--disk", dir + ",ro"}, "not a regular file"},
		{"unknown disk option", []string{"run", "--kernel", testosELF, "--disk", disk + ",rw"}, `unknown option "rw"`},
		{"one disk image twice", []string{"run", "--kernel", testosELF, "--disk", disk, "--disk", disk}, "in use by another process"},
		{"too many disks", []string{"run", "--kernel", testosELF, "--disk", disk + ",ro", "--disk", disk + ",ro", "--disk", disk + ",ro",
			"--disk", disk + ",ro", "--disk", disk + ",ro", "--disk", disk + ",ro"}, "at most 5 virtio devices"},
		{"memory over the virtio windows", []string{"run", "--kernel", testosELF, "--mem", "4096", "--disk", disk}, "overlaps the virtio-mmio windows"},
		{"net malformed MAC", []string{"run", "--kernel", testosELF, "--net", "tap=ftkvmbad0,mac=02:00:zz:00:00:01"}, "malformed MAC"},
		{"net multicast MAC", []string{"run", "--kernel", testosELF, "--net", "tap=ftkvmbad0,mac=01:00:00:00:00:01"}, "multicast"},
		{"net unknown option", []string{"run", "--kernel", testosELF, "--net", "tap=ftkvmbad0,vlan=3"}, `unknown option "vlan"`},
		{"net no tap", []string{"run", "--kernel", testosELF, "--net", "mac=02:00:00:00:00:01"}, "no tap name"},
		{"net tap twice", []string{"run", "--kernel", testosELF, "--net", "tap=ftkvmbad0", "--net", "tap=ftkvmbad0"}, "given twice"},
		{"net tap name too long", []string{"run", "--kernel", testosELF, "--net", "tap=ftkvm-name-too-long"}, "a name of 1 to 15 bytes"},
		{"net name taken by another interface", []string{"run", "--kernel", testosELF, "--net", "tap=lo"}, "the name is taken"},
		{"net too many devices", []string{"run", "--kernel", testosELF, "--disk", disk + ",ro", "--disk", disk + ",ro", "--disk", disk + ",ro",
			"--net", "tap=ftkvmbad0", "--net", "tap=ftkvmbad1", "--net", "tap=ftkvmbad2"}, "at most 5 virtio devices"},
		{"primary net malformed MAC", []string{"primary", "--kernel", testosELF, "--backup", "127.0.0.1:1", "--net", "tap=ftkvmbad0,mac=zz"}, "malformed MAC"},
		{"backup net unknown option", []string{"backup", "--kernel", testosELF, "--listen", "127.0.0.1:0", "--net", "tap=ftkvmbad0,mtu=9000"}, `unknown option "mtu"`},
		{"restore net no tap", []string{"restore", filepath.Join(dir, "missing.snap"), "--net", "mac=02:00:00:00:00:01"}, "no tap name"},
		{"witness state not a state file", []string{"witness", "--listen", "127.0.0.1:0", "--state", notState}, "not a witness state file"},
		{"witness state in a missing directory", []string{"witness", "--listen", "127.0.0.1:0", "--state", filepath.Join(dir, "missing", "state")}, "no such file"},
		{"witness bad address", []string{"witness", "--listen", "no-such-host.invalid:99999"}, "witness:"},
		{"arbiter not etcd", []string{"backup", "--listen", "127.0.0.1:0", "--kernel", testosELF, "--arbiter", "https://127.0.0.1:2379"}, "want etcd://"},
		{"arbiter etcds without TLS", []string{"backup", "--listen", "127.0.0.1:0", "--kernel", testosELF, "--arbiter", "etcds://127.0.0.1:2379"}, "needs --tls-cert"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := ftkvm(t, time.Minute, "", tc.args...)
			// Bad command-line usage exits 2, a failure of ftkvm 125.
			want := 125
			if usage[tc.name] {
				want = 2
			}
			if r.status != want {
				t.Fatalf("exit status %d, want %d; stderr:\n%s", r.status, want, r.stderr)
			}
			errLines := strings.Split(strings.TrimSpace(r.stderr), "\n")
			if strings.Contains(r.stderr, "panic") || strings.Contains(r.stderr, "goroutine ") {
				t.Fatalf("Go panic:\n%s", r.stderr)
			}
			if len(errLines) != 1 || !strings.HasPrefix(errLines[0], "ftkvm: ") {
				t.Fatalf("want one line starting with \"ftkvm: \", got:\n%s", r.stderr)
			}
			if !strings.Contains(errLines[0], tc.want) {
				t.Fatalf("error line %q does not mention %q", errLines[0], tc.want)
			}
			if r.stdout != "" {
				t.Fatalf("stdout not empty: %q", r.stdout)
			}
		})
	}
}
