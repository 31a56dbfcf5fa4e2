//! Fuzz target `snapshot`: arbitrary bytes into `Snapshot::from_json`, the parser and
//! validator every sidecar runs on what discover sends. It must never panic, and a config
//! it accepts must survive a round trip through JSON unchanged and keep its indexes
//! consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidemesh_api::Snapshot;

fuzz_target!(|data: &[u8]| {
    let Ok(snapshot) = Snapshot::from_json(data) else {
        return;
    };
    // What is accepted once is accepted again, identically.
    let again = Snapshot::from_json(&snapshot.to_json()).expect("a valid config re-validates");
    assert_eq!(again.config(), snapshot.config());
    // The indexes agree with the config.
    for (i, svc) in snapshot.outbound().iter().enumerate() {
        let (j, _) = snapshot
            .outbound_by_address(svc.address)
            .expect("every address is indexed");
        assert_eq!(i, j);
        assert!(
            snapshot
                .outbound_by_name(&svc.namespace, &svc.name)
                .is_some()
        );
        assert_eq!(snapshot.route_matchers(i).len(), svc.routes.len());
        for name in &svc.dns_names {
            assert_eq!(snapshot.resolve(name), Some(svc.address));
        }
        // Matching never panics, whatever the request looks like.
        for m in snapshot.route_matchers(i) {
            let _ = m.matches("GET", Some("x.example.com"), "/api/x", |_| Some("1"));
        }
    }
    for p in snapshot.inbound() {
        assert!(snapshot.inbound_by_outer(p.port_outer).is_some());
    }
});
