//! syncd's disk edge: scanning a folder into a manifest, and the few operations that change a
//! folder, each done relative to an open directory without ever following a symbolic link.
//!
//! Both roles use it: the manager to scan and read what it publishes, the agent to scan what it
//! holds and to stage and rename what it receives.

mod archive;
mod direct;
mod durable;
mod excludes;
mod folder;
mod memory;
mod scan;
mod statelog;

pub use archive::{
    ArchiveError, CentralDirectory, check_archive, check_entries, cut_points, is_archive,
    locate_central_directory,
};
pub use direct::{ALIGN, CopyReader, DirectFile, RunWriter};
pub use durable::write_atomic;
pub use excludes::{ExcludeError, Excludes, STAGING_DIR, WSO2_DEFAULT_EXCLUDES};
pub use folder::{Committer, FolderRoot, Retired, StagedFile, Staging, mtime_of, to_system_time};
pub use memory::{trim_heap, tune_allocator};
pub use scan::{
    HashResult, LocalDelta, LocalManifest, Reuse, ScanError, ScanStats, ScanWarning, Seen, Skipped,
    StatKey, Tiling, apply_deltas, hash_file, hash_file_reusing, hash_files, hash_files_reusing,
    keep_unreadable, observe, scan, stat_key, walk,
};
pub use statelog::{LoadedState, Restored, StateFile, StateLog};

/// A configured synced folder: its name (the same on every node), where it is on this node,
/// what in it is never synced, and the policies that guard it.
#[derive(Debug, Clone)]
pub struct FolderSpec {
    /// Name shared by the manager's and the agents' configs.
    pub name: String,
    /// Path on this node.
    pub path: std::path::PathBuf,
    /// Paths never read, sent, changed or deleted.
    pub excludes: Excludes,
    /// Agent: what to do about local changes syncd did not make.
    pub drift: DriftPolicy,
    /// Manager: the share of a folder's files one generation may delete without the operator's
    /// confirmation (`None`: no guard). Deleting every file always needs it, with the guard on.
    pub delete_guard: Option<f64>,
}

impl FolderSpec {
    /// A folder with the defaults: no excludes but the built-in ones, drift reverted, deletions
    /// of more than half the files held for confirmation.
    pub fn new(name: impl Into<String>, path: impl Into<std::path::PathBuf>) -> FolderSpec {
        FolderSpec {
            name: name.into(),
            path: path.into(),
            excludes: Excludes::none(),
            drift: DriftPolicy::Revert,
            delete_guard: Some(0.5),
        }
    }
}

/// What an agent does about a local change in a synced folder that syncd did not make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriftPolicy {
    /// Back the local version up, restore the manager's version, log and count it.
    Revert,
    /// Leave it, flag it in status and the log.
    Report,
}
