//! Helpers for end-to-end tests: nodes with real identities in temporary directories, a manager
//! and agents run in-process on loopback, and a byte-for-byte tree comparison.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the support module"
)]

pub mod cluster;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use syncd_agent::{Agent, AgentConfig, AgentStatus};
use syncd_fsops::FolderSpec;
use syncd_manager::{AgentEntry, Manager, ManagerConfig, ManagerStatus, RescanHandle};
use syncd_transport::{Identity, NodeId};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub const FOLDER: &str = "deployment";

/// A UDP port on loopback nobody uses (for a manager's QUIC endpoint).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TCP port on loopback nobody listens on (for a metrics endpoint).
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Logs to stderr when `SYNCD_TEST_LOG` is set (e.g. `SYNCD_TEST_LOG=debug`), for debugging a test.
pub fn init_logging() {
    if let Ok(filter) = std::env::var("SYNCD_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// A node's directories: `state` for identity and state, `data` for the synced folder.
pub struct NodeDirs {
    pub tmp: tempfile::TempDir,
    pub state: PathBuf,
    pub data: PathBuf,
}

impl NodeDirs {
    pub fn new() -> NodeDirs {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        NodeDirs { tmp, state, data }
    }

    pub fn identity(&self) -> Identity {
        Identity::load_or_create(&self.state).unwrap().0
    }
}

pub fn folder(path: &Path) -> Vec<FolderSpec> {
    vec![FolderSpec::new(FOLDER, path)]
}

pub struct TestManager {
    pub dirs: NodeDirs,
    pub id: NodeId,
    pub addr: std::net::SocketAddr,
    pub status: watch::Receiver<ManagerStatus>,
    pub rescan: RescanHandle,
    pub handle: syncd_manager::ManagerHandle,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl TestManager {
    /// Starts a manager over `dirs.data` that accepts `agents`.
    pub async fn start(dirs: NodeDirs, agents: &[(&str, NodeId)]) -> TestManager {
        Self::start_on(dirs, agents, "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(
        dirs: NodeDirs,
        agents: &[(&str, NodeId)],
        listen: std::net::SocketAddr,
    ) -> TestManager {
        init_logging();
        syncd_transport::install_crypto_provider();
        let identity = dirs.identity();
        let id = identity.id();
        let config = ManagerConfig {
            node_name: "mgr-1".into(),
            state_dir: dirs.state.clone(),
            listen,
            agents: agents
                .iter()
                .map(|(name, id)| AgentEntry {
                    name: (*name).into(),
                    id: *id,
                    max_rate: None,
                })
                .collect(),
            folders: folder(&dirs.data),
        };
        // A manager stopped in this process a moment ago may still hold the port: its endpoint's
        // socket is released by a driver task that runs on after the manager is dropped.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let manager = loop {
            match Manager::open(config.clone(), dirs.identity()).await {
                Err(syncd_manager::ManagerError::Transport(
                    syncd_transport::TransportError::Bind { .. },
                )) if listen.port() != 0 && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                m => break m.unwrap(),
            }
        };
        drop(identity);
        let addr = manager.local_addr();
        let status = manager.status();
        let rescan = manager.rescan_handle();
        let handle = manager.handle();
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(async move { manager.run(rx).await.unwrap() });
        TestManager {
            dirs,
            id,
            addr,
            status,
            rescan,
            handle,
            shutdown,
            task,
        }
    }

    pub fn generation(&self) -> u64 {
        self.status.borrow().generation.0
    }

    /// Stops the manager and returns its directories for a restart.
    pub async fn stop(self) -> NodeDirs {
        let _ = self.shutdown.send(true);
        self.task.await.unwrap();
        self.dirs
    }
}

pub struct TestAgent {
    pub name: String,
    pub dirs: NodeDirs,
    pub status: watch::Receiver<AgentStatus>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl TestAgent {
    pub async fn start(name: &str, dirs: NodeDirs, manager: &TestManager) -> TestAgent {
        Self::start_with(name, dirs, manager.addr, manager.id).await
    }

    pub async fn start_with(
        name: &str,
        dirs: NodeDirs,
        addr: std::net::SocketAddr,
        manager_id: NodeId,
    ) -> TestAgent {
        syncd_transport::install_crypto_provider();
        let identity = dirs.identity();
        let config = AgentConfig {
            node_name: name.into(),
            state_dir: dirs.state.clone(),
            manager_addr: addr,
            manager_id,
            folders: folder(&dirs.data),
            max_backups: AgentConfig::DEFAULT_MAX_BACKUPS,
            max_backup_bytes: AgentConfig::DEFAULT_MAX_BACKUP_BYTES,
        };
        let agent = tokio::task::spawn_blocking(move || Agent::open(config, identity))
            .await
            .unwrap()
            .unwrap();
        let status = agent.status();
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(async move { agent.run(rx).await.unwrap() });
        TestAgent {
            name: name.into(),
            dirs,
            status,
            shutdown,
            task,
        }
    }

    /// Waits until the agent has applied generation `g` or later.
    pub async fn wait_applied(&mut self, g: u64) {
        let name = self.name.clone();
        wait_for(&mut self.status, Duration::from_secs(30), |s| {
            s.applied.0 >= g
        })
        .await
        .unwrap_or_else(|s| panic!("{name} did not apply generation {g}: {s:?}"));
    }

    pub fn stats(&self) -> AgentStatus {
        self.status.borrow().clone()
    }

    pub async fn stop(self) -> NodeDirs {
        let _ = self.shutdown.send(true);
        self.task.await.unwrap();
        self.dirs
    }
}

/// Waits until `pred` holds for the watched value; returns the last value on timeout.
pub async fn wait_for<T: Clone>(
    rx: &mut watch::Receiver<T>,
    timeout: Duration,
    mut pred: impl FnMut(&T) -> bool,
) -> Result<T, T> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if pred(&rx.borrow_and_update()) {
            return Ok(rx.borrow().clone());
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            return Err(rx.borrow().clone());
        }
    }
}

/// Everything a synced tree promises to reproduce about one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Dir {
        mode: u32,
        mtime: (i64, i64),
    },
    File {
        mode: u32,
        mtime: (i64, i64),
        hash: String,
        size: u64,
    },
    Link {
        target: String,
        mtime: (i64, i64),
    },
}

/// Reads a tree into a map of relative path to [`Item`], never following links.
pub fn snapshot(root: &Path) -> BTreeMap<String, Item> {
    try_snapshot(root).expect("the tree changed while it was read")
}

/// Like [`snapshot`], or `None` if the tree changed while it was read.
pub fn try_snapshot(root: &Path) -> Option<BTreeMap<String, Item>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).ok()? {
            let path = entry.ok()?.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let meta = std::fs::symlink_metadata(&path).ok()?;
            let mtime = (meta.mtime(), meta.mtime_nsec());
            let mode = meta.permissions().mode() & 0o7777;
            let item = if meta.is_dir() {
                stack.push(path.clone());
                Item::Dir { mode, mtime }
            } else if meta.file_type().is_symlink() {
                Item::Link {
                    target: std::fs::read_link(&path)
                        .ok()?
                        .to_string_lossy()
                        .into_owned(),
                    mtime,
                }
            } else {
                let bytes = std::fs::read(&path).ok()?;
                Item::File {
                    mode,
                    mtime,
                    hash: blake3_hex(&bytes),
                    size: bytes.len() as u64,
                }
            };
            out.insert(rel, item);
        }
    }
    Some(out)
}

fn blake3_hex(bytes: &[u8]) -> String {
    syncd_manifest::ChunkHash::of(bytes).to_hex()
}

/// Asserts two trees are identical in every promised respect, listing every difference.
pub fn assert_same_tree(manager: &Path, agent: &Path) {
    let a = snapshot(manager);
    let b = snapshot(agent);
    let mut diffs = Vec::new();
    for (k, v) in &a {
        match b.get(k) {
            None => diffs.push(format!("missing on agent: {k}")),
            Some(w) if w != v => diffs.push(format!(
                "differs: {k}\n    manager {v:?}\n    agent   {w:?}"
            )),
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            diffs.push(format!("extra on agent: {k}"));
        }
    }
    assert!(diffs.is_empty(), "trees differ:\n{}", diffs.join("\n"));
}

/// Waits until two trees are identical, polling; panics with the differences on timeout.
pub async fn converge(manager: &Path, agent: &Path, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (m, a) = (manager.to_owned(), agent.to_owned());
        let started = std::time::Instant::now();
        let same = tokio::task::spawn_blocking(move || {
            let m = try_snapshot(&m);
            m.is_some() && m == try_snapshot(&a)
        })
        .await
        .unwrap();
        if same {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            assert_same_tree(manager, agent);
        }
        // Reading big trees is costly: poll less often than it takes, so the daemons get the CPU.
        tokio::time::sleep(Duration::from_millis(20).max(started.elapsed() * 2)).await;
    }
}

/// A manager and one agent, started and converged on a generated tree.
pub async fn pair(scale: syncd_devtools::Scale, seed: u64) -> (TestManager, TestAgent) {
    let mdirs = NodeDirs::new();
    syncd_devtools::generate(&mdirs.data, scale, seed).unwrap();
    let adirs = NodeDirs::new();
    let manager = TestManager::start(mdirs, &[("worker-1", adirs.identity().id())]).await;
    let mut agent = TestAgent::start("worker-1", adirs, &manager).await;
    agent.wait_applied(manager.generation()).await;
    assert_same_tree(&manager.dirs.data, &agent.dirs.data);
    (manager, agent)
}

/// Like [`converge`], for tests without a runtime.
pub fn converge_blocking(manager: &Path, agent: &Path, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let m = try_snapshot(manager);
        if m.is_some() && m == try_snapshot(agent) {
            return;
        }
        if std::time::Instant::now() >= deadline {
            assert_same_tree(manager, agent);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
