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

/// Problems whose line and column are looked up (each lookup re-reads the file).
const MAX_LOCATED: usize = 10;

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
    #[error("{count} problem(s): {}", join(file, errors))]
    Invalid {
        /// The file.
        file: String,
        /// How many problems.
        count: usize,
        /// Each with its field path and, when found, where it is in the file.
        errors: Vec<Located>,
    },
}

/// A problem with the 1-based line and column of the field it names (0 when not found).
#[derive(Debug, Clone)]
pub struct Located {
    /// Line of the field, 1-based; 0 when unknown.
    pub line: usize,
    /// Column of the field, 1-based; 0 when unknown.
    pub column: usize,
    /// The problem.
    pub error: ValidationError,
}

fn join(file: &str, errors: &[Located]) -> String {
    errors
        .iter()
        .map(|e| {
            if e.line > 0 {
                format!("{file}:{}:{}: {}", e.line, e.column, e.error)
            } else {
                format!("{file}: {}", e.error)
            }
        })
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
    // JSON is YAML too, but serde_json reads it several times faster than a YAML parser:
    // large generated state files (a JSON object) take the fast path, with the same
    // line/column errors.
    if text.trim_start().starts_with('{') {
        let state: ClusterState =
            serde_json::from_str(text).map_err(|e| StateFileError::Parse {
                file: name.clone(),
                line: e.line(),
                column: e.column(),
                message: e.to_string(),
            })?;
        return check_parsed(name, text, state, previous);
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
    check_parsed(name, text, state, previous)
}

fn check_parsed(
    name: String,
    text: &str,
    state: ClusterState,
    previous: Option<&ClusterState>,
) -> Result<ClusterState, StateFileError> {
    let errors = validate_after(previous, &state);
    if errors.is_empty() {
        return Ok(state);
    }
    let errors: Vec<Located> = errors
        .into_iter()
        .enumerate()
        .map(|(i, error)| {
            // Each lookup re-reads the file: locate the first few problems only.
            let (line, column) = if i < MAX_LOCATED {
                locate::find(text, &error.path).unwrap_or((0, 0))
            } else {
                (0, 0)
            };
            Located {
                line,
                column,
                error,
            }
        })
        .collect();
    Err(StateFileError::Invalid {
        file: name,
        count: errors.len(),
        errors,
    })
}

/// Finding where a field path (`services[1].use_services[0].routes[0].match`) is in the
/// file: a serde seed walks the document along the path and fails at the target, and the
/// parser's error carries the position. The longest prefix of the path that exists is
/// located (an error about a map entry such as `variables["X"]` points at the map).
mod locate {
    use std::fmt;

    use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

    #[derive(Debug, PartialEq)]
    enum Seg {
        Key(String),
        Index(usize),
    }

    fn segments(path: &str) -> Vec<Seg> {
        let mut out = Vec::new();
        for part in path.split('.') {
            let (key, mut rest) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if !key.is_empty() {
                out.push(Seg::Key(key.to_owned()));
            }
            while let Some(inner) = rest.strip_prefix('[') {
                let Some(end) = inner.find(']') else {
                    return out;
                };
                match inner[..end].parse() {
                    Ok(i) => out.push(Seg::Index(i)),
                    // `["NAME"]`: a map key; locating the map is close enough.
                    Err(_) => return out,
                }
                rest = &inner[end + 1..];
            }
        }
        out
    }

    /// The marker message of the error raised at the target.
    const HERE: &str = "sidemesh-locate-here";

    struct Walk<'a>(&'a [Seg]);

    impl<'de> DeserializeSeed<'de> for Walk<'_> {
        type Value = ();
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            if self.0.is_empty() {
                // Deserializing any value lets the parser attach the node's position.
                return d.deserialize_any(Stop);
            }
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Walk<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map or a sequence")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key::<String>()? {
                match self.0.first() {
                    Some(Seg::Key(k)) if *k == key => {
                        return map.next_value_seed(Walk(&self.0[1..]));
                    }
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Err(de::Error::custom("not found"))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut i = 0;
            loop {
                if self.0.first() == Some(&Seg::Index(i)) {
                    return seq
                        .next_element_seed(Walk(&self.0[1..]))?
                        .ok_or_else(|| de::Error::custom("not found"));
                }
                if seq.next_element::<IgnoredAny>()?.is_none() {
                    return Err(de::Error::custom("not found"));
                }
                i += 1;
            }
        }
    }

    struct Stop;

    impl<'de> Visitor<'de> for Stop {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(HERE)
        }
        fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
            Err(de::Error::custom(HERE))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
            Err(de::Error::custom(HERE))
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
            Err(E::custom(HERE))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
            Err(E::custom(HERE))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
            Err(E::custom(HERE))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
            Err(E::custom(HERE))
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
            Err(E::custom(HERE))
        }
        fn visit_unit<E: de::Error>(self) -> Result<(), E> {
            Err(E::custom(HERE))
        }
    }

    /// The 1-based (line, column) of the value at `path`, or of its longest existing
    /// prefix; `None` when not even the first segment is found.
    pub fn find(text: &str, path: &str) -> Option<(usize, usize)> {
        let segs = segments(path);
        let json = text.trim_start().starts_with('{');
        for len in (1..=segs.len()).rev() {
            let walk = Walk(&segs[..len]);
            let at = if json {
                let mut d = serde_json::Deserializer::from_str(text);
                match walk.deserialize(&mut d) {
                    Err(e) if e.to_string().contains(HERE) => Some((e.line(), e.column())),
                    _ => None,
                }
            } else {
                let d = serde_norway::Deserializer::from_str(text);
                match walk.deserialize(d) {
                    Err(e) if e.to_string().contains(HERE) => {
                        e.location().map(|l| (l.line(), l.column()))
                    }
                    _ => None,
                }
            };
            if at.is_some() {
                return at;
            }
        }
        None
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn paths_split_into_segments() {
            assert_eq!(
                segments("services[1].use_services[0].routes"),
                [
                    Seg::Key("services".into()),
                    Seg::Index(1),
                    Seg::Key("use_services".into()),
                    Seg::Index(0),
                    Seg::Key("routes".into())
                ]
            );
            assert_eq!(
                segments("plugins[0].variables[\"1X\"]"),
                [
                    Seg::Key("plugins".into()),
                    Seg::Index(0),
                    Seg::Key("variables".into())
                ]
            );
        }

        #[test]
        fn finds_fields_in_yaml_and_json() {
            let yaml = "services:\n  - namespace: a\n    name: b\n  - namespace: c\n    name: d\n    ports:\n      - port: 0\n";
            assert_eq!(
                find(yaml, "services[1].ports[0].port").map(|p| p.0),
                Some(7)
            );
            assert_eq!(find(yaml, "services[1].name").map(|p| p.0), Some(5));
            // A missing tail: the longest prefix that exists.
            assert_eq!(find(yaml, "services[1].nothing").map(|p| p.0), Some(4));
            let json = "{\"services\": [\n {\"namespace\": \"a\"},\n {\"namespace\": \"c\"}]}";
            assert_eq!(find(json, "services[1].namespace").map(|p| p.0), Some(3));
            assert_eq!(find(yaml, "nowhere"), None);
        }
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
        tls: None,
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
    last_good: std::sync::Arc<ClusterState>,
    apply: impl Fn(std::sync::Arc<ClusterState>) + Send + Sync + 'static,
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
    let reloader = Reloader::start();
    tokio::spawn(async move {
        let _watcher = watcher; // kept alive as long as the task
        let apply = std::sync::Arc::new(apply);
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
            let read = reloader
                .run(move || {
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
            // Parsing a large file and re-rendering take a while: keep them off the
            // async workers. The last good state moves in and comes back out.
            let f = file.clone();
            let apply = apply.clone();
            let previous = std::mem::take(&mut last_good);
            let outcome = reloader.run(move || {
                let parsed = match String::from_utf8(bytes) {
                    Ok(text) => parse_after(&f, &text, Some(&previous)),
                    Err(e) => Err(StateFileError::Parse {
                        file: f.display().to_string(),
                        line: 0,
                        column: 0,
                        message: format!("not UTF-8: {e}"),
                    }),
                };
                match parsed {
                    Ok(state) => {
                        let state = std::sync::Arc::new(state);
                        apply(state.clone());
                        (state, None)
                    }
                    Err(e) => (previous, Some(e)),
                }
            });
            let outcome = outcome.await;
            match outcome {
                Ok((good, error)) => {
                    last_good = good;
                    if let Some(e) = error {
                        rejected(&e);
                    }
                }
                Err(ReloadFailed) => {
                    // Only a panic gets here; the next edit is validated in full.
                    tracing::error!("state file reload task failed");
                }
            }
        }
    })
}

/// One long-lived thread that reads, parses and applies state file reloads.
///
/// Reloading a large state allocates and frees hundreds of MiB. On the tokio blocking pool
/// each reload may land on a different thread, and glibc gives each thread its own malloc
/// arena that keeps freed memory, so RSS grew with every reload (measured: ~95 MiB per
/// reload of a 6.8 MiB file; see docs/benchmarks.md). One thread means one arena reused.
struct Reloader {
    jobs: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

/// The reload thread is gone or the job panicked.
#[derive(Debug)]
struct ReloadFailed;

impl Reloader {
    fn start() -> Reloader {
        let (jobs, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let spawned = std::thread::Builder::new()
            .name("state-reload".to_owned())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            });
        if let Err(e) = spawned {
            // Jobs then fail with ReloadFailed and are reported; the last good state stays.
            tracing::error!(error = %e, "cannot start the state file reload thread");
        }
        Reloader { jobs }
    }

    /// Runs `f` on the reload thread; a panic in `f` is caught and reported as an error.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ReloadFailed> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = Box::new(move || {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            if let Ok(out) = out {
                let _ = tx.send(out);
            }
        });
        self.jobs.send(job).map_err(|_| ReloadFailed)?;
        rx.await.map_err(|_| ReloadFailed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reloads_run_on_one_thread_and_survive_a_panic() {
        let r = Reloader::start();
        let first = r.run(|| std::thread::current().id()).await.unwrap();
        assert_ne!(first, std::thread::current().id());
        assert!(r.run(|| -> u8 { panic!("boom") }).await.is_err());
        let again = r.run(|| std::thread::current().id()).await.unwrap();
        assert_eq!(first, again, "every reload runs on the same thread");
    }

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
    fn json_state_files_take_the_fast_path_with_positions() {
        let ok = r#"{"services": [{"namespace": "a", "name": "b", "ports": [{"port": 80}]}]}"#;
        assert_eq!(parse(Path::new("s.json"), ok).unwrap().services.len(), 1);
        let bad = "{\"services\": [\n  {\"namespace\": \"a\", \"nme\": \"b\"}]}";
        let e = parse(Path::new("s.json"), bad).unwrap_err().to_string();
        assert!(e.starts_with("s.json:2:"), "{e}");
        assert!(e.contains("nme"), "{e}");
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
            line.contains("s.yaml:6:"),
            "the line of the bad regex: {line}"
        );
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
