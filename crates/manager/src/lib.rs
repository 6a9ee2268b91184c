//! The manager role: scans the configured folders, numbers each set of changes as a generation,
//! and serves agents: each receives what differs from what it holds, and fetches the chunks it
//! lacks.
//!
//! One control task owns the folders' live state and the generation counter: it takes inotify
//! hints, waits until changed files are complete, and publishes what settled together as one
//! generation, as an immutable [`Snapshot`] through a watch channel that every agent connection
//! reads. Disk work runs on the blocking pool.

mod cache;
mod control;
mod history;
mod inotify;
mod live;
mod pauses;
mod serve;
mod state;
mod wire;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use syncd_fsops::FolderSpec;
use syncd_manifest::ManifestDigest;
use syncd_proto::{Generation, Pause};
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
    /// The most bytes per second the manager sends it (`None`: as fast as the path allows).
    pub max_rate: Option<u64>,
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
    /// Its pause, if one is in force.
    pub paused: Option<Pause>,
    /// What each of its folders holds (digest), as it last reported.
    pub digests: BTreeMap<String, ManifestDigest>,
    /// Chunk bytes sent to it since the manager started.
    pub bytes_sent: u64,
    /// Its folders hold something else than the generation it applied (changed locally, e.g.
    /// during a pause) and the difference is about to be sent.
    pub resync_pending: bool,
    /// Local changes it left in place (reported, flapping, waiting), as it last said.
    pub drift: Vec<syncd_proto::DriftEntry>,
    /// Local changes it reverted since it started.
    pub drift_reverted: u64,
    /// The cap on what is sent to it, in bytes per second (its config's `max_rate`).
    pub max_rate: Option<u64>,
}

/// The state of an agent as an operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Not connected.
    Offline,
    /// Paused: nothing is sent to it.
    Paused,
    /// Applying a generation, or about to.
    Syncing,
    /// Its last apply failed; it will be retried.
    Error,
    /// It holds the latest generation.
    InSync,
    /// It holds the latest generation, but local changes are left in place.
    Drifted,
}

impl NodeState {
    /// The word shown in status.
    pub fn as_str(&self) -> &'static str {
        match self {
            NodeState::Offline => "offline",
            NodeState::Paused => "paused",
            NodeState::Syncing => "syncing",
            NodeState::Error => "error",
            NodeState::InSync => "in sync",
            NodeState::Drifted => "drifted",
        }
    }
}

impl AgentView {
    /// Whether its drift report may have been cut (an agent lists
    /// [`syncd_proto::DRIFT_REPORTED`] at most): it has more than `drift` says.
    pub fn drift_cut(&self) -> bool {
        self.drift.len() >= syncd_proto::DRIFT_REPORTED
    }

    /// Its state relative to the manager's latest `generation`.
    pub fn state(&self, generation: Generation) -> NodeState {
        if !self.connected {
            NodeState::Offline
        } else if self.paused.is_some() {
            NodeState::Paused
        } else if self.syncing || self.resync_pending {
            NodeState::Syncing
        } else if self.applied >= generation && !self.drift.is_empty() {
            NodeState::Drifted
        } else if self.applied >= generation {
            NodeState::InSync
        } else if self.last_error.is_some() {
            NodeState::Error
        } else {
            NodeState::Syncing
        }
    }
}

/// Publication held by the operator (`syncctl pause` on the manager).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Hold {
    /// Since when (milliseconds since the Unix epoch).
    pub since_ms: u64,
    /// When it ends by itself (seconds since the Unix epoch), if it has a limit.
    pub until: Option<u64>,
}

/// A change the manager would publish if it were not holding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingChange {
    /// The folder.
    pub folder: String,
    /// The path.
    pub path: String,
    /// `added`, `modified` or `removed`.
    pub kind: &'static str,
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

/// An entry in a folder on the manager that is not synced, and why: something syncd cannot carry
/// (a socket, FIFO or device, a link out of the folder, a name that is not UTF-8) or cannot read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedEntry {
    /// Its folder.
    pub folder: String,
    /// Its path in the folder (lossily decoded).
    pub path: String,
    /// Why.
    pub reason: String,
}

/// The manager's state for status displays and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManagerStatus {
    /// The latest published generation.
    pub generation: Generation,
    /// Files not published yet because they are not complete.
    pub held: Vec<HeldFile>,
    /// Entries that are not synced (at most 100 listed).
    pub skipped: Vec<SkippedEntry>,
    /// How many entries are not synced in all.
    pub skipped_total: usize,
    /// Every configured agent by name.
    pub agents: BTreeMap<String, AgentView>,
    /// Chunk bytes served to agents since start.
    pub bytes_served: u64,
    /// Full rescans forced because watcher events were lost (queue overflow, watch errors).
    pub forced_rescans: u64,
    /// Publication held by the operator, if it is.
    pub hold: Option<Hold>,
    /// While holding: what the next generation would change (at most 1000 listed).
    pub pending: Vec<PendingChange>,
    /// While holding: how many changes are pending in all.
    pub pending_total: usize,
    /// Folders whose next generation the delete guard holds back.
    pub guarded: Vec<GuardedFolder>,
}

/// A folder whose next generation the delete guard holds back until `syncctl confirm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardedFolder {
    /// The folder.
    pub folder: String,
    /// Why.
    pub reason: String,
    /// Since when.
    pub since: SystemTime,
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
    pauses: Arc<pauses::Pauses>,
}

/// Answers operators' requests to a running manager.
#[derive(Debug, Clone)]
pub struct ManagerHandle {
    commands: mpsc::Sender<control::Command>,
    status: watch::Receiver<ManagerStatus>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    pauses: Arc<pauses::Pauses>,
    node_name: String,
}

/// How a `wait` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitOutcome {
    /// The generation waited for.
    pub generation: Generation,
    /// Whether every agent that counts applied it.
    pub reached: bool,
    /// Agents that had not applied it, with their state: those that counted, then the others.
    pub laggards: Vec<Laggard>,
}

/// An agent that has not applied the generation waited for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Laggard {
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: NodeState,
    /// The generation it applied.
    pub applied: Generation,
    /// Whether it counted (offline and paused agents count only when asked).
    pub counted: bool,
    /// Its last error.
    pub last_error: Option<String>,
}

impl ManagerHandle {
    /// This manager's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// A live view of the manager's status.
    pub fn status(&self) -> watch::Receiver<ManagerStatus> {
        self.status.clone()
    }

    /// Folders that this manager publishes and `agent` does not sync, and folders that `agent`
    /// syncs and this manager does not publish (each node's config lists its own folders: a
    /// folder missing from one of them is not an error, but that node never gets it). Both are
    /// empty for an agent that never joined.
    pub fn unmatched_folders(&self, agent: &AgentView) -> (Vec<String>, Vec<String>) {
        if agent.digests.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let snap = self.snapshots.borrow();
        let not_taken = snap
            .folders
            .keys()
            .filter(|f| !agent.digests.contains_key(*f))
            .cloned()
            .collect();
        let not_published = agent
            .digests
            .keys()
            .filter(|f| !snap.folders.contains_key(*f))
            .cloned()
            .collect();
        (not_taken, not_published)
    }

    /// How far behind `agent` is: generations, and bytes of the files that differ (an upper
    /// bound of what will cross: chunks it already holds are not sent).
    pub fn behind(&self, agent: &AgentView) -> (u64, u64) {
        let snap = self.snapshots.borrow().clone();
        let generations = snap.generation.0.saturating_sub(agent.applied.0);
        let mut bytes = 0;
        for (name, folder) in &snap.folders {
            let Some(&have) = agent.digests.get(name) else {
                continue;
            };
            if have == folder.digest {
                continue;
            }
            bytes += match snap.history.delta(name, have, folder.digest) {
                Some(delta) => delta
                    .changes
                    .iter()
                    .filter_map(|c| match c {
                        syncd_manifest::Change::Put(_, n) => n.file().map(|f| f.size),
                        syncd_manifest::Change::Remove(_) => None,
                    })
                    .sum(),
                None => folder.local.manifest.total_bytes(),
            };
        }
        (generations, bytes)
    }

    /// Holds publication (until `until`, seconds since the Unix epoch, if given): the folders
    /// may change, nothing is sent to agents.
    pub async fn hold(&self, until: Option<u64>) -> Result<Hold, String> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.commands
            .send(control::Command::Hold { until, reply })
            .await
            .map_err(|_| "the manager stopped".to_owned())?;
        rx.await.map_err(|_| "the manager stopped".to_owned())?
    }

    /// Ends a hold: everything changed since is published as one generation, returned.
    pub async fn release(&self) -> Result<Generation, String> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.commands
            .send(control::Command::Release { reply })
            .await
            .map_err(|_| "the manager stopped".to_owned())?;
        rx.await.map_err(|_| "the manager stopped".to_owned())?
    }

    /// Publishes what the delete guard holds back in `folder` (every guarded folder if `None`).
    pub async fn confirm(&self, folder: Option<String>) -> Result<Generation, String> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.commands
            .send(control::Command::Confirm { folder, reply })
            .await
            .map_err(|_| "the manager stopped".to_owned())?;
        rx.await.map_err(|_| "the manager stopped".to_owned())?
    }

    /// Pauses agent `name` (until `until`, seconds since the Unix epoch, if given), now if it
    /// is connected, else as soon as it connects; nothing is sent to it meanwhile.
    pub fn pause_agent(&self, name: &str, until: Option<u64>) -> Result<Pause, String> {
        let pause = Pause {
            until,
            set_at: now_ms(),
            by: "manager".into(),
        };
        let record = pauses::PauseRecord {
            pause: Some(pause.clone()),
            set_at: pause.set_at,
        };
        self.decide(name, record)?;
        tracing::warn!(agent = %name, until = ?until, "pausing agent on the operator's request");
        Ok(pause)
    }

    /// Resumes agent `name`.
    pub fn resume_agent(&self, name: &str) -> Result<(), String> {
        let record = pauses::PauseRecord {
            pause: None,
            set_at: now_ms(),
        };
        self.decide(name, record)?;
        tracing::info!(agent = %name, "resuming agent on the operator's request");
        Ok(())
    }

    fn decide(&self, name: &str, record: pauses::PauseRecord) -> Result<(), String> {
        if self.pauses.get(name).is_none() {
            return Err(format!("no agent named {name:?} in this manager's config"));
        }
        self.pauses
            .decide(name, record)
            .map(|_| ())
            .map_err(|e| format!("cannot record the pause: {e}"))
    }

    /// Waits until every connected, unpaused agent (every agent, with `require_all`) has
    /// applied `generation` (if `None`: the latest, once what was deployed before the call has
    /// been published), or `timeout` passes.
    pub async fn wait(
        &self,
        generation: Option<Generation>,
        timeout: std::time::Duration,
        require_all: bool,
    ) -> WaitOutcome {
        // "The latest" includes what was deployed just before the wait: walk the folders and let
        // changes settle first, so a pipeline's `deploy; syncctl wait` waits for its deploy.
        let target = match generation {
            Some(g) => g,
            None => {
                let rescan = RescanHandle(self.commands.clone());
                match tokio::time::timeout(timeout, rescan.rescan()).await {
                    Ok(Some(g)) => g,
                    _ => self.status.borrow().generation,
                }
            }
        };
        let mut status = self.status.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let outcome = {
                let s = status.borrow_and_update();
                let mut laggards: Vec<Laggard> = s
                    .agents
                    .iter()
                    .filter(|(_, v)| v.applied < target || v.resync_pending || v.syncing)
                    .map(|(name, v)| {
                        let state = v.state(s.generation);
                        Laggard {
                            name: name.clone(),
                            state,
                            applied: v.applied,
                            counted: require_all
                                || !matches!(state, NodeState::Offline | NodeState::Paused),
                            last_error: v.last_error.clone(),
                        }
                    })
                    .collect();
                laggards.sort_by_key(|l| !l.counted);
                WaitOutcome {
                    generation: target,
                    reached: laggards.iter().all(|l| !l.counted) && s.generation >= target,
                    laggards,
                }
            };
            if outcome.reached {
                return outcome;
            }
            match tokio::time::timeout_at(deadline, status.changed()).await {
                Ok(Ok(())) => {}
                // Timed out, or the manager stopped.
                _ => return outcome,
            }
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
    /// Binds the QUIC endpoint, loads the persisted state, walks every folder (rehashing only
    /// changed files, and waiting for files being written), and publishes the result as a new
    /// generation if anything changed. No agent is served before [`Manager::run`].
    pub async fn open(config: ManagerConfig, identity: Identity) -> Result<Manager, ManagerError> {
        let config = Arc::new(config);
        // Bound before the first walk: a port in use fails at once, not after a long scan, and
        // agents that connect meanwhile wait in the accept queue (served as soon as the walk is
        // published) instead of retrying their handshake on a backoff.
        let allowed = config
            .agents
            .iter()
            .map(|a| (a.id, a.name.clone()))
            .collect();
        let endpoint = Endpoint::server(&identity, allowed, config.listen)?;
        let (control, snapshot) = control::Control::open(Arc::clone(&config)).await?;
        let status = ManagerStatus {
            generation: snapshot.generation,
            agents: config
                .agents
                .iter()
                .map(|a| {
                    let view = AgentView {
                        max_rate: a.max_rate,
                        ..AgentView::default()
                    };
                    (a.name.clone(), view)
                })
                .collect(),
            held: Vec::new(),
            skipped: Vec::new(),
            skipped_total: 0,
            bytes_served: 0,
            forced_rescans: 0,
            hold: control.hold(),
            pending: Vec::new(),
            pending_total: 0,
            guarded: Vec::new(),
        };
        let (snap_tx, snapshots) = watch::channel(snapshot);
        let (commands, commands_rx) = mpsc::channel(16);
        let pauses = Arc::new(pauses::Pauses::load(
            &config.state_dir,
            config.agents.iter().map(|a| a.name.clone()),
        ));
        Ok(Manager {
            control: control.with_publisher(snap_tx),
            endpoint,
            snapshots,
            status: Arc::new(watch::channel(status).0),
            commands,
            commands_rx,
            config,
            pauses,
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

    /// A handle for operators' requests (status, hold, pause, wait).
    pub fn handle(&self) -> ManagerHandle {
        ManagerHandle {
            commands: self.commands.clone(),
            status: self.status.subscribe(),
            snapshots: self.snapshots.clone(),
            pauses: Arc::clone(&self.pauses),
            node_name: self.config.node_name.clone(),
        }
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
            pauses,
        } = self;
        let control_task =
            tokio::spawn(control.run(commands_rx, Arc::clone(&status), shutdown.clone()));
        serve::accept_loop(
            serve::Ctx::new(config, snapshots, status, commands, pauses),
            endpoint,
            shutdown,
        )
        .await;
        let _ = control_task.await;
        Ok(())
    }
}
