/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/*
 * Types shared between the eBPF programs (enlight.bpf.c) and Rust, where they are defined once
 * in the enlight-abi crate (abi/src/record.rs: the device processes write the completions and
 * signal counts, the loader the USDT specs, the daemon reads the maps). Every struct has a size
 * assertion here and the same assertion in Rust; a Rust test (enlight-probes'
 * shared_types_match_the_objects_btf) also checks each one against the BTF of the built object.
 * Fixed-width fields only, explicit padding, no bools.
 */
#ifndef ENLIGHT_H
#define ENLIGHT_H

#ifndef __VMLINUX_TYPES
typedef unsigned char __u8;
typedef signed char __s8;
typedef unsigned short __u16;
typedef short __s16;
typedef unsigned int __u32;
typedef int __s32;
typedef unsigned long long __u64;
typedef long long __s64;
#endif

/* Most completions one io_reap hit carries (enlight_abi::record::MAX_BATCH). */
#define ENLIGHT_MAX_BATCH 256
/* Log-linear latency buckets: exact below 256 ns, then 128 per power of two. */
#define ENLIGHT_SUB_BUCKETS 128
#define ENLIGHT_BUCKETS 3584 /* the last one starts at 2^34 ns (about 17 s) and holds anything longer */
/* USDT argument specs: at most this many args per site, this many sites. */
#define ENLIGHT_USDT_MAX_ARGS 12
#define ENLIGHT_USDT_MAX_SPECS 1024

/* What the driver passes to io_reap, one per completion. */
struct enlight_completion {
	__u64 latency_ns;
	__u32 bytes;
	__u16 op;
	__u16 status;
};

/* Key of the per-op counters: one process, one device in it, one op. */
struct enlight_io_key {
	__u32 tgid;
	__u32 dev;
	__u32 op;
	__u32 pad;
};

struct enlight_io_stats {
	__u64 ops;
	__u64 bytes;
	__u64 errors;
	__u64 latency_sum_ns;
};

/* Value of the per-op map: the counters and every latency bucket, so a completion costs one
 * map lookup. 28.7 KB, under the 32 KB limit of a per-CPU value. */
struct enlight_io_hist {
	struct enlight_io_stats stats;
	__u64 buckets[ENLIGHT_BUCKETS];
};

/* What io_reap's fourth argument points at: a device's signalling events since its previous
 * io_reap hit (the driver counts them instead of firing a trap each). The same fields, in the
 * same order, as the first six of struct enlight_dev_events, which sums them. Its Rust side is
 * enlight_abi::record::SignalDeltas, which the driver writes (only a local here, so not in the
 * object's BTF: a probes test checks it against enlight_dev_events instead). */
struct enlight_signal_counts {
	__u64 doorbells;
	__u64 interrupts;
	__u64 ring_full_out;
	__u64 ring_full_in;
	__u64 irq_masked;
	__u64 irq_unmasked;
};

struct enlight_dev_key {
	__u32 tgid;
	__u32 dev;
};

/* Per (process, device): the signalling events io_reap carried, summed, and workload_start hits. */
struct enlight_dev_events {
	__u64 doorbells;      /* guest -> host signals */
	__u64 interrupts;     /* host -> guest signals */
	__u64 ring_full_out;  /* writes that found the outbound ring full */
	__u64 ring_full_in;   /* writes that found the inbound ring full */
	__u64 irq_masked;     /* the guest set interrupt_mask */
	__u64 irq_unmasked;   /* the guest cleared interrupt_mask */
	__u64 workload_starts;
};

/* Key of the settings-change counters: one process, one device in it, one knob (the knob codes
 * of the settings_change probe: 0 ring_out_bytes, 1 ring_in_bytes, 2 moderation_frames,
 * 3 moderation_usecs, 4 poll_budget). */
struct enlight_knob_key {
	__u32 tgid;
	__u32 dev;
	__u32 knob;
	__u32 pad;
};

/* Indices of the health counters (a per-CPU array of __u64). */
enum enlight_health {
	ENLIGHT_HEALTH_MAP_FULL = 0,        /* a map update failed: events lost */
	ENLIGHT_HEALTH_BATCH_TRUNCATED = 1, /* io_reap count above ENLIGHT_MAX_BATCH */
	ENLIGHT_HEALTH_READ_FAILED = 2,     /* reading user memory or an argument failed */
	ENLIGHT_HEALTH_NO_SPEC = 3,         /* a hit with no argument spec for its cookie */
	ENLIGHT_HEALTH_COUNT = 4,
};

/* Where a USDT argument lives; the same layout as libbpf's usdt.bpf.h. */
enum enlight_usdt_arg_type {
	ENLIGHT_USDT_ARG_CONST = 0,    /* val_off is the value */
	ENLIGHT_USDT_ARG_REG = 1,      /* the register at reg_off in pt_regs */
	ENLIGHT_USDT_ARG_REG_DEREF = 2 /* user memory at register + val_off */
};

struct enlight_usdt_arg {
	__u64 val_off;
	__u32 arg_type;
	__s16 reg_off;
	__u8 arg_signed;
	__s8 arg_bitshift; /* 64 - 8 * size: bits to clear (or sign-extend) */
};

struct enlight_usdt_spec {
	struct enlight_usdt_arg args[ENLIGHT_USDT_MAX_ARGS];
	__u32 arg_cnt;
	__u32 pad;
};

_Static_assert(sizeof(struct enlight_completion) == 16, "enlight_completion");
_Static_assert(sizeof(struct enlight_io_key) == 16, "enlight_io_key");
_Static_assert(sizeof(struct enlight_io_stats) == 32, "enlight_io_stats");
_Static_assert(sizeof(struct enlight_io_hist) == 32 + 8 * ENLIGHT_BUCKETS, "enlight_io_hist");
_Static_assert(sizeof(struct enlight_signal_counts) == 48, "enlight_signal_counts");
_Static_assert(sizeof(struct enlight_dev_key) == 8, "enlight_dev_key");
_Static_assert(sizeof(struct enlight_dev_events) == 56, "enlight_dev_events");
_Static_assert(sizeof(struct enlight_knob_key) == 16, "enlight_knob_key");
_Static_assert(sizeof(struct enlight_usdt_arg) == 16, "enlight_usdt_arg");
_Static_assert(sizeof(struct enlight_usdt_spec) == 200, "enlight_usdt_spec");

#endif
