//! The agent role: keeps this node's folders equal to what the manager publishes.
//!
//! It connects to the configured manager (and only to it), reports what it holds, receives each
//! generation's changes, and applies them through [`apply`]: stage and verify everything, make it
//! durable, rename into place, delete last, record the generation.

mod apply;
mod folder;
mod pause;
mod session;
mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

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
}

/// What the agent is doing, for status displays and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentStatus {
    /// Last generation applied completely.
    pub applied: Generation,
    /// Whether a session with the manager is up.
    pub connected: bool,
    /// The last error (connection or apply), cleared by the next success.
    pub last_error: Option<String>,
    /// Chunk bytes received from the manager since start.
    pub bytes_fetched: u64,
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
}

/// Controls a running agent: pause, resume, list local changes, watch its status.
#[derive(Debug, Clone)]
pub struct AgentHandle {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<AgentStatus>,
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

    /// A live view of the agent's status.
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.clone()
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

/// A prepared agent: folders opened and scanned, ready to connect.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    identity: Arc<Identity>,
    folders: Vec<Folder>,
    state: AgentState,
    status: watch::Sender<AgentStatus>,
    commands: mpsc::Receiver<Command>,
    commands_tx: mpsc::Sender<Command>,
}

impl Agent {
    /// Opens and scans every folder (creating missing ones), clearing what an interrupted apply
    /// left behind.
    pub fn open(config: AgentConfig, identity: Identity) -> Result<Agent, AgentError> {
        let mut state = AgentState::load(&config.state_dir);
        let chunker =
            Chunker::new(ChunkParams::DEFAULT).expect("default chunk parameters are valid");
        let mut folders = Vec::new();
        for spec in &config.folders {
            let previous = state.folders.get(&spec.name);
            let folder_chunker = previous
                .and_then(|p| Chunker::new(p.manifest.params).ok())
                .unwrap_or_else(|| chunker.clone());
            folders.push(Folder::open(spec, &folder_chunker, previous)?);
        }
        state.folders = folders
            .iter()
            .map(|f| (f.name.clone(), f.local.clone()))
            .collect();
        state
            .save(&config.state_dir)
            .map_err(|source| AgentError::State {
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
            status,
            commands,
            commands_tx,
        })
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
