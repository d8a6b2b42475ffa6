# ftkvm build. `make run` builds ftkvm and the test guest and runs a short
# failover drill of it (ftkvm drill); `make boot` just boots the test
# guest; `make test` installs the test dependencies and runs every test.
GO       ?= go
BIN      := bin/ftkvm
TESTOS   := guest/testos/testos.elf
WORKLOAD ?= counter

.PHONY: all build testos run boot test race deps deps-build vet clean bench epochs

all: build testos

REVISION := $(shell git describe --always --dirty 2>/dev/null)

build:
	CGO_ENABLED=0 $(GO) build -ldflags "-X main.revision=$(REVISION)" -o $(BIN) ./cmd/ftkvm

testos:
	$(MAKE) -s -C guest/testos

# The drill: a witness, a backup and a primary on this machine; the
# primary killed KILLS times while the guest counts, a new backup joined
# after each takeover; the consoles checked for loss; drill.png.
# The guest counts long enough for every kill (each takes about 80 of
# its lines: a takeover, then a new backup joining).
KILLS ?= 3
LINES ?= $(shell echo $$((400 + 120 * $(KILLS))))
run: deps-build all
	$(BIN) drill --kernel $(TESTOS) --mem 32 --cmdline "workload=counter lines=$(LINES) wait=4 hz=200" --kills $(KILLS) --timeout 2s

boot: deps-build all
	$(BIN) run --kernel $(TESTOS) --cmdline "workload=$(WORKLOAD)"

deps-build:
	./test/setup-deps.sh build

deps:
	./test/setup-deps.sh test

vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	$(GO) vet ./...

# FTKVM_TEST_STRICT: a tool the set-up installs (etcd) missing is a test
# failure, not a skip.
test: deps all vet
	FTKVM_TEST_STRICT=1 $(GO) test -count=1 -timeout 50m ./...
	$(MAKE) race

# The replica driver's crash simulation under the race detector
# (ft/driver/sim_test.go): either replica killed and the link cut at every
# message index; the witness, re-protection, divergence and network
# scenarios at spread indices (every index of all of them takes about 19
# minutes more: `go test -race -run '^TestSim' ./ft/driver -sim.every`).
race:
	$(GO) test -race -count=1 -timeout 30m -run '^TestSim(NoFailure|KillPrimaryAtEveryMessage|KillBackupAtEveryMessage|CutLinkAtEveryMessage)$$' ./ft/driver -sim.every
	$(GO) test -race -count=1 -timeout 30m -run '^TestSim(CutLinkWithWitness|ReprotectionAndSecondFailover|InjectedDivergenceRepaired|Net.*)$$' ./ft/driver

bench: all
	$(GO) test -run '^$$' -bench . -benchtime 1x ./vmm/ ./test/

# The epoch-length experiment: docs/epochs.png and the table in
# docs/epochs.md (about 6 minutes; docs/epochs.md says how to read it).
epochs: testos
	$(GO) run ./tools/epochs -reps 3

clean:
	rm -rf bin
	$(MAKE) -s -C guest/testos clean
