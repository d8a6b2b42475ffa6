package main

import (
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestFit(t *testing.T) {
	for _, c := range []struct {
		name      string
		x, y      []float64
		slope, r2 float64
	}{
		{"exact line", []float64{1, 2, 3, 4}, []float64{12, 14, 16, 18}, 2, 1},
		{"no relation", []float64{1, 2, 3, 4}, []float64{1, 3, 3, 1}, 0, 0},
		{"constant x", []float64{5, 5, 5}, []float64{1, 2, 3}, 0, 0},
		{"noisy", []float64{0, 1, 2, 3}, []float64{0, 2, 1, 3}, 0.8, 0.64},
	} {
		t.Run(c.name, func(t *testing.T) {
			slope, r2 := fit(c.x, c.y)
			if math.Abs(slope-c.slope) > 1e-9 || math.Abs(r2-c.r2) > 1e-9 {
				t.Errorf("fit = %v, %v; want %v, %v", slope, r2, c.slope, c.r2)
			}
		})
	}
}

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		v    []float64
		want float64
	}{
		{[]float64{3}, 3},
		{[]float64{3, 1, 2}, 2},
		{[]float64{4, 1, 3, 2}, 2.5},
	} {
		if got := median(c.v); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.v, got, c.want)
		}
	}
}

// The figure can be redrawn from the table: what formatTable writes,
// redraw reads back, every row and every plotted figure.
func TestTableRoundTrip(t *testing.T) {
	rs := []result{
		{key: key{"compute", "output-commit", 100 * time.Microsecond}, ratio: 0.71, lo: 0.38, hi: 1.2, cpu: 0.83, cpuLo: 0.55, cpuHi: 0.94,
			ft: 800 * time.Millisecond, pair: 1120 * time.Millisecond, epochs: 265, meanEpoch: 2.43},
		{key: key{"counter --verify", "strict", 100 * time.Millisecond}, ratio: 1.85, lo: 1.8, hi: 5.39, cpu: 1.81, cpuLo: 1.75, cpuHi: 2.51,
			ft: 4390 * time.Millisecond, pair: 2370 * time.Millisecond, epochs: 6820, meanEpoch: 0.61},
	}
	dir := t.TempDir()
	md := filepath.Join(dir, "epochs.md")
	if err := os.WriteFile(md, []byte("# title\n\n"+beginMark+"\nold\n"+endMark+"\n\nclosing note\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := writeTable(md, formatTable(rs, 3, time.Minute)); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(md)
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	if !strings.HasPrefix(text, "# title\n") || !strings.HasSuffix(text, endMark+"\n\nclosing note\n") || strings.Contains(text, "old") {
		t.Fatalf("the table did not replace the marked part only:\n%s", text)
	}
	got, reps, err := parseTable(text)
	if err != nil {
		t.Fatal(err)
	}
	if reps != 3 || len(got) != len(rs) {
		t.Fatalf("parsed %d rounds and %d rows, want 3 and %d:\n%s", reps, len(got), len(rs), text)
	}
	for i, r := range rs {
		g := got[i]
		if g.key != r.key || g.ratio != r.ratio || g.lo != r.lo || g.hi != r.hi || g.cpu != r.cpu ||
			g.cpuLo != r.cpuLo || g.cpuHi != r.cpuHi || g.epochs != r.epochs || g.meanEpoch != r.meanEpoch {
			t.Errorf("row %d: parsed %+v, want %+v", i, g, r)
		}
	}
	if err := redraw(dir); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(dir, "epochs.png")); err != nil || fi.Size() == 0 {
		t.Fatalf("no plot: %v", err)
	}
}
