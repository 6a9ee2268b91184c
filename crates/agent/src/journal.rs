//! The apply journal: what an apply is about to put in place, written durably before its first
//! rename and emptied once the result is recorded in the agent state.
//!
//! An agent killed between the two leaves folders that match neither the recorded state nor
//! the manager's generation. Without the journal, the next start would take the agent's own
//! half-finished renames for an operator's edits, back them up and report them; with it, those
//! paths are recognised and only real local edits are treated as such.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use syncd_manifest::{Change, ChunkHash, FileHash, Node, NodeKind, RelPath, SymlinkTarget};

const JOURNAL_FILE: &str = "apply.journal";

/// What one path looks like once the apply has reached it; `None` for a removal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Shape {
    Dir { mode: u32 },
    File { hash: FileHash, mode: u32 },
    Symlink(SymlinkTarget),
}

impl Shape {
    /// Modification times are left out: a directory's changes with every rename inside it.
    fn of(node: &Node) -> Shape {
        match &node.kind {
            NodeKind::Dir => Shape::Dir { mode: node.mode },
            NodeKind::File(f) => Shape::File {
                hash: f.hash,
                mode: node.mode,
            },
            NodeKind::Symlink(t) => Shape::Symlink(t.clone()),
        }
    }
}

/// Per folder name, the shape each changed path takes, and the directories whose entries
/// change (their modification time moves with every rename, before the apply restores it).
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Journal {
    folders: HashMap<String, Planned>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Planned {
    paths: HashMap<RelPath, Option<Shape>>,
    dirs: HashSet<RelPath>,
}

impl Journal {
    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(JOURNAL_FILE)
    }

    /// Records the changes about to be made to `folder`.
    pub(crate) fn add(&mut self, folder: &str, changes: &[Change]) {
        let planned = self.folders.entry(folder.to_owned()).or_default();
        for change in changes {
            let shape = match change {
                Change::Put(_, node) => Some(Shape::of(node)),
                Change::Remove(_) => None,
            };
            planned.paths.insert(change.path().clone(), shape);
            if let Some(parent) = change.path().parent() {
                planned.dirs.insert(parent);
            }
        }
    }

    /// Whether `change` (from `before`, what was recorded, to what is on disk) is one this
    /// journal planned, i.e. the agent's own work rather than a local edit.
    pub(crate) fn planned(&self, folder: &str, before: Option<&Node>, change: &Change) -> bool {
        let Some(planned) = self.folders.get(folder) else {
            return false;
        };
        if let Some(shape) = planned.paths.get(change.path()) {
            return match change {
                Change::Put(_, node) => shape.as_ref() == Some(&Shape::of(node)),
                Change::Remove(_) => shape.is_none(),
            };
        }
        // A directory whose entries the apply changed, differing only in its mtime.
        match (change, before) {
            (Change::Put(path, node), Some(before)) => {
                node.is_dir()
                    && before.is_dir()
                    && node.mode == before.mode
                    && planned.dirs.contains(path)
            }
            _ => false,
        }
    }

    /// Writes the journal durably, in place.
    ///
    /// The file is rewritten, not replaced: a new file per apply (written beside, renamed over,
    /// removed after the commit) cost an inode allocation and release, two directory updates
    /// and a directory fsync per generation, and on ext4 without a journal every file created
    /// also steps over the inodes released in the last minutes, which a worker applying one
    /// generation after another keeps plentiful. A write cut short by a crash needs no care:
    /// nothing is renamed before this returns, so such a journal covers no rename; it fails
    /// its checksum and is ignored.
    pub(crate) fn write(&self, state_dir: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut bytes = syncd_proto::encode_state(self).map_err(std::io::Error::other)?;
        let sum = ChunkHash::of(&bytes);
        bytes.extend_from_slice(&sum.0);
        let path = Self::path(state_dir);
        let open = |create| {
            std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .create_new(create)
                .mode(0o600)
                .open(&path)
        };
        let (mut file, created) = match open(false) {
            Ok(f) => (f, false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (open(true)?, true),
            Err(e) => return Err(e),
        };
        file.write_all(&bytes)?;
        file.sync_data()?;
        if created {
            // Its name must survive a crash too, once.
            std::fs::File::open(state_dir)?.sync_all()?;
        }
        Ok(())
    }

    /// The journal an interrupted apply left, if any. An unreadable one is ignored (with a
    /// warning): the only cost is that the agent's own changes are backed up as local ones.
    pub(crate) fn load(state_dir: &Path) -> Option<Journal> {
        let path = Self::path(state_dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the apply journal");
                return None;
            }
        };
        if bytes.is_empty() {
            // Cleared: the last apply was recorded.
            return None;
        }
        let checked = bytes
            .len()
            .checked_sub(32)
            .map(|at| bytes.split_at(at))
            .filter(|(body, sum)| ChunkHash::of(body).0[..] == sum[..]);
        let Some((body, _)) = checked else {
            tracing::warn!(path = %path.display(), "apply journal cut short or damaged; ignoring it");
            return None;
        };
        match syncd_proto::decode_state(body) {
            Ok(j) => Some(j),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "apply journal unreadable; ignoring it");
                None
            }
        }
    }

    /// Empties the journal once what it covers is recorded (kept as an empty file, to be
    /// rewritten by the next apply; see [`Journal::write`]).
    pub(crate) fn clear(state_dir: &Path) -> std::io::Result<()> {
        match std::fs::OpenOptions::new()
            .write(true)
            .open(Self::path(state_dir))
        {
            Ok(f) => f.set_len(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use syncd_manifest::{ChunkParams, Manifest, Mtime};

    use super::*;

    fn file(byte: u8, mode: u32, mtime: i64) -> Node {
        let chunker = syncd_manifest::Chunker::new(ChunkParams::DEFAULT).unwrap();
        let content = syncd_manifest::chunk_reader(&chunker, &[byte; 100][..], |_, _| {}).unwrap();
        Node {
            kind: NodeKind::File(content),
            mode,
            mtime: Mtime {
                secs: mtime,
                nanos: 0,
            },
        }
    }

    fn dir(mode: u32, mtime: i64) -> Node {
        Node {
            kind: NodeKind::Dir,
            mode,
            mtime: Mtime {
                secs: mtime,
                nanos: 0,
            },
        }
    }

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn recognises_only_the_planned_shape() {
        let mut old = Manifest::new(ChunkParams::DEFAULT);
        old.insert(p("apps"), dir(0o755, 1));
        old.insert(p("apps/a.car"), file(1, 0o644, 1));
        old.insert(p("gone.xml"), file(2, 0o644, 1));
        let mut new = Manifest::new(ChunkParams::DEFAULT);
        new.insert(p("apps"), dir(0o755, 1));
        new.insert(p("apps/a.car"), file(3, 0o644, 2));
        let mut journal = Journal::default();
        journal.add("deployment", &syncd_manifest::diff(&old, &new));

        let state = tempfile::tempdir().unwrap();
        journal.write(state.path()).unwrap();
        let journal = Journal::load(state.path()).expect("written");

        let planned = |folder: &str, before: Option<&Node>, change: Change| {
            journal.planned(folder, before, &change)
        };
        let old_car = old.get(&p("apps/a.car"));
        // The planned content, whatever its mtime: ours.
        assert!(planned(
            "deployment",
            old_car,
            Change::Put(p("apps/a.car"), file(3, 0o644, 9))
        ));
        assert!(planned("deployment", None, Change::Remove(p("gone.xml"))));
        // Other content, other mode, other folder, unplanned path: someone else's.
        assert!(!planned(
            "deployment",
            old_car,
            Change::Put(p("apps/a.car"), file(4, 0o644, 2))
        ));
        assert!(!planned(
            "deployment",
            old_car,
            Change::Put(p("apps/a.car"), file(3, 0o600, 2))
        ));
        assert!(!planned(
            "other",
            old_car,
            Change::Put(p("apps/a.car"), file(3, 0o644, 2))
        ));
        assert!(!planned(
            "deployment",
            old_car,
            Change::Remove(p("apps/a.car"))
        ));
        assert!(!planned(
            "deployment",
            None,
            Change::Put(p("new.xml"), file(3, 0o644, 2))
        ));
        // The directory the apply renamed into: its mtime moved, nothing else.
        let apps = old.get(&p("apps"));
        assert!(planned(
            "deployment",
            apps,
            Change::Put(p("apps"), dir(0o755, 7))
        ));
        assert!(!planned(
            "deployment",
            apps,
            Change::Put(p("apps"), dir(0o700, 7))
        ));
        assert!(!planned(
            "deployment",
            None,
            Change::Put(p("other"), dir(0o755, 7))
        ));

        Journal::clear(state.path()).unwrap();
        assert!(Journal::load(state.path()).is_none());
        Journal::clear(state.path()).expect("clearing twice is fine");
    }

    #[test]
    fn a_damaged_journal_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(JOURNAL_FILE), b"garbage").unwrap();
        assert!(Journal::load(dir.path()).is_none());
    }

    #[test]
    fn the_journal_is_rewritten_in_place_and_one_cut_short_is_ignored() {
        use std::os::unix::fs::MetadataExt;
        let state = tempfile::tempdir().unwrap();
        let path = state.path().join(JOURNAL_FILE);
        let journal_of = |byte| {
            let mut j = Journal::default();
            j.add(
                "deployment",
                &[Change::Put(p("apps/a.car"), file(byte, 0o644, 1))],
            );
            j
        };
        journal_of(1).write(state.path()).unwrap();
        let ino = std::fs::metadata(&path).unwrap().ino();
        Journal::clear(state.path()).unwrap();
        assert!(Journal::load(state.path()).is_none(), "cleared");
        // The next apply's journal goes into the same file, and is what loads.
        journal_of(2).write(state.path()).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().ino(),
            ino,
            "the same inode"
        );
        let loaded = Journal::load(state.path()).expect("written");
        assert!(loaded.planned(
            "deployment",
            None,
            &Change::Put(p("apps/a.car"), file(2, 0o644, 1))
        ));
        let first = Change::Put(p("apps/a.car"), file(1, 0o644, 1));
        assert!(
            !loaded.planned("deployment", None, &first),
            "not the first one's"
        );
        // A crash part-way through a write leaves a prefix of it: ignored, whatever its length.
        let whole = std::fs::read(&path).unwrap();
        for len in [0, 1, whole.len() / 2, whole.len() - 32, whole.len() - 1] {
            std::fs::write(&path, &whole[..len]).unwrap();
            assert!(
                Journal::load(state.path()).is_none(),
                "a prefix of {len} bytes"
            );
        }
        // So is one with a flipped byte.
        let mut flipped = whole.clone();
        flipped[whole.len() / 3] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert!(Journal::load(state.path()).is_none());
        std::fs::write(&path, &whole).unwrap();
        assert!(Journal::load(state.path()).is_some());
    }
}
