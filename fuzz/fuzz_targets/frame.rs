#![no_main]
//! `warden_agent::fuzz::frame` under libFuzzer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| warden_agent::fuzz::frame(data));
