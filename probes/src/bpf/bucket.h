/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* The log-linear latency bucket both eBPF objects count into (enlight.bpf.c for the USDT sites,
 * kernel.bpf.c for the block tracepoints), so their histograms read alike. Mirrored, and tested
 * bucket by bucket, by probes/src/hist.rs: exact below 256 ns, then 128 sub-buckets per power
 * of two; the last bucket holds anything longer. */
#ifndef ENLIGHT_BUCKET_H
#define ENLIGHT_BUCKET_H

#include "enlight.h"

static __always_inline __u32 bucket_of(__u64 v)
{
	__u32 msb = 0, k;
	__u64 x = v, idx;

	if (v < 2 * ENLIGHT_SUB_BUCKETS)
		return (__u32)v;
	if (x >> 32) { msb += 32; x >>= 32; }
	if (x >> 16) { msb += 16; x >>= 16; }
	if (x >> 8) { msb += 8; x >>= 8; }
	if (x >> 4) { msb += 4; x >>= 4; }
	if (x >> 2) { msb += 2; x >>= 2; }
	if (x >> 1) { msb += 1; }
	k = msb - 7;
	idx = 2 * ENLIGHT_SUB_BUCKETS + (__u64)(k - 1) * ENLIGHT_SUB_BUCKETS + ((v >> k) - ENLIGHT_SUB_BUCKETS);
	return idx >= ENLIGHT_BUCKETS ? ENLIGHT_BUCKETS - 1 : (__u32)idx;
}

#endif
