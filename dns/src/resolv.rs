//! Reading the pod's original resolver settings from a resolv.conf(5) file: the
//! `nameserver` lines become fallback upstreams, `search` (or `domain`) the search list.
//! Unknown lines and `options` are ignored, as the C library does.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

/// What the shim takes from a resolv.conf.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvConf {
    /// `nameserver` addresses, port 53.
    pub nameservers: Vec<SocketAddr>,
    /// The search list (the last `search` or `domain` line wins, as in resolv.conf(5)).
    pub search: Vec<String>,
}

impl ResolvConf {
    /// Parses resolv.conf text. Lines it cannot read are skipped.
    pub fn parse(text: &str) -> ResolvConf {
        let mut out = ResolvConf::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or_default();
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    // An IPv6 address may carry a zone (`fe80::1%eth0`), which a socket
                    // address cannot hold; skip such lines.
                    if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                        out.nameservers.push(SocketAddr::new(ip, 53));
                    }
                }
                Some("search") | Some("domain") => {
                    out.search = words
                        .map(|w| w.trim_end_matches('.').to_ascii_lowercase())
                        .filter(|w| !w.is_empty())
                        .collect();
                }
                _ => {}
            }
        }
        out
    }

    /// Reads and parses a resolv.conf file.
    pub fn read(path: &Path) -> std::io::Result<ResolvConf> {
        Ok(ResolvConf::parse(&std::fs::read_to_string(path)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubernetes_resolv_conf() {
        let text = "# generated\nsearch web.svc.cluster.local svc.cluster.local cluster.local.\n\
                    nameserver 10.96.0.10\nnameserver fe80::1%eth0\nnameserver ::1 # v6\n\
                    options ndots:5\nbogus line\n";
        let r = ResolvConf::parse(text);
        assert_eq!(
            r.nameservers,
            vec![
                "10.96.0.10:53".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(
            r.search,
            [
                "web.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
        assert_eq!(
            ResolvConf::parse("domain Example.org\n").search,
            ["example.org"]
        );
        assert_eq!(ResolvConf::parse(""), ResolvConf::default());
    }
}
