//! Fuzzes arbitrary bytes as a chunked body (`sidemesh_proxy::fuzzing::chunked`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sidemesh_proxy::fuzzing::chunked(data);
});
