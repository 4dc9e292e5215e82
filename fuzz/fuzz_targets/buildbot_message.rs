//! libFuzzer target: `kiln_master::fuzz::buildbot_message`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_master::fuzz::buildbot_message(data));
