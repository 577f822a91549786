#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vhost_mirror_fuzz::frame_decode::run(data));
