// SPDX-License-Identifier: (MIT OR Apache-2.0)
/*
 * enlight's eBPF programs on the running kernel's own devices (docs/kernel.md): block request
 * latency per disk, per-NIC packet counts and NAPI poll sizes, IRQ counts, KVM exits per VMM
 * thread, and a generic event counter (hyperv:vmbus_* where the kernel has them). Everything is
 * aggregated in maps the daemon reads each interval; nothing goes through a ring buffer.
 *
 * Block, net, NAPI and IRQ programs are BTF tracepoints (tp_btf): they get the tracepoint's real
 * arguments (struct request *, struct sk_buff *, ...) and read them through CO-RE relocations
 * (kernel.h). The KVM programs are classic tracepoints whose field offsets the loader reads from
 * tracefs (KVM is often a module).
 *
 * Build: probes/build-bpf.sh (the object is committed; a check rebuilds and compares).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "kernel.h"
#include "bucket.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/* Per (0, dev_t, op): counters and every latency bucket, as the USDT programs' io_hist. One
 * value shared by all CPUs, updated with atomic adds: a per-CPU value is 28.7 KB per CPU, too
 * much to preallocate on a large machine, and a map that is not preallocated must allocate in
 * the completion's (interrupt) context, which fails now and then, losing the event. 256
 * entries: 51 disks of 5 ops, 7.3 MB. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct enlight_io_key);
	__type(value, struct enlight_io_hist);
} blk_hist SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct enlight_io_hist);
} blk_hist_zero SEC(".maps");

/* Per interface, per CPU (640 bytes each), preallocated so no program allocates. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 256);
	__type(key, struct enlight_nic_key);
	__type(value, struct enlight_nic_stats);
} nic_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct enlight_nic_stats);
} nic_stats_zero SEC(".maps");

/* Handler invocations per IRQ number: one counter per IRQ, indexed by it. An array, not a hash:
 * the lookup is inlined (no helper call, no hashing, no bucket walk) and touches one cache line,
 * which is what a run costs when interrupts are rare and everything it touches is cold
 * (issue 17: 1.6-2.0 us per run of the per-CPU hash version on unrelated interrupts). Shared by
 * all CPUs (atomic adds; an IRQ is normally handled on one CPU), read in one batch. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, ENLIGHT_IRQ_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} irq_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct enlight_kvm_key);
	__type(value, __u64);
} kvm_counts SEC(".maps");

/* Field offsets of the KVM tracepoints (enum enlight_kvm_field), set by the loader. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, ENLIGHT_KVM_FIELDS);
	__type(key, __u32);
	__type(value, __u32);
} kvm_fields SEC(".maps");

/* Hits per tracepoint, by its tracefs event id (the attach cookie). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} event_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ENLIGHT_KHEALTH_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} kernel_health SEC(".maps");

static __always_inline void health_inc(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&kernel_health, &which);
	if (v)
		*v += 1;
}

/* Looks up key in a per-CPU map, creating it from the all-zero template if absent. */
static __always_inline void *lookup_or_zero(void *map, void *key, void *zero_map)
{
	__u32 zero_key = 0;
	void *v = bpf_map_lookup_elem(map, key), *zero;

	if (v)
		return v;
	zero = bpf_map_lookup_elem(zero_map, &zero_key);
	if (!zero)
		return 0;
	/* NOEXIST: if another CPU created it meanwhile, the lookup below finds theirs. */
	bpf_map_update_elem(map, key, zero, BPF_NOEXIST);
	v = bpf_map_lookup_elem(map, key);
	if (!v)
		health_inc(ENLIGHT_KHEALTH_MAP_FULL);
	return v;
}

static __always_inline __u32 op_of(unsigned int cmd_flags)
{
	switch (cmd_flags & 0xff) { /* REQ_OP_MASK */
	case 0: return 0; /* REQ_OP_READ */
	case 1: return 1; /* REQ_OP_WRITE */
	case 2: return 2; /* REQ_OP_FLUSH */
	case 3:           /* REQ_OP_DISCARD */
	case 5:           /* REQ_OP_SECURE_ERASE */
	case 9:           /* REQ_OP_WRITE_ZEROES */
		return ENLIGHT_KOP_DISCARD;
	default: return ENLIGHT_KOP_OTHER;
	}
}

/*
 * When the request started, as the block layer itself recorded it (no issue program, no map of
 * requests in flight). blk_mq_start_request() stamps rq->io_start_time_ns at the issue to the
 * driver, but only on a queue with QUEUE_FLAG_STATS (set by whatever consumes blk-stat: the
 * writeback throttle, on by default on every blk-mq disk, iolatency, iocost) and never for a
 * passthrough request; blk_mq_rq_ctx_init() zeroes it for every new request, so 0 means "not
 * stamped". rq->start_time_ns is stamped at allocation whenever the queue keeps I/O statistics
 * (iostats, on by default), has a scheduler, or blk-stat: the fallback, which adds the time the
 * request waited in the scheduler to its latency (counted, ENLIGHT_KHEALTH_FROM_ALLOC). Both
 * come from blk_time_get_ns(): CLOCK_MONOTONIC, as bpf_ktime_get_ns(), cached per plug on
 * newer kernels (a batch of requests submitted under one plug shares one timestamp).
 */
static __always_inline __u64 start_of(struct request *rq)
{
	__u64 t = rq->io_start_time_ns;

	if (t)
		return t;
	t = rq->start_time_ns;
	if (t)
		health_inc(ENLIGHT_KHEALTH_FROM_ALLOC);
	return t;
}

/*
 * block:block_rq_complete(struct request *rq, blk_status_t error, unsigned int nr_bytes): the
 * driver completed nr_bytes of the request. A request completed in parts fires once per part;
 * it counts as one op, with its latency, when the last part (nr_bytes covering what is left)
 * completes. The one block program: the request carries its own start time (start_of), and
 * tp_btf hands over a trusted pointer, so fields are plain loads (CO-RE relocated), no helper
 * calls.
 */
SEC("tp_btf/block_rq_complete")
int BPF_PROG(enlight_blk_complete, struct request *rq, int error, unsigned int nr_bytes)
{
	struct enlight_io_key hkey = {};
	struct enlight_io_hist *h;
	struct gendisk *disk;
	__u64 start, now, latency;
	__u32 bucket;

	disk = rq->q->disk;
	if (!disk) {
		health_inc(ENLIGHT_KHEALTH_READ_FAILED);
		return 0;
	}
	/* The kernel's dev_t encoding: major << 20 | minor. */
	hkey.dev = ((__u32)disk->major << 20) | (__u32)disk->first_minor;
	hkey.op = op_of(rq->cmd_flags);
	h = lookup_or_zero(&blk_hist, &hkey, &blk_hist_zero);
	if (!h)
		return 0;
	/* Shared by all CPUs: atomic adds. */
	__sync_fetch_and_add(&h->stats.bytes, nr_bytes);
	if (nr_bytes < rq->__data_len)
		return 0; /* more parts to come */
	start = start_of(rq);
	if (!start) {
		health_inc(ENLIGHT_KHEALTH_NO_START);
		return 0;
	}
	now = bpf_ktime_get_ns();
	latency = now > start ? now - start : 0;
	__sync_fetch_and_add(&h->stats.ops, 1);
	__sync_fetch_and_add(&h->stats.latency_sum_ns, latency);
	if (error)
		__sync_fetch_and_add(&h->stats.errors, 1);
	bucket = bucket_of(latency);
	if (bucket < ENLIGHT_BUCKETS)
		__sync_fetch_and_add(&h->buckets[bucket], 1);
	return 0;
}

static __always_inline struct enlight_nic_stats *nic_of(struct net_device *dev)
{
	struct enlight_nic_key key = {};

	if (!dev)
		return 0;
	key.netns = BPF_CORE_READ(dev, nd_net.net, ns.inum);
	key.ifindex = BPF_CORE_READ(dev, ifindex);
	return lookup_or_zero(&nic_stats, &key, &nic_stats_zero);
}

/* net:net_dev_xmit(skb, rc, dev, skb_len): the driver took (rc 0) or refused a packet. */
SEC("tp_btf/net_dev_xmit")
int BPF_PROG(enlight_net_xmit, struct sk_buff *skb, int rc, struct net_device *dev, unsigned int len)
{
	struct enlight_nic_stats *s = nic_of(dev);

	if (!s)
		return 0;
	if (rc == 0) {
		s->tx_packets += 1;
		s->tx_bytes += len;
	} else {
		s->tx_errors += 1;
	}
	return 0;
}

/* net:netif_receive_skb(skb): the stack receives a packet from skb->dev. */
SEC("tp_btf/netif_receive_skb")
int BPF_PROG(enlight_net_receive, struct sk_buff *skb)
{
	struct enlight_nic_stats *s = nic_of(BPF_CORE_READ(skb, dev));

	if (!s)
		return 0;
	s->rx_packets += 1;
	s->rx_bytes += BPF_CORE_READ(skb, len);
	return 0;
}

/* napi:napi_poll(napi, work, budget): one poll of a NIC queue handled `work` packets. */
SEC("tp_btf/napi_poll")
int BPF_PROG(enlight_napi_poll, struct napi_struct *napi, int work, int budget)
{
	struct enlight_nic_stats *s = nic_of(BPF_CORE_READ(napi, dev));
	__u32 slot;

	if (!s)
		return 0;
	s->napi_polls += 1;
	if (work > 0)
		s->napi_work += work;
	if (work >= budget)
		s->napi_budget_exhausted += 1;
	slot = work < 0 ? 0 : (__u32)work;
	if (slot >= ENLIGHT_NAPI_SLOTS)
		slot = ENLIGHT_NAPI_SLOTS - 1;
	s->napi_work_hist[slot] += 1;
	return 0;
}

/* irq:irq_handler_entry(irq, action): one handler of an IRQ runs. */
SEC("tp_btf/irq_handler_entry")
int BPF_PROG(enlight_irq_entry, int irq)
{
	__u32 key = (__u32)irq;
	__u64 *v = bpf_map_lookup_elem(&irq_counts, &key);

	if (v)
		__sync_fetch_and_add(v, 1);
	else
		health_inc(ENLIGHT_KHEALTH_MAP_FULL); /* an IRQ number past ENLIGHT_IRQ_SLOTS */
	return 0;
}

/* A 32-bit field of a classic tracepoint record, at the offset the loader stored. */
static __always_inline __u32 kvm_field(void *ctx, __u32 which)
{
	__u32 *off = bpf_map_lookup_elem(&kvm_fields, &which), v = 0;

	if (!off || *off == ENLIGHT_FIELD_ABSENT || *off > 4096)
		return 0;
	if (bpf_probe_read_kernel(&v, sizeof(v), ctx + *off))
		health_inc(ENLIGHT_KHEALTH_READ_FAILED);
	return v;
}

static __always_inline int kvm_count(__u32 event, __u32 isa, __u32 reason)
{
	__u64 id = bpf_get_current_pid_tgid(), one = 1, *v;
	struct enlight_kvm_key key = {};

	key.tgid = id >> 32;
	key.tid = (__u32)id;
	key.event = event;
	key.isa = isa;
	key.reason = reason;
	v = bpf_map_lookup_elem(&kvm_counts, &key);
	if (v) {
		*v += 1;
		return 0;
	}
	if (bpf_map_update_elem(&kvm_counts, &key, &one, BPF_NOEXIST)) {
		v = bpf_map_lookup_elem(&kvm_counts, &key);
		if (v)
			*v += 1;
		else
			health_inc(ENLIGHT_KHEALTH_MAP_FULL);
	}
	return 0;
}

/* kvm:kvm_exit: a vCPU left the guest; counted per VMM thread and exit reason. */
SEC("tracepoint/kvm/kvm_exit")
int enlight_kvm_exit(void *ctx)
{
	return kvm_count(ENLIGHT_KVM_EXIT, kvm_field(ctx, ENLIGHT_KVM_EXIT_ISA),
			 kvm_field(ctx, ENLIGHT_KVM_EXIT_REASON));
}

/* kvm:kvm_pio: a port I/O exit, by direction. */
SEC("tracepoint/kvm/kvm_pio")
int enlight_kvm_pio(void *ctx)
{
	return kvm_count(ENLIGHT_KVM_PIO, 0, kvm_field(ctx, ENLIGHT_KVM_PIO_RW));
}

/* kvm:kvm_mmio: an MMIO access KVM handled or passed on, by type. */
SEC("tracepoint/kvm/kvm_mmio")
int enlight_kvm_mmio(void *ctx)
{
	return kvm_count(ENLIGHT_KVM_MMIO, 0, kvm_field(ctx, ENLIGHT_KVM_MMIO_TYPE));
}

/* Any classic tracepoint (hyperv:vmbus_* where present): counts hits by the attach cookie, which
 * the loader sets to the event's tracefs id, so one program serves every event it is attached
 * to. (The record's own common_type is not there: the kernel overwrites the first 8 bytes of
 * what a tracepoint program sees with a pt_regs pointer.) */
SEC("tracepoint/any/any")
int enlight_count_event(void *ctx)
{
	__u32 key = (__u32)bpf_get_attach_cookie(ctx);
	__u64 one = 1, *v;

	v = bpf_map_lookup_elem(&event_counts, &key);
	if (v) {
		*v += 1;
		return 0;
	}
	if (bpf_map_update_elem(&event_counts, &key, &one, BPF_NOEXIST)) {
		v = bpf_map_lookup_elem(&event_counts, &key);
		if (v)
			*v += 1;
		else
			health_inc(ENLIGHT_KHEALTH_MAP_FULL);
	}
	return 0;
}
