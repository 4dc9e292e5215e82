//! libFuzzer target: `kiln_master::fuzz::base_hook`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_master::fuzz::base_hook(data));
