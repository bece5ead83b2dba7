//! enlight's shared ABI, written once: what the device processes, the eBPF programs, the daemon
//! and `enlight top` must agree on, in a crate with no dependency but `serde` (and `aya`, behind
//! a feature only `enlight-probes` enables, for its `Pod` marker).
//!
//! | module | what | written by | read by |
//! |---|---|---|---|
//! | [`op`] | op codes ([`op::Op`]): USDT arguments, the disk's wire protocol, the `op` label | the device processes (`enlight-driver`, `enlight-vmm`) | the eBPF programs, `enlightd` (names in `/metrics` and the API) |
//! | [`dir`] | signal and ring directions | the device processes | ad-hoc tracers of `signal` and `ring_full` |
//! | [`record`] | the `#[repr(C)]` records shared with the eBPF programs, their sizes and the map and health constants | the device processes (`io_reap`'s completions and signal counts), the loader (USDT argument specs) | the eBPF programs (`probes/src/bpf/enlight.bpf.c`), the map reader (`enlight-probes`) |
//! | [`api`] | the JSON API's types both sides read alike (ops, histograms, self-cost, health, devices), each field with a default; a part only the daemon knows the type of (its kernel state) is a type parameter a client leaves [`api::Unread`] | `enlightd` | `enlight top`, `enlight tune`, `enlight bench` |
//! | [`tuner`] | the tuner's view of a device and its decisions (also the audit log's lines), generic over [`tuner::TunerTypes`]: the daemon's strict enums and settings, or a client's [`tuner::Lenient`] wire enums (keeping a value this build does not know) and [`tuner::Settings`] | `enlightd` | `enlight top`, `enlight tune`, `enlight demo` |
//! | [`knob`] | a device's knobs ([`knob::Knob`]: value, limits, unit, source, disruption, tuner ladder) | `enlightd` | `enlight top`, `enlight tune` |
//! | [`kind`] | what a device is ([`DeviceKind`]): the registry's, the API's and the `kind` label's value | the device processes (registry record), `enlightd` (kernel devices) | `enlightd`, `enlight top`, `enlight tune` |
//!
//! **The C side.** The eBPF programs cannot use Rust: `probes/src/bpf/enlight.h` declares the
//! same records in C with the same `_Static_assert`s on their sizes, and the records here assert
//! theirs at compile time too. `enlight-probes`' test `shared_types_match_the_objects_btf` reads
//! the BTF of the shipped object (`enlight.bpf.o`) and checks every struct of
//! [`record::SHARED_STRUCTS`] against it, size and member offsets, so a change on one side that
//! the other does not follow fails the test suite. Change a record here, in `enlight.h`, rebuild
//! the object (`probes/build-bpf.sh`) and commit all three together.
//!
//! **Compatibility.** The records are an ABI between programs built from the same commit (the
//! daemon loads the object it ships), so they change only together with the header. A device
//! kind this build does not know is kept as it was written ([`DeviceKind::Other`]), so that an
//! older reader does not reject a newer writer.

#[macro_use]
mod wire;

pub mod api;
pub mod dir;
pub mod kind;
pub mod knob;
pub mod op;
pub mod record;
pub mod tuner;

pub use kind::DeviceKind;
pub use op::Op;
