//! Fuzz target: see `poolgate_fuzz::cookie_verify` for the properties it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| poolgate_fuzz::cookie_verify(data));
