//! The YAML state file source: load, validate as a whole, and watch for edits.
//!
//! A file is applied only when it parses (unknown fields are errors, reported with line and
//! column), passes [`ClusterState::check`], and renders every sidecar without dropping any
//! route or policy. A dependency on a service the file does not define is allowed (the TTL
//! registry may provide it) and only logged. On a bad edit the last good state stays.
//!
//! Watching uses `notify` for prompt reloads and a poll of the file's metadata as a fallback
//! (editors that replace files, network filesystems), so a valid edit applies within a second.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sidemesh_api::ValidationError;
use sidemesh_api::state::ClusterState;

use crate::addresses::{AddressTable, fnv1a};
use crate::render::Cluster;

/// The largest state file read, in bytes.
pub const MAX_STATE_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// How often the file's metadata is polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Why a state file was rejected. `Display` is the one log line: file, place, what.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The file could not be read.
    #[error("{file}: cannot read: {message}")]
    Read {
        /// The file.
        file: String,
        /// The I/O error.
        message: String,
    },
    /// Not YAML of the state's shape.
    #[error("{file}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        file: String,
        /// 1-based line (0 when unknown).
        line: usize,
        /// 1-based column (0 when unknown).
        column: usize,
        /// What is wrong, with the field path when known.
        message: String,
    },
    /// Parsed, but breaks rules.
    #[error("{file}: {count} problem(s): {}", join(errors))]
    Invalid {
        /// The file.
        file: String,
        /// How many problems.
        count: usize,
        /// Each with its field path.
        errors: Vec<ValidationError>,
    },
}

fn join(errors: &[ValidationError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Parses and validates state file text.
pub fn parse(file: &Path, text: &str) -> Result<ClusterState, StateFileError> {
    parse_after(file, text, None)
}

/// Parses and validates state file text that replaces `previous`, a state already
/// validated: only services whose configs the change can affect are rendered again.
pub fn parse_after(
    file: &Path,
    text: &str,
    previous: Option<&ClusterState>,
) -> Result<ClusterState, StateFileError> {
    let name = file.display().to_string();
    if text.trim().is_empty() {
        // Almost always a file caught mid-write; dropping every service would be worse.
        return Err(StateFileError::Parse {
            file: name,
            line: 0,
            column: 0,
            message: "the file is empty; write `services: []` for an empty state".to_owned(),
        });
    }
    let state: ClusterState = match serde_norway::from_str(text) {
        Ok(s) => s,
        Err(direct) => {
            // YAML deserializers only take enums as tags (`path: !prefix /api`); users
            // write the JSON form (`path: {prefix: /api}`). Reading through a JSON value
            // accepts both but loses positions, so it is the fallback, and the direct
            // error (with line and column) is reported unless it is about enum tags.
            let via_json = serde_norway::from_str::<serde_json::Value>(text)
                .map_err(|e| e.to_string())
                .and_then(|v| serde_json::from_value::<ClusterState>(v).map_err(|e| e.to_string()));
            match via_json {
                Ok(s) => s,
                Err(json_message) => {
                    let (line, column) = direct
                        .location()
                        .map(|l| (l.line(), l.column()))
                        .unwrap_or((0, 0));
                    let direct_message = direct.to_string();
                    // The place leads the line already; do not say it twice.
                    let direct_message = direct_message
                        .strip_suffix(&format!(" at line {line} column {column}"))
                        .map(str::to_owned)
                        .unwrap_or(direct_message);
                    let message = if direct_message.contains("expected a YAML tag") {
                        json_message
                    } else {
                        direct_message
                    };
                    return Err(StateFileError::Parse {
                        file: name,
                        line,
                        column,
                        message,
                    });
                }
            }
        }
    };
    let errors = validate_after(previous, &state);
    if errors.is_empty() {
        Ok(state)
    } else {
        Err(StateFileError::Invalid {
            file: name,
            count: errors.len(),
            errors,
        })
    }
}

/// Reads, parses and validates a state file.
pub fn load(file: &Path) -> Result<(ClusterState, u64), StateFileError> {
    let bytes = read_capped(file)?;
    let text = String::from_utf8(bytes).map_err(|e| StateFileError::Parse {
        file: file.display().to_string(),
        line: 0,
        column: 0,
        message: format!("not UTF-8: {e}"),
    })?;
    let hash = fnv1a(text.as_bytes());
    Ok((parse(file, &text)?, hash))
}

fn read_capped(file: &Path) -> Result<Vec<u8>, StateFileError> {
    use std::io::Read;
    let err = |e: std::io::Error| StateFileError::Read {
        file: file.display().to_string(),
        message: e.to_string(),
    };
    let f = std::fs::File::open(file).map_err(err)?;
    let mut bytes = Vec::new();
    f.take(MAX_STATE_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(err)?;
    if bytes.len() as u64 > MAX_STATE_FILE_BYTES {
        return Err(StateFileError::Read {
            file: file.display().to_string(),
            message: format!("larger than {MAX_STATE_FILE_BYTES} bytes"),
        });
    }
    Ok(bytes)
}

/// Every rule a state must meet to be applied: the structural checks, then every sidecar
/// rendered against the contract (paths point into the file: `services[0].use_services[1]...`).
pub fn validate(state: &ClusterState) -> Vec<ValidationError> {
    validate_after(None, state)
}

/// [`validate`], rendering only what changed since `previous` (a valid state).
pub fn validate_after(
    previous: Option<&ClusterState>,
    state: &ClusterState,
) -> Vec<ValidationError> {
    let mut errors = match state.check() {
        Ok(()) => Vec::new(),
        Err(e) => e.0,
    };
    if !errors.is_empty() {
        return errors;
    }
    if let Err(e) = sidemesh_api::Snapshot::try_from(sidemesh_api::SidecarConfig {
        version: 0,
        identity: sidemesh_api::config::Identity {
            namespace: "check".into(),
            service: "check".into(),
            plugin: "check".into(),
            pod: None,
            zone: None,
        },
        inbound: vec![],
        outbound: vec![],
        dns: state.dns.clone(),
        plugin: Default::default(),
    }) {
        // DNS settings are shared by every sidecar: report them once, not per service.
        errors.extend(e.0);
        return errors;
    }
    let mut addresses = AddressTable::default();
    addresses.sync(
        state
            .services
            .iter()
            .map(|s| (s.namespace.as_str(), s.name.as_str())),
    );
    let cluster = Cluster::new(state);
    let affected = crate::store::affected(previous, state);
    let mut keys: Vec<_> = cluster
        .sidecars()
        .filter(|k| affected.contains(&k.namespace, &k.service))
        .collect();
    keys.sort();
    let positions: std::collections::HashMap<(&str, &str), usize> = state
        .services
        .iter()
        .enumerate()
        .rev() // the first definition wins, as in rendering
        .map(|(i, s)| ((s.namespace.as_str(), s.name.as_str()), i))
        .collect();
    let mut seen = std::collections::HashSet::new();
    for key in keys {
        let Some(&i) = positions.get(&(key.namespace.as_str(), key.service.as_str())) else {
            continue;
        };
        match cluster.render(&key, &addresses) {
            Ok(r) => {
                for e in r.dropped {
                    // A dependency the registry may provide later is not an error.
                    if e.message.starts_with("unknown service") {
                        tracing::warn!(service = %format!("{}/{}", key.namespace, key.service), problem = %e, "state file: dependency not defined (yet)");
                        continue;
                    }
                    let path = format!("services[{i}].{}", e.path);
                    if seen.insert((path.clone(), e.message.clone())) {
                        errors.push(ValidationError {
                            path,
                            message: e.message,
                        });
                    }
                }
            }
            Err(e) => errors.push(ValidationError {
                path: format!("services[{i}]"),
                message: e.to_string(),
            }),
        }
    }
    errors
}

/// The metadata that tells a changed file from an unchanged one without reading it.
fn stamp(file: &Path) -> Option<(std::time::SystemTime, u64)> {
    let m = std::fs::metadata(file).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Watches `file` and calls `apply` with each new valid state, and `rejected` with each
/// error, until the returned task is aborted. Content that did not change (same bytes) is
/// not applied again. `last_hash` and `last_good` are the content already applied.
pub fn watch(
    file: PathBuf,
    last_hash: u64,
    last_good: ClusterState,
    apply: impl Fn(ClusterState) + Send + 'static,
    rejected: impl Fn(&StateFileError) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    use notify::Watcher;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let watch_dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let watcher = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
        // Coalesce: one pending wake-up is enough, the reader re-reads the file.
        let _ = tx.try_send(());
    })
    .and_then(|mut w| {
        w.watch(&watch_dir, notify::RecursiveMode::NonRecursive)?;
        Ok(w)
    });
    let watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, dir = %watch_dir.display(), "state file: notify unavailable, polling only");
            None
        }
    };
    tokio::spawn(async move {
        let _watcher = watcher; // kept alive as long as the task
        let mut last_hash = last_hash;
        let mut last_good = last_good;
        let mut last_stamp = stamp(&file);
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let notified = tokio::select! {
                _ = tick.tick() => false,
                m = rx.recv() => m.is_some(),
            };
            let mut now = stamp(&file);
            if !notified && now == last_stamp {
                continue;
            }
            // Let a writer finish: wait until the file holds still for 50 ms (at most
            // 500 ms), so a file being rewritten in place is not read half-written.
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let later = stamp(&file);
                if later == now {
                    break;
                }
                now = later;
            }
            while rx.try_recv().is_ok() {} // events of the write just waited out
            last_stamp = now;
            let f = file.clone();
            let read = tokio::task::spawn_blocking(move || {
                let bytes = read_capped(&f)?;
                Ok::<_, StateFileError>((fnv1a(&bytes), bytes))
            })
            .await;
            let (hash, bytes) = match read {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => {
                    // A file mid-replace may be briefly missing; only report when it stays so.
                    if stamp(&file).is_none() {
                        tokio::time::sleep(POLL_INTERVAL).await;
                        if stamp(&file).is_some() {
                            continue;
                        }
                    }
                    rejected(&e);
                    continue;
                }
                Err(_) => continue,
            };
            if hash == last_hash {
                continue;
            }
            last_hash = hash;
            let parsed = match String::from_utf8(bytes) {
                Ok(text) => parse_after(&file, &text, Some(&last_good)),
                Err(e) => Err(StateFileError::Parse {
                    file: file.display().to_string(),
                    line: 0,
                    column: 0,
                    message: format!("not UTF-8: {e}"),
                }),
            };
            match parsed {
                Ok(state) => {
                    last_good = state.clone();
                    apply(state);
                }
                Err(e) => rejected(&e),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_carry_line_column_and_field() {
        let text = "services:\n  - namespace: demo\n    name: web\n    prots: []\n";
        let e = parse(Path::new("s.yaml"), text).unwrap_err();
        let line = e.to_string();
        assert!(line.starts_with("s.yaml:4:"), "{line}");
        assert!(line.contains("prots"), "{line}");
        assert!(line.contains("services[0]"), "{line}");
    }

    #[test]
    fn empty_files_are_rejected_and_json_style_enums_accepted() {
        assert!(parse(Path::new("s.yaml"), " \n").is_err());
        assert!(
            parse(Path::new("s.yaml"), "services: []")
                .unwrap()
                .services
                .is_empty()
        );
        // Both the YAML tag and the JSON map form of an enum.
        for path in ["!prefix /api", "{prefix: /api}"] {
            let text = format!(
                "services:\n- {{namespace: a, name: b, use_services: [{{service: c, routes: [{{name: r, match: {{path: {path}}}}}]}}]}}\n- {{namespace: a, name: c, ports: [{{port: 1}}]}}\n"
            );
            parse(Path::new("s.yaml"), &text).unwrap_or_else(|e| panic!("{path}: {e}"));
        }
        // With the map form, an unknown field elsewhere is still named.
        let text = "services:\n- {namespace: a, name: b, colour: x, use_services: [{service: c, routes: [{name: r, match: {path: {prefix: /a}}}]}]}\n";
        let e = parse(Path::new("s.yaml"), text).unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let text = "services:
  - namespace: demo
    name: web
    use_services:
      - service: api
        routes: [{name: r, match: {path: {regex: '('}}}]
      - service: elsewhere
  - namespace: demo
    name: api
    ports: [{port: 80}]
";
        let e = parse(Path::new("s.yaml"), text).unwrap_err();
        let line = e.to_string();
        assert!(
            line.contains("services[0].use_services[0].routes[0].match.path.regex"),
            "{line}"
        );
        // An undefined dependency alone is not an error.
        assert!(!line.contains("elsewhere"), "{line}");
        let bad_dns =
            "dns: {upstreams: ['not an address']}\nservices: [{namespace: demo, name: web}]";
        let e = parse(Path::new("s.yaml"), bad_dns).unwrap_err();
        assert!(e.to_string().contains("dns.upstreams[0]"), "{e}");
        let bad_name = "services: [{namespace: Demo, name: web}]";
        let e = parse(Path::new("s.yaml"), bad_name).unwrap_err();
        assert!(e.to_string().contains("services[0].namespace"), "{e}");
    }

    #[test]
    fn validation_after_a_good_state_still_catches_what_changed() {
        let good = "services:
- {namespace: a, name: web, use_services: [{service: api}]}
- {namespace: a, name: api, ports: [{port: 80}]}
- {namespace: a, name: other, ports: [{port: 81}]}
";
        let previous = parse(Path::new("s.yaml"), good).unwrap();
        let bad = good.replace(
            "[{service: api}]",
            "[{service: api, routes: [{name: r, match: {path: {regex: '('}}}]}]",
        );
        let e = parse_after(Path::new("s.yaml"), &bad, Some(&previous)).unwrap_err();
        assert!(
            e.to_string()
                .contains("services[0].use_services[0].routes[0]"),
            "{e}"
        );
        let fine = good.replace("port: 81", "port: 82");
        parse_after(Path::new("s.yaml"), &fine, Some(&previous)).unwrap();
    }

    #[test]
    fn every_example_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let (state, _) = load(&path).unwrap_or_else(|e| panic!("{e}"));
                assert!(!state.services.is_empty(), "{}", path.display());
                n += 1;
            }
        }
        assert!(n >= 2, "expected at least two examples, found {n}");
    }
}
