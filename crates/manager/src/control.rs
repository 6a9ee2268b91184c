//! The control task: owns the folders' manifests and the generation counter, rescans on
//! request, persists each generation before publishing it, and publishes immutable snapshots.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use syncd_fsops::{FolderRoot, FolderSpec, LocalManifest};
use syncd_manifest::{Change, ChunkParams, Chunker, ManifestDigest, diff};
use syncd_proto::Generation;
use tokio::sync::{mpsc, oneshot, watch};

use crate::history::{History, Step};
use crate::state::ManagerState;
use crate::{ManagerConfig, ManagerError, ManagerStatus};

/// What the control task is asked to do.
#[derive(Debug)]
pub(crate) enum Command {
    /// Rescan every folder and publish what changed; reply with the generation afterwards.
    Rescan(Option<oneshot::Sender<Generation>>),
}

/// One published folder.
#[derive(Debug, Clone)]
pub struct FolderSnap {
    /// The open folder, for reading chunks.
    pub root: Arc<FolderRoot>,
    /// Its manifest and stat keys.
    pub local: Arc<LocalManifest>,
    /// Digest of the manifest.
    pub digest: ManifestDigest,
}

/// What the manager publishes: a generation and every folder's manifest at that generation.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The generation.
    pub generation: Generation,
    /// Published folders by name. A folder whose root could never be read is absent.
    pub folders: BTreeMap<String, FolderSnap>,
    pub(crate) history: Arc<History>,
}

/// The control task's state.
#[derive(Debug)]
pub(crate) struct Control {
    config: Arc<ManagerConfig>,
    generation: Generation,
    folders: BTreeMap<String, FolderSnap>,
    history: History,
    publisher: Option<watch::Sender<Arc<Snapshot>>>,
}

impl Control {
    /// Loads the persisted state, scans, and publishes a new generation if anything changed.
    pub(crate) async fn open(
        config: Arc<ManagerConfig>,
    ) -> Result<(Control, Arc<Snapshot>), ManagerError> {
        let state = ManagerState::load(&config.state_dir);
        let mut control = Control {
            generation: state.generation,
            folders: BTreeMap::new(),
            history: History::default(),
            publisher: None,
            config,
        };
        let previous: BTreeMap<String, Arc<LocalManifest>> = state
            .folders
            .into_iter()
            .map(|(k, v)| (k, Arc::new(v)))
            .collect();
        control.rescan_from(previous).await?;
        let snapshot = control.snapshot();
        Ok((control, snapshot))
    }

    pub(crate) fn with_publisher(mut self, publisher: watch::Sender<Arc<Snapshot>>) -> Self {
        self.publisher = Some(publisher);
        self
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            generation: self.generation,
            folders: self.folders.clone(),
            history: Arc::new(self.history.clone()),
        })
    }

    /// Handles commands until shutdown.
    pub(crate) async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        status: Arc<watch::Sender<ManagerStatus>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let cmd = tokio::select! {
                c = commands.recv() => c,
                _ = shutdown.changed() => None,
            };
            let Some(Command::Rescan(reply)) = cmd else {
                break;
            };
            let previous = self
                .folders
                .iter()
                .map(|(k, v)| (k.clone(), Arc::clone(&v.local)))
                .collect();
            match self.rescan_from(previous).await {
                Ok(true) => {
                    let snap = self.snapshot();
                    if let Some(p) = &self.publisher {
                        p.send_replace(snap);
                    }
                    status.send_modify(|s| s.generation = self.generation);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot record a new generation; it is not published")
                }
            }
            if let Some(reply) = reply {
                let _ = reply.send(self.generation);
            }
        }
    }

    /// Scans every folder against `previous`; if anything changed, records and persists a new
    /// generation. Returns whether the published snapshot must change.
    async fn rescan_from(
        &mut self,
        previous: BTreeMap<String, Arc<LocalManifest>>,
    ) -> Result<bool, ManagerError> {
        let started = Instant::now();
        let mut steps = BTreeMap::new();
        // A folder that cannot be read keeps its last published state: never an empty folder.
        let mut next = self.folders.clone();
        for spec in &self.config.folders {
            let old = previous.get(&spec.name).cloned();
            let Some((root, local)) = scan_folder(spec.clone(), old.clone()).await else {
                continue;
            };
            let digest = local.manifest.digest();
            let old_digest = old.as_ref().map(|o| o.manifest.digest());
            if old_digest != Some(digest) {
                let empty = LocalManifest {
                    manifest: syncd_manifest::Manifest::new(local.manifest.params),
                    ..LocalManifest::default()
                };
                let before = old.as_deref().unwrap_or(&empty);
                let changes = diff(&before.manifest, &local.manifest);
                log_changes(&spec.name, &changes);
                steps.insert(
                    spec.name.clone(),
                    Step {
                        from: before.manifest.digest(),
                        to: digest,
                        changes: Arc::new(changes),
                    },
                );
            }
            next.insert(
                spec.name.clone(),
                FolderSnap {
                    root,
                    local: Arc::new(local),
                    digest,
                },
            );
        }
        let folder_set_changed = !next.keys().eq(self.folders.keys());
        let new_generation = !steps.is_empty() || self.generation == Generation(0);
        if new_generation {
            let generation = Generation(self.generation.0 + 1);
            let state = ManagerState {
                generation,
                folders: next
                    .iter()
                    .map(|(k, v)| (k.clone(), (*v.local).clone()))
                    .collect(),
            };
            state
                .save(&self.config.state_dir)
                .map_err(|source| ManagerError::State {
                    dir: self.config.state_dir.clone(),
                    source,
                })?;
            self.generation = generation;
            self.history.push(steps);
            tracing::info!(%generation, elapsed_ms = started.elapsed().as_millis() as u64, "published generation");
        }
        self.folders = next;
        Ok(new_generation || folder_set_changed)
    }
}

fn log_changes(folder: &str, changes: &[Change]) {
    let puts = changes
        .iter()
        .filter(|c| matches!(c, Change::Put(..)))
        .count();
    let removes = changes.len() - puts;
    tracing::info!(%folder, changed = puts, removed = removes, "folder changed");
    for c in changes.iter().take(20) {
        match c {
            Change::Put(p, _) => tracing::debug!(%folder, path = %p, "put"),
            Change::Remove(p) => tracing::debug!(%folder, path = %p, "remove"),
        }
    }
}

/// Scans one folder on the blocking pool; `None` (logged) if its root cannot be read.
async fn scan_folder(
    spec: FolderSpec,
    previous: Option<Arc<LocalManifest>>,
) -> Option<(Arc<FolderRoot>, LocalManifest)> {
    let name = spec.name.clone();
    let result = tokio::task::spawn_blocking(move || {
        let params = previous
            .as_ref()
            .map_or(ChunkParams::DEFAULT, |p| p.manifest.params);
        let chunker = Chunker::new(params)
            .unwrap_or_else(|_| Chunker::new(ChunkParams::DEFAULT).expect("defaults are valid"));
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let started = Instant::now();
        let root = FolderRoot::open(&spec.path)
            .map_err(|e| format!("folder {} cannot be read: {e}", spec.path.display()))?;
        let (local, stats, warnings) = syncd_fsops::scan(
            &spec.path,
            &chunker,
            &spec.excludes,
            previous.as_deref(),
            threads,
        )
        .map_err(|e| e.to_string())?;
        for w in warnings {
            tracing::warn!(folder = %spec.name, "{w}");
        }
        tracing::debug!(
            folder = %spec.name,
            entries = local.manifest.len(),
            hashed_files = stats.hashed_files,
            hashed_bytes = stats.hashed_bytes,
            reused_files = stats.reused_files,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "scanned"
        );
        Ok::<_, String>((Arc::new(root), local))
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    match result {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!(folder = %name, error = %e, "cannot scan; keeping the folder's last published state");
            None
        }
    }
}
