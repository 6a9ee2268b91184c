//! Where this node holds each chunk, kept from one generation to the next so that finding the
//! chunks a generation can copy locally costs in proportion to the generation, not to every
//! chunk of every file.
//!
//! Entries are added for every file a generation puts and never removed one by one, so every
//! chunk on disk has an entry; an entry may be stale (its file changed since). Each lookup checks
//! its entry against the folder's manifest, and a stale one rebuilds the index from the
//! manifests, so no chunk this node holds is ever fetched for want of knowing where it is. A
//! folder whose manifest changed behind the index's back (a rescan, a resume) is noticed by its
//! digest and rebuilt too.

use std::collections::HashMap;

use syncd_fsops::LocalDelta;
use syncd_manifest::{Change, ChunkHash, ManifestDigest, RelPath};

use crate::folder::Folder;

/// One place a chunk is: the `index`th chunk of the file at `path` in folder `folder`.
#[derive(Debug, Clone)]
struct Loc {
    folder: u32,
    index: u32,
    path: RelPath,
}

/// A chunk found on disk: the file and the offset it starts at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Found {
    pub folder: usize,
    pub path: RelPath,
    pub offset: u64,
}

/// The index of the chunks in every folder's manifest.
#[derive(Debug, Default)]
pub(crate) struct LocalChunks {
    map: HashMap<ChunkHash, Loc>,
    /// The digest of each folder's manifest the index reflects (`None`: not indexed).
    synced: Vec<Option<ManifestDigest>>,
    /// Entries when last rebuilt, and added since: stale entries are shed by rebuilding once
    /// as many were added as there were.
    built: usize,
    added: usize,
}

impl LocalChunks {
    /// Where each of `hashes` is held, for those that are.
    pub(crate) fn find(
        &mut self,
        folders: &[Folder],
        hashes: impl IntoIterator<Item = ChunkHash>,
    ) -> HashMap<ChunkHash, Found> {
        if !self.in_step(folders) || self.added > self.built.max(4096) {
            self.rebuild(folders);
        }
        let hashes: Vec<ChunkHash> = hashes.into_iter().collect();
        let mut out = HashMap::new();
        for h in &hashes {
            match self.map.get(h).map(|loc| resolve(folders, h, loc)) {
                Some(Some(found)) => {
                    out.insert(*h, found);
                }
                Some(None) => {
                    // Stale: the file changed. The chunk may still be elsewhere; look again
                    // with an exact index.
                    self.rebuild(folders);
                    return self.find_exact(folders, &hashes);
                }
                None => {}
            }
        }
        out
    }

    fn find_exact(&self, folders: &[Folder], hashes: &[ChunkHash]) -> HashMap<ChunkHash, Found> {
        hashes
            .iter()
            .filter_map(|h| {
                let found = resolve(folders, h, self.map.get(h)?)?;
                Some((*h, found))
            })
            .collect()
    }

    /// Takes note of a generation applied to folder `folder`: `delta` led from the manifest
    /// whose digest is `before` to the one whose digest is `after`.
    pub(crate) fn note(
        &mut self,
        folder: usize,
        before: ManifestDigest,
        delta: &LocalDelta,
        after: ManifestDigest,
    ) {
        if self.synced.get(folder).copied().flatten() != Some(before) {
            return;
        }
        for change in &delta.changes {
            if let Change::Put(path, node) = change
                && let Some(f) = node.file()
            {
                self.added += f.chunks.len();
                for (i, c) in f.chunks.iter().enumerate() {
                    self.map.insert(
                        c.hash,
                        Loc {
                            folder: folder as u32,
                            index: i as u32,
                            path: path.clone(),
                        },
                    );
                }
            }
        }
        self.synced[folder] = Some(after);
    }

    fn in_step(&self, folders: &[Folder]) -> bool {
        self.synced.len() == folders.len()
            && folders
                .iter()
                .zip(&self.synced)
                .all(|(f, s)| *s == Some(f.digest()))
    }

    fn rebuild(&mut self, folders: &[Folder]) {
        self.map.clear();
        for (i, folder) in folders.iter().enumerate() {
            for (path, node) in folder.local.manifest.iter() {
                let Some(f) = node.file() else { continue };
                for (index, c) in f.chunks.iter().enumerate() {
                    self.map.entry(c.hash).or_insert_with(|| Loc {
                        folder: i as u32,
                        index: index as u32,
                        path: path.clone(),
                    });
                }
            }
        }
        self.synced = folders.iter().map(|f| Some(f.digest())).collect();
        self.built = self.map.len();
        self.added = 0;
    }
}

/// The entry's place, if its file still has chunk `hash` there.
fn resolve(folders: &[Folder], hash: &ChunkHash, loc: &Loc) -> Option<Found> {
    let folder = folders.get(loc.folder as usize)?;
    let file = folder.local.manifest.get(&loc.path)?.file()?;
    let chunks = file.chunks.get(..=loc.index as usize)?;
    let (last, before) = chunks.split_last()?;
    (last.hash == *hash).then(|| Found {
        folder: loc.folder as usize,
        path: loc.path.clone(),
        offset: before.iter().map(|c| c.len as u64).sum(),
    })
}
