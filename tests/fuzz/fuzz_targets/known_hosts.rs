//! Fuzz target: see `poolgate_fuzz::known_hosts` for the properties it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| poolgate_fuzz::known_hosts(data));
