package main

import (
	"fmt"
	"os"

	"github.com/ftkvm/ftkvm/ft/driver"
	"github.com/ftkvm/ftkvm/vmm"
)

// printExitProfile prints the machine's exit profile, and a replica's
// profile if r is set, on stderr (--exit-stats). Run must have returned.
func printExitProfile(m *vmm.Machine, r *driver.Replica) {
	fmt.Fprintln(os.Stderr)
	if err := m.ExitProfile().WriteTable(os.Stderr); err != nil {
		return
	}
	if r != nil {
		fmt.Fprintln(os.Stderr)
		_ = r.Profile().WriteTable(os.Stderr)
	}
}
