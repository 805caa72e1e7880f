#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardmq::fuzzing::frame_decoder(data));
