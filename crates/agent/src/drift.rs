//! Drift: changes in a synced folder that the agent did not make. A watch (inotify) and a
//! periodic verify notice them; each is compared with what syncd last applied (stat first, hash
//! only when the metadata differs). Under the `revert` policy the local version is backed up and
//! the manager's restored; under `report` it is left and flagged. A path that keeps drifting
//! back (the runtime rewriting it) stops being reverted and is flagged for the operator.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};
use syncd_fsops::{DriftPolicy, LocalManifest, STAGING_DIR, Seen};
use syncd_manifest::{Change, Chunker, Manifest, Node, RelPath};
use syncd_proto::DriftEntry;
use tokio::sync::Notify;

use crate::folder::Folder;

/// Reverts of one path within [`FLAP_WINDOW`] after which it is left alone.
pub(crate) const FLAP_LIMIT: usize = 3;
/// The window in which reverts are counted.
pub(crate) const FLAP_WINDOW: Duration = Duration::from_secs(60);
/// Quiet time after a change before the folders are compared.
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(300);
/// How often the folders are compared even without events.
pub(crate) const VERIFY_EVERY: Duration = Duration::from_secs(60);

/// Paths reported by a folder's watch beyond which the whole folder is compared instead.
const MAX_REPORTED: usize = 10_000;

/// What to compare in one folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Nothing was reported.
    #[default]
    Nothing,
    /// These paths, each with everything beneath it, and their directories' own entries (an
    /// entry added or removed moves its directory's mtime).
    Paths(BTreeSet<RelPath>),
    /// The whole folder.
    All,
}

impl Scope {
    /// Adds `other` to what is to be compared.
    fn merge(&mut self, other: Scope) {
        match (&mut *self, other) {
            (Scope::All, _) | (_, Scope::Nothing) => {}
            (_, Scope::All) => *self = Scope::All,
            (Scope::Nothing, paths) => *self = paths,
            (Scope::Paths(mine), Scope::Paths(theirs)) => {
                mine.extend(theirs);
                if mine.len() > MAX_REPORTED {
                    *self = Scope::All;
                }
            }
        }
    }

    /// For logs: "everything", "3 paths" or "nothing".
    pub(crate) fn summary(&self) -> String {
        match self {
            Scope::Nothing => "nothing".into(),
            Scope::Paths(p) => format!("{} paths", p.len()),
            Scope::All => "everything".into(),
        }
    }

    /// Notes one event's path (absolute, as the watch reports it) beneath `root`.
    fn report(&mut self, root: &Path, path: &Path) {
        let rel = match path.strip_prefix(root) {
            // The folder's own directory: its entries, so everything.
            Ok(rel) if rel.as_os_str().is_empty() => None,
            Ok(rel) => rel.to_str().and_then(|r| RelPath::new(r).ok()),
            Err(_) => None,
        };
        match (rel, &mut *self) {
            (_, Scope::All) => {}
            (Some(rel), Scope::Paths(paths)) => {
                paths.insert(rel);
                if paths.len() > MAX_REPORTED {
                    *self = Scope::All;
                }
            }
            (Some(rel), Scope::Nothing) => *self = Scope::Paths(BTreeSet::from([rel])),
            // A path we cannot name (not UTF-8, not beneath the folder): compare everything.
            (None, _) => *self = Scope::All,
        }
    }
}

/// Watches the folders; `changed` is notified on any change (our own writes included: the
/// comparison tells them apart), and each folder's watch notes which paths changed, so that a
/// comparison looks at those only (a full walk of every folder happens on start, after a pause
/// of the watch, when the kernel's queue overflowed, and every [`VERIFY_EVERY`]).
pub(crate) struct Watch {
    /// Each folder's watch (`None` while the folder cannot be watched), with its path and the
    /// paths reported since the last comparison.
    watchers: Vec<FolderWatch>,
    pub changed: Arc<Notify>,
}

struct FolderWatch {
    watcher: Option<notify::RecommendedWatcher>,
    path: PathBuf,
    reported: Arc<Mutex<Scope>>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

/// Starts watching `paths`; a folder that cannot be watched is still verified periodically.
pub(crate) fn watch(paths: &[PathBuf]) -> Watch {
    let changed = Arc::new(Notify::new());
    let watchers = paths
        .iter()
        .map(|path| {
            let reported = Arc::new(Mutex::new(Scope::Nothing));
            FolderWatch {
                watcher: start(path, &changed, &reported),
                path: path.clone(),
                reported,
            }
        })
        .collect();
    Watch { watchers, changed }
}

fn start(
    path: &Path,
    changed: &Arc<Notify>,
    reported: &Arc<Mutex<Scope>>,
) -> Option<notify::RecommendedWatcher> {
    let notify = Arc::clone(changed);
    let reported = Arc::clone(reported);
    let root = path.to_owned();
    let handler = move |res: notify::Result<notify::Event>| {
        let mut scope = reported.lock().expect("no panic while holding the lock");
        let relevant = match res {
            Ok(ev) if matches!(ev.kind, notify::EventKind::Access(_)) => false,
            // The kernel's queue overflowed: events were lost.
            Ok(ev) if ev.need_rescan() => {
                *scope = Scope::All;
                true
            }
            Ok(ev) => {
                let mut any = false;
                for p in ev
                    .paths
                    .iter()
                    .filter(|p| !p.components().any(|c| c.as_os_str() == STAGING_DIR))
                {
                    scope.report(&root, p);
                    any = true;
                }
                any
            }
            Err(_) => {
                *scope = Scope::All;
                true
            }
        };
        drop(scope);
        if relevant {
            notify.notify_one();
        }
    };
    match notify::recommended_watcher(handler).and_then(|mut w| {
        w.watch(path, RecursiveMode::Recursive)?;
        Ok(w)
    }) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, every = ?VERIFY_EVERY, "cannot watch the folder for local changes; verifying it periodically only");
            None
        }
    }
}

impl Watch {
    /// Stops watching until the guard is dropped: while the agent writes thousands of files
    /// itself, every one of them would wake the watch for nothing (a tenth of the agent's CPU in
    /// an initial sync). The folders are compared in full once the watch is back, so a local
    /// change made meanwhile is still found.
    pub(crate) fn pause(&mut self) -> PausedWatch<'_> {
        for w in &mut self.watchers {
            if let Some(watcher) = &mut w.watcher {
                let _ = watcher.unwatch(&w.path);
            }
        }
        PausedWatch(self)
    }

    /// Watches folder `i` afresh at its path (its directory was replaced), and has it compared
    /// in full.
    pub(crate) fn rewatch(&mut self, i: usize) {
        let w = &mut self.watchers[i];
        w.watcher = None;
        *w.reported.lock().expect("no panic while holding the lock") = Scope::All;
        w.watcher = start(&w.path, &self.changed, &w.reported);
        self.changed.notify_one();
    }

    /// What each folder's watch reported since the last call (what to compare now).
    pub(crate) fn take(&self) -> Vec<Scope> {
        self.watchers
            .iter()
            .map(|w| {
                std::mem::take(&mut *w.reported.lock().expect("no panic while holding the lock"))
            })
            .collect()
    }

    /// Puts back what a comparison that has to be redone was to look at.
    pub(crate) fn put_back(&self, scopes: Vec<Scope>) {
        for (w, scope) in self.watchers.iter().zip(scopes) {
            w.reported
                .lock()
                .expect("no panic while holding the lock")
                .merge(scope);
        }
    }

    /// Asks for a comparison of every folder in full.
    pub(crate) fn report_all(&self) {
        self.put_back(vec![Scope::All; self.watchers.len()]);
        self.changed.notify_one();
    }
}

/// A paused [`Watch`]; watching again when dropped.
pub(crate) struct PausedWatch<'a>(&'a mut Watch);

impl Drop for PausedWatch<'_> {
    fn drop(&mut self) {
        for w in &mut self.0.watchers {
            if let Some(watcher) = &mut w.watcher
                && let Err(e) = watcher.watch(&w.path, RecursiveMode::Recursive)
            {
                tracing::warn!(path = %w.path.display(), error = %e, every = ?VERIFY_EVERY, "cannot watch the folder for local changes again; verifying it periodically only");
                w.watcher = None;
            }
        }
        self.0.report_all();
    }
}

/// Per-path memory of reverts, and what is left in place.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    reverts: HashMap<(String, RelPath), VecDeque<Instant>>,
    /// Paths left alone because they kept drifting back.
    flapping: HashMap<(String, RelPath), ()>,
    /// What is left in place now, for status.
    pub entries: Vec<DriftEntry>,
    /// Local changes reverted since start.
    pub reverted_total: u64,
    /// The next comparison looks at every folder in full (what is left in place is decided
    /// afresh).
    pub recheck_all: bool,
    /// Compare every folder in full as soon as the session loop looks (set by a resume: what
    /// was listed during the pause is now backed up and about to be converged).
    pub check_now: bool,
}

/// The action of a change found while the agent is paused: listed, left, never reverted.
pub(crate) const PAUSED: &str = "paused";

/// The change listed for a path the agent cannot read: what is there is unknown, so it is left
/// as it is (it cannot be backed up) and listed, with the action `left`.
pub(crate) const UNREADABLE: &str = "unreadable";

/// What the agent may do about a local change now, whatever the folder's policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum May {
    /// Revert it (by policy): connected and not paused.
    Revert,
    /// Not yet: the manager is out of reach (`waiting`).
    Wait,
    /// Only list it: the agent is paused.
    List,
}

impl Tracker {
    /// Forgets that `path` was flapping (the manager published a new version, or the operator
    /// said so with `syncctl resume`).
    pub(crate) fn forgive_all(&mut self) {
        self.flapping.clear();
        self.reverts.clear();
        self.recheck_all = true;
    }

    fn flapping(&self, folder: &str, path: &RelPath) -> bool {
        self.flapping
            .contains_key(&(folder.to_owned(), path.clone()))
    }

    /// Records a revert of `path`; returns whether it is now flapping.
    fn reverted(&mut self, folder: &str, path: &RelPath, now: Instant) -> bool {
        let key = (folder.to_owned(), path.clone());
        let times = self.reverts.entry(key.clone()).or_default();
        times.push_back(now);
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) > FLAP_WINDOW)
        {
            times.pop_front();
        }
        if times.len() >= FLAP_LIMIT {
            self.flapping.insert(key, ());
            true
        } else {
            false
        }
    }
}

/// What a comparison found in one folder.
#[derive(Debug)]
pub(crate) struct Found {
    /// Index of the folder.
    pub folder: usize,
    /// What the comparison read of the folder as it is now.
    pub actual: Actual,
    /// Changes from what syncd applied, in path order.
    pub changes: Vec<Change>,
    /// The paths compared.
    pub covered: Covered,
    /// What it skipped: paths it could not read (taken as unchanged: a local change there
    /// cannot be backed up, so it is left and listed) and entries syncd never carries (none
    /// can have come from the manager: each is a local change).
    pub skipped: syncd_fsops::Skipped,
}

/// What a comparison read of a folder as it is now.
///
/// A comparison of a few paths (after each apply, the agent's own renames are among them)
/// returns only what it read there: copying a folder's every entry to say that two of them
/// were looked at would cost each generation in proportion to the folder, not to the change.
#[derive(Debug)]
pub(crate) enum Actual {
    /// A full walk: the whole folder.
    Whole(LocalManifest),
    /// A comparison of some paths: everything else is what was applied. The stat keys of the
    /// entries `compared` are those in `keys` (a file among them without one was not read).
    Paths {
        compared: Vec<RelPath>,
        keys: Vec<(RelPath, syncd_fsops::StatKey)>,
    },
}

impl Actual {
    /// What the folder holds now, given what was `applied` (what the comparison compared with)
    /// and the `changes` it found.
    pub(crate) fn resolve(self, applied: &LocalManifest, changes: &[Change]) -> LocalManifest {
        match self {
            Actual::Whole(actual) => actual,
            Actual::Paths { compared, keys } => {
                let mut actual = applied.clone();
                actual.manifest.apply(changes);
                for p in &compared {
                    actual.stats.remove(p);
                }
                actual.stats.extend(keys);
                // A file that vanished between the walk and its hashing leaves its directory's
                // entries as they are: keep the result a tree.
                actual.drop_orphans();
                actual
            }
        }
    }

    /// When nothing but metadata such as ctime moved: takes the stat keys just read as what
    /// was `applied`'s, so the next comparison need not hash those files again.
    pub(crate) fn refresh_keys(self, applied: &mut LocalManifest) {
        match self {
            Actual::Whole(actual) => applied.stats = actual.stats,
            Actual::Paths { compared, keys } => {
                for p in &compared {
                    applied.stats.remove(p);
                }
                applied.stats.extend(keys);
            }
        }
    }
}

/// Whether `path` is one of `tops` or beneath one of them.
fn beneath_any(path: &RelPath, tops: &BTreeSet<RelPath>) -> bool {
    tops.contains(path) || path.ancestors().any(|a| tops.contains(&a))
}

/// The paths a comparison looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Covered {
    /// The whole folder.
    All,
    /// These paths with everything beneath them (`deep`), and these directories' own entries.
    Paths {
        deep: BTreeSet<RelPath>,
        shallow: BTreeSet<RelPath>,
    },
}

impl Covered {
    /// Whether a change at `path` would have been seen by the comparison.
    pub(crate) fn covers(&self, path: &str) -> bool {
        match self {
            Covered::All => true,
            Covered::Paths { deep, shallow } => match RelPath::new(path) {
                Ok(p) => shallow.contains(&p) || beneath_any(&p, deep),
                Err(_) => true,
            },
        }
    }
}

/// Compares each folder given (its index, a copy of it, what to compare in it) with what
/// syncd applied (blocking: scans, hashing only files whose metadata differs).
pub(crate) fn compare(folders: Vec<(usize, Folder, Scope)>) -> Vec<Found> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut out = Vec::new();
    for (i, folder, scope) in folders {
        let name = folder.name.clone();
        let found = match scope {
            Scope::Nothing => continue,
            Scope::All => {
                crate::pause::local_changes(std::slice::from_ref(&folder)).map(|mut v| {
                    let (actual, changes, skipped) = v.pop().expect("one folder in, one out");
                    Found {
                        folder: i,
                        actual: Actual::Whole(actual),
                        changes,
                        covered: Covered::All,
                        skipped,
                    }
                })
            }
            Scope::Paths(paths) => compare_paths(folder, i, &paths, threads),
        };
        match found {
            Ok(f) => out.push(f),
            Err(e) => {
                tracing::warn!(folder = %name, error = %e, "cannot compare the folder with what was applied")
            }
        }
    }
    out
}

/// Compares the reported `paths` of one folder (each with what is beneath it, and its
/// directory's own entry) with what was applied, without walking the rest of the folder.
fn compare_paths(
    folder: Folder,
    index: usize,
    paths: &BTreeSet<RelPath>,
    threads: usize,
) -> Result<Found, String> {
    let root = folder.root.path();
    let expected = &folder.local;
    // Each reported path's directory gained or lost an entry: its own entry (mtime) is compared
    // alone if it is still the directory that was applied; if not (new, gone, replaced), it is
    // compared with its contents, and so on upwards.
    let mut deep: BTreeSet<RelPath> = paths
        .iter()
        .filter(|p| !folder.excludes.is_excluded(p, false))
        .cloned()
        .collect();
    let mut shallow: BTreeMap<RelPath, Option<Node>> = BTreeMap::new();
    for p in paths {
        let mut up = p.parent();
        while let Some(dir) = up {
            if shallow.contains_key(&dir) || deep.contains(&dir) {
                break;
            }
            let applied_dir = expected.manifest.get(&dir).is_some_and(Node::is_dir);
            match syncd_fsops::observe(root, &dir) {
                Ok(Some(s @ Seen::Dir { .. })) if applied_dir => {
                    shallow.insert(dir, s.node());
                    break;
                }
                _ => {
                    up = dir.parent();
                    deep.insert(dir);
                }
            }
        }
    }
    // Paths beneath another deep path are covered by it.
    let deep: BTreeSet<RelPath> = deep
        .iter()
        .filter(|p| !p.ancestors().any(|a| deep.contains(&a)))
        .cloned()
        .collect();
    shallow.retain(|d, _| !beneath_any(d, &deep));

    let params = expected.manifest.params;
    let mut before = Manifest::new(params);
    let mut after = Manifest::new(params);
    let mut keys = Vec::new();
    let mut to_hash = Vec::new();
    let mut seen = Vec::new();
    let mut warnings = Vec::new();
    for (d, now) in &shallow {
        if let Some(n) = expected.manifest.get(d) {
            before.insert(d.clone(), n.clone());
        }
        if let Some(n) = now {
            after.insert(d.clone(), n.clone());
        }
    }
    for top in &deep {
        for (p, n) in expected.manifest.subtree(top) {
            before.insert(p.clone(), n.clone());
        }
        let here = match syncd_fsops::observe(root, top) {
            Ok(s) => s,
            Err(w) => {
                warnings.push(w);
                None
            }
        };
        let Some(here) = here else { continue };
        let is_dir = matches!(here, Seen::Dir { .. });
        if folder.excludes.is_excluded(top, is_dir) {
            continue;
        }
        if is_dir
            && let Err(e) =
                syncd_fsops::walk(root, Some(top), &folder.excludes, &mut seen, &mut warnings)
        {
            warnings.push(syncd_fsops::ScanWarning::Unreadable {
                path: root.join(top.as_str()),
                error: e.to_string(),
            });
        }
        seen.push((top.clone(), here));
    }
    for (rel, s) in seen {
        match s {
            Seen::File { key, mode } => match expected.reusable(&rel, &key) {
                Some(node) => {
                    after.insert(
                        rel.clone(),
                        Node {
                            kind: node.kind.clone(),
                            mode,
                            mtime: key.mtime,
                        },
                    );
                    keys.push((rel, key));
                }
                None => {
                    let abs = root.join(rel.as_str());
                    to_hash.push((rel, abs));
                }
            },
            other => {
                let node = other.node().expect("directories and links have nodes");
                after.insert(rel, node);
            }
        }
    }
    let chunker = Chunker::new(params).map_err(|e| e.to_string())?;
    for (rel, result) in syncd_fsops::hash_files(&chunker, to_hash, threads) {
        match result {
            Ok((node, key)) => {
                after.insert(rel.clone(), node);
                keys.push((rel, key));
            }
            Err(w) => warnings.push(w),
        }
    }
    let skipped = crate::pause::skipped(&folder, warnings);
    syncd_fsops::keep_unreadable(&mut after, &before, &skipped.unreadable);

    let changes = syncd_manifest::diff(&before, &after);
    // The files compared have the stat keys just read; nothing else compared has one.
    let compared = before.iter().map(|(p, _)| p.clone()).collect();
    Ok(Found {
        folder: index,
        actual: Actual::Paths { compared, keys },
        changes,
        covered: Covered::Paths {
            deep,
            shallow: shallow.into_keys().collect(),
        },
        skipped,
    })
}

/// The kind of a local change: `change` turns what was applied into what is on disk.
pub(crate) fn kind(expected: &Manifest, change: &Change) -> &'static str {
    match change {
        Change::Remove(_) => "removed",
        Change::Put(p, _) if expected.get(p).is_none() => "added",
        Change::Put(..) => "modified",
    }
}

/// Decides, for the changes found in one folder, which to revert and which to leave, and builds
/// the target that reverts exactly the former (the rest stays as it is on disk).
pub(crate) struct Plan {
    /// Changes to undo (the local version of each is backed up first).
    pub revert: Vec<Change>,
    /// The manifest to apply over what the folder holds now.
    pub target: Manifest,
}

/// Splits `found` by policy and history into what to revert now and what to leave (recorded in
/// `left`).
pub(crate) fn plan(
    folder: &Folder,
    actual: &Manifest,
    changes: &[Change],
    tracker: &mut Tracker,
    may: May,
    now: Instant,
    left: &mut Vec<DriftEntry>,
) -> Plan {
    let expected = &folder.local.manifest;
    let mut target = actual.clone();
    let mut revert = Vec::new();
    for change in changes {
        let path = change.path();
        // A directory whose mtime moved because entries inside it changed is not a change of its
        // own: those entries are listed. (Reverting them restores its mtime as well.)
        if let Change::Put(p, n) = change
            && n.is_dir()
            && expected
                .get(p)
                .is_some_and(|e| e.is_dir() && e.mode == n.mode)
        {
            if folder.policy == DriftPolicy::Revert
                && may == May::Revert
                && let Some(e) = expected.get(p)
            {
                target.insert(p.clone(), e.clone());
            }
            continue;
        }
        let local_kind = kind(expected, change);
        match leave_as(folder, tracker, may, path) {
            Some(action) => left.push(DriftEntry {
                folder: folder.name.clone(),
                path: path.to_string(),
                change: local_kind.into(),
                action: action.into(),
            }),
            None => {
                match expected.get(path) {
                    Some(node) => {
                        target.insert(path.clone(), node.clone());
                    }
                    None => {
                        target.remove(path);
                    }
                }
                note_revert(folder, tracker, path, now);
                revert.push(change.clone());
            }
        }
    }
    // Reverting a removed directory's contents needs the directory; removing an added
    // directory removes what was added inside it too (it is all in `revert`).
    target = tree_closed(target, expected);
    Plan { revert, target }
}

/// Splits entries syncd never carries (`Skipped::foreign`: none can have come from the manager)
/// like [`plan`] splits changes: returns those to remove now, and records the rest in `left` as
/// added.
pub(crate) fn plan_foreign(
    folder: &Folder,
    foreign: &[RelPath],
    tracker: &mut Tracker,
    may: May,
    now: Instant,
    left: &mut Vec<DriftEntry>,
) -> Vec<RelPath> {
    let mut remove = Vec::new();
    for path in foreign {
        match leave_as(folder, tracker, may, path) {
            Some(action) => left.push(DriftEntry {
                folder: folder.name.clone(),
                path: path.to_string(),
                change: "added".into(),
                action: action.into(),
            }),
            None => {
                note_revert(folder, tracker, path, now);
                remove.push(path.clone());
            }
        }
    }
    remove
}

/// Why a local change at `path` is left in place (the action shown), or `None` if it is to be
/// reverted now.
fn leave_as(folder: &Folder, tracker: &Tracker, may: May, path: &RelPath) -> Option<&'static str> {
    if may == May::List {
        Some(PAUSED)
    } else if folder.policy == DriftPolicy::Report {
        Some("reported")
    } else if tracker.flapping(&folder.name, path) {
        Some("flapping")
    } else if may == May::Wait {
        Some("waiting")
    } else {
        None
    }
}

/// Counts a revert of `path`, saying so when it is the last before the path is left alone.
fn note_revert(folder: &Folder, tracker: &mut Tracker, path: &RelPath, now: Instant) {
    if tracker.reverted(&folder.name, path, now) {
        tracing::warn!(
            folder = %folder.name,
            %path,
            limit = FLAP_LIMIT,
            window = ?FLAP_WINDOW,
            "this path keeps changing back (the runtime rewriting it?); reverted for the last time, left alone from now on"
        );
    }
}

/// Makes `target` a tree again: restores parents from `expected` where a child was restored,
/// and drops children whose parent is gone.
fn tree_closed(mut target: Manifest, expected: &Manifest) -> Manifest {
    let paths: Vec<RelPath> = target.iter().map(|(p, _)| p.clone()).collect();
    for p in paths {
        for a in p.ancestors() {
            if !target.get(&a).is_some_and(|n| n.is_dir())
                && let Some(n) = expected.get(&a)
            {
                target.insert(a, n.clone());
            }
        }
    }
    let orphans: Vec<RelPath> = target
        .iter()
        .filter(|(p, _)| {
            p.ancestors()
                .any(|a| !target.get(&a).is_some_and(|n| n.is_dir()))
        })
        .map(|(p, _)| p.clone())
        .collect();
    for p in orphans {
        target.remove(&p);
    }
    target
}

/// Keeps at most `max_count` backups, and at most `max_bytes` in all, dropping the oldest.
pub(crate) fn prune_backups(state_dir: &Path, max_count: usize, max_bytes: u64) {
    let dir = state_dir.join("backups");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let mut backups: Vec<(String, PathBuf, u64)> = entries
        .flatten()
        .map(|e| {
            let p = e.path();
            (
                e.file_name().to_string_lossy().into_owned(),
                p.clone(),
                dir_size(&p),
            )
        })
        .collect();
    // Names end in milliseconds since the epoch: sort by that, oldest first.
    backups.sort_by_key(|(name, _, _)| {
        name.rsplit('-')
            .next()
            .and_then(|t| t.parse::<u64>().ok())
            .unwrap_or(0)
    });
    let mut total: u64 = backups.iter().map(|b| b.2).sum();
    let mut count = backups.len();
    // The newest is the one just made: it is never removed, even alone over the limits (a
    // resume after a `touch` over a large tree backs up more than `max_backup_mb`, and then
    // reverts the originals: removing it would lose what the log just said was kept).
    let newest = backups.pop();
    for (name, path, size) in backups {
        if count <= max_count && total <= max_bytes {
            break;
        }
        if std::fs::remove_dir_all(&path).is_ok() {
            tracing::info!(backup = %name, "removed an old backup (limits: {max_count} backups, {max_bytes} bytes)");
            count -= 1;
            total -= size;
        }
    }
    if let Some((name, _, size)) = newest
        && size > max_bytes
    {
        tracing::warn!(backup = %name, bytes = size, "the newest backup alone is over the size limit for backups; it is kept (older ones are removed first)");
    }
}

fn dir_size(p: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(p)
        .map(|rd| rd.flatten().map(|e| dir_size(&e.path())).sum())
        .unwrap_or(0)
}

/// The backups under the state directory: name, size, and the first lines of their index.
pub(crate) fn list_backups(state_dir: &Path) -> Vec<(String, u64, Vec<String>)> {
    let dir = state_dir.join("backups");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, u64, Vec<String>)> = entries
        .flatten()
        .map(|e| {
            let p = e.path();
            let index = std::fs::read_to_string(p.join("CHANGES")).unwrap_or_default();
            let lines = index
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect();
            (
                e.file_name().to_string_lossy().into_owned(),
                dir_size(&p),
                lines,
            )
        })
        .collect();
    out.sort_by_key(|(name, _, _)| {
        name.rsplit('-')
            .next()
            .and_then(|t| t.parse::<u64>().ok())
            .unwrap_or(0)
    });
    out
}

/// Sorts entries for display and comparison.
pub(crate) fn normalize(mut entries: Vec<DriftEntry>) -> Vec<DriftEntry> {
    entries.sort_by(|a, b| (&a.folder, &a.path).cmp(&(&b.folder, &b.path)));
    entries
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// Waits up to `secs` for `changed` to be notified.
    fn notified_within(watch: &Watch, secs: u64) -> bool {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(secs), watch.changed.notified())
                .await
                .is_ok()
        })
    }

    /// Waits up to 5 s until the watch has reported `want` (among others) in folder 0; returns
    /// what it reported.
    fn reported_within(watch: &Watch, want: &[&str]) -> Scope {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Scope::Nothing;
        loop {
            got.merge(watch.take().remove(0));
            let has_all = match &got {
                Scope::All => true,
                Scope::Nothing => want.is_empty(),
                Scope::Paths(p) => want.iter().all(|w| p.contains(&RelPath::new(*w).unwrap())),
            };
            if has_all || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn the_watch_reports_the_paths_that_changed_but_not_staged_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sub").join(STAGING_DIR)).unwrap();
        std::fs::create_dir(dir.path().join(STAGING_DIR)).unwrap();
        let w = watch(&[dir.path().to_owned()]);
        std::fs::write(dir.path().join(STAGING_DIR).join("staged"), b"x").unwrap();
        std::fs::write(dir.path().join("sub/a.xml"), b"x").unwrap();
        std::fs::rename(dir.path().join("sub/a.xml"), dir.path().join("b.xml")).unwrap();
        let got = reported_within(&w, &["sub/a.xml", "b.xml"]);
        let Scope::Paths(paths) = got else {
            panic!("expected paths, got {got:?}")
        };
        let paths: Vec<&str> = paths.iter().map(RelPath::as_str).collect();
        assert_eq!(paths, ["b.xml", "sub/a.xml"]);
        // A change of the folder's own directory (its mode) asks for everything.
        let mode = std::fs::metadata(dir.path()).unwrap().permissions();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(dir.path(), mode).unwrap();
        assert_eq!(reported_within(&w, &["-"]), Scope::All);
    }

    #[test]
    fn too_many_reported_paths_become_a_full_comparison() {
        let root = Path::new("/srv/deployment");
        let mut scope = Scope::Nothing;
        for i in 0..MAX_REPORTED {
            scope.report(root, &root.join(format!("api/{i}.xml")));
        }
        assert!(matches!(&scope, Scope::Paths(p) if p.len() == MAX_REPORTED));
        scope.report(root, &root.join("one/more.xml"));
        assert_eq!(scope, Scope::All);
        // Paths outside the folder, and the folder itself, cannot be narrowed down either.
        for odd in ["/elsewhere/x", "/srv/deployment"] {
            let mut scope = Scope::Nothing;
            scope.report(root, Path::new(odd));
            assert_eq!(scope, Scope::All, "{odd}");
        }
    }

    /// A folder over `dir` holding what is there now, as if syncd had applied it.
    pub(crate) fn applied_folder(dir: &Path, excludes: &[&str]) -> Folder {
        let chunker = Chunker::new(syncd_manifest::ChunkParams::DEFAULT).unwrap();
        let excludes = syncd_fsops::Excludes::new(excludes).unwrap();
        let (local, _, _) = syncd_fsops::scan(dir, &chunker, &excludes, None, 1).unwrap();
        Folder {
            name: "f".into(),
            root: Arc::new(syncd_fsops::FolderRoot::open(dir).unwrap()),
            excludes,
            policy: DriftPolicy::Revert,
            local: Arc::new(local),
        }
    }

    #[test]
    fn comparing_the_reported_paths_finds_what_a_full_walk_finds() {
        use std::fs;
        use std::os::unix::fs::symlink;
        type Edit = fn(&Path);
        // Each local change, with the paths inotify reports for it at the least (a directory
        // made with contents is reported alone: its contents may come before its watch).
        let edits: Vec<(&str, Edit, &[&str])> = vec![
            (
                "edit",
                |d| fs::write(d.join("api/a.xml"), b"<edited/>").unwrap(),
                &["api/a.xml"],
            ),
            (
                "chmod",
                |d| {
                    fs::set_permissions(d.join("api/a.xml"), fs::Permissions::from_mode(0o600))
                        .unwrap()
                },
                &["api/a.xml"],
            ),
            (
                "touch",
                |d| {
                    let t = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
                    fs::File::options()
                        .write(true)
                        .open(d.join("api/a.xml"))
                        .unwrap()
                        .set_times(fs::FileTimes::new().set_modified(t))
                        .unwrap();
                },
                &["api/a.xml"],
            ),
            (
                "remove",
                |d| fs::remove_file(d.join("api/b.xml")).unwrap(),
                &["api/b.xml"],
            ),
            (
                "add",
                |d| fs::write(d.join("api/new.xml"), b"<new/>").unwrap(),
                &["api/new.xml"],
            ),
            (
                "new tree",
                |d| {
                    fs::create_dir_all(d.join("api/x/y")).unwrap();
                    fs::write(d.join("api/x/y/deep.xml"), b"<deep/>").unwrap();
                    fs::write(d.join("api/x/top.xml"), b"<top/>").unwrap();
                },
                &["api/x"],
            ),
            (
                "remove tree",
                |d| fs::remove_dir_all(d.join("webapps")).unwrap(),
                &["webapps"],
            ),
            (
                "file to dir",
                |d| {
                    fs::remove_file(d.join("api/a.xml")).unwrap();
                    fs::create_dir(d.join("api/a.xml")).unwrap();
                    fs::write(d.join("api/a.xml/inner"), b"i").unwrap();
                },
                &["api/a.xml"],
            ),
            (
                "dir to file",
                |d| {
                    fs::remove_dir_all(d.join("webapps/app")).unwrap();
                    fs::write(d.join("webapps/app"), b"now a file").unwrap();
                },
                &["webapps/app"],
            ),
            (
                "link",
                |d| symlink("a.xml", d.join("api/link.xml")).unwrap(),
                &["api/link.xml"],
            ),
            (
                "rename dir",
                |d| fs::rename(d.join("webapps/app"), d.join("api/moved")).unwrap(),
                &["webapps/app", "api/moved"],
            ),
            (
                "excluded",
                |d| fs::write(d.join("api/skip.tmp"), b"ignored").unwrap(),
                &["api/skip.tmp"],
            ),
            (
                "same bytes",
                |d| fs::write(d.join("api/b.xml"), b"<b/>").unwrap(),
                &["api/b.xml"],
            ),
        ];
        for (name, edit, reported) in edits {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            fs::create_dir_all(d.join("api")).unwrap();
            fs::create_dir_all(d.join("webapps/app/WEB-INF")).unwrap();
            fs::write(d.join("api/a.xml"), b"<a/>").unwrap();
            fs::write(d.join("api/b.xml"), b"<b/>").unwrap();
            fs::write(d.join("webapps/app/WEB-INF/web.xml"), b"<web/>").unwrap();
            fs::write(d.join("webapps/app/index.html"), vec![7u8; 200_000]).unwrap();
            let folder = applied_folder(d, &["**/*.tmp"]);
            // Directory mtimes move with the second; a change in the same one would not show.
            std::thread::sleep(Duration::from_millis(10));
            edit(d);
            let paths = reported.iter().map(|p| RelPath::new(*p).unwrap()).collect();
            let scoped = compare(vec![(0, folder.clone(), Scope::Paths(paths))])
                .pop()
                .unwrap();
            let full = compare(vec![(0, folder.clone(), Scope::All)])
                .pop()
                .unwrap();
            assert_eq!(scoped.changes, full.changes, "{name}");
            assert!(matches!(scoped.actual, Actual::Paths { .. }), "{name}");
            let (scoped_changes, full_changes) = (scoped.changes.clone(), full.changes.clone());
            let scoped_actual = scoped.actual.resolve(&folder.local, &scoped_changes);
            let full_actual = full.actual.resolve(&folder.local, &full_changes);
            assert_eq!(
                scoped_actual.manifest.digest(),
                full_actual.manifest.digest(),
                "{name}"
            );
            assert_eq!(scoped_actual.stats, full_actual.stats, "{name}");
            assert!(full.covered.covers("anything"));
            for c in &scoped.changes {
                assert!(scoped.covered.covers(c.path().as_str()), "{name}: {c:?}");
            }
            // Every edit shows, if only as its directory's new mtime.
            assert!(!full.changes.is_empty(), "{name}");
        }
    }

    #[test]
    fn a_paused_watch_watches_again_and_asks_for_a_comparison() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let mut w = watch(&[dir.path().to_owned()]);
        std::fs::write(dir.path().join("sub/before"), b"x").unwrap();
        assert!(notified_within(&w, 5), "a change is seen");
        // Events already queued may still arrive: let them, then forget them.
        std::thread::sleep(Duration::from_millis(200));
        let _ = notified_within(&w, 0);
        {
            let _paused = w.pause();
            std::fs::write(dir.path().join("sub/during"), b"x").unwrap();
        }
        // Back: a comparison of everything is asked for, which finds what changed meanwhile.
        assert!(notified_within(&w, 5), "resuming asks for a comparison");
        assert_eq!(w.take(), [Scope::All]);
        std::thread::sleep(Duration::from_millis(200));
        let _ = notified_within(&w, 0);
        // And the watch is on again, in subdirectories too.
        std::fs::write(dir.path().join("sub/after"), b"x").unwrap();
        assert!(notified_within(&w, 5), "a change after the pause is seen");
    }

    #[test]
    fn backups_are_bounded_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("backups");
        for (i, t) in [500u64, 100, 400, 200, 300].iter().enumerate() {
            let d = root.join(format!("drift-{t}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("f"), vec![0u8; 1000 * (i + 1)]).unwrap();
        }
        prune_backups(dir.path(), 3, u64::MAX);
        let mut left: Vec<String> = list_backups(dir.path()).into_iter().map(|b| b.0).collect();
        left.sort();
        assert_eq!(left, ["drift-300", "drift-400", "drift-500"]);
        // drift-300 holds 5000 bytes, drift-400 3000, drift-500 1000: a 4500-byte limit keeps
        // the newest two.
        prune_backups(dir.path(), 100, 4500);
        let left: Vec<String> = list_backups(dir.path()).into_iter().map(|b| b.0).collect();
        assert_eq!(left, ["drift-400", "drift-500"]);
        // The newest is kept even when it alone is over the limits.
        prune_backups(dir.path(), 0, 10);
        let left: Vec<String> = list_backups(dir.path()).into_iter().map(|b| b.0).collect();
        assert_eq!(left, ["drift-500"]);
    }
}
