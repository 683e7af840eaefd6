#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| quorumkv_fuzz::wal::run(data));
