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
use syncd_manifest::{Change, ChunkHash, ChunkList, ManifestDigest, RelPath};

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
        let mut stale = false;
        {
            let mut files = Files::new(folders);
            for h in &hashes {
                match self.map.get(h).map(|loc| files.resolve(h, loc)) {
                    Some(Some(found)) => {
                        out.insert(*h, found);
                    }
                    Some(None) => {
                        stale = true;
                        break;
                    }
                    None => {}
                }
            }
        }
        if stale {
            // The file changed. The chunk may still be elsewhere; look again with an exact
            // index.
            self.rebuild(folders);
            return self.find_exact(folders, &hashes);
        }
        out
    }

    fn find_exact(&self, folders: &[Folder], hashes: &[ChunkHash]) -> HashMap<ChunkHash, Found> {
        let mut files = Files::new(folders);
        hashes
            .iter()
            .filter_map(|h| {
                let found = files.resolve(h, self.map.get(h)?)?;
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
/// The files entries point into, each looked up in its folder's manifest and its chunks'
/// offsets summed once per lookup of many chunks: a 63 MB archive has about a thousand chunks,
/// and a manifest lookup and a sum over the chunks before it, per chunk, took 3-5 ms of a
/// 60 ms apply.
struct Files<'a> {
    folders: &'a [Folder],
    /// By (folder, path): the file's chunks and where each starts; `None` if it is no file.
    files: HashMap<(u32, &'a RelPath), Option<Placed<'a>>>,
}

/// A file's chunks and the offset each starts at.
type Placed<'a> = (&'a ChunkList, Vec<u64>);

impl<'a> Files<'a> {
    fn new(folders: &'a [Folder]) -> Files<'a> {
        Files {
            folders,
            files: HashMap::new(),
        }
    }

    /// The entry's place, if its file still has chunk `hash` there.
    fn resolve(&mut self, hash: &ChunkHash, loc: &'a Loc) -> Option<Found> {
        let folders = self.folders;
        let (chunks, offsets) = self
            .files
            .entry((loc.folder, &loc.path))
            .or_insert_with(|| {
                let file = folders
                    .get(loc.folder as usize)?
                    .local
                    .manifest
                    .get(&loc.path)?
                    .file()?;
                Some((&file.chunks, file.chunk_offsets()))
            })
            .as_ref()?;
        let i = loc.index as usize;
        (chunks.get(i)?.hash == *hash).then(|| Found {
            folder: loc.folder as usize,
            path: loc.path.clone(),
            offset: offsets[i],
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Incompressible bytes, different for each seed (xorshift).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn scanned(dir: &Path) -> Folder {
        crate::drift::tests::applied_folder(dir, &[])
    }

    /// Every chunk of `path` in `folder`, with the offset it starts at.
    fn placed(folder: &Folder, path: &str) -> Vec<(ChunkHash, u64)> {
        let file = folder.local.manifest.get(path).unwrap().file().unwrap();
        file.chunks
            .iter()
            .map(|c| c.hash)
            .zip(file.chunk_offsets())
            .collect()
    }

    fn assert_found(found: &HashMap<ChunkHash, Found>, path: &str, want: &[(ChunkHash, u64)]) {
        for (hash, offset) in want {
            let f = found.get(hash).expect("every chunk held is found");
            assert_eq!((f.path.as_str(), f.offset), (path, *offset));
        }
    }

    #[test]
    fn chunks_are_found_at_their_offsets_after_their_file_changed_under_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let a = noise(1_500_000, 1);
        std::fs::write(dir.path().join("a.bin"), &a).unwrap();
        std::fs::write(dir.path().join("b.bin"), noise(700_000, 2)).unwrap();
        let mut folders = vec![scanned(dir.path())];
        let (a1, b1) = (placed(&folders[0], "a.bin"), placed(&folders[0], "b.bin"));
        assert!(a1.len() > 5, "a file of several chunks");
        let mut chunks = LocalChunks::default();
        let found = chunks.find(&folders, a1.iter().chain(&b1).map(|(h, _)| *h));
        assert_eq!(found.len(), a1.len() + b1.len());
        assert_found(&found, "a.bin", &a1);
        assert_found(&found, "b.bin", &b1);

        // A new version of a.bin, 1,000 bytes inserted at the front, applied and noted: the
        // index's entries for the old version's chunks now point at the wrong places.
        let before = folders[0].local.clone();
        std::fs::write(
            dir.path().join("a.bin"),
            [&noise(1_000, 3)[..], &a].concat(),
        )
        .unwrap();
        folders[0] = scanned(dir.path());
        let delta = LocalDelta::between(&before, &folders[0].local);
        chunks.note(
            0,
            before.manifest.digest(),
            &delta,
            folders[0].local.manifest.digest(),
        );
        let a2 = placed(&folders[0], "a.bin");
        // Chunks both versions share, now at other offsets: found where they are now.
        let shared: Vec<_> = a2
            .iter()
            .filter(|(h, _)| a1.iter().any(|(o, _)| o == h))
            .copied()
            .collect();
        assert!(
            shared.len() + 2 >= a1.len(),
            "content-defined chunks realign"
        );
        let found = chunks.find(&folders, a1.iter().chain(&b1).map(|(h, _)| *h));
        assert_found(&found, "a.bin", &shared);
        assert_found(&found, "b.bin", &b1);
        // A chunk only the old version had is held nowhere any more.
        let gone: Vec<_> = a1
            .iter()
            .filter(|(h, _)| !shared.iter().any(|(s, _)| s == h))
            .collect();
        assert!(!gone.is_empty());
        assert!(gone.iter().all(|(h, _)| !found.contains_key(h)));
    }
}
