/* Compiled with the test guest's code-generation flags (see bench), so the
 * host runs the guest's compute loop as the same machine code. */
#include <stdint.h>
#include "../../guest/testos/hash.h"

void host_hash(uint64_t mib, uint64_t *x, uint64_t *h)
{
	for (uint64_t k = 0; k < mib; k++)
		hash_mib(x, h);
}
