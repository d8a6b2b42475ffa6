/*
 * testos kernel: CPU tables, PIC, PIT, CMOS, scheduler, syscalls, workload
 * selection. Runs at ring 0 with interrupts disabled everywhere except in the
 * idle wait (sti; hlt). Ring-0 code is emulated on the project's KVM (about
 * 0.5 us per instruction): every path here is kept short.
 */
#include "k.h"
#include "workloads.h"

/* Xen public/arch-x86/hvm/start_info.h */
struct hvm_start_info {
	uint32_t magic;			/* 0x336ec578 */
	uint32_t version;
	uint32_t flags;
	uint32_t nr_modules;
	uint64_t modlist_paddr;
	uint64_t cmdline_paddr;
	uint64_t rsdp_paddr;
	uint64_t memmap_paddr;		/* version >= 1 */
	uint32_t memmap_entries;
	uint32_t reserved;
};
#define HVM_START_MAGIC 0x336ec578

#define PIC1_CMD  0x20
#define PIC1_DATA 0x21
#define PIC2_CMD  0xa0
#define PIC2_DATA 0xa1
#define PIC_EOI   0x20
#define PIT_CH0   0x40
#define PIT_CMD   0x43
#define PIT_HZ    1193182u
#define CMOS_ADDR 0x70
#define CMOS_DATA 0x71
#define DEBUG_EXIT 0x501

#define MSR_STAR   0xc0000081
#define MSR_LSTAR  0xc0000082
#define MSR_SFMASK 0xc0000084

#define NVEC 48		/* 0-31 exceptions, 32-47 PIC */

struct tss64 {
	uint32_t reserved0;
	uint64_t rsp0, rsp1, rsp2;
	uint64_t reserved1;
	uint64_t ist[7];
	uint64_t reserved2;
	uint16_t reserved3;
	uint16_t iomap_base;
} __attribute__((packed));

struct idt_gate {
	uint16_t off0, sel;
	uint8_t ist, type;
	uint16_t off1;
	uint32_t off2, reserved;
} __attribute__((packed));

struct dtr {
	uint16_t limit;
	uint64_t base;
} __attribute__((packed));

extern uint64_t gdt[];
extern const uint64_t isr_table[NVEC];
extern char kstacks[];
extern char user_stacks[];
extern char __user_start[], __user_image_end[];
extern void syscall_stub(void);
extern void task_trampoline(void);
extern void user_task_exit(void);
extern void switch_to(uint64_t *save_ksp, uint64_t next_ksp);

/* Used by syscall_entry (k_entry.S). */
uint64_t syscall_kstack;
uint64_t syscall_user_rsp;

/* The ring tasks run at (cmdline ring=0|3) and their selectors, which
 * task_create and syscall_entry put in iretq frames. ring=0 is for the
 * project's step clock, which can count ring-0 instructions only. */
int tasks_ring0;
uint64_t task_cs = SEL_UCODE_RPL3, task_ss = SEL_UDATA_RPL3;

static struct tss64 tss __attribute__((aligned(16)));
static struct idt_gate idt[NVEC] __attribute__((aligned(16)));

static volatile uint64_t ticks;
static struct task tasks[MAX_TASKS];
struct task *cur;
static int ntasks, nlive;
static uint64_t boot_ksp;
static int failed;
static char fail_reason[100];
static char cmdline[1024];

static void wrmsr(uint32_t msr, uint64_t v)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)));
}

static void set_gate(int v, uint64_t h, uint8_t type)
{
	idt[v].off0 = (uint16_t)h;
	idt[v].sel = SEL_KCODE;
	idt[v].ist = 0;
	idt[v].type = type;
	idt[v].off1 = (uint16_t)(h >> 16);
	idt[v].off2 = (uint32_t)(h >> 32);
	idt[v].reserved = 0;
}

static void cpu_init(void)
{
	uint64_t base = (uint64_t)&tss;
	uint64_t limit = sizeof(tss) - 1;
	struct dtr d;

	/* 64-bit available TSS descriptor at 0x30. */
	tss.iomap_base = sizeof(tss);	/* no I/O bitmap: ring 3 cannot do port I/O */
	gdt[SEL_TSS / 8] = (limit & 0xffff) | ((base & 0xffffff) << 16) |
			   (0x89ull << 40) | (((limit >> 16) & 0xf) << 48) |
			   (((base >> 24) & 0xff) << 56);
	gdt[SEL_TSS / 8 + 1] = base >> 32;
	__asm__ volatile("ltr %w0" : : "r"((uint16_t)SEL_TSS));

	/* 64-bit interrupt gates (IF cleared on entry), DPL 0. A vector
	 * above 47 is beyond the IDT limit: #GP, fatal. */
	for (int i = 0; i < NVEC; i++)
		set_gate(i, isr_table[i], 0x8e);
	d.limit = sizeof(idt) - 1;
	d.base = (uint64_t)idt;
	__asm__ volatile("lidt %0" : : "m"(d));

	/* syscall: CS=0x08 SS=0x10; sysret: SS=0x18+8=0x20, CS=0x18+16=0x28.
	 * SFMASK clears TF, IF, DF, IOPL, NT, AC. EFER.SCE was set at boot.
	 * LSTAR is syscall_stub in the user region (see u_start.S). */
	wrmsr(MSR_STAR, ((uint64_t)(SEL_UCODE32 | 3) << 48) | ((uint64_t)SEL_KCODE << 32));
	wrmsr(MSR_LSTAR, (uint64_t)syscall_stub);
	wrmsr(MSR_SFMASK, 0x47700);
}

/* Opens 8259 line irq (a virtio device's, k_virtio.c); the cascade line 2
 * is open from pic_init. */
void pic_unmask(int irq)
{
	if (irq < 8)
		outb(PIC1_DATA, inb(PIC1_DATA) & (uint8_t)~(1 << irq));
	else
		outb(PIC2_DATA, inb(PIC2_DATA) & (uint8_t)~(1 << (irq - 8)));
}

static void pic_init(void)
{
	outb(PIC1_CMD, 0x11);		/* ICW1: edge, cascade, ICW4 */
	outb(PIC2_CMD, 0x11);
	outb(PIC1_DATA, 0x20);		/* ICW2: vector base */
	outb(PIC2_DATA, 0x28);
	outb(PIC1_DATA, 0x04);		/* ICW3: slave on IR2 */
	outb(PIC2_DATA, 0x02);		/* ICW3: slave identity 2 */
	outb(PIC1_DATA, 0x01);		/* ICW4: 8086 mode */
	outb(PIC2_DATA, 0x01);
	outb(PIC1_DATA, (uint8_t)~((1 << 0) | (1 << 2) | (1 << 4)));
	outb(PIC2_DATA, 0xff);
}

static uint32_t pit_divisor(uint64_t hz)
{
	return (uint32_t)((PIT_HZ + hz / 2) / hz);
}

static void pit_init(uint64_t hz)
{
	uint32_t div = pit_divisor(hz);

	outb(PIT_CMD, 0x34);		/* channel 0, lobyte/hibyte, mode 2, binary */
	outb(PIT_CH0, (uint8_t)div);
	outb(PIT_CH0, (uint8_t)(div >> 8));
}

static uint16_t pit_read(void)
{
	uint8_t lo, hi;

	outb(PIT_CMD, 0x00);		/* latch channel 0 */
	lo = inb(PIT_CH0);
	hi = inb(PIT_CH0);
	return (uint16_t)(lo | (hi << 8));
}

static uint8_t cmos_read(uint8_t reg)
{
	/* Wait for "update in progress" to clear (status register A, bit 7);
	 * the datasheet then guarantees 244 us without an update. Bounded so
	 * that a broken RTC cannot hang the kernel. */
	for (int i = 0; i < 100000; i++) {
		outb(CMOS_ADDR, 0x0a);
		if (!(inb(CMOS_DATA) & 0x80))
			break;
	}
	outb(CMOS_ADDR, reg);
	return inb(CMOS_DATA);
}

/* ---- scheduler ---- */

static void task_create(task_fn fn, uint64_t a0, uint64_t a1, uint64_t a2)
{
	struct task *t = &tasks[ntasks];
	uint64_t ktop = (uint64_t)kstacks + (uint64_t)(ntasks + 1) * KSTACK_SIZE;
	uint64_t utop = (uint64_t)user_stacks + (uint64_t)(ntasks + 1) * USTACK_SIZE;
	uint64_t *usp = (uint64_t *)(utop - 8);
	uint64_t *k = (uint64_t *)ktop;

	*usp = (uint64_t)user_task_exit;	/* the task function returns here */
	*--k = task_ss;				/* iretq frame: ss */
	*--k = (uint64_t)usp;			/* rsp */
	*--k = 0x202;				/* rflags: IF */
	*--k = task_cs;				/* cs */
	*--k = (uint64_t)fn;			/* rip */
	*--k = (uint64_t)task_trampoline;	/* switch_to's ret */
	*--k = 0;				/* rbx */
	*--k = 0;				/* rbp */
	*--k = a0;				/* r12 */
	*--k = a1;				/* r13 */
	*--k = a2;				/* r14 */
	*--k = 0;				/* r15 */
	t->ksp = (uint64_t)k;
	t->ktop = ktop;
	t->state = T_RUN;
	ntasks++;
	nlive++;
}

static void all_exited(void) __attribute__((noreturn));

/* Round robin: the next runnable task after cur (cur itself last). */
static struct task *pick(void)
{
	int start = cur ? (int)(cur - tasks) + 1 : 0;

	for (int i = 0; i < ntasks; i++) {
		int j = start + i;

		if (j >= ntasks)
			j -= ntasks;
		if (tasks[j].state == T_RUN)
			return &tasks[j];
	}
	return 0;
}

/* Called with interrupts disabled, from a syscall or from the timer
 * interrupt of a ring-3 task. Idles (sti; hlt) while nothing can run. */
void schedule(void)
{
	struct task *prev = cur, *next;

	for (;;) {
		next = pick();
		if (next)
			break;
		if (nlive == 0)
			all_exited();
		idle_wait();
	}
	if (next == prev)
		return;
	cur = next;
	tss.rsp0 = next->ktop;
	syscall_kstack = next->ktop;
	switch_to(prev ? &prev->ksp : &boot_ksp, next->ksp);
}

void wake_tx(uint32_t free)
{
	for (int i = 0; i < ntasks; i++)
		if (tasks[i].state == T_BLOCK_TX && tasks[i].need <= free)
			tasks[i].state = T_RUN;
}

void wake_rx(void)
{
	for (int i = 0; i < ntasks; i++)
		if (tasks[i].state == T_BLOCK_RX)
			tasks[i].state = T_RUN;
}

/* Tasks waiting for a virtio device (k_virtio.c) look again. */
void wake_io(void)
{
	for (int i = 0; i < ntasks; i++)
		if (tasks[i].state == T_BLOCK_IO)
			tasks[i].state = T_RUN;
}

/* The running task waits for a virtio device's interrupt (or another
 * task's release of the device); it runs again after wake_io. */
void block_io(void)
{
	cur->state = T_BLOCK_IO;
	schedule();
}

void finish(int status)
{
	uart_wait_idle();
	outb(DEBUG_EXIT, (uint8_t)status);
	for (;;)
		__asm__ volatile("cli; hlt");
}

static void all_exited(void)
{
	if (!failed) {
		kputs("testos: PASS\n");
		finish(0);
	}
	kputs("testos: FAIL ");
	kputs(fail_reason);
	kputs("\n");
	finish(1);
}

/* ---- interrupts and exceptions ---- */

static int in_user_region(uint64_t p)
{
	return p >= (uint64_t)__user_start && p < (uint64_t)__user_image_end;
}

/* A timer tick preempts task code: ring 3, or with ring=0 the user region
 * (task code lives there; the kernel only calls memset/memcpy there, with
 * interrupts off). */
static int preemptible(const struct frame *f)
{
	return (f->cs & 3) || (tasks_ring0 && in_user_region(f->rip));
}

static void fatal(struct frame *f) __attribute__((noreturn));
static void fatal(struct frame *f)
{
	uint64_t cr2;

	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	poll_drain();
	poll_puts("testos: EXCEPTION vector=");
	poll_putu(f->vec);
	poll_puts(" error=0x");
	poll_putx(f->err);
	poll_puts(" rip=0x");
	poll_putx(f->rip);
	poll_puts(" cs=0x");
	poll_putx(f->cs);
	poll_puts(" rsp=0x");
	poll_putx(f->rsp);
	poll_puts(" ss=0x");
	poll_putx(f->ss);
	poll_puts(" rflags=0x");
	poll_putx(f->rflags);
	poll_puts(" rcx=0x");
	poll_putx(f->rcx);
	poll_puts(" r11=0x");
	poll_putx(f->r11);
	if (f->vec == 14) {
		poll_puts(" cr2=0x");
		poll_putx(cr2);
	}
	poll_puts("\n");
	for (uint32_t i = 0; i < 1000000 && !(inb(0x3fd) & 0x40); i++)
		;
	outb(DEBUG_EXIT, 3);
	for (;;)
		__asm__ volatile("cli; hlt");
}

void isr_dispatch(struct frame *f)
{
	uint64_t v = f->vec;

	if (v == 0x20) {			/* IRQ0: PIT */
		outb(PIC1_CMD, PIC_EOI);
		ticks++;
		if (preemptible(f))		/* task code only, never the kernel */
			schedule();
		return;
	}
	if (v == 0x24) {			/* IRQ4: COM1 */
		uart_isr();
		outb(PIC1_CMD, PIC_EOI);
		return;
	}
	if (v < 0x20)
		fatal(f);
	if (v == 0x27) {			/* spurious IRQ7? */
		outb(PIC1_CMD, 0x0b);
		if (!(inb(PIC1_CMD) & 0x80))
			return;
	}
	if (v == 0x2f) {			/* spurious IRQ15? */
		outb(PIC2_CMD, 0x0b);
		if (!(inb(PIC2_CMD) & 0x80)) {
			outb(PIC1_CMD, PIC_EOI);
			return;
		}
	}
	virtio_irq((int)(v - 0x20));	/* a virtio device's line, if any */
	if (v >= 0x28)
		outb(PIC2_CMD, PIC_EOI);
	outb(PIC1_CMD, PIC_EOI);
}

/* ---- syscalls ---- */

int user_ok(uint64_t p, uint64_t len)
{
	uint64_t lo = (uint64_t)__user_start, hi = (uint64_t)__user_image_end;

	return p >= lo && p <= hi && len <= hi - p;
}

static long sys_write(uint64_t buf, uint64_t len)
{
	const char *b = (const char *)buf;
	uint64_t done = 0;

	if (!user_ok(buf, len))
		return -1;
	/* A write of up to TX_RING bytes goes into the ring in one piece, so
	 * that lines of different tasks never mix. */
	while (done < len) {
		uint32_t want = len - done > TX_RING ? TX_RING : (uint32_t)(len - done);

		while (tx_free() < want) {
			tx_kick();
			cur->need = want;
			cur->state = T_BLOCK_TX;
			schedule();
		}
		for (uint32_t i = 0; i < want; i++)
			tx_put(b[done + i]);
		done += want;
		tx_kick();
	}
	return (long)len;
}

static long sys_read(uint64_t buf, uint64_t len)
{
	char *b = (char *)buf;
	uint64_t n = 0;

	if (!user_ok(buf, len))
		return -1;
	if (len == 0)
		return 0;
	while (rx_empty()) {
		cur->state = T_BLOCK_RX;
		schedule();
	}
	while (n < len && !rx_empty())
		b[n++] = rx_get();
	return (long)n;
}

static void sys_exit(uint64_t status, uint64_t reason)
{
	if (status != 0 && !failed) {
		int n = 0;

		failed = 1;
		if (reason && user_ok(reason, 1)) {
			const char *r = (const char *)reason;

			while (n < (int)sizeof(fail_reason) - 1 &&
			       user_ok(reason + n, 1) && r[n] && r[n] != '\n') {
				fail_reason[n] = r[n];
				n++;
			}
		}
		if (n == 0) {
			const char *s = "task exited with nonzero status";

			while (*s)
				fail_reason[n++] = *s++;
		}
		fail_reason[n] = 0;
	}
	cur->state = T_DEAD;
	nlive--;
	schedule();	/* never returns: the task is dead */
}

long syscall_dispatch(uint64_t a0, uint64_t a1, uint64_t a2, uint64_t nr)
{
	switch (nr) {
	case SYS_EXIT:
		sys_exit(a0, a1);
		return -1;
	case SYS_WRITE:
		return sys_write(a0, a1);
	case SYS_READ:
		return sys_read(a0, a1);
	case SYS_TICKS:
		return (long)ticks;
	case SYS_YIELD:
		schedule();
		return 0;
	case SYS_PIT_READ:
		return pit_read();
	case SYS_CMOS_READ:
		if (a0 > 0x7f)
			return -1;
		return cmos_read((uint8_t)a0);
	case SYS_BLK_INFO:
		return blk_info();
	case SYS_BLK_READ:
		return blk_rw(a0, a1, a2, 0);
	case SYS_BLK_WRITE:
		return blk_rw(a0, a1, a2, 1);
	case SYS_BLK_FLUSH:
		return blk_flush();
	case SYS_NET_MAC:
		return net_mac(a0);
	case SYS_NET_SEND:
		return net_send(a0, a1);
	case SYS_NET_RECV:
		return net_recv(a0, a1);
	}
	return -1;
}

/* ---- command line ---- */

static int is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Finds key=value (the last one wins); other tokens are ignored. */
static int opt(const char *key, const char **val, size_t *vlen)
{
	size_t kl = 0;
	const char *p = cmdline;
	int found = 0;

	while (key[kl])
		kl++;
	while (*p) {
		const char *tok;
		size_t tl, i;

		while (is_space(*p))
			p++;
		tok = p;
		while (*p && !is_space(*p))
			p++;
		tl = (size_t)(p - tok);
		if (tl <= kl || tok[kl] != '=')
			continue;
		for (i = 0; i < kl && tok[i] == key[i]; i++)
			;
		if (i == kl) {
			*val = tok + kl + 1;
			*vlen = tl - kl - 1;
			found = 1;
		}
	}
	return found;
}

static uint64_t num_opt(const char *key, uint64_t def, uint64_t min, uint64_t max)
{
	const char *v;
	size_t n, i;
	uint64_t x = 0;

	if (!opt(key, &v, &n))
		return def;
	if (n == 0 || n > 12)
		goto bad;
	for (i = 0; i < n; i++) {
		if (v[i] < '0' || v[i] > '9')
			goto bad;
		x = x * 10 + (uint64_t)(v[i] - '0');
	}
	if (x >= min && x <= max)
		return x;
bad:
	kputs("testos: bad option ");
	kputs(key);
	kputs("=");
	kputsn(v, n);
	kputs(" (want a decimal number in ");
	kputu(min);
	kputs("..");
	kputu(max);
	kputs(")\n");
	finish(2);
}

static int name_is(const char *v, size_t n, const char *s)
{
	size_t i;

	for (i = 0; i < n; i++)
		if (s[i] != v[i])
			return 0;
	return s[i] == 0;
}

void kmain(uint32_t start_info)
{
	const struct hvm_start_info *si = (const struct hvm_start_info *)(uint64_t)start_info;
	const char *name = "";
	size_t nlen = 0;
	uint64_t hz;

	cpu_init();
	pic_init();
	uart_init();
	if (si->magic != HVM_START_MAGIC) {
		kputs("testos: bad hvm_start_info magic\n");
		finish(2);
	}
	if (si->cmdline_paddr) {
		const char *c = (const char *)si->cmdline_paddr;

		for (size_t i = 0; i < sizeof(cmdline) - 1 && c[i]; i++)
			cmdline[i] = c[i];
	}

	hz = num_opt("hz", 100, 19, 10000);
	pit_init(hz);
	switch (num_opt("ring", 3, 0, 3)) {
	case 0:
		tasks_ring0 = 1;
		task_cs = SEL_KCODE;
		task_ss = SEL_KDATA;
		break;
	case 3:
		break;
	default:
		kputs("testos: bad option ring (want 0 or 3)\n");
		finish(2);
	}
	opt("workload", &name, &nlen);
	kputs("testos: workload=");
	kputsn(name, nlen);
	kputs(" hz=");
	kputu(hz);
	if (tasks_ring0)
		kputs(" ring=0");
	kputs("\n");

	if (name_is(name, nlen, "counter")) {
		task_create(w_counter, num_opt("lines", 20, 1, 100000000),
			    num_opt("wait", 3, 0, 1000000), 0);
	} else if (name_is(name, nlen, "interleave")) {
		uint64_t lines = num_opt("lines", 20, 1, 100000000);
		uint64_t work = num_opt("work", 1000000, 1, 1000000000);

		task_create(w_interleave, 'A', lines, work);
		task_create(w_interleave, 'B', lines, work);
	} else if (name_is(name, nlen, "compute")) {
		task_create(w_compute, num_opt("mib", 16, 1, 1000000),
			    num_opt("every", 4, 1, 1000000), 0);
		task_create(w_compute_ticker, hz, 0, 0);
	} else if (name_is(name, nlen, "clock")) {
		task_create(w_clock, num_opt("samples", 5, 1, 100000000),
			    num_opt("wait", hz / 2, 1, 1000000), pit_divisor(hz));
	} else if (name_is(name, nlen, "echo")) {
		task_create(w_echo, 0, 0, 0);
	} else if (name_is(name, nlen, "fault")) {
		task_create(w_fault, 0, 0, 0);
	} else if (name_is(name, nlen, "tsc")) {
		task_create(w_tsc, num_opt("samples", 5, 1, 100000000),
			    num_opt("work", 1000, 0, 1000000000), 0);
	} else if (name_is(name, nlen, "rdrand")) {
		task_create(w_rdrand, 0, 0, 0);
	} else if (name_is(name, nlen, "disk")) {
		const char *o = "seq";
		size_t ol = 3;
		uint64_t random;

		opt("order", &o, &ol);
		if (name_is(o, ol, "seq")) {
			random = 0;
		} else if (name_is(o, ol, "random")) {
			random = 1;
		} else {
			kputs("testos: bad option order (want seq or random)\n");
			finish(2);
		}
		virtio_init(1, 0);
		task_create(w_disk, num_opt("records", 32, 1, 1000000),
			    num_opt("start", 0, 0, 1000000000), random);
	} else if (name_is(name, nlen, "netecho")) {
		const char *m = "echo";
		size_t ml = 4;
		uint64_t send;

		opt("mode", &m, &ml);
		if (name_is(m, ml, "echo")) {
			send = 0;
		} else if (name_is(m, ml, "send")) {
			send = 1;
		} else {
			kputs("testos: bad option mode (want echo or send)\n");
			finish(2);
		}
		virtio_init(0, 1);
		task_create(w_netecho, send | num_opt("size", 64, 0, 1400) << 8,
			    num_opt("frames", send ? 32 : 0, 0, 100000000),
			    num_opt("every", send ? 1 : 8, 1, 1000000));
	} else {
		if (nlen == 0)
			kputs("testos: error: no workload given (workload=counter|interleave|compute|clock|echo|fault|tsc|rdrand|disk|netecho)\n");
		else {
			kputs("testos: error: unknown workload \"");
			kputsn(name, nlen);
			kputs("\"\n");
		}
		finish(2);
	}
	schedule();	/* to the first task; never returns here */
	finish(3);
}
