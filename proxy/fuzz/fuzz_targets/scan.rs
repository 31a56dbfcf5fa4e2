//! Fuzzes the hyper path's framing scan over a client's bytes (`sidemesh_proxy::fuzzing::scan`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sidemesh_proxy::fuzzing::scan(data);
});
