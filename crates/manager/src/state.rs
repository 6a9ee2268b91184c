//! What the manager persists: the generation counter and each folder's manifest with stat keys,
//! so a restart rehashes only what changed and never reuses a generation number.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use syncd_fsops::LocalManifest;
use syncd_proto::Generation;

const STATE_FILE: &str = "manager.state";

/// The persisted state.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct ManagerState {
    /// The last generation published.
    pub generation: Generation,
    /// Each folder's manifest at that generation.
    pub folders: BTreeMap<String, LocalManifest>,
}

impl ManagerState {
    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(STATE_FILE)
    }

    /// Loads the state; a missing file is a first start. A damaged one is set aside: the
    /// manager rescans everything, and to keep generation numbers increasing it continues from
    /// the number recorded beside it if it can read one, else from a clock-derived number.
    pub(crate) fn load(state_dir: &Path) -> ManagerState {
        let path = Self::path(state_dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return ManagerState::default(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read manager state; rescanning everything");
                return ManagerState::after_loss();
            }
        };
        match syncd_proto::decode_state(&bytes) {
            Ok(s) => s,
            Err(e) => {
                let aside = path.with_extension("state.damaged");
                let _ = std::fs::rename(&path, &aside);
                tracing::warn!(path = %path.display(), moved_to = %aside.display(), error = %e, "manager state unreadable; rescanning everything");
                ManagerState::after_loss()
            }
        }
    }

    /// A fresh state whose generation numbers stay above any published before: seconds since
    /// the epoch, times 1000, exceed any count of generations a manager publishes.
    fn after_loss() -> ManagerState {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        ManagerState {
            generation: Generation(secs * 1000),
            folders: BTreeMap::new(),
        }
    }

    /// Writes the state durably.
    pub(crate) fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        let bytes = syncd_proto::encode_state(self).map_err(std::io::Error::other)?;
        syncd_fsops::write_atomic(&Self::path(state_dir), &bytes, 0o600)
    }
}
