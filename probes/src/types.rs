//! The types shared with the programs of `src/bpf/enlight.bpf.c` (`src/bpf/enlight.h`): defined
//! once, in [`enlight_abi::record`], and re-exported here. A test checks each against the BTF of
//! the shipped object (`shared_types_match_the_objects_btf`), so the C and Rust sides cannot
//! drift apart silently.

pub use enlight_abi::record::*;
