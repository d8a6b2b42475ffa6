/* hostloop MIB: hashes MIB MiB with the test guest's compute loop on the
 * host and prints "host mib=N sum=HEX ns=ELAPSED". */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

void host_hash(uint64_t mib, uint64_t *x, uint64_t *h);

int main(int argc, char **argv)
{
	uint64_t mib = argc > 1 ? strtoull(argv[1], NULL, 10) : 16;
	uint64_t x = 0x9E3779B97F4A7C15ull, h = 0xcbf29ce484222325ull;
	struct timespec a, b;

	clock_gettime(CLOCK_MONOTONIC, &a);
	host_hash(mib, &x, &h);
	clock_gettime(CLOCK_MONOTONIC, &b);
	printf("host mib=%llu sum=%016llx ns=%lld\n", (unsigned long long)mib, (unsigned long long)h,
	       (long long)(b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec));
	return 0;
}
