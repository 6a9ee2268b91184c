//! What the agent persists between runs: the generation it applied last and, per folder, the
//! manifest it left on disk with the stat keys that let a restart skip rehashing.
//!
//! It is kept as a snapshot (`agent.state`) plus a log of applied generations since it
//! (`agent.state.log`, see `syncd_fsops::StateLog`): recording a generation appends what it
//! changed, so the cost is the change's, not the folders'. Anything else (a pause, a resume, a
//! rescan after a failure) writes a new snapshot.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use syncd_fsops::{LocalDelta, LocalManifest, StateFile};
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

/// One applied generation, as appended to the log.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct AppliedRecord {
    /// The generation applied.
    pub applied: Generation,
    /// What changed in each folder that changed.
    pub folders: Vec<(String, LocalDelta)>,
}

impl AgentState {
    /// Loads the state; a missing file is a first start. A damaged one is set aside and the
    /// agent starts as if new (it rescans and the manager resends what differs).
    pub(crate) fn load(state_dir: &Path) -> (AgentState, StateFile) {
        let (file, restored) = StateFile::restore(
            state_dir,
            STATE_FILE,
            0o600,
            syncd_proto::decode_state::<AgentState>,
            |state, bytes| {
                let record: AppliedRecord = syncd_proto::decode_state(bytes)?;
                state.applied = record.applied;
                syncd_fsops::apply_deltas(&mut state.folders, &record.folders);
                Ok(())
            },
        );
        if restored.dropped_bytes > 0 {
            tracing::warn!(dir = %state_dir.display(), bytes = restored.dropped_bytes, "dropped the torn end of the state log (a generation being recorded when the agent stopped; the folders are rescanned)");
        }
        match restored.state {
            Ok(state) => (state, file),
            Err(why) => {
                tracing::warn!(error = %why, "agent state lost; starting afresh");
                (AgentState::default(), file)
            }
        }
    }
}

/// Writes the whole state durably as a new snapshot.
pub(crate) fn save(file: &mut StateFile, state: &AgentState) -> std::io::Result<()> {
    let bytes = syncd_proto::encode_state(state).map_err(std::io::Error::other)?;
    file.rewrite(&bytes)
}

/// Records an applied generation durably: appended to the log, or folded with everything before
/// it into a new snapshot (`full` brought up to date by `refresh`, which must include it) when
/// the log is due.
pub(crate) fn record(
    file: &mut StateFile,
    record: &AppliedRecord,
    full: &mut AgentState,
    refresh: impl FnOnce(&mut AgentState),
) -> std::io::Result<()> {
    let bytes = syncd_proto::encode_state(record).map_err(std::io::Error::other)?;
    file.commit(&bytes, || {
        refresh(full);
        syncd_proto::encode_state(&*full).map_err(std::io::Error::other)
    })
}
