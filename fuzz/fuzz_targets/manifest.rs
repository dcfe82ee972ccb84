#![no_main]
//! `warden_agent::fuzz::manifest` under libFuzzer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| warden_agent::fuzz::manifest(data));
