/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/*
 * Types shared between the kernel-device programs (kernel.bpf.c) and the Rust loader
 * (probes/src/kernel.rs), plus the few kernel types the programs read, declared with
 * preserve_access_index so clang emits CO-RE relocations: the loader fixes every field offset
 * against the running kernel's BTF, so one object runs on many kernels.
 * Fixed-width fields only, explicit padding, no bools; sizes asserted here and in Rust.
 */
#ifndef ENLIGHT_KERNEL_H
#define ENLIGHT_KERNEL_H

#include "enlight.h" /* __u32/__u64, enlight_io_key, enlight_io_hist, ENLIGHT_BUCKETS */

/* Block ops, in the op codes of contract 1 (0 read, 1 write, 2 flush), plus two of our own. */
#define ENLIGHT_KOP_DISCARD 5 /* discard, secure erase, write zeroes */
#define ENLIGHT_KOP_OTHER 6   /* zone management, driver passthrough */

/* NAPI poll sizes: exact counts for 0..63 packets per poll, the last slot holds 64 and more. */
#define ENLIGHT_NAPI_SLOTS 65

/* IRQ numbers counted: 0 .. ENLIGHT_IRQ_SLOTS - 1 (x86's nr_irqs stays below this up to about
 * 500 CPUs); a higher one counts as an event lost. */
#define ENLIGHT_IRQ_SLOTS 16384

/* A network interface: its namespace (the inode of /proc/<pid>/ns/net) and ifindex in it. */
struct enlight_nic_key {
	__u32 netns;
	__u32 ifindex;
};

struct enlight_nic_stats {
	__u64 tx_packets;      /* net:net_dev_xmit with rc == 0 */
	__u64 tx_bytes;
	__u64 tx_errors;       /* net:net_dev_xmit with rc != 0 */
	__u64 rx_packets;      /* net:netif_receive_skb */
	__u64 rx_bytes;
	__u64 napi_polls;      /* napi:napi_poll */
	__u64 napi_work;       /* packets those polls handled */
	__u64 napi_budget_exhausted; /* polls that used their whole budget (stay in polling) */
	__u64 napi_work_hist[ENLIGHT_NAPI_SLOTS];
	__u64 pad;
};

/* KVM events, counted per VMM thread. */
enum enlight_kvm_event {
	ENLIGHT_KVM_EXIT = 0, /* kvm:kvm_exit, reason = exit_reason, isa in the key */
	ENLIGHT_KVM_PIO = 1,  /* kvm:kvm_pio, reason = rw (0 in, 1 out) */
	ENLIGHT_KVM_MMIO = 2, /* kvm:kvm_mmio, reason = type (0 unsatisfied read, 1 read, 2 write) */
};

struct enlight_kvm_key {
	__u32 tgid;
	__u32 tid;
	__u32 event;
	__u32 isa;
	__u32 reason;
	__u32 pad;
};

/* Byte offsets of the classic tracepoint fields the KVM programs read, from each event's
 * tracefs format file (KVM is often a module, whose BTF a loader may not relocate against).
 * ENLIGHT_FIELD_ABSENT means the field is not there: the program records 0. */
#define ENLIGHT_FIELD_ABSENT 0xffffffffU
enum enlight_kvm_field {
	ENLIGHT_KVM_EXIT_REASON = 0,
	ENLIGHT_KVM_EXIT_ISA = 1,
	ENLIGHT_KVM_PIO_RW = 2,
	ENLIGHT_KVM_MMIO_TYPE = 3,
	ENLIGHT_KVM_FIELDS = 4,
};

/* Indices of the kernel programs' health counters (a per-CPU array of __u64). */
enum enlight_kernel_health {
	ENLIGHT_KHEALTH_MAP_FULL = 0,     /* a map update failed: events lost */
	ENLIGHT_KHEALTH_NO_START = 1,     /* a completed request with no start time stamped in it */
	ENLIGHT_KHEALTH_READ_FAILED = 2,  /* reading kernel memory failed (a request with no disk) */
	ENLIGHT_KHEALTH_FROM_ALLOC = 3,   /* latency timed from allocation: the queue keeps no issue time */
	ENLIGHT_KHEALTH_COUNT = 4,
};

/* The kernel types read, only the fields used (CO-RE relocates their offsets). */
struct gendisk {
	int major;
	int first_minor;
} __attribute__((preserve_access_index));

struct request_queue {
	struct gendisk *disk;
} __attribute__((preserve_access_index));

struct request {
	struct request_queue *q;
	unsigned int cmd_flags;
	unsigned int __data_len;
	__u64 start_time_ns;
	__u64 io_start_time_ns;
} __attribute__((preserve_access_index));

struct ns_common {
	unsigned int inum;
} __attribute__((preserve_access_index));

struct net {
	struct ns_common ns;
} __attribute__((preserve_access_index));

typedef struct {
	struct net *net;
} __attribute__((preserve_access_index)) possible_net_t;

struct net_device {
	int ifindex;
	possible_net_t nd_net;
} __attribute__((preserve_access_index));

struct sk_buff {
	struct net_device *dev;
	unsigned int len;
} __attribute__((preserve_access_index));

struct napi_struct {
	struct net_device *dev;
} __attribute__((preserve_access_index));

_Static_assert(sizeof(struct enlight_nic_key) == 8, "enlight_nic_key");
_Static_assert(sizeof(struct enlight_nic_stats) == 8 * (9 + ENLIGHT_NAPI_SLOTS), "enlight_nic_stats");
_Static_assert(sizeof(struct enlight_kvm_key) == 24, "enlight_kvm_key");

#endif
