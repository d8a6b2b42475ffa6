package main

import (
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
	if err := checkConsole("counter 1 ticks=3\ncounter 2 ticks=6\ncounter 3 ticks=9\n"); err != nil {
		t.Error(err)
	}
	if err := checkConsole("counter 1 ticks=3\ncounter 3 ticks=9\n"); err == nil {
		t.Error("a gap passed")
	}
	if err := checkConsole("counter 1 ticks=3\ncounter 2 ticks=6\ncounter 2 ticks=6\n"); err == nil {
		t.Error("a repeat passed")
	}
}
