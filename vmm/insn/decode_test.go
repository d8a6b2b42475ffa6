package insn

import (
	"testing"

	"golang.org/x/arch/x86/x86asm"
)

func TestDecode(t *testing.T) {
	for _, tc := range []struct {
		name string
		b    []byte
		mode Mode
		want Insn
	}{
		{"rdtsc", []byte{0x0f, 0x31}, Mode64, Insn{Kind: RDTSC, Len: 2}},
		{"rdtsc 16", []byte{0x0f, 0x31}, Mode16, Insn{Kind: RDTSC, Len: 2}},
		{"rdtsc segment prefix", []byte{0x26, 0x0f, 0x31}, Mode32, Insn{Kind: RDTSC, Len: 3}},
		{"rdtsc rex", []byte{0x48, 0x0f, 0x31}, Mode64, Insn{Kind: RDTSC, Len: 3}},
		{"inc eax then rdtsc (32-bit)", []byte{0x40, 0x0f, 0x31}, Mode32, Insn{}},
		{"lock rdtsc", []byte{0xf0, 0x0f, 0x31}, Mode64, Insn{Kind: Undefined, Len: 3}},
		{"rdtscp", []byte{0x0f, 0x01, 0xf9}, Mode64, Insn{Kind: RDTSCP, Len: 3}},
		{"other 0f 01", []byte{0x0f, 0x01, 0xd0}, Mode64, Insn{}}, // xgetbv
		{"rdrand eax", []byte{0x0f, 0xc7, 0xf0}, Mode64, Insn{Kind: RDRAND, Len: 3, OpSize: 4, Reg: 0}},
		{"rdrand r9", []byte{0x49, 0x0f, 0xc7, 0xf1}, Mode64, Insn{Kind: RDRAND, Len: 4, OpSize: 8, Reg: 9}},
		{"rdrand ax", []byte{0x66, 0x0f, 0xc7, 0xf3}, Mode64, Insn{Kind: RDRAND, Len: 4, OpSize: 2, Reg: 3}},
		{"rdrand ax (16)", []byte{0x0f, 0xc7, 0xf0}, Mode16, Insn{Kind: RDRAND, Len: 3, OpSize: 2}},
		{"rdseed ecx", []byte{0x0f, 0xc7, 0xf9}, Mode64, Insn{Kind: RDSEED, Len: 3, OpSize: 4, Reg: 1}},
		{"rdpid rax", []byte{0xf3, 0x0f, 0xc7, 0xf8}, Mode64, Insn{Kind: RDPID, Len: 4, OpSize: 8}},
		{"rdpid eax (32)", []byte{0xf3, 0x0f, 0xc7, 0xf8}, Mode32, Insn{Kind: RDPID, Len: 4, OpSize: 4}},
		{"f3 0f c7 /6", []byte{0xf3, 0x0f, 0xc7, 0xf0}, Mode64, Insn{Kind: Undefined, Len: 4}},
		{"f2 0f c7 /7", []byte{0xf2, 0x0f, 0xc7, 0xf8}, Mode64, Insn{Kind: Undefined, Len: 4}},
		{"cmpxchg8b", []byte{0x0f, 0xc7, 0x0e}, Mode64, Insn{}},
		{"vmptrst (memory /7)", []byte{0x0f, 0xc7, 0x3e}, Mode64, Insn{}},
		{"hlt", []byte{0xf4}, Mode64, Insn{Kind: HLT, Len: 1}},
		{"iretq", []byte{0x48, 0xcf}, Mode64, Insn{Kind: IRET, Len: 2, OpSize: 8}},
		{"iretd 64", []byte{0xcf}, Mode64, Insn{Kind: IRET, Len: 1, OpSize: 4}},
		{"iret 16", []byte{0xcf}, Mode16, Insn{Kind: IRET, Len: 1, OpSize: 2}},
		{"iretd 16", []byte{0x66, 0xcf}, Mode16, Insn{Kind: IRET, Len: 2, OpSize: 4}},
		{"rex then legacy prefix: rex ignored", []byte{0x48, 0x66, 0xcf}, Mode64, Insn{Kind: IRET, Len: 3, OpSize: 2}},
		{"retf", []byte{0xcb}, Mode64, Insn{Kind: RETF, Len: 1, OpSize: 4}},
		{"retfq 8", []byte{0x48, 0xca, 0x08, 0x00}, Mode64, Insn{Kind: RETF, Len: 4, OpSize: 8, Imm: 8}},
		{"retf imm truncated", []byte{0xca, 0x08}, Mode64, Insn{}},
		{"sysret", []byte{0x0f, 0x07}, Mode64, Insn{Kind: SYSRET, Len: 2, OpSize: 4}},
		{"sysret outside 64-bit", []byte{0x0f, 0x07}, Mode32, Insn{}},
		{"sysexit", []byte{0x0f, 0x35}, Mode32, Insn{Kind: SYSEXIT, Len: 2, OpSize: 4}},
		{"sysretq", []byte{0x48, 0x0f, 0x07}, Mode64, Insn{Kind: SYSRET, Len: 3, OpSize: 8}},
		{"syscall", []byte{0x0f, 0x05}, Mode64, Insn{Kind: SYSCALL, Len: 2}},
		{"sysenter", []byte{0x0f, 0x34}, Mode32, Insn{Kind: SYSENTER, Len: 2}},
		{"swapgs", []byte{0x0f, 0x01, 0xf8}, Mode64, Insn{Kind: SWAPGS, Len: 3}},
		{"swapgs outside 64-bit", []byte{0x0f, 0x01, 0xf8}, Mode32, Insn{}},
		{"lfence", []byte{0x0f, 0xae, 0xe8}, Mode64, Insn{Kind: FENCE, Len: 3, Reg: 5}},
		{"mfence", []byte{0x0f, 0xae, 0xf0}, Mode64, Insn{Kind: FENCE, Len: 3, Reg: 6}},
		{"sfence", []byte{0x0f, 0xae, 0xf8}, Mode32, Insn{Kind: FENCE, Len: 3, Reg: 7}},
		{"clflush (memory /7)", []byte{0x0f, 0xae, 0x38}, Mode64, Insn{}},
		{"66 0f ae /6 (tpause)", []byte{0x66, 0x0f, 0xae, 0xf0}, Mode64, Insn{}},
		{"wrmsr", []byte{0x0f, 0x30}, Mode64, Insn{Kind: WRMSR, Len: 2}},
		{"popfq", []byte{0x9d}, Mode64, Insn{Kind: POPF, Len: 1, OpSize: 8}},
		{"mov ss, eax", []byte{0x8e, 0xd0}, Mode64, Insn{Kind: MOVSS, Len: 2}},
		{"mov ss, [rip+x]", []byte{0x8e, 0x15, 1, 2, 3, 4}, Mode64, Insn{Kind: MOVSS, Len: 6}},
		{"mov ss, [eax+ecx*2+8]", []byte{0x8e, 0x54, 0x48, 0x08}, Mode32, Insn{Kind: MOVSS, Len: 4}},
		{"mov ss, [bx+si+0x1234] (16)", []byte{0x8e, 0x90, 0x34, 0x12}, Mode16, Insn{Kind: MOVSS, Len: 4}},
		{"mov ds, eax", []byte{0x8e, 0xd8}, Mode64, Insn{}},
		{"pop ss", []byte{0x17}, Mode32, Insn{Kind: POPSS, Len: 1, OpSize: 4}},
		{"pop ss in 64-bit mode", []byte{0x17}, Mode64, Insn{}},
		{"popf 16 in 64-bit mode", []byte{0x66, 0x9d}, Mode64, Insn{Kind: POPF, Len: 2, OpSize: 2}},
		{"popf 16", []byte{0x9d}, Mode16, Insn{Kind: POPF, Len: 1, OpSize: 2}},
		{"popfd 32", []byte{0x9d}, Mode32, Insn{Kind: POPF, Len: 1, OpSize: 4}},
		{"nop", []byte{0x90}, Mode64, Insn{}},
		{"out", []byte{0xe6, 0x80}, Mode64, Insn{}},
		{"truncated", []byte{0x0f}, Mode64, Insn{}},
		{"only prefixes", []byte{0x66, 0x66, 0x66}, Mode64, Insn{}},
		{"empty", nil, Mode64, Insn{}},
		{"beyond 15 bytes", append(make15(0x66), 0x0f, 0x31), Mode64, Insn{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Decode(tc.b, tc.mode)
			if got != tc.want {
				t.Fatalf("Decode(% x, %d) = %+v, want %+v", tc.b, tc.mode, got, tc.want)
			}
			if got.Kind != None && !Confirm(tc.b, tc.mode, got) {
				t.Fatalf("x86asm disagrees with %+v", got)
			}
		})
	}
}

func make15(b byte) []byte {
	s := make([]byte, 14)
	for i := range s {
		s[i] = b
	}
	return s
}

func TestDecodeDoesNotAllocate(t *testing.T) {
	code := []byte{0x48, 0xca, 0x08, 0x00, 0x90}
	if n := testing.AllocsPerRun(100, func() { _ = Decode(code, Mode64) }); n != 0 {
		t.Fatalf("Decode allocates %v times", n)
	}
}

// FuzzDecode checks the byte scan against x86asm, the reference decoder,
// on any input: where x86asm decodes an opcode the step clock acts on, the
// scan must find the same kind with the same length, and where the scan
// finds one x86asm knows, x86asm must agree. The known differences are
// x86asm's: it accepts a LOCK prefix on instructions the CPU refuses with
// #UD (the scan says Undefined), F2/F3 0F C7 /6 (the scan says
// Undefined: no such instruction on the CPUs ftkvm presents), REX bytes the
// CPU ignores (x86asm refuses the sequence; normalize drops them), and a
// memory operand to 0F C7 /6 with REX.W, which x86asm takes for RDRAND.
//
//	go test ./vmm/insn -run '^$' -fuzz FuzzDecode
func FuzzDecode(f *testing.F) {
	for _, b := range [][]byte{{0x0f, 0x31}, {0x0f, 0x01, 0xf9}, {0x48, 0x0f, 0xc7, 0xf0}, {0xf3, 0x0f, 0xc7, 0xf8},
		{0xf4}, {0x48, 0xcf}, {0xca, 1, 2}, {0x0f, 0x07}, {0x66, 0x2e, 0x0f, 0x31}, {0xf0, 0x0f, 0x31}} {
		f.Add(b, uint8(64))
	}
	f.Fuzz(func(t *testing.T, b []byte, m uint8) {
		mode := []Mode{Mode16, Mode32, Mode64}[int(m)%3]
		got := Decode(b, mode)
		if int(got.Len) > len(b) || got.Len > MaxLen {
			t.Fatalf("Decode(% x) length %d beyond the input", b, got.Len)
		}
		if (got.Kind == None) != (got.Len == 0) {
			t.Fatalf("Decode(% x) = %+v", b, got)
		}
		if _, ok := x86asmOp(got); ok && !Confirm(b, mode, got) {
			ref, err := x86asm.Decode(b, int(mode))
			t.Fatalf("Decode(% x, %d) = %+v; x86asm: %v len %d err %v", b, mode, got, ref.Op, ref.Len, err)
		}
		var buf [MaxLen]byte
		nb, dropped := normalize(b, mode, &buf)
		ref, err := x86asm.Decode(nb, int(mode))
		ref.Len += dropped
		if err != nil || got.Kind == Undefined {
			return
		}
		for _, p := range ref.Prefix {
			if p&0xff == x86asm.PrefixLOCK {
				return // the CPU refuses LOCK here (#UD); KVM raises it
			}
		}
		var want Kind
		switch ref.Op {
		case x86asm.RDTSC:
			want = RDTSC
		case x86asm.RDTSCP:
			want = RDTSCP
		case x86asm.RDRAND:
			if i := opcodeAt(nb, mode) + 2; i >= len(nb) || nb[i]>>6 != 3 {
				return // x86asm takes the memory forms of 0F C7 /6 (VMPTRLD) for RDRAND with REX.W
			}
			want = RDRAND
		case x86asm.HLT:
			want = HLT
		case x86asm.IRET, x86asm.IRETD, x86asm.IRETQ:
			want = IRET
		case x86asm.LRET:
			want = RETF
		case x86asm.SYSRET:
			want = SYSRET
		case x86asm.SYSEXIT:
			want = SYSEXIT
		case x86asm.SYSCALL:
			want = SYSCALL
		case x86asm.SYSENTER:
			want = SYSENTER
		case x86asm.SWAPGS:
			want = SWAPGS
		case x86asm.WRMSR:
			want = WRMSR
		case x86asm.POPF, x86asm.POPFD, x86asm.POPFQ:
			want = POPF
		case x86asm.MOV:
			if seg, ok := ref.Args[0].(x86asm.Reg); !ok || seg != x86asm.SS {
				return
			}
			want = MOVSS
		case x86asm.POP:
			if seg, ok := ref.Args[0].(x86asm.Reg); !ok || seg != x86asm.SS {
				return
			}
			want = POPSS
		case x86asm.LFENCE, x86asm.MFENCE, x86asm.SFENCE:
			for _, c := range nb[:opcodeAt(nb, mode)] {
				if c == 0x66 || c == 0xf2 || c == 0xf3 {
					return // x86asm ignores the prefix that makes these other instructions
				}
			}
			want = FENCE
		default:
			return
		}
		if got.Kind != want || int(got.Len) != ref.Len {
			t.Fatalf("x86asm decodes % x (mode %d) as %v len %d; Decode says %+v", b, mode, ref.Op, ref.Len, got)
		}
	})
}

// opcodeAt is the index of the first byte after the prefixes.
func opcodeAt(b []byte, mode Mode) int {
	i := 0
	for i < len(b) && (isLegacyPrefix(b[i]) || (mode == Mode64 && b[i]&0xf0 == 0x40)) {
		i++
	}
	return i
}
