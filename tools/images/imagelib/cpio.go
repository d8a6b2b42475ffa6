package imagelib

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/u-root/u-root/pkg/cpio"
)

// Archive is an initramfs under construction: a set of entries keyed by
// path, written as a newc cpio (the format the kernel unpacks) in sorted
// order so that every directory precedes its contents and the same inputs
// give byte-identical archives (all timestamps are zero, owners root).
//
// Paths are archive paths; a leading "/" is optional. Host files are read
// only when the archive is written, so large binaries are streamed rather
// than held in memory.
type Archive struct {
	entries  map[string]*entry
	mirrored map[string]bool // host directories already copied by MirrorHost
}

type entryKind int

const (
	kindDir entryKind = iota
	kindFile
	kindSymlink
	kindCharDev
)

type entry struct {
	kind         entryKind
	perm         fs.FileMode
	data         []byte // kindFile with inline contents
	host         string // kindFile read from the host at write time
	target       string // kindSymlink
	major, minor uint64 // kindCharDev
}

// NewArchive returns an empty archive.
func NewArchive() *Archive {
	return &Archive{entries: map[string]*entry{}}
}

// cleanName turns p into the relative, cleaned form stored in the cpio.
func cleanName(p string) (string, error) {
	c := strings.TrimPrefix(path.Clean("/"+p), "/")
	if c == "" {
		return "", fmt.Errorf("invalid archive path %q", p)
	}
	return c, nil
}

// add inserts e at name after creating its parent directories. Replacing
// a non-directory with another is allowed (the caller's later choice wins);
// turning a directory into something else, or putting a file below a
// symlink, is an error: the kernel's unpacker would follow the link and
// the file would land somewhere unexpected.
func (a *Archive) add(name string, e *entry) error {
	n, err := cleanName(name)
	if err != nil {
		return err
	}
	if err := a.parents(n); err != nil {
		return err
	}
	if old, ok := a.entries[n]; ok {
		if old.kind == kindDir && e.kind == kindDir {
			return nil
		}
		if old.kind == kindDir || e.kind == kindDir {
			return fmt.Errorf("archive path %s: cannot replace a %s with a %s", n, kindName(old.kind), kindName(e.kind))
		}
	}
	a.entries[n] = e
	return nil
}

func kindName(k entryKind) string {
	return [...]string{"directory", "file", "symlink", "device"}[k]
}

func (a *Archive) parents(n string) error {
	dir := path.Dir(n)
	if dir == "." {
		return nil
	}
	if old, ok := a.entries[dir]; ok {
		if old.kind != kindDir {
			return fmt.Errorf("archive path %s: parent %s is a %s", n, dir, kindName(old.kind))
		}
		return nil
	}
	if err := a.parents(dir); err != nil {
		return err
	}
	a.entries[dir] = &entry{kind: kindDir, perm: 0o755}
	return nil
}

// Dir adds a directory.
func (a *Archive) Dir(name string, perm fs.FileMode) error {
	return a.add(name, &entry{kind: kindDir, perm: perm.Perm()})
}

// File adds a regular file with the given contents.
func (a *Archive) File(name string, data []byte, perm fs.FileMode) error {
	return a.add(name, &entry{kind: kindFile, data: data, perm: perm.Perm()})
}

// HostFile adds the host's regular file hostPath at name. A zero perm keeps
// the host file's permission bits.
func (a *Archive) HostFile(name, hostPath string, perm fs.FileMode) error {
	fi, err := os.Stat(hostPath)
	if err != nil {
		return fmt.Errorf("adding %s: %w", hostPath, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("adding %s: not a regular file", hostPath)
	}
	if perm == 0 {
		perm = fi.Mode().Perm()
	}
	return a.add(name, &entry{kind: kindFile, host: hostPath, perm: perm.Perm()})
}

// Symlink adds a symbolic link name -> target.
func (a *Archive) Symlink(name, target string) error {
	return a.add(name, &entry{kind: kindSymlink, target: target, perm: 0o777})
}

// CharDev adds a character device node.
func (a *Archive) CharDev(name string, perm fs.FileMode, major, minor uint64) error {
	return a.add(name, &entry{kind: kindCharDev, perm: perm.Perm(), major: major, minor: minor})
}

// Has reports whether the archive holds name.
func (a *Archive) Has(name string) bool {
	n, err := cleanName(name)
	return err == nil && a.entries[n] != nil
}

// MirrorHost copies the host path p into the archive at the same path.
// Symlinks met on the way (such as Debian's merged-/usr /lib -> usr/lib)
// are reproduced as symlinks and their targets copied too, so the L1 sees
// the host's layout; a directory is copied recursively. Where the archive
// already has a real directory in place of a host symlink (busybox fills
// /bin and /sbin, which merged-/usr hosts link to usr/), the link is
// followed on the host and the contents go below the archive's directory.
func (a *Archive) MirrorHost(p string) error {
	if !filepath.IsAbs(p) {
		return fmt.Errorf("mirroring %s: host path must be absolute", p)
	}
	arch, host, err := a.mirrorLinks(p, 0)
	if err != nil {
		return fmt.Errorf("mirroring %s: %w", p, err)
	}
	fi, err := os.Stat(host)
	if err != nil {
		return fmt.Errorf("mirroring %s: %w", p, err)
	}
	if !fi.IsDir() {
		return a.HostFile(arch, host, 0)
	}
	if a.mirrored == nil {
		a.mirrored = map[string]bool{}
	}
	if a.mirrored[host] {
		return nil // already copied; also stops symlink cycles
	}
	a.mirrored[host] = true
	err = filepath.WalkDir(host, func(q string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(host, q)
		if err != nil {
			return err
		}
		aq := filepath.Join(arch, rel)
		switch {
		case d.IsDir():
			info, err := d.Info()
			if err != nil {
				return err
			}
			return a.Dir(aq, info.Mode().Perm())
		case d.Type()&fs.ModeSymlink != 0:
			if aq != q {
				// Below a followed link: copy what it points to.
				if _, err := os.Stat(q); err != nil {
					return nil // dangling
				}
				real, err := filepath.EvalSymlinks(q)
				if err != nil {
					return err
				}
				if fi, err := os.Stat(real); err == nil && fi.Mode().IsRegular() {
					return a.HostFile(aq, real, 0)
				}
				return nil
			}
			// Mirror the link and what it points to (e.g.
			// /usr/share/qemu/OVMF.fd -> ../ovmf/OVMF.fd); a
			// dangling link is kept as it is, as on the host.
			if _, err := os.Stat(q); err != nil {
				t, err := os.Readlink(q)
				if err != nil {
					return err
				}
				return a.Symlink(q, t)
			}
			return a.MirrorHost(q)
		case d.Type().IsRegular():
			return a.HostFile(aq, q, 0)
		}
		return nil // sockets, fifos, devices: not wanted in an initramfs
	})
	if err != nil {
		return fmt.Errorf("mirroring %s: %w", p, err)
	}
	return nil
}

// mirrorLinks walks p component by component, adding every symlink it
// meets to the archive. It returns where p lands in the archive and the
// host path with all links resolved, which differ only where a host link
// was followed instead of mirrored.
func (a *Archive) mirrorLinks(p string, depth int) (arch, host string, err error) {
	if depth > 40 {
		return "", "", fmt.Errorf("too many levels of symbolic links at %s", p)
	}
	arch, host = "/", "/"
	parts := strings.Split(strings.TrimPrefix(filepath.Clean(p), "/"), "/")
	for i, part := range parts {
		if part == "" {
			continue
		}
		anext, hnext := filepath.Join(arch, part), filepath.Join(host, part)
		fi, err := os.Lstat(hnext)
		if err != nil {
			return "", "", err
		}
		if fi.Mode()&fs.ModeSymlink == 0 {
			if fi.IsDir() && i < len(parts)-1 {
				if err := a.Dir(anext, fi.Mode().Perm()); err != nil {
					return "", "", err
				}
			}
			arch, host = anext, hnext
			continue
		}
		existing := a.entries[strings.TrimPrefix(anext, "/")]
		if anext != hnext || (existing != nil && existing.kind == kindDir) {
			real, err := filepath.EvalSymlinks(hnext)
			if err != nil {
				return "", "", err
			}
			arch, host = anext, real
			continue
		}
		t, err := os.Readlink(hnext)
		if err != nil {
			return "", "", err
		}
		if err := a.Symlink(anext, t); err != nil {
			return "", "", err
		}
		abs := t
		if !filepath.IsAbs(t) {
			abs = filepath.Join(host, t)
		}
		if arch, host, err = a.mirrorLinks(abs, depth+1); err != nil {
			return "", "", err
		}
	}
	return arch, host, nil
}

// lddLine matches the library paths in ldd's output: "libz.so.1 =>
// /lib/x86_64-linux-gnu/libz.so.1 (0x...)" and "/lib64/ld-linux-x86-64.so.2
// (0x...)".
var lddLine = regexp.MustCompile(`^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)`)

// HostExecutable mirrors a host executable together with the shared
// libraries and dynamic loader that ldd resolves for it, so a dynamic
// binary such as qemu-system-x86_64 runs inside the L1 unchanged.
func (a *Archive) HostExecutable(ctx context.Context, p string) error {
	if err := a.MirrorHost(p); err != nil {
		return err
	}
	libs, err := SharedLibs(ctx, p)
	if err != nil {
		return err
	}
	for _, l := range libs {
		if err := a.MirrorHost(l); err != nil {
			return fmt.Errorf("library of %s: %w", p, err)
		}
	}
	return nil
}

// SharedLibs lists the shared objects (loader included) that ldd resolves
// for p; a static binary has none.
func SharedLibs(ctx context.Context, p string) ([]string, error) {
	out, err := exec.CommandContext(ctx, "ldd", p).CombinedOutput()
	text := string(out)
	if strings.Contains(text, "not a dynamic executable") || strings.Contains(text, "statically linked") {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("ldd %s: %w\n%s", p, err, out)
	}
	var libs []string
	for _, line := range strings.Split(text, "\n") {
		if strings.Contains(line, "=> not found") {
			return nil, fmt.Errorf("ldd %s: missing library: %s", p, strings.TrimSpace(line))
		}
		if m := lddLine.FindStringSubmatch(line); m != nil {
			libs = append(libs, m[1])
		}
	}
	return libs, nil
}

// Busybox adds a static busybox at /bin/busybox and a symlink for each of
// its applets at the path busybox itself reports (--list-full), so scripts
// can call sh, mount, insmod, timeout, awk... directly.
func (a *Archive) Busybox(ctx context.Context, hostBusybox string) error {
	libs, err := SharedLibs(ctx, hostBusybox)
	if err != nil {
		return err
	}
	if len(libs) > 0 {
		return fmt.Errorf("%s is dynamically linked; install busybox-static", hostBusybox)
	}
	if err := a.HostFile("bin/busybox", hostBusybox, 0o755); err != nil {
		return err
	}
	out, err := exec.CommandContext(ctx, hostBusybox, "--list-full").Output()
	if err != nil {
		return fmt.Errorf("%s --list-full: %w", hostBusybox, err)
	}
	for _, app := range strings.Fields(string(out)) {
		if app == "bin/busybox" || a.Has(app) {
			continue
		}
		if err := a.Symlink(app, "/bin/busybox"); err != nil {
			return fmt.Errorf("busybox applet %s: %w", app, err)
		}
	}
	return nil
}

// Write writes the archive to w in newc format.
func (a *Archive) Write(w io.Writer) error {
	names := make([]string, 0, len(a.entries))
	for n := range a.entries {
		names = append(names, n)
	}
	// Plain string order puts "a" before "a/b": parents come first.
	sort.Strings(names)

	bw := bufio.NewWriterSize(w, 1<<20)
	rw := cpio.Newc.Writer(bw)
	var ino uint64
	for _, n := range names {
		e := a.entries[n]
		ino++
		info := cpio.Info{Name: n, Ino: ino, NLink: 1, Mode: uint64(e.perm)}
		var rec cpio.Record
		switch e.kind {
		case kindDir:
			info.Mode |= cpio.S_IFDIR
			info.NLink = 2
			rec = cpio.Record{Info: info}
		case kindSymlink:
			info.Mode |= cpio.S_IFLNK
			rec = cpio.StaticRecord([]byte(e.target), info)
		case kindCharDev:
			info.Mode |= cpio.S_IFCHR
			info.Rmajor, info.Rminor = e.major, e.minor
			rec = cpio.Record{Info: info}
		case kindFile:
			info.Mode |= cpio.S_IFREG
			if e.host == "" {
				rec = cpio.StaticRecord(e.data, info)
				break
			}
			f, err := os.Open(e.host)
			if err != nil {
				return fmt.Errorf("archive entry %s: %w", n, err)
			}
			fi, err := f.Stat()
			if err != nil {
				f.Close()
				return fmt.Errorf("archive entry %s: %w", n, err)
			}
			info.FileSize = uint64(fi.Size())
			// The cpio writer closes f once its contents are copied.
			rec = cpio.Record{ReaderAt: f, Info: info}
		}
		if err := rw.WriteRecord(rec); err != nil {
			if c, ok := rec.ReaderAt.(io.Closer); ok {
				c.Close()
			}
			return fmt.Errorf("writing archive entry %s: %w", n, err)
		}
	}
	if err := cpio.WriteTrailer(rw); err != nil {
		return fmt.Errorf("writing archive trailer: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("writing archive: %w", err)
	}
	return nil
}

// WriteFile writes the archive to path atomically.
func (a *Archive) WriteFile(path string) error {
	return createAtomic(path, 0o644, a.Write)
}
