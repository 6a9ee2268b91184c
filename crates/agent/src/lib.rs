//! The agent role: keeps this node's folders equal to what the manager publishes.
//!
//! It connects to the configured manager (and only to it), reports what it holds, receives each
//! generation's changes, and applies them through [`apply`]: stage and verify everything, make it
//! durable, rename into place, delete last, record the generation.

mod apply;
mod chunks;
mod drift;
mod folder;
mod journal;
mod pause;
mod session;
mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use syncd_fsops::FolderSpec;
use syncd_manifest::{ChunkParams, Chunker};
use syncd_proto::Generation;
use syncd_transport::{Identity, NodeId};
use tokio::sync::{mpsc, oneshot, watch};

pub use apply::ApplyError;
pub use folder::FolderError;
pub use pause::{LocalChange, ResumeReport, in_force};
pub use syncd_proto::Pause;

use crate::folder::Folder;
use crate::journal::Journal;
use crate::state::AgentState;

/// What the agent needs to run, already validated.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's name; must match the manager's entry for this node's ID.
    pub node_name: String,
    /// Where identity and state live.
    pub state_dir: PathBuf,
    /// The manager's QUIC address.
    pub manager_addr: SocketAddr,
    /// The only manager identity accepted.
    pub manager_id: NodeId,
    /// The folders kept in sync.
    pub folders: Vec<FolderSpec>,
    /// Backups of local changes kept at most (oldest removed first).
    pub max_backups: usize,
    /// Bytes of backups kept at most (oldest removed first).
    pub max_backup_bytes: u64,
}

impl AgentConfig {
    /// Default limits of the backups of local changes: 100 backups, 1 GiB.
    pub const DEFAULT_MAX_BACKUPS: usize = 100;
    /// See [`AgentConfig::DEFAULT_MAX_BACKUPS`].
    pub const DEFAULT_MAX_BACKUP_BYTES: u64 = 1 << 30;
}

/// Upper bounds (seconds) of the apply-time histogram's buckets.
pub const APPLY_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

/// A histogram of apply times, for the metrics endpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Observations per bucket (not cumulative), bounds in [`APPLY_BUCKETS`].
    pub buckets: [u64; APPLY_BUCKETS.len()],
    /// Observations in all.
    pub count: u64,
    /// Sum of the observations, in seconds.
    pub sum: f64,
}

impl Histogram {
    /// Records one observation in seconds.
    pub fn observe(&mut self, secs: f64) {
        if let Some(i) = APPLY_BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += secs;
    }
}

/// What the agent is doing, for status displays and tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentStatus {
    /// Last generation applied completely.
    pub applied: Generation,
    /// Whether a session with the manager is up.
    pub connected: bool,
    /// The last error (connection or apply), cleared by the next success.
    pub last_error: Option<String>,
    /// Chunk bytes received from the manager since start (as of the last apply; the live count
    /// is [`AgentHandle::bytes_received`]).
    pub bytes_fetched: u64,
    /// Of `bytes_fetched`, those that came inside updates (small files' chunks the manager
    /// pushed, so that no fetch was needed).
    pub bytes_pushed: u64,
    /// Chunk bytes copied from files already on this node since start.
    pub bytes_reused: u64,
    /// Files written (renamed into place) since start.
    pub files_written: u64,
    /// The pause in force, if any.
    pub paused: Option<Pause>,
    /// Whether a generation is being applied right now.
    pub syncing: bool,
    /// When the last generation was applied.
    pub last_applied: Option<std::time::SystemTime>,
    /// Local changes left in place (reported, flapping, or waiting for the manager).
    pub drift: Vec<syncd_proto::DriftEntry>,
    /// Local changes reverted since start.
    pub drift_reverted: u64,
    /// How long applying generations took.
    pub apply_seconds: Histogram,
    /// Folders the manager publishes that this node does not sync (not in its config), as the
    /// manager last said.
    pub folders_not_taken: Vec<String>,
    /// Folders in this node's config that the manager does not publish (not synced).
    pub folders_not_published: Vec<String>,
}

/// What an operator asks of a running agent (through [`AgentHandle`]).
#[derive(Debug)]
pub(crate) enum Command {
    Pause {
        until: Option<u64>,
        reply: oneshot::Sender<Result<Pause, String>>,
    },
    Resume {
        reply: oneshot::Sender<Result<ResumeReport, String>>,
    },
    Changes {
        reply: oneshot::Sender<Result<Vec<LocalChange>, String>>,
    },
    Backups {
        reply: oneshot::Sender<Vec<BackupInfo>>,
    },
}

/// One backup of local changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    /// Its directory name under `<state_dir>/backups`.
    pub name: String,
    /// Bytes it holds.
    pub bytes: u64,
    /// Its index: one line per change (`kind<TAB>folder/path`).
    pub changes: Vec<String>,
}

/// Controls a running agent: pause, resume, list local changes, watch its status.
#[derive(Debug, Clone)]
pub struct AgentHandle {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<AgentStatus>,
    received: Arc<AtomicU64>,
}

impl AgentHandle {
    /// Pauses the agent (until `until`, seconds since the Unix epoch, if given). Returns once any
    /// generation being applied has finished: from then on nothing in the folders changes.
    pub async fn pause(&self, until: Option<u64>) -> Result<Pause, String> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Pause { until, reply }).await?;
        rx.await.map_err(|_| "the agent stopped".to_owned())?
    }

    /// Resumes: local changes made meanwhile are backed up, then the folders converge.
    pub async fn resume(&self) -> Result<ResumeReport, String> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Resume { reply }).await?;
        rx.await.map_err(|_| "the agent stopped".to_owned())?
    }

    /// What differs in the folders from what syncd last applied (local edits).
    pub async fn changes(&self) -> Result<Vec<LocalChange>, String> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Changes { reply }).await?;
        rx.await.map_err(|_| "the agent stopped".to_owned())?
    }

    /// The backups of local changes, oldest first.
    pub async fn backups(&self) -> Result<Vec<BackupInfo>, String> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Backups { reply }).await?;
        rx.await.map_err(|_| "the agent stopped".to_owned())
    }

    /// A live view of the agent's status.
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.clone()
    }

    /// Chunk bytes received from the manager since start, counted as they arrive.
    pub fn bytes_received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn send(&self, cmd: Command) -> Result<(), String> {
        self.commands
            .send(cmd)
            .await
            .map_err(|_| "the agent stopped".to_owned())
    }
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A folder could not be opened or scanned.
    #[error(transparent)]
    Folder(#[from] FolderError),
    /// The state could not be saved.
    #[error("cannot write agent state in {dir}: {source}")]
    State {
        /// The state directory.
        dir: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The QUIC endpoint could not be created.
    #[error(transparent)]
    Transport(#[from] syncd_transport::TransportError),
}

/// When a folder is found to differ from what this node applied there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
    /// At start: the agent was not running, or was cut off in the middle of an apply.
    AtStart,
    /// After an apply that failed part-way through its renames.
    AfterFailedApply,
}

/// `folder.local` has just been scanned from disk; `applied` is what this node had applied there.
/// What changed meanwhile is backed up first, so nothing is lost. Changes the apply journal
/// planned are the agent's own unfinished work, not edits: they are taken as they are. Under
/// `revert`, the folder is then taken as it is, and the manager's difference brings it back;
/// under `report`, what was applied (plus the agent's own work) stays the reference, so edits
/// stay reported instead of being undone (or, after a failed apply, taken for applied and later
/// replaced without a backup).
pub(crate) fn adopt_local_changes(
    config: &AgentConfig,
    folder: &mut Folder,
    applied: &syncd_fsops::LocalManifest,
    journal: Option<&Journal>,
    found: Found,
) {
    let (own, changes): (Vec<_>, Vec<_>) =
        syncd_manifest::diff(&applied.manifest, &folder.local.manifest)
            .into_iter()
            .partition(|c| {
                journal.is_some_and(|j| j.planned(&folder.name, applied.manifest.get(c.path()), c))
            });
    if !own.is_empty() {
        tracing::info!(
            folder = %folder.name,
            paths = own.len(),
            "found the work of an apply that was interrupted; the manager will complete it"
        );
    }
    if changes.is_empty() {
        return;
    }
    let (why, when) = match found {
        Found::AtStart => ("start", "made while the agent was not running"),
        Found::AfterFailedApply => ("failed-apply", "beside the failed apply"),
    };
    let root = pause::backup_dir_named(&config.state_dir, why);
    let described = pause::describe_against(&folder.name, &applied.manifest, &changes);
    let kept = pause::back_up(&root, folder, &changes)
        .and_then(|kept| pause::write_index(&root, &described).map(|()| kept));
    match kept {
        Ok(kept) => tracing::warn!(
            folder = %folder.name,
            changes = changes.len(),
            backed_up = kept,
            backup = %root.display(),
            "found local changes {when}; backed up"
        ),
        Err(e) => {
            tracing::error!(folder = %folder.name, error = %e, "cannot back up local changes {when}")
        }
    }
    drift::prune_backups(
        &config.state_dir,
        config.max_backups,
        config.max_backup_bytes,
    );
    if folder.policy == syncd_fsops::DriftPolicy::Report {
        // The edits are undone in the reference: it holds what was applied there.
        let local = Arc::make_mut(&mut folder.local);
        for change in &changes {
            let path = change.path();
            match applied.manifest.get(path) {
                Some(node) => {
                    local.manifest.insert(path.clone(), node.clone());
                }
                None => {
                    local.manifest.remove(path);
                }
            }
            match applied.stats.get(path) {
                Some(key) => {
                    local.stats.insert(path.clone(), *key);
                }
                None => {
                    local.stats.remove(path);
                }
            }
        }
    }
}

/// A prepared agent: folders opened and scanned, ready to connect.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    identity: Arc<Identity>,
    folders: Vec<Folder>,
    state: AgentState,
    store: syncd_fsops::StateFile,
    /// Where each chunk this node holds is, kept across generations.
    chunks: chunks::LocalChunks,
    status: watch::Sender<AgentStatus>,
    commands: mpsc::Receiver<Command>,
    commands_tx: mpsc::Sender<Command>,
    drift: drift::Tracker,
    received: Arc<AtomicU64>,
    /// Whether the last session got as far as joining (resets the reconnection backoff).
    joined: bool,
}

impl Agent {
    /// Opens and scans every folder (creating missing ones), clearing what an interrupted apply
    /// left behind.
    pub fn open(config: AgentConfig, identity: Identity) -> Result<Agent, AgentError> {
        let (mut state, mut store) = AgentState::load(&config.state_dir);
        let chunker =
            Chunker::new(ChunkParams::DEFAULT).expect("default chunk parameters are valid");
        let journal = Journal::load(&config.state_dir);
        let mut folders = Vec::new();
        for spec in &config.folders {
            let previous = state.folders.get(&spec.name);
            let folder_chunker = previous
                .and_then(|p| Chunker::new(p.manifest.params).ok())
                .unwrap_or_else(|| chunker.clone());
            let mut folder = Folder::open(spec, &folder_chunker, previous)?;
            if let Some(previous) = previous
                && previous.manifest.params == folder.local.manifest.params
            {
                adopt_local_changes(
                    &config,
                    &mut folder,
                    previous,
                    journal.as_ref(),
                    Found::AtStart,
                );
            }
            folders.push(folder);
        }
        state.folders = folder::locals(&folders);
        crate::state::save(&mut store, &state).map_err(|source| AgentError::State {
            dir: config.state_dir.clone(),
            source,
        })?;
        // The state now records whatever the journal covered.
        Journal::clear(&config.state_dir).map_err(|source| AgentError::State {
            dir: config.state_dir.clone(),
            source,
        })?;
        let (status, _) = watch::channel(AgentStatus {
            applied: state.applied,
            paused: state.pause.clone(),
            ..AgentStatus::default()
        });
        if let Some(p) = &state.pause {
            tracing::warn!(by = %p.by, until = ?p.until, "starting paused: nothing in the folders will change until `syncctl resume`");
        }
        let (commands_tx, commands) = mpsc::channel(8);
        Ok(Agent {
            config,
            identity: Arc::new(identity),
            folders,
            state,
            store,
            chunks: chunks::LocalChunks::default(),
            status,
            commands,
            commands_tx,
            drift: drift::Tracker::default(),
            received: Arc::new(AtomicU64::new(0)),
            joined: false,
        })
    }

    /// Writes the whole state (the folders as they are now) as a new snapshot.
    fn save_state(&mut self) -> std::io::Result<()> {
        self.state.folders = folder::locals(&self.folders);
        crate::state::save(&mut self.store, &self.state)
    }

    /// A live view of the agent's status.
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.subscribe()
    }

    /// A handle to control the agent once it runs.
    pub fn handle(&self) -> AgentHandle {
        AgentHandle {
            commands: self.commands_tx.clone(),
            status: self.status.subscribe(),
            received: Arc::clone(&self.received),
        }
    }

    /// This agent's name and manager, for status displays.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// Connects to the manager and keeps the folders in sync until `shutdown` becomes true,
    /// reconnecting with backoff whenever the connection is lost.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Result<(), AgentError> {
        session::run(self, shutdown).await
    }
}
