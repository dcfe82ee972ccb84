#![no_main]
//! `warden_agent::fuzz::job_file` under libFuzzer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| warden_agent::fuzz::job_file(data));
