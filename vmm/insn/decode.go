// Package insn is the instruction-level part of the step clock (vmm's
// EpochStep): it recognises, in the bytes at the guest's RIP, the few x86
// instructions that ftkvm must not let KVM execute under single-step
// (instructions whose result depends on the host, HLT, and the returns that
// can leave ring 0), computes what executing them does, and walks the
// guest's page tables to find those bytes. It is pure: no KVM, no guest,
// so every rule is table-tested and fuzzed.
package insn

import "golang.org/x/arch/x86/x86asm"

// Mode is the code size of the instruction stream: 16, 32 or 64.
type Mode int

const (
	Mode16 Mode = 16
	Mode32 Mode = 32
	Mode64 Mode = 64
)

// Kind is what Decode found.
type Kind uint8

const (
	// None: an instruction KVM may execute itself (or bytes Decode could
	// not read); the step clock lets it run.
	None Kind = iota
	// RDTSC (0F 31) and RDTSCP (0F 01 F9) read the time-stamp counter.
	RDTSC
	RDTSCP
	// RDRAND (0F C7 /6, register form), RDSEED (0F C7 /7) and RDPID
	// (F3 0F C7 /7) read host randomness or the host's TSC_AUX.
	RDRAND
	RDSEED
	RDPID
	// Undefined: the 0F 31 / 0F 01 F9 / 0F C7 register forms with a prefix
	// that makes them #UD on every CPU (LOCK; F2 or F3 where no such
	// instruction exists). The step clock raises #UD itself rather than
	// trust KVM's emulator to refuse them.
	Undefined
	// HLT (F4).
	HLT
	// IRET (CF, any operand size), RETF (CB, CA iw), SYSRET (0F 07) and
	// SYSEXIT (0F 35): the instructions that can move ring 0 code to an
	// outer ring.
	IRET
	RETF
	SYSRET
	SYSEXIT
	// SYSCALL (0F 05), SYSENTER (0F 34), SWAPGS (0F 01 F8) and the fences
	// LFENCE, MFENCE, SFENCE (0F AE E8, F0, F8; Reg says which): with IRET, SYSRET and SYSEXIT, the instructions that this
	// project's KVM runs without a single-step exit of their own
	// (MergesNext).
	SYSCALL
	SYSENTER
	SWAPGS
	FENCE
	// WRMSR (0F 30): the step clock caches the MSRs that give SYSCALL's
	// and SYSENTER's targets, and forgets them when the guest writes MSRs.
	WRMSR
	// POPF (9D): it loads RFLAGS, TF included; on a KVM that single-steps
	// by setting TF in the guest (any hardware-virtualised one) the step
	// after it may be lost (LosesStep).
	POPF
	// MOV SS (8E /2) and POP SS (17, outside 64-bit mode): the CPU
	// suppresses debug exceptions until the next instruction is done
	// (architecturally), so on hardware the two retire in one step
	// (Shadows).
	MOVSS
	POPSS
)

var kindNames = [...]string{None: "none", RDTSC: "RDTSC", RDTSCP: "RDTSCP", RDRAND: "RDRAND",
	RDSEED: "RDSEED", RDPID: "RDPID", Undefined: "undefined opcode", HLT: "HLT", IRET: "IRET",
	RETF: "RETF", SYSRET: "SYSRET", SYSEXIT: "SYSEXIT", SYSCALL: "SYSCALL", SYSENTER: "SYSENTER",
	SWAPGS: "SWAPGS", FENCE: "fence", WRMSR: "WRMSR", POPF: "POPF", MOVSS: "MOV SS", POPSS: "POP SS"}

func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return "kind?"
}

// Environment reports whether k reads the host (RDTSC, RDTSCP, RDRAND,
// RDSEED, RDPID): the instructions the step clock emulates or refuses.
func (k Kind) Environment() bool { return k >= RDTSC && k <= RDPID }

// LeavesRing0 reports whether k may switch the CPU to an outer ring.
func (k Kind) LeavesRing0() bool { return k >= IRET && k <= SYSEXIT }

// MergesNext reports whether this project's KVM (kvm_pvm, which emulates
// ring 0) executes k together with the instruction after it in one
// single-step: no KVM_EXIT_DEBUG follows k itself, so the next
// instruction would run before the step clock saw it. Measured: IRET,
// SYSCALL, SWAPGS, LFENCE and MFENCE merge; CPUID, RDMSR/WRMSR, MOV to
// CR0/CR3/DR7, LGDT/LIDT, INVLPG, IN/OUT, CLI/STI, PUSHF/POPF, RET, RETF,
// far JMP/CALL, string instructions and RDTSC do not. SYSRET, SYSEXIT,
// SYSENTER and SFENCE are assumed to behave like their siblings. (Event
// delivery merges too: an exception or interrupt enters its handler and
// runs the handler's first instruction in the same step.)
func (k Kind) MergesNext() bool {
	switch k {
	case IRET, SYSRET, SYSEXIT, SYSCALL, SYSENTER, SWAPGS, FENCE:
		return true
	}
	return false
}

// LosesStep reports whether the single-step after k may be lost, or k
// merged with the next instruction: MergesNext (this project's KVM), and
// the instructions that load RFLAGS (IRET, POPF, SYSRET) or mask it
// (SYSCALL, SYSENTER), after which a hardware-virtualised KVM, which
// single-steps by setting TF in the guest, runs on with the guest's TF
// (measured in the nested tier: stepping stops after a POPF or an IRET
// that pops TF clear). The step clock stops the vCPU at the next
// instruction with a one-time breakpoint and sets single-stepping anew
// there.
func (k Kind) LosesStep() bool { return k.MergesNext() || k == POPF }

// Shadows reports whether k (MOV SS, POP SS) makes the CPU run the next
// instruction without a debug exception in between: no breakpoint can
// stop it there, so the step clock looks at that instruction together
// with k's.
func (k Kind) Shadows() bool { return k == MOVSS || k == POPSS }

// MaxLen is the architectural limit on an instruction's length.
const MaxLen = 15

// Insn is a decoded instruction of one of the kinds above.
type Insn struct {
	Kind Kind
	Len  uint8 // bytes, prefixes included
	// OpSize is the operand size in bytes (2, 4 or 8): for IRET and RETF
	// the size of each stack slot, for RDRAND/RDSEED/RDPID the
	// destination's.
	OpSize uint8
	// Reg is the destination register of RDRAND/RDSEED/RDPID (0 = rAX ...
	// 15 = r15, REX.B included).
	Reg uint8
	// Imm is RETF's immediate (bytes released from the stack).
	Imm uint16
}

// Prefix bytes and their effect on the instructions Decode knows.
const (
	pfxOpSize = 0x66
	pfxAddr   = 0x67
	pfxLock   = 0xf0
	pfxRepne  = 0xf2
	pfxRep    = 0xf3
)

func isLegacyPrefix(c byte) bool {
	switch c {
	case pfxOpSize, pfxAddr, pfxLock, pfxRepne, pfxRep, 0x26, 0x2e, 0x36, 0x3e, 0x64, 0x65:
		return true
	}
	return false
}

// Decode looks at the instruction at the start of b (up to MaxLen bytes are
// used) in the given mode. It never allocates: it runs before every
// single-stepped instruction. Anything it does not know, or cannot see
// completely in b, is None: the step clock then lets KVM execute it, and an
// instruction that cannot be fetched faults in the guest as it would
// anyway.
//
// The byte-level scan decides; for the opcodes x86asm knows (RDTSC,
// RDTSCP, RDRAND, HLT, IRET, RETF, SYSRET, SYSEXIT) the fuzz target checks
// that it agrees with x86asm on the kind and the length (FuzzDecode).
func Decode(b []byte, mode Mode) Insn {
	if len(b) > MaxLen {
		b = b[:MaxLen]
	}
	var (
		i                             int
		opsize, lock, rep, repne, rex bool
		addrsize                      bool
		rexW, rexB                    bool
		lastMandatory                 byte // the last of F2/F3: it selects the instruction
	)
	for i < len(b) {
		c := b[i]
		if isLegacyPrefix(c) {
			switch c {
			case pfxOpSize:
				opsize = true
			case pfxAddr:
				addrsize = true
			case pfxLock:
				lock = true
			case pfxRep:
				rep, lastMandatory = true, c
			case pfxRepne:
				repne, lastMandatory = true, c
			}
			rex, rexW, rexB = false, false, false // a REX before a legacy prefix is ignored
			i++
			continue
		}
		if mode == Mode64 && c&0xf0 == 0x40 {
			rex, rexW, rexB = true, c&8 != 0, c&1 != 0
			i++
			continue
		}
		break
	}
	_ = rex
	if i >= len(b) {
		return Insn{}
	}
	op := b[i]
	i++
	stackSize := func() uint8 {
		switch {
		case mode == Mode64 && rexW:
			return 8
		case mode == Mode16 && !opsize, mode != Mode16 && opsize:
			return 2
		}
		return 4
	}
	switch op {
	case 0xf4:
		if lock {
			return Insn{}
		}
		return Insn{Kind: HLT, Len: uint8(i)}
	case 0xcf:
		if lock {
			return Insn{}
		}
		return Insn{Kind: IRET, Len: uint8(i), OpSize: stackSize()}
	case 0xcb:
		if lock {
			return Insn{}
		}
		return Insn{Kind: RETF, Len: uint8(i), OpSize: stackSize()}
	case 0x17:
		if lock || mode == Mode64 {
			return Insn{}
		}
		return Insn{Kind: POPSS, Len: uint8(i), OpSize: stackSize()}
	case 0x8e:
		// MOV Sreg, r/m16: the destination is the reg field; 2 is SS.
		if lock || i >= len(b) || (b[i]>>3)&7 != 2 {
			return Insn{}
		}
		n, ok := modrmLen(b[i:], mode, addrsize)
		if !ok {
			return Insn{}
		}
		return Insn{Kind: MOVSS, Len: uint8(i + n)}
	case 0x9d:
		if lock {
			return Insn{}
		}
		size := stackSize()
		if mode == Mode64 && !opsize {
			size = 8 // a stack operation: 64 bits by default in 64-bit mode
		}
		return Insn{Kind: POPF, Len: uint8(i), OpSize: size}
	case 0xca:
		if lock || i+2 > len(b) {
			return Insn{}
		}
		return Insn{Kind: RETF, Len: uint8(i + 2), OpSize: stackSize(), Imm: uint16(b[i]) | uint16(b[i+1])<<8}
	case 0x0f:
	default:
		return Insn{}
	}
	if i >= len(b) {
		return Insn{}
	}
	op2 := b[i]
	i++
	switch op2 {
	case 0x31:
		if lock {
			return Insn{Kind: Undefined, Len: uint8(i)}
		}
		return Insn{Kind: RDTSC, Len: uint8(i)}
	case 0x07:
		// SYSRET exists in 64-bit mode (and on AMD in legacy mode, where
		// ftkvm's guests never use it); elsewhere it is #UD, which KVM
		// raises by itself.
		if lock || mode != Mode64 {
			return Insn{}
		}
		return Insn{Kind: SYSRET, Len: uint8(i), OpSize: stackSize()}
	case 0x35:
		if lock {
			return Insn{}
		}
		return Insn{Kind: SYSEXIT, Len: uint8(i), OpSize: stackSize()}
	case 0x05:
		// Like SYSRET: 64-bit mode only here (Intel refuses it elsewhere;
		// AMD's legacy-mode SYSCALL is not used by ftkvm's guests).
		if lock || mode != Mode64 {
			return Insn{}
		}
		return Insn{Kind: SYSCALL, Len: uint8(i)}
	case 0x34:
		if lock {
			return Insn{}
		}
		return Insn{Kind: SYSENTER, Len: uint8(i)}
	case 0x30:
		if lock {
			return Insn{}
		}
		return Insn{Kind: WRMSR, Len: uint8(i)}
	case 0xae:
		// The fences: register forms of /5 /6 /7 without a mandatory
		// prefix (with 66, F2 or F3 they are other instructions).
		if i >= len(b) || lock || opsize || rep || repne {
			return Insn{}
		}
		// E8, F0, F8: the encodings Intel documents (x86asm knows only
		// those; other r/m values are reserved).
		modrm := b[i]
		if modrm != 0xe8 && modrm != 0xf0 && modrm != 0xf8 {
			return Insn{}
		}
		return Insn{Kind: FENCE, Len: uint8(i + 1), Reg: (modrm >> 3) & 7}
	case 0x01:
		if i >= len(b) {
			return Insn{}
		}
		switch b[i] {
		case 0xf9:
			i++
			if lock {
				return Insn{Kind: Undefined, Len: uint8(i)}
			}
			return Insn{Kind: RDTSCP, Len: uint8(i)}
		case 0xf8:
			// SWAPGS exists in 64-bit mode only (elsewhere #UD, KVM's).
			if lock || mode != Mode64 {
				return Insn{}
			}
			return Insn{Kind: SWAPGS, Len: uint8(i + 1)}
		}
		return Insn{}
	case 0xc7:
		if i >= len(b) {
			return Insn{}
		}
		modrm := b[i]
		i++
		if modrm>>6 != 3 {
			return Insn{} // memory forms: CMPXCHG8B/16B, VMPTRLD, VMPTRST, ...
		}
		reg := (modrm >> 3) & 7
		if reg != 6 && reg != 7 {
			return Insn{}
		}
		dst := modrm & 7
		if rexB {
			dst += 8
		}
		size := uint8(4)
		switch {
		case mode == Mode64 && rexW:
			size = 8
		case mode == Mode16 && !opsize, mode != Mode16 && opsize:
			size = 2
		}
		switch {
		case lock:
			return Insn{Kind: Undefined, Len: uint8(i)}
		case reg == 7 && lastMandatory == pfxRep:
			// RDPID: always the full register width (64-bit in 64-bit
			// mode, 32-bit elsewhere), whatever the operand size.
			size = 4
			if mode == Mode64 {
				size = 8
			}
			return Insn{Kind: RDPID, Len: uint8(i), OpSize: size, Reg: dst}
		case rep || repne:
			// F2 0F C7 /6 and /7, F3 0F C7 /6 (SENDUIPI in 64-bit mode,
			// part of a feature ftkvm never exposes): #UD here.
			return Insn{Kind: Undefined, Len: uint8(i)}
		case reg == 6:
			return Insn{Kind: RDRAND, Len: uint8(i), OpSize: size, Reg: dst}
		default:
			return Insn{Kind: RDSEED, Len: uint8(i), OpSize: size, Reg: dst}
		}
	}
	return Insn{}
}

// x86asmOp is the x86asm opcode a kind corresponds to, for the kinds
// x86asm knows (it has no RDSEED or RDPID, and it accepts prefixes the CPU
// refuses, so Undefined has no counterpart).
func x86asmOp(in Insn) (x86asm.Op, bool) {
	switch in.Kind {
	case RDTSC:
		return x86asm.RDTSC, true
	case RDTSCP:
		return x86asm.RDTSCP, true
	case RDRAND:
		return x86asm.RDRAND, true
	case HLT:
		return x86asm.HLT, true
	case IRET:
		switch in.OpSize {
		case 8:
			return x86asm.IRETQ, true
		case 4:
			return x86asm.IRETD, true
		}
		return x86asm.IRET, true
	case RETF:
		return x86asm.LRET, true
	case SYSRET:
		return x86asm.SYSRET, true
	case SYSEXIT:
		return x86asm.SYSEXIT, true
	case SYSCALL:
		return x86asm.SYSCALL, true
	case SYSENTER:
		return x86asm.SYSENTER, true
	case SWAPGS:
		return x86asm.SWAPGS, true
	case WRMSR:
		return x86asm.WRMSR, true
	case MOVSS:
		return x86asm.MOV, true
	case POPSS:
		return x86asm.POP, true
	case POPF:
		switch in.OpSize {
		case 8:
			return x86asm.POPFQ, true
		case 4:
			return x86asm.POPFD, true
		}
		return x86asm.POPF, true
	case FENCE:
		switch in.Reg {
		case 5:
			return x86asm.LFENCE, true
		case 6:
			return x86asm.MFENCE, true
		}
		return x86asm.SFENCE, true
	}
	return 0, false
}

// Confirm re-decodes an instruction Decode found with x86asm, the
// reference decoder, and reports whether x86asm agrees on the opcode and
// the length. The step clock calls it before it acts on anything but HLT:
// a disagreement means the byte scan has a bug, and the step clock then
// stops rather than guess. (x86asm allocates for some operands; Confirm
// runs only for the rare instructions Decode flags.)
func Confirm(b []byte, mode Mode, in Insn) bool {
	want, ok := x86asmOp(in)
	if !ok {
		// RDSEED, RDPID and Undefined: x86asm does not know them (or
		// accepts prefixes the CPU refuses); the byte scan is the only
		// decoder, and the table tests pin it.
		return in.Kind != None
	}
	var buf [MaxLen]byte
	nb, dropped := normalize(b, mode, &buf)
	got, err := x86asm.Decode(nb, int(mode))
	return err == nil && got.Op == want && got.Len+dropped == int(in.Len)
}

// normalize copies b into buf without the REX bytes the CPU ignores (a REX
// not immediately before the opcode: followed by a legacy prefix or another
// REX): x86asm refuses such sequences, although the CPU runs them.
func normalize(b []byte, mode Mode, buf *[MaxLen]byte) ([]byte, int) {
	if len(b) > MaxLen {
		b = b[:MaxLen]
	}
	n, dropped := 0, 0
	for i, c := range b {
		if mode == Mode64 && c&0xf0 == 0x40 && i+1 < len(b) && (isLegacyPrefix(b[i+1]) || b[i+1]&0xf0 == 0x40) && allPrefixes(b[:i], mode) {
			dropped++
			continue
		}
		buf[n] = c
		n++
	}
	return buf[:n], dropped
}

func allPrefixes(b []byte, mode Mode) bool {
	for _, c := range b {
		if !isLegacyPrefix(c) && !(mode == Mode64 && c&0xf0 == 0x40) {
			return false
		}
	}
	return true
}

// modrmLen is the length of a ModRM byte and what follows it (SIB,
// displacement) at the start of b; ok is false when b is too short.
func modrmLen(b []byte, mode Mode, addrsize bool) (int, bool) {
	if len(b) == 0 {
		return 0, false
	}
	modrm := b[0]
	mod, rm := modrm>>6, modrm&7
	n := 1
	if mod == 3 {
		return n, true
	}
	bits16 := (mode == Mode16) != addrsize && mode != Mode64
	if bits16 {
		switch {
		case mod == 0 && rm == 6:
			n += 2
		case mod == 1:
			n++
		case mod == 2:
			n += 2
		}
		return n, n <= len(b)
	}
	if rm == 4 { // SIB
		if len(b) < 2 {
			return 0, false
		}
		n++
		if mod == 0 && b[1]&7 == 5 {
			n += 4
		}
	}
	switch {
	case mod == 0 && rm == 5:
		n += 4 // disp32 (RIP-relative in 64-bit mode)
	case mod == 1:
		n++
	case mod == 2:
		n += 4
	}
	return n, n <= len(b)
}
