//! Name rules shared by the contract, discover and the CLI: what a namespace, service,
//! plugin, route or DNS name may look like. Anything that becomes a URL path segment, a
//! file name or a DNS label goes through here, so `/`, `..` and control characters never
//! reach a path or a log line.

/// Checks a DNS label (RFC 1123, section 2.1): 1..=63 of `a-z`, `0-9`, `-`, not starting or
/// ending with `-`. Returns what is wrong, for an error message.
pub fn check_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if s.len() > 63 {
        return Err(format!("must be at most 63 characters, has {}", s.len()));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "must be a DNS label (lower-case a-z, 0-9 and '-'), found {}",
            describe_char(c)
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must not start or end with '-'".to_owned());
    }
    Ok(())
}

/// Checks a DNS name: dot-separated labels (each as in [`check_label`], but allowing `_`
/// as services' SRV-style names do), at most 253 characters, lower case, no trailing dot.
pub fn check_dns_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if s.len() > 253 {
        return Err(format!("must be at most 253 characters, has {}", s.len()));
    }
    if s.ends_with('.') {
        return Err("must not end with '.' (names are stored without the root)".to_owned());
    }
    for label in s.split('.') {
        let plain = label.replace('_', "a");
        check_label(&plain).map_err(|e| format!("label {label:?} {e}"))?;
    }
    Ok(())
}

/// Checks a `namespace/service` client name as `allow_clients` lists it; `namespace/*`
/// allows every service of a namespace.
pub fn check_client(s: &str) -> Result<(), String> {
    let Some((ns, svc)) = s.split_once('/') else {
        return Err(format!(
            "must be \"namespace/service\" or \"namespace/*\", got {s:?}"
        ));
    };
    check_label(ns).map_err(|e| format!("namespace {e}"))?;
    if svc != "*" {
        check_label(svc).map_err(|e| format!("service {e}"))?;
    }
    Ok(())
}

/// Checks a zone or a label key/value: 1..=63 printable ASCII characters without spaces.
pub fn check_token(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 63 {
        return Err(format!("must be 1 to 63 characters, has {}", s.len()));
    }
    if let Some(c) = s.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "must be printable ASCII without spaces, found {}",
            describe_char(c)
        ));
    }
    Ok(())
}

/// Describes a character for an error message without echoing control bytes.
fn describe_char(c: char) -> String {
    if c.is_control() || c.is_whitespace() {
        format!("U+{:04X}", c as u32)
    } else {
        format!("{c:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert!(check_label("tomcat").is_ok());
        assert!(check_label("a-1").is_ok());
        assert!(check_label("").is_err());
        assert!(check_label("-a").is_err());
        assert!(check_label("A").is_err());
        assert!(check_label("a/b").is_err());
        assert!(check_label("..").is_err());
        assert!(check_label("a\u{0}b").unwrap_err().contains("U+0000"));
        assert!(check_label(&"a".repeat(64)).is_err());
    }

    #[test]
    fn dns_names() {
        assert!(check_dns_name("tomcat.shop.svc.cluster.local").is_ok());
        assert!(check_dns_name("_http._tcp.tomcat").is_ok());
        assert!(check_dns_name("tomcat.").is_err());
        assert!(check_dns_name("a..b").is_err());
        assert!(check_dns_name("Tomcat").is_err());
    }

    #[test]
    fn clients() {
        assert!(check_client("shop/web").is_ok());
        assert!(check_client("shop/*").is_ok());
        assert!(check_client("web").is_err());
        assert!(check_client("shop/../x").is_err());
    }
}
