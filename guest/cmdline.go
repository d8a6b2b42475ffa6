package guest

import (
	"bytes"
	"debug/elf"
	"strings"
)

// LinuxDefaults suit ftkvm's device set: the console is COM1, and with no
// TSC and no APIC a kernel would calibrate its delay loop against timer
// ticks, which lpj= skips. randomize_kstack_offset=off (a Linux 5.13+
// parameter; older kernels ignore it) keeps the offset of the kernel
// stack at every system call from coming from RDTSC, which x86-64 Linux
// reads there whatever CPUID says (CONFIG_RANDOMIZE_KSTACK_OFFSET_DEFAULT,
// on in Debian's kernels) and which KVM does not let ftkvm intercept:
// replicas would otherwise write their stacks at different offsets on
// every system call (docs/LINUX.md, "RDTSC and replicas").
var LinuxDefaults = []string{"console=ttyS0", "lpj=250000", "randomize_kstack_offset=off"}

// IsLinux reports whether image is a Linux kernel: a bzImage, or an ELF
// vmlinux carrying Linux's own notes.
func IsLinux(image []byte) bool {
	if IsBzImage(image) {
		return true
	}
	if !IsELF(image) {
		return false
	}
	f, err := elf.NewFile(bytes.NewReader(image))
	if err != nil {
		return false
	}
	defer f.Close()
	for _, s := range f.Sections {
		if s.Type == elf.SHT_NOTE && s.Name == ".note.Linux" {
			return true
		}
	}
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		b := make([]byte, min(p.Filesz, 1<<16))
		n, _ := p.ReadAt(b, 0)
		if bytes.Contains(b[:n], []byte("Linux\x00")) {
			return true
		}
	}
	return false
}

// LinuxCmdline puts LinuxDefaults in front of the user's command line,
// leaving out each default whose key the user set (so "console=tty0"
// replaces "console=ttyS0", and "lpj=0" brings calibration back).
func LinuxCmdline(user string) string {
	set := map[string]bool{}
	for _, tok := range strings.Fields(user) {
		key, _, _ := strings.Cut(tok, "=")
		set[key] = true
	}
	var out []string
	for _, d := range LinuxDefaults {
		key, _, _ := strings.Cut(d, "=")
		if !set[key] {
			out = append(out, d)
		}
	}
	if u := strings.TrimSpace(user); u != "" {
		out = append(out, u)
	}
	return strings.Join(out, " ")
}
