//! libFuzzer target: `kiln_master::fuzz::interpolate_template`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_master::fuzz::interpolate_template(data));
