/* The formats of the disk workload's records and the netecho workload's
 * frames (README.md, "disk" and "netecho"); test/devices_test.go checks
 * them from the host. All integers little-endian. */
#ifndef TESTOS_RECORDS_H
#define TESTOS_RECORDS_H

#include <stdint.h>
#include <stddef.h>

#define FNV_BASIS 0xcbf29ce484222325ull
#define FNV_PRIME 0x100000001b3ull

static inline uint64_t fnv1a(uint64_t h, const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= FNV_PRIME;
	}
	return h;
}

static inline void put64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++, v >>= 8)
		p[i] = (uint8_t)v;
}

static inline uint64_t get64(const uint8_t *p)
{
	uint64_t v = 0;

	for (int i = 7; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

static inline void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++, v >>= 8)
		p[i] = (uint8_t)v;
}

static inline uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}

static inline uint16_t get16(const uint8_t *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

/* disk: record i (1-based) fills sector start + i - 1:
 *   0   8 bytes  "FTKVREC1"
 *   8   le64     i
 *   16  le64     records (the run's total)
 *   24  480 bytes: 60 words of xorshift64 (x ^= x<<13, x>>7, x<<17),
 *       x0 = 0x9E3779B97F4A7C15 ^ i, each word after one step
 *   504 le64     FNV-1a 64 of bytes 0..503 */
#define REC_SIZE 512
#define REC_SUM  504

static inline void rec_fill(uint8_t *r, uint64_t i, uint64_t records)
{
	const char *m = "FTKVREC1";
	uint64_t x = 0x9E3779B97F4A7C15ull ^ i;

	for (int k = 0; k < 8; k++)
		r[k] = (uint8_t)m[k];
	put64(r + 8, i);
	put64(r + 16, records);
	for (int w = 0; w < 60; w++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		put64(r + 24 + 8 * w, x);
	}
	put64(r + REC_SUM, fnv1a(FNV_BASIS, r, REC_SUM));
}

/* disk order=random: record i goes to sector start + pos_i, where pos_1,
 * pos_2, ... are the values below `records` in the order the LCG
 * x = (REC_LCG_A * x + REC_LCG_C) mod m visits them from x = 0, m the
 * smallest power of two >= records. With A = 1 mod 4 and C odd the LCG's
 * period is m (Hull-Dobell), so every position 0..records-1 comes exactly
 * once: a fixed permutation, the same on every run and replica. */
#define REC_LCG_A 6364136223846793005ull
#define REC_LCG_C 1442695040888963407ull

struct rec_order {
	uint64_t x, mask, n;
};

static inline void rec_order_init(struct rec_order *o, uint64_t records)
{
	uint64_t m = 1;

	while (m < records)
		m <<= 1;
	o->x = 0;
	o->mask = m - 1;
	o->n = records;
}

/* rec_order_next: the next position; skips the at most m - records
 * values at or above records. */
static inline uint64_t rec_order_next(struct rec_order *o)
{
	do
		o->x = (REC_LCG_A * o->x + REC_LCG_C) & o->mask;
	while (o->x >= o->n);
	return o->x;
}

/* netecho: frames of EtherType 0x88b5 (IEEE 802 local experimental
 * EtherType 1). After the 14-byte Ethernet header:
 *   0   u8       kind: NE_REQUEST (client to guest), NE_ECHO (guest's
 *                answer), NE_SEND (sent by the guest on its own), NE_END
 *                (client: the guest ends after answering it)
 *   1   3 bytes  zero
 *   4   le32     client sequence (echoed unchanged; 0 in NE_SEND frames)
 *   8   le32     guest sequence (1, 2, ... over every frame the guest
 *                sends; 0 from the client)
 *   12  le16     data length n
 *   14  2 bytes  zero
 *   16  n bytes  data
 *   16+n le64    FNV-1a 64 of the 16+n bytes before it */
#define NE_ETHERTYPE 0x88b5
#define NE_REQUEST 1
#define NE_ECHO    2
#define NE_SEND    3
#define NE_END     4
#define NE_HDR     16
#define NE_MAXDATA 1400

#endif
