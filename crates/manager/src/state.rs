//! What the manager persists: the generation counter and each folder's manifest with stat keys,
//! so a restart rehashes only what changed and never reuses a generation number.
//!
//! It is kept as a snapshot (`manager.state`) plus a log of generations since it
//! (`manager.state.log`, see `syncd_fsops::StateLog`): publishing a generation appends its
//! changes, so the cost is the change's, not the folders'.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use syncd_fsops::{LocalDelta, LocalManifest, StateLog};
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

/// One published generation, as appended to the log.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct GenerationRecord {
    /// The generation.
    pub generation: Generation,
    /// What changed in each folder that changed.
    pub folders: Vec<(String, LocalDelta)>,
}

/// Where the state is written.
#[derive(Debug)]
pub(crate) struct StateStore {
    log: Option<StateLog>,
    dir: PathBuf,
}

impl ManagerState {
    /// Loads the state; a missing file is a first start. A damaged one is set aside: the
    /// manager rescans everything, and to keep generation numbers increasing it continues from
    /// a clock-derived number.
    pub(crate) fn load(state_dir: &Path) -> (ManagerState, StateStore) {
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
                tracing::warn!(path = %path.display(), error = %e, "cannot read manager state; rescanning everything");
                return (ManagerState::after_loss(), store);
            }
        };
        if loaded.dropped_bytes > 0 {
            tracing::warn!(path = %path.display(), bytes = loaded.dropped_bytes, "dropped the torn end of the state log (a generation being recorded when the manager stopped; no agent saw it)");
        }
        let Some(snapshot) = loaded.snapshot else {
            return (ManagerState::default(), store);
        };
        let replay = || -> Result<ManagerState, syncd_proto::DecodeError> {
            let mut state: ManagerState = syncd_proto::decode_state(&snapshot)?;
            for bytes in &loaded.records {
                let record: GenerationRecord = syncd_proto::decode_state(bytes)?;
                state.generation = record.generation;
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
                tracing::warn!(path = %path.display(), error = %e, "manager state unreadable (set aside as *.damaged); rescanning everything");
                // Start a fresh log: the damaged files are out of the way.
                store.log = StateLog::open(state_dir, STATE_FILE, 0o600)
                    .map(|(log, _)| log)
                    .ok();
                (ManagerState::after_loss(), store)
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
}

impl StateStore {
    /// Records a generation durably: its changes appended to the log, or, when the log is due
    /// for folding, the whole state `full()` (which must include this generation) as a new
    /// snapshot.
    pub(crate) fn record(
        &mut self,
        record: &GenerationRecord,
        full: impl FnOnce() -> ManagerState,
    ) -> std::io::Result<()> {
        if self.log.is_none() {
            // The state directory was unreadable at start; try again (an error here is the
            // caller's: it publishes nothing it could not record).
            self.log = Some(StateLog::open(&self.dir, STATE_FILE, 0o600)?.0);
        }
        let log = self.log.as_mut().expect("opened above");
        let bytes = syncd_proto::encode_state(record).map_err(std::io::Error::other)?;
        log.commit(&bytes, || {
            syncd_proto::encode_state(&full()).map_err(std::io::Error::other)
        })
    }
}
