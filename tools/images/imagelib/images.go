package imagelib

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
)

// Options configures Build.
type Options struct {
	// Cache is the cache directory; empty means DefaultCacheDir().
	Cache string
	// Busybox is the static busybox to put in initramfs images; empty
	// means HostBusybox.
	Busybox string
	// Log receives progress lines for slow steps; nil discards them.
	Log io.Writer
}

// Images are the paths of everything Build produces.
type Images struct {
	Cache          string
	KernelPackage  string // Debian package name and version they came from
	KernelVersion  string
	Vmlinuz        string   // bzImage
	Vmlinux        string   // uncompressed ELF with a PVH note
	PVHEntry       uint64   // its PVH entry point (0 from Layout)
	Modules        []string // irqbypass.ko, kvm.ko, ccp.ko, kvm-amd.ko, in load order
	GuestInitramfs string   // L2 busybox initramfs (newc cpio)
	Busybox        string   // host static busybox used in the images
}

// Layout returns where Build puts its outputs in cache, without building
// or checking anything.
func Layout(cache string) *Images {
	_, k := kernelLayout(cache)
	return &Images{
		Cache:          cache,
		KernelPackage:  KernelPackage,
		KernelVersion:  KernelDebVersion,
		Vmlinuz:        k.Vmlinuz,
		Vmlinux:        k.Vmlinux,
		Modules:        k.Modules,
		GuestInitramfs: filepath.Join(cache, "initramfs-guest.cpio"),
		Busybox:        HostBusybox,
	}
}

// Paths lists the outputs as name/path pairs, in a stable order.
func (im *Images) Paths() [][2]string {
	p := [][2]string{
		{"vmlinuz", im.Vmlinuz},
		{"vmlinux", im.Vmlinux},
	}
	for i, m := range KVMModules {
		p = append(p, [2]string{m + ".ko", im.Modules[i]})
	}
	return append(p, [2]string{"initramfs-guest.cpio", im.GuestInitramfs})
}

// Build produces (or verifies) every image in the cache. Steps whose
// outputs still match their manifests are skipped, so a second call is
// cheap (hashing only) and needs no network. Errors that come from the
// host being unable to provide the pinned kernel wrap ErrUnavailable.
func Build(ctx context.Context, opt Options) (*Images, error) {
	cache := opt.Cache
	if cache == "" {
		var err error
		if cache, err = DefaultCacheDir(); err != nil {
			return nil, err
		}
	}
	cache, err := filepath.Abs(cache)
	if err != nil {
		return nil, fmt.Errorf("cache directory: %w", err)
	}
	logw := opt.Log
	if logw == nil {
		logw = io.Discard
	}
	unlock, err := lockCache(cache)
	if err != nil {
		return nil, err
	}
	defer unlock()

	im := Layout(cache)
	if opt.Busybox != "" {
		im.Busybox = opt.Busybox
	}
	k, err := fetchKernel(ctx, cache, logw)
	if err != nil {
		return nil, fmt.Errorf("kernel %s: %w", KernelPackage, err)
	}
	im.PVHEntry = k.PVHEntry
	if err := buildGuestInitramfs(ctx, im.GuestInitramfs, im.Busybox, logw); err != nil {
		return nil, err
	}
	return im, nil
}
