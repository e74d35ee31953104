//! Manifest parser and signature check; see `testkit::fuzzing::manifest`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| testkit::fuzzing::manifest(data));
