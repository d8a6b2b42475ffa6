/*
 * testos kernel entry points: interrupt/exception stubs, the syscall entry,
 * the kernel-stack switch and the first entry of a task into ring 3.
 * Kept short: every ring-0 instruction is emulated on the project's KVM.
 */
#include "abi.h"

	.text
	.code64

/* Vectors 0-31 (exceptions) and 32-47 (PIC IRQs). The CPU pushes an error
 * code for 8, 10-14, 17, 21, 29, 30; the other stubs push a 0 so that every
 * frame looks the same (struct frame in k.h). */
.macro ISR_NOERR n
isr_\n:
	push $0
	push $\n
	jmp isr_common
.endm
.macro ISR_ERR n
isr_\n:
	push $\n
	jmp isr_common
.endm

	.irp n, 0,1,2,3,4,5,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
	ISR_NOERR \n
	.endr
	.irp n, 8,10,11,12,13,14,17,21,29,30
	ISR_ERR \n
	.endr
	.irp n, 32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
	ISR_NOERR \n
	.endr

/* #UD: the ud2 at syscall_stub_trap (u_start.S) is the syscall fallback
 * (see syscall_ud below); any other #UD is fatal. */
isr_6:
	cmpq $syscall_stub_trap, (%rsp)
	je syscall_ud
	push $0
	push $6
	jmp isr_common

/* Only the caller-saved registers are saved: the C handler preserves the
 * others, and switch_to saves them when the handler switches tasks. */
isr_common:
	cld
	push %rax
	push %rcx
	push %rdx
	push %rsi
	push %rdi
	push %r8
	push %r9
	push %r10
	push %r11
	mov %rsp, %rdi
	call isr_dispatch
	pop %r11
	pop %r10
	pop %r9
	pop %r8
	pop %rdi
	pop %rsi
	pop %rdx
	pop %rcx
	pop %rax
	add $16, %rsp
	iretq

	.section .rodata
	.balign 8
	.globl isr_table
isr_table:
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
	.quad isr_\n
	.endr
	.text

/*
 * syscall: %rax = number, %rdi/%rsi/%rdx = arguments, result in %rax.
 * LSTAR points to syscall_stub (u_start.S, in the user region), which jumps
 * here when the syscall instruction really switched to ring 0. The CPU put
 * the user %rip in %rcx and %rflags in %r11 and cleared IF (SFMASK), so
 * nothing can interrupt us before we are on the kernel stack. We build an
 * iretq frame on the task's kernel stack; the return is by sysretq, or by
 * iretq when built with USE_SYSRET=0 or when the tasks run at ring 0
 * (ring=0: syscall from ring 0 works like from ring 3, but sysretq always
 * returns to ring 3).
 */
	.globl syscall_entry
syscall_entry:
	mov %rsp, syscall_user_rsp(%rip)
	mov syscall_kstack(%rip), %rsp
	push task_ss(%rip)		/* ss: the task's (ring 3, or 0 with ring=0) */
	push syscall_user_rsp(%rip)	/* rsp */
	push %r11			/* rflags */
	push task_cs(%rip)		/* cs */
	push %rcx			/* rip */
	sub $8, %rsp			/* keep the C ABI's 16-byte alignment */
	mov %rax, %rcx			/* syscall_dispatch(a0, a1, a2, nr) */
	call syscall_dispatch
	add $8, %rsp
	cmpl $0, tasks_ring0(%rip)	/* ring-0 tasks: sysretq would go to ring 3 */
	jne 1f
#if USE_SYSRET
	pop %rcx
	add $8, %rsp
	pop %r11
	pop %rsp
	sysretq
#endif
1:	iretq

/*
 * Fallback syscall entry, reached from syscall_stub when the syscall
 * instruction left the CPU at ring 3: the project's KVM loads %rip from LSTAR
 * and masks RFLAGS but keeps CPL 3 (and turns "int $n" at ring 3 into #UD),
 * so the stub executes ud2 and the #UD (an exception, delivered normally)
 * brings us here on TSS.rsp0 with IF=0. %rcx and %r11 still hold what
 * syscall put there: return to the caller of syscall with its flags.
 */
syscall_ud:
	mov %rcx, (%rsp)		/* frame rip := return address of syscall */
	and $0xcd5, %r11		/* user's CF PF AF ZF SF DF OF ... */
	or $0x202, %r11			/* ... and IF */
	mov %r11, 16(%rsp)		/* frame rflags */
	sub $8, %rsp
	mov %rax, %rcx
	call syscall_dispatch
	add $8, %rsp
	iretq

/* switch_to(uint64_t *save_ksp, uint64_t next_ksp): save the callee-saved
 * registers on this kernel stack, switch to the other one. */
	.globl switch_to
switch_to:
	push %rbx
	push %rbp
	push %r12
	push %r13
	push %r14
	push %r15
	mov %rsp, (%rdi)
	mov %rsi, %rsp
	pop %r15
	pop %r14
	pop %r13
	pop %r12
	pop %rbp
	pop %rbx
	ret

/* First run of a task: switch_to "returns" here with the task's arguments in
 * %r12-%r14 (see task_create) and an iretq frame for ring 3 on the stack. */
	.globl task_trampoline
task_trampoline:
	mov %r12, %rdi
	mov %r13, %rsi
	mov %r14, %rdx
	xor %eax, %eax
	xor %ecx, %ecx
	xor %r8d, %r8d
	xor %r9d, %r9d
	xor %r10d, %r10d
	xor %r11d, %r11d
	xor %r12d, %r12d
	xor %r13d, %r13d
	xor %r14d, %r14d
	iretq
