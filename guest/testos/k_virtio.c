/*
 * testos virtio drivers: the virtio-mmio transport (virtio 1.2 §4.2, modern
 * register layout, version 2), split virtqueues (§2.7), a virtio-blk driver
 * (§5.2) and a virtio-net driver (§5.1). Only modern devices are driven:
 * VIRTIO_F_VERSION_1 must be offered and is always accepted (§6.1).
 *
 * Discovery: ftkvm puts virtio-mmio windows at 0xd0000000 + n * 0x1000,
 * n = 0..4, on 8259 lines 5, 10, 11, 14, 15 (docs/DEVICES.md, "Layout";
 * vmm/virtio.go), in consecutive windows from 0. The driver reads each
 * window's MagicValue, Version and DeviceID and stops at the first window
 * without the magic value (a window with no device behind it reads all
 * ones). It drives the first block device and the first network device.
 *
 * Completion: the driver waits for used buffers with interrupts (§4.2.3.4):
 * a task whose request is not yet in the used ring blocks (T_BLOCK_IO); the
 * device's interrupt handler acknowledges InterruptStatus and wakes it; it
 * then looks at the used ring again. One request per device is in flight at
 * a time (a second task waits), so descriptors are allocated statically.
 *
 * Data buffers are the caller's own memory (identity mapped, physical =
 * virtual) in the user region: writes and transmitted frames are not copied.
 * Received frames are copied out of kernel receive buffers. Ring-0 code is
 * emulated on the project's KVM (k_main.c), so paths stay short.
 */
#include "k.h"

#define VIRTIO_MMIO_BASE   0xd0000000ull
#define VIRTIO_MMIO_WINDOW 0x1000ull
#define VIRTIO_SLOTS       5

/* MMIO registers (§4.2.2, version 2 layout). */
#define R_MAGIC         0x000
#define R_VERSION       0x004
#define R_DEVICE_ID     0x008
#define R_DEV_FEAT      0x010
#define R_DEV_FEAT_SEL  0x014
#define R_DRV_FEAT      0x020
#define R_DRV_FEAT_SEL  0x024
#define R_QUEUE_SEL     0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM     0x038
#define R_QUEUE_READY   0x044
#define R_QUEUE_NOTIFY  0x050
#define R_INT_STATUS    0x060
#define R_INT_ACK       0x064
#define R_STATUS        0x070
#define R_DESC_LO       0x080
#define R_DESC_HI       0x084
#define R_DRIVER_LO     0x090
#define R_DRIVER_HI     0x094
#define R_DEVICE_LO     0x0a0
#define R_DEVICE_HI     0x0a4
#define R_CONFIG_GEN    0x0fc
#define R_CONFIG        0x100

#define MMIO_MAGIC 0x74726976u	/* "virt" */

/* Device status (§2.1). */
#define S_ACKNOWLEDGE 1
#define S_DRIVER      2
#define S_DRIVER_OK   4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40
#define S_FAILED      0x80

/* Feature bits. */
#define F_VERSION_1      32	/* §6 */
#define BLK_F_RO         5	/* §5.2.3 */
#define BLK_F_FLUSH      9
#define NET_F_MAC        5	/* §5.1.3 */

#define ID_NET   1		/* §5 */
#define ID_BLOCK 2

/* virtio-blk requests (§5.2.6). */
#define BLK_T_IN    0
#define BLK_T_OUT   1
#define BLK_T_FLUSH 4
#define BLK_S_OK     0
#define BLK_S_IOERR  1
#define BLK_S_UNSUPP 2

/* Split virtqueue (§2.7.5, §2.7.6, §2.7.8). */
#define DESC_F_NEXT  1
#define DESC_F_WRITE 2
#define USED_F_NO_NOTIFY 1
#define QSIZE 16		/* a power of two (§2.7) */

struct vq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct vq_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[QSIZE];
	uint16_t used_event;
};

struct vq_used_elem {
	uint32_t id;
	uint32_t len;
};

struct vq_used {
	uint16_t flags;
	uint16_t idx;
	struct vq_used_elem ring[QSIZE];
	uint16_t avail_event;
};

/* One queue's rings: descriptors 16-byte aligned, the available ring
 * 2-byte and the used ring 4-byte aligned (§2.7, "Alignment"). */
struct vq_mem {
	struct vq_desc desc[QSIZE];
	struct vq_avail avail;
	struct vq_used used __attribute__((aligned(4)));
} __attribute__((aligned(16)));

struct vq {
	struct vq_mem *m;
	uint16_t index;		/* queue index on its device */
	uint16_t size;		/* QueueNum: a power of two <= QSIZE */
	uint16_t avail_idx;	/* next available ring index to fill */
	uint16_t last_used;	/* next used ring index to read */
};

struct vdev {
	uint64_t base;
	int irq;		/* 8259 line; 0: no device */
	volatile int broken;	/* DEVICE_NEEDS_RESET seen, or a bad used entry */
	int busy;		/* a request is in flight */
	uint64_t features;	/* negotiated */
};

/* virtio_net_hdr with VIRTIO_F_VERSION_1 (§5.1.6): 12 bytes. */
#define NET_HDR 12
#define RXBUF 2048		/* >= 12 + NET_MAX_FRAME (§5.1.6.3.1) */

struct blk_req_hdr {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

static const uint8_t slot_irq[VIRTIO_SLOTS] = {5, 10, 11, 14, 15};

static struct vdev blk, net;
static struct vq blk_q, rx_q, tx_q;
static struct vq_mem blk_mem __attribute__((aligned(4096)));
static struct vq_mem rx_mem __attribute__((aligned(4096)));
static struct vq_mem tx_mem __attribute__((aligned(4096)));
static struct blk_req_hdr blk_hdr __attribute__((aligned(16)));
static volatile uint8_t blk_status;
static uint64_t blk_capacity;
static uint8_t net_hdr_tx[NET_HDR] __attribute__((aligned(16)));
static uint8_t rx_buf[QSIZE][RXBUF] __attribute__((aligned(4096)));
static uint8_t mac[6];

static inline void barrier(void)
{
	/* x86 keeps stores in order and the device sees guest memory at
	 * the notify's exit: a compiler barrier orders the ring writes
	 * (§2.7.13.3.1, §2.7.13.4.1). */
	__asm__ volatile("" : : : "memory");
}

static inline uint32_t rd(const struct vdev *d, uint32_t off)
{
	return *(volatile uint32_t *)(d->base + off);
}

static inline void wr(const struct vdev *d, uint32_t off, uint32_t v)
{
	*(volatile uint32_t *)(d->base + off) = v;
}

static inline uint8_t rd8(const struct vdev *d, uint32_t off)
{
	return *(volatile uint8_t *)(d->base + off);
}

static void set_status(struct vdev *d, uint32_t bits)
{
	wr(d, R_STATUS, rd(d, R_STATUS) | bits);
}

/* Device initialization, §3.1.1 steps 1-6: reset, ACKNOWLEDGE, DRIVER, the
 * feature negotiation, FEATURES_OK read back. want are the features the
 * driver can use; need those it cannot work without (VERSION_1 always).
 * Returns 0, or -1 after setting FAILED. */
static int negotiate(struct vdev *d, uint64_t want, uint64_t need)
{
	uint64_t offered;
	int i;

	wr(d, R_STATUS, 0);
	/* §2.4.2: wait until the reset is done (status reads 0); bounded. */
	for (i = 0; i < 1000 && rd(d, R_STATUS) != 0; i++)
		;
	set_status(d, S_ACKNOWLEDGE);
	set_status(d, S_DRIVER);
	wr(d, R_DEV_FEAT_SEL, 0);
	offered = rd(d, R_DEV_FEAT);
	wr(d, R_DEV_FEAT_SEL, 1);
	offered |= (uint64_t)rd(d, R_DEV_FEAT) << 32;
	need |= 1ull << F_VERSION_1;
	if ((offered & need) != need)
		goto failed;
	d->features = offered & (want | need);
	wr(d, R_DRV_FEAT_SEL, 0);
	wr(d, R_DRV_FEAT, (uint32_t)d->features);
	wr(d, R_DRV_FEAT_SEL, 1);
	wr(d, R_DRV_FEAT, (uint32_t)(d->features >> 32));
	set_status(d, S_FEATURES_OK);
	if (!(rd(d, R_STATUS) & S_FEATURES_OK))
		goto failed;	/* §3.1.1 step 6: the device refused them */
	return 0;
failed:
	set_status(d, S_FAILED);
	return -1;
}

/* Queue setup, §4.2.3.2: select, check it is not in use, size from
 * QueueNumMax (0: no such queue), zeroed rings, their addresses, ready. */
static int queue_setup(struct vdev *d, struct vq *q, struct vq_mem *m, uint16_t index)
{
	uint32_t max;
	uint16_t size = QSIZE;
	uint8_t *p = (uint8_t *)m;

	wr(d, R_QUEUE_SEL, index);
	if (rd(d, R_QUEUE_READY) != 0)
		return -1;
	max = rd(d, R_QUEUE_NUM_MAX);
	if (max == 0)
		return -1;
	while (size > max)
		size >>= 1;
	for (uint32_t i = 0; i < sizeof(*m); i++)
		p[i] = 0;
	q->m = m;
	q->index = index;
	q->size = size;
	q->avail_idx = 0;
	q->last_used = 0;
	wr(d, R_QUEUE_NUM, size);
	wr(d, R_DESC_LO, (uint32_t)(uint64_t)m->desc);
	wr(d, R_DESC_HI, (uint32_t)((uint64_t)m->desc >> 32));
	wr(d, R_DRIVER_LO, (uint32_t)(uint64_t)&m->avail);
	wr(d, R_DRIVER_HI, (uint32_t)((uint64_t)&m->avail >> 32));
	wr(d, R_DEVICE_LO, (uint32_t)(uint64_t)&m->used);
	wr(d, R_DEVICE_HI, (uint32_t)((uint64_t)&m->used >> 32));
	wr(d, R_QUEUE_READY, 1);
	return 0;
}

/* Makes chain head available (§2.7.13) and notifies the device unless it
 * asked not to be (§2.7.10, VIRTQ_USED_F_NO_NOTIFY). */
static void submit(const struct vdev *d, struct vq *q, uint16_t head)
{
	q->m->avail.ring[q->avail_idx & (q->size - 1)] = head;
	barrier();
	q->avail_idx++;
	q->m->avail.idx = q->avail_idx;
	barrier();
	if (!(*(volatile uint16_t *)&q->m->used.flags & USED_F_NO_NOTIFY))
		wr(d, R_QUEUE_NOTIFY, q->index);
}

static int used_ready(const struct vq *q)
{
	return *(volatile uint16_t *)&q->m->used.idx != q->last_used;
}

/* Waits until the device returned a used buffer on q or failed; returns
 * the used element, or 0 when the device is broken. */
static struct vq_used_elem *wait_used(struct vdev *d, struct vq *q)
{
	struct vq_used_elem *e;

	while (!used_ready(q)) {
		if (d->broken)
			return 0;
		block_io();
	}
	barrier();
	e = &q->m->used.ring[q->last_used & (q->size - 1)];
	q->last_used++;
	return e;
}

/* Waits until no other task has a request in flight on d. */
static void acquire(struct vdev *d)
{
	while (d->busy)
		block_io();
	d->busy = 1;
}

static void release(struct vdev *d)
{
	d->busy = 0;
	wake_io();
}

/* ---- virtio-blk (§5.2) ---- */

static uint64_t cfg64(const struct vdev *d, uint32_t off)
{
	uint32_t gen, lo, hi;

	/* §4.2.2.1 (and §2.5.1): read until ConfigGeneration is stable. */
	do {
		gen = rd(d, R_CONFIG_GEN);
		lo = rd(d, R_CONFIG + off);
		hi = rd(d, R_CONFIG + off + 4);
	} while (rd(d, R_CONFIG_GEN) != gen);
	return (uint64_t)hi << 32 | lo;
}

static int blk_setup(struct vdev *d)
{
	/* FLUSH is needed: the workloads promise durability after a
	 * flush (§5.2.6.2: no flush requests without it). RO is accepted
	 * so that a read-only disk can be read. */
	if (negotiate(d, 1ull << BLK_F_RO, 1ull << BLK_F_FLUSH) < 0)
		return -1;
	blk_capacity = cfg64(d, 0);	/* capacity, in 512-byte sectors */
	if (queue_setup(d, &blk_q, &blk_mem, 0) < 0) {
		set_status(d, S_FAILED);
		return -1;
	}
	set_status(d, S_DRIVER_OK);
	return 0;
}

long blk_info(void)
{
	if (!blk.irq)
		return VERR_NODEV;
	return (long)blk_capacity;
}

/* One request: header (device-readable), data (readable for a write,
 * writable for a read; none for a flush), status byte (writable). */
static long blk_request(uint32_t type, uint64_t sector, uint64_t buf, uint32_t len)
{
	struct vq_desc *dt = blk_q.m->desc;
	struct vq_used_elem *e;
	long ret;
	int n = 0;

	acquire(&blk);
	if (blk.broken) {
		release(&blk);
		return VERR_DEVICE;
	}
	blk_hdr.type = type;
	blk_hdr.reserved = 0;
	blk_hdr.sector = sector;
	blk_status = 0xff;	/* no valid status: the device must write it */
	dt[0].addr = (uint64_t)&blk_hdr;
	dt[0].len = sizeof(blk_hdr);
	dt[0].flags = DESC_F_NEXT;
	dt[0].next = 1;
	n = 1;
	if (len) {
		dt[1].addr = buf;
		dt[1].len = len;
		dt[1].flags = DESC_F_NEXT | (type == BLK_T_IN ? DESC_F_WRITE : 0);
		dt[1].next = 2;
		n = 2;
	}
	dt[n].addr = (uint64_t)&blk_status;
	dt[n].len = 1;
	dt[n].flags = DESC_F_WRITE;
	dt[n].next = 0;
	submit(&blk, &blk_q, 0);
	e = wait_used(&blk, &blk_q);
	if (!e || e->id != 0 || e->len < 1 ||
	    (type == BLK_T_IN && e->len != len + 1)) {
		/* A used entry for a chain we did not submit, or a read
		 * that did not fill the buffer: the device is unusable. */
		blk.broken = 1;
		ret = VERR_DEVICE;
	} else {
		switch (blk_status) {
		case BLK_S_OK:
			ret = 0;
			break;
		case BLK_S_IOERR:
			ret = VERR_IOERR;
			break;
		case BLK_S_UNSUPP:
			ret = VERR_UNSUPP;
			break;
		default:
			ret = VERR_DEVICE;
		}
	}
	release(&blk);
	return ret;
}

long blk_rw(uint64_t sector, uint64_t buf, uint64_t n, int write)
{
	if (!blk.irq)
		return VERR_NODEV;
	/* §5.2.6.1: no request beyond the capacity. */
	if (n == 0 || n > BLK_MAX_SECTORS || !user_ok(buf, n * BLK_SECTOR) ||
	    sector > blk_capacity || n > blk_capacity - sector)
		return VERR_ARG;
	/* A driver that accepted VIRTIO_BLK_F_RO does not write (§5.2.6.1). */
	if (write && (blk.features & (1ull << BLK_F_RO)))
		return VERR_RO;
	return blk_request(write ? BLK_T_OUT : BLK_T_IN, sector, buf, (uint32_t)(n * BLK_SECTOR));
}

long blk_flush(void)
{
	if (!blk.irq)
		return VERR_NODEV;
	return blk_request(BLK_T_FLUSH, 0, 0, 0);	/* sector 0 (§5.2.6.1) */
}

/* ---- virtio-net (§5.1) ---- */

static void rx_post(uint16_t i)
{
	struct vq_desc *d = &rx_q.m->desc[i];

	d->addr = (uint64_t)rx_buf[i];
	d->len = RXBUF;
	d->flags = DESC_F_WRITE;
	d->next = 0;
	submit(&net, &rx_q, i);
}

static int net_setup(struct vdev *d)
{
	uint16_t i;

	if (negotiate(d, 1ull << NET_F_MAC, 0) < 0)
		return -1;
	if (queue_setup(d, &rx_q, &rx_mem, 0) < 0 ||	/* receiveq1 */
	    queue_setup(d, &tx_q, &tx_mem, 1) < 0) {	/* transmitq1 */
		set_status(d, S_FAILED);
		return -1;
	}
	if (d->features & (1ull << NET_F_MAC)) {
		for (i = 0; i < 6; i++)
			mac[i] = rd8(d, R_CONFIG + i);
	} else {
		/* No MAC offered: a locally administered one (§5.1.5). */
		mac[0] = 0x02;
		mac[5] = 0x01;
	}
	/* §5.1.5: fill the receive queue; the device is told once it is
	 * live (a notify before DRIVER_OK is not a notification). */
	for (i = 0; i < rx_q.size; i++) {
		struct vq_desc *dd = &rx_q.m->desc[i];

		dd->addr = (uint64_t)rx_buf[i];
		dd->len = RXBUF;
		dd->flags = DESC_F_WRITE;
		rx_q.m->avail.ring[i] = i;
	}
	barrier();
	rx_q.avail_idx = rx_q.size;
	rx_q.m->avail.idx = rx_q.avail_idx;
	barrier();
	set_status(d, S_DRIVER_OK);
	wr(d, R_QUEUE_NOTIFY, rx_q.index);
	return 0;
}

long net_mac(uint64_t buf)
{
	uint8_t *b = (uint8_t *)buf;

	if (!net.irq)
		return VERR_NODEV;
	if (!user_ok(buf, 6))
		return VERR_ARG;
	for (int i = 0; i < 6; i++)
		b[i] = mac[i];
	return 0;
}

/* Transmit (§5.1.6.2): the header (all zero: no offloads, num_buffers 0)
 * and the caller's frame, then wait until the device used the chain. */
long net_send(uint64_t buf, uint64_t len)
{
	struct vq_desc *dt;
	struct vq_used_elem *e;
	long ret = (long)len;

	if (!net.irq)
		return VERR_NODEV;
	if (len < 14 || len > NET_MAX_FRAME || !user_ok(buf, len))
		return VERR_ARG;
	acquire(&net);
	dt = tx_q.m->desc;
	dt[0].addr = (uint64_t)net_hdr_tx;
	dt[0].len = NET_HDR;
	dt[0].flags = DESC_F_NEXT;
	dt[0].next = 1;
	dt[1].addr = buf;
	dt[1].len = (uint32_t)len;
	dt[1].flags = 0;
	dt[1].next = 0;
	submit(&net, &tx_q, 0);
	e = wait_used(&net, &tx_q);
	if (!e || e->id != 0) {
		net.broken = 1;
		ret = VERR_DEVICE;
	}
	release(&net);
	return ret;
}

/* Copies n bytes, eight at a time where it can (ring-0 instructions are
 * emulated: a byte loop would cost eight times as many). */
static void copy_out(uint8_t *d, const uint8_t *s, uint64_t n)
{
	uint64_t i = 0;

	if ((((uint64_t)d | (uint64_t)s) & 7) == 0)
		for (; i + 8 <= n; i += 8)
			*(uint64_t *)(d + i) = *(const uint64_t *)(s + i);
	for (; i < n; i++)
		d[i] = s[i];
}

/* Receive (§5.1.6.4): blocks until a frame is in the used ring, copies it
 * (without the header) to buf, gives the buffer back to the device. A
 * frame longer than len is cut to len; the frame's length is returned. */
long net_recv(uint64_t buf, uint64_t len)
{
	struct vq_used_elem *e;
	uint64_t flen;
	uint32_t id;

	if (!net.irq)
		return VERR_NODEV;
	if (!user_ok(buf, len))
		return VERR_ARG;
	e = wait_used(&net, &rx_q);
	if (!e)
		return VERR_DEVICE;
	id = e->id;
	if (id >= rx_q.size || e->len < NET_HDR || e->len > RXBUF) {
		net.broken = 1;
		return VERR_DEVICE;
	}
	flen = e->len - NET_HDR;
	copy_out((uint8_t *)buf, rx_buf[id] + NET_HDR, flen < len ? flen : len);
	rx_post((uint16_t)id);
	return (long)flen;
}

/* ---- discovery and interrupts ---- */

static void ack(struct vdev *d);

/* Finds the devices and sets up the first block device (want_blk) and the
 * first network device (want_net). Returns how many were set up. */
int virtio_init(int want_blk, int want_net)
{
	int found = 0;

	for (int n = 0; n < VIRTIO_SLOTS; n++) {
		struct vdev probe = {VIRTIO_MMIO_BASE + (uint64_t)n * VIRTIO_MMIO_WINDOW, slot_irq[n], 0, 0, 0};
		uint32_t id;

		if (rd(&probe, R_MAGIC) != MMIO_MAGIC)
			break;
		if (rd(&probe, R_VERSION) != 2)
			continue;	/* legacy devices are not driven */
		id = rd(&probe, R_DEVICE_ID);
		if (id == ID_BLOCK && want_blk && !blk.irq) {
			blk = probe;
			if (blk_setup(&blk) == 0) {
				pic_unmask(blk.irq);
				ack(&blk);	/* a cause raised before the line was open */
				found++;
			} else {
				blk.irq = 0;
			}
		} else if (id == ID_NET && want_net && !net.irq) {
			net = probe;
			if (net_setup(&net) == 0) {
				pic_unmask(net.irq);
				ack(&net);	/* a cause raised before the line was open */
				found++;
			} else {
				net.irq = 0;
			}
		}
	}
	return found;
}

/* Acknowledges d's interrupt causes (§4.2.3.4): every bit read, until
 * none is left, so the line drops and the next cause makes a new edge
 * for the edge-triggered 8259. A configuration change with
 * DEVICE_NEEDS_RESET set marks the device broken (§2.1.2). */
static void ack(struct vdev *d)
{
	for (int i = 0; i < 4; i++) {
		uint32_t s = rd(d, R_INT_STATUS);

		if (!s)
			break;
		wr(d, R_INT_ACK, s);
		if ((s & 2) && (rd(d, R_STATUS) & S_NEEDS_RESET))
			d->broken = 1;
	}
}

/* The interrupt handler for 8259 line irq: returns 1 if a virtio device
 * owns it. Waiting tasks look at their used rings again. */
int virtio_irq(int irq)
{
	int mine = 0;

	if (blk.irq && blk.irq == irq) {
		ack(&blk);
		mine = 1;
	}
	if (net.irq && net.irq == irq) {
		ack(&net);
		mine = 1;
	}
	if (mine)
		wake_io();
	return mine;
}
