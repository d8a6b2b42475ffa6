/*
 * testos COM1 driver (16550A at 0x3f8, IRQ4).
 *
 * Transmit is interrupt driven: bytes go into a TX ring; IER.ETBEI is set
 * only while the ring is non-empty; each THRE interrupt moves up to 16 bytes
 * (one FIFO's worth) to THR. Receive is interrupt driven: the RX interrupt
 * moves every available byte into an RX ring. Only the fatal exception path
 * writes by polling LSR.
 */
#include "k.h"

#define COM1 0x3f8
#define RBR (COM1 + 0)	/* read, DLAB=0 */
#define THR (COM1 + 0)	/* write, DLAB=0 */
#define DLL (COM1 + 0)	/* DLAB=1 */
#define IER (COM1 + 1)
#define DLM (COM1 + 1)	/* DLAB=1 */
#define IIR (COM1 + 2)	/* read */
#define FCR (COM1 + 2)	/* write */
#define LCR (COM1 + 3)
#define MCR (COM1 + 4)
#define LSR (COM1 + 5)
#define MSR (COM1 + 6)

#define IER_ERBFI 0x01
#define IER_ETBEI 0x02
#define LSR_DR    0x01
#define LSR_THRE  0x20
#define LSR_TEMT  0x40
#define FIFO_SIZE 16

static char txbuf[TX_RING];
static char rxbuf[RX_RING];
static uint32_t tx_head, tx_tail;	/* free-running: head written, tail sent */
static uint32_t rx_head, rx_tail;
static uint8_t ier;
static char last_out = '\n';	/* last byte written to THR */

static void rx_push(char c)
{
	if (rx_head - rx_tail < RX_RING)	/* full: drop */
		rxbuf[rx_head++ & (RX_RING - 1)] = c;
}

void uart_init(void)
{
	outb(IER, 0);
	outb(LCR, 0x80);		/* DLAB */
	outb(DLL, 1);			/* 115200 baud */
	outb(DLM, 0);
	outb(LCR, 0x03);		/* 8N1 */
	/* Keep input that arrived before this point: switching the FIFOs on
	 * clears them (16550, QEMU). In 16450 mode each RBR read makes room
	 * for the next byte, which the host may deliver a little later: after
	 * a byte, poll LSR a while for the next one. Costs one LSR read when
	 * there is no early input. */
	for (int idle = 0, n = 0; n < 256 && idle < (n ? 32 : 1); ) {
		if (inb(LSR) & LSR_DR) {
			rx_push((char)inb(RBR));
			n++;
			idle = 0;
		} else {
			idle++;
		}
	}
	outb(FCR, 0x01 | 0x04);		/* FIFOs on, clear TX FIFO, RX trigger 1 byte */
	outb(MCR, 0x0b);		/* DTR, RTS, OUT2 (IRQ line enable) */
	(void)inb(LSR);
	(void)inb(IIR);
	(void)inb(MSR);
	ier = IER_ERBFI;
	outb(IER, ier);
}

uint32_t tx_free(void)
{
	return TX_RING - (tx_head - tx_tail);
}

void tx_put(char c)
{
	txbuf[tx_head++ & (TX_RING - 1)] = c;
}

/* Called after bytes were queued: arm the THRE interrupt if it is off. */
void tx_kick(void)
{
	if (tx_head != tx_tail && !(ier & IER_ETBEI)) {
		ier |= IER_ETBEI;
		outb(IER, ier);
	}
}

int rx_empty(void)
{
	return rx_head == rx_tail;
}

char rx_get(void)
{
	return rxbuf[rx_tail++ & (RX_RING - 1)];
}

static void tx_fill(void)
{
	int n = FIFO_SIZE;

	while (n-- > 0 && tx_tail != tx_head) {
		last_out = txbuf[tx_tail++ & (TX_RING - 1)];
		outb(THR, last_out);
	}
	if (tx_tail == tx_head) {
		ier &= ~IER_ETBEI;
		outb(IER, ier);
	}
	wake_tx(tx_free());
}

static void rx_drain(void)
{
	int n = 64;

	while (n-- > 0 && (inb(LSR) & LSR_DR))
		rx_push((char)inb(RBR));
	wake_rx();
}

/* IRQ4: serve pending causes until IIR says none is left, so that the
 * (edge-triggered) IRQ line drops before the EOI. The loop is bounded (a
 * fast host refills the RX FIFO and empties the TX FIFO while we run); if a
 * cause is still pending at the end, pulse IER so that the line goes low and
 * high again: the PIC sees a new edge and interrupts again after the EOI. */
void uart_isr(void)
{
	for (int i = 0; i < 16; i++) {
		uint8_t iir = inb(IIR);

		if (iir & 1)
			return;
		switch (iir & 0x0e) {
		case 0x02:		/* THR empty */
			tx_fill();
			break;
		case 0x04:		/* received data */
		case 0x0c:		/* character timeout */
			rx_drain();
			break;
		case 0x06:		/* line status */
			(void)inb(LSR);
			break;
		default:		/* modem status */
			(void)inb(MSR);
			break;
		}
	}
	outb(IER, 0);
	outb(IER, ier);
}

/* Kernel console output through the TX ring. Only used when no task is
 * running (boot, shutdown): waits for room with interrupts enabled. */
static void kputc(char c)
{
	while (tx_free() == 0) {
		tx_kick();
		idle_wait();
	}
	tx_put(c);
}

void kputsn(const char *s, size_t n)
{
	while (n-- > 0 && *s)
		kputc(*s++);
	tx_kick();
}

void kputs(const char *s)
{
	while (*s)
		kputc(*s++);
	tx_kick();
}

void kputu(uint64_t v)
{
	char b[21];
	int i = 20;

	b[20] = 0;
	do {
		b[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	kputs(b + i);
}

/* Wait until the ring is empty and the transmitter has sent everything. */
void uart_wait_idle(void)
{
	while (tx_head != tx_tail) {
		tx_kick();
		idle_wait();
	}
	for (uint32_t i = 0; i < 1000000 && !(inb(LSR) & LSR_TEMT); i++)
		;
}

/* Polled output for the fatal path: interrupts off, ring flushed first. */
static void poll_putc(char c)
{
	for (uint32_t i = 0; i < 1000000 && !(inb(LSR) & LSR_THRE); i++)
		;
	outb(THR, c);
	last_out = c;
}

void poll_drain(void)
{
	ier = 0;
	outb(IER, 0);
	while (tx_tail != tx_head)
		poll_putc(txbuf[tx_tail++ & (TX_RING - 1)]);
	if (last_out != '\n')		/* end a partial line */
		poll_putc('\n');
}

void poll_puts(const char *s)
{
	while (*s)
		poll_putc(*s++);
}

void poll_putx(uint64_t v)
{
	char b[17];
	int i = 16;

	b[16] = 0;
	do {
		b[--i] = "0123456789abcdef"[v & 15];
		v >>= 4;
	} while (v);
	poll_puts(b + i);
}

void poll_putu(uint64_t v)
{
	char b[21];
	int i = 20;

	b[20] = 0;
	do {
		b[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	poll_puts(b + i);
}
