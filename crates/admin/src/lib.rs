//! The admin socket protocol: one request, one response, each a line of JSON, over the daemon's
//! Unix socket. `syncctl` is its client; `syncd` serves it. `syncctl status --json` prints
//! [`Status`] as it is, so its field names are a stable interface (documented in the README).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where `syncctl` looks for the socket when neither `--socket` nor `SYNCD_SOCKET` says.
pub const DEFAULT_SOCKET: &str = "/run/syncd/admin.sock";
/// Longest request line the daemon reads.
pub const MAX_REQUEST: usize = 64 * 1024;

/// What an operator asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// The node's status (on the manager: every node).
    Status,
    /// Pause: on an agent, that agent; on the manager, agent `node`, or publication (hold) when
    /// `node` is absent.
    Pause {
        /// The agent to pause, from the manager.
        node: Option<String>,
        /// A time limit, in seconds.
        for_secs: Option<u64>,
    },
    /// Resume what `Pause` paused.
    Resume {
        /// The agent to resume, from the manager.
        node: Option<String>,
    },
    /// Wait until agents applied a generation.
    Wait {
        /// The generation (the manager's latest if absent).
        generation: Option<u64>,
        /// How long to wait, in seconds.
        timeout_secs: f64,
        /// Count offline and paused agents too.
        all: bool,
    },
    /// What changed locally on an agent since syncd last applied (while paused, say): on an
    /// agent, its own; on the manager, agent `node`'s as it last reported them.
    Changes {
        /// The agent, on the manager.
        #[serde(default)]
        node: Option<String>,
    },
    /// On the manager: publish what the delete guard holds back (in `folder`, or everywhere).
    Confirm {
        /// The folder.
        folder: Option<String>,
    },
    /// On an agent: the backups of local changes it made.
    Backups,
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    /// The status.
    Status(Status),
    /// Done; `message` says what was done.
    Done {
        /// What happened, for the operator.
        message: String,
        /// The generation published, for a resume of a hold.
        generation: Option<u64>,
        /// Local changes found (and backed up), for a resume on an agent.
        changes: Vec<LocalChange>,
        /// Where they were backed up.
        backup: Option<String>,
    },
    /// How a wait ended.
    Wait(WaitReport),
    /// Local changes on an agent.
    Changes {
        /// The changes.
        changes: Vec<LocalChange>,
        /// Where they come from, when the manager answers for an agent.
        #[serde(default)]
        note: Option<String>,
    },
    /// Backups on an agent, oldest first.
    Backups {
        /// The backups.
        backups: Vec<BackupView>,
    },
    /// The request failed.
    Error {
        /// What kind of failure.
        kind: ErrorKind,
        /// What went wrong, for the operator.
        message: String,
    },
}

/// Kinds of failure, each with its own `syncctl` exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The caller may not use the socket.
    PermissionDenied,
    /// No such node in the config.
    UnknownNode,
    /// The request does not apply to this daemon's role (e.g. `pause NODE` on an agent).
    WrongRole,
    /// Malformed request.
    BadRequest,
    /// The daemon could not do it.
    Failed,
}

/// `syncctl status --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// `manager` or `agent`.
    pub role: String,
    /// This node's name.
    pub node: String,
    /// Manager: its latest generation. Agent: the generation it applied.
    pub generation: u64,
    /// Manager: publication held since/until, if it is.
    pub hold: Option<HoldView>,
    /// Manager, holding: what the next generation would change (at most 1000 listed).
    pub pending: Vec<PendingView>,
    /// Manager, holding: how many changes are pending.
    pub pending_total: usize,
    /// Manager: files not published yet because they are not complete.
    pub held_files: Vec<HeldView>,
    /// Manager: entries in its folders that are not synced (at most 100 listed).
    #[serde(default)]
    pub skipped: Vec<SkippedView>,
    /// Manager: how many entries are not synced in all.
    #[serde(default)]
    pub skipped_total: usize,
    /// Manager: folders whose next generation the delete guard holds back.
    pub guarded: Vec<GuardView>,
    /// One row per node: every agent on the manager; the agent itself on an agent.
    pub nodes: Vec<NodeView>,
}

/// A folder held back by the delete guard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardView {
    /// Folder name.
    pub folder: String,
    /// Why (`would delete 76 of 76 files`, `the folder root is gone or unreadable`).
    pub reason: String,
    /// Since when, in seconds since the Unix epoch.
    pub since: u64,
}

/// A hold of publication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldView {
    /// Since when, in seconds since the Unix epoch.
    pub since: u64,
    /// Until when, if limited.
    pub until: Option<u64>,
}

/// A pending change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingView {
    /// Folder name.
    pub folder: String,
    /// Path in it.
    pub path: String,
    /// `added`, `modified` or `removed`.
    pub change: String,
}

/// An entry that is not synced: something syncd cannot carry (a socket, FIFO or device, a link
/// out of its folder, a name that is not UTF-8) or cannot read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedView {
    /// Folder name.
    pub folder: String,
    /// Path in it.
    pub path: String,
    /// Why.
    pub reason: String,
}

/// A file held back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldView {
    /// Folder name.
    pub folder: String,
    /// Path in it.
    pub path: String,
    /// Why.
    pub reason: String,
    /// Since when, in seconds since the Unix epoch.
    pub since: u64,
}

/// One node's row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// Its name.
    pub name: String,
    /// Its address (on an agent: the manager's).
    pub address: Option<String>,
    /// `in sync`, `syncing`, `paused`, `held` (up to date, but the manager holds changes back),
    /// `offline` or `error`.
    pub state: String,
    /// Whether it is connected (an agent: to its manager) right now.
    pub connected: bool,
    /// The generation it applied.
    pub applied: u64,
    /// Generations behind the manager's latest.
    pub behind_generations: u64,
    /// Bytes of files that differ from the manager's (an upper bound of what will cross).
    pub behind_bytes: u64,
    /// When it was last heard from, in seconds since the Unix epoch.
    pub last_seen: Option<u64>,
    /// Its last error.
    pub last_error: Option<String>,
    /// If paused: until when (seconds since the Unix epoch), or null for no limit.
    pub paused_until: Option<u64>,
    /// If paused: who paused it (`agent` or `manager`).
    pub paused_by: Option<String>,
    /// Chunk bytes that crossed the network to it since its daemon (the manager's, in the
    /// manager's view; its own, in an agent's view) started.
    pub bytes_transferred: u64,
    /// Agent's view only: chunk bytes it found in files it already held instead.
    pub bytes_reused: u64,
    /// Local changes left in place on it (reported, flapping, or waiting to be reverted).
    pub drift: Vec<DriftView>,
    /// Manager's view only: the node has more local changes than `drift` lists (an agent
    /// reports its first 1,000); `syncctl changes` on the node lists them all.
    #[serde(default)]
    pub drift_cut: bool,
    /// Local changes it reverted since its daemon started.
    pub drift_reverted: u64,
    /// Manager's view only: the most bytes per second the manager sends it, if capped
    /// (`max_rate` in the manager's config).
    #[serde(default)]
    pub max_rate: Option<u64>,
    /// Folders the manager publishes that this node does not sync (not in its config).
    #[serde(default)]
    pub folders_not_taken: Vec<String>,
    /// Folders in this node's config that the manager does not publish (not synced).
    #[serde(default)]
    pub folders_not_published: Vec<String>,
}

/// A local change on an agent, left in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftView {
    /// Folder name.
    pub folder: String,
    /// Path in it.
    pub path: String,
    /// `added`, `modified` or `removed`.
    pub change: String,
    /// Why it is left: `reported` (policy), `flapping` (keeps changing back), `waiting` (for
    /// the manager, to be reverted).
    pub action: String,
}

/// A backup of local changes on an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupView {
    /// Directory name under `<state_dir>/backups` (`drift-`, `resume-` or `start-` and a time).
    pub name: String,
    /// Bytes it holds.
    pub bytes: u64,
    /// One line per change: `kind<TAB>folder/path`.
    pub changes: Vec<String>,
}

/// How a wait ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitReport {
    /// The generation waited for.
    pub generation: u64,
    /// Whether every agent that counted applied it.
    pub reached: bool,
    /// Agents that had not.
    pub laggards: Vec<Laggard>,
}

/// An agent that had not applied the generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Laggard {
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: String,
    /// The generation it applied.
    pub applied: u64,
    /// Whether it counted.
    pub counted: bool,
    /// Its last error.
    pub last_error: Option<String>,
}

/// A local change on an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalChange {
    /// Folder name.
    pub folder: String,
    /// Path in it.
    pub path: String,
    /// `added`, `modified` or `removed`.
    pub change: String,
    /// In the manager's answer: what the agent does with it (`paused`: listed until resumed;
    /// `reported`, `flapping`, `waiting`: left in place).
    #[serde(default)]
    pub action: Option<String>,
}

/// Why the client could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to {path}: {source} (is syncd running? see --socket / SYNCD_SOCKET)")]
    Connect {
        /// The socket path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("admin socket: {0}")]
    Io(#[from] std::io::Error),
    /// The answer did not parse.
    #[error("unreadable answer from syncd: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Sends `request` to the daemon at `socket` and returns its answer. `timeout` bounds the wait
/// (a `wait` request needs more than its own timeout).
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    // A daemon that refuses the caller may answer and close before reading: its answer still
    // says why, so a failed write is not the end.
    let written = stream.write_all(line.as_bytes());
    let mut answer = String::new();
    let read = BufReader::new(stream).read_line(&mut answer);
    if answer.is_empty() {
        written?;
        read?;
        return Err(ClientError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the daemon closed the connection without answering",
        )));
    }
    Ok(serde_json::from_str(&answer)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_json_form() {
        let r = Request::Pause {
            node: Some("worker-2".into()),
            for_secs: Some(7200),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"cmd":"pause","node":"worker-2","for_secs":7200}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"cmd":"status"}"#
        );
        let back: Request = serde_json::from_str(
            r#"{"cmd":"wait","generation":null,"timeout_secs":60.0,"all":false}"#,
        )
        .unwrap();
        assert!(matches!(back, Request::Wait { timeout_secs, .. } if timeout_secs == 60.0));
    }

    #[test]
    fn errors_name_their_kind() {
        let e = Response::Error {
            kind: ErrorKind::UnknownNode,
            message: "no agent named \"x\"".into(),
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"result":"error","kind":"unknown-node","message":"no agent named \"x\""}"#
        );
    }
}
