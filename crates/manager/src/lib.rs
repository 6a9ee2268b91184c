//! The manager role: scans the configured folders, numbers each set of changes as a generation,
//! and serves agents: each receives what differs from what it holds, and fetches the chunks it
//! lacks.
//!
//! One control task owns the folders' live state and the generation counter: it takes inotify
//! hints, waits until changed files are complete, and publishes what settled together as one
//! generation, as an immutable [`Snapshot`] through a watch channel that every agent connection
//! reads. Disk work runs on the blocking pool.

mod control;
mod history;
mod inotify;
mod live;
mod serve;
mod state;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use syncd_fsops::FolderSpec;
use syncd_proto::Generation;
use syncd_transport::{Endpoint, Identity, NodeId};
use tokio::sync::{mpsc, watch};

pub use control::Snapshot;

/// An agent the manager serves.
#[derive(Debug, Clone)]
pub struct AgentEntry {
    /// The agent's name (it must call itself this).
    pub name: String,
    /// Its node ID.
    pub id: NodeId,
}

/// What the manager needs to run, already validated.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// This node's name.
    pub node_name: String,
    /// Where identity and state live.
    pub state_dir: PathBuf,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// The agents allowed to connect.
    pub agents: Vec<AgentEntry>,
    /// The folders published.
    pub folders: Vec<FolderSpec>,
}

/// One agent as the manager sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentView {
    /// Whether it is connected now.
    pub connected: bool,
    /// Its address, when connected.
    pub addr: Option<SocketAddr>,
    /// The last generation it reported applied.
    pub applied: Generation,
    /// Its last error (a failed apply, a refused connection), cleared by the next success.
    pub last_error: Option<String>,
    /// When it was last heard from.
    pub last_seen: Option<SystemTime>,
    /// Whether it is applying a generation now.
    pub syncing: bool,
}

/// A file on the manager that is not published yet, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldFile {
    /// Its folder.
    pub folder: String,
    /// Its path in the folder.
    pub path: String,
    /// Why it is held ("being written", "incomplete archive: ...").
    pub reason: String,
    /// Since when.
    pub since: SystemTime,
}

/// The manager's state for status displays and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManagerStatus {
    /// The latest published generation.
    pub generation: Generation,
    /// Files not published yet because they are not complete.
    pub held: Vec<HeldFile>,
    /// Every configured agent by name.
    pub agents: BTreeMap<String, AgentView>,
    /// Chunk bytes served to agents since start.
    pub bytes_served: u64,
    /// Full rescans forced because watcher events were lost (queue overflow, watch errors).
    pub forced_rescans: u64,
}

/// Why the manager could not start.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// The state could not be written.
    #[error("cannot write manager state in {dir}: {source}")]
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

/// A manager that has scanned its folders and is bound to its address.
#[derive(Debug)]
pub struct Manager {
    control: control::Control,
    endpoint: Endpoint,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    status: Arc<watch::Sender<ManagerStatus>>,
    commands: mpsc::Sender<control::Command>,
    commands_rx: mpsc::Receiver<control::Command>,
    config: Arc<ManagerConfig>,
}

/// Asks a running manager to walk its folders again and publish what changed (the watcher does
/// this by itself; this is for tests and for operators' tools).
#[derive(Debug, Clone)]
pub struct RescanHandle(mpsc::Sender<control::Command>);

impl RescanHandle {
    /// Requests a rescan; returns the generation once every changed file has settled (held
    /// files aside), or `None` if the manager has stopped.
    pub async fn rescan(&self) -> Option<Generation> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0.send(control::Command::Rescan(Some(tx))).await.ok()?;
        rx.await.ok()
    }
}

impl Manager {
    /// Loads the persisted state, walks every folder (rehashing only changed files, and waiting
    /// for files being written), publishes the result as a new generation if anything changed,
    /// and binds the QUIC endpoint.
    pub async fn open(config: ManagerConfig, identity: Identity) -> Result<Manager, ManagerError> {
        let config = Arc::new(config);
        let (control, snapshot) = control::Control::open(Arc::clone(&config)).await?;
        let allowed = config
            .agents
            .iter()
            .map(|a| (a.id, a.name.clone()))
            .collect();
        let endpoint = Endpoint::server(&identity, allowed, config.listen)?;
        let status = ManagerStatus {
            generation: snapshot.generation,
            agents: config
                .agents
                .iter()
                .map(|a| (a.name.clone(), AgentView::default()))
                .collect(),
            held: Vec::new(),
            bytes_served: 0,
            forced_rescans: 0,
        };
        let (snap_tx, snapshots) = watch::channel(snapshot);
        let (commands, commands_rx) = mpsc::channel(16);
        Ok(Manager {
            control: control.with_publisher(snap_tx),
            endpoint,
            snapshots,
            status: Arc::new(watch::channel(status).0),
            commands,
            commands_rx,
            config,
        })
    }

    /// The address the manager listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("a bound endpoint has an address")
    }

    /// A live view of the manager's status.
    pub fn status(&self) -> watch::Receiver<ManagerStatus> {
        self.status.subscribe()
    }

    /// A handle to request rescans.
    pub fn rescan_handle(&self) -> RescanHandle {
        RescanHandle(self.commands.clone())
    }

    /// Serves agents until `shutdown` becomes true.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Result<(), ManagerError> {
        let Manager {
            control,
            endpoint,
            snapshots,
            status,
            commands,
            commands_rx,
            config,
        } = self;
        let control_task =
            tokio::spawn(control.run(commands_rx, Arc::clone(&status), shutdown.clone()));
        serve::accept_loop(
            serve::Ctx::new(config, snapshots, status, commands),
            endpoint,
            shutdown,
        )
        .await;
        let _ = control_task.await;
        Ok(())
    }
}
