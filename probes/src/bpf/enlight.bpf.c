// SPDX-License-Identifier: (MIT OR Apache-2.0)
/*
 * enlight's eBPF programs on the driver's USDT tracepoints (provider "enlight", see
 * docs/architecture.md). Everything is aggregated in the kernel: a per-CPU hash map holding, per
 * (process, device, op), the counters and every log-linear latency bucket (one lookup per
 * completion), and one of signalling counters per device, read by enlightd each interval. A hit
 * costs one uprobe trap, so io_reap carries a whole batch of completions and the device's
 * signalling events since its previous hit: the signal, irq_mask and ring_full sites are for
 * ad-hoc tools, and no program here attaches to them.
 *
 * USDT arguments are read the way libbpf's usdt.bpf.h reads them: the loader parses each site's
 * argument string into an enlight_usdt_spec (same layout as libbpf's), stores it in usdt_specs
 * under an id, and attaches the site with that id as the BPF cookie.
 *
 * Build: probes/build-bpf.sh (the object is committed; a check rebuilds and compares).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "enlight.h"
#include "bucket.h"

struct pt_regs;

char LICENSE[] SEC("license") = "Dual MIT/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, ENLIGHT_USDT_MAX_SPECS);
	__type(key, __u32);
	__type(value, struct enlight_usdt_spec);
} usdt_specs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct enlight_io_key);
	__type(value, struct enlight_io_hist);
} io_hist SEC(".maps");

/* One all-zero value, the template for new io_hist entries (too large for the BPF stack). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct enlight_io_hist);
} io_hist_zero SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct enlight_dev_key);
	__type(value, struct enlight_dev_events);
} dev_events SEC(".maps");

/* Register accesses emulated devices trapped, per (process, device): the sum of trap's counts. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct enlight_dev_key);
	__type(value, __u64);
} dev_traps SEC(".maps");

/* Settings changes applied through a device's control socket, per (process, device, knob). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct enlight_knob_key);
	__type(value, __u64);
} settings_changes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ENLIGHT_HEALTH_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} health SEC(".maps");

static __always_inline void health_inc(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&health, &which);
	if (v)
		*v += 1;
}

/* Reads USDT argument n of the site that fired, per its spec (as libbpf's bpf_usdt_arg). */
static __always_inline int usdt_arg(struct pt_regs *ctx, __u32 n, __u64 *res)
{
	__u32 id = (__u32)bpf_get_attach_cookie(ctx);
	struct enlight_usdt_spec *spec = bpf_map_lookup_elem(&usdt_specs, &id);
	struct enlight_usdt_arg *arg;
	__u64 val = 0;

	if (!spec) {
		health_inc(ENLIGHT_HEALTH_NO_SPEC);
		return -1;
	}
	if (n >= ENLIGHT_USDT_MAX_ARGS || n >= spec->arg_cnt)
		return -1;
	arg = &spec->args[n];
	switch (arg->arg_type) {
	case ENLIGHT_USDT_ARG_CONST:
		val = arg->val_off;
		break;
	case ENLIGHT_USDT_ARG_REG:
		if (bpf_probe_read_kernel(&val, sizeof(val), (void *)ctx + arg->reg_off))
			return -1;
		break;
	case ENLIGHT_USDT_ARG_REG_DEREF:
		if (bpf_probe_read_kernel(&val, sizeof(val), (void *)ctx + arg->reg_off))
			return -1;
		if (bpf_probe_read_user(&val, sizeof(val), (void *)(val + arg->val_off)))
			return -1;
		break;
	default:
		return -1;
	}
	val <<= arg->arg_bitshift;
	if (arg->arg_signed)
		val = ((__s64)val) >> arg->arg_bitshift;
	else
		val = val >> arg->arg_bitshift;
	*res = val;
	return 0;
}

static __always_inline struct enlight_io_hist *io_hist_of(struct enlight_io_key *key)
{
	__u32 zero_key = 0;
	struct enlight_io_hist *h = bpf_map_lookup_elem(&io_hist, key), *zero;

	if (h)
		return h;
	zero = bpf_map_lookup_elem(&io_hist_zero, &zero_key);
	if (!zero)
		return 0;
	/* NOEXIST: if another CPU created it meanwhile, the lookup below finds theirs. */
	bpf_map_update_elem(&io_hist, key, zero, BPF_NOEXIST);
	h = bpf_map_lookup_elem(&io_hist, key);
	if (!h)
		health_inc(ENLIGHT_HEALTH_MAP_FULL);
	return h;
}

static __always_inline struct enlight_dev_events *events_of_key(struct enlight_dev_key *key)
{
	struct enlight_dev_events zero = {}, *e;

	e = bpf_map_lookup_elem(&dev_events, key);
	if (e)
		return e;
	bpf_map_update_elem(&dev_events, key, &zero, BPF_NOEXIST);
	e = bpf_map_lookup_elem(&dev_events, key);
	if (!e)
		health_inc(ENLIGHT_HEALTH_MAP_FULL);
	return e;
}

static __always_inline struct enlight_dev_events *events_of(struct pt_regs *ctx, __u64 *dev)
{
	struct enlight_dev_key key = {};

	if (usdt_arg(ctx, 0, dev)) {
		health_inc(ENLIGHT_HEALTH_READ_FAILED);
		return 0;
	}
	key.tgid = bpf_get_current_pid_tgid() >> 32;
	key.dev = (__u32)*dev;
	return events_of_key(&key);
}

/*
 * Accounts one completion. A global (non-inlined) function, so the verifier checks it once
 * rather than once per iteration of io_reap's loop, whose branches would otherwise multiply
 * its states past the verifier's budget. Only scalars cross the call.
 */
__attribute__((noinline)) int enlight_account(__u64 tgid_dev, __u64 latency_ns, __u64 bytes_op_status)
{
	struct enlight_io_key key = {};
	struct enlight_io_hist *h;
	__u32 bucket;

	key.tgid = (__u32)(tgid_dev >> 32);
	key.dev = (__u32)tgid_dev;
	key.op = (__u32)(bytes_op_status >> 16) & 0xffff;
	h = io_hist_of(&key);
	if (!h)
		return 0;
	h->stats.ops += 1;
	h->stats.bytes += bytes_op_status >> 32;
	h->stats.latency_sum_ns += latency_ns;
	if (bytes_op_status & 0xffff)
		h->stats.errors += 1;
	bucket = bucket_of(latency_ns);
	if (bucket >= ENLIGHT_BUCKETS)
		bucket = ENLIGHT_BUCKETS - 1;
	h->buckets[bucket] += 1;
	return 0;
}

/* The bucket of a latency, as a global function: verified once, not once per loop iteration. */
__attribute__((noinline)) int enlight_bucket(__u64 latency_ns)
{
	return (int)bucket_of(latency_ns);
}

static __always_inline void account_in(struct enlight_io_hist *h, struct enlight_completion *c)
{
	/* A 64-bit index compared right before use, so the verifier sees the bound
	 * (enlight_bucket already clamps to ENLIGHT_BUCKETS - 1). */
	__u64 bucket = (__u32)enlight_bucket(c->latency_ns);

	h->stats.ops += 1;
	h->stats.bytes += c->bytes;
	h->stats.latency_sum_ns += c->latency_ns;
	if (c->status)
		h->stats.errors += 1;
	if (bucket < ENLIGHT_BUCKETS)
		h->buckets[bucket] += 1;
}

/* Completions copied from the batch per bpf_probe_read_user call (256 bytes of stack). */
#define REAP_CHUNK 16

/*
 * Adds the signalling events an io_reap hit carries (its fourth argument points at a struct
 * enlight_signal_counts; 0 when there are none, and a site of an older driver has only three
 * arguments). A global function: verified once, and its stack is its own.
 */
__attribute__((noinline)) int enlight_add_signals(__u64 tgid_dev, __u64 ptr)
{
	struct enlight_dev_key key = {};
	struct enlight_signal_counts s;
	struct enlight_dev_events *e;

	if (bpf_probe_read_user(&s, sizeof(s), (void *)ptr)) {
		health_inc(ENLIGHT_HEALTH_READ_FAILED);
		return 0;
	}
	key.tgid = (__u32)(tgid_dev >> 32);
	key.dev = (__u32)tgid_dev;
	e = events_of_key(&key);
	if (!e)
		return 0;
	e->doorbells += s.doorbells;
	e->interrupts += s.interrupts;
	e->ring_full_out += s.ring_full_out;
	e->ring_full_in += s.ring_full_in;
	e->irq_masked += s.irq_masked;
	e->irq_unmasked += s.irq_unmasked;
	return 0;
}

/*
 * enlight:io_reap(dev, batch_ptr, count, signals_ptr): one hit per batch of up to 256
 * completions, and the device's signalling events since its previous hit. Reads and
 * writes are the hot ones, so their map values are looked up at most once per hit; any other op
 * goes through enlight_account (one lookup per completion). The batch is copied REAP_CHUNK
 * completions per helper call: a bpf_probe_read_user per 16-byte completion was most of the
 * program's cost.
 */
SEC("uprobe")
int enlight_io_reap(struct pt_regs *ctx)
{
	__u64 dev, ptr, count, signals = 0, tgid_dev;
	struct enlight_completion chunk[REAP_CHUNK];
	struct enlight_io_key key = {};
	struct enlight_io_hist *reads, *writes;

	if (usdt_arg(ctx, 0, &dev) || usdt_arg(ctx, 1, &ptr) || usdt_arg(ctx, 2, &count)) {
		health_inc(ENLIGHT_HEALTH_READ_FAILED);
		return 0;
	}
	if (count > ENLIGHT_MAX_BATCH) {
		health_inc(ENLIGHT_HEALTH_BATCH_TRUNCATED);
		count = ENLIGHT_MAX_BATCH;
	}
	tgid_dev = (bpf_get_current_pid_tgid() & 0xffffffff00000000ULL) | (__u32)dev;
	/* Absent (an older driver's three-argument site) reads as none. */
	if (!usdt_arg(ctx, 3, &signals) && signals)
		enlight_add_signals(tgid_dev, signals);
	if (count == 0)
		return 0;
	key.tgid = (__u32)(tgid_dev >> 32);
	key.dev = (__u32)dev;
	/* Both looked up up front: nullable pointers carried through the loop would multiply the
	 * verifier's states. An op that never completes keeps an all-zero entry, which the reader
	 * skips. */
	key.op = 0; /* OP_READ */
	reads = io_hist_of(&key);
	key.op = 1; /* OP_WRITE */
	writes = io_hist_of(&key);
	if (!reads || !writes)
		return 0;
	/* One loop (nested loops multiplied the verifier's states past its budget): the next
	 * REAP_CHUNK completions are copied when i reaches a multiple of REAP_CHUNK. */
	for (__u32 i = 0; i < ENLIGHT_MAX_BATCH; i++) {
		__u32 j = i & (REAP_CHUNK - 1);
		struct enlight_completion *c;

		if (i >= count)
			break;
		if (j == 0) {
			/* Bounded on the value passed, so the verifier sees 0 <= size <= 256. */
			__u64 size = (count - i) * sizeof(chunk[0]);

			if (size > sizeof(chunk))
				size = sizeof(chunk);
			if (bpf_probe_read_user(chunk, size,
						(void *)(ptr + (__u64)i * sizeof(chunk[0])))) {
				health_inc(ENLIGHT_HEALTH_READ_FAILED);
				break;
			}
		}
		c = &chunk[j];
		if (c->op == 0)
			account_in(reads, c);
		else if (c->op == 1)
			account_in(writes, c);
		else
			enlight_account(tgid_dev, c->latency_ns,
					((__u64)c->bytes << 32) | ((__u64)c->op << 16) | c->status);
	}
	return 0;
}

/* enlight:workload_start(dev, queue_depth) */
SEC("uprobe")
int enlight_workload_start(struct pt_regs *ctx)
{
	__u64 dev;
	struct enlight_dev_events *e = events_of(ctx, &dev);

	if (e)
		e->workload_starts += 1;
	return 0;
}

/* enlight:trap(dev, count): an emulated device trapped count register accesses since its last hit */
SEC("uprobe")
int enlight_trap(struct pt_regs *ctx)
{
	struct enlight_dev_key key = {};
	__u64 dev, count, *v;

	if (usdt_arg(ctx, 0, &dev) || usdt_arg(ctx, 1, &count)) {
		health_inc(ENLIGHT_HEALTH_READ_FAILED);
		return 0;
	}
	key.tgid = bpf_get_current_pid_tgid() >> 32;
	key.dev = (__u32)dev;
	v = bpf_map_lookup_elem(&dev_traps, &key);
	if (v) {
		*v += count;
		return 0;
	}
	if (bpf_map_update_elem(&dev_traps, &key, &count, BPF_NOEXIST)) {
		/* Another CPU created it meanwhile: add to theirs (per-CPU, so ours is separate). */
		v = bpf_map_lookup_elem(&dev_traps, &key);
		if (v)
			*v += count;
		else
			health_inc(ENLIGHT_HEALTH_MAP_FULL);
	}
	return 0;
}

/* enlight:settings_change(dev, knob, old, new): one hit per knob a control-socket change set */
SEC("uprobe")
int enlight_settings_change(struct pt_regs *ctx)
{
	struct enlight_knob_key key = {};
	__u64 dev, knob, one = 1, *v;

	if (usdt_arg(ctx, 0, &dev) || usdt_arg(ctx, 1, &knob)) {
		health_inc(ENLIGHT_HEALTH_READ_FAILED);
		return 0;
	}
	key.tgid = bpf_get_current_pid_tgid() >> 32;
	key.dev = (__u32)dev;
	key.knob = (__u32)knob;
	v = bpf_map_lookup_elem(&settings_changes, &key);
	if (v) {
		*v += 1;
		return 0;
	}
	if (bpf_map_update_elem(&settings_changes, &key, &one, BPF_NOEXIST)) {
		/* Another CPU created it meanwhile: count in ours (per-CPU values are separate). */
		v = bpf_map_lookup_elem(&settings_changes, &key);
		if (v)
			*v += 1;
		else
			health_inc(ENLIGHT_HEALTH_MAP_FULL);
	}
	return 0;
}
