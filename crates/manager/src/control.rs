//! The control task: owns the folders' live state and the generation counter. It takes watcher
//! hints, looks at what they point to, waits for changed files to be complete, and publishes
//! what settled together as one generation: persisted first, then published as an immutable
//! snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use syncd_fsops::{FolderRoot, LocalDelta, LocalManifest};
use syncd_manifest::{ChunkParams, Chunker, ManifestDigest, RelPath, diff};
use syncd_proto::Generation;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::history::{History, Step};
use crate::inotify::{CHANNEL, FolderWatch, Signal, WatchMsg};
use crate::live::{GuardReason, LiveFolder};
use crate::state::{GenerationRecord, ManagerState, ManagerStateView};
use crate::{
    GuardedFolder, HeldFile, Hold, ManagerConfig, ManagerError, ManagerStatus, PendingChange,
    SkippedEntry,
};

/// Quiet time after the last hint before paths are looked at (events of one write come together).
const DEBOUNCE: Duration = Duration::from_millis(2);
/// Longest a steady stream of hints can postpone looking.
const DEBOUNCE_MAX: Duration = Duration::from_millis(50);
/// Full walk of every folder, to catch anything the watcher missed.
const PERIODIC_RESCAN: Duration = Duration::from_secs(600);
/// How often a folder without a working watch is walked, and roots are checked for replacement.
const UNWATCHED_RESCAN: Duration = Duration::from_secs(5);
/// Longest start-up waits for changed files to become complete before publishing without them.
const STARTUP_SETTLE: Duration = Duration::from_secs(10);

/// What the control task is asked to do.
#[derive(Debug)]
pub(crate) enum Command {
    /// Walk every folder and publish what changed; reply with the generation once settled.
    Rescan(Option<oneshot::Sender<Generation>>),
    /// Hold publication.
    Hold {
        until: Option<u64>,
        reply: oneshot::Sender<Result<Hold, String>>,
    },
    /// End the hold, publishing everything since as one generation.
    Release {
        reply: oneshot::Sender<Result<Generation, String>>,
    },
    /// Publish what the delete guard holds back in `folder` (every guarded folder if `None`).
    Confirm {
        folder: Option<String>,
        reply: oneshot::Sender<Result<Generation, String>>,
    },
}

const HOLD_FILE: &str = "hold.state";
/// Publication is put off while a file changed alongside is about to settle (within this), so
/// that a file renamed into a directory and the directory's new mtime travel as one generation
/// instead of two (each generation costs every agent a round trip and an apply); never for
/// longer than `DEBOUNCE_MAX` in a row.
const IMMINENT: Duration = Duration::from_millis(10);
/// A generation with at least this many changes leaves enough freed memory behind (its lists,
/// encodings and the copies compared) to be worth handing back (see `syncd_fsops::trim_heap`).
const TRIM_AFTER_CHANGES: usize = 4096;
/// How often a `syncctl wait` that waits on files being written looks at them again.
const WRITERS_POLL: Duration = Duration::from_millis(100);
/// How long after such a generation the heap is trimmed: by then its transient buffers (the
/// previous snapshot, the first agents' update pages) are freed too.
const TRIM_DELAY: Duration = Duration::from_secs(1);
/// Pending changes listed in status while holding.
const PENDING_LISTED: usize = 1000;
/// How many entries that are not synced the status lists.
const SKIPPED_LISTED: usize = 100;

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
    folders: Vec<LiveFolder>,
    history: History,
    publisher: Option<watch::Sender<Arc<Snapshot>>>,
    chunker: Chunker,
    threads: usize,
    first_hint: Option<Instant>,
    last_hint: Option<Instant>,
    /// Since when publication has been put off for a file about to settle.
    deferred_since: Option<Instant>,
    waiting: Vec<oneshot::Sender<Generation>>,
    /// When to hand freed heap back again, after a large generation.
    trim_at: Option<Instant>,
    /// A time in the past, for work that is due at once.
    started: Instant,
    /// Publication held by the operator.
    hold: Option<Hold>,
    /// Where generations are recorded before they are published.
    store: syncd_fsops::StateFile,
}

impl Control {
    /// Loads the persisted state, walks every folder, waits (a bounded time) for changed files
    /// to be complete, and publishes a new generation if anything changed.
    pub(crate) async fn open(
        config: Arc<ManagerConfig>,
    ) -> Result<(Control, Arc<Snapshot>), ManagerError> {
        let (mut state, store) = ManagerState::load(&config.state_dir);
        let folders = config
            .folders
            .iter()
            .map(|spec| {
                LiveFolder::new(spec.clone(), state.folders.remove(&spec.name).map(Arc::new))
            })
            .collect();
        let mut control = Control {
            generation: state.generation,
            folders,
            history: History::default(),
            publisher: None,
            chunker: Chunker::new(ChunkParams::DEFAULT)
                .expect("default chunk parameters are valid"),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            first_hint: None,
            last_hint: None,
            deferred_since: None,
            waiting: Vec::new(),
            trim_at: None,
            started: Instant::now(),
            hold: load_hold(&config.state_dir),
            store,
            config,
        };
        let deadline = Instant::now() + STARTUP_SETTLE;
        loop {
            control.step(true).await;
            let settling = control.folders.iter().any(LiveFolder::settling);
            if !settling || Instant::now() >= deadline {
                break;
            }
            let next = control
                .next_ready()
                .unwrap_or_else(|| Instant::now() + DEBOUNCE);
            tokio::time::sleep_until(next.min(deadline).into()).await;
        }
        if let Some(h) = &control.hold {
            tracing::warn!(until = ?h.until, "publication is held (syncctl pause); changes are not sent until `syncctl resume`");
        }
        control.publish(control.generation == Generation(0))?;
        // The state's decoding and the first walk's buffers are freed by now, or soon.
        syncd_fsops::trim_heap();
        control.trim_at = Some(Instant::now() + TRIM_DELAY);
        let snapshot = control.snapshot();
        Ok((control, snapshot))
    }

    /// The hold in force, if any.
    pub(crate) fn hold(&self) -> Option<Hold> {
        self.hold.clone()
    }

    pub(crate) fn with_publisher(mut self, publisher: watch::Sender<Arc<Snapshot>>) -> Self {
        self.publisher = Some(publisher);
        self
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        let folders = self
            .folders
            .iter()
            .filter_map(|f| {
                let local = f.published.clone()?;
                let root = f.root.clone()?;
                Some((
                    f.spec.name.clone(),
                    FolderSnap {
                        digest: local.manifest.digest(),
                        root,
                        local,
                    },
                ))
            })
            .collect();
        Arc::new(Snapshot {
            generation: self.generation,
            folders,
            history: Arc::new(self.history.clone()),
        })
    }

    fn next_ready(&self) -> Option<Instant> {
        self.folders.iter().filter_map(LiveFolder::next_ready).min()
    }

    /// When hinted paths are due to be looked at: once hints have been quiet for a moment (or
    /// have kept coming for too long); at once for a rescan request, which comes with no hints.
    fn dirty_due(&self) -> Option<Instant> {
        if !self.folders.iter().any(LiveFolder::has_dirty) {
            return None;
        }
        Some(match self.last_hint.zip(self.first_hint) {
            Some((last, first)) => (last + DEBOUNCE).min(first + DEBOUNCE_MAX),
            None => self.started,
        })
    }

    /// Whether to put publication off a moment: a file settles within `IMMINENT`, and it has
    /// not been put off for `DEBOUNCE_MAX` already.
    fn defer_publication(&mut self) -> bool {
        let now = Instant::now();
        let imminent = self
            .folders
            .iter()
            .filter_map(LiveFolder::next_settled)
            .min()
            .is_some_and(|t| t <= now + IMMINENT);
        if !imminent {
            self.deferred_since = None;
            return false;
        }
        let since = *self.deferred_since.get_or_insert(now);
        if now.duration_since(since) < DEBOUNCE_MAX {
            return true;
        }
        self.deferred_since = None;
        false
    }

    /// When the loop must act next without new input.
    fn deadline(&self) -> Option<Instant> {
        [self.dirty_due(), self.next_ready(), self.writers_due()]
            .into_iter()
            .flatten()
            .min()
    }

    /// While a `syncctl wait` waits on files being written (see `LiveFolder::written_lately`),
    /// when to look again whether they were closed or went quiet.
    fn writers_due(&self) -> Option<Instant> {
        (!self.waiting.is_empty() && self.folders.iter().any(LiveFolder::written_lately))
            .then(|| Instant::now() + WRITERS_POLL)
    }

    /// Handles hints and commands until shutdown.
    pub(crate) async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        status: Arc<watch::Sender<ManagerStatus>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let (tx, mut hints) = mpsc::channel(CHANNEL);
        let signal = Signal {
            overflowed: Arc::new(AtomicBool::new(false)),
            wake: Arc::new(Notify::new()),
        };
        let mut watches: Vec<Option<FolderWatch>> = (0..self.folders.len()).map(|_| None).collect();
        // Folders whose watch stopped covering everything: walked on every `unwatched` tick.
        let mut degraded = vec![false; self.folders.len()];
        self.rewatch(&mut watches, &mut degraded, &tx, &signal);
        // What the first walk found held back or skipped shows before anything changes.
        self.report(&status);
        let mut periodic = tokio::time::interval(PERIODIC_RESCAN);
        periodic.tick().await;
        let mut unwatched = tokio::time::interval(UNWATCHED_RESCAN);
        loop {
            let deadline = self.deadline();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                msg = hints.recv() => {
                    let Some(msg) = msg else { break };
                    let mut dirs = BTreeSet::new();
                    let mut forced = self.take(msg, &mut dirs, &mut degraded);
                    // Drain what is queued without waking up for each hint.
                    while let Ok(msg) = hints.try_recv() {
                        forced |= self.take(msg, &mut dirs, &mut degraded);
                    }
                    forced |= self.watch_dirs(dirs, &mut watches, &mut degraded);
                    if forced {
                        status.send_modify(|s| s.forced_rescans += 1);
                    }
                }
                _ = signal.wake.notified() => {}
                cmd = commands.recv() => match cmd {
                    Some(Command::Rescan(reply)) => {
                        self.folders.iter_mut().for_each(LiveFolder::look_again);
                        self.waiting.extend(reply);
                    }
                    Some(Command::Hold { until, reply }) => {
                        let result = self.set_hold(Some(Hold { since_ms: now_ms(), until }));
                        let _ = reply.send(result.map(|()| self.hold.clone().expect("just set")));
                        self.report(&status);
                    }
                    Some(Command::Release { reply }) => {
                        let result = self.release("resumed").map(|()| self.generation);
                        let _ = reply.send(result);
                        self.report(&status);
                    }
                    Some(Command::Confirm { folder, reply }) => {
                        let _ = reply.send(self.confirm(folder.as_deref()));
                        self.report(&status);
                    }
                    None => break,
                },
                _ = sleep_until(self.trim_at) => {
                    self.trim_at = None;
                    syncd_fsops::trim_heap();
                }
                _ = hold_expiry(&self.hold) => {
                    if let Err(e) = self.release("hold time limit reached") {
                        tracing::error!(error = %e, "cannot end the hold");
                    }
                    self.report(&status);
                }
                _ = sleep => {
                    self.step(false).await;
                    if !self.defer_publication()
                        && let Err(e) = self.publish_and_announce(false)
                    {
                        tracing::error!(error = %e, "cannot record a new generation; it is not published");
                    }
                    self.report(&status);
                    if !self
                        .folders
                        .iter()
                        .any(|f| f.settling() || f.written_lately())
                    {
                        for reply in self.waiting.drain(..) {
                            let _ = reply.send(self.generation);
                        }
                    }
                }
                _ = periodic.tick() => {
                    tracing::debug!("periodic full rescan");
                    self.folders.iter_mut().for_each(LiveFolder::rescan);
                }
                _ = unwatched.tick() => self.rewatch(&mut watches, &mut degraded, &tx, &signal),
                _ = shutdown.changed() => break,
            }
            if signal.overflowed.swap(false, Ordering::AcqRel) {
                tracing::warn!("too many watcher events at once; rescanning every folder");
                self.folders.iter_mut().for_each(LiveFolder::rescan);
                // Directories created meanwhile may have gone unreported: watched now.
                for (i, watch) in watches.iter_mut().enumerate() {
                    if let Some(Err(reason)) = watch.as_mut().map(|w| w.add_tree(None)) {
                        self.watch_lost(i, &reason, &mut degraded);
                    }
                }
                status.send_modify(|s| s.forced_rescans += 1);
            }
        }
    }

    /// (Re)creates watches that are missing, degraded or whose root was replaced; a folder
    /// without a complete watch is walked every few seconds instead.
    fn rewatch(
        &mut self,
        watches: &mut [Option<FolderWatch>],
        degraded: &mut [bool],
        tx: &mpsc::Sender<WatchMsg>,
        signal: &Signal,
    ) {
        use std::os::unix::fs::MetadataExt;
        for (i, folder) in self.folders.iter_mut().enumerate() {
            let ino = std::fs::metadata(&folder.spec.path)
                .ok()
                .filter(|m| m.is_dir())
                .map(|m| m.ino());
            let current = watches[i].as_ref().map(|w| w.root_ino);
            if ino.is_some() && ino == current && !degraded[i] {
                continue;
            }
            if current.is_some() && ino != current {
                tracing::warn!(folder = %folder.spec.name, "folder root was replaced or removed; watching it again");
            }
            // Drop the old watch first: its watches count against the same limit.
            watches[i] = None;
            folder.rescan();
            if ino.is_none() {
                continue;
            }
            match crate::inotify::watch(
                i,
                &folder.spec.path,
                &folder.spec.excludes,
                tx.clone(),
                signal.clone(),
            ) {
                Ok(w) => {
                    if degraded[i] {
                        tracing::info!(folder = %folder.spec.name, "folder fully watched again");
                    }
                    degraded[i] = false;
                    watches[i] = Some(w);
                }
                Err(e) => {
                    if !degraded[i] {
                        tracing::error!(
                            folder = %folder.spec.name,
                            error = %e,
                            every = ?UNWATCHED_RESCAN,
                            "cannot watch the whole folder; walking it periodically instead"
                        );
                    }
                    degraded[i] = true;
                }
            }
        }
    }

    /// Takes one watcher message; returns whether it forced a full rescan.
    fn take(
        &mut self,
        msg: WatchMsg,
        dirs: &mut BTreeSet<(usize, Option<RelPath>)>,
        degraded: &mut [bool],
    ) -> bool {
        let now = Instant::now();
        self.first_hint.get_or_insert(now);
        self.last_hint = Some(now);
        match msg {
            WatchMsg::Hint { folder, path, hint } => {
                self.folders[folder].hint(path, hint);
                false
            }
            WatchMsg::Dir { folder, path } => {
                dirs.insert((folder, Some(path)));
                false
            }
            WatchMsg::Rescan { folder, reason } => {
                tracing::warn!(folder = %self.folders[folder].spec.name, %reason, "rescanning the folder");
                // Directories created while events were lost are watched too (once per batch
                // of messages: a burst overflows the queue again and again).
                dirs.insert((folder, None));
                self.folders[folder].rescan();
                true
            }
            WatchMsg::Lost { folder, reason } => {
                self.watch_lost(folder, &reason, degraded);
                true
            }
        }
    }

    /// Watches the directories reported new or changed in a batch of watcher messages (each
    /// with what is beneath it, once: `cp -rp` of a tree reports every directory twice; `None`:
    /// the whole folder, after lost events), before the folders are looked at again, so nothing
    /// created in them from now on goes unseen; what is already there, the look finds. Returns
    /// whether a watch was lost.
    fn watch_dirs(
        &mut self,
        dirs: BTreeSet<(usize, Option<RelPath>)>,
        watches: &mut [Option<FolderWatch>],
        degraded: &mut [bool],
    ) -> bool {
        let mut last: Option<(usize, Option<RelPath>)> = None;
        let mut lost = false;
        for (folder, path) in dirs {
            let covered = last.as_ref().is_some_and(|(f, p)| {
                *f == folder
                    && match (p, &path) {
                        (None, _) => true,
                        (Some(p), Some(path)) => path.starts_with(p),
                        (Some(_), None) => false,
                    }
            });
            if covered {
                continue;
            }
            if let Some(path) = &path {
                let spec = &self.folders[folder].spec;
                let is_dir = std::fs::symlink_metadata(spec.path.join(path.as_str()))
                    .is_ok_and(|m| m.is_dir());
                if !is_dir || spec.excludes.is_excluded(path, true) {
                    continue;
                }
            }
            if let Some(Err(reason)) = watches[folder].as_mut().map(|w| w.add_tree(path.as_ref())) {
                self.watch_lost(folder, &reason, degraded);
                lost = true;
            }
            last = Some((folder, path));
        }
        lost
    }

    /// A folder's watch no longer covers it: it is walked now and periodically until it can be
    /// watched whole again.
    fn watch_lost(&mut self, folder: usize, reason: &str, degraded: &mut [bool]) {
        if !degraded[folder] {
            tracing::error!(
                folder = %self.folders[folder].spec.name,
                reason,
                every = ?UNWATCHED_RESCAN,
                "the watch no longer covers the whole folder; walking it periodically"
            );
        }
        degraded[folder] = true;
        self.folders[folder].rescan();
    }

    /// Looks at hinted paths and settles ready candidates, on the blocking pool.
    async fn step(&mut self, force: bool) {
        let now = Instant::now();
        let hints_due = force || self.dirty_due().is_some_and(|d| d <= now);
        if hints_due {
            self.first_hint = None;
            self.last_hint = None;
        }
        let mut folders = std::mem::take(&mut self.folders);
        let chunker = self.chunker.clone();
        let threads = self.threads;
        self.folders = tokio::task::spawn_blocking(move || {
            for f in &mut folders {
                if hints_due && f.has_dirty() {
                    f.examine(now);
                }
                f.settle(now, &chunker, threads);
                f.expire_removals(now);
            }
            folders
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    }

    /// Publishes what changed as one new generation (or a new generation regardless, if
    /// `force`): persisted before anyone sees it. Returns whether a generation was published.
    fn publish(&mut self, force: bool) -> Result<bool, ManagerError> {
        // Holding: the first generation ever is still published (agents need something to hold
        // on to), nothing after it.
        if self.hold.is_some() && self.generation != Generation(0) {
            return Ok(false);
        }
        let started = Instant::now();
        let mut steps = BTreeMap::new();
        let mut first_versions: Vec<String> = Vec::new();
        let mut next: Vec<Option<Arc<LocalManifest>>> = Vec::with_capacity(self.folders.len());
        for f in &mut self.folders {
            // Removals still coming: the folder waits for them (see `REMOVAL_QUIET`).
            if f.removals_pending() {
                next.push(None);
                continue;
            }
            let candidate = match f.publishable() {
                Some(c) => c,
                // The root vanished or cannot be read: publishing it empty would delete every
                // worker's copy; only the operator can confirm that.
                None if f.published.is_some() => {
                    let empty = LocalManifest {
                        manifest: syncd_manifest::Manifest::new(ChunkParams::DEFAULT),
                        ..LocalManifest::default()
                    };
                    if !f.guard_allows(GuardReason::RootUnreadable, &empty.manifest) {
                        next.push(None);
                        continue;
                    }
                    Arc::new(empty)
                }
                None => {
                    next.push(None);
                    continue;
                }
            };
            let published = f.published.clone();
            let before = published.as_deref();
            // The digests are kept up to date: comparing them costs nothing, comparing the
            // manifests a pass over both.
            if before.is_some_and(|b| b.manifest.digest() == candidate.manifest.digest()) {
                f.clear_guard();
                next.push(None);
                continue;
            }
            let empty = syncd_manifest::Manifest::new(candidate.manifest.params);
            let old = before.map_or(&empty, |b| &b.manifest);
            // Usually the working state itself: it differs from what is published only where
            // it changed since.
            let changes = match f.touched().filter(|_| f.is_working(&candidate)) {
                Some(touched) if before.is_some() => {
                    syncd_manifest::diff_at(old, &candidate.manifest, touched)
                }
                _ => diff(old, &candidate.manifest),
            };
            // Every test run checks the shortcut against the whole comparison.
            debug_assert_eq!(
                changes,
                diff(old, &candidate.manifest),
                "changes of {}",
                f.spec.name
            );
            let removed = removed_files(old, &changes);
            let mut confirmed = false;
            if let Some(share) = f.spec.delete_guard {
                // Removals published moments ago count too, against the folder as it was
                // before them: a tree deleted over several generations trips as a whole.
                let earlier = f.recent_removals(started);
                let removing = removed + earlier;
                // Counted only when something is removed (a pass over the folder).
                let total = if removed > 0 {
                    old.iter().filter(|(_, n)| n.file().is_some()).count() + earlier
                } else {
                    earlier
                };
                let trips = total > 0
                    && removed > 0
                    && (removing == total || removing as f64 > share * total as f64);
                if trips {
                    if !f.guard_allows(
                        GuardReason::MassDelete {
                            removed: removing,
                            total,
                        },
                        &candidate.manifest,
                    ) {
                        next.push(None);
                        continue;
                    }
                    confirmed = true;
                }
            }
            if old.is_empty() {
                first_versions.push(f.spec.name.clone());
            }
            f.record_removals(started, removed, confirmed);
            f.clear_guard();
            log_changes(&f.spec.name, &changes);
            steps.insert(
                f.spec.name.clone(),
                Step {
                    from: old.digest(),
                    to: candidate.manifest.digest(),
                    olds: Arc::new(crate::history::olds_of(old, &changes)),
                    changes: Arc::new(changes),
                },
            );
            next.push(Some(candidate));
        }
        // A folder published for the first time with no content also counts as a change.
        let first_time = self
            .folders
            .iter()
            .zip(&next)
            .any(|(f, n)| f.published.is_none() && n.is_some());
        if steps.is_empty() && !force && !first_time {
            return Ok(false);
        }
        let generation = Generation(self.generation.0 + 1);
        let record = GenerationRecord {
            generation,
            folders: self
                .folders
                .iter()
                .zip(&next)
                .filter_map(|(f, n)| {
                    let n = n.as_ref()?;
                    let changes = steps
                        .get(&f.spec.name)
                        .map_or_else(Vec::new, |s| s.changes.to_vec());
                    Some((f.spec.name.clone(), LocalDelta::new(changes, n)))
                })
                .collect(),
        };
        let full = || ManagerStateView {
            generation,
            folders: self
                .folders
                .iter()
                .zip(&next)
                .filter_map(|(f, n)| {
                    let local = n.as_deref().or(f.published.as_deref())?;
                    Some((f.spec.name.as_str(), local))
                })
                .collect(),
        };
        crate::state::record(&mut self.store, &record, full).map_err(|source| {
            ManagerError::State {
                dir: self.config.state_dir.clone(),
                source,
            }
        })?;
        for (f, n) in self.folders.iter_mut().zip(next) {
            if let Some(n) = n {
                f.set_published(n);
            }
        }
        self.generation = generation;
        let changed: usize = steps.values().map(|s| s.changes.len()).sum();
        // A folder's first version is not worth remembering as a step: an agent holding nothing
        // is sent the whole list either way, and at 100,000 files the step would hold every
        // path and node a second time for as long as the history reaches back.
        steps.retain(|name, _| !first_versions.contains(name));
        self.history.push(steps);
        tracing::info!(%generation, elapsed_ms = started.elapsed().as_millis() as u64, "published generation");
        if changed >= TRIM_AFTER_CHANGES {
            syncd_fsops::trim_heap();
            self.trim_at = Some(Instant::now() + TRIM_DELAY);
        }
        Ok(true)
    }

    /// Publishes (unless holding) and hands the new snapshot to the agent connections.
    fn publish_and_announce(&mut self, force: bool) -> Result<bool, ManagerError> {
        let published = self.publish(force)?;
        if published && let Some(p) = &self.publisher {
            p.send_replace(self.snapshot());
        }
        Ok(published)
    }

    /// Sets or clears the hold, durably.
    fn set_hold(&mut self, hold: Option<Hold>) -> Result<(), String> {
        let path = self.config.state_dir.join(HOLD_FILE);
        let bytes = syncd_proto::encode_state(&hold).map_err(|e| e.to_string())?;
        syncd_fsops::write_atomic(&path, &bytes, 0o600)
            .map_err(|e| format!("cannot record the hold: {e}"))?;
        match &hold {
            Some(h) => {
                tracing::warn!(until = ?h.until, "holding publication: changes are not sent until `syncctl resume`")
            }
            None => tracing::info!("publication no longer held"),
        }
        self.hold = hold;
        Ok(())
    }

    /// Ends the hold and publishes everything since as one generation.
    fn release(&mut self, why: &str) -> Result<(), String> {
        if self.hold.is_none() {
            return Ok(());
        }
        self.set_hold(None)?;
        match self.publish_and_announce(false) {
            Ok(true) => {
                tracing::info!(generation = %self.generation, "{why}: published what changed during the hold")
            }
            Ok(false) => tracing::info!("{why}: nothing changed during the hold"),
            Err(e) => return Err(e.to_string()),
        }
        Ok(())
    }

    /// Confirms what the delete guard holds back, and publishes it.
    fn confirm(&mut self, folder: Option<&str>) -> Result<Generation, String> {
        if let Some(name) = folder
            && !self.folders.iter().any(|f| f.spec.name == name)
        {
            return Err(format!("no folder named {name:?}"));
        }
        let mut any = false;
        for f in &mut self.folders {
            if folder.is_none_or(|n| n == f.spec.name) {
                any |= f.confirm();
            }
        }
        if !any {
            return Err("the delete guard holds nothing back".into());
        }
        if self.hold.is_some() {
            return Err("confirmed, but publication is held: `syncctl resume` publishes it".into());
        }
        self.publish_and_announce(false)
            .map_err(|e| e.to_string())?;
        Ok(self.generation)
    }

    /// Updates the status: generation, held files, hold and pending changes.
    fn report(&self, status: &watch::Sender<ManagerStatus>) {
        let held = self.held();
        let (skipped, skipped_total) = self.skipped();
        let generation = self.generation;
        let hold = self.hold.clone();
        let (pending, pending_total) = if hold.is_some() {
            self.pending()
        } else {
            (Vec::new(), 0)
        };
        let guarded: Vec<GuardedFolder> = self
            .folders
            .iter()
            .filter_map(|f| {
                let g = f.guarded.as_ref()?;
                Some(GuardedFolder {
                    folder: f.spec.name.clone(),
                    reason: match g.reason {
                        GuardReason::RootUnreadable => {
                            "the folder root is gone or unreadable".into()
                        }
                        GuardReason::MassDelete { removed, total } => {
                            format!("would delete {removed} of {total} files")
                        }
                    },
                    since: g.since,
                })
            })
            .collect();
        status.send_if_modified(|s| {
            let changed = s.generation != generation
                || s.held != held
                || s.skipped_total != skipped_total
                || s.skipped != skipped
                || s.hold != hold
                || s.pending_total != pending_total
                || s.pending != pending
                || s.guarded != guarded;
            s.generation = generation;
            s.held = held;
            s.skipped = skipped;
            s.skipped_total = skipped_total;
            s.hold = hold;
            s.pending = pending;
            s.pending_total = pending_total;
            s.guarded = guarded;
            changed
        });
    }

    /// What publishing now would change.
    fn pending(&self) -> (Vec<PendingChange>, usize) {
        let mut listed = Vec::new();
        let mut total = 0;
        for f in &self.folders {
            let Some(next) = f.publishable() else {
                continue;
            };
            let empty = syncd_manifest::Manifest::new(next.manifest.params);
            let before = f.published.as_deref().map_or(&empty, |p| &p.manifest);
            for change in diff(before, &next.manifest) {
                // A directory whose mtime moved because its contents changed is not news.
                if let syncd_manifest::Change::Put(p, n) = &change
                    && n.is_dir()
                    && before.get(p).is_some_and(|b| b.is_dir())
                {
                    continue;
                }
                total += 1;
                if listed.len() < PENDING_LISTED {
                    listed.push(PendingChange {
                        folder: f.spec.name.clone(),
                        path: change.path().to_string(),
                        kind: match &change {
                            syncd_manifest::Change::Remove(_) => "removed",
                            syncd_manifest::Change::Put(p, _) if before.get(p).is_some() => {
                                "modified"
                            }
                            syncd_manifest::Change::Put(..) => "added",
                        },
                    });
                }
            }
        }
        (listed, total)
    }

    /// Entries not synced: the first [`SKIPPED_LISTED`], and how many in all.
    fn skipped(&self) -> (Vec<SkippedEntry>, usize) {
        let listed = self
            .folders
            .iter()
            .flat_map(|f| {
                f.skipped.iter().map(|(path, reason)| SkippedEntry {
                    folder: f.spec.name.clone(),
                    path: path.clone(),
                    reason: reason.clone(),
                })
            })
            .take(SKIPPED_LISTED)
            .collect();
        (listed, self.folders.iter().map(|f| f.skipped.len()).sum())
    }

    fn held(&self) -> Vec<HeldFile> {
        self.folders
            .iter()
            .flat_map(|f| {
                f.held.iter().map(|(path, h)| HeldFile {
                    folder: f.spec.name.clone(),
                    path: path.to_string(),
                    reason: h.reason.clone(),
                    since: h.since,
                })
            })
            .collect()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn load_hold(state_dir: &std::path::Path) -> Option<Hold> {
    let path = state_dir.join(HOLD_FILE);
    let bytes = std::fs::read(&path).ok()?;
    syncd_proto::decode_state(&bytes).unwrap_or_else(|e| {
        tracing::error!(path = %path.display(), error = %e, "hold record unreadable; not holding");
        None
    })
}

/// Resolves at `at` (never, without one).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Resolves when a hold with a time limit ends (never, without one).
async fn hold_expiry(hold: &Option<Hold>) {
    match hold.as_ref().and_then(|h| h.until) {
        Some(until) => {
            let at = std::time::UNIX_EPOCH + Duration::from_secs(until);
            let left = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(left).await;
        }
        None => std::future::pending().await,
    }
}

fn log_changes(folder: &str, changes: &[syncd_manifest::Change]) {
    use syncd_manifest::Change;
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

/// Files that `changes` remove from `old` and do not put elsewhere: a directory renamed, or
/// removed and unpacked again, moves its files rather than deleting them, and the delete
/// guard counts only what a folder would lose.
fn removed_files(old: &syncd_manifest::Manifest, changes: &[syncd_manifest::Change]) -> usize {
    use syncd_manifest::Change;
    let gone = |c: &&Change| matches!(c, Change::Remove(p) if old.get(p).is_some_and(|n| n.file().is_some()));
    if !changes.iter().any(|c| gone(&c)) {
        return 0;
    }
    let put: std::collections::HashSet<_> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Put(_, n) => n.file().map(|f| f.hash),
            Change::Remove(_) => None,
        })
        .collect();
    changes
        .iter()
        .filter(gone)
        .filter(|c| {
            let hash = old.get(c.path()).and_then(|n| n.file()).map(|f| f.hash);
            !hash.is_some_and(|h| put.contains(&h))
        })
        .count()
}
