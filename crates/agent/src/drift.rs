//! Drift: changes in a synced folder that the agent did not make. A watch (inotify) and a
//! periodic verify notice them; each is compared with what syncd last applied (stat first, hash
//! only when the metadata differs). Under the `revert` policy the local version is backed up and
//! the manager's restored; under `report` it is left and flagged. A path that keeps drifting
//! back (the runtime rewriting it) stops being reverted and is flagged for the operator.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};
use syncd_fsops::{DriftPolicy, LocalManifest, STAGING_DIR};
use syncd_manifest::{Change, Manifest, RelPath};
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

/// Watches the folders; `changed` is notified on any change (our own writes included: the
/// comparison tells them apart).
pub(crate) struct Watch {
    /// Each folder's watch, with its path (`None` while the folder cannot be watched).
    watchers: Vec<(Option<notify::RecommendedWatcher>, PathBuf)>,
    pub changed: Arc<Notify>,
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
        .map(|path| (start(path, &changed), path.clone()))
        .collect();
    Watch { watchers, changed }
}

fn start(path: &Path, changed: &Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    let notify = Arc::clone(changed);
    let handler = move |res: notify::Result<notify::Event>| {
        let relevant = match res {
            Ok(ev) => {
                !matches!(ev.kind, notify::EventKind::Access(_))
                    && ev
                        .paths
                        .iter()
                        .any(|p| !p.components().any(|c| c.as_os_str() == STAGING_DIR))
            }
            Err(_) => true,
        };
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
    /// an initial sync). The folders are compared once the watch is back, so a local change made
    /// meanwhile is still found.
    pub(crate) fn pause(&mut self) -> PausedWatch<'_> {
        for (w, path) in &mut self.watchers {
            if let Some(w) = w {
                let _ = w.unwatch(path);
            }
        }
        PausedWatch(self)
    }
}

/// A paused [`Watch`]; watching again when dropped.
pub(crate) struct PausedWatch<'a>(&'a mut Watch);

impl Drop for PausedWatch<'_> {
    fn drop(&mut self) {
        let Watch { watchers, changed } = &mut *self.0;
        for (slot, path) in watchers {
            if let Some(w) = slot
                && let Err(e) = w.watch(path, RecursiveMode::Recursive)
            {
                tracing::warn!(path = %path.display(), error = %e, every = ?VERIFY_EVERY, "cannot watch the folder for local changes again; verifying it periodically only");
                *slot = None;
            }
        }
        changed.notify_one();
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
}

impl Tracker {
    /// Forgets that `path` was flapping (the manager published a new version, or the operator
    /// said so with `syncctl resume`).
    pub(crate) fn forgive_all(&mut self) {
        self.flapping.clear();
        self.reverts.clear();
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
    /// What the folder holds now.
    pub actual: LocalManifest,
    /// Changes from what syncd applied, in path order.
    pub changes: Vec<Change>,
}

/// Compares every folder with what syncd applied (blocking: scans, hashing only files whose
/// metadata changed).
pub(crate) fn compare(folders: &[Folder]) -> Vec<Found> {
    let mut out = Vec::new();
    match crate::pause::local_changes(folders) {
        Ok(per_folder) => {
            for (i, (actual, changes)) in per_folder.into_iter().enumerate() {
                out.push(Found {
                    folder: i,
                    actual,
                    changes,
                });
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot compare the folders with what was applied"),
    }
    out
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
    found: &Found,
    tracker: &mut Tracker,
    connected: bool,
    now: Instant,
    left: &mut Vec<DriftEntry>,
) -> Plan {
    let expected = &folder.local.manifest;
    let mut target = found.actual.manifest.clone();
    let mut revert = Vec::new();
    for change in &found.changes {
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
                && connected
                && let Some(e) = expected.get(p)
            {
                target.insert(p.clone(), e.clone());
            }
            continue;
        }
        let action = if folder.policy == DriftPolicy::Report {
            Some("reported")
        } else if tracker.flapping(&folder.name, path) {
            Some("flapping")
        } else if !connected {
            Some("waiting")
        } else {
            None
        };
        let local_kind = kind(expected, change);
        match action {
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
                if tracker.reverted(&folder.name, path, now) {
                    tracing::warn!(
                        folder = %folder.name,
                        %path,
                        limit = FLAP_LIMIT,
                        window = ?FLAP_WINDOW,
                        "this path keeps changing back (the runtime rewriting it?); reverted for the last time, left alone from now on"
                    );
                }
                revert.push(change.clone());
            }
        }
    }
    // Reverting a removed directory's contents needs the directory; removing an added
    // directory removes what was added inside it too (it is all in `revert`).
    target = tree_closed(target, expected);
    Plan { revert, target }
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
mod tests {
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
        // Back: a comparison is asked for, which finds what changed meanwhile.
        assert!(notified_within(&w, 5), "resuming asks for a comparison");
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
    }
}
