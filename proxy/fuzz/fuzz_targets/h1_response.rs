//! Fuzzes an upstream's HTTP/1.1 response head and body framing (`sidemesh_proxy::fuzzing::h1_response`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sidemesh_proxy::fuzzing::h1_response(data);
});
