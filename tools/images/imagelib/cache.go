// Package imagelib builds the Linux guest images used by ftkvm's tests: a
// pinned Debian kernel (bzImage, the uncompressed PVH vmlinux and the kvm
// modules an L1 needs to offer /dev/kvm), and a busybox initramfs for L2
// guests. Everything lands in a cache directory and is rebuilt only when a
// recorded size/SHA-256 no longer matches, so tests can call Build on every
// run at little cost.
package imagelib

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
)

// DefaultCacheDir returns the cache directory used when none is given:
// $FTKVM_CACHE, else $XDG_CACHE_HOME/ftkvm, else ~/.cache/ftkvm.
func DefaultCacheDir() (string, error) {
	if d := os.Getenv("FTKVM_CACHE"); d != "" {
		return d, nil
	}
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "ftkvm"), nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("finding the default cache directory: %w", err)
	}
	return filepath.Join(home, ".cache", "ftkvm"), nil
}

// lockCache takes an exclusive flock on the cache directory so that
// parallel test binaries (go test ./... runs packages concurrently) do not
// download or write the same outputs at the same time.
func lockCache(dir string) (unlock func(), err error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating cache directory: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening cache lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("locking cache %s: %w", dir, err)
	}
	return func() {
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}, nil
}

// fileSum is the size and SHA-256 of one output file, as recorded in a
// manifest.
type fileSum struct {
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// manifest records what a build step produced, so a later run can verify
// its outputs instead of redoing the step. Inputs identifies what the
// outputs were built from; a change there forces a rebuild.
type manifest struct {
	Inputs map[string]string  `json:"inputs"`
	Files  map[string]fileSum `json:"files"` // keyed by path relative to the manifest's directory
}

func sumFile(path string) (fileSum, error) {
	f, err := os.Open(path)
	if err != nil {
		return fileSum{}, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return fileSum{}, fmt.Errorf("hashing %s: %w", path, err)
	}
	return fileSum{Size: n, SHA256: hex.EncodeToString(h.Sum(nil))}, nil
}

// readManifest loads dir/name; a missing file is not an error (nil result).
func readManifest(path string) (*manifest, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading manifest: %w", err)
	}
	var m manifest
	if err := json.Unmarshal(b, &m); err != nil {
		// A corrupt manifest only means the step must be redone.
		return nil, nil
	}
	return &m, nil
}

// valid reports whether m was made from inputs and every file it lists
// still has its recorded size and checksum. Sizes are compared first so a
// truncated file is caught without hashing it.
func (m *manifest) valid(dir string, inputs map[string]string) bool {
	if m == nil || len(m.Files) == 0 || len(m.Inputs) != len(inputs) {
		return false
	}
	for k, v := range inputs {
		if m.Inputs[k] != v {
			return false
		}
	}
	for rel, want := range m.Files {
		p := filepath.Join(dir, rel)
		fi, err := os.Stat(p)
		if err != nil || fi.Size() != want.Size {
			return false
		}
	}
	for rel, want := range m.Files {
		got, err := sumFile(filepath.Join(dir, rel))
		if err != nil || got != want {
			return false
		}
	}
	return true
}

// writeManifest records the sums of files (relative to dir) under inputs.
// It is written last and atomically: its presence means the step finished.
func writeManifest(path, dir string, inputs map[string]string, files []string) error {
	m := manifest{Inputs: inputs, Files: map[string]fileSum{}}
	for _, rel := range files {
		s, err := sumFile(filepath.Join(dir, rel))
		if err != nil {
			return fmt.Errorf("recording %s in manifest: %w", rel, err)
		}
		m.Files[rel] = s
	}
	b, err := json.MarshalIndent(&m, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding manifest: %w", err)
	}
	return writeFileAtomic(path, append(b, '\n'), 0o644)
}

// writeFileAtomic writes data to a temporary file beside path and renames
// it into place, so an interrupted build never leaves a half-written output
// that a size check could mistake for a good one.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	return createAtomic(path, perm, func(w io.Writer) error {
		_, err := w.Write(data)
		return err
	})
}

// createAtomic creates path through fill, via a temporary file and rename.
func createAtomic(path string, perm os.FileMode, fill func(io.Writer) error) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("creating directory for %s: %w", path, err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("creating temporary file for %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename
	if err := fill(tmp); err != nil {
		tmp.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return fmt.Errorf("setting mode of %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("closing %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("renaming into %s: %w", path, err)
	}
	return nil
}
