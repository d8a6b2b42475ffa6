package imagelib

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// The guest and L1 kernel is pinned so that every developer and CI run boots
// the very same bytes: a kernel that changes under the tests would turn
// unrelated commits red. Moving the pin is a deliberate edit here.
const (
	KernelPackage    = "linux-image-6.1.0-56-amd64"
	KernelRelease    = "6.1.0-56-amd64"
	KernelDebVersion = "6.1.192-2"
)

// KVMModules are the modules an L1 must insmod, in this order, to get a
// /dev/kvm backed by kvm_amd (irqbypass and ccp are kvm/kvm-amd's
// dependencies in the Debian build).
var KVMModules = []string{"irqbypass", "kvm", "ccp", "kvm-amd"}

// ErrUnavailable marks a failure to obtain something from the host's package
// manager (the pinned kernel, for instance). Tests use it to skip rather
// than fail on machines that cannot provide the dependency.
var ErrUnavailable = errors.New("dependency unavailable")

// kernelStepVersion is bumped whenever the way kernel outputs are derived
// changes, so existing caches are rebuilt.
const kernelStepVersion = "1"

// xenElfnotePhys32Entry is XEN_ELFNOTE_PHYS32_ENTRY: the note by which a
// kernel advertises its PVH 32-bit entry point.
const xenElfnotePhys32Entry = 18

// Kernel lists the kernel outputs in the cache.
type Kernel struct {
	Vmlinuz  string   // bzImage as shipped in the package
	Vmlinux  string   // uncompressed ELF with a PVH entry note
	PVHEntry uint64   // physical PVH entry point of Vmlinux
	Modules  []string // .ko files in KVMModules order
}

func kernelLayout(cache string) (dir string, k *Kernel) {
	dir = filepath.Join(cache, "kernel-"+KernelRelease)
	k = &Kernel{
		Vmlinuz: filepath.Join(dir, "vmlinuz"),
		Vmlinux: filepath.Join(dir, "vmlinux"),
	}
	for _, m := range KVMModules {
		k.Modules = append(k.Modules, filepath.Join(dir, "modules", m+".ko"))
	}
	return dir, k
}

func debFileName() string {
	return fmt.Sprintf("%s_%s_amd64.deb", KernelPackage, KernelDebVersion)
}

// fetchKernel makes sure the kernel outputs exist in cache and match their
// manifest, downloading and unpacking the pinned package only if not.
func fetchKernel(ctx context.Context, cache string, logw io.Writer) (*Kernel, error) {
	dir, k := kernelLayout(cache)
	inputs := map[string]string{
		"package": KernelPackage,
		"version": KernelDebVersion,
		"step":    kernelStepVersion,
	}
	manPath := filepath.Join(dir, "manifest.json")
	m, err := readManifest(manPath)
	if err != nil {
		return nil, err
	}
	if m.valid(dir, inputs) {
		entry, err := pvhEntryOf(k.Vmlinux)
		if err != nil {
			return nil, fmt.Errorf("cached vmlinux: %w", err)
		}
		k.PVHEntry = entry
		return k, nil
	}

	deb, err := ensureDeb(ctx, dir, logw)
	if err != nil {
		return nil, err
	}

	// dpkg -x unpacks the whole package (~400 MB); only a few files are
	// kept, and the tree is removed afterwards. The .deb stays so that a
	// rebuild needs no network.
	root := filepath.Join(dir, "root")
	if err := os.RemoveAll(root); err != nil {
		return nil, fmt.Errorf("clearing old unpacked kernel: %w", err)
	}
	fmt.Fprintf(logw, "images: unpacking %s\n", filepath.Base(deb))
	if out, err := exec.CommandContext(ctx, "dpkg", "-x", deb, root).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("dpkg -x %s: %w\n%s", deb, err, out)
	}
	defer os.RemoveAll(root)

	bz := filepath.Join(root, "boot", "vmlinuz-"+KernelRelease)
	if err := copyFile(bz, k.Vmlinuz, 0o644); err != nil {
		return nil, fmt.Errorf("copying bzImage: %w", err)
	}
	fmt.Fprintf(logw, "images: extracting vmlinux from the bzImage\n")
	if err := extractVmlinux(ctx, k.Vmlinuz, k.Vmlinux); err != nil {
		return nil, err
	}
	entry, err := pvhEntryOf(k.Vmlinux)
	if err != nil {
		return nil, fmt.Errorf("extracted vmlinux: %w", err)
	}
	k.PVHEntry = entry

	if err := extractModules(ctx, root, k.Modules); err != nil {
		return nil, err
	}

	rels := []string{"vmlinuz", "vmlinux"}
	for _, p := range k.Modules {
		rel, _ := filepath.Rel(dir, p)
		rels = append(rels, rel)
	}
	if err := writeManifest(manPath, dir, inputs, rels); err != nil {
		return nil, err
	}
	return k, nil
}

// ensureDeb returns the path of the pinned .deb in dir, downloading it with
// apt-get if the cached copy is missing or no longer matches its record.
func ensureDeb(ctx context.Context, dir string, logw io.Writer) (string, error) {
	name := debFileName()
	deb := filepath.Join(dir, name)
	inputs := map[string]string{"package": KernelPackage, "version": KernelDebVersion}
	manPath := filepath.Join(dir, "deb.json")
	m, err := readManifest(manPath)
	if err != nil {
		return "", err
	}
	if m.valid(dir, inputs) {
		return deb, nil
	}

	if err := checkCandidate(ctx); err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("creating kernel cache: %w", err)
	}
	_ = os.Remove(deb)
	fmt.Fprintf(logw, "images: apt-get download %s=%s\n", KernelPackage, KernelDebVersion)
	// apt checks the download against the signed archive index, so the
	// file is trusted from here on; its size and hash go in deb.json.
	cmd := exec.CommandContext(ctx, "apt-get", "download", "-q", KernelPackage+"="+KernelDebVersion)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("%w: apt-get download %s=%s: %v\n%s", ErrUnavailable, KernelPackage, KernelDebVersion, err, out)
	}
	// Be sure apt gave us the pinned version and not something else.
	out, err := exec.CommandContext(ctx, "dpkg-deb", "-f", deb, "Package", "Version").Output()
	if err != nil {
		return "", fmt.Errorf("reading control fields of %s: %w", deb, err)
	}
	want := fmt.Sprintf("Package: %s\nVersion: %s\n", KernelPackage, KernelDebVersion)
	if string(out) != want {
		return "", fmt.Errorf("downloaded %s is not the pinned package: got %q, want %q", deb, out, want)
	}
	if err := writeManifest(manPath, dir, inputs, []string{name}); err != nil {
		return "", err
	}
	return deb, nil
}

// checkCandidate fails, naming the pin, when apt would not give us exactly
// the pinned kernel: silently taking another version would change what the
// tests boot.
func checkCandidate(ctx context.Context) error {
	out, err := exec.CommandContext(ctx, "apt-cache", "policy", KernelPackage).Output()
	if err != nil {
		return fmt.Errorf("%w: apt-cache policy %s: %v", ErrUnavailable, KernelPackage, err)
	}
	return candidateErr(out)
}

// candidateErr judges the output of apt-cache policy for the pinned
// package.
func candidateErr(policy []byte) error {
	cand := ""
	sc := bufio.NewScanner(bytes.NewReader(policy))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "Candidate:"); ok {
			cand = strings.TrimSpace(v)
		}
	}
	switch cand {
	case KernelDebVersion:
		return nil
	case "", "(none)":
		return fmt.Errorf("%w: pinned kernel %s %s is not known to apt (run apt-get update, e.g. via test/nested/setup-deps.sh)",
			ErrUnavailable, KernelPackage, KernelDebVersion)
	default:
		return fmt.Errorf("%w: pinned kernel %s %s is no longer apt's candidate (candidate is %s); move the pin in tools/images/imagelib/kernel.go deliberately",
			ErrUnavailable, KernelPackage, KernelDebVersion, cand)
	}
}

// extractVmlinux writes the ELF kernel held XZ-compressed inside bzImage.
// The setup header's payload_offset/length locate the payload exactly; the
// magic search is the fallback for images whose header we cannot read.
// The decompression uses the xz tool because the kernel compresses with
// the x86 BCJ filter, which the pure-Go xz packages do not implement.
func extractVmlinux(ctx context.Context, bzImage, out string) error {
	img, err := os.ReadFile(bzImage)
	if err != nil {
		return fmt.Errorf("reading bzImage: %w", err)
	}
	payload, err := xzPayload(img)
	if err != nil {
		return fmt.Errorf("%s: %w", bzImage, err)
	}
	err = createAtomic(out, 0o644, func(w io.Writer) error {
		// --single-stream: the payload is followed by the 4-byte
		// decompressed size that the kernel build appends.
		cmd := exec.CommandContext(ctx, "xz", "-dc", "--single-stream")
		cmd.Stdin = bytes.NewReader(payload)
		cmd.Stdout = w
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("xz -dc: %w: %s", err, stderr.Bytes())
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("extracting vmlinux: %w", err)
	}
	return nil
}

var xzMagic = []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}

// xzPayload returns the XZ stream inside a bzImage.
func xzPayload(img []byte) ([]byte, error) {
	// Boot protocol >= 2.08: setup_sects at 0x1f1, "HdrS" at 0x202,
	// payload_offset/payload_length at 0x248/0x24c, relative to the
	// protected-mode code that starts after the setup sectors.
	if len(img) > 0x250 && string(img[0x202:0x206]) == "HdrS" {
		setup := int(img[0x1f1])
		if setup == 0 {
			setup = 4
		}
		pm := (setup + 1) * 512
		off := pm + int(binary.LittleEndian.Uint32(img[0x248:]))
		n := int(binary.LittleEndian.Uint32(img[0x24c:]))
		if off > 0 && n > 0 && off+n <= len(img) && bytes.HasPrefix(img[off:], xzMagic) {
			return img[off : off+n], nil
		}
	}
	i := bytes.Index(img, xzMagic)
	if i < 0 {
		return nil, errors.New("no XZ payload in bzImage (the kernel is not XZ-compressed?)")
	}
	return img[i:], nil
}

// pvhEntryOf returns the XEN_ELFNOTE_PHYS32_ENTRY of an ELF kernel, and
// fails if the file is not an ELF or has no such note: without it the
// kernel cannot be booted through PVH, which is what the tests rely on.
func pvhEntryOf(path string) (uint64, error) {
	f, err := elf.Open(path)
	if err != nil {
		return 0, fmt.Errorf("%s is not an ELF: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		b := make([]byte, p.Filesz)
		if _, err := p.ReadAt(b, 0); err != nil {
			return 0, fmt.Errorf("reading notes of %s: %w", path, err)
		}
		if e, ok := findPVHNote(b, f.ByteOrder); ok {
			return e, nil
		}
	}
	return 0, fmt.Errorf("%s has no PVH entry note (Xen note type %d)", path, xenElfnotePhys32Entry)
}

func findPVHNote(b []byte, bo binary.ByteOrder) (uint64, bool) {
	align4 := func(n uint32) int { return int((n + 3) &^ 3) }
	for len(b) >= 12 {
		namesz, descsz, typ := bo.Uint32(b), bo.Uint32(b[4:]), bo.Uint32(b[8:])
		b = b[12:]
		nl, dl := align4(namesz), align4(descsz)
		if nl > len(b) || nl+dl > len(b) {
			return 0, false
		}
		name := string(bytes.TrimRight(b[:namesz], "\x00"))
		desc := b[nl : nl+int(descsz)]
		b = b[nl+dl:]
		if name != "Xen" || typ != xenElfnotePhys32Entry {
			continue
		}
		switch len(desc) {
		case 4:
			return uint64(bo.Uint32(desc)), true
		case 8:
			return bo.Uint64(desc), true
		}
	}
	return 0, false
}

// extractModules finds the KVM modules in the unpacked package and writes
// them, uncompressed, to dst (in KVMModules order). Debian 12 ships plain
// .ko files; later kernels may ship .ko.xz, which busybox insmod cannot
// load, so those are decompressed here.
func extractModules(ctx context.Context, root string, dst []string) error {
	found := map[string]string{}
	want := map[string]bool{}
	for _, m := range KVMModules {
		want[m] = true
	}
	for _, base := range []string{"lib/modules", "usr/lib/modules"} {
		dir := filepath.Join(root, base, KernelRelease, "kernel")
		err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return filepath.SkipDir
				}
				return err
			}
			name := d.Name()
			for _, ext := range []string{".ko", ".ko.xz"} {
				if m, ok := strings.CutSuffix(name, ext); ok && want[m] {
					found[m] = p
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("searching modules in %s: %w", dir, err)
		}
	}
	for i, m := range KVMModules {
		src, ok := found[m]
		if !ok {
			return fmt.Errorf("module %s.ko not found in %s", m, KernelPackage)
		}
		if strings.HasSuffix(src, ".xz") {
			err := createAtomic(dst[i], 0o644, func(w io.Writer) error {
				cmd := exec.CommandContext(ctx, "xz", "-dc", src)
				cmd.Stdout = w
				var stderr bytes.Buffer
				cmd.Stderr = &stderr
				if err := cmd.Run(); err != nil {
					return fmt.Errorf("xz -dc: %w: %s", err, stderr.Bytes())
				}
				return nil
			})
			if err != nil {
				return fmt.Errorf("decompressing %s: %w", src, err)
			}
			continue
		}
		if err := copyFile(src, dst[i], 0o644); err != nil {
			return fmt.Errorf("copying module %s: %w", m, err)
		}
	}
	return nil
}

func copyFile(src, dst string, perm os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	return createAtomic(dst, perm, func(w io.Writer) error {
		_, err := io.Copy(w, in)
		return err
	})
}
