/* The compute workload's loop, shared with the host-side benchmark
 * (test/hostloop) so that both run the very same code: one MiB of an
 * xorshift64 byte stream hashed with FNV-1a 64 (README.md). */
#ifndef TESTOS_HASH_H
#define TESTOS_HASH_H

#include <stdint.h>

static inline void hash_mib(uint64_t *xp, uint64_t *hp)
{
	uint64_t x = *xp, h = *hp;

	for (int w = 0; w < (1 << 20) / 8; w++) {
		uint64_t v;

		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		v = x;
		for (int b = 0; b < 8; b++) {
			h ^= v & 0xff;
			h *= 0x100000001b3ull;
			v >>= 8;
		}
	}
	*xp = x;
	*hp = h;
}

#endif
