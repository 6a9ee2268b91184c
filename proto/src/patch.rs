//! A file's new chunk list as an edit of the list the agent already holds: runs copied from the
//! old list and the chunk references that are new. A 63 MB WAR has a few thousand chunks
//! (130 KB of references); one changed entry touches a handful of them.
//!
//! New chunks of at most [`MAX_INLINE_CHUNK`] bytes may travel inside the edit itself, their
//! bytes concatenated and compressed as one zstd frame: a rebuilt archive rewrites every entry's
//! local header (about 80 bytes each, all alike), and sending a 32-byte reference for each, then
//! fetching each on its own, costs more than the headers compressed together.

use std::collections::HashMap;
use std::sync::Arc;

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
    /// One zstd frame of the bytes of every [`ListOp::Inline`] chunk, in list order (empty when
    /// there are none).
    pub inline: Vec<u8>,
}

/// Largest chunk sent inside an edit.
pub const MAX_INLINE_CHUNK: u32 = 512;
/// Most bytes (before compression) one edit carries inline.
pub const MAX_INLINE_BYTES: usize = 1 << 20;
/// zstd level for inline chunks: their frame is made once per agent and generation and is at
/// most a megabyte; alike headers gain from the longer search.
const INLINE_LEVEL: i32 = 9;

/// An edit resolved against the agent's version: the change, and the chunks that came inline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The file put.
    pub change: Change,
    /// The inline chunks' bytes, by hash (each hash computed here from the bytes).
    pub inline: Vec<(ChunkHash, Arc<[u8]>)>,
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
    /// New chunks whose bytes are in the edit's `inline` frame, by length, in order.
    Inline(Vec<u32>),
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
    /// The inline chunks are malformed: a length of 0 or over [`MAX_INLINE_CHUNK`], more than
    /// [`MAX_INLINE_BYTES`] in all, or a frame that does not decompress to exactly their bytes.
    #[error("{path}: the chunk-list edit's inline chunks are malformed")]
    BadInline {
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
                ListOp::Inline(lens) => lens.len(),
            })
            .sum::<usize>()
    }

    /// The change this patch stands for, given the node the agent holds at its path, and the
    /// chunks that came inline. The caller still validates the result (sizes and file hash).
    pub fn resolve(&self, old: Option<&Node>) -> Result<Resolved, PatchError> {
        let old = old
            .and_then(Node::file)
            .filter(|f| f.hash == self.from)
            .ok_or_else(|| PatchError::OtherBase {
                path: self.path.clone(),
            })?;
        let bad_inline = || PatchError::BadInline {
            path: self.path.clone(),
        };
        let inline_lens = self.ops.iter().filter_map(|op| match op {
            ListOp::Inline(lens) => Some(lens),
            _ => None,
        });
        let mut total = 0usize;
        for &len in inline_lens.flatten() {
            if len == 0 || len > MAX_INLINE_CHUNK {
                return Err(bad_inline());
            }
            total += len as usize;
        }
        if total > MAX_INLINE_BYTES {
            return Err(bad_inline());
        }
        let bytes = if total == 0 {
            if !self.inline.is_empty() {
                return Err(bad_inline());
            }
            Vec::new()
        } else {
            // Bounded: never more than the lengths announce.
            let out = zstd::bulk::decompress(&self.inline, total).map_err(|_| bad_inline())?;
            if out.len() != total {
                return Err(bad_inline());
            }
            out
        };
        let mut chunks = Vec::new();
        let mut inline = Vec::new();
        let mut at = 0usize;
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
                ListOp::Inline(lens) => {
                    for &len in lens {
                        let data = &bytes[at..at + len as usize];
                        at += len as usize;
                        let hash = ChunkHash::of(data);
                        chunks.push(ChunkRef { hash, len });
                        inline.push((hash, Arc::from(data)));
                    }
                }
            }
        }
        Ok(Resolved {
            change: Change::Put(
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
            ),
            inline,
        })
    }

    /// Moves the new chunks of at most [`MAX_INLINE_CHUNK`] bytes into the edit itself.
    /// `new` is the file's new content; `read(offset, len)` reads its bytes there, and a chunk
    /// whose bytes do not match its hash (the file changed since it was hashed) stays a
    /// reference, as does everything past [`MAX_INLINE_BYTES`].
    pub fn inline_small(
        &mut self,
        new: &FileContent,
        mut read: impl FnMut(u64, u32) -> Option<Vec<u8>>,
    ) {
        let offsets = new.chunk_offsets();
        let mut raw = Vec::new();
        let mut ops = Vec::with_capacity(self.ops.len());
        let mut index = 0usize;
        for op in std::mem::take(&mut self.ops) {
            match op {
                ListOp::Copy { len, .. } => {
                    index += len as usize;
                    ops.push(op);
                }
                ListOp::Inline(lens) => {
                    // Already inline (not made by `patch`): leave as is.
                    index += lens.len();
                    ops.push(ListOp::Inline(lens));
                }
                ListOp::New(refs) => {
                    for r in refs {
                        let at = offsets.get(index).copied();
                        index += 1;
                        let data = at
                            .filter(|_| {
                                r.len <= MAX_INLINE_CHUNK
                                    && raw.len() + r.len as usize <= MAX_INLINE_BYTES
                            })
                            .and_then(|at| read(at, r.len))
                            .filter(|d| d.len() == r.len as usize && ChunkHash::of(d) == r.hash);
                        match (data, ops.last_mut()) {
                            (Some(d), Some(ListOp::Inline(lens))) => {
                                raw.extend_from_slice(&d);
                                lens.push(r.len);
                            }
                            (Some(d), _) => {
                                raw.extend_from_slice(&d);
                                ops.push(ListOp::Inline(vec![r.len]));
                            }
                            (None, Some(ListOp::New(refs))) => refs.push(r),
                            (None, _) => ops.push(ListOp::New(vec![r])),
                        }
                    }
                }
            }
        }
        self.ops = ops;
        if !raw.is_empty() {
            self.inline = zstd::bulk::compress(&raw, INLINE_LEVEL)
                .expect("compressing into a growable buffer does not fail");
        }
    }
}

/// Copies shorter than this are sent as new references. A copy of even one reference (a few
/// bytes: start and length) is far cheaper than the reference (32 bytes of hash): in a rebuilt
/// archive every unchanged entry's data is one chunk between two rewritten headers.
const MIN_COPY: usize = 1;

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
        inline: Vec::new(),
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
        assert_eq!(rebuilt.change, Change::Put(path.clone(), new.clone()));
        assert!(rebuilt.inline.is_empty());
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
            inline: Vec::new(),
        };
        assert!(matches!(
            bad.resolve(Some(&node(old))),
            Err(PatchError::OutOfRange { .. })
        ));
    }

    /// A file made of real chunks: `parts` are the chunks' bytes.
    fn content(parts: &[Vec<u8>]) -> (FileContent, Vec<u8>) {
        let chunks: Vec<ChunkRef> = parts
            .iter()
            .map(|p| ChunkRef {
                hash: ChunkHash::of(p),
                len: p.len() as u32,
            })
            .collect();
        let size = chunks.iter().map(|c| c.len as u64).sum();
        let f = FileContent {
            size,
            hash: FileHash::from_chunks(size, chunks.iter().map(|c| &c.hash)),
            chunks: chunks.into(),
        };
        (f, parts.concat())
    }

    #[test]
    fn small_new_chunks_travel_inline_and_rebuild_the_same_list() {
        let path = RelPath::new("webapps/a.war").unwrap();
        // Entries of 2,000 bytes, each after a small header; the rebuild rewrites every header.
        let entry = |i: u32| format!("entry {i} ").repeat(200).into_bytes();
        let header = |i: u32, stamp: u8| format!("PK{stamp}header of entry {i:04}").into_bytes();
        let old_parts: Vec<Vec<u8>> = (0..200)
            .flat_map(|i| [header(i, 1), entry(2 * i), entry(2 * i + 1)])
            .collect();
        let mut new_parts: Vec<Vec<u8>> = (0..200)
            .flat_map(|i| [header(i, 2), entry(2 * i), entry(2 * i + 1)])
            .collect();
        new_parts[101] = vec![7u8; 3000]; // one entry's data changed, too large to inline
        let (old, _) = content(&old_parts);
        let (new, new_bytes) = content(&new_parts);
        let mut p = patch(&path, &old, &node(new.clone())).expect("worth patching");
        let refs_only = p.clone();
        p.inline_small(&new, |at, len| {
            new_bytes
                .get(at as usize..at as usize + len as usize)
                .map(<[u8]>::to_vec)
        });
        let inline_count: usize = p
            .ops
            .iter()
            .map(|op| match op {
                ListOp::Inline(l) => l.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(
            inline_count, 200,
            "every header inline, the large chunk not"
        );
        assert!(p.inline.len() < 200 * 24 / 2, "{} bytes", p.inline.len());
        let resolved = p.resolve(Some(&node(old.clone()))).unwrap();
        assert_eq!(
            resolved.change,
            Change::Put(path.clone(), node(new.clone()))
        );
        assert_eq!(resolved.inline.len(), 200);
        for (hash, bytes) in &resolved.inline {
            assert_eq!(ChunkHash::of(bytes), *hash);
        }
        // Without the bytes (the file changed under the manager), references stay.
        let mut stale = refs_only.clone();
        stale.inline_small(&new, |_, len| Some(vec![0u8; len as usize]));
        assert_eq!(stale, refs_only);
        // A frame that lies about its content is refused.
        let mut bad = p.clone();
        bad.inline = zstd::bulk::compress(&[1u8; 10], 3).unwrap();
        assert!(matches!(
            bad.resolve(Some(&node(old.clone()))),
            Err(PatchError::BadInline { .. })
        ));
        let mut oversized = p.clone();
        oversized
            .ops
            .push(ListOp::Inline(vec![MAX_INLINE_CHUNK + 1]));
        assert!(matches!(
            oversized.resolve(Some(&node(old))),
            Err(PatchError::BadInline { .. })
        ));
    }
}
