//! The agent role: keeps this node's folders equal to what the manager publishes.
//!
//! It connects to the configured manager (and only to it), reports what it holds, receives each
//! generation's changes, and applies them through [`apply`]: stage and verify everything, make it
//! durable, rename into place, delete last, record the generation.

mod apply;
mod folder;
mod session;
mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use syncd_fsops::FolderSpec;
use syncd_manifest::{ChunkParams, Chunker};
use syncd_proto::Generation;
use syncd_transport::{Identity, NodeId};
use tokio::sync::watch;

pub use apply::ApplyError;
pub use folder::FolderError;

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
            ..AgentStatus::default()
        });
        Ok(Agent {
            config,
            identity: Arc::new(identity),
            folders,
            state,
            status,
        })
    }

    /// A live view of the agent's status.
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.subscribe()
    }

    /// Connects to the manager and keeps the folders in sync until `shutdown` becomes true,
    /// reconnecting with backoff whenever the connection is lost.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Result<(), AgentError> {
        session::run(self, shutdown).await
    }
}
