//! The manager's record of each agent's pause: decided here (`syncctl pause NODE`) or reported
//! by the agent (`syncctl pause` on the worker). Persisted, so a paused agent stays paused across
//! restarts of both daemons, and relayed to each agent's connection task through a watch channel.
//! Between two decisions, the later one (by `set_at`) wins.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use syncd_proto::Pause;
use tokio::sync::watch;

const FILE: &str = "pauses.state";

/// The latest decision about one agent's pause.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseRecord {
    /// The pause, or `None` if the latest decision was to resume (or there was none).
    pub pause: Option<Pause>,
    /// When that decision was made (milliseconds since the Unix epoch; 0 for never).
    pub set_at: u64,
}

/// Every agent's pause record.
#[derive(Debug)]
pub(crate) struct Pauses {
    path: PathBuf,
    records: Mutex<BTreeMap<String, watch::Sender<PauseRecord>>>,
}

impl Pauses {
    /// Loads the records for `agents` from the state directory.
    pub(crate) fn load(state_dir: &Path, agents: impl IntoIterator<Item = String>) -> Pauses {
        let path = state_dir.join(FILE);
        let saved: BTreeMap<String, PauseRecord> = match std::fs::read(&path) {
            Ok(bytes) => syncd_proto::decode_state(&bytes).unwrap_or_else(|e| {
                tracing::error!(path = %path.display(), error = %e, "pause records unreadable; every agent starts unpaused");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        let records = agents
            .into_iter()
            .map(|name| {
                let record = saved.get(&name).cloned().unwrap_or_default();
                (name, watch::channel(record).0)
            })
            .collect();
        Pauses {
            path,
            records: Mutex::new(records),
        }
    }

    /// The current record of `agent`, and a receiver of its changes.
    pub(crate) fn subscribe(&self, agent: &str) -> Option<watch::Receiver<PauseRecord>> {
        let records = self
            .records
            .lock()
            .expect("pause records are never poisoned");
        records.get(agent).map(watch::Sender::subscribe)
    }

    /// The current record of `agent`.
    pub(crate) fn get(&self, agent: &str) -> Option<PauseRecord> {
        let records = self
            .records
            .lock()
            .expect("pause records are never poisoned");
        records.get(agent).map(|s| s.borrow().clone())
    }

    /// Records a decision if it is newer than the current one; persists and relays it. Returns
    /// whether it was newer.
    pub(crate) fn decide(&self, agent: &str, record: PauseRecord) -> std::io::Result<bool> {
        let records = self
            .records
            .lock()
            .expect("pause records are never poisoned");
        let Some(sender) = records.get(agent) else {
            return Ok(false);
        };
        if record.set_at <= sender.borrow().set_at {
            return Ok(false);
        }
        let mut all: BTreeMap<String, PauseRecord> = records
            .iter()
            .map(|(k, v)| (k.clone(), v.borrow().clone()))
            .collect();
        all.insert(agent.to_owned(), record.clone());
        let bytes = syncd_proto::encode_state(&all).map_err(std::io::Error::other)?;
        syncd_fsops::write_atomic(&self.path, &bytes, 0o600)?;
        sender.send_replace(record);
        Ok(true)
    }
}
