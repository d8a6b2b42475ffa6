package nested_test

import (
	"reflect"
	"testing"

	"github.com/ftkvm/ftkvm/test/nested"
)

func TestParseConsole(t *testing.T) {
	// Canned L1 console: CRLF line ends, a kernel message outside any
	// command, an output line without newline before END, a nonzero rc,
	// a command killed by its timeout, and a last command cut off.
	console := "" +
		"[    0.000000] Linux version 6.1.0-56-amd64\r\n" +
		"@@FTKVM-L1-BOOTED\r\n" +
		"@@FTKVM-L1-READY\r\n" +
		"@@FTKVM-CMD-BEGIN svm\r\n" +
		"1\r\n" +
		"@@FTKVM-CMD-END svm rc=0\r\n" +
		"[   12.345678] some kernel warning\r\n" +
		"@@FTKVM-CMD-BEGIN nonl\r\n" +
		"first\r\n" +
		"no newline@@FTKVM-CMD-END nonl rc=0\r\n" +
		"@@FTKVM-CMD-BEGIN fails\r\n" +
		"ls: /nope: No such file or directory\r\n" +
		"@@FTKVM-CMD-END fails rc=1\r\n" +
		"@@FTKVM-CMD-BEGIN hangs\r\n" +
		"@@FTKVM-CMD-END hangs rc=143\r\n" +
		"@@FTKVM-CMD-TIMEOUT hangs\r\n" +
		"@@FTKVM-CMD-BEGIN l2\r\n" +
		"FTKVM-GUEST-READY workload=lines\r\r\n" +
		"@@FTKVM-CMD-END other rc=0\r\n" + // not this command's marker: output
		"line 1\r\r\n" +
		"line 2"
	got := nested.ParseConsole(console)
	want := &nested.Console{
		Booted: true,
		Ready:  true,
		Commands: []nested.CommandResult{
			{Name: "svm", Started: true, Finished: true, RC: 0, Output: "1\n"},
			{Name: "nonl", Started: true, Finished: true, RC: 0, Output: "first\nno newline"},
			{Name: "fails", Started: true, Finished: true, RC: 1, Output: "ls: /nope: No such file or directory\n"},
			{Name: "hangs", Started: true, Finished: true, RC: 143, TimedOut: true, Output: ""},
			{Name: "l2", Started: true, RC: -1, Output: "FTKVM-GUEST-READY workload=lines\n@@FTKVM-CMD-END other rc=0\nline 1\nline 2"},
		},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("ParseConsole:\n got %+v\nwant %+v", got, want)
	}

	errs := map[string]bool{"svm": false, "nonl": false, "fails": true, "hangs": true, "l2": true}
	for _, c := range got.Commands {
		if (c.Err() != nil) != errs[c.Name] {
			t.Errorf("%s: Err() = %v, want error %v", c.Name, c.Err(), errs[c.Name])
		}
		if c.OK() == errs[c.Name] {
			t.Errorf("%s: OK() = %v", c.Name, c.OK())
		}
	}
}

func TestParseConsoleSetupError(t *testing.T) {
	got := nested.ParseConsole("@@FTKVM-L1-BOOTED\n@@FTKVM-L1-ERROR insmod kvm-amd.ko: No such device\n")
	if !got.Booted || got.Ready || got.Done || got.SetupError != "insmod kvm-amd.ko: No such device" || len(got.Commands) != 0 {
		t.Fatalf("ParseConsole = %+v", got)
	}
	// A command interrupted by the L1 moving on (BEGIN of the next one,
	// DONE) keeps its partial output and is not finished.
	got = nested.ParseConsole("@@FTKVM-CMD-BEGIN a\npartial\n@@FTKVM-CMD-BEGIN b\n@@FTKVM-CMD-END b rc=0\n@@FTKVM-L1-DONE\n")
	if len(got.Commands) != 2 || got.Commands[0].Finished || got.Commands[0].Output != "partial\n" || !got.Commands[1].OK() || !got.Done {
		t.Fatalf("ParseConsole = %+v", got)
	}
}
