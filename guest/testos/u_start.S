/* testos ring-3 support: where a task function returns to, and the user
 * stacks (in the user region, U/S pages; not zeroed at boot). */
#include "abi.h"

	.text
	.globl user_task_exit
user_task_exit:
	mov %rax, %rdi		/* exit(return value, no reason) */
	xor %esi, %esi
	mov $SYS_EXIT, %eax
	syscall
	ud2

/*
 * LSTAR: the target of the syscall instruction. On a CPU that implements
 * syscall, we are at ring 0 here and jump to the kernel entry. On the
 * project's KVM the syscall instruction loads %rip from LSTAR but stays at
 * ring 3 (and "int $n" at ring 3 raises #UD there); then the ud2 below gets
 * us into the kernel: its #UD handler recognises this address (syscall_ud in
 * k_entry.S). %r10 is free: the syscall ABI clobbers it.
 */
	.globl syscall_stub, syscall_stub_trap
syscall_stub:
	mov %cs, %r10d
	test $3, %r10b
	jz syscall_entry
syscall_stub_trap:
	ud2

	.section .ustack, "aw", @nobits
	.balign 4096
	.globl user_stacks
user_stacks:
	.skip USTACK_SIZE * MAX_TASKS
