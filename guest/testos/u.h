/* testos ring-3 library: syscall wrappers and line formatting. */
#ifndef TESTOS_U_H
#define TESTOS_U_H

#include <stdint.h>
#include <stddef.h>
#include "abi.h"

/* The syscall instruction clobbers %rcx and %r11; the kernel (C code)
 * clobbers the other SysV caller-saved registers too. */
static inline long sc3(long nr, long a0, long a1, long a2)
{
	__asm__ volatile("syscall"
			 : "+a"(nr), "+D"(a0), "+S"(a1), "+d"(a2)
			 :
			 : "rcx", "r8", "r9", "r10", "r11", "memory", "cc");
	return nr;
}

static inline void sys_exit(long status, const char *reason)
{
	sc3(SYS_EXIT, status, (long)reason, 0);
	__builtin_unreachable();
}
static inline long sys_write(const void *buf, size_t len) { return sc3(SYS_WRITE, (long)buf, (long)len, 0); }
static inline long sys_read(void *buf, size_t len) { return sc3(SYS_READ, (long)buf, (long)len, 0); }
static inline uint64_t sys_ticks(void) { return (uint64_t)sc3(SYS_TICKS, 0, 0, 0); }
static inline void sys_yield(void) { sc3(SYS_YIELD, 0, 0, 0); }
static inline long sys_pit_read(void) { return sc3(SYS_PIT_READ, 0, 0, 0); }
static inline long sys_cmos_read(int reg) { return sc3(SYS_CMOS_READ, reg, 0, 0); }
static inline long sys_blk_info(void) { return sc3(SYS_BLK_INFO, 0, 0, 0); }
static inline long sys_blk_read(uint64_t sector, void *buf, uint64_t n) { return sc3(SYS_BLK_READ, (long)sector, (long)buf, (long)n); }
static inline long sys_blk_write(uint64_t sector, const void *buf, uint64_t n) { return sc3(SYS_BLK_WRITE, (long)sector, (long)buf, (long)n); }
static inline long sys_blk_flush(void) { return sc3(SYS_BLK_FLUSH, 0, 0, 0); }
static inline long sys_net_mac(void *buf) { return sc3(SYS_NET_MAC, (long)buf, 0, 0); }
static inline long sys_net_send(const void *buf, size_t len) { return sc3(SYS_NET_SEND, (long)buf, (long)len, 0); }
static inline long sys_net_recv(void *buf, size_t len) { return sc3(SYS_NET_RECV, (long)buf, (long)len, 0); }

/* A line is built in a buffer and written with one write(): lines of
 * different tasks never mix. */
struct line {
	int n;
	char b[256];
};
void l_str(struct line *l, const char *s);
void l_chr(struct line *l, char c);
void l_dec(struct line *l, uint64_t v);
void l_dec2(struct line *l, unsigned v);	/* two digits, zero padded */
void l_hex16(struct line *l, uint64_t v);	/* 16 lower-case hex digits */
void l_end(struct line *l);			/* append '\n' and write */
void u_puts(const char *s);			/* write a string as is */

/* Ring-3 CPU work: n rounds of xorshift64 on x. */
uint64_t spin(uint64_t x, uint64_t n);

#endif
