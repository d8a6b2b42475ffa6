/* testos ring-3 library. Also provides memset/memcpy, which gcc may call
 * from any code; they live in the user region, where the kernel can call
 * them as well. */
#include "u.h"

void *memset(void *d, int c, size_t n)
{
	unsigned char *p = d;

	while (n--)
		*p++ = (unsigned char)c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
	unsigned char *p = d;
	const unsigned char *q = s;

	while (n--)
		*p++ = *q++;
	return d;
}

void l_chr(struct line *l, char c)
{
	if (l->n < (int)sizeof(l->b) - 1)
		l->b[l->n++] = c;
}

void l_str(struct line *l, const char *s)
{
	while (*s)
		l_chr(l, *s++);
}

void l_dec(struct line *l, uint64_t v)
{
	char b[20];
	int i = 0;

	do {
		b[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (i > 0)
		l_chr(l, b[--i]);
}

void l_dec2(struct line *l, unsigned v)
{
	l_chr(l, (char)('0' + v / 10 % 10));
	l_chr(l, (char)('0' + v % 10));
}

void l_hex16(struct line *l, uint64_t v)
{
	for (int s = 60; s >= 0; s -= 4)
		l_chr(l, "0123456789abcdef"[(v >> s) & 15]);
}

void l_end(struct line *l)
{
	l->b[l->n++] = '\n';
	sys_write(l->b, (size_t)l->n);
	l->n = 0;
}

void u_puts(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	sys_write(s, n);
}

uint64_t spin(uint64_t x, uint64_t n)
{
	while (n--) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
	}
	return x;
}
