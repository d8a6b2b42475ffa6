/* Ring-3 task entry points (u_work.c). The kernel starts a task at one of
 * these with three arguments; returning calls exit(return value). */
#ifndef TESTOS_WORKLOADS_H
#define TESTOS_WORKLOADS_H

#include <stdint.h>

typedef long (*task_fn)(uint64_t a0, uint64_t a1, uint64_t a2);

long w_counter(uint64_t lines, uint64_t wait, uint64_t unused);
long w_interleave(uint64_t name, uint64_t lines, uint64_t work);
long w_compute(uint64_t mib, uint64_t every, uint64_t unused);
long w_compute_ticker(uint64_t hz, uint64_t unused1, uint64_t unused2);
long w_clock(uint64_t samples, uint64_t wait, uint64_t divisor);
long w_echo(uint64_t unused0, uint64_t unused1, uint64_t unused2);
long w_fault(uint64_t unused0, uint64_t unused1, uint64_t unused2);
long w_tsc(uint64_t samples, uint64_t work, uint64_t unused);
long w_rdrand(uint64_t unused0, uint64_t unused1, uint64_t unused2);
long w_disk(uint64_t records, uint64_t start, uint64_t random);
long w_netecho(uint64_t mode_size, uint64_t frames, uint64_t every);

#endif
