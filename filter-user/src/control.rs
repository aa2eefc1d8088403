//! The control socket: one JSON request line in, one JSON response line out.
//! The socket is root-only (mode 0600 in a 0700 directory).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::{
    lists::ListDef,
    policy::{ListSettings, Setting},
};

pub const DEFAULT_SOCKET: &str = "/run/blokir/blokir.sock";
/// Longest request line accepted.
pub const MAX_REQUEST: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Adds rules (`[block|allow] PATTERN`) to the local list.
    Add {
        rules: Vec<String>,
    },
    /// Removes rules from the local list.
    Del {
        rules: Vec<String>,
    },
    List,
    Check {
        names: Vec<String>,
    },
    /// Re-reads every rule file; `force`: even those that take away more of
    /// their list than `--max-shrink` allows.
    Reload {
        #[serde(default)]
        force: bool,
    },
    Status,
    /// Adds a named list: fetched, parsed and in force, or refused.
    ListsAdd {
        def: ListDef,
    },
    ListsLs,
    ListsRm {
        name: String,
    },
    /// Fetches a named list's source again (conditionally for URLs).
    ListsUpdate {
        name: String,
        /// Even if it takes away more of the list than `--max-shrink` allows.
        #[serde(default)]
        force: bool,
    },
    /// Puts the previous kept version (or version `to`) back in force.
    ListsRollback {
        name: String,
        #[serde(default)]
        to: Option<u64>,
    },
    /// Changes a named list's own settings (those given in `change`; those
    /// in `clear` go back to `run`'s flags), in force at once, without
    /// fetching its source.
    ListsSet {
        name: String,
        change: ListSettings,
        #[serde(default)]
        clear: Vec<Setting>,
    },
}

impl Request {
    /// Whether it may change the rules, the lists or their status.
    pub fn changes(&self) -> bool {
        match self {
            Request::List | Request::Check { .. } | Request::Status | Request::ListsLs => false,
            Request::Add { .. }
            | Request::Del { .. }
            | Request::Reload { .. }
            | Request::ListsAdd { .. }
            | Request::ListsRm { .. }
            | Request::ListsUpdate { .. }
            | Request::ListsRollback { .. }
            | Request::ListsSet { .. } => true,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// For people: what happened, or why not.
    pub message: String,
    /// For scripts.
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(message: impl Into<String>, data: serde_json::Value) -> Self {
        Response { ok: true, message: message.into(), data }
    }
    pub fn error(message: impl Into<String>) -> Self {
        Response { ok: false, message: message.into(), data: serde_json::Value::Null }
    }
}

/// Sends one request to the daemon listening on `socket`.
pub fn call(socket: &Path, request: &Request) -> anyhow::Result<Response> {
    let mut stream = UnixStream::connect(socket).with_context(|| format!("connecting to the daemon at {} (is `blokir run` running?)", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).context("reading the daemon's reply")?;
    serde_json::from_str(&reply).with_context(|| format!("the daemon's reply is not valid: {reply:?}"))
}
