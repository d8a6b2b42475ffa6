package test

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/test/nested"
)

func TestScratchNested(t *testing.T) {
	cmdline := os.Getenv("SCRATCH")
	if cmdline == "" {
		t.Skip()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	res, err := nested.Run(ctx, nested.Config{
		Files:       map[string]string{l1FTKVM: ftkvmBin, l1TestOS: testosELF},
		GuestImages: true,
		Commands:    []nested.Command{{Name: "x", Cmd: cmdline, Timeout: 190 * time.Second}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s", res.Command("x").Output)
}
