//! The `Authorization` header a client sends to discover: a fixed value, or a bearer token
//! read from a file and read again whenever the file changes.
//!
//! Tokens that live in files are usually rotated by something else: a Kubernetes Secret
//! volume or projected service-account token (the kubelet rewrites it before it expires), a
//! Vault agent, a cron job. So a [`TokenFile`] looks at the file's metadata before each
//! request and reads it again when its modification time, size or inode changed. A rewrite
//! that leaves the file unusable (empty, several words, too large, unreadable) is logged
//! once and the last good token stays in use: a half-written file never turns a working
//! sidecar into one that discover refuses.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use hyper::header::HeaderValue;

/// The largest token file read, in bytes.
pub const MAX_TOKEN_FILE_BYTES: u64 = 16 * 1024;

/// Why a token file cannot be used. The message names the file, never the token.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file cannot be opened or read.
    #[error("cannot read the discover token file {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// The file is larger than [`MAX_TOKEN_FILE_BYTES`].
    #[error(
        "the discover token file {0} is larger than {MAX_TOKEN_FILE_BYTES} bytes; it must hold one token"
    )]
    TooLarge(String),
    /// The file does not hold exactly one token of visible ASCII.
    #[error("the discover token file {0} must hold one token: visible ASCII, no spaces")]
    NotAToken(String),
}

/// What identifies one version of the file without reading it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: meta.ino(),
        }
    }
}

struct Held {
    /// The version last read, good or not (a bad version is reported once).
    seen: Stamp,
    /// `Bearer <token>` from the last good version.
    value: HeaderValue,
}

/// A bearer token kept in a file, read again when the file changes.
pub struct TokenFile {
    path: PathBuf,
    held: Mutex<Held>,
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl TokenFile {
    /// Reads the token now: an unusable file is an error here, at start.
    pub fn open(path: &Path) -> Result<TokenFile, TokenFileError> {
        let (seen, value) = read(path)?;
        Ok(TokenFile {
            path: path.to_owned(),
            held: Mutex::new(Held { seen, value }),
        })
    }

    /// `Bearer <token>` from the file as it is now, or from its last good version.
    pub fn value(&self) -> HeaderValue {
        let mut held = match self.held.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        };
        // A file that cannot even be looked at keeps the last token; reading it would fail
        // the same way, and the warning comes once its version changes.
        let Ok(meta) = std::fs::metadata(&self.path) else {
            return held.value.clone();
        };
        if Stamp::of(&meta) == held.seen {
            return held.value.clone();
        }
        match read(&self.path) {
            Ok((seen, value)) => {
                tracing::info!(path = %self.path.display(), "read the new discover token");
                *held = Held { seen, value };
            }
            Err(error) => {
                tracing::warn!(%error, "keeping the previous discover token");
                held.seen = Stamp::of(&meta);
            }
        }
        held.value.clone()
    }
}

/// Reads and checks the file: its version and `Bearer <token>`.
fn read(path: &Path) -> Result<(Stamp, HeaderValue), TokenFileError> {
    let shown = || path.display().to_string();
    let io = |e: std::io::Error| TokenFileError::Read {
        path: shown(),
        reason: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let seen = Stamp::of(&file.metadata().map_err(io)?);
    let mut text = String::new();
    file.take(MAX_TOKEN_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    if text.len() as u64 > MAX_TOKEN_FILE_BYTES {
        return Err(TokenFileError::TooLarge(shown()));
    }
    let token = text.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenFileError::NotAToken(shown()));
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| TokenFileError::NotAToken(shown()))?;
    value.set_sensitive(true);
    Ok((seen, value))
}

/// Where a request's `Authorization` comes from. Cheap to clone.
#[derive(Clone, Default)]
pub(crate) enum Credential {
    /// None is sent.
    #[default]
    None,
    /// A fixed value.
    Fixed(HeaderValue),
    /// `Bearer <token>` from a file, read again when it changes.
    File(Arc<TokenFile>),
}

impl Credential {
    /// The header value for the next request.
    pub(crate) fn header(&self) -> Option<HeaderValue> {
        match self {
            Credential::None => None,
            Credential::Fixed(v) => Some(v.clone()),
            Credential::File(f) => Some(f.value()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(f: &TokenFile) -> String {
        f.value().to_str().unwrap().to_owned()
    }

    #[test]
    fn a_rewritten_file_gives_the_new_token_and_a_bad_rewrite_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first-token\n").unwrap();
        let f = TokenFile::open(&path).unwrap();
        assert_eq!(bearer(&f), "Bearer first-token");
        assert!(f.value().is_sensitive());

        // Replaced the way the kubelet and most agents do it: a new file renamed over.
        let next = dir.path().join("token.new");
        std::fs::write(&next, "second-token").unwrap();
        std::fs::rename(&next, &path).unwrap();
        assert_eq!(bearer(&f), "Bearer second-token");

        // Unusable versions keep the last good token: half-written, two words, gone.
        for bad in ["", "two words\n"] {
            std::fs::write(&next, bad).unwrap();
            std::fs::rename(&next, &path).unwrap();
            assert_eq!(bearer(&f), "Bearer second-token", "after {bad:?}");
        }
        std::fs::remove_file(&path).unwrap();
        assert_eq!(bearer(&f), "Bearer second-token");

        // And a good one afterwards is taken.
        std::fs::write(&path, "third-token").unwrap();
        assert_eq!(bearer(&f), "Bearer third-token");
    }

    #[test]
    fn an_unusable_file_is_refused_at_start_without_echoing_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        for bad in ["\n", "two words\n"] {
            std::fs::write(&path, bad).unwrap();
            let e = TokenFile::open(&path).unwrap_err().to_string();
            assert!(e.contains("one token") && !e.contains("two"), "{e}");
        }
        std::fs::write(&path, "x".repeat(MAX_TOKEN_FILE_BYTES as usize + 1)).unwrap();
        let e = TokenFile::open(&path).unwrap_err().to_string();
        assert!(e.contains("larger than"), "{e}");
        let e = TokenFile::open(&dir.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
    }
}
