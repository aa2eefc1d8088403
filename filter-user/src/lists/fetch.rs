//! Getting a list's bytes from its source: a file, or a URL with a
//! conditional GET (`If-None-Match` / `If-Modified-Since`), so that a fleet
//! of boxes polling one server costs it a 304 when nothing changed.

use std::{path::Path, time::Duration};

use sha2::{Digest as _, Sha256};

use super::Version;

/// Largest list body accepted (2M names in a hosts file are ~60 MB).
pub const MAX_BODY: u64 = 1 << 30;
/// Time allowed for a whole download.
pub const TIMEOUT: Duration = Duration::from_secs(300);
/// How long a list server may take (`run --fetch-connect-timeout`,
/// `--fetch-idle-timeout`, where the defaults are).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// To accept the connection.
    pub connect: Duration,
    /// Silent (no byte of the answer or the body) before the download is
    /// given up: a server that accepts and never answers costs this, not
    /// the whole download's `TIMEOUT`.
    pub idle: Duration,
}

pub fn is_url(source: &str) -> bool {
    source.starts_with("http://") || source.starts_with("https://")
}

#[derive(Debug)]
pub enum Fetched {
    /// The server says the copy we have is current (HTTP 304).
    NotModified,
    Body {
        bytes: Vec<u8>,
        etag: Option<String>,
        last_modified: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}: {1}")]
    File(String, std::io::Error),
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
    #[error("{from}: SHA-256 is {got}, expected {want}; the download was refused")]
    Hash { from: String, got: String, want: String },
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads `source`. `current` is the version in force: its validators make
/// the request conditional.
pub fn fetch(source: &str, current: Option<&Version>, timeouts: Timeouts) -> Result<Fetched, FetchError> {
    if !is_url(source) {
        let bytes = std::fs::read(Path::new(source)).map_err(|e| FetchError::File(source.to_string(), e))?;
        return Ok(Fetched::Body { bytes, etag: None, last_modified: None });
    }
    let http = |reason: String| FetchError::Http { url: source.to_string(), reason };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(TIMEOUT))
        .timeout_connect(Some(timeouts.connect))
        .timeout_per_read(Some(timeouts.idle))
        .timeout_per_write(Some(timeouts.idle))
        .http_status_as_error(false)
        .user_agent(concat!("blokir/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let mut request = agent.get(source);
    if let Some(v) = current {
        if let Some(etag) = &v.etag {
            request = request.header("If-None-Match", etag);
        }
        if let Some(lm) = &v.last_modified {
            request = request.header("If-Modified-Since", lm);
        }
    }
    let mut response = request.call().map_err(|e| http(e.to_string()))?;
    let status = response.status();
    if status == 304 {
        return Ok(Fetched::NotModified);
    }
    if status != 200 {
        return Err(http(format!("HTTP {status}")));
    }
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (etag, last_modified) = (header("etag"), header("last-modified"));
    let bytes = response.body_mut().with_config().limit(MAX_BODY).read_to_vec().map_err(|e| http(format!("reading the body: {e}")))?;
    Ok(Fetched::Body { bytes, etag, last_modified })
}

/// Refuses `bytes` unless they have the SHA-256 `want` (if any).
pub fn check_hash(source: &str, bytes: &[u8], want: Option<&str>) -> Result<String, FetchError> {
    let got = sha256_hex(bytes);
    match want {
        Some(w) if !w.eq_ignore_ascii_case(&got) => Err(FetchError::Hash { from: source.to_string(), got, want: w.to_ascii_lowercase() }),
        _ => Ok(got),
    }
}
