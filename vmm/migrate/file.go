package migrate

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/ftkvm/ftkvm/vmm"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// Target is what a stream is loaded into: a machine made for it, not yet
// running. *vmm.Machine is one.
type Target interface {
	Memory() []byte
	Install(*snapshot.State) error
	Close() error
}

// Build makes the target for a stream, given its header.
type Build func(h snapshot.Header) (Target, error)

// WriteFile saves m into a snapshot file at path. It writes a temporary
// file next to it and renames it when complete, so a failed or interrupted
// save never leaves a partial file under path. As with Save, on success the
// guest is left paused.
func WriteFile(m *vmm.Machine, path string, opts Options) (Result, error) {
	opts.Kind = snapshot.KindSnapshot
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return Result{}, fmt.Errorf("create snapshot: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err := io.WriteString(tmp, snapshot.Magic); err != nil {
		return Result{}, fmt.Errorf("write snapshot: %w", err)
	}
	res, err := Save(m, tmp, opts)
	if err != nil {
		return res, fmt.Errorf("write snapshot: %w", err)
	}
	res.Bytes += int64(len(snapshot.Magic))
	fail := func(err error) (Result, error) {
		_ = m.Resume()
		return res, fmt.Errorf("write snapshot: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return fail(err)
	}
	if err := tmp.Close(); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fail(err)
	}
	ok = true
	return res, nil
}

// ReadFile restores a snapshot file into a target made by build: memory
// first, then, once the whole file verified, the state. On error the target
// is closed: nothing half-installed survives. progress, if set, gets the
// bytes read so far.
func ReadFile(path string, build Build, progress func(int64)) (Target, *snapshot.State, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	fr, err := snapshot.OpenFile(bufio.NewReaderSize(f, 1<<20))
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	t, st, err := load(fr, build, progress, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	if _, _, err := fr.Next(); err != io.EOF {
		t.Close()
		if err == nil {
			err = fmt.Errorf("data after the end frame: %w", snapshot.ErrCorrupt)
		}
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	return t, st, nil
}

// load reads one stream into a new target and installs its state. want,
// if set, is the header the stream must match (the migration hello).
func load(fr *snapshot.Reader, build Build, progress func(int64), want *snapshot.Header) (t Target, st *snapshot.State, err error) {
	defer func() {
		if err != nil && t != nil {
			t.Close()
			t = nil
		}
	}()
	sr := snapshot.NewStreamReader(fr, func(h snapshot.Header) ([]byte, error) {
		if want != nil && h.MemSize != want.MemSize {
			return nil, fmt.Errorf("stream for %d bytes of memory after a hello for %d: %w", h.MemSize, want.MemSize, snapshot.ErrCorrupt)
		}
		if t != nil {
			return nil, errors.New("second header")
		}
		var err error
		if t, err = build(h); err != nil {
			return nil, err
		}
		return t.Memory(), nil
	})
	sr.Progress = progress
	if st, err = sr.Read(); err != nil {
		return t, nil, err
	}
	if err = t.Install(st); err != nil {
		return t, nil, fmt.Errorf("install: %w", err)
	}
	return t, st, nil
}
