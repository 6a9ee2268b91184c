//! inotify watches (through notify) on every folder, turned into [`Hint`]s for the control task.
//!
//! Events are only hints: the control task looks at the paths again. When the kernel's queue
//! overflows, our own channel fills up, or a watch cannot be added (the inotify watch limit),
//! the folder is walked again in full instead of silently diverging.
//!
//! Each directory that is not excluded is watched on its own (notify's recursive mode watches
//! excluded directories too, and fails whole on one directory syncd's user cannot read); a new
//! directory, or one that may have become readable, is reported as [`WatchMsg::Dir`] so the
//! control task watches it (and what is beneath it) before the folder is looked at again.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use syncd_fsops::Excludes;
use syncd_manifest::RelPath;
use tokio::sync::{Notify, mpsc};

use crate::live::Hint;

/// Hints buffered before the channel counts as overflowed.
pub(crate) const CHANNEL: usize = 1 << 16;

/// What the watcher tells the control task.
#[derive(Debug)]
pub(crate) enum WatchMsg {
    /// A path in a folder changed.
    Hint {
        folder: usize,
        path: RelPath,
        hint: Hint,
    },
    /// A directory may have appeared here (created, renamed in) or become readable (its
    /// metadata changed): it and what is beneath it are to be watched.
    Dir { folder: usize, path: RelPath },
    /// The folder must be walked again in full.
    Rescan { folder: usize, reason: String },
    /// The watch no longer covers the whole folder (the inotify watch limit was reached while
    /// adding a new directory): the folder is walked periodically until it can be watched again.
    Lost { folder: usize, reason: String },
}

/// Shared between the watcher threads and the control task.
#[derive(Debug, Clone)]
pub(crate) struct Signal {
    /// Set when a hint could not be queued: every folder must be walked again.
    pub overflowed: Arc<AtomicBool>,
    pub wake: Arc<Notify>,
}

/// One folder's watch: one inotify watch per directory that is not excluded.
pub(crate) struct FolderWatch {
    watcher: RecommendedWatcher,
    /// The root as notify names paths beneath it.
    base: PathBuf,
    excludes: Excludes,
    /// Inode of the root when the watch was set: a replaced root needs a new watch.
    pub root_ino: u64,
}

impl std::fmt::Debug for FolderWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FolderWatch")
            .field("root_ino", &self.root_ino)
            .finish()
    }
}

/// Starts watching `root` and every directory beneath it that `excludes` leaves; hints go to
/// `tx`.
pub(crate) fn watch(
    folder: usize,
    root: &Path,
    excludes: &Excludes,
    tx: mpsc::Sender<WatchMsg>,
    signal: Signal,
) -> Result<FolderWatch, String> {
    let root_ino = std::fs::metadata(root).map_err(|e| e.to_string())?.ino();
    // notify reports paths under the canonical form of the watched root.
    let base: PathBuf = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_owned());
    let handler_base = base.clone();
    let send = move |msg: WatchMsg| {
        if tx.try_send(msg).is_err() {
            signal.overflowed.store(true, Ordering::Release);
            signal.wake.notify_one();
        }
    };
    let handler = move |res: notify::Result<notify::Event>| match res {
        Err(e) => send(WatchMsg::Lost {
            folder,
            reason: format!("watcher error: {}", explain(&e)),
        }),
        Ok(event) => {
            if event.need_rescan() {
                send(WatchMsg::Rescan {
                    folder,
                    reason: "the kernel's event queue overflowed".into(),
                });
                return;
            }
            // A directory may be new here, or readable now: it is to be watched.
            let maybe_dir = matches!(
                event.kind,
                EventKind::Create(CreateKind::Folder)
                    | EventKind::Modify(ModifyKind::Name(RenameMode::To))
                    | EventKind::Modify(ModifyKind::Metadata(_))
            );
            if maybe_dir
                && let Some(Some(path)) =
                    event.paths.first().and_then(|p| relative(&handler_base, p))
            {
                send(WatchMsg::Dir { folder, path });
            }
            let hints: Vec<(usize, Hint)> = match event.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => vec![(0, Hint::Written)],
                EventKind::Access(_) => vec![],
                EventKind::Modify(ModifyKind::Data(_)) => vec![(0, Hint::Writing)],
                EventKind::Modify(ModifyKind::Name(RenameMode::To)) => vec![(0, Hint::Written)],
                // The From and To halves were already reported on their own.
                EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => vec![],
                _ => (0..event.paths.len()).map(|i| (i, Hint::Changed)).collect(),
            };
            for (i, hint) in hints {
                let Some(abs) = event.paths.get(i) else {
                    continue;
                };
                match relative(&handler_base, abs) {
                    Some(Some(path)) => send(WatchMsg::Hint { folder, path, hint }),
                    // The root itself moved or vanished.
                    Some(None) => send(WatchMsg::Rescan {
                        folder,
                        reason: "the folder root changed".into(),
                    }),
                    None => {}
                }
            }
        }
    };
    let watcher = notify::recommended_watcher(handler).map_err(|e| e.to_string())?;
    let mut watch = FolderWatch {
        watcher,
        base,
        excludes: excludes.clone(),
        root_ino,
    };
    let started = std::time::Instant::now();
    watch.add_tree(None)?;
    tracing::debug!(
        root = %root.display(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "watching the folder"
    );
    Ok(watch)
}

impl FolderWatch {
    /// Watches `dir` (the root for `None`) and every directory beneath it that is not excluded,
    /// each on its own; watching one again costs a system call. (Each is a request to notify's
    /// thread, 70-90 us here: 0.8 s for 10,000 directories, where notify's own recursive watch
    /// takes 0.2 s; but that one reads the metadata of every file, so for folders with more
    /// than a few files per directory this is the faster way.) A directory that cannot be
    /// watched or listed (its user may not read it, it is gone) is left out: the folder's walk
    /// reports it, and the `chmod` that makes it readable comes back here as a
    /// [`WatchMsg::Dir`]. Only the watch limit is an error (the watch no longer covers the
    /// folder).
    pub(crate) fn add_tree(&mut self, dir: Option<&RelPath>) -> Result<(), String> {
        let start = dir.map_or_else(|| self.base.clone(), |d| self.base.join(d.as_str()));
        let mut stack = vec![(dir.cloned(), start)];
        while let Some((rel, abs)) = stack.pop() {
            match self.watcher.watch(&abs, RecursiveMode::NonRecursive) {
                Ok(()) => {}
                Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => {
                    return Err(explain(&e));
                }
                Err(_) => continue,
            }
            let Ok(entries) = std::fs::read_dir(&abs) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                let child = match &rel {
                    None => RelPath::new(name),
                    Some(r) => r.join(&name),
                };
                let Ok(child) = child else { continue };
                if !self.excludes.is_excluded(&child, true) {
                    stack.push((Some(child), entry.path()));
                }
            }
        }
        Ok(())
    }
}

/// A watch error with what the operator can do about it.
fn explain(e: &notify::Error) -> String {
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => {
            format!("{e} (raise fs.inotify.max_user_watches)")
        }
        notify::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            format!("{e} (a directory syncd's user cannot read: make it readable to that user)")
        }
        _ => e.to_string(),
    }
}

/// `abs` relative to `base`: `Some(None)` for the base itself, `None` outside it or for a name
/// syncd cannot carry (not UTF-8, or not a valid relative path).
fn relative(base: &Path, abs: &Path) -> Option<Option<RelPath>> {
    let rest = abs.strip_prefix(base).ok()?;
    if rest.as_os_str().is_empty() {
        return Some(None);
    }
    RelPath::new(rest.to_str()?).ok().map(Some)
}
