//! Unpacker (first byte: 0 tar, 1 tar.gz, 2 tar.zst); see
//! `testkit::fuzzing::unpack`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| testkit::fuzzing::unpack(data));
