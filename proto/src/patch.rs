//! A file's new chunk list as an edit of the list the agent already holds: runs copied from the
//! old list and the chunk references that are new. A 63 MB WAR has a few thousand chunks
//! (130 KB of references); one changed entry touches a handful of them.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use syncd_manifest::{
    Change, ChunkHash, ChunkRef, FileContent, FileHash, Mtime, Node, NodeKind, RelPath,
};

/// A file put as an edit of the version the agent holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchedPut {
    /// The file.
    pub path: RelPath,
    /// Its mode bits.
    pub mode: u32,
    /// Its modification time.
    pub mtime: Mtime,
    /// Its size.
    pub size: u64,
    /// Its hash, over the rebuilt chunk list.
    pub hash: FileHash,
    /// The hash of the version the edit applies to.
    pub from: FileHash,
    /// The edit.
    pub ops: Vec<ListOp>,
}

/// One step of a chunk-list edit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListOp {
    /// `len` references of the old list from `start`.
    Copy {
        /// First index in the old list.
        start: u32,
        /// How many.
        len: u32,
    },
    /// References that are not in the old list (at that place).
    New(Vec<ChunkRef>),
}

/// Why a patch does not apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// The agent does not hold the version the patch edits.
    #[error("{path}: the chunk-list edit is for another version of the file than this node holds")]
    OtherBase {
        /// The file.
        path: RelPath,
    },
    /// A copy reaches past the old list.
    #[error("{path}: the chunk-list edit copies past the end of the old list")]
    OutOfRange {
        /// The file.
        path: RelPath,
    },
}

impl PatchedPut {
    /// The number of items the patch adds to an update (for its bound).
    pub fn items(&self) -> usize {
        1 + self
            .ops
            .iter()
            .map(|op| match op {
                ListOp::Copy { .. } => 1,
                ListOp::New(refs) => refs.len(),
            })
            .sum::<usize>()
    }

    /// The change this patch stands for, given the node the agent holds at its path. The caller
    /// still validates the result (sizes and file hash).
    pub fn resolve(&self, old: Option<&Node>) -> Result<Change, PatchError> {
        let old = old
            .and_then(Node::file)
            .filter(|f| f.hash == self.from)
            .ok_or_else(|| PatchError::OtherBase {
                path: self.path.clone(),
            })?;
        let mut chunks = Vec::new();
        for op in &self.ops {
            match op {
                ListOp::Copy { start, len } => {
                    let (start, len) = (*start as usize, *len as usize);
                    let run = start
                        .checked_add(len)
                        .and_then(|end| old.chunks.get(start..end))
                        .ok_or_else(|| PatchError::OutOfRange {
                            path: self.path.clone(),
                        })?;
                    chunks.extend_from_slice(run);
                }
                ListOp::New(refs) => chunks.extend_from_slice(refs),
            }
        }
        Ok(Change::Put(
            self.path.clone(),
            Node {
                kind: NodeKind::File(FileContent {
                    size: self.size,
                    hash: self.hash,
                    chunks: chunks.into(),
                }),
                mode: self.mode,
                mtime: self.mtime,
            },
        ))
    }
}

/// Copies shorter than this are sent as new references: a copy costs about as much as a few.
const MIN_COPY: usize = 2;

/// The edit that turns `old` into `new`, or `None` when it would not be at most half the size of
/// `new` sent whole.
pub fn patch(path: &RelPath, old: &FileContent, new: &Node) -> Option<PatchedPut> {
    let NodeKind::File(f) = &new.kind else {
        return None;
    };
    let mut first: HashMap<ChunkHash, usize> = HashMap::with_capacity(old.chunks.len());
    for (i, c) in old.chunks.iter().enumerate() {
        first.entry(c.hash).or_insert(i);
    }
    let mut ops: Vec<ListOp> = Vec::new();
    let mut new_refs = 0usize;
    let mut i = 0;
    while i < f.chunks.len() {
        let run = first.get(&f.chunks[i].hash).map(|&j| {
            let mut k = 0;
            while i + k < f.chunks.len()
                && j + k < old.chunks.len()
                && old.chunks[j + k] == f.chunks[i + k]
            {
                k += 1;
            }
            (j, k)
        });
        match run {
            Some((j, k)) if k >= MIN_COPY => {
                ops.push(ListOp::Copy {
                    start: j as u32,
                    len: k as u32,
                });
                i += k;
            }
            _ => {
                match ops.last_mut() {
                    Some(ListOp::New(refs)) => refs.push(f.chunks[i]),
                    _ => ops.push(ListOp::New(vec![f.chunks[i]])),
                }
                new_refs += 1;
                i += 1;
            }
        }
    }
    // A copy costs about a tenth of a reference.
    let copies = ops
        .iter()
        .filter(|op| matches!(op, ListOp::Copy { .. }))
        .count();
    let cost = new_refs * 10 + copies;
    if cost * 2 > f.chunks.len() * 10 {
        return None;
    }
    Some(PatchedPut {
        path: path.clone(),
        mode: new.mode,
        mtime: new.mtime,
        size: f.size,
        hash: f.hash,
        from: old.hash,
        ops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(ids: &[u32]) -> Vec<ChunkRef> {
        ids.iter()
            .map(|i| ChunkRef {
                hash: ChunkHash::of(&i.to_le_bytes()),
                len: 1000 + i,
            })
            .collect()
    }

    fn file(ids: &[u32]) -> FileContent {
        let chunks = refs(ids);
        let size = chunks.iter().map(|c| c.len as u64).sum();
        FileContent {
            size,
            hash: FileHash::from_chunks(size, chunks.iter().map(|c| &c.hash)),
            chunks: chunks.into(),
        }
    }

    fn node(f: FileContent) -> Node {
        Node {
            kind: NodeKind::File(f),
            mode: 0o644,
            mtime: Mtime { secs: 5, nanos: 6 },
        }
    }

    #[test]
    fn an_edit_in_the_middle_and_at_the_front_rebuilds_the_new_list() {
        let path = RelPath::new("webapps/a.war").unwrap();
        let old_ids: Vec<u32> = (0..1000).collect();
        let old = file(&old_ids);
        // A new chunk in front, one replaced in the middle, the tail rewritten.
        let mut new_ids = vec![5000];
        new_ids.extend(0..500);
        new_ids.push(6000);
        new_ids.extend(501..998);
        new_ids.push(7000);
        let new = node(file(&new_ids));
        let p = patch(&path, &old, &new).expect("worth patching");
        assert!(p.items() < 12, "{:?}", p.ops);
        let rebuilt = p.resolve(Some(&node(old.clone()))).unwrap();
        assert_eq!(rebuilt, Change::Put(path.clone(), new.clone()));
        // Against another version, or nothing: refused.
        let other = node(file(&[1, 2, 3]));
        assert!(matches!(
            p.resolve(Some(&other)),
            Err(PatchError::OtherBase { .. })
        ));
        assert!(matches!(p.resolve(None), Err(PatchError::OtherBase { .. })));
    }

    #[test]
    fn an_unrelated_list_is_not_patched_and_a_lying_patch_is_refused() {
        let path = RelPath::new("a.war").unwrap();
        let old = file(&(0..100).collect::<Vec<_>>());
        let new = node(file(&(200..300).collect::<Vec<_>>()));
        assert_eq!(patch(&path, &old, &new), None);
        let bad = PatchedPut {
            path: path.clone(),
            mode: 0o644,
            mtime: Mtime { secs: 1, nanos: 0 },
            size: 1,
            hash: old.hash,
            from: old.hash,
            ops: vec![ListOp::Copy {
                start: 90,
                len: u32::MAX,
            }],
        };
        assert!(matches!(
            bad.resolve(Some(&node(old))),
            Err(PatchError::OutOfRange { .. })
        ));
    }
}
