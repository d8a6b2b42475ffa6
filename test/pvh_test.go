package test

import (
	"debug/elf"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Any PVH kernel boots, ELF32 or ELF64: the same test guest converted to
// each class by objcopy (as a PVH kernel built for i386 would be) runs its
// counter workload to PASS.
func TestPVHELFClasses(t *testing.T) {
	requireKVM(t)
	dir := t.TempDir()
	for _, tc := range []struct {
		target string
		class  elf.Class
	}{
		{"elf32-i386", elf.ELFCLASS32},
		{"elf64-x86-64", elf.ELFCLASS64},
	} {
		t.Run(tc.target, func(t *testing.T) {
			out := filepath.Join(dir, tc.target)
			if b, err := exec.Command("objcopy", "-O", tc.target, testosELF, out).CombinedOutput(); err != nil {
				t.Fatalf("objcopy: %v\n%s", err, b)
			}
			f, err := elf.Open(out)
			if err != nil {
				t.Fatal(err)
			}
			class := f.Class
			f.Close()
			if class != tc.class {
				t.Fatalf("objcopy made %v, want %v", class, tc.class)
			}
			r := ftkvm(t, time.Minute, "", "run", "--kernel", out, "--mem", "32", "--cmdline", "workload=counter lines=3")
			if r.status != 0 || !strings.Contains(r.stdout, "counter 3 ticks=") || !strings.Contains(r.stdout, "testos: PASS") {
				t.Fatalf("status %d\nstdout:\n%s\nstderr:\n%s", r.status, r.stdout, r.stderr)
			}
		})
	}
}
