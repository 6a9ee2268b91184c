//! Splitting a generation's changes into frames, and putting them back together.
//!
//! A folder's changes can be far larger than one frame (a full manifest of 100,000 files, or one
//! file with a chunk list of megabytes), so the sender pages them with [`paginate`] and the
//! receiver rebuilds them with [`UpdateAssembler`], which also enforces the message order and
//! the bounds that keep a misbehaving manager from making an agent allocate without limit.

use syncd_manifest::{Change, ChunkRef, NodeKind};

use crate::codec::encoded_len;
use crate::messages::ManagerMsg;

/// Target size of one `Changes` or `MoreChunks` payload: well under the frame limit, small
/// enough that the first page of a large update leaves at once.
pub const PAGE_BUDGET: usize = 256 * 1024;
/// Most changes plus chunk references one folder's update may carry: a bound on what a
/// misbehaving manager can make an agent hold (about 200 MB). 100,000 files with 30 chunks each,
/// or 250 GiB of files in 64 KiB chunks, fit.
pub const MAX_UPDATE_ITEMS: usize = 4 << 20;

/// Chunk references that fit in one page. A `ChunkRef` encodes in at most 32 + 5 bytes.
const CHUNKS_PER_PAGE: usize = PAGE_BUDGET / 37;

/// Turns a folder's changes into `Changes` and `MoreChunks` messages, each within
/// [`PAGE_BUDGET`] bytes (a single change with a long path may exceed it, never the frame limit).
pub fn paginate(changes: impl IntoIterator<Item = Change>) -> Vec<ManagerMsg> {
    let mut out = Vec::new();
    let mut page: Vec<Change> = Vec::new();
    let mut page_bytes = 0usize;
    for mut change in changes {
        // A long chunk list goes in pieces: the first with the change, the rest after it.
        let mut rest: Vec<ChunkRef> = Vec::new();
        if let Change::Put(_, node) = &mut change
            && let NodeKind::File(f) = &mut node.kind
            && f.chunks.len() > CHUNKS_PER_PAGE
        {
            rest = f.chunks[CHUNKS_PER_PAGE..].to_vec();
            f.chunks = f.chunks[..CHUNKS_PER_PAGE].into();
        }
        let len = encoded_len(&change);
        if !page.is_empty() && page_bytes + len > PAGE_BUDGET {
            out.push(ManagerMsg::Changes(std::mem::take(&mut page)));
            page_bytes = 0;
        }
        page.push(change);
        page_bytes += len;
        if !rest.is_empty() {
            out.push(ManagerMsg::Changes(std::mem::take(&mut page)));
            page_bytes = 0;
            let mut rest = rest.into_iter().peekable();
            while rest.peek().is_some() {
                out.push(ManagerMsg::MoreChunks(
                    rest.by_ref().take(CHUNKS_PER_PAGE).collect(),
                ));
            }
        }
    }
    if !page.is_empty() {
        out.push(ManagerMsg::Changes(page));
    }
    out
}

/// Why a sequence of update messages is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssembleError {
    /// `MoreChunks` did not follow a page ending in a file.
    #[error("MoreChunks without a file to extend")]
    OrphanChunks,
    /// The update is larger than [`MAX_UPDATE_ITEMS`].
    #[error("update exceeds {MAX_UPDATE_ITEMS} changes and chunk references")]
    TooLarge,
    /// A pushed chunk longer than [`MAX_PUSHED_CHUNK`], or carried in more bytes than it has.
    #[error("pushed chunk of {len} bytes carried in {wire} bytes")]
    BadPushed {
        /// The chunk's length as sent.
        len: u32,
        /// Bytes carried.
        wire: usize,
    },
    /// The chunks pushed inside one update exceed [`MAX_PUSHED_BYTES`].
    #[error("chunks pushed inside one update exceed {MAX_PUSHED_BYTES} bytes")]
    TooMuchPushed,
}

/// Most bytes of chunks (decoded) one folder's update carries ([`crate::ManagerMsg::Pushed`]);
/// a manager pushes far less (small files' edits only).
pub const MAX_PUSHED_BYTES: usize = 4 << 20;
/// The longest chunk an update may carry: the largest chunk of the default parameters.
pub const MAX_PUSHED_CHUNK: u32 = 256 << 10;

/// Rebuilds one folder's changes from `Changes` and `MoreChunks` messages.
#[derive(Debug, Default)]
pub struct UpdateAssembler {
    changes: Vec<Change>,
    /// Chunks sent in `MoreChunks` for the last change, joined to it when the next page comes
    /// or at the end (so a long list is copied once, not once per page).
    more: Vec<ChunkRef>,
    patches: Vec<crate::patch::PatchedPut>,
    pushed: Vec<crate::messages::PushedChunk>,
    pushed_bytes: usize,
    items: usize,
}

impl UpdateAssembler {
    /// An empty assembler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a page of changes.
    pub fn push_changes(&mut self, page: Vec<Change>) -> Result<(), AssembleError> {
        self.count(
            page.iter()
                .map(|c| match c {
                    Change::Put(_, n) => 1 + n.file().map_or(0, |f| f.chunks.len()),
                    Change::Remove(_) => 1,
                })
                .sum(),
        )?;
        self.join_more();
        self.changes.extend(page);
        Ok(())
    }

    /// Appends the pending `MoreChunks` to the last change's chunk list.
    fn join_more(&mut self) {
        if self.more.is_empty() {
            return;
        }
        if let Some(Change::Put(_, node)) = self.changes.last_mut()
            && let NodeKind::File(f) = &mut node.kind
        {
            let mut all = Vec::with_capacity(f.chunks.len() + self.more.len());
            all.extend_from_slice(&f.chunks);
            all.append(&mut self.more);
            f.chunks = all.into();
        }
    }

    /// Takes more chunks of the last file.
    pub fn push_chunks(&mut self, chunks: Vec<ChunkRef>) -> Result<(), AssembleError> {
        self.count(chunks.len())?;
        match self.changes.last() {
            Some(Change::Put(_, node)) => match &node.kind {
                NodeKind::File(_) => {
                    self.more.extend(chunks);
                    Ok(())
                }
                _ => Err(AssembleError::OrphanChunks),
            },
            _ => Err(AssembleError::OrphanChunks),
        }
    }

    /// Adds a file put as a chunk-list edit; it is resolved against the agent's manifest.
    pub fn push_patched(&mut self, p: crate::patch::PatchedPut) -> Result<(), AssembleError> {
        self.count(p.items())?;
        self.patches.push(p);
        Ok(())
    }

    /// The files put as chunk-list edits so far, taken out.
    pub fn take_patches(&mut self) -> Vec<crate::patch::PatchedPut> {
        std::mem::take(&mut self.patches)
    }

    /// Takes a chunk pushed inside the update. Its bytes are checked by whoever decodes it;
    /// here only its size: at most [`MAX_PUSHED_CHUNK`], never more on the wire than the chunk
    /// itself, and at most [`MAX_PUSHED_BYTES`] of chunks in one update.
    pub fn push_pushed(&mut self, p: crate::messages::PushedChunk) -> Result<(), AssembleError> {
        self.count(1)?;
        if p.len > MAX_PUSHED_CHUNK || p.data.len() > p.len as usize {
            return Err(AssembleError::BadPushed {
                len: p.len,
                wire: p.data.len(),
            });
        }
        self.pushed_bytes = self.pushed_bytes.saturating_add(p.len as usize);
        if self.pushed_bytes > MAX_PUSHED_BYTES {
            return Err(AssembleError::TooMuchPushed);
        }
        self.pushed.push(p);
        Ok(())
    }

    /// The chunks pushed so far, taken out.
    pub fn take_pushed(&mut self) -> Vec<crate::messages::PushedChunk> {
        self.pushed_bytes = 0;
        std::mem::take(&mut self.pushed)
    }

    /// The changes received, in the order sent.
    pub fn finish(mut self) -> Vec<Change> {
        self.join_more();
        self.changes
    }

    fn count(&mut self, n: usize) -> Result<(), AssembleError> {
        self.items = self.items.saturating_add(n);
        if self.items > MAX_UPDATE_ITEMS {
            return Err(AssembleError::TooLarge);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use syncd_manifest::{ChunkHash, FileContent, FileHash, Mtime, Node, RelPath};

    use super::*;
    use crate::codec::{MAX_CONTROL_FRAME, encode_frame};

    fn big_file(path: &str, chunks: usize) -> Change {
        let chunks: Vec<ChunkRef> = (0..chunks)
            .map(|i| ChunkRef {
                hash: ChunkHash::of(&i.to_le_bytes()),
                len: 65536,
            })
            .collect();
        let size = 65536 * chunks.len() as u64;
        Change::Put(
            RelPath::new(path).unwrap(),
            Node {
                kind: NodeKind::File(FileContent {
                    size,
                    hash: FileHash::from_chunks(size, chunks.iter().map(|c| &c.hash)),
                    chunks: chunks.into(),
                }),
                mode: 0o644,
                mtime: Mtime { secs: 1, nanos: 2 },
            },
        )
    }

    fn reassemble(msgs: Vec<ManagerMsg>) -> Vec<Change> {
        let mut asm = UpdateAssembler::new();
        for m in msgs {
            // Every page must fit in a frame.
            encode_frame(&m, MAX_CONTROL_FRAME).unwrap();
            match m {
                ManagerMsg::Changes(c) => asm.push_changes(c).unwrap(),
                ManagerMsg::MoreChunks(c) => asm.push_chunks(c).unwrap(),
                other => panic!("unexpected {other:?}"),
            }
        }
        asm.finish()
    }

    #[test]
    fn many_small_and_a_few_huge_files_survive_paging() {
        let mut changes: Vec<Change> = (0..5000)
            .map(|i| big_file(&format!("synapse-configs/api-{i:05}.xml"), 1))
            .collect();
        changes.insert(10, big_file("webapps/huge.war", 40_000));
        changes.push(Change::Remove(RelPath::new("old.car").unwrap()));
        changes.push(big_file("zz.war", CHUNKS_PER_PAGE + 1));
        let msgs = paginate(changes.clone());
        assert!(msgs.len() > 5);
        assert_eq!(reassemble(msgs), changes);
    }

    #[test]
    fn chunks_without_a_file_are_refused() {
        let mut asm = UpdateAssembler::new();
        assert_eq!(asm.push_chunks(vec![]), Err(AssembleError::OrphanChunks));
        asm.push_changes(vec![Change::Remove(RelPath::new("x").unwrap())])
            .unwrap();
        assert_eq!(asm.push_chunks(vec![]), Err(AssembleError::OrphanChunks));
    }
}
