//! syncd's disk edge: scanning a folder into a manifest, and the few operations that change a
//! folder, each done relative to an open directory without ever following a symbolic link.
//!
//! Both roles use it: the manager to scan and read what it publishes, the agent to scan what it
//! holds and to stage and rename what it receives.

mod archive;
mod durable;
mod excludes;
mod folder;
mod scan;

pub use archive::{
    ArchiveError, CentralDirectory, check_archive, check_entries, is_archive,
    locate_central_directory,
};
pub use durable::write_atomic;
pub use excludes::{ExcludeError, Excludes, STAGING_DIR};
pub use folder::{FolderRoot, StagedFile, Staging, mtime_of, to_system_time};
pub use scan::{
    HashResult, LocalManifest, ScanError, ScanStats, ScanWarning, Seen, StatKey, hash_file,
    hash_files, observe, scan, stat_key, walk,
};

/// A configured synced folder: its name (the same on every node), where it is on this node, and
/// what in it is never synced.
#[derive(Debug, Clone)]
pub struct FolderSpec {
    /// Name shared by the manager's and the agents' configs.
    pub name: String,
    /// Path on this node.
    pub path: std::path::PathBuf,
    /// Paths never read, sent, changed or deleted.
    pub excludes: Excludes,
}
