//! Manifest parser and signature check; see `deploy_agent::fuzzing::manifest`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| deploy_agent::fuzzing::manifest(data));
