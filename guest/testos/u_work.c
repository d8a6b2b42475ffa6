/*
 * testos workloads: ring-3 task bodies. The kernel starts them (see kmain)
 * and prints the "testos: workload=..." header before and the
 * "testos: PASS" / "testos: FAIL <reason>" line after all tasks exited.
 * A task fails by exit(nonzero, reason).
 */
#include "u.h"
#include "workloads.h"
#include "hash.h"

static volatile uint64_t sink;		/* keeps ring-3 busy work alive */

/* Busy work at ring 3, then yield, then read the tick count. */
static uint64_t poll_ticks(uint64_t *x)
{
	*x = spin(*x, 100000);
	sink = *x;
	sys_yield();
	return sys_ticks();
}

/* counter: lines "counter <i> ticks=<t>", about `wait` ticks apart. */
long w_counter(uint64_t lines, uint64_t wait, uint64_t unused)
{
	struct line l;
	uint64_t x = 1, last = sys_ticks(), prev = last;

	(void)unused;
	l.n = 0;
	for (uint64_t i = 1; i <= lines; i++) {
		uint64_t t;

		do {
			t = poll_ticks(&x);
			if (t < prev)
				sys_exit(1, "counter: tick count went backwards");
			prev = t;
		} while (t - last < wait);
		last = t;
		l_str(&l, "counter ");
		l_dec(&l, i);
		l_str(&l, " ticks=");
		l_dec(&l, t);
		l_end(&l);
	}
	return 0;
}

/* interleave: task `name` ('A' or 'B') prints "<name> <i>" for i=1..lines,
 * with a pseudo-random amount (work/2 .. 3*work/2 xorshift rounds) of ring-3
 * work before each line; which task prints next depends on where the timer
 * interrupts land. */
long w_interleave(uint64_t name, uint64_t lines, uint64_t work)
{
	struct line l;
	uint64_t x = 0x9E3779B97F4A7C15ull ^ name, r = 0x2545F4914F6CDD1Dull * name;
	uint64_t last = 0;

	l.n = 0;
	for (uint64_t i = 1; i <= lines; i++) {
		r = spin(r, 1);
		x = spin(x, work / 2 + r % (work + 1));
		sink = x;
		if (i <= last)
			sys_exit(1, "interleave: numbering not increasing");
		last = i;
		l_chr(&l, (char)name);
		l_chr(&l, ' ');
		l_dec(&l, i);
		l_end(&l);
	}
	return 0;
}

/* compute: FNV-1a 64 over an xorshift64 byte stream (README.md). */
static volatile int compute_done;

long w_compute(uint64_t mib, uint64_t every, uint64_t unused)
{
	struct line l;
	uint64_t x = 0x9E3779B97F4A7C15ull;
	uint64_t h = 0xcbf29ce484222325ull;

	(void)unused;
	l.n = 0;
	for (uint64_t k = 1; k <= mib; k++) {
		hash_mib(&x, &h);
		if (k % every == 0 || k == mib) {
			l_str(&l, "compute mib=");
			l_dec(&l, k);
			l_str(&l, " sum=");
			l_hex16(&l, h);
			l_end(&l);
		}
	}
	compute_done = 1;
	return 0;
}

/* The second compute task: "compute tick <t>" every hz ticks until the
 * hashing task is done. It yields between polls, so the hashing task runs
 * until the next timer interrupt preempts it. */
long w_compute_ticker(uint64_t hz, uint64_t unused1, uint64_t unused2)
{
	struct line l;
	uint64_t next = sys_ticks() + hz;

	(void)unused1;
	(void)unused2;
	l.n = 0;
	while (!compute_done) {
		uint64_t t = sys_ticks();

		if (t >= next) {
			l_str(&l, "compute tick ");
			l_dec(&l, t);
			l_end(&l);
			next += hz;
		} else {
			sys_yield();
		}
	}
	return 0;
}

/* clock: "clock pit=<n> cmos=YYYY-MM-DD HH:MM:SS ticks=<t>", about `wait`
 * ticks apart (default hz/2). */
struct rtc {
	long sec, min, hour, day, mon, year, cent, regb;
};

static void rtc_raw(struct rtc *r)
{
	r->sec = sys_cmos_read(0x00);
	r->min = sys_cmos_read(0x02);
	r->hour = sys_cmos_read(0x04);
	r->day = sys_cmos_read(0x07);
	r->mon = sys_cmos_read(0x08);
	r->year = sys_cmos_read(0x09);
	r->cent = sys_cmos_read(0x32);
	r->regb = sys_cmos_read(0x0b);
}

static int rtc_same(const struct rtc *a, const struct rtc *b)
{
	return a->sec == b->sec && a->min == b->min && a->hour == b->hour &&
	       a->day == b->day && a->mon == b->mon && a->year == b->year &&
	       a->cent == b->cent && a->regb == b->regb;
}

/* BCD or binary per status register B bit 2; -1 if not a valid BCD byte. */
static long rtc_val(long v, int binary)
{
	if (v < 0)
		return -1;
	if (binary)
		return v;
	if ((v & 0x0f) > 9 || (v >> 4) > 9)
		return -1;
	return (v >> 4) * 10 + (v & 0x0f);
}

static const char *rtc_read(struct rtc *out)
{
	struct rtc a, b;
	int binary, h24, pm = 0;
	long hour, cent;

	/* Registers are read one by one; repeat until two rounds agree so that
	 * an update between two reads cannot produce a mixed time. */
	rtc_raw(&a);
	for (int i = 0; i < 10; i++) {
		rtc_raw(&b);
		if (rtc_same(&a, &b))
			break;
		a = b;
	}
	binary = (a.regb & 0x04) != 0;
	h24 = (a.regb & 0x02) != 0;
	hour = a.hour;
	if (!h24) {
		pm = (hour & 0x80) != 0;
		hour &= 0x7f;
	}
	out->sec = rtc_val(a.sec, binary);
	out->min = rtc_val(a.min, binary);
	out->hour = rtc_val(hour, binary);
	out->day = rtc_val(a.day, binary);
	out->mon = rtc_val(a.mon, binary);
	out->year = rtc_val(a.year, binary);
	if (out->sec < 0 || out->sec > 59)
		return "clock: CMOS seconds out of range";
	if (out->min < 0 || out->min > 59)
		return "clock: CMOS minutes out of range";
	if (!h24) {
		if (out->hour < 1 || out->hour > 12)
			return "clock: CMOS hours (12h) out of range";
		out->hour = out->hour % 12 + (pm ? 12 : 0);
	}
	if (out->hour < 0 || out->hour > 23)
		return "clock: CMOS hours out of range";
	if (out->day < 1 || out->day > 31)
		return "clock: CMOS day out of range";
	if (out->mon < 1 || out->mon > 12)
		return "clock: CMOS month out of range";
	if (out->year < 0 || out->year > 99)
		return "clock: CMOS year out of range";
	/* Century (register 0x32) is optional: use it when plausible. */
	cent = rtc_val(a.cent, binary);
	out->cent = cent >= 19 && cent <= 99 ? cent : 20;
	return 0;
}

long w_clock(uint64_t samples, uint64_t wait, uint64_t divisor)
{
	struct line l;
	uint64_t x = 1, last = 0;

	l.n = 0;
	for (uint64_t i = 0; i < samples; i++) {
		struct rtc r;
		const char *err;
		uint64_t t;
		long pit;

		t = sys_ticks();
		if (i > 0)
			while ((t = poll_ticks(&x)) - last < wait)
				;
		last = t;
		pit = sys_pit_read();
		if (pit < 0 || (uint64_t)pit > divisor)
			sys_exit(1, "clock: PIT counter above the reload value");
		err = rtc_read(&r);
		if (err)
			sys_exit(1, err);
		l_str(&l, "clock pit=");
		l_dec(&l, (uint64_t)pit);
		l_str(&l, " cmos=");
		l_dec2(&l, (unsigned)r.cent);
		l_dec2(&l, (unsigned)r.year);
		l_chr(&l, '-');
		l_dec2(&l, (unsigned)r.mon);
		l_chr(&l, '-');
		l_dec2(&l, (unsigned)r.day);
		l_chr(&l, ' ');
		l_dec2(&l, (unsigned)r.hour);
		l_chr(&l, ':');
		l_dec2(&l, (unsigned)r.min);
		l_chr(&l, ':');
		l_dec2(&l, (unsigned)r.sec);
		l_str(&l, " ticks=");
		l_dec(&l, t);
		l_end(&l);
	}
	return 0;
}

/* echo: "echo: ready", then "echo: <LINE UPPERCASED>" per non-empty input
 * line (ended by \r or \n); a line "quit" (any case) or byte 0x04 ends. */
static int is_quit(const char *s, int n)
{
	const char *q = "quit";

	if (n != 4)
		return 0;
	for (int i = 0; i < 4; i++)
		if ((s[i] | 0x20) != q[i])
			return 0;
	return 1;
}

static void echo_line(struct line *l, const char *s, int n)
{
	l_str(l, "echo: ");
	for (int i = 0; i < n; i++) {
		char c = s[i];

		l_chr(l, c >= 'a' && c <= 'z' ? (char)(c - 'a' + 'A') : c);
	}
	l_end(l);
}

long w_echo(uint64_t unused0, uint64_t unused1, uint64_t unused2)
{
	struct line l;
	char in[64], cur[200];
	int n = 0;

	(void)unused0;
	(void)unused1;
	(void)unused2;
	l.n = 0;
	u_puts("echo: ready\n");
	for (;;) {
		long got = sys_read(in, sizeof(in));

		if (got <= 0)
			sys_exit(1, "echo: read failed");
		for (long i = 0; i < got; i++) {
			char c = in[i];

			if (c == 0x04) {
				if (n > 0)
					echo_line(&l, cur, n);
				return 0;
			}
			if (c == '\r' || c == '\n') {
				if (n > 0) {
					echo_line(&l, cur, n);
					if (is_quit(cur, n))
						return 0;
				}
				n = 0;
				continue;
			}
			if (n == (int)sizeof(cur)) {	/* overlong: emit what we have */
				echo_line(&l, cur, n);
				n = 0;
			}
			cur[n++] = c;
		}
	}
}

/* fault: a ring-3 read of kernel memory (not U/S): the kernel reports
 * "testos: EXCEPTION vector=14 ..." and exits with status 3. */
long w_fault(uint64_t unused0, uint64_t unused1, uint64_t unused2)
{
	(void)unused0;
	(void)unused1;
	(void)unused2;
	u_puts("fault: reading kernel memory from ring 3\n");
	return (long)*(volatile uint64_t *)0x100000;
}

/* tsc: "tsc <i> value=<v> delta=<d>" for i = 1..samples, with work
 * xorshift rounds before each RDTSC, then "tsc hash=<h>": FNV-1a 64 over
 * the 8 little-endian bytes of every value. Two runs of the same guest
 * agree on every value only if RDTSC's result came from one shared
 * source (ftkvm's step clock, replayed). FAIL if the counter goes back. */
static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (uint64_t)hi << 32 | lo;
}

long w_tsc(uint64_t samples, uint64_t work, uint64_t unused)
{
	struct line l;
	uint64_t x = 1, prev = rdtsc(), h = 0xcbf29ce484222325ull;

	(void)unused;
	l.n = 0;
	for (uint64_t i = 1; i <= samples; i++) {
		uint64_t t;

		x = spin(x, work);
		sink = x;
		t = rdtsc();
		if (t < prev)
			sys_exit(1, "tsc: counter went backwards");
		for (uint64_t v = t, b = 0; b < 8; b++, v >>= 8) {
			h ^= v & 0xff;
			h *= 0x100000001b3ull;
		}
		l_str(&l, "tsc ");
		l_dec(&l, i);
		l_str(&l, " value=");
		l_dec(&l, t);
		l_str(&l, " delta=");
		l_dec(&l, t - prev);
		l_end(&l);
		prev = t;
	}
	l_str(&l, "tsc hash=");
	l_hex16(&l, h);
	l_end(&l);
	return 0;
}

/* rdrand: "rdrand: executing RDRAND", then RDRAND, which CPUID hides: under
 * ftkvm's step clock it raises #UD (the exception report, status 3); a CPU
 * that runs it anyway prints "rdrand: ran, CF=<c>" and the workload passes. */
long w_rdrand(uint64_t unused0, uint64_t unused1, uint64_t unused2)
{
	struct line l;
	uint64_t v;
	uint8_t cf;

	(void)unused0;
	(void)unused1;
	(void)unused2;
	l.n = 0;
	u_puts("rdrand: executing RDRAND\n");
	__asm__ volatile("rdrand %0; setc %1" : "=r"(v) , "=qm"(cf) : : "cc");
	sink = v;
	l_str(&l, "rdrand: ran, CF=");
	l_dec(&l, cf);
	l_end(&l);
	return 0;
}
