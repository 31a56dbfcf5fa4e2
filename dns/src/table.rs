//! The name table: which names the shim answers itself, built once per config version.
//!
//! A table is derived state (STYLE.md, "Hot config"): it is rebuilt from a [`Snapshot`] when
//! the version changes and swapped in whole, never edited in place. Lookups take the query
//! name already normalised by [`normalise`] (lower case, dotted, no trailing dot), so the
//! hot path is one hash lookup.
//!
//! What it holds, for each dependency service:
//! - every name the config lists in `dns_names` (discover decides the short forms, e.g. a
//!   bare `tomcat` only for services the workload may call by that name);
//! - the unambiguous qualified forms `svc.ns`, `svc.ns.svc` and `svc.ns.svc.<cluster
//!   domain>`, which always mean that service;
//! - each of the above followed by each search-list domain, because a stub resolver with
//!   `ndots:5` first tries `tomcat.web.svc.cluster.local`, then the other search forms,
//!   and only then `tomcat.` (RFC 1123 section 6.1.4.3, resolv.conf(5) `search`/`ndots`).
//!   Answering the first form saves the app three round trips to the upstream.
//!
//! Names listed in the config win over derived forms when two services would claim one.
//! A service with an `address_v6` also answers `AAAA` with it. The table also knows every
//! proper suffix of its names (`shop.svc.cluster.local` for `tomcat.shop.svc.cluster.local`):
//! such a name exists, with no records of its own (an empty non-terminal), so in an
//! authoritative zone it gets NODATA, never NXDOMAIN (RFC 8020: NXDOMAIN would deny every
//! name below it).

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use sidemesh_api::Snapshot;
use sidemesh_api::snapshot::parse_upstream;

/// The names answered locally, and the settings that came with the same config.
#[derive(Debug, Default)]
pub struct NameTable {
    names: HashMap<String, Ipv4Addr>,
    /// `AAAA` answers, for the names of services that have an IPv6 address.
    v6: HashMap<String, Ipv6Addr>,
    /// Proper suffixes of the names (empty non-terminals).
    parents: HashSet<String>,
    /// The config version this table was built from (`None`: no config yet).
    pub version: Option<u64>,
    /// TTL of local answers, in seconds.
    pub ttl: u32,
    /// Upstreams from the config; empty means the pod's own resolvers.
    pub upstreams: Vec<SocketAddr>,
}

impl NameTable {
    /// Builds the table of `snapshot` (none: an empty table), expanding names with the
    /// search list `search` (domains in any case, with or without a trailing dot).
    pub fn build(snapshot: Option<&Snapshot>, search: &[String]) -> NameTable {
        let Some(s) = snapshot else {
            return NameTable {
                ttl: 5,
                ..NameTable::default()
            };
        };
        let settings = s.dns();
        let domain = settings.cluster_domain.trim_end_matches('.');
        let mut base: HashMap<String, Ipv4Addr> = HashMap::new();
        for (name, addr) in s.dns_names() {
            base.insert(name.to_ascii_lowercase(), addr);
        }
        for svc in s.outbound() {
            let short = format!("{}.{}", svc.name, svc.namespace);
            for name in [
                short.clone(),
                format!("{short}.svc"),
                format!("{short}.svc.{domain}"),
            ] {
                base.entry(name.to_ascii_lowercase()).or_insert(svc.address);
            }
        }
        let search: Vec<String> = search
            .iter()
            .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
            .filter(|d| !d.is_empty())
            .collect();
        let mut names = base.clone();
        for (name, addr) in &base {
            for domain in &search {
                names.entry(format!("{name}.{domain}")).or_insert(*addr);
            }
        }
        // Addresses are unique per service (the snapshot checks it), so the IPv4 address
        // finds the service's IPv6 one.
        let v6_of: HashMap<Ipv4Addr, Ipv6Addr> = s
            .outbound()
            .iter()
            .filter_map(|svc| Some((svc.address, svc.address_v6?)))
            .collect();
        let v6 = names
            .iter()
            .filter_map(|(n, a)| Some((n.clone(), *v6_of.get(a)?)))
            .collect();
        let mut parents = HashSet::new();
        for name in names.keys() {
            let mut rest = name.as_str();
            while let Some((_, parent)) = rest.split_once('.') {
                if !parents.insert(parent.to_owned()) {
                    break;
                }
                rest = parent;
            }
        }
        NameTable {
            names,
            v6,
            parents,
            version: Some(s.version()),
            ttl: settings.ttl_seconds,
            upstreams: settings
                .upstreams
                .iter()
                .filter_map(|u| parse_upstream(u))
                .collect(),
        }
    }

    /// The loopback address of a normalised name.
    pub fn lookup(&self, name: &str) -> Option<Ipv4Addr> {
        self.names.get(name).copied()
    }

    /// The IPv6 address of a normalised name, when its service has one.
    pub fn lookup_v6(&self, name: &str) -> Option<Ipv6Addr> {
        self.v6.get(name).copied()
    }

    /// Whether a normalised name has mesh names below it (an empty non-terminal).
    pub fn has_names_below(&self, name: &str) -> bool {
        self.parents.contains(name)
    }

    /// How many names (with search forms) the table answers.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the table answers no name.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Normalises a query name given as wire labels into `out`: lower case, dot-separated,
/// no trailing dot. Returns false when a label holds a byte that cannot be part of a mesh
/// name (anything but letters, digits, `-` and `_`), so `a.b` as one label never matches
/// the two-label `a.b` (RFC 1035 section 2.3.1 names vs. RFC 2181 section 11 binary labels).
pub fn normalise<'a>(labels: impl Iterator<Item = &'a [u8]>, out: &mut String) -> bool {
    out.clear();
    for label in labels {
        if !out.is_empty() {
            out.push('.');
        }
        for &b in label {
            if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return false;
            }
            out.push(char::from(b.to_ascii_lowercase()));
        }
    }
    true
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A config with `tomcat` (listed names) and `db` (no listed names), TTL 7.
    pub(crate) fn snapshot(version: u64) -> Snapshot {
        let json = serde_json::json!({
            "version": version,
            "identity": {"namespace": "web", "service": "front", "plugin": "sidemesh-proxy"},
            "outbound": [{
                "name": "tomcat", "namespace": "shop",
                "dns_names": ["tomcat", "tomcat.shop", "tomcat.shop.svc", "tomcat.shop.svc.cluster.local"],
                "address": "127.1.0.7",
                "address_v6": "fd00::7",
                "ports": [{"port": 8080}]
            }, {
                "name": "db", "namespace": "data",
                "address": "127.1.0.8",
                "ports": [{"port": 5432}]
            }],
            "dns": {"upstreams": ["10.0.0.10", "10.0.0.11:5353"], "ttl_seconds": 7}
        });
        Snapshot::from_json(json.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn answers_listed_derived_and_search_forms() {
        let search = vec![
            "web.svc.cluster.local".to_owned(),
            "SVC.cluster.local.".to_owned(),
            "cluster.local".to_owned(),
        ];
        let t = NameTable::build(Some(&snapshot(3)), &search);
        let tomcat = Some(Ipv4Addr::new(127, 1, 0, 7));
        for n in [
            "tomcat",
            "tomcat.shop",
            "tomcat.shop.svc",
            "tomcat.shop.svc.cluster.local",
            "tomcat.web.svc.cluster.local",
            "tomcat.svc.cluster.local",
            "tomcat.shop.svc.cluster.local.cluster.local",
        ] {
            assert_eq!(t.lookup(n), tomcat, "{n}");
        }
        let db = Some(Ipv4Addr::new(127, 1, 0, 8));
        assert_eq!(t.lookup("db.data.svc.cluster.local"), db);
        assert_eq!(t.lookup("db.data"), db);
        // No bare short name unless the config lists it.
        assert_eq!(t.lookup("db"), None);
        assert_eq!(t.lookup("tomcat.other"), None);
        assert_eq!(t.version, Some(3));
        assert_eq!(t.ttl, 7);
        assert_eq!(t.upstreams.len(), 2);
        assert_eq!(t.upstreams[1], "10.0.0.11:5353".parse().unwrap());
        // AAAA for the service with an IPv6 address, in every form; none for the other.
        let v6: Option<Ipv6Addr> = Some("fd00::7".parse().unwrap());
        assert_eq!(t.lookup_v6("tomcat"), v6);
        assert_eq!(t.lookup_v6("tomcat.web.svc.cluster.local"), v6);
        assert_eq!(t.lookup_v6("db.data"), None);
        // Empty non-terminals.
        for n in [
            "shop.svc.cluster.local",
            "svc.cluster.local",
            "cluster.local",
            "local",
            "shop",
        ] {
            assert!(t.has_names_below(n), "{n}");
        }
        assert!(!t.has_names_below("tomcat.shop.svc.cluster.local"));
        assert!(!t.has_names_below("other.svc.cluster.local"));
    }

    #[test]
    fn empty_without_config() {
        let t = NameTable::build(None, &["cluster.local".to_owned()]);
        assert!(t.is_empty());
        assert_eq!(t.version, None);
    }

    #[test]
    fn normalise_lowercases_and_rejects_odd_bytes() {
        let mut s = String::new();
        let labels: [&[u8]; 3] = [b"TomCat", b"Shop", b"svc"];
        assert!(normalise(labels.iter().copied(), &mut s));
        assert_eq!(s, "tomcat.shop.svc");
        let dotted: [&[u8]; 1] = [b"tomcat.shop"];
        assert!(!normalise(dotted.iter().copied(), &mut s));
        let nul: [&[u8]; 1] = [b"tom\0cat"];
        assert!(!normalise(nul.iter().copied(), &mut s));
        assert!(normalise(std::iter::empty(), &mut s));
        assert_eq!(s, "");
    }
}
