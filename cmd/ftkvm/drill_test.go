package main

import (
	"fmt"
	"strings"
	"testing"
)

// The drill's checks: consoles joined at the logged offsets, with the
// repeated bytes compared, and a lost or changed byte reported.
func TestJoinSegments(t *testing.T) {
	for _, tc := range []struct {
		name string
		segs []segment
		want string
		reps []int
		err  string
	}{
		{name: "no repeat", segs: []segment{{out: "abc"}, {out: "def", seam: 3, uncertain: 2}}, want: "abcdef", reps: []int{0}},
		{name: "repeat", segs: []segment{{out: "abcd"}, {out: "def", seam: 3, uncertain: 2}}, want: "abcdef", reps: []int{1}},
		{name: "two takeovers", segs: []segment{{out: "ab"}, {out: "cd", seam: 2}, {out: "def", seam: 3, uncertain: 1}}, want: "abcdef", reps: []int{0, 1}},
		{name: "byte lost", segs: []segment{{out: "ab"}, {out: "def", seam: 3}}, err: "bytes lost"},
		{name: "byte changed", segs: []segment{{out: "abcX"}, {out: "def", seam: 3, uncertain: 2}}, err: "differ"},
		{name: "more than uncertain", segs: []segment{{out: "abcde"}, {out: "def", seam: 3, uncertain: 1}}, err: "only 1 were uncertain"},
	} {
		got, reps, err := joinSegments(tc.segs)
		switch {
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%s: %q %v, want an error with %q", tc.name, got, err, tc.err)
		case tc.err == "" && (err != nil || got != tc.want || len(reps) != len(tc.reps)):
			t.Errorf("%s: %q %v %v, want %q %v", tc.name, got, reps, err, tc.want, tc.reps)
		}
	}
}

func TestCheckConsole(t *testing.T) {
	for _, tc := range []struct {
		name, out string
		ok        bool
	}{
		{"whole", "counter 1 ticks=3\ncounter 2 ticks=7\ncounter 3 ticks=11\ntestos: PASS\n", true},
		{"not the counter workload", "hello\n", true},
		{"a line cut at its start", "counter 1 ticks=3\nounter 2 ticks=7\ntestos: PASS\n", false},
		{"a gap", "counter 1 ticks=3\ncounter 3 ticks=11\ntestos: PASS\n", false},
		{"a repeat", "counter 1 ticks=3\ncounter 2 ticks=7\ncounter 2 ticks=7\ntestos: PASS\n", false},
		{"not from 1", "counter 2 ticks=7\ntestos: PASS\n", false},
		{"ticks back", "counter 1 ticks=13\ncounter 2 ticks=7\ntestos: PASS\n", false},
		{"a cut line", "counter 1 ticks=3\ncounter 2 tick\ntestos: PASS\n", false},
		{"no verdict", "counter 1 ticks=3\ncounter 2 ticks=7\n", false},
		{"a failed guest", "counter 1 ticks=3\ntestos: FAIL counter\n", false},
	} {
		if err := checkConsole(tc.out); (err == nil) != tc.ok {
			t.Errorf("%s: %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}

// drillConsole is what the test guest writes in a drill (the Makefile's
// workload=counter ... wait=4): a banner, numbered lines about 4 ticks
// apart, the verdict.
func drillConsole(lines int) string {
	var b strings.Builder
	b.WriteString("testos: workload=counter\n")
	for i, t := 1, 2; i <= lines; i++ {
		t += 4 + i%3
		fmt.Fprintf(&b, "counter %d ticks=%d\n", i, t)
	}
	b.WriteString("testos: PASS\n")
	return b.String()
}

// The drill's verdict fails whenever a byte of output is lost: a console
// cut into three primaries' segments (two takeovers, bytes repeated at one
// seam) passes whole, and fails with any one byte dropped from the
// console it is joined from, from the first counter line's tick count on.
// (A byte dropped from the repeated tail of a killed primary is caught as
// repeated bytes that differ, TestJoinSegments; its very last byte is no
// loss: the dead primary just showed one byte less, and the backup
// performs it.)
func TestCheckDrillLostByte(t *testing.T) {
	full := drillConsole(40)
	cut1, cut2 := len(full)/3, 2*len(full)/3
	segsOf := func(console string, drop int) []segment {
		// The first primary showed up to cut1+5 (5 uncertain bytes
		// that the second performs again), the second up to cut2, the
		// third the rest.
		s := []segment{
			{out: console[:cut1+5]},
			{out: console[cut1:cut2], seam: cut1, uncertain: 8},
			{out: console[cut2:], seam: cut2, uncertain: 3},
		}
		for i := range s {
			end := len(console)
			if i+1 < len(s) {
				end = s[i+1].seam
			}
			if drop >= s[i].seam && drop < end {
				k := drop - s[i].seam
				s[i].out = s[i].out[:k] + s[i].out[k+1:]
			}
		}
		return s
	}
	joined, reps, err := checkDrill(segsOf(full, -1))
	if err != nil || joined != full || len(reps) != 2 || reps[0] != 5 || reps[1] != 0 {
		t.Fatalf("the whole console: %v, repeats %v, joined equal: %v", err, reps, joined == full)
	}
	from := strings.Index(full, "counter 1 ticks=") + len("counter 1 ticks=")
	from = strings.IndexByte(full[from:], '\n') + from // the first tick count's digits are not checkable
	for drop := from; drop < len(full); drop++ {
		if _, _, err := checkDrill(segsOf(full, drop)); err == nil {
			t.Errorf("byte %d (%q before %q) dropped, and the drill passed", drop, full[drop], full[drop+1:min(len(full), drop+10)])
		}
	}
}
