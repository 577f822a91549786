#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vhost_mirror_fuzz::framed_reader::run(data));
