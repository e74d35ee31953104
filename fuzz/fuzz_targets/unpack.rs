//! Unpacker (first byte: 0 tar, 1 tar.gz, 2 tar.zst); see
//! `deploy_agent::fuzzing::unpack`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| deploy_agent::fuzzing::unpack(data));
