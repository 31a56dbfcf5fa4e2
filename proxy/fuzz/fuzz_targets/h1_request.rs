//! Fuzzes a client's HTTP/1.1 request head and body framing (`sidemesh_proxy::fuzzing::h1_request`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sidemesh_proxy::fuzzing::h1_request(data);
});
