//! Fuzz target: see `poolgate_fuzz::config_parse` for the properties it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| poolgate_fuzz::config_parse(data));
