package main

import "testing"

func TestParseMiB(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint64 // 0: an error
	}{
		{"256", 256}, {"2", 2}, {"512M", 512}, {"512MiB", 512}, {"512MB", 512}, {"1G", 1024},
		{"1GiB", 1024}, {"2g", 2048}, {"1T", 1 << 20}, {"4096K", 4}, {"2048k", 2},
		{"3", 0}, {"0", 0}, {"1", 0}, {"1025K", 0}, {"1536K", 0}, {"2T", 0}, {"", 0}, {"G", 0},
		{"-2", 0}, {"1.5G", 0}, {"2X", 0}, {"99999999999999999999", 0}, {"18014398509481984K", 0},
	} {
		got, err := parseMiB(tc.in)
		if tc.want == 0 {
			if err == nil {
				t.Errorf("%q: %d, want an error", tc.in, got)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%q: %d %v, want %d", tc.in, got, err, tc.want)
		}
	}
}

func TestParseRate(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"0", 0, true}, {"512K", 512 << 10, true}, {"100M", 100 << 20, true}, {"1GiB/s", 1 << 30, true},
		{"2T", 0, false}, {"x", 0, false}, {"-1", 0, false},
	} {
		got, err := parseRate(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("%q: %d %v", tc.in, got, err)
		}
	}
}
