//! syncd's disk edge: scanning a folder into a manifest, and the few operations that change a
//! folder, each done relative to an open directory without ever following a symbolic link.
//!
//! Both roles use it: the manager to scan and read what it publishes, the agent to scan what it
//! holds and to stage and rename what it receives.

mod durable;
mod excludes;
mod folder;
mod scan;

pub use durable::write_atomic;
pub use excludes::{ExcludeError, Excludes, STAGING_DIR};
pub use folder::{FolderRoot, StagedFile, Staging, mtime_of, to_system_time};
pub use scan::{LocalManifest, ScanError, ScanStats, ScanWarning, StatKey, scan, stat_key};
