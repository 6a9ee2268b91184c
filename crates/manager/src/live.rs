//! One published folder kept up to date from watcher hints: which paths changed, which files are
//! still being written, which are complete and may be published.
//!
//! Watcher events are hints. A hinted path is looked at again (`observe`); a changed file becomes
//! a *candidate* and is published only when its writer is done: its size, mtime, ctime and inode
//! stay the same across a short wait (short after a close-write or a rename into the folder,
//! longer for a file found by a scan, whose writer we never saw), an archive's ZIP central
//! directory parses, and hashing it did not see it change. Until then the folder keeps publishing
//! the file's previous version (or nothing, for a new file), and the file is listed as *held*.
//!
//! All methods here do blocking disk work; the control task runs them on the blocking pool.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound::{Excluded, Included};
use std::sync::Arc;
use std::time::{Duration, Instant};

use syncd_fsops::{
    FolderRoot, FolderSpec, LocalManifest, Reuse, ScanWarning, Seen, StatKey, Tiling,
    check_archive, is_archive, observe, walk,
};
use syncd_manifest::{ChunkParams, Chunker, Manifest, Node, RelPath};

/// Wait after a close-write or rename before the final re-stat.
pub(crate) const SETTLE_AFTER_CLOSE: Duration = Duration::from_millis(3);
/// Quiet time required of a changed file whose writer was not seen (found by a scan, or only its
/// metadata changed): its inode must not change for this long. A file whose change time is
/// already this old when it is found has been quiet that long and needs no further wait (most
/// files at start); a younger one is stat-ed again after this wait.
pub(crate) const SETTLE_DISCOVERED: Duration = Duration::from_millis(300);
/// How often an incomplete archive is looked at again without new events.
pub(crate) const RECHECK_ARCHIVE: Duration = Duration::from_secs(1);
/// How long a file that cannot be read waits before it is tried again (a `chmod` that makes it
/// readable changes its stat key and is looked at at once).
pub(crate) const RECHECK_UNREADABLE: Duration = Duration::from_secs(5);

/// How lately a file still open for writing must have been written to for `syncctl wait` to
/// wait for it (see [`LiveFolder::written_lately`]).
pub(crate) const WRITTEN_LATELY: Duration = Duration::from_secs(2);

/// What the watcher said about a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hint {
    /// Created, removed, renamed away, metadata changed: look again.
    Changed,
    /// Data written: a writer has the file open.
    Writing,
    /// Closed after writing, or renamed into place: the writer is done.
    Written,
}

/// A changed file waiting to be checked for completeness.
#[derive(Debug, Clone)]
struct Candidate {
    key: StatKey,
    ready_at: Instant,
}

/// Why a file is not published yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Why.
    pub reason: String,
    /// Since when.
    pub since: std::time::SystemTime,
}

/// Why the delete guard holds a folder's next generation back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardReason {
    /// The folder's root vanished or cannot be read.
    RootUnreadable,
    /// The generation would delete `removed` of the folder's `total` files.
    MassDelete {
        /// Files it would delete.
        removed: usize,
        /// Files published now.
        total: usize,
    },
}

/// A generation held back by the delete guard, waiting for `syncctl confirm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guarded {
    /// Why.
    pub reason: GuardReason,
    /// Digest of the manifest it would publish: a confirmation applies to exactly that.
    pub target: syncd_manifest::ManifestDigest,
    /// Since when.
    pub since: std::time::SystemTime,
}

/// A folder as the manager watches it.
#[derive(Debug)]
pub(crate) struct LiveFolder {
    pub spec: FolderSpec,
    /// The open folder, for reading chunks; `None` while its root cannot be read.
    pub root: Option<Arc<FolderRoot>>,
    /// What was last published.
    pub published: Option<Arc<LocalManifest>>,
    /// What is on disk and complete (held files keep their previous entry, or none). Shared
    /// with `published` until it changes (copy on write, see [`LiveFolder::working_mut`]): at
    /// rest, a folder's manifest and stat keys are in memory once.
    working: Arc<LocalManifest>,
    /// Every path whose working entry changed since the working state was last published as it
    /// is (`None`: not known, as at start or after very many changes): the published state and
    /// the working one differ only there, so a generation is checked and listed by looking at
    /// them alone, not at every entry of the folder.
    touched: Option<BTreeSet<RelPath>>,
    /// Paths hinted since the last look.
    dirty: BTreeSet<RelPath>,
    /// The whole folder must be walked again (start, queue overflow, periodic check).
    rescan_all: bool,
    /// Files a writer has open (data written, no close seen yet).
    writing: BTreeSet<RelPath>,
    /// Files whose writer closed them (the next look may use the short wait).
    closed: BTreeSet<RelPath>,
    candidates: BTreeMap<RelPath, Candidate>,
    /// Files not published yet, and why.
    pub held: BTreeMap<RelPath, Held>,
    /// Entries that are not synced, and why: what syncd cannot carry (sockets, FIFOs and
    /// devices, links out of the folder, names that are not UTF-8) and what it cannot read
    /// (whose last published state stays published). Keyed by path in the folder, lossily
    /// decoded; logged when first seen.
    pub skipped: BTreeMap<String, String>,
    /// Whether the last attempt to read the root failed (logged once per outage).
    root_failed: bool,
    /// The delete guard's verdict on the pending generation, if it holds it back.
    pub guarded: Option<Guarded>,
    /// What the operator confirmed publishing despite the guard.
    confirmed: Option<syncd_manifest::ManifestDigest>,
    /// Files removed by generations published in the last [`GUARD_WINDOW`]: a tree deleted
    /// over several generations (`rm -rf` outlasts the debounce) counts as one deletion.
    recent_removals: std::collections::VecDeque<(Instant, usize)>,
    /// Whether the last removals published were cut off by the longest wait while more kept
    /// coming: the deletion goes on, and the guard counts all of it, however long it lasts.
    deletion_goes_on: bool,
    /// Whether the removals let through (not published yet) were cut off so.
    removals_cut: bool,
    /// Removals seen and not yet published.
    pending_removals: Option<PendingRemovals>,
    /// What was logged of the entries found that cannot be carried (see [`SKIPPED_LOGGED`]).
    skipped_log: SkippedLog,
    /// How each large archive hashed since the start was cut into chunks (kept to hash its
    /// next version's unchanged entries by BLAKE3 alone: `syncd_fsops::hash_file_reusing`).
    tilings: HashMap<RelPath, Tiling>,
}

/// New entries the folder cannot carry that are logged one by one within a
/// [`SKIPPED_LOG_WINDOW`]; the rest are counted.
const SKIPPED_LOGGED: usize = 20;
const SKIPPED_LOG_WINDOW: Duration = Duration::from_secs(60);

/// How many new entries the folder cannot carry were logged since `since`, and how many not.
#[derive(Debug, Default)]
struct SkippedLog {
    since: Option<Instant>,
    logged: usize,
    unlogged: usize,
}

/// Whether one entry is logged (see [`SkippedLog::note`]).
enum Logged {
    Yes,
    /// Not, and it is the first of its window that is not.
    FirstUnlogged,
    No,
}

impl SkippedLog {
    /// Counts one new entry at `now`: how many went unlogged in the window that just ended (0
    /// if none ended), and whether this one is logged.
    fn note(&mut self, now: Instant) -> (usize, Logged) {
        let mut earlier = 0;
        if self
            .since
            .is_none_or(|t| now.duration_since(t) >= SKIPPED_LOG_WINDOW)
        {
            earlier = self.unlogged;
            *self = SkippedLog {
                since: Some(now),
                ..SkippedLog::default()
            };
        }
        let this = if self.logged < SKIPPED_LOGGED {
            self.logged += 1;
            Logged::Yes
        } else {
            self.unlogged += 1;
            if self.unlogged == 1 {
                Logged::FirstUnlogged
            } else {
                Logged::No
            }
        };
        (earlier, this)
    }
}

/// Removals waiting for more removals to stop (see [`REMOVAL_QUIET`]).
#[derive(Debug, Clone, Copy)]
struct PendingRemovals {
    first: Instant,
    last: Instant,
    /// Files removed (directories and links do not count, as for the delete guard).
    files: usize,
    /// Whether these removals, with those published within [`GUARD_WINDOW`], are few enough to
    /// wait only [`REMOVAL_QUIET_FEW`]; once not, they stay not until published.
    few: bool,
}

impl PendingRemovals {
    /// When these removals count as stopped (if none comes meanwhile), and when they have
    /// waited the longest (more may still be coming then).
    fn deadlines(&self) -> (Instant, Instant) {
        let (quiet, longest) = if self.few {
            (REMOVAL_QUIET_FEW, REMOVAL_MAX_WAIT)
        } else {
            (REMOVAL_QUIET, REMOVAL_MAX_WAIT_MANY)
        };
        (self.last + quiet, self.first + longest)
    }
}

/// How far back the delete guard adds up removals (further while a deletion goes on: see
/// `deletion_goes_on`).
pub(crate) const GUARD_WINDOW: Duration = Duration::from_secs(10);
/// A folder with removals that are not few is published once none has been seen for this long
/// (at most [`REMOVAL_MAX_WAIT_MANY`] after the first): an `rm -rf` reaches the delete guard as
/// one deletion, not as slices each under the share, and an artifact replaced by removing the
/// old version and adding the new one changes on the workers in one generation. An `rm -rf` of
/// 100,000 files here paused for 100-200 ms now and then, and at 100 ms each pause let a slice
/// out: 48% of the folder was deleted on the workers before the guard held the rest.
pub(crate) const REMOVAL_QUIET: Duration = Duration::from_secs(1);
/// The quiet time of removals that are still few (files removed, with those published within
/// [`GUARD_WINDOW`], at most [`FEW_REMOVALS_SHARE`] of the folder's published entries): an operator's single deletion goes out
/// without the full wait. An `rm -rf` unlinks far faster than this, so its removals cross the
/// share and get the full wait before it pauses; if it stalls longer right at its start, the
/// few files removed by then go out and the guard still sees the whole.
pub(crate) const REMOVAL_QUIET_FEW: Duration = Duration::from_millis(30);
/// Removals up to this share of a folder's entries (and at least one file) are few.
const FEW_REMOVALS_SHARE: f64 = 0.01;
/// Longest a removal waits for removals to stop, while they are few.
pub(crate) const REMOVAL_MAX_WAIT: Duration = Duration::from_secs(2);
/// Longest removals that are not few wait for removals to stop (an `rm -rf` of 100,000 files
/// takes about 20 s here). A deletion that lasts longer goes out in slices, and the guard adds
/// them all up until it stops.
pub(crate) const REMOVAL_MAX_WAIT_MANY: Duration = Duration::from_secs(30);

impl LiveFolder {
    /// A folder starting from what was last published (persisted state), to be walked.
    pub(crate) fn new(spec: FolderSpec, published: Option<Arc<LocalManifest>>) -> LiveFolder {
        let working = published.clone().unwrap_or_else(|| {
            Arc::new(LocalManifest {
                manifest: Manifest::new(ChunkParams::DEFAULT),
                ..LocalManifest::default()
            })
        });
        LiveFolder {
            spec,
            root: None,
            published,
            working,
            touched: None,
            dirty: BTreeSet::new(),
            rescan_all: true,
            writing: BTreeSet::new(),
            closed: BTreeSet::new(),
            candidates: BTreeMap::new(),
            held: BTreeMap::new(),
            skipped: BTreeMap::new(),
            root_failed: false,
            guarded: None,
            confirmed: None,
            recent_removals: Default::default(),
            deletion_goes_on: false,
            removals_cut: false,
            pending_removals: None,
            tilings: HashMap::new(),
            skipped_log: SkippedLog::default(),
        }
    }

    /// Files removed by generations published within [`GUARD_WINDOW`] of `now`, or since the
    /// start of a deletion that goes on (see `deletion_goes_on`).
    pub(crate) fn recent_removals(&mut self, now: Instant) -> usize {
        while !self.deletion_goes_on
            && self
                .recent_removals
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > GUARD_WINDOW)
        {
            self.recent_removals.pop_front();
        }
        self.recent_removals.iter().map(|(_, n)| n).sum()
    }

    /// Records that a generation removing `files` files was published at `now`; a confirmed
    /// deletion starts the count afresh.
    pub(crate) fn record_removals(&mut self, now: Instant, files: usize, confirmed: bool) {
        let cut = std::mem::take(&mut self.removals_cut);
        self.deletion_goes_on = files > 0 && cut;
        if confirmed {
            self.recent_removals.clear();
        } else if files > 0 {
            self.recent_removals.push_back((now, files));
        }
    }

    /// Whether the guard lets `target` be published (the operator confirmed exactly it);
    /// otherwise records and logs (once) why it is held.
    pub(crate) fn guard_allows(&mut self, reason: GuardReason, target: &Manifest) -> bool {
        let digest = target.digest();
        if self.confirmed == Some(digest) {
            tracing::warn!(folder = %self.spec.name, ?reason, "publishing on the operator's confirmation");
            return true;
        }
        if self.guarded.as_ref().map(|g| g.target) != Some(digest) {
            match &reason {
                GuardReason::RootUnreadable => tracing::error!(
                    folder = %self.spec.name,
                    path = %self.spec.path.display(),
                    "DELETE GUARD: the folder root is gone or unreadable; nothing is published (workers keep their copy). `syncctl confirm {}` would delete it on every worker",
                    self.spec.name
                ),
                GuardReason::MassDelete { removed, total } => tracing::error!(
                    folder = %self.spec.name,
                    removed,
                    total,
                    "DELETE GUARD: this change would delete {removed} of {total} files on every worker; held until `syncctl confirm {}`",
                    self.spec.name
                ),
            }
            self.guarded = Some(Guarded {
                reason,
                target: digest,
                since: std::time::SystemTime::now(),
            });
        }
        false
    }

    /// The pending generation passes the guard (or there is none): forget any verdict.
    pub(crate) fn clear_guard(&mut self) {
        if self.guarded.take().is_some() {
            tracing::info!(folder = %self.spec.name, "delete guard released");
        }
        self.confirmed = None;
    }

    /// The operator confirms publishing what the guard holds back. Returns whether there was
    /// anything to confirm.
    pub(crate) fn confirm(&mut self) -> bool {
        match &self.guarded {
            Some(g) => {
                self.confirmed = Some(g.target);
                true
            }
            None => false,
        }
    }

    /// Records a watcher hint.
    pub(crate) fn hint(&mut self, path: RelPath, hint: Hint) {
        match hint {
            Hint::Writing => {
                self.writing.insert(path.clone());
                self.closed.remove(&path);
            }
            Hint::Written => {
                // No longer held for being written: until it is published (or held again for
                // another reason), it is settling, and a `syncctl wait` waits for it.
                if self.writing.remove(&path) {
                    self.held.remove(&path);
                }
                self.closed.insert(path.clone());
            }
            Hint::Changed => {}
        }
        self.dirty.insert(path);
    }

    /// Asks for a full walk, for a `syncctl wait`: no event was lost, so what is known about
    /// writers stays (a file a writer still has open stays held; see `written_lately`).
    pub(crate) fn look_again(&mut self) {
        self.rescan_all = true;
    }

    /// Asks for a full walk (the watcher lost events, or a periodic check).
    pub(crate) fn rescan(&mut self) {
        self.rescan_all = true;
        // Events may have been lost: what we believed about writers is no longer reliable.
        self.writing.clear();
        self.closed.clear();
    }

    /// Whether there is anything to look at now.
    pub(crate) fn has_dirty(&self) -> bool {
        self.rescan_all || !self.dirty.is_empty()
    }

    /// When the next candidate becomes ready, or removals may be published.
    pub(crate) fn next_ready(&self) -> Option<Instant> {
        self.candidates
            .values()
            .map(|c| c.ready_at)
            .chain(self.removals_due())
            .min()
    }

    /// When the next file that is only waiting out its settle time (not held for being
    /// incomplete) will be ready.
    pub(crate) fn next_settled(&self) -> Option<Instant> {
        self.candidates
            .iter()
            .filter(|(p, _)| !self.held.contains_key(*p))
            .map(|(_, c)| c.ready_at)
            .min()
    }

    fn removals_due(&self) -> Option<Instant> {
        self.pending_removals.map(|r| {
            let (stopped, longest) = r.deadlines();
            // Hints not examined yet wake the folder by themselves (see `expire_removals`).
            if self.has_dirty() {
                longest
            } else {
                stopped.min(longest)
            }
        })
    }

    /// Whether removals were seen that have not stopped for [`REMOVAL_QUIET`] yet: the folder
    /// is not published meanwhile.
    pub(crate) fn removals_pending(&self) -> bool {
        self.pending_removals.is_some()
    }

    /// Lets removals through once they have stopped for [`REMOVAL_QUIET`] (or waited the
    /// longest: then the deletion goes on, see `deletion_goes_on`).
    pub(crate) fn expire_removals(&mut self, now: Instant) {
        let Some(r) = self.pending_removals else {
            return;
        };
        let (stopped, longest) = r.deadlines();
        // Hints not examined yet may be more removals: they are looked at before the removals
        // count as stopped.
        let quiet = stopped <= now && !self.has_dirty();
        if quiet || longest <= now {
            self.pending_removals = None;
            self.removals_cut = !quiet;
        }
    }

    /// Whether a file a writer has open was written to within [`WRITTEN_LATELY`]. Its close
    /// may simply not have reached this process yet: a `syncctl wait` right after a large copy
    /// travels the admin socket faster than the copy's tens of thousands of watch events, and
    /// used to answer before the file was even looked at. A file a writer merely keeps open,
    /// quiet, is not waited for.
    pub(crate) fn written_lately(&self) -> bool {
        self.writing.iter().any(|p| {
            std::fs::symlink_metadata(self.spec.path.join(p.as_str()))
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < WRITTEN_LATELY))
        })
    }

    /// Whether changes are still settling (candidates waiting, removals not yet quiet; held
    /// files do not count).
    pub(crate) fn settling(&self) -> bool {
        self.has_dirty()
            || self.pending_removals.is_some()
            || self.candidates.keys().any(|p| !self.held.contains_key(p))
    }

    /// Looks again at every hinted path (or the whole folder), turning changed files into
    /// candidates. Directories, links and removals take effect in the working state at once.
    pub(crate) fn examine(&mut self, now: Instant) {
        let root_path = self.spec.path.clone();
        match std::fs::metadata(&root_path) {
            Ok(m) if m.is_dir() => {
                if self.root.is_none() || self.rescan_all {
                    match FolderRoot::open(&root_path) {
                        Ok(r) => self.root = Some(Arc::new(r)),
                        Err(e) => return self.root_unreadable(&e.to_string()),
                    }
                }
                if self.root_failed {
                    tracing::info!(folder = %self.spec.name, "folder readable again");
                    self.root_failed = false;
                    self.rescan_all = true;
                }
            }
            Ok(_) => return self.root_unreadable("not a directory"),
            Err(e) => return self.root_unreadable(&e.to_string()),
        }
        if std::mem::take(&mut self.rescan_all) {
            self.dirty.clear();
            self.walk_all(now);
            return;
        }
        let dirty = std::mem::take(&mut self.dirty);
        // A directory's mtime changes with its entries: look at the parents too.
        let parents: BTreeSet<RelPath> = dirty.iter().filter_map(RelPath::parent).collect();
        for path in dirty.iter().chain(parents.difference(&dirty)) {
            if !self.is_excluded(path, false) {
                self.examine_path(path, now);
            }
        }
    }

    fn root_unreadable(&mut self, why: &str) {
        if !self.root_failed {
            tracing::error!(
                folder = %self.spec.name,
                path = %self.spec.path.display(),
                error = why,
                "folder cannot be read; keeping its last published state (never published as empty)"
            );
        }
        self.root_failed = true;
        self.dirty.clear();
    }

    fn is_excluded(&self, path: &RelPath, is_dir: bool) -> bool {
        self.spec.excludes.is_excluded(path, is_dir)
    }

    fn examine_path(&mut self, path: &RelPath, now: Instant) {
        let known: BTreeMap<String, String> = self
            .skipped
            .remove_entry(path.as_str())
            .into_iter()
            .collect();
        let was_skipped = !known.is_empty();
        let seen = match observe(&self.spec.path, path) {
            Ok(s) => s,
            Err(w) => {
                self.note_skipped(&w, Some(&known));
                if w.is_unreadable() {
                    // Unknown is not absent: what was published for it stays.
                    return;
                }
                None
            }
        };
        if let Some(s) = &seen
            && self.is_excluded(path, matches!(s, Seen::Dir { .. }))
        {
            return;
        }
        if let Some(parent) = path.parent()
            && !self.working.manifest.get(&parent).is_some_and(Node::is_dir)
            && seen.is_some()
        {
            // Its directory is not known yet (created in the same instant): walk from the top
            // of what is new.
            let mut top = parent;
            while let Some(up) = top.parent() {
                if self.working.manifest.get(&up).is_some_and(Node::is_dir) {
                    break;
                }
                top = up;
            }
            return self.examine_path(&top, now);
        }
        match seen {
            None => {
                // Gone, or something syncd cannot carry: nothing beneath it is there any more.
                self.skipped.take_beneath(path.as_str());
                self.forget_subtree(path, now);
            }
            Some(Seen::File { key, mode: _ }) => {
                if !matches!(self.working.manifest.get(path), Some(n) if n.file().is_some()) {
                    self.replace_subtree(path);
                }
                self.consider_file(path.clone(), key, now);
            }
            Some(s @ Seen::Symlink { .. }) => {
                self.replace_subtree(path);
                self.put(path.clone(), s.node().expect("links have nodes"));
            }
            Some(s @ Seen::Dir { .. }) => {
                let known_dir = self.working.manifest.get(path).is_some_and(Node::is_dir);
                if !known_dir {
                    self.replace_subtree(path);
                }
                self.put(path.clone(), s.node().expect("directories have nodes"));
                if !known_dir || was_skipped {
                    // A new directory (created, or moved in with its contents), or one that
                    // could not be read before: walk it.
                    self.walk_under(Some(path), now);
                }
            }
        }
    }

    fn walk_all(&mut self, now: Instant) {
        let before: BTreeSet<RelPath> = self
            .working
            .manifest
            .iter()
            .map(|(p, _)| p.clone())
            .collect();
        let (seen, unreadable) = self.walk_under(None, now);
        for gone in before.difference(&seen) {
            // Beneath a directory that could not be listed, or an entry that could not be
            // looked at, nothing is known: what was published there stays.
            if unreadable.iter().any(|u| gone.starts_with(u)) {
                continue;
            }
            self.forget_subtree(gone, now);
        }
    }

    /// Walks beneath `start`, updating directories and links and considering files. Returns
    /// every path seen, and the paths that could not be read (a directory that cannot be
    /// listed, an entry that cannot be looked at).
    fn walk_under(
        &mut self,
        start: Option<&RelPath>,
        now: Instant,
    ) -> (BTreeSet<RelPath>, Vec<RelPath>) {
        let mut seen = Vec::new();
        let mut warnings = Vec::new();
        if let Err(e) = walk(
            &self.spec.path,
            start,
            &self.spec.excludes,
            &mut seen,
            &mut warnings,
        ) {
            tracing::warn!(folder = %self.spec.name, error = %e, "cannot walk {}", start.map_or("the folder root", RelPath::as_str));
        }
        // What was skipped beneath `start` is found again by this walk, or is gone.
        let known = match start {
            None => std::mem::take(&mut self.skipped),
            Some(start) => {
                let mut under: BTreeMap<String, String> = self
                    .skipped
                    .take_beneath(start.as_str())
                    .into_iter()
                    .collect();
                under.extend(self.skipped.remove_entry(start.as_str()));
                under
            }
        };
        let mut unreadable = Vec::new();
        for w in &warnings {
            if let Some(rel) = self.note_skipped(w, Some(&known))
                && w.is_unreadable()
                && let Ok(rel) = RelPath::new(rel)
            {
                unreadable.push(rel);
            }
        }
        // Parents before children, so type changes clear the way for what is beneath.
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        let mut paths = BTreeSet::new();
        for (path, s) in seen {
            paths.insert(path.clone());
            match s {
                Seen::File { key, .. } => {
                    if !matches!(self.working.manifest.get(&path), Some(n) if n.file().is_some()) {
                        self.replace_subtree(&path);
                    }
                    self.consider_file(path, key, now);
                }
                other => {
                    let node = other.node().expect("directories and links have nodes");
                    let same_kind = self
                        .working
                        .manifest
                        .get(&path)
                        .is_some_and(|n| n.is_dir() == node.is_dir() && n.file().is_none());
                    if !same_kind {
                        self.replace_subtree(&path);
                    }
                    self.put(path, node);
                }
            }
        }
        (paths, unreadable)
    }

    /// Notes an entry that is not synced, logging it unless `known` (what was noted before a
    /// walk) already said the same. Returns its path in the folder.
    fn note_skipped(
        &mut self,
        w: &ScanWarning,
        known: Option<&BTreeMap<String, String>>,
    ) -> Option<String> {
        let abs = w.path();
        let rel = abs.strip_prefix(&self.spec.path).ok()?;
        let rel = rel.to_string_lossy().into_owned();
        let reason = w.reason();
        if known.and_then(|k| k.get(&rel)) != Some(&reason)
            && self.skipped.get(&rel) != Some(&reason)
        {
            // One line each for the first few a minute: 50,000 FIFOs made 50,000 lines.
            let (earlier, this) = self.skipped_log.note(Instant::now());
            if earlier > 0 {
                tracing::warn!(folder = %self.spec.name, more = earlier, total = self.skipped.len(), "more entries not synced in the last minute (`syncctl status` lists them)");
            }
            match this {
                Logged::Yes => {
                    tracing::warn!(folder = %self.spec.name, path = %rel, %reason, "not synced")
                }
                Logged::FirstUnlogged => {
                    tracing::warn!(folder = %self.spec.name, "more entries not synced: counted, not logged, for the rest of the minute (`syncctl status` lists them)")
                }
                Logged::No => {}
            }
        }
        self.skipped.insert(rel.clone(), reason);
        Some(rel)
    }

    /// A file is on disk with stat `key`: unchanged, held (a writer has it open), or a candidate.
    fn consider_file(&mut self, path: RelPath, key: StatKey, now: Instant) {
        if self.working.reusable(&path, &key).is_some() {
            self.candidates.remove(&path);
            self.held.remove(&path);
            return;
        }
        if self.writing.contains(&path) {
            self.candidates.remove(&path);
            self.hold(&path, "being written (no close seen yet)");
            return;
        }
        let wait = if self.closed.contains(&path) || quiet_for(&key) >= SETTLE_DISCOVERED {
            SETTLE_AFTER_CLOSE
        } else {
            SETTLE_DISCOVERED
        };
        let ready_at = now + wait;
        match self.candidates.get_mut(&path) {
            // Unchanged since it became a candidate: its wait goes on (repeated hints about a
            // quiet file must not postpone it forever); a close may shorten it.
            Some(c) if c.key == key => c.ready_at = c.ready_at.min(ready_at),
            _ => {
                self.candidates.insert(path, Candidate { key, ready_at });
            }
        }
    }

    fn hold(&mut self, path: &RelPath, reason: &str) {
        let folder = &self.spec.name;
        let entry = self.held.entry(path.clone()).or_insert_with(|| {
            tracing::info!(%folder, %path, reason, "holding: not complete, not published yet");
            Held {
                reason: reason.to_owned(),
                since: std::time::SystemTime::now(),
            }
        });
        if entry.reason != reason {
            tracing::info!(%folder, %path, reason, "still holding");
            entry.reason = reason.to_owned();
        }
    }

    /// A held file became complete.
    fn release(&mut self, path: &RelPath) {
        if let Some(h) = self.held.remove(path) {
            let waited = h.since.elapsed().unwrap_or_default();
            tracing::info!(folder = %self.spec.name, %path, waited_ms = waited.as_millis() as u64, "complete now; publishing");
        }
    }

    /// Removes `path` and everything beneath it from the working state, with what was known
    /// about writers there: the path is gone.
    fn forget_subtree(&mut self, path: &RelPath, now: Instant) {
        if let Some(files) = self.replace_subtree(path) {
            let before = self.pending_removals.unwrap_or(PendingRemovals {
                first: now,
                last: now,
                files: 0,
                few: true,
            });
            let files = before.files + files;
            let few = before.few && {
                // Entries, not files: counting files would be a pass over the folder.
                let total = self.published.as_ref().map_or(0, |p| p.manifest.len());
                let limit = ((total as f64 * FEW_REMOVALS_SHARE) as usize).max(1);
                files + self.recent_removals(now) <= limit
            };
            self.pending_removals = Some(PendingRemovals {
                first: before.first,
                last: now,
                files,
                few,
            });
        }
        // By range, not by a pass over each map: a rescan that finds a moved directory's
        // 100,000 files gone forgets them one by one while the files at the new name wait as
        // candidates (a pass each took a `wait` after such a move 9 minutes).
        let path = path.as_str();
        remove_subtree(&mut self.candidates, path);
        remove_subtree(&mut self.held, path);
        remove_subtree(&mut self.writing, path);
        remove_subtree(&mut self.closed, path);
    }

    /// Removes `path` and everything beneath it from the working state, keeping what is known
    /// about writers (the path is still there, as something else; hints about paths beneath it
    /// are fresh, and a stale one is dropped when its path is looked at and found gone).
    /// Returns how many files it removed, or `None` if nothing was at `path`.
    fn replace_subtree(&mut self, path: &RelPath) -> Option<usize> {
        let doomed: Vec<(RelPath, bool)> = self
            .working
            .manifest
            .subtree(path)
            .map(|(p, n)| (p.clone(), n.file().is_some()))
            .collect();
        if doomed.is_empty() {
            return None;
        }
        let working = self.working_mut();
        for (p, _) in &doomed {
            working.manifest.remove(p);
            working.stats.remove(p);
        }
        for (p, _) in &doomed {
            self.touch(p);
        }
        Some(doomed.iter().filter(|(_, file)| *file).count())
    }

    /// The working state, to change: copied first if it is still shared with what is
    /// published (once per generation, at its first change).
    fn working_mut(&mut self) -> &mut LocalManifest {
        Arc::make_mut(&mut self.working)
    }

    /// Notes that the working entry at `path` changed (see `touched`).
    fn touch(&mut self, path: &RelPath) {
        if let Some(t) = &mut self.touched {
            if t.len() >= TOUCHED_LIMIT {
                self.touched = None;
            } else {
                t.insert(path.clone());
            }
        }
    }

    /// The paths where what is published and the working state can differ (see `touched`).
    pub(crate) fn touched(&self) -> Option<&BTreeSet<RelPath>> {
        self.touched.as_ref()
    }

    /// Whether `candidate` (from [`LiveFolder::publishable`]) is the working state itself.
    pub(crate) fn is_working(&self, candidate: &Arc<LocalManifest>) -> bool {
        Arc::ptr_eq(candidate, &self.working)
    }

    /// Sets a directory's or link's node, leaving the working state shared if it is unchanged
    /// (a rescan looks at every directory again).
    fn put(&mut self, path: RelPath, node: Node) {
        if self.working.manifest.get(&path) != Some(&node) {
            self.touch(&path);
            self.working_mut().manifest.insert(path, node);
        }
    }

    /// Checks every candidate whose wait is over: re-stat, archive check, hash. Complete files
    /// enter the working state; the rest wait longer or are held.
    pub(crate) fn settle(&mut self, now: Instant, chunker: &Chunker, threads: usize) {
        let ready: Vec<RelPath> = self
            .candidates
            .iter()
            .filter(|(_, c)| c.ready_at <= now)
            .map(|(p, _)| p.clone())
            .collect();
        let mut to_hash = Vec::new();
        let mut keys = HashMap::new();
        for path in ready {
            let c = self
                .candidates
                .remove(&path)
                .expect("ready candidates are in the map");
            match observe(&self.spec.path, &path) {
                Ok(Some(Seen::File { key, .. })) if key == c.key => {
                    if is_archive(path.file_name()) {
                        let complete = self
                            .root
                            .as_ref()
                            .ok_or_else(|| "folder unreadable".to_owned())
                            .and_then(|r| r.open_file(&path).map_err(|e| e.to_string()))
                            .and_then(|f| check_archive(&f, key.size).map_err(|e| e.to_string()));
                        if let Err(why) = complete {
                            self.hold(&path, &format!("incomplete archive: {why}"));
                            self.candidates.insert(
                                path,
                                Candidate {
                                    key,
                                    ready_at: now + RECHECK_ARCHIVE,
                                },
                            );
                            continue;
                        }
                    }
                    // The version hashed last, if its tiling is known: the tiling names the
                    // content it belongs to, so a stale one is not used.
                    let reuse = self.tilings.get(&path).and_then(|tiling| {
                        let content = self.working.manifest.get(&path)?.file()?.clone();
                        Some(Reuse {
                            content,
                            tiling: tiling.clone(),
                        })
                    });
                    keys.insert(path.clone(), key);
                    to_hash.push((path.clone(), self.spec.path.join(path.as_str()), reuse));
                }
                Ok(Some(Seen::File { key, .. })) => {
                    // Still changing: wait for it to be quiet.
                    self.consider_file(path, key, now);
                }
                // Gone or no longer a file: the next look at the path sorts it out.
                _ => {
                    self.dirty.insert(path);
                }
            }
        }
        if to_hash.is_empty() {
            return;
        }
        let (files, started) = (to_hash.len(), Instant::now());
        let hashed = syncd_fsops::hash_files_reusing(chunker, to_hash, threads);
        tracing::debug!(
            folder = %self.spec.name,
            files,
            hash_ms = started.elapsed().as_millis() as u64,
            "hashed settled files"
        );
        let mut entered = 0;
        for (path, result, tiling) in hashed {
            match tiling {
                Some(t) => self.tilings.insert(path.clone(), t),
                None => self.tilings.remove(&path),
            };
            match result {
                Ok((node, key)) => {
                    let working = self.working_mut();
                    working.manifest.insert(path.clone(), node);
                    working.stats.insert(path.clone(), key);
                    self.touch(&path);
                    entered += 1;
                    self.release(&path);
                    self.closed.remove(&path);
                }
                Err(w) if w.is_unreadable() => {
                    // Tried again after a while, or at once when its stat key changes (a
                    // chmod); its last published version stays published meanwhile.
                    self.hold(&path, &w.reason());
                    if let Some(key) = keys.remove(&path) {
                        let ready_at = now + RECHECK_UNREADABLE;
                        self.candidates.insert(path, Candidate { key, ready_at });
                    }
                }
                Err(w) => {
                    tracing::debug!(folder = %self.spec.name, "{w}");
                    self.dirty.insert(path);
                }
            }
        }
        // Inserting in path order leaves the map's nodes half full; a large batch (the first
        // walk, a big deployment) is worth packing again.
        if entered >= COMPACT_AFTER {
            self.working_mut().compact();
        }
    }

    /// What may be published now: the working state, except new directories that still hold
    /// files in flux (a new directory, such as an exploded webapp, appears whole).
    pub(crate) fn publishable(&self) -> Option<Arc<LocalManifest>> {
        if self.root_failed && self.published.is_some() {
            return None;
        }
        let published = self.published.as_deref();
        let is_published = |p: &RelPath| published.is_some_and(|m| m.manifest.get(p).is_some());
        let mut blocked: BTreeSet<RelPath> = BTreeSet::new();
        // Files still in flux (a writer has them open, or they are waiting out their settle
        // time) hold back the new directory they are in. A file held only because its archive
        // does not parse does not: it may stay broken, and must not hide its neighbours.
        let pending = self
            .candidates
            .keys()
            .filter(|p| !self.held.contains_key(*p))
            .chain(self.writing.iter());
        for path in pending {
            // The outermost directory above it that is not published yet.
            if let Some(top) = path.ancestors().find(|a| !is_published(a)) {
                blocked.insert(top);
            }
        }
        // The working state was a tree when last published as it is: only what changed since
        // can have made it otherwise.
        let orphans = match &self.touched {
            Some(touched) => self.working.has_orphans_at(touched),
            None => self.working.has_orphans(),
        };
        // Every test run checks the shortcut against the whole check.
        debug_assert_eq!(
            orphans,
            self.working.has_orphans(),
            "orphans in {}",
            self.spec.name
        );
        if blocked.is_empty() && !orphans {
            // The usual case: what is published is the working state itself, shared.
            return Some(self.working.clone());
        }
        let mut next = LocalManifest::clone(&self.working);
        for top in blocked {
            let doomed: Vec<RelPath> = next
                .manifest
                .subtree(&top)
                .map(|(p, _)| p.clone())
                .collect();
            for p in doomed {
                // Keep what is already published beneath it, as published, with the stat key
                // of that version: the newer one's would make a restart take the old version
                // for what is on disk.
                match published.and_then(|m| m.manifest.get(&p)) {
                    Some(n) => {
                        next.manifest.insert(p.clone(), n.clone());
                        match published.and_then(|m| m.stats.get(&p)) {
                            Some(k) => next.stats.insert(p.clone(), *k),
                            None => next.stats.remove(&p),
                        };
                    }
                    None => {
                        next.manifest.remove(&p);
                        next.stats.remove(&p);
                    }
                }
            }
        }
        next.drop_orphans();
        Some(Arc::new(next))
    }

    /// Records what was published.
    pub(crate) fn set_published(&mut self, published: Arc<LocalManifest>) {
        // Published as it is, the working state starts again from no change. Otherwise (new
        // directories held back) what changed since it was last published as it is still
        // covers every difference.
        if Arc::ptr_eq(&published, &self.working) {
            self.touched = Some(BTreeSet::new());
        }
        self.published = Some(published);
    }
}

/// Changed paths noted beyond which a generation is checked and listed by a pass over the
/// whole folder (as cheap, per path, once this many changed).
const TOUCHED_LIMIT: usize = 65_536;

/// Files entering the working state at once beyond which its map is packed again.
const COMPACT_AFTER: usize = 4096;

/// A sorted map or set keyed by path (`/`-separated, in a folder), from which what lies
/// beneath a path is taken by range, not by a pass over every key.
trait PathKeyed {
    /// An entry: a key, or a key and its value.
    type Entry;
    /// Removes and returns the entries strictly beneath `path`: O(taken * log n).
    fn take_beneath(&mut self, path: &str) -> Vec<Self::Entry>;
    /// Removes `path` itself.
    fn remove_path(&mut self, path: &str);
}

/// The keys beneath `path` are one range in the byte order of paths: from `path/` up to
/// `path0` (`0` follows `/`), which leaves out siblings such as `path-old` or `path.d`.
fn beneath_bounds(path: &str) -> (String, String) {
    (format!("{path}/"), format!("{path}0"))
}

impl<K: Ord + Clone + std::borrow::Borrow<str>, V> PathKeyed for BTreeMap<K, V> {
    type Entry = (K, V);
    fn take_beneath(&mut self, path: &str) -> Vec<(K, V)> {
        let (lo, hi) = beneath_bounds(path);
        let keys: Vec<K> = self
            .range::<str, _>((Included(lo.as_str()), Excluded(hi.as_str())))
            .map(|(k, _)| k.clone())
            .collect();
        keys.iter()
            .filter_map(|k| self.remove_entry(k.borrow()))
            .collect()
    }
    fn remove_path(&mut self, path: &str) {
        self.remove(path);
    }
}

impl<K: Ord + Clone + std::borrow::Borrow<str>> PathKeyed for BTreeSet<K> {
    type Entry = K;
    fn take_beneath(&mut self, path: &str) -> Vec<K> {
        let (lo, hi) = beneath_bounds(path);
        let keys: Vec<K> = self
            .range::<str, _>((Included(lo.as_str()), Excluded(hi.as_str())))
            .cloned()
            .collect();
        keys.into_iter()
            .filter(|k| self.remove(k.borrow()))
            .collect()
    }
    fn remove_path(&mut self, path: &str) {
        self.remove(path);
    }
}

/// Removes `path` and every key beneath it.
fn remove_subtree(keyed: &mut impl PathKeyed, path: &str) {
    keyed.take_beneath(path);
    keyed.remove_path(path);
}

/// How long ago the file's inode last changed (data or metadata: the change time moves with
/// both, and no one can set it back). A change time in the future (the clock went back) counts
/// as just now.
fn quiet_for(key: &StatKey) -> Duration {
    std::time::SystemTime::now()
        .duration_since(syncd_fsops::to_system_time(key.ctime))
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn folder(dir: &std::path::Path) -> LiveFolder {
        LiveFolder::new(FolderSpec::new("f", dir), None)
    }

    fn chunker() -> Chunker {
        Chunker::new(ChunkParams::DEFAULT).unwrap()
    }

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn settle_all(f: &mut LiveFolder) -> Instant {
        let mut now = Instant::now();
        f.examine(now);
        for _ in 0..5 {
            now += Duration::from_secs(2);
            f.settle(now, &chunker(), 1);
            if f.has_dirty() {
                f.examine(now);
            }
        }
        now
    }

    #[test]
    fn entries_syncd_cannot_carry_are_listed_as_not_synced_until_they_are_gone() {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::net::UnixListener;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join("a.xml"), b"<a/>").unwrap();
        fs::create_dir(d.join("sub")).unwrap();
        let _sock = UnixListener::bind(d.join("sub/sock")).unwrap();
        std::os::unix::fs::symlink("/etc", d.join("out")).unwrap();
        fs::write(d.join(std::ffi::OsStr::from_bytes(b"b\xff")), b"x").unwrap();
        let mut f = folder(d);
        settle_all(&mut f);
        let listed = |f: &LiveFolder| f.skipped.keys().cloned().collect::<Vec<_>>();
        assert_eq!(listed(&f), ["b\u{FFFD}", "out", "sub/sock"]);
        assert!(f.skipped["out"].contains("absolute"), "{:?}", f.skipped);
        assert!(f.skipped["sub/sock"].contains("not a file"));
        assert!(f.skipped["b\u{FFFD}"].contains("not UTF-8"));
        let m = f.publishable().unwrap();
        assert!(m.manifest.get(&p("a.xml")).is_some() && m.manifest.get(&p("sub")).is_some());
        assert!(m.manifest.get(&p("out")).is_none() && m.manifest.get(&p("sub/sock")).is_none());

        // Gone, or replaced by something syncd carries: no longer listed.
        fs::remove_file(d.join("sub/sock")).unwrap();
        f.hint(p("sub/sock"), Hint::Changed);
        fs::remove_file(d.join("out")).unwrap();
        fs::write(d.join("out"), b"now a file").unwrap();
        f.hint(p("out"), Hint::Written);
        settle_all(&mut f);
        assert_eq!(listed(&f), ["b\u{FFFD}"]);
        assert!(f.publishable().unwrap().manifest.get(&p("out")).is_some());

        // A looked-at directory keeps what is listed beneath it; a removed one does not.
        let _sock2 = UnixListener::bind(d.join("sub/sock2")).unwrap();
        f.hint(p("sub/sock2"), Hint::Changed);
        settle_all(&mut f);
        f.hint(p("sub"), Hint::Changed);
        settle_all(&mut f);
        assert_eq!(listed(&f), ["b\u{FFFD}", "sub/sock2"]);
        fs::remove_dir_all(d.join("sub")).unwrap();
        f.hint(p("sub"), Hint::Changed);
        settle_all(&mut f);
        assert_eq!(listed(&f), ["b\u{FFFD}"]);

        // A full walk finds the same again (names that are not UTF-8 are found only by walks).
        f.rescan();
        settle_all(&mut f);
        assert_eq!(listed(&f), ["b\u{FFFD}"]);
    }

    #[test]
    fn a_file_being_written_is_held_and_published_once_closed() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = folder(dir.path());
        settle_all(&mut f);
        fs::write(dir.path().join("a.xml"), b"<half").unwrap();
        f.hint(p("a.xml"), Hint::Writing);
        let now = settle_all(&mut f);
        assert!(f.held.contains_key(&p("a.xml")));
        assert!(f.publishable().unwrap().manifest.get(&p("a.xml")).is_none());
        fs::write(dir.path().join("a.xml"), b"<whole/>").unwrap();
        f.hint(p("a.xml"), Hint::Written);
        f.examine(now);
        f.settle(now + SETTLE_AFTER_CLOSE, &chunker(), 1);
        let m = f.publishable().unwrap();
        assert_eq!(m.manifest.get(&p("a.xml")).unwrap().file().unwrap().size, 8);
        assert!(f.held.is_empty());
    }

    #[test]
    fn at_rest_the_published_state_is_the_working_state_itself() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        for i in 0..3 {
            fs::write(dir.path().join(format!("sub/{i}.xml")), b"<x/>").unwrap();
        }
        let mut f = folder(dir.path());
        settle_all(&mut f);
        f.set_published(f.publishable().unwrap());
        let shared = |f: &LiveFolder| Arc::ptr_eq(&f.working, f.published.as_ref().unwrap());
        assert!(shared(&f));
        // A full walk that finds nothing new copies nothing.
        f.rescan();
        settle_all(&mut f);
        assert!(shared(&f));
        // A change makes a working copy; the published version stays as it was.
        fs::write(dir.path().join("sub/1.xml"), b"<changed/>").unwrap();
        f.hint(p("sub/1.xml"), Hint::Written);
        settle_all(&mut f);
        assert!(!shared(&f));
        let old = f.published.clone().unwrap();
        assert_eq!(
            old.manifest
                .get(&p("sub/1.xml"))
                .unwrap()
                .file()
                .unwrap()
                .size,
            4
        );
        let next = f.publishable().unwrap();
        assert_eq!(
            next.manifest
                .get(&p("sub/1.xml"))
                .unwrap()
                .file()
                .unwrap()
                .size,
            10
        );
        f.set_published(next);
        assert!(shared(&f));
    }

    /// A folder of `n` XMLs (`0.xml`...), settled and published; and the time it settled.
    fn published_xmls(dir: &std::path::Path, n: usize) -> (LiveFolder, Instant) {
        for i in 0..n {
            fs::write(dir.join(format!("{i}.xml")), b"<x/>").unwrap();
        }
        let mut f = folder(dir);
        let now = settle_all(&mut f);
        f.set_published(f.publishable().unwrap());
        (f, now)
    }

    #[test]
    fn removals_wait_until_they_stop_coming() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, mut now) = published_xmls(dir.path(), 3);
        assert!(!f.removals_pending());
        // Removals keep coming every 100 ms: nothing is due until they stop.
        for i in 0..3 {
            fs::remove_file(dir.path().join(format!("{i}.xml"))).unwrap();
            f.hint(p(&format!("{i}.xml")), Hint::Changed);
            f.examine(now);
            f.expire_removals(now);
            assert!(f.removals_pending() && f.settling());
            now += Duration::from_millis(100);
        }
        let due = f.next_ready().unwrap();
        assert_eq!(due, now - Duration::from_millis(100) + REMOVAL_QUIET);
        f.expire_removals(due - Duration::from_millis(1));
        assert!(f.removals_pending());
        f.expire_removals(due);
        assert!(!f.removals_pending() && !f.settling());
        assert_eq!(f.publishable().unwrap().manifest.len(), 0);
    }

    #[test]
    fn removing_a_subtree_by_range_leaves_its_siblings() {
        let p = |s: &str| RelPath::new(s).unwrap();
        let all = ["a", "a-old/x", "a.d", "a/b", "a/c/d", "a0", "ab", "b/a/c"];
        let mut set: BTreeSet<RelPath> = all.iter().map(|s| p(s)).collect();
        let mut map: BTreeMap<RelPath, u8> = all.iter().map(|s| (p(s), 0)).collect();
        remove_subtree(&mut set, "a");
        remove_subtree(&mut map, "a");
        let left = ["a-old/x", "a.d", "a0", "ab", "b/a/c"];
        assert_eq!(set.iter().map(RelPath::as_str).collect::<Vec<_>>(), left);
        assert_eq!(map.keys().map(RelPath::as_str).collect::<Vec<_>>(), left);
        remove_subtree(&mut set, "b/a");
        assert_eq!(set.len(), 4);
        remove_subtree(&mut set, "zz");
        assert_eq!(set.len(), 4);
    }

    /// A deletion that outlasts the longest wait goes out in slices; the guard adds them all
    /// up until it stops, however long ago the first slice went out.
    #[test]
    fn a_deletion_that_goes_on_counts_whole_until_it_stops() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, start) = published_xmls(dir.path(), 100);
        let remove = |f: &mut LiveFolder, i: usize, now: Instant| {
            fs::remove_file(dir.path().join(format!("{i}.xml"))).unwrap();
            f.hint(p(&format!("{i}.xml")), Hint::Changed);
            f.examine(now);
            f.expire_removals(now);
        };
        let at = |ms: u64| start + Duration::from_millis(ms);
        // One removal every 500 ms: never a second's quiet, cut off after the longest wait.
        let mut i = 0;
        while at(500 * i as u64) < start + REMOVAL_MAX_WAIT_MANY {
            remove(&mut f, i, at(500 * i as u64));
            assert!(f.removals_pending(), "removal {i}");
            i += 1;
        }
        let cut = start + REMOVAL_MAX_WAIT_MANY;
        assert_eq!(f.next_ready(), Some(cut));
        f.expire_removals(cut);
        assert!(!f.removals_pending());
        let first = i;
        f.set_published(f.publishable().unwrap());
        f.record_removals(cut, first, false);

        // The rest of it, then a second's quiet; published well after the guard's window.
        for j in first..first + 10 {
            remove(
                &mut f,
                j,
                cut + Duration::from_millis(500 * (j - first + 1) as u64),
            );
        }
        let stopped = cut + Duration::from_millis(5_000) + REMOVAL_QUIET;
        f.expire_removals(stopped);
        assert!(!f.removals_pending());
        let later = stopped + GUARD_WINDOW;
        assert_eq!(
            f.recent_removals(later),
            first,
            "the first slice was forgotten"
        );
        f.set_published(f.publishable().unwrap());
        f.record_removals(later, 10, false);
        // It stopped: what comes next counts only removals within the window again.
        assert_eq!(f.recent_removals(later + GUARD_WINDOW / 2), 10);
        assert_eq!(f.recent_removals(later + GUARD_WINDOW * 2), 0);
    }

    #[test]
    fn a_few_removals_wait_a_shorter_quiet_time_than_many() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, mut now) = published_xmls(dir.path(), 300);
        let remove = |f: &mut LiveFolder, i: usize, now: Instant| {
            fs::remove_file(dir.path().join(format!("{i}.xml"))).unwrap();
            f.hint(p(&format!("{i}.xml")), Hint::Changed);
            f.examine(now);
        };
        // One file of 300: few (the limit is 1% of the entries, two or three files here).
        remove(&mut f, 0, now);
        assert_eq!(f.next_ready(), Some(now + REMOVAL_QUIET_FEW));
        f.expire_removals(now + REMOVAL_QUIET_FEW);
        assert!(!f.removals_pending());
        let next = f.publishable().unwrap();
        f.set_published(next);
        f.record_removals(now, 1, false);
        // The second within the guard's window still is; the third is not.
        now += Duration::from_secs(1);
        remove(&mut f, 1, now);
        assert_eq!(f.next_ready(), Some(now + REMOVAL_QUIET_FEW));
        remove(&mut f, 2, now + Duration::from_millis(5));
        assert_eq!(
            f.next_ready(),
            Some(now + Duration::from_millis(5) + REMOVAL_QUIET)
        );
        // Many stay many until published, even when the count is recomputed.
        remove(&mut f, 3, now + Duration::from_millis(10));
        assert_eq!(
            f.next_ready(),
            Some(now + Duration::from_millis(10) + REMOVAL_QUIET)
        );
        f.expire_removals(now + Duration::from_millis(10) + REMOVAL_QUIET);
        assert!(!f.removals_pending());
        // Once the window has passed, a single removal is few again.
        now += GUARD_WINDOW + Duration::from_secs(1);
        let next = f.publishable().unwrap();
        f.set_published(next);
        remove(&mut f, 4, now);
        assert_eq!(f.next_ready(), Some(now + REMOVAL_QUIET_FEW));
    }

    #[test]
    fn a_found_file_waits_out_the_quiet_time_only_if_it_changed_lately() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("old.xml"), b"<old/>").unwrap();
        std::thread::sleep(SETTLE_DISCOVERED + Duration::from_millis(50));
        fs::write(dir.path().join("new.xml"), b"<new/>").unwrap();
        let mut f = folder(dir.path());
        let now = Instant::now();
        f.examine(now);
        // Untouched for longer than the quiet time already: published after the short wait.
        f.settle(now + SETTLE_AFTER_CLOSE, &chunker(), 1);
        let m = f.publishable().unwrap();
        assert!(m.manifest.get(&p("old.xml")).is_some());
        // Written a moment ago (its writer may still be at it): it waits the whole time.
        assert!(m.manifest.get(&p("new.xml")).is_none());
        f.settle(now + SETTLE_DISCOVERED, &chunker(), 1);
        assert!(
            f.publishable()
                .unwrap()
                .manifest
                .get(&p("new.xml"))
                .is_some()
        );
    }

    #[test]
    fn a_truncated_archive_is_held_until_complete() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = folder(dir.path());
        settle_all(&mut f);
        let z = crate::live::tests::zip_bytes();
        fs::write(dir.path().join("app.car"), &z[..z.len() / 2]).unwrap();
        f.hint(p("app.car"), Hint::Written);
        settle_all(&mut f);
        assert!(f.held[&p("app.car")].reason.contains("incomplete archive"));
        assert!(
            f.publishable()
                .unwrap()
                .manifest
                .get(&p("app.car"))
                .is_none()
        );
        fs::write(dir.path().join("app.car"), &z).unwrap();
        f.hint(p("app.car"), Hint::Written);
        settle_all(&mut f);
        assert!(f.held.is_empty());
        assert!(
            f.publishable()
                .unwrap()
                .manifest
                .get(&p("app.car"))
                .is_some()
        );
    }

    #[test]
    fn a_new_directory_appears_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = folder(dir.path());
        settle_all(&mut f);
        f.set_published(f.publishable().unwrap());
        fs::create_dir_all(dir.path().join("webapps/app/WEB-INF")).unwrap();
        fs::write(dir.path().join("webapps/app/index.html"), b"hi").unwrap();
        fs::write(dir.path().join("webapps/app/WEB-INF/web.xml"), b"<web").unwrap();
        f.hint(p("webapps"), Hint::Changed);
        f.hint(p("webapps/app/WEB-INF/web.xml"), Hint::Writing);
        let now = Instant::now();
        f.examine(now);
        f.settle(now + Duration::from_secs(1), &chunker(), 1);
        let m = f.publishable().unwrap();
        assert!(
            m.manifest.get(&p("webapps")).is_none(),
            "nothing of the new tree yet: {m:?}"
        );
        f.hint(p("webapps/app/WEB-INF/web.xml"), Hint::Written);
        f.examine(now);
        f.settle(now + Duration::from_secs(2), &chunker(), 1);
        let m = f.publishable().unwrap();
        for path in [
            "webapps",
            "webapps/app",
            "webapps/app/index.html",
            "webapps/app/WEB-INF/web.xml",
        ] {
            assert!(m.manifest.get(&p(path)).is_some(), "{path}");
        }
        m.manifest.validate().unwrap();
    }

    #[test]
    fn removals_and_type_changes_take_effect() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("a/b")).unwrap();
        fs::write(dir.path().join("a/b/x"), b"x").unwrap();
        let mut f = folder(dir.path());
        settle_all(&mut f);
        assert!(f.publishable().unwrap().manifest.get(&p("a/b/x")).is_some());
        fs::remove_dir_all(dir.path().join("a/b")).unwrap();
        fs::write(dir.path().join("a/b"), b"now a file").unwrap();
        f.hint(p("a/b"), Hint::Written);
        settle_all(&mut f);
        let m = f.publishable().unwrap();
        assert!(m.manifest.get(&p("a/b")).unwrap().file().is_some());
        assert!(m.manifest.get(&p("a/b/x")).is_none());
        m.manifest.validate().unwrap();
    }

    #[test]
    fn an_unreadable_root_publishes_nothing_new() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("server");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("a.xml"), b"a").unwrap();
        let mut f = folder(&root);
        settle_all(&mut f);
        f.set_published(f.publishable().unwrap());
        fs::remove_dir_all(&root).unwrap();
        f.rescan();
        settle_all(&mut f);
        assert!(
            f.publishable().is_none(),
            "a vanished root must not publish an empty folder"
        );
    }

    pub(crate) fn zip_bytes() -> Vec<u8> {
        // One stored entry, built by hand: local header, data, central directory, end record.
        let name = b"a.xml";
        let data = b"<a/>";
        let mut out = vec![
            0x50, 0x4b, 0x03, 0x04, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(name);
        out.extend_from_slice(data);
        let cd_at = out.len() as u32;
        let mut cd = vec![
            0x50, 0x4b, 0x01, 0x02, 20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        cd.extend_from_slice(&(data.len() as u32).to_le_bytes());
        cd.extend_from_slice(&(data.len() as u32).to_le_bytes());
        cd.extend_from_slice(&(name.len() as u16).to_le_bytes());
        cd.extend_from_slice(&[0; 12]);
        cd.extend_from_slice(&0u32.to_le_bytes());
        cd.extend_from_slice(name);
        out.extend_from_slice(&cd);
        out.extend_from_slice(&[0x50, 0x4b, 0x05, 0x06, 0, 0, 0, 0, 1, 0, 1, 0]);
        out.extend_from_slice(&(cd.len() as u32).to_le_bytes());
        out.extend_from_slice(&cd_at.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out
    }
}
