/*
 * testos device workloads (ring 3): disk (virtio-blk) and netecho
 * (virtio-net), over the kernel's drivers (k_virtio.c). Formats in
 * records.h, lines in README.md.
 */
#include "u.h"
#include "workloads.h"
#include "records.h"

static void fail_line(struct line *l, const char *what, uint64_t i, long err)
{
	l_str(l, what);
	l_dec(l, i);
	l_str(l, " failed: error ");
	l_chr(l, '-');
	l_dec(l, (uint64_t)-err);
	l_end(l);
}

/* disk: writes records 1..records (one sector each, from sector start:
 * record i at start + i - 1, or with random set at start + the i-th
 * position of rec_order), flushing after each and printing
 * "disk record <i>" once the flush completed; then reads every record
 * back from where it was written and compares. */
static uint8_t rec[REC_SIZE] __attribute__((aligned(64)));
static uint8_t want[REC_SIZE];

static uint64_t rec_pos(struct rec_order *o, uint64_t i, uint64_t random)
{
	return random ? rec_order_next(o) : i - 1;
}

long w_disk(uint64_t records, uint64_t start, uint64_t random)
{
	struct line l;
	struct rec_order o;
	long cap, r;

	l.n = 0;
	cap = sys_blk_info();
	if (cap < 0)
		sys_exit(1, "disk: no virtio-blk device");
	l_str(&l, "disk: capacity=");
	l_dec(&l, (uint64_t)cap);
	l_str(&l, " records=");
	l_dec(&l, records);
	l_str(&l, " start=");
	l_dec(&l, start);
	if (random)
		l_str(&l, " order=random");
	l_end(&l);
	if (start > (uint64_t)cap || records > (uint64_t)cap - start)
		sys_exit(1, "disk: the disk is too small for the records");
	rec_order_init(&o, records);
	for (uint64_t i = 1; i <= records; i++) {
		rec_fill(rec, i, records);
		r = sys_blk_write(start + rec_pos(&o, i, random), rec, 1);
		if (r < 0) {
			fail_line(&l, "disk: write of record ", i, r);
			sys_exit(1, "disk: write failed");
		}
		r = sys_blk_flush();
		if (r < 0) {
			fail_line(&l, "disk: flush after record ", i, r);
			sys_exit(1, "disk: flush failed");
		}
		l_str(&l, "disk record ");
		l_dec(&l, i);
		l_end(&l);
	}
	rec_order_init(&o, records);
	for (uint64_t i = 1; i <= records; i++) {
		r = sys_blk_read(start + rec_pos(&o, i, random), rec, 1);
		if (r < 0) {
			fail_line(&l, "disk: read of record ", i, r);
			sys_exit(1, "disk: read failed");
		}
		rec_fill(want, i, records);
		for (int k = 0; k < REC_SIZE; k++) {
			if (rec[k] != want[k]) {
				l_str(&l, "disk: record ");
				l_dec(&l, i);
				l_str(&l, " differs on re-read at byte ");
				l_dec(&l, (uint64_t)k);
				l_end(&l);
				sys_exit(1, "disk: a record differs on re-read");
			}
		}
	}
	l_str(&l, "disk verified ");
	l_dec(&l, records);
	l_str(&l, " records");
	l_end(&l);
	return 0;
}

/* netecho: mode echo answers every NE_REQUEST frame to its sender and
 * ends after an NE_END frame (or `frames` requests, if not 0); mode send
 * broadcasts `frames` NE_SEND frames of `size` data bytes. A line per
 * `every` frames. */
static uint8_t fin[NET_MAX_FRAME] __attribute__((aligned(64)));
static uint8_t fout[NET_MAX_FRAME] __attribute__((aligned(64)));

static void l_mac(struct line *l, const uint8_t *m)
{
	for (int i = 0; i < 6; i++) {
		if (i)
			l_chr(l, ':');
		l_chr(l, "0123456789abcdef"[m[i] >> 4]);
		l_chr(l, "0123456789abcdef"[m[i] & 15]);
	}
}

/* Seals the payload at fout+14 (16 + n bytes) with its checksum; returns
 * the frame's length. */
static size_t seal(size_t n)
{
	uint8_t *p = fout + 14;

	put64(p + NE_HDR + n, fnv1a(FNV_BASIS, p, NE_HDR + n));
	return 14 + NE_HDR + n + 8;
}

static void send_frame(size_t len)
{
	long r = sys_net_send(fout, len);

	if (r != (long)len)
		sys_exit(1, "netecho: transmit failed");
}

long w_netecho(uint64_t mode_size, uint64_t frames, uint64_t every)
{
	struct line l;
	uint8_t mac[6];
	uint64_t size = mode_size >> 8, gseq = 0, count = 0, bad = 0, other = 0;
	int send = (mode_size & 0xff) != 0;

	l.n = 0;
	if (sys_net_mac(mac) < 0)
		sys_exit(1, "netecho: no virtio-net device");
	l_str(&l, send ? "netecho: ready mode=send mac=" : "netecho: ready mode=echo mac=");
	l_mac(&l, mac);
	l_end(&l);
	for (int i = 0; i < 6; i++) {
		fout[i] = 0xff;		/* send mode: broadcast */
		fout[6 + i] = mac[i];
	}
	put16(fout + 12, 0);
	fout[12] = NE_ETHERTYPE >> 8;	/* EtherType: big-endian on the wire */
	fout[13] = NE_ETHERTYPE & 0xff;

	if (send) {
		uint8_t *p = fout + 14;

		for (uint64_t i = 1; i <= frames; i++) {
			for (int k = 0; k < NE_HDR; k++)
				p[k] = 0;
			p[0] = NE_SEND;
			put32(p + 8, (uint32_t)++gseq);
			put16(p + 12, (uint16_t)size);
			for (uint64_t k = 0; k < size; k++)
				p[NE_HDR + k] = (uint8_t)(i * 7 + k * 13);
			send_frame(seal(size));
			if (i % every == 0 || i == frames) {
				l_str(&l, "netsend ");
				l_dec(&l, i);
				l_end(&l);
			}
		}
		l_str(&l, "netecho: done sent=");
		l_dec(&l, frames);
		l_end(&l);
		return 0;
	}

	for (;;) {
		long len = sys_net_recv(fin, sizeof(fin));
		const uint8_t *p = fin + 14;
		uint64_t n, plen;
		int kind;

		if (len < 0)
			sys_exit(1, "netecho: receive failed");
		if (len < 14 || fin[12] != (NE_ETHERTYPE >> 8) || fin[13] != (NE_ETHERTYPE & 0xff)) {
			other++;	/* not ours (the host's own traffic) */
			continue;
		}
		plen = (uint64_t)len - 14;
		kind = p[0];
		if (kind != NE_REQUEST && kind != NE_END) {
			other++;
			continue;
		}
		n = plen >= NE_HDR ? get16(p + 12) : 0;
		if (plen < NE_HDR + 8 || n > NE_MAXDATA || NE_HDR + n + 8 > plen ||
		    get64(p + NE_HDR + n) != fnv1a(FNV_BASIS, p, NE_HDR + n)) {
			bad++;
			l_str(&l, "netecho: bad frame of ");
			l_dec(&l, (uint64_t)len);
			l_str(&l, " bytes");
			l_end(&l);
			continue;
		}
		for (int i = 0; i < 6; i++)
			fout[i] = fin[6 + i];	/* back to its sender */
		for (uint64_t k = 0; k < NE_HDR + n; k++)
			fout[14 + k] = p[k];
		fout[14] = kind == NE_END ? NE_END : NE_ECHO;
		put32(fout + 14 + 8, (uint32_t)++gseq);
		send_frame(seal(n));
		if (kind == NE_END)
			break;
		count++;
		if (count % every == 0) {
			l_str(&l, "netecho ");
			l_dec(&l, count);
			l_end(&l);
		}
		if (frames && count == frames)
			break;
	}
	l_str(&l, "netecho: done echoed=");
	l_dec(&l, count);
	l_str(&l, " bad=");
	l_dec(&l, bad);
	l_str(&l, " other=");
	l_dec(&l, other);
	l_end(&l);
	if (bad)
		sys_exit(1, "netecho: bad frames received");
	return 0;
}
