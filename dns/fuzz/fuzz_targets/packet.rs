//! Fuzzes the shim's request path with arbitrary client packets.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sidemesh_dns::fuzzing::packet(data);
});
