//! Fuzzes the check applied to upstream replies (anti-spoofing, decoding).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sidemesh_dns::fuzzing::upstream_reply(data);
});
