//! inotify watches (through notify) on every folder, turned into [`Hint`]s for the control task.
//!
//! Events are only hints: the control task looks at the paths again. When the kernel's queue
//! overflows, our own channel fills up, or a watch cannot be added (the inotify watch limit),
//! the folder is walked again in full instead of silently diverging.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
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

/// One folder's watch.
pub(crate) struct FolderWatch {
    _watcher: RecommendedWatcher,
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

/// Starts watching `root` recursively; hints go to `tx`.
pub(crate) fn watch(
    folder: usize,
    root: &Path,
    tx: mpsc::Sender<WatchMsg>,
    signal: Signal,
) -> Result<FolderWatch, String> {
    let root_ino = std::fs::metadata(root).map_err(|e| e.to_string())?.ino();
    // notify reports paths under the canonical form of the watched root.
    let base: PathBuf = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_owned());
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
                match relative(&base, abs) {
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
    let mut watcher = notify::recommended_watcher(handler).map_err(|e| e.to_string())?;
    watcher
        .watch(root, RecursiveMode::Recursive)
        .map_err(|e| explain(&e))?;
    Ok(FolderWatch {
        _watcher: watcher,
        root_ino,
    })
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
