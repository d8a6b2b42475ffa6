/* testos kernel (ring 0) internal interface. */
#ifndef TESTOS_K_H
#define TESTOS_K_H

#include <stdint.h>
#include <stddef.h>
#include "abi.h"

static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

/* Wait for an interrupt with interrupts enabled, then disable them again.
 * sti's one-instruction shadow makes "sti; hlt" free of lost wake-ups. */
static inline void idle_wait(void)
{
	__asm__ volatile("sti; hlt; cli" : : : "memory");
}

/* Interrupt frame built by isr_common (k_entry.S). */
struct frame {
	uint64_t r11, r10, r9, r8, rdi, rsi, rdx, rcx, rax;
	uint64_t vec, err;
	uint64_t rip, cs, rflags, rsp, ss;	/* pushed by the CPU */
};

/* Task states. */
enum { T_FREE, T_RUN, T_BLOCK_TX, T_BLOCK_RX, T_BLOCK_IO, T_DEAD };

struct task {
	uint64_t ksp;		/* saved kernel %rsp while switched out */
	uint64_t ktop;		/* top of its kernel stack (TSS.rsp0) */
	uint32_t need;		/* T_BLOCK_TX: free TX ring bytes it waits for */
	int state;
};

/* k_main.c */
extern struct task *cur;
void schedule(void);
void wake_tx(uint32_t free);
void wake_rx(void);
void wake_io(void);
void block_io(void);
int user_ok(uint64_t p, uint64_t len);
void pic_unmask(int irq);
void finish(int status) __attribute__((noreturn));

/* k_uart.c */
#define TX_RING 4096u
#define RX_RING 4096u
void uart_init(void);
void uart_isr(void);
uint32_t tx_free(void);
void tx_put(char c);
void tx_kick(void);
int rx_empty(void);
char rx_get(void);
void kputs(const char *s);
void kputsn(const char *s, size_t n);
void kputu(uint64_t v);
void poll_drain(void);
void poll_puts(const char *s);
void poll_putx(uint64_t v);
void poll_putu(uint64_t v);
void uart_wait_idle(void);

/* k_virtio.c */
int virtio_init(int want_blk, int want_net);
int virtio_irq(int irq);
long blk_info(void);
long blk_rw(uint64_t sector, uint64_t buf, uint64_t n, int write);
long blk_flush(void);
long net_mac(uint64_t buf);
long net_send(uint64_t buf, uint64_t len);
long net_recv(uint64_t buf, uint64_t len);

#endif
