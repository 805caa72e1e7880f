#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardmq::fuzzing::content_header(data));
