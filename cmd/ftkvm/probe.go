package main

import (
	"encoding/json"
	"fmt"
	"os"
	"text/tabwriter"

	"github.com/ftkvm/ftkvm/vmm"
)

type probeCmd struct {
	Device string `help:"KVM device." default:"/dev/kvm"`
	JSON   bool   `help:"Print the findings as one JSON object."`
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func (c *probeCmd) run() (int, error) {
	r, err := vmm.Probe(c.Device)
	if err != nil {
		return 0, err
	}
	if c.JSON {
		return c.printJSON(r)
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "device\t%s\n", r.Device)
	fmt.Fprintf(w, "api version\t%d\n", r.APIVersion)
	missing := 0
	for _, cs := range r.Caps {
		note := ""
		if cs.Required {
			note = " (required)"
			if cs.Value == 0 {
				missing++
				note = " (REQUIRED, MISSING)"
			}
		}
		fmt.Fprintf(w, "cap %v\t%d%s\n", cs.Cap, cs.Value, note)
	}
	mode := "emulated"
	if r.Ring0Native {
		mode = "native"
	}
	fmt.Fprintf(w, "ring 0\t%s (%.3g instructions/s)\n", mode, r.Ring0IPS)
	fmt.Fprintf(w, "ring 3\t%.3g instructions/s\n", r.Ring3IPS)
	fmt.Fprintf(w, "single-step ring 0\t%s (%s)\n", yesNo(r.SingleStepRing0), r.SingleStepRing0Detail)
	fmt.Fprintf(w, "single-step ring 3\t%s (%s)\n", yesNo(r.SingleStepRing3), r.SingleStepRing3Detail)
	fmt.Fprintf(w, "single-step exact\t%s (%s)\n", yesNo(r.StepExact), r.StepExactDetail)
	fmt.Fprintf(w, "breakpoints\t%s (%s)\n", yesNo(r.Breakpoints), r.BreakpointsDetail)
	fmt.Fprintf(w, "performance counters\t%s (%s)\n", yesNo(r.PMU), r.PMUDetail)
	fmt.Fprintf(w, "perf event\t%s (%s)\n", yesNo(r.PerfEventKnown), r.PerfEvent)
	if r.PMU {
		fmt.Fprintf(w, "perf guest-only\t%s (%s)\n", yesNo(r.PerfGuestOnly), r.PerfGuestOnlyDetail)
	}
	switch {
	case r.PerfSkidDetail != "":
		fmt.Fprintf(w, "perf skid\tnot measured (%s)\n", r.PerfSkidDetail)
	case r.PerfGuestOnly:
		fmt.Fprintf(w, "perf skid\tup to %d events measured, margin %d\n", r.PerfSkid, r.PerfMargin)
	default:
		fmt.Fprintf(w, "perf skid\tnot measured (no counter)\n")
	}
	ok, detail := vmm.StepClockUsable(r)
	fmt.Fprintf(w, "epoch clock step\t%s (%s)\n", yesNo(ok), detail)
	ok, detail = vmm.PerfClockUsable(r)
	fmt.Fprintf(w, "epoch clock perf\t%s (%s)\n", yesNo(ok), detail)
	w.Flush()
	if missing > 0 {
		return 0, fmt.Errorf("%s lacks %d capabilities ftkvm requires", r.Device, missing)
	}
	return 0, nil
}

// printJSON prints the probe's findings and the epoch clocks' verdicts.
func (c *probeCmd) printJSON(r *vmm.ProbeReport) (int, error) {
	type verdict struct {
		Usable bool   `json:"usable"`
		Detail string `json:"detail"`
	}
	step, stepWhy := vmm.StepClockUsable(r)
	perf, perfWhy := vmm.PerfClockUsable(r)
	out := struct {
		*vmm.ProbeReport
		StepClock verdict `json:"step_clock"`
		PerfClock verdict `json:"perf_clock"`
	}{r, verdict{step, stepWhy}, verdict{perf, perfWhy}}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(out); err != nil {
		return 0, err
	}
	for _, cs := range r.Caps {
		if cs.Required && cs.Value == 0 {
			return 0, fmt.Errorf("%s lacks capabilities ftkvm requires", r.Device)
		}
	}
	return 0, nil
}
