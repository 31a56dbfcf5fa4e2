//! Fuzzes the first bytes of a connection on an `auto` port (`sidemesh_proxy::fuzzing::detect`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sidemesh_proxy::fuzzing::detect(data);
});
