/* testos: constants shared by the kernel (ring 0) and the workloads (ring 3).
 * Included from C and from assembly. */
#ifndef TESTOS_ABI_H
#define TESTOS_ABI_H

/* Syscall numbers (in %rax; arguments in %rdi, %rsi, %rdx; result in %rax). */
#define SYS_EXIT      0 /* exit(status, reason)  -> does not return          */
#define SYS_WRITE     1 /* write(buf, len)       -> len, or -1 (bad buffer)   */
#define SYS_READ      2 /* read(buf, len)        -> 1..len (blocks), -1 / 0   */
#define SYS_TICKS     3 /* ticks()               -> timer ticks since boot    */
#define SYS_YIELD     4 /* yield()               -> 0                         */
#define SYS_PIT_READ  5 /* pit_read()            -> PIT channel 0 count       */
#define SYS_CMOS_READ 6 /* cmos_read(reg)        -> CMOS byte, or -1          */

/* Segment selectors (see k_boot.S). */
#define SEL_KCODE  0x08
#define SEL_KDATA  0x10
#define SEL_UCODE32 0x18
#define SEL_UDATA  0x20
#define SEL_UCODE  0x28
#define SEL_TSS    0x30
#define SEL_UDATA_RPL3 (SEL_UDATA | 3)
#define SEL_UCODE_RPL3 (SEL_UCODE | 3)

#define MAX_TASKS   4
#define KSTACK_SIZE 8192
#define USTACK_SIZE 16384

#endif
