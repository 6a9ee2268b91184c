//! What the agent persists between runs: the generation it applied last and, per folder, the
//! manifest it left on disk with the stat keys that let a restart skip rehashing.
//!
//! It is kept as a snapshot (`agent.state`) plus a log of applied generations since it
//! (`agent.state.log`, see `syncd_fsops::StateLog`): recording a generation appends what it
//! changed, so the cost is the change's, not the folders'. Anything else (a pause, a resume, a
//! rescan after a failure) writes a new snapshot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use syncd_fsops::{LocalDelta, LocalManifest, StateLog};
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

/// Where the state is written.
#[derive(Debug)]
pub(crate) struct StateStore {
    log: Option<StateLog>,
    dir: PathBuf,
}

impl AgentState {
    /// Loads the state; a missing file is a first start. A damaged one is set aside and the
    /// agent starts as if new (it rescans and the manager resends what differs).
    pub(crate) fn load(state_dir: &Path) -> (AgentState, StateStore) {
        let path = state_dir.join(STATE_FILE);
        let mut store = StateStore {
            log: None,
            dir: state_dir.to_owned(),
        };
        let loaded = match StateLog::open(state_dir, STATE_FILE, 0o600) {
            Ok((log, loaded)) => {
                store.log = Some(log);
                loaded
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read agent state; starting afresh");
                return (AgentState::default(), store);
            }
        };
        if loaded.dropped_bytes > 0 {
            tracing::warn!(path = %path.display(), bytes = loaded.dropped_bytes, "dropped the torn end of the state log (a generation being recorded when the agent stopped; the folders are rescanned)");
        }
        let replay = || -> Result<AgentState, syncd_proto::DecodeError> {
            // Records may extend no snapshot: the first generations, before the log was first
            // folded, extend the empty state.
            let mut state: AgentState = match &loaded.snapshot {
                Some(snapshot) => syncd_proto::decode_state(snapshot)?,
                None => AgentState::default(),
            };
            for bytes in &loaded.records {
                let record: AppliedRecord = syncd_proto::decode_state(bytes)?;
                state.applied = record.applied;
                for (name, delta) in &record.folders {
                    state
                        .folders
                        .entry(name.clone())
                        .or_default()
                        .apply_delta(delta);
                }
            }
            Ok(state)
        };
        match replay() {
            Ok(s) => (s, store),
            Err(e) => {
                for name in [STATE_FILE.to_owned(), format!("{STATE_FILE}.log")] {
                    let p = state_dir.join(&name);
                    let _ = std::fs::rename(&p, state_dir.join(format!("{name}.damaged")));
                }
                tracing::warn!(path = %path.display(), error = %e, "agent state unreadable (set aside as *.damaged); starting afresh");
                store.log = StateLog::open(state_dir, STATE_FILE, 0o600)
                    .map(|(log, _)| log)
                    .ok();
                (AgentState::default(), store)
            }
        }
    }
}

impl StateStore {
    fn log(&mut self) -> std::io::Result<&mut StateLog> {
        if self.log.is_none() {
            self.log = Some(StateLog::open(&self.dir, STATE_FILE, 0o600)?.0);
        }
        Ok(self.log.as_mut().expect("opened above"))
    }

    /// Writes the whole state durably as a new snapshot.
    pub(crate) fn save(&mut self, state: &AgentState) -> std::io::Result<()> {
        let bytes = syncd_proto::encode_state(state).map_err(std::io::Error::other)?;
        self.log()?.rewrite(&bytes)
    }

    /// Records an applied generation durably: appended to the log, or folded with everything
    /// before it into a new snapshot (`full` brought up to date by `refresh`, which must
    /// include it) when the log is due.
    pub(crate) fn record(
        &mut self,
        record: &AppliedRecord,
        full: &mut AgentState,
        refresh: impl FnOnce(&mut AgentState),
    ) -> std::io::Result<()> {
        let bytes = syncd_proto::encode_state(record).map_err(std::io::Error::other)?;
        self.log()?.commit(&bytes, || {
            refresh(full);
            syncd_proto::encode_state(&*full).map_err(std::io::Error::other)
        })
    }
}
