//! What the manager persists: the generation counter and each folder's manifest with stat keys,
//! so a restart rehashes only what changed and never reuses a generation number.
//!
//! It is kept as a snapshot (`manager.state`) plus a log of generations since it
//! (`manager.state.log`, see `syncd_fsops::StateLog`): publishing a generation appends its
//! changes, so the cost is the change's, not the folders'.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use syncd_fsops::{LocalDelta, LocalManifest, StateFile};
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

/// The persisted state, borrowed from the live folders: encodes exactly as [`ManagerState`]
/// (a map's keys and values encode the same borrowed or owned), without copying every
/// manifest to write a snapshot.
#[derive(Debug, Serialize)]
pub(crate) struct ManagerStateView<'a> {
    pub generation: Generation,
    pub folders: BTreeMap<&'a str, &'a LocalManifest>,
}

/// One published generation, as appended to the log.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct GenerationRecord {
    /// The generation.
    pub generation: Generation,
    /// What changed in each folder that changed.
    pub folders: Vec<(String, LocalDelta)>,
}

impl ManagerState {
    /// The state, borrowed for encoding.
    #[cfg(test)]
    pub(crate) fn view(&self) -> ManagerStateView<'_> {
        ManagerStateView {
            generation: self.generation,
            folders: self.folders.iter().map(|(k, v)| (k.as_str(), v)).collect(),
        }
    }

    /// Loads the state; a missing file is a first start. A damaged one is set aside: the
    /// manager rescans everything, and to keep generation numbers increasing it continues from
    /// a clock-derived number.
    pub(crate) fn load(state_dir: &Path) -> (ManagerState, StateFile) {
        let (file, restored) = StateFile::restore(
            state_dir,
            STATE_FILE,
            0o600,
            syncd_proto::decode_state::<ManagerState>,
            |state, bytes| {
                let record: GenerationRecord = syncd_proto::decode_state(bytes)?;
                state.generation = record.generation;
                syncd_fsops::apply_deltas(&mut state.folders, &record.folders);
                Ok(())
            },
        );
        if restored.dropped_bytes > 0 {
            tracing::warn!(dir = %state_dir.display(), bytes = restored.dropped_bytes, "dropped the torn end of the state log (a generation being recorded when the manager stopped; no agent saw it)");
        }
        match restored.state {
            Ok(state) => (state, file),
            Err(why) => {
                tracing::warn!(error = %why, "manager state lost; rescanning everything");
                (ManagerState::after_loss(), file)
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

/// Records a generation durably: its changes appended to the log, or, when the log is due for
/// folding, the whole state `full()` (which must include this generation) as a new snapshot.
pub(crate) fn record<'a>(
    file: &mut StateFile,
    record: &GenerationRecord,
    full: impl FnOnce() -> ManagerStateView<'a>,
) -> std::io::Result<()> {
    let bytes = syncd_proto::encode_state(record).map_err(std::io::Error::other)?;
    file.commit(&bytes, || {
        syncd_proto::encode_state(&full()).map_err(std::io::Error::other)
    })
}

#[cfg(test)]
mod tests {
    use syncd_manifest::{Change, ChunkRef, FileContent, FileHash, Mtime, Node, NodeKind, RelPath};

    use super::*;

    fn file(byte: u8) -> Node {
        let hash = syncd_manifest::ChunkHash::of(&[byte]);
        Node {
            kind: NodeKind::File(FileContent {
                size: 1,
                hash: FileHash::from_chunks(1, [&hash]),
                chunks: vec![ChunkRef { hash, len: 1 }].into(),
            }),
            mode: 0o644,
            mtime: Mtime { secs: 1, nanos: 0 },
        }
    }

    /// Publishes generations 1..=n, each putting one file, as `Control::publish` records them.
    fn publish(store: &mut StateFile, state: &mut ManagerState, n: u64) {
        for g in 1..=n {
            let path = RelPath::new(format!("f{g}")).unwrap();
            let changes = vec![Change::Put(path, file(g as u8))];
            let folder = state.folders.entry("app".into()).or_default();
            folder.manifest.apply(&changes);
            state.generation = Generation(g);
            let rec = GenerationRecord {
                generation: Generation(g),
                folders: vec![("app".into(), LocalDelta::new(changes, folder))],
            };
            record(store, &rec, || state.view()).unwrap();
        }
    }

    #[test]
    fn the_borrowed_view_encodes_as_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let (mut state, mut store) = ManagerState::load(dir.path());
        publish(&mut store, &mut state, 3);
        state
            .folders
            .insert("empty".into(), LocalManifest::default());
        let owned = syncd_proto::encode_state(&state).unwrap();
        assert_eq!(syncd_proto::encode_state(&state.view()).unwrap(), owned);
        let back: ManagerState = syncd_proto::decode_state(&owned).unwrap();
        assert_eq!(back.folders, state.folders);
    }

    #[test]
    fn a_restart_finds_every_recorded_generation_with_or_without_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (mut state, mut store) = ManagerState::load(dir.path());
        assert_eq!(state.generation, Generation(0));
        publish(&mut store, &mut state, 5);
        // Only the log so far (the first generations extend no snapshot).
        assert!(!dir.path().join(STATE_FILE).exists());
        let (loaded, _) = ManagerState::load(dir.path());
        assert_eq!(loaded.generation, Generation(5));
        assert_eq!(loaded.folders, state.folders);

        // Once folded into a snapshot, the same.
        store
            .rewrite(&syncd_proto::encode_state(&state).unwrap())
            .unwrap();
        let (loaded, _) = ManagerState::load(dir.path());
        assert_eq!(loaded.generation, Generation(5));
        assert_eq!(loaded.folders, state.folders);
    }

    #[test]
    fn a_damaged_state_restarts_numbering_above_anything_published() {
        let dir = tempfile::tempdir().unwrap();
        let (mut state, mut store) = ManagerState::load(dir.path());
        publish(&mut store, &mut state, 2);
        // A record that passes its checksum but does not decode (another layout).
        let mut bad = syncd_fsops::StateLog::open(dir.path(), STATE_FILE, 0o600)
            .unwrap()
            .0;
        bad.append(b"not a state record").unwrap();
        let (loaded, _) = ManagerState::load(dir.path());
        assert!(loaded.generation.0 > 1_000_000, "{:?}", loaded.generation);
        assert!(loaded.folders.is_empty());
        assert!(
            dir.path()
                .join(format!("{STATE_FILE}.log.damaged"))
                .exists()
        );
    }
}
