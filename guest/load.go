package guest

import "fmt"

// Load recognises the kernel format and loads it: an ELF by PVH, a bzImage
// by the Linux 64-bit boot protocol.
func Load(mem, image, initrd []byte, cmdline string) (*Entry, error) {
	switch {
	case len(image) == 0:
		return nil, ErrEmpty
	case IsELF(image):
		return LoadPVH(mem, image, initrd, cmdline)
	case IsBzImage(image):
		return LoadBzImage(mem, image, initrd, cmdline)
	}
	return nil, fmt.Errorf("%w: %d bytes starting % x", ErrNotKernel, len(image), image[:min(len(image), 8)])
}
