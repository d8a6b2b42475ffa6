// Command images builds ftkvm's Linux test images into a cache directory:
// the pinned Debian kernel (bzImage, PVH vmlinux, kvm modules) and the L2
// guest initramfs. It is idempotent: outputs that still match their
// recorded checksums are left alone. See tools/images/imagelib.
//
//	go run ./tools/images [-cache DIR]     build, then print the paths
//	go run ./tools/images -print          print the paths only
//
// The cache defaults to $FTKVM_CACHE, else $XDG_CACHE_HOME/ftkvm, else
// ~/.cache/ftkvm. Paths are printed as "name path" lines.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"

	"github.com/ftkvm/ftkvm/tools/images/imagelib"
)

func main() {
	cache := flag.String("cache", "", "cache directory (default $FTKVM_CACHE, $XDG_CACHE_HOME/ftkvm or ~/.cache/ftkvm)")
	printOnly := flag.Bool("print", false, "only print the output paths; exit 1 if any is missing")
	busybox := flag.String("busybox", imagelib.HostBusybox, "static busybox to put in the initramfs")
	flag.Parse()
	if err := run(*cache, *busybox, *printOnly); err != nil {
		fmt.Fprintln(os.Stderr, "images:", err)
		os.Exit(1)
	}
}

func run(cache, busybox string, printOnly bool) error {
	if cache == "" {
		var err error
		if cache, err = imagelib.DefaultCacheDir(); err != nil {
			return err
		}
	}
	if printOnly {
		im := imagelib.Layout(cache)
		missing := 0
		for _, p := range im.Paths() {
			fmt.Printf("%s %s\n", p[0], p[1])
			if _, err := os.Stat(p[1]); err != nil {
				missing++
			}
		}
		if missing > 0 {
			return fmt.Errorf("%d of the images are missing; run without -print to build them", missing)
		}
		return nil
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	im, err := imagelib.Build(ctx, imagelib.Options{Cache: cache, Busybox: busybox, Log: os.Stderr})
	if errors.Is(err, imagelib.ErrUnavailable) {
		return fmt.Errorf("%w\n(test/nested/setup-deps.sh installs what is needed)", err)
	}
	if err != nil {
		return err
	}
	for _, p := range im.Paths() {
		fmt.Printf("%s %s\n", p[0], p[1])
	}
	return nil
}
