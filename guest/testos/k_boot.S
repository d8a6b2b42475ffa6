/*
 * testos boot: Xen PVH entry (32-bit protected mode, paging off, %ebx =
 * physical address of struct hvm_start_info), identity-mapped long mode,
 * then kmain(start_info) in C.
 *
 * Everything here runs at ring 0, which on the project's KVM is executed by
 * KVM's instruction emulator: keep it short and plain (no rep strings, no
 * 32-bit iret, interrupts stay off until we are in long mode with an IDT).
 */
#include "abi.h"

#define X86_CR0_PE   0x00000001
#define X86_CR0_PG   0x80000000
#define X86_CR4_PAE  0x00000020
#define MSR_EFER     0xc0000080
#define EFER_SCE     0x00000001
#define EFER_LME     0x00000100
#define PTE_P        0x001
#define PTE_W        0x002
#define PTE_U        0x004
#define PTE_PS       0x080
#define PTE_PWT      0x008
#define PTE_PCD      0x010
/* The virtio-mmio windows (docs/DEVICES.md): 0xd0000000, 5 x 4 KiB, inside
 * one 2 MiB page of the fourth GiB. */
#define VIRTIO_MMIO_PAGE 0xd0000000

/* ELF note read by the PVH loader: XEN_ELFNOTE_PHYS32_ENTRY (18), name
 * "Xen", 8-byte descriptor holding the 32-bit physical entry address (as
 * Linux emits it for 64-bit kernels). */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4			/* namesz */
	.long 8			/* descsz */
	.long 18		/* type: XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.quad pvh_start32
	.balign 4

	.text
	.code32
	.globl pvh_start32
pvh_start32:
	cli
	cld
	mov %ebx, %esi			/* keep start_info in %esi throughout */

	lgdt gdt_desc			/* 32-bit lgdt: 16-bit limit + low 32 bits of base */
	mov $SEL_KDATA, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov %eax, %fs
	mov %eax, %gs
	mov $boot_stack_top, %esp

	/* Zero the kernel .bss and the user .bss (a PVH loader zero-fills
	 * p_memsz beyond p_filesz, but do not rely on it). Plain loops. */
	mov $__kbss_start, %edi
1:	cmp $__kbss_end, %edi
	jae 2f
	movl $0, (%edi)
	add $4, %edi
	jmp 1b
2:	mov $__ubss_start, %edi
3:	cmp $__ubss_end, %edi
	jae 4f
	movl $0, (%edi)
	add $4, %edi
	jmp 3b
4:
	/* Page tables: PML4[0] -> PDPT, PDPT[0] -> PD, PD maps 0..1 GiB with
	 * 2 MiB pages. Only the 2 MiB pages of the user region carry U/S;
	 * the upper levels carry U/S so that those pages are reachable. */
	movl $(pdpt + PTE_P + PTE_W + PTE_U), pml4
	movl $(pd + PTE_P + PTE_W + PTE_U), pdpt
	xor %ecx, %ecx
5:	mov %ecx, %eax
	shl $21, %eax
	or $(PTE_P + PTE_W + PTE_PS), %eax
	mov %eax, pd(,%ecx,8)
	inc %ecx
	cmp $512, %ecx
	jb 5b
	mov $__user_start, %ecx
	shr $21, %ecx
	mov $__user_end, %edx
	shr $21, %edx
6:	cmp %edx, %ecx
	jae 7f
	orl $PTE_U, pd(,%ecx,8)
	inc %ecx
	jmp 6b
7:
	/* The virtio-mmio windows: PDPT[3] -> pd_mmio, whose entry for
	 * 0xd0000000 maps that 2 MiB page uncached (PCD, PWT: device
	 * registers), kernel only. */
	movl $(pd_mmio + PTE_P + PTE_W), pdpt + 3 * 8
	movl $(VIRTIO_MMIO_PAGE + PTE_P + PTE_W + PTE_PS + PTE_PWT + PTE_PCD), pd_mmio + ((VIRTIO_MMIO_PAGE - 0xc0000000) >> 21) * 8

	/* Long mode: PAE, CR3, EFER.LME (+SCE for syscall), then paging. */
	mov %cr4, %eax
	or $X86_CR4_PAE, %eax
	mov %eax, %cr4
	mov $pml4, %eax
	mov %eax, %cr3
	mov $MSR_EFER, %ecx
	rdmsr
	or $(EFER_LME + EFER_SCE), %eax
	wrmsr
	mov %cr0, %eax
	or $(X86_CR0_PG + X86_CR0_PE), %eax
	mov %eax, %cr0
	ljmp $SEL_KCODE, $start64

	.code64
start64:
	mov $SEL_KDATA, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	xor %eax, %eax
	mov %eax, %fs
	mov %eax, %gs
	mov $boot_stack_top, %rsp
	mov %esi, %edi			/* kmain(start_info physical address) */
	call kmain
8:	cli
	hlt
	jmp 8b

/* GDT. The TSS descriptor (0x30) is filled in by kmain. Descriptors are
 * marked accessed so the CPU never has to write them back. */
	.data
	.balign 16
	.globl gdt
gdt:
	.quad 0				/* 0x00 null */
	.quad 0x00af9b000000ffff	/* 0x08 kernel code, 64-bit */
	.quad 0x00cf93000000ffff	/* 0x10 kernel data (flat, also used in 32-bit boot) */
	.quad 0x00cffb000000ffff	/* 0x18 user code, 32-bit (unused; sysret layout) */
	.quad 0x00cff3000000ffff	/* 0x20 user data */
	.quad 0x00affb000000ffff	/* 0x28 user code, 64-bit */
	.quad 0, 0			/* 0x30 64-bit TSS (16 bytes) */
gdt_end:
	.balign 8
	.globl gdt_desc
gdt_desc:
	.word gdt_end - gdt - 1
	.quad gdt

	.bss
	.balign 4096
	.globl pml4
pml4:	.skip 4096
pdpt:	.skip 4096
pd:	.skip 4096
pd_mmio:	.skip 4096

/* Stacks: not zeroed at boot (section .kstack, NOBITS). */
	.section .kstack, "aw", @nobits
	.balign 4096
boot_stack:
	.skip 8192
boot_stack_top:
	.globl kstacks
kstacks:
	.skip KSTACK_SIZE * MAX_TASKS
