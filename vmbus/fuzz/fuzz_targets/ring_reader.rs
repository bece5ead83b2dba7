#![no_main]
// The harness is library code, shared with the test suite's corpus replay.
libfuzzer_sys::fuzz_target!(|data: &[u8]| enlight_vmbus::fuzzing::ring_reader(data));
