//! The loopback address table: one address in 127.0.0.0/8 per service, unique, never in
//! 127.0.0.0/16 (so never 127.0.0.1 nor the addresses tests and examples give instances),
//! never ending in .0 or .255.
//!
//! An address is a deterministic hash of `namespace/name`, with linear probing on a
//! collision, and is kept once given: edits never move a service, and the table is saved
//! in the data directory so restarts do not either (even when probing order would differ).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

/// Second octet 1..=254, third 0..=255, fourth 1..=254.
const SLOTS: u64 = 254 * 256 * 254;

/// Service `namespace/name` to its loopback address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressTable {
    by_service: BTreeMap<String, Ipv4Addr>,
    taken: HashMap<Ipv4Addr, String>,
}

impl AddressTable {
    /// A table restored from a saved map (entries that are not valid mesh addresses or that
    /// collide are skipped; they are reassigned by the next [`AddressTable::sync`]).
    pub fn from_saved(saved: BTreeMap<String, Ipv4Addr>) -> AddressTable {
        let mut t = AddressTable::default();
        for (key, addr) in saved {
            if is_mesh_address(addr) && !t.taken.contains_key(&addr) {
                t.taken.insert(addr, key.clone());
                t.by_service.insert(key, addr);
            }
        }
        t
    }

    /// The table as a map, for saving.
    pub fn to_saved(&self) -> &BTreeMap<String, Ipv4Addr> {
        &self.by_service
    }

    /// The address of `namespace/name`.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Ipv4Addr> {
        self.by_service.get(&format!("{namespace}/{name}")).copied()
    }

    /// Makes the table hold exactly `services`: existing ones keep their address, new ones
    /// get one, gone ones free theirs. Returns whether anything changed.
    pub fn sync<'a>(&mut self, services: impl IntoIterator<Item = (&'a str, &'a str)>) -> bool {
        let want: std::collections::BTreeSet<String> = services
            .into_iter()
            .map(|(ns, name)| format!("{ns}/{name}"))
            .collect();
        let before = self.by_service.len();
        self.by_service.retain(|k, _| want.contains(k));
        let mut changed = self.by_service.len() != before;
        if changed {
            let by_service = &self.by_service;
            self.taken.retain(|_, k| by_service.contains_key(k));
        }
        for key in want {
            if self.by_service.contains_key(&key) {
                continue;
            }
            let addr = self.free_slot(&key);
            self.taken.insert(addr, key.clone());
            self.by_service.insert(key, addr);
            changed = true;
        }
        changed
    }

    fn free_slot(&self, key: &str) -> Ipv4Addr {
        let start = fnv1a(key.as_bytes()) % SLOTS;
        // The table cannot hold more than SLOTS services in practice (16 million); the
        // bound keeps the loop finite regardless.
        for i in 0..SLOTS {
            let addr = slot_address((start + i) % SLOTS);
            if !self.taken.contains_key(&addr) {
                return addr;
            }
        }
        slot_address(start)
    }
}

/// FNV-1a, 64 bits: stable across Rust versions and runs, unlike `DefaultHasher`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn slot_address(slot: u64) -> Ipv4Addr {
    let d = (slot % 254) as u8 + 1;
    let c = ((slot / 254) % 256) as u8;
    let b = (slot / (254 * 256)) as u8 + 1;
    Ipv4Addr::new(127, b, c, d)
}

fn is_mesh_address(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[0] == 127 && o[1] != 0 && o[1] != 255 && o[3] != 0 && o[3] != 255
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unique_valid_and_stable() {
        let names: Vec<(String, String)> = (0..5000)
            .map(|i| (format!("ns{}", i % 7), format!("svc{i}")))
            .collect();
        let mut t = AddressTable::default();
        assert!(t.sync(names.iter().map(|(a, b)| (a.as_str(), b.as_str()))));
        let mut seen = std::collections::HashSet::new();
        for (ns, n) in &names {
            let a = t.get(ns, n).unwrap();
            assert!(is_mesh_address(a), "{a}");
            assert_ne!(a, Ipv4Addr::LOCALHOST);
            assert!(seen.insert(a), "duplicate {a}");
        }
        // Removing one keeps the others where they are; syncing again changes nothing.
        let before = t.clone();
        assert!(t.sync(names[1..].iter().map(|(a, b)| (a.as_str(), b.as_str()))));
        assert!(t.get("ns0", "svc0").is_none());
        for (ns, n) in &names[1..] {
            assert_eq!(t.get(ns, n), before.get(ns, n));
        }
        assert!(!t.sync(names[1..].iter().map(|(a, b)| (a.as_str(), b.as_str()))));
        // Restored from a save, nothing moves.
        let restored = AddressTable::from_saved(t.to_saved().clone());
        assert_eq!(restored, t);
    }

    #[test]
    fn same_name_same_address_in_a_fresh_table() {
        let mut a = AddressTable::default();
        a.sync([("demo", "backend")]);
        let mut b = AddressTable::default();
        b.sync([("demo", "x"), ("demo", "backend")]);
        assert_eq!(a.get("demo", "backend"), b.get("demo", "backend"));
    }

    #[test]
    fn collisions_probe_and_bad_saved_entries_are_dropped() {
        let mut saved = BTreeMap::new();
        let home = slot_address(fnv1a(b"demo/backend") % SLOTS);
        saved.insert("demo/squatter".to_owned(), home);
        saved.insert("demo/bad".to_owned(), Ipv4Addr::LOCALHOST);
        let mut t = AddressTable::from_saved(saved);
        assert!(t.get("demo", "bad").is_none());
        t.sync([("demo", "squatter"), ("demo", "backend")]);
        assert_eq!(t.get("demo", "squatter"), Some(home));
        assert_ne!(t.get("demo", "backend"), Some(home));
    }
}
