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
/* virtio devices (k_virtio.c). Errors are the negative VERR_ values. */
#define SYS_BLK_INFO  7 /* blk_info()            -> capacity in sectors       */
#define SYS_BLK_READ  8 /* blk_read(sector, buf, n)  -> 0: n sectors read     */
#define SYS_BLK_WRITE 9 /* blk_write(sector, buf, n) -> 0: n sectors written  */
#define SYS_BLK_FLUSH 10 /* blk_flush()           -> 0: writes are durable     */
#define SYS_NET_MAC   11 /* net_mac(buf)          -> 0: 6 bytes of MAC in buf  */
#define SYS_NET_SEND  12 /* net_send(buf, len)    -> len: frame transmitted    */
#define SYS_NET_RECV  13 /* net_recv(buf, len)    -> frame length (blocks)     */

#define VERR_ARG     (-1) /* bad buffer, length or sector range               */
#define VERR_NODEV   (-2) /* no such virtio device                            */
#define VERR_IOERR   (-3) /* the device answered VIRTIO_BLK_S_IOERR           */
#define VERR_UNSUPP  (-4) /* the device answered VIRTIO_BLK_S_UNSUPP          */
#define VERR_DEVICE  (-5) /* the device failed (needs reset, bad used entry)  */
#define VERR_RO      (-6) /* a write to a disk that offered VIRTIO_BLK_F_RO   */

#define BLK_SECTOR   512
#define BLK_MAX_SECTORS 8  /* per request: one data buffer of up to 4 KiB     */
#define NET_MAX_FRAME 1518 /* Ethernet header + 1500 + a VLAN tag, no FCS     */

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
