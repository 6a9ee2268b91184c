//! One synced folder as the agent holds it: where it is, what it excludes, what it contains.

use std::path::Path;
use std::sync::Arc;

use syncd_fsops::{Excludes, FolderRoot, FolderSpec, LocalManifest};
use syncd_manifest::{Chunker, ManifestDigest};
use syncd_proto::FolderState;

/// A folder the agent keeps in sync.
#[derive(Debug, Clone)]
pub(crate) struct Folder {
    /// The name both configs use.
    pub name: String,
    /// The open folder.
    pub root: Arc<FolderRoot>,
    /// What this node never touches.
    pub excludes: Excludes,
    /// What to do about local changes.
    pub policy: syncd_fsops::DriftPolicy,
    /// What the folder holds, as of the last scan or apply. Shared, so that a comparison on the
    /// blocking pool or a commit can hold it without copying a folder's every entry; changed in
    /// place ([`Arc::make_mut`]) when nothing else holds it.
    pub local: Arc<LocalManifest>,
}

/// Why a folder could not be prepared.
#[derive(Debug, thiserror::Error)]
#[error("folder {name} ({path}): {reason}")]
pub struct FolderError {
    /// The folder's name.
    pub name: String,
    /// Its path.
    pub path: String,
    /// What went wrong.
    pub reason: String,
}

impl Folder {
    /// Opens (creating if absent) the folder, notes what an interrupted apply left in its staging
    /// directory, and scans it, reusing hashes from `previous` where files are unchanged.
    pub(crate) fn open(
        spec: &FolderSpec,
        chunker: &Chunker,
        previous: Option<&LocalManifest>,
    ) -> Result<Folder, FolderError> {
        let fail = |reason: String| FolderError {
            name: spec.name.clone(),
            path: spec.path.display().to_string(),
            reason,
        };
        if !spec.path.exists() {
            std::fs::create_dir_all(&spec.path)
                .map_err(|e| fail(format!("cannot create it: {e}")))?;
            tracing::info!(folder = %spec.name, path = %spec.path.display(), "created the folder");
        }
        let root = Arc::new(FolderRoot::open(&spec.path).map_err(|e| fail(e.to_string()))?);
        // Files an interrupted apply staged stay where they are: their verified chunks are
        // reused by the next apply, which then clears the staging directory.
        match root.staged_leftovers() {
            Ok(l) if !l.is_empty() => tracing::info!(
                folder = %spec.name,
                files = l.len(),
                "found files staged by an interrupted apply; their chunks will be reused"
            ),
            Ok(_) => {}
            Err(e) => return Err(fail(format!("cannot read the staging directory: {e}"))),
        }
        let local =
            scan(&spec.name, &spec.path, chunker, &spec.excludes, previous).map_err(fail)?;
        Ok(Folder {
            name: spec.name.clone(),
            root,
            excludes: spec.excludes.clone(),
            policy: spec.drift,
            local: Arc::new(local),
        })
    }

    /// The state reported to the manager.
    pub(crate) fn state(&self) -> FolderState {
        FolderState {
            folder: self.name.clone(),
            digest: self.digest(),
        }
    }

    /// Digest of what the folder holds.
    pub(crate) fn digest(&self) -> ManifestDigest {
        self.local.manifest.digest()
    }

    /// Rescans the folder (after a failed apply, whose effect on disk is partly unknown).
    pub(crate) fn rescan(&mut self, chunker: &Chunker) -> Result<(), String> {
        self.local = Arc::new(scan(
            &self.name,
            self.root.path(),
            chunker,
            &self.excludes,
            Some(&self.local),
        )?);
        Ok(())
    }
}

fn scan(
    name: &str,
    path: &Path,
    chunker: &Chunker,
    excludes: &Excludes,
    previous: Option<&LocalManifest>,
) -> Result<LocalManifest, String> {
    let started = std::time::Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (local, stats, warnings) =
        syncd_fsops::scan(path, chunker, excludes, previous, threads).map_err(|e| e.to_string())?;
    for w in &warnings {
        tracing::warn!(folder = %name, "{w}");
    }
    tracing::info!(
        folder = %name,
        entries = local.manifest.len(),
        hashed_files = stats.hashed_files,
        hashed_bytes = stats.hashed_bytes,
        reused_files = stats.reused_files,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "scanned"
    );
    Ok(local)
}

/// Each folder's manifest by name, as the state records them.
pub(crate) fn locals(folders: &[Folder]) -> std::collections::BTreeMap<String, LocalManifest> {
    folders
        .iter()
        .map(|f| (f.name.clone(), LocalManifest::clone(&f.local)))
        .collect()
}
