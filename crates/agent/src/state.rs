//! What the agent persists between runs: the generation it applied last and, per folder, the
//! manifest it left on disk with the stat keys that let a restart skip rehashing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use syncd_fsops::LocalManifest;
use syncd_proto::Generation;

const STATE_FILE: &str = "agent.state";

/// The persisted state.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct AgentState {
    /// The last generation applied completely.
    pub applied: Generation,
    /// Per folder name, what was on disk after that.
    pub folders: BTreeMap<String, LocalManifest>,
    /// The pause in force, if any (it survives restarts).
    pub pause: Option<syncd_proto::Pause>,
    /// When the last pause or resume was decided (milliseconds since the Unix epoch).
    pub pause_set_at: u64,
}

impl AgentState {
    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(STATE_FILE)
    }

    /// Loads the state; a missing file is a first start. A damaged one is set aside and the
    /// agent starts as if new (it rescans and the manager resends what differs).
    pub(crate) fn load(state_dir: &Path) -> AgentState {
        let path = Self::path(state_dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return AgentState::default(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read agent state; starting afresh");
                return AgentState::default();
            }
        };
        match syncd_proto::decode_state(&bytes) {
            Ok(s) => s,
            Err(e) => {
                let aside = path.with_extension("state.damaged");
                let _ = std::fs::rename(&path, &aside);
                tracing::warn!(path = %path.display(), moved_to = %aside.display(), error = %e, "agent state unreadable; starting afresh");
                AgentState::default()
            }
        }
    }

    /// Writes the state durably (temporary file, fsync, rename, fsync of the directory).
    pub(crate) fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        let bytes = syncd_proto::encode_state(self).map_err(std::io::Error::other)?;
        syncd_fsops::write_atomic(&Self::path(state_dir), &bytes, 0o600)
    }
}
