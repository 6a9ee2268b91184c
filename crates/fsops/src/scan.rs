//! Scanning a folder into a manifest, rehashing only files whose metadata changed.

use std::collections::HashMap;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use syncd_manifest::{
    Change, ChunkHash, ChunkRef, Chunker, FileContent, FileHash, Manifest, Mtime, Node, NodeKind,
    RelPath, SymlinkTarget, chunk_reader_with_cuts,
};

use crate::excludes::Excludes;

/// The metadata that decides whether a file must be rehashed: if all of it is unchanged, the
/// content is assumed unchanged (as rsync, git and Syncthing assume).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatKey {
    /// Size in bytes.
    pub size: u64,
    /// Modification time.
    pub mtime: Mtime,
    /// Inode change time: catches a rewrite that restored the mtime.
    pub ctime: Mtime,
    /// Inode number: catches a file replaced by a rename.
    pub ino: u64,
}

impl StatKey {
    /// Whether the open `file` has this key now: no writer has touched it since the key was
    /// taken (as a rescan would judge), so its bytes are still the ones hashed then.
    pub fn still_of(&self, file: &std::fs::File) -> bool {
        file.metadata().is_ok_and(|m| stat_key(&m) == *self)
    }
}

/// The stat key of a file's metadata.
pub fn stat_key(meta: &Metadata) -> StatKey {
    StatKey {
        size: meta.size(),
        mtime: Mtime {
            secs: meta.mtime(),
            nanos: meta.mtime_nsec() as u32,
        },
        ctime: Mtime {
            secs: meta.ctime(),
            nanos: meta.ctime_nsec() as u32,
        },
        ino: meta.ino(),
    }
}

/// A manifest together with the stat keys of its files, as a node keeps it for itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "LocalManifestRepr")]
pub struct LocalManifest {
    /// What the folder holds.
    pub manifest: Manifest,
    /// Stat key of each file in `manifest` when it was hashed.
    pub stats: HashMap<RelPath, StatKey>,
}

/// How a [`LocalManifest`] is decoded: as encoded, then each stat key's path is replaced by
/// the manifest's own (decoded twice, a path would be held in memory twice).
#[derive(Deserialize)]
struct LocalManifestRepr {
    manifest: Manifest,
    stats: HashMap<RelPath, StatKey>,
}

impl From<LocalManifestRepr> for LocalManifest {
    fn from(r: LocalManifestRepr) -> Self {
        let stats = r
            .stats
            .into_iter()
            .map(|(p, k)| (r.manifest.key(&p).cloned().unwrap_or(p), k))
            .collect();
        LocalManifest {
            manifest: r.manifest,
            stats,
        }
    }
}

/// Something the scan skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanWarning {
    /// A name that is not UTF-8.
    #[error("{dir}: skipped an entry whose name is not UTF-8: {name:?}")]
    NonUtf8 {
        /// Directory holding it.
        dir: PathBuf,
        /// The name, lossily decoded.
        name: String,
    },
    /// A name that is not a valid relative path component.
    #[error("skipped {path:?}: {reason}")]
    BadName {
        /// The full path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A socket, FIFO or device.
    #[error("skipped {0}: not a file, directory or symlink")]
    Special(PathBuf),
    /// A symlink whose target is absolute or leaves the folder.
    #[error("skipped symlink {path}: {reason}")]
    Symlink {
        /// The link.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// An entry that could not be read.
    #[error("skipped {path}: {error}")]
    Unreadable {
        /// The entry.
        path: PathBuf,
        /// The error.
        error: String,
    },
    /// A file that kept changing while it was read.
    #[error("skipped {0}: it changed while being read")]
    Unstable(PathBuf),
}

impl ScanWarning {
    /// The entry that was skipped (for a name that is not UTF-8, lossily decoded).
    pub fn path(&self) -> PathBuf {
        match self {
            ScanWarning::NonUtf8 { dir, name } => dir.join(name),
            ScanWarning::BadName { path, .. }
            | ScanWarning::Symlink { path, .. }
            | ScanWarning::Unreadable { path, .. } => path.clone(),
            ScanWarning::Special(path) | ScanWarning::Unstable(path) => path.clone(),
        }
    }

    /// Why it was skipped, without its path.
    pub fn reason(&self) -> String {
        match self {
            ScanWarning::NonUtf8 { .. } => "its name is not UTF-8".to_owned(),
            ScanWarning::BadName { reason, .. } | ScanWarning::Symlink { reason, .. } => {
                reason.clone()
            }
            ScanWarning::Special(_) => "not a file, directory or symlink".to_owned(),
            ScanWarning::Unreadable { error, .. } => format!("cannot be read: {error}"),
            ScanWarning::Unstable(_) => "it changed while being read".to_owned(),
        }
    }

    /// Whether the entry could not be read at all: what it holds is unknown, not absent, so
    /// a holder keeps what it last knew of it rather than taking it as removed.
    pub fn is_unreadable(&self) -> bool {
        matches!(self, ScanWarning::Unreadable { .. })
    }
}

/// Why a folder could not be scanned at all.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The folder's root is missing, not a directory, or unreadable. A scan never reports a
    /// missing root as an empty folder: that would publish a mass deletion.
    #[error("folder {path} cannot be read: {source}")]
    Root {
        /// The root.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Counters of one scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Files hashed because they were new or their stat key changed.
    pub hashed_files: usize,
    /// Bytes read to hash them.
    pub hashed_bytes: u64,
    /// Files whose previous hash was reused.
    pub reused_files: usize,
}

/// What a path is, from its metadata alone (no content read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A directory.
    Dir {
        /// Permission bits.
        mode: u32,
        /// Modification time.
        mtime: Mtime,
    },
    /// A symbolic link whose target stays inside the folder.
    Symlink {
        /// The target.
        target: SymlinkTarget,
        /// Modification time of the link itself.
        mtime: Mtime,
    },
    /// A regular file.
    File {
        /// Size, times and inode.
        key: StatKey,
        /// Permission bits.
        mode: u32,
    },
}

impl Seen {
    /// The manifest node for a directory or link (files need their content hashed).
    pub fn node(&self) -> Option<Node> {
        match self {
            Seen::Dir { mode, mtime } => Some(Node {
                kind: NodeKind::Dir,
                mode: *mode,
                mtime: *mtime,
            }),
            Seen::Symlink { target, mtime } => Some(Node {
                kind: NodeKind::Symlink(target.clone()),
                mode: 0o777,
                mtime: *mtime,
            }),
            Seen::File { .. } => None,
        }
    }
}

/// Looks at one path without following a link. `Ok(None)` if nothing is there; an error for
/// something that cannot be synced (a socket, a link out of the folder, unreadable metadata).
pub fn observe(root: &Path, rel: &RelPath) -> Result<Option<Seen>, ScanWarning> {
    let abs = root.join(rel.as_str());
    let meta = match fs::symlink_metadata(&abs) {
        Ok(m) => m,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(None);
        }
        Err(e) => {
            return Err(ScanWarning::Unreadable {
                path: abs,
                error: e.to_string(),
            });
        }
    };
    seen_of(&abs, rel, &meta).map(Some)
}

fn seen_of(abs: &Path, rel: &RelPath, meta: &Metadata) -> Result<Seen, ScanWarning> {
    let ft = meta.file_type();
    let mode = meta.permissions().mode() & 0o7777;
    let mtime = Mtime {
        secs: meta.mtime(),
        nanos: meta.mtime_nsec() as u32,
    };
    if ft.is_dir() {
        Ok(Seen::Dir { mode, mtime })
    } else if ft.is_symlink() {
        let target = fs::read_link(abs).map_err(|e| e.to_string()).and_then(|t| {
            let t = t
                .to_str()
                .ok_or_else(|| "target is not UTF-8".to_owned())?
                .to_owned();
            let t = SymlinkTarget::new(t).map_err(|e| e.to_string())?;
            t.check_within(rel).map_err(|e| e.to_string())?;
            Ok(t)
        });
        match target {
            Ok(target) => Ok(Seen::Symlink { target, mtime }),
            Err(reason) => Err(ScanWarning::Symlink {
                path: abs.to_owned(),
                reason,
            }),
        }
    } else if ft.is_file() {
        Ok(Seen::File {
            key: stat_key(meta),
            mode,
        })
    } else {
        Err(ScanWarning::Special(abs.to_owned()))
    }
}

/// Walks everything beneath `start` (the root for `None`), skipping `excludes`, without reading
/// any file's content. Entries come in no particular order. Fails only if `start` itself cannot
/// be read; anything beneath it that cannot be read is a warning.
pub fn walk(
    root: &Path,
    start: Option<&RelPath>,
    excludes: &Excludes,
    seen: &mut Vec<(RelPath, Seen)>,
    warnings: &mut Vec<ScanWarning>,
) -> io::Result<()> {
    let start_abs = start.map_or_else(|| root.to_owned(), |s| root.join(s.as_str()));
    let first = fs::read_dir(&start_abs)?;
    let mut stack: Vec<(Option<RelPath>, PathBuf, Option<fs::ReadDir>)> =
        vec![(start.cloned(), start_abs, Some(first))];
    while let Some((rel_dir, abs_dir, entries)) = stack.pop() {
        let entries = match entries.map_or_else(|| fs::read_dir(&abs_dir), Ok) {
            Ok(e) => e,
            Err(e) => {
                warnings.push(ScanWarning::Unreadable {
                    path: abs_dir,
                    error: e.to_string(),
                });
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    warnings.push(ScanWarning::Unreadable {
                        path: abs_dir.clone(),
                        error: e.to_string(),
                    });
                    continue;
                }
            };
            let abs = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                warnings.push(ScanWarning::NonUtf8 {
                    dir: abs_dir.clone(),
                    name: entry.file_name().to_string_lossy().into_owned(),
                });
                continue;
            };
            let rel = match &rel_dir {
                None => RelPath::new(name),
                Some(d) => d.join(&name),
            };
            let rel = match rel {
                Ok(r) => r,
                Err(e) => {
                    warnings.push(ScanWarning::BadName {
                        path: abs,
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            let meta = match fs::symlink_metadata(&abs) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    warnings.push(ScanWarning::Unreadable {
                        path: abs,
                        error: e.to_string(),
                    });
                    continue;
                }
            };
            if excludes.is_excluded(&rel, meta.is_dir()) {
                continue;
            }
            match seen_of(&abs, &rel, &meta) {
                Ok(s) => {
                    if matches!(s, Seen::Dir { .. }) {
                        stack.push((Some(rel.clone()), abs, None));
                    }
                    seen.push((rel, s));
                }
                Err(w) => warnings.push(w),
            }
        }
    }
    Ok(())
}

/// Scans `root` into a manifest cut with `chunker`, skipping `excludes`.
///
/// Files whose [`StatKey`] matches `previous` keep their previous hashes; the rest are hashed on
/// up to `threads` threads. Links are recorded, never followed.
pub fn scan(
    root: &Path,
    chunker: &Chunker,
    excludes: &Excludes,
    previous: Option<&LocalManifest>,
    threads: usize,
) -> Result<(LocalManifest, ScanStats, Vec<ScanWarning>), ScanError> {
    let root_err = |source| ScanError::Root {
        path: root.to_owned(),
        source,
    };
    let meta = fs::metadata(root).map_err(root_err)?;
    if !meta.is_dir() {
        return Err(root_err(io::Error::new(
            io::ErrorKind::NotADirectory,
            "not a directory",
        )));
    }
    let mut seen = Vec::new();
    let mut warnings = Vec::new();
    // An unreadable root is an error, not an empty folder.
    walk(root, None, excludes, &mut seen, &mut warnings).map_err(root_err)?;

    let params = chunker.params();
    let reusable = previous.filter(|p| p.manifest.params == params);
    let mut out = LocalManifest {
        manifest: Manifest::new(params),
        stats: HashMap::new(),
    };
    let mut stats = ScanStats::default();
    let mut to_hash: Vec<(RelPath, PathBuf)> = Vec::new();
    for (rel, s) in seen {
        match s {
            Seen::File { key, mode } => match reusable.and_then(|p| p.reusable(&rel, &key)) {
                Some(node) => {
                    out.manifest.insert(
                        rel.clone(),
                        Node {
                            kind: node.kind.clone(),
                            mode,
                            mtime: key.mtime,
                        },
                    );
                    out.stats.insert(rel, key);
                    stats.reused_files += 1;
                }
                None => {
                    let abs = root.join(rel.as_str());
                    to_hash.push((rel, abs));
                }
            },
            other => {
                let node = other.node().expect("directories and links have nodes");
                out.manifest.insert(rel, node);
            }
        }
    }

    for (rel, result) in hash_files(chunker, to_hash, threads) {
        match result {
            Ok((node, key)) => {
                stats.hashed_files += 1;
                stats.hashed_bytes += key.size;
                out.manifest.insert(rel.clone(), node);
                out.stats.insert(rel, key);
            }
            Err(w) => warnings.push(w),
        }
    }
    if let Some(previous) = reusable {
        let unreadable: Vec<RelPath> = warnings
            .iter()
            .filter(|w| w.is_unreadable())
            .filter_map(|w| rel_of(root, &w.path()))
            .collect();
        keep_unreadable(&mut out.manifest, &previous.manifest, &unreadable);
    }
    out.drop_orphans();
    Ok((out, stats, warnings))
}

/// Where a look at `root` could not read (`warnings`), puts back what `previous` held there and
/// beneath: unknown is not absent. A file or directory this node's user may not read is kept
/// as it was known rather than taken as removed (which would recreate it over what is there).
pub fn keep_unreadable(out: &mut Manifest, previous: &Manifest, unreadable: &[RelPath]) {
    for rel in unreadable {
        for (p, n) in previous.subtree(rel) {
            out.insert(p.clone(), n.clone());
        }
    }
}

/// `path` relative to `root`, if it is a path syncd can name.
fn rel_of(root: &Path, path: &Path) -> Option<RelPath> {
    let rel = path.strip_prefix(root).ok()?.to_str()?;
    RelPath::new(rel).ok()
}

/// What a look at a folder skipped, sorted by what the folder's holder does about it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Paths it could not read: what they hold is unknown, not absent (see
    /// [`keep_unreadable`]).
    pub unreadable: Vec<RelPath>,
    /// Entries syncd never carries (sockets, FIFOs, devices, links that are absolute or leave
    /// the folder): on a worker, none can have come from the manager.
    pub foreign: Vec<RelPath>,
    /// The rest, each with its reason: names that are not UTF-8 or not valid paths, files that
    /// kept changing while read.
    pub other: Vec<ScanWarning>,
}

impl Skipped {
    /// Sorts the `warnings` of a look at `root`.
    pub fn sort(root: &Path, warnings: Vec<ScanWarning>) -> Skipped {
        let mut out = Skipped::default();
        for w in warnings {
            match (rel_of(root, &w.path()), &w) {
                (Some(rel), ScanWarning::Unreadable { .. }) => out.unreadable.push(rel),
                (Some(rel), ScanWarning::Special(_) | ScanWarning::Symlink { .. }) => {
                    out.foreign.push(rel)
                }
                _ => out.other.push(w),
            }
        }
        out
    }
}

impl LocalManifest {
    /// The previous node of a file whose stat key is unchanged, if any.
    pub fn reusable(&self, rel: &RelPath, key: &StatKey) -> Option<&Node> {
        let node = self.manifest.get(rel)?;
        (node.file().is_some() && self.stats.get(rel) == Some(key)).then_some(node)
    }

    /// Drops entries whose parent is missing (a directory that vanished mid-scan) so the
    /// manifest stays a tree: with them, what was beneath them (orphaned in turn).
    pub fn drop_orphans(&mut self) {
        loop {
            let orphans: Vec<RelPath> = self.orphans().map(|(p, _)| p.clone()).collect();
            if orphans.is_empty() {
                return;
            }
            for p in orphans {
                self.manifest.remove(&p);
                self.stats.remove(&p);
            }
        }
    }
}

/// What changed between two versions of a [`LocalManifest`]: the manifest's changes and the
/// stat keys of the files put. Nodes persist it instead of the whole manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalDelta {
    /// The manifest's changes, in path order.
    pub changes: Vec<Change>,
    /// The stat key of each file put (a file without one is rehashed after a restart).
    pub stats: Vec<(RelPath, StatKey)>,
}

impl LocalDelta {
    /// The delta made of `changes`, which lead to `new`.
    pub fn new(changes: Vec<Change>, new: &LocalManifest) -> LocalDelta {
        let stats = changes
            .iter()
            .filter_map(|c| match c {
                Change::Put(p, n) if n.file().is_some() => {
                    new.stats.get(p).map(|k| (p.clone(), *k))
                }
                _ => None,
            })
            .collect();
        LocalDelta { changes, stats }
    }

    /// The delta from `old` to `new`.
    pub fn between(old: &LocalManifest, new: &LocalManifest) -> LocalDelta {
        LocalDelta::new(syncd_manifest::diff(&old.manifest, &new.manifest), new)
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

impl LocalManifest {
    /// Entries whose parent is not a directory of the manifest.
    fn orphans(&self) -> impl Iterator<Item = (&RelPath, &Node)> {
        self.manifest.iter().filter(|(p, _)| {
            p.parent_str()
                .is_some_and(|d| !self.manifest.get(d).is_some_and(Node::is_dir))
        })
    }

    /// Whether [`LocalManifest::drop_orphans`] would drop anything.
    pub fn has_orphans(&self) -> bool {
        self.orphans().next().is_some()
    }

    /// [`LocalManifest::has_orphans`] of a manifest that had none before the entries at `paths`
    /// changed, looking at those entries alone: one there whose parent is not a directory, or
    /// one beneath a path there that is not a directory.
    pub fn has_orphans_at<'a>(&self, paths: impl IntoIterator<Item = &'a RelPath>) -> bool {
        self.manifest.orphan_at(paths).is_some()
    }

    /// Packs the manifest's map (see [`Manifest::compact`]) and gives the stat keys' spare
    /// capacity back.
    pub fn compact(&mut self) {
        self.manifest.compact();
        self.stats.shrink_to_fit();
    }

    /// Applies a delta: `old.apply_delta(&LocalDelta::between(&old, &new))` gives `new` (stat
    /// keys included, for every file the delta puts).
    pub fn apply_delta(&mut self, delta: &LocalDelta) {
        self.manifest.apply(&delta.changes);
        for c in &delta.changes {
            self.stats.remove(c.path());
        }
        for (p, k) in &delta.stats {
            let p = self.manifest.key(p).unwrap_or(p).clone();
            self.stats.insert(p, *k);
        }
    }
}

/// Applies each folder's delta to the folder of that name (a folder not there yet starts empty):
/// how a role replays a recorded generation onto its folders.
pub fn apply_deltas(
    folders: &mut std::collections::BTreeMap<String, LocalManifest>,
    deltas: &[(String, LocalDelta)],
) {
    for (name, delta) in deltas {
        folders.entry(name.clone()).or_default().apply_delta(delta);
    }
}

/// A hashed file's node and the stat key it had, or why it was skipped.
pub type HashResult = Result<(Node, StatKey), ScanWarning>;

/// Hashes files on up to `threads` threads; results come back in input order.
pub fn hash_files(
    chunker: &Chunker,
    files: Vec<(RelPath, PathBuf)>,
    threads: usize,
) -> Vec<(RelPath, HashResult)> {
    let files = files
        .into_iter()
        .map(|(rel, abs)| (rel, abs, None))
        .collect();
    hash_files_reusing(chunker, files, threads)
        .into_iter()
        .map(|(rel, result, _)| (rel, result))
        .collect()
}

/// [`hash_files`], each file with its last version where known (see [`hash_file_reusing`]);
/// each result comes with the file's [`Tiling`] when it is a large archive.
pub fn hash_files_reusing(
    chunker: &Chunker,
    files: Vec<(RelPath, PathBuf, Option<Reuse>)>,
    threads: usize,
) -> Vec<(RelPath, HashResult, Option<Tiling>)> {
    let next = AtomicUsize::new(0);
    type Slot = Option<(HashResult, Option<Tiling>)>;
    let results: Mutex<Vec<Slot>> = Mutex::new((0..files.len()).map(|_| None).collect());
    let threads = threads.clamp(1, files.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((_, abs, reuse)) = files.get(i) else {
                        break;
                    };
                    let r = hash_file_reusing(chunker, abs, reuse.as_ref());
                    results
                        .lock()
                        .expect("no hashing thread panics while holding the lock")[i] = Some(r);
                }
            });
        }
    });
    let results = results.into_inner().expect("hashing threads have finished");
    files
        .into_iter()
        .zip(results)
        .map(|((rel, _, _), r)| {
            let (result, tiling) = r.expect("every index was processed");
            (rel, result, tiling)
        })
        .collect()
}

/// Hashes one file, retrying if it changes while being read.
pub fn hash_file(chunker: &Chunker, abs: &Path) -> HashResult {
    hash_file_reusing(chunker, abs, None).0
}

/// How a large archive's stretches (the bytes between two forced cuts, see
/// [`crate::cut_points`]) were chunked: each stretch's length and number of chunks, in order,
/// for the version whose file hash is `of`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tiling {
    of: FileHash,
    stretches: Arc<[(u64, u32)]>,
}

/// A file's last hashed version and its [`Tiling`], offered to [`hash_file_reusing`].
#[derive(Debug, Clone)]
pub struct Reuse {
    /// The content hashed last time.
    pub content: FileContent,
    /// How it was cut then.
    pub tiling: Tiling,
}

/// [`hash_file`], and for a large archive also its [`Tiling`]. With `reuse`, a stretch of the
/// new version as long as one of the last version's is first compared with that stretch's
/// chunks by their hashes alone: the same bytes are cut into the same chunks (a stretch is
/// chunked as a file of its own), so an unchanged entry costs BLAKE3 only, not the chunker
/// (FastCDC runs at about a third of BLAKE3's speed here: a rebuilt 63 MB WAR was 22-36 ms).
pub fn hash_file_reusing(
    chunker: &Chunker,
    abs: &Path,
    reuse: Option<&Reuse>,
) -> (HashResult, Option<Tiling>) {
    let unreadable = |e: io::Error| ScanWarning::Unreadable {
        path: abs.to_owned(),
        error: e.to_string(),
    };
    let attempt = || -> Result<Option<(Node, StatKey, Option<Tiling>)>, ScanWarning> {
        let file = open_nofollow(abs).map_err(unreadable)?;
        let before = file.metadata().map_err(unreadable)?;
        if !before.is_file() {
            return Err(ScanWarning::Special(abs.to_owned()));
        }
        let cuts = archive_cuts(abs, &file, before.len());
        let (content, tiling) = if before.len() >= PARALLEL_FROM && !cuts.is_empty() {
            let Stretched {
                chunks: content,
                stretches,
                ..
            } = chunk_stretches(chunker, &file, before.len(), &cuts, reuse, PARALLEL_PARTS)
                .map_err(unreadable)?;
            let tiling = Tiling {
                of: content.hash,
                stretches: stretches.into(),
            };
            (content, Some(tiling))
        } else {
            let content =
                chunk_reader_with_cuts(chunker, &file, &cuts, |_, _| {}).map_err(unreadable)?;
            (content, None)
        };
        let after = file.metadata().map_err(unreadable)?;
        let key = stat_key(&after);
        if stat_key(&before) != key || content.size != key.size {
            return Ok(None);
        }
        let node = Node {
            kind: NodeKind::File(content),
            mode: after.permissions().mode() & 0o7777,
            mtime: key.mtime,
        };
        Ok(Some((node, key, tiling)))
    };
    for _ in 0..3 {
        match attempt() {
            Ok(Some((node, key, tiling))) => return (Ok((node, key)), tiling),
            Ok(None) => continue,
            Err(w) => return (Err(w), None),
        }
    }
    (Err(ScanWarning::Unstable(abs.to_owned())), None)
}

/// An archive at least this large is chunked in [`PARALLEL_PARTS`] parts at once: a deploy of
/// one large WAR otherwise waits on one core (63 MB: about 30 ms here).
const PARALLEL_FROM: u64 = 16 << 20;
const PARALLEL_PARTS: u64 = 2;

/// Chunks `file` (`size` bytes, forced `cuts`, not empty) in up to `parts` parts at once,
/// each a run of whole stretches, and returns its content and each stretch's (length, chunks).
/// A forced cut ends a stretch exactly as the end of a file does and the chunker starts afresh
/// after it, so the chunks are the very ones [`chunk_reader_with_cuts`] finds; a stretch whose
/// bytes hash to a stretch of `reuse` of the same length, chunk by chunk, takes those chunks.
fn chunk_stretches(
    chunker: &Chunker,
    file: &fs::File,
    size: u64,
    cuts: &[u64],
    reuse: Option<&Reuse>,
    parts: u64,
) -> io::Result<Stretched<FileContent>> {
    let bounds: Vec<u64> = std::iter::once(0)
        .chain(cuts.iter().copied())
        .chain(std::iter::once(size))
        .collect();
    // The last version's stretches worth looking up, by length and first chunk.
    let mut known = Known::default();
    let old: &[ChunkRef] = reuse.map_or(&[], |r| &r.content.chunks);
    if let Some(r) = reuse.filter(|r| r.tiling.of == r.content.hash) {
        let mut at = 0usize;
        for &(len, n) in r.tiling.stretches.iter() {
            if let Some(first) = old.get(at).filter(|_| len >= REUSE_FROM) {
                let firsts = known.first_lens.entry(len).or_default();
                if !firsts.contains(&first.len) {
                    firsts.push(first.len);
                }
                known.at.entry((len, first.hash)).or_default().push((at, n));
            }
            at += n as usize;
        }
        if at != old.len() {
            known = Known::default();
        }
    }
    // Parts of about equal bytes, each ending at a stretch's end.
    let mut ends = Vec::new();
    for k in 1..parts {
        let target = size / parts * k;
        let near = (1..bounds.len() - 1)
            .filter(|&i| i > ends.last().copied().unwrap_or(0))
            .min_by_key(|&i| bounds[i].abs_diff(target));
        if let Some(i) = near {
            ends.push(i);
        }
    }
    ends.push(bounds.len() - 1);
    let pieces: Vec<io::Result<Stretched<Vec<ChunkRef>>>> = std::thread::scope(|s| {
        let mut from = 0usize;
        let handles: Vec<_> = ends
            .iter()
            .map(|&to| {
                let part = &bounds[from..=to];
                from = to;
                let known = &known;
                s.spawn(move || chunk_part(chunker, file, part, known, old))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a chunking thread does not panic"))
            .collect()
    });
    let (mut chunks, mut stretches, mut reused) = (Vec::new(), Vec::new(), 0);
    for piece in pieces {
        let piece = piece?;
        chunks.extend(piece.chunks);
        stretches.extend(piece.stretches);
        reused += piece.reused;
    }
    let size = chunks.iter().map(|c: &ChunkRef| u64::from(c.len)).sum();
    Ok(Stretched {
        chunks: FileContent {
            size,
            hash: FileHash::from_chunks(size, chunks.iter().map(|c| &c.hash)),
            chunks: chunks.into(),
        },
        stretches,
        reused,
    })
}

/// Chunks cut along stretches: `chunks` (a list, or a whole file's content), each stretch's
/// (length, chunks), and the bytes whose chunks came from the last version.
struct Stretched<C> {
    chunks: C,
    stretches: Vec<(u64, u32)>,
    reused: u64,
}

/// Stretches shorter than this are chunked again (the chunker costs next to nothing on them:
/// a stretch shorter than the smallest chunk is one chunk); longer ones are looked up.
const REUSE_FROM: u64 = 64 << 10;

/// The last version's stretches of [`REUSE_FROM`] bytes or more: by (length, first chunk's
/// hash), where their chunks start in the old list and how many; and by length, the lengths of
/// their first chunks (one or two in practice: one hash of the new bytes per length finds them).
#[derive(Default)]
struct Known {
    at: HashMap<(u64, ChunkHash), Vec<(usize, u32)>>,
    first_lens: HashMap<u64, Vec<u32>>,
}

/// Chunks the stretches between consecutive `bounds`: those matching a `known` stretch of
/// `old` by every chunk's hash take its chunks; each run of the others is chunked in one pass.
fn chunk_part(
    chunker: &Chunker,
    file: &fs::File,
    bounds: &[u64],
    known: &Known,
    old: &[ChunkRef],
) -> io::Result<Stretched<Vec<ChunkRef>>> {
    use std::os::unix::fs::FileExt;
    let mut buf = Vec::new();
    // The hash of `len` bytes at `at`; none if the file ends before (it is being truncated:
    // the stat check after the hashing starts over).
    let mut hash_at = |at: u64, len: u32| -> io::Result<Option<ChunkHash>> {
        buf.resize(len as usize, 0);
        match file.read_exact_at(&mut buf, at) {
            Ok(()) => Ok(Some(ChunkHash::of(&buf))),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    };
    let stretches = bounds.len() - 1;
    let mut found: Vec<Option<&[ChunkRef]>> = Vec::with_capacity(stretches);
    for w in bounds.windows(2) {
        let (at, len) = (w[0], w[1] - w[0]);
        let mut hit = None;
        'lens: for &first_len in known.first_lens.get(&len).into_iter().flatten() {
            let Some(first) = hash_at(at, first_len)? else {
                break;
            };
            for &(start, n) in known.at.get(&(len, first)).into_iter().flatten() {
                let candidate = &old[start..start + n as usize];
                let mut pos = at + u64::from(first_len);
                let mut same = true;
                for c in &candidate[1..] {
                    if hash_at(pos, c.len)? != Some(c.hash) {
                        same = false;
                        break;
                    }
                    pos += u64::from(c.len);
                }
                if same {
                    hit = Some(candidate);
                    break 'lens;
                }
            }
        }
        found.push(hit);
    }
    let (mut chunks, mut tiling, mut reused) = (Vec::new(), Vec::new(), 0);
    let mut i = 0;
    while i < stretches {
        if let Some(c) = found[i] {
            chunks.extend_from_slice(c);
            tiling.push((bounds[i + 1] - bounds[i], c.len() as u32));
            reused += bounds[i + 1] - bounds[i];
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < stretches && found[j].is_none() {
            j += 1;
        }
        let (from, to) = (bounds[i], bounds[j]);
        let inner: Vec<u64> = bounds[i + 1..j].iter().map(|c| c - from).collect();
        let reader = Section {
            file,
            at: from,
            end: to,
        };
        let content = chunk_reader_with_cuts(chunker, reader, &inner, |_, _| {})?;
        // Chunks never cross a cut: count each stretch's.
        let mut k = i;
        let (mut end, mut n) = (bounds[k + 1] - from, 0u32);
        let mut at = 0u64;
        for c in content.chunks.iter() {
            at += u64::from(c.len);
            n += 1;
            if at == end {
                tiling.push((bounds[k + 1] - bounds[k], n));
                k += 1;
                n = 0;
                if k < j {
                    end = bounds[k + 1] - from;
                }
            }
        }
        chunks.extend_from_slice(&content.chunks);
        i = j;
    }
    Ok(Stretched {
        chunks,
        stretches: tiling,
        reused,
    })
}

/// `end - at` bytes of a file from offset `at`, read with `pread` (no shared cursor).
struct Section<'a> {
    file: &'a fs::File,
    at: u64,
    end: u64,
}

impl io::Read for Section<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let want = buf
            .len()
            .min(usize::try_from(self.end - self.at).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// Archives at least this large are chunked along their entries; smaller ones are a few chunks
/// at most anyway.
const ARCHIVE_CUTS_FROM: u64 = 256 * 1024;

/// Where an archive's chunks must end (see [`crate::cut_points`]); nothing for other files.
/// Depends only on the file's name and bytes, so the manager and every agent cut alike.
fn archive_cuts(abs: &Path, file: &fs::File, size: u64) -> Vec<u64> {
    let archive = abs
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(crate::is_archive);
    if !archive || size < ARCHIVE_CUTS_FROM {
        return Vec::new();
    }
    crate::cut_points(file, size).unwrap_or_default()
}

fn open_nofollow(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use syncd_manifest::ChunkParams;

    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    proptest::proptest! {
        #[test]
        fn orphans_are_found_at_the_changed_paths_as_by_a_whole_pass(
            before in proptest::collection::btree_map(tree_path(), proptest::bool::ANY, 0..20),
            after in proptest::collection::btree_map(tree_path(), proptest::bool::ANY, 0..20),
        ) {
            use syncd_manifest::{Mtime, NodeKind, SymlinkTarget};
            // Entries: a directory (true) or a link; `before` made a tree, `after` anything.
            let node = |dir: bool| Node {
                kind: if dir {
                    NodeKind::Dir
                } else {
                    NodeKind::Symlink(SymlinkTarget::new("t").unwrap())
                },
                mode: 0o755,
                mtime: Mtime { secs: 1, nanos: 0 },
            };
            let manifest = |m: &std::collections::BTreeMap<RelPath, bool>| LocalManifest {
                manifest: m.iter().map(|(p, d)| (p.clone(), node(*d))).collect(),
                stats: HashMap::new(),
            };
            let mut local = manifest(&before);
            local.drop_orphans();
            let after = manifest(&after);
            let changes = syncd_manifest::diff(&local.manifest, &after.manifest);
            local.manifest.apply(&changes);
            let changed: Vec<RelPath> = changes.iter().map(|c| c.path().clone()).collect();
            proptest::prop_assert_eq!(local.has_orphans_at(&changed), local.has_orphans());
        }
    }

    #[test]
    fn dropping_orphans_drops_what_was_beneath_them_too() {
        use syncd_manifest::{Mtime, NodeKind, SymlinkTarget};
        let dir = Node {
            kind: NodeKind::Dir,
            mode: 0o755,
            mtime: Mtime { secs: 1, nanos: 0 },
        };
        let link = Node {
            kind: NodeKind::Symlink(SymlinkTarget::new("t").unwrap()),
            ..dir.clone()
        };
        // `b` vanished mid-scan: `b/x` is an orphan, and so, once it goes, is `b/x/y/z`'s chain.
        let mut local = LocalManifest {
            manifest: [
                (p("b/x"), dir.clone()),
                (p("b/x/y"), dir.clone()),
                (p("b/x/y/z"), link.clone()),
                (p("c"), dir.clone()),
                (p("c/d"), link.clone()),
            ]
            .into_iter()
            .collect(),
            stats: HashMap::new(),
        };
        local.drop_orphans();
        assert!(!local.has_orphans());
        let left: Vec<&str> = local.manifest.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(left, ["c", "c/d"]);
    }

    fn tree_path() -> impl proptest::strategy::Strategy<Value = RelPath> {
        use proptest::strategy::Strategy;
        let name = proptest::sample::select(vec!["a", "b", "a-b", "c.xml"]);
        proptest::collection::vec(name, 1..4)
            .prop_map(|parts| RelPath::new(parts.join("/")).unwrap())
    }

    #[test]
    fn scans_files_dirs_links_and_skips_what_it_must() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        fs::create_dir_all(r.join("carbonapps")).unwrap();
        fs::create_dir_all(r.join("empty")).unwrap();
        fs::create_dir_all(r.join("work/cache")).unwrap();
        fs::write(r.join("carbonapps/a.car"), vec![7u8; 300_000]).unwrap();
        fs::write(r.join("x.xml.back"), b"backup").unwrap();
        fs::write(r.join("work/cache/junk"), b"j").unwrap();
        symlink("carbonapps/a.car", r.join("link")).unwrap();
        symlink("/etc/passwd", r.join("escape")).unwrap();
        fs::set_permissions(
            r.join("carbonapps/a.car"),
            fs::Permissions::from_mode(0o640),
        )
        .unwrap();

        let chunker = Chunker::new(ChunkParams::DEFAULT).unwrap();
        let ex = Excludes::new(&["**/*.back", "work/**"]).unwrap();
        let (local, stats, warnings) = scan(r, &chunker, &ex, None, 2).unwrap();
        let m = &local.manifest;
        let paths: Vec<&str> = m.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["carbonapps", "carbonapps/a.car", "empty", "link"]);
        let car = m.get(&p("carbonapps/a.car")).unwrap();
        assert_eq!(car.mode, 0o640);
        assert_eq!(car.file().unwrap().size, 300_000);
        assert!(
            matches!(&m.get(&p("link")).unwrap().kind, NodeKind::Symlink(t) if t.as_str() == "carbonapps/a.car")
        );
        assert_eq!(stats.hashed_files, 1);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(matches!(warnings[0], ScanWarning::Symlink { .. }));
        m.validate().unwrap();
    }

    #[test]
    fn a_decoded_local_manifest_holds_each_path_once() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..10 {
            fs::write(dir.path().join(format!("f{i}")), format!("content {i}")).unwrap();
        }
        let chunker = Chunker::new(ChunkParams::DEFAULT).unwrap();
        let (local, _, _) = scan(dir.path(), &chunker, &Excludes::none(), None, 2).unwrap();
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&local, config).unwrap();
        let (back, _): (LocalManifest, _) =
            bincode::serde::decode_from_slice(&bytes, config).unwrap();
        assert_eq!(back, local);
        assert_eq!(back.stats.len(), 10);
        for path in back.stats.keys() {
            let held = back.manifest.key(path).unwrap();
            assert_eq!(held.as_str().as_ptr(), path.as_str().as_ptr(), "{path}");
        }
        // Deltas applied after it share the manifest's paths too.
        let mut next = back.clone();
        fs::write(dir.path().join("f3"), b"changed").unwrap();
        let (changed, _, _) =
            scan(dir.path(), &chunker, &Excludes::none(), Some(&back), 2).unwrap();
        let delta = LocalDelta::between(&back, &changed);
        let bytes = bincode::serde::encode_to_vec(&delta, config).unwrap();
        let (delta, _): (LocalDelta, _) =
            bincode::serde::decode_from_slice(&bytes, config).unwrap();
        next.apply_delta(&delta);
        assert_eq!(next, changed);
        let f3 = p("f3");
        let (held, stat) = (
            next.manifest.key(&f3).unwrap(),
            next.stats.get_key_value(&f3).unwrap().0,
        );
        assert_eq!(held.as_str().as_ptr(), stat.as_str().as_ptr());
    }

    #[test]
    fn a_rescan_rehashes_only_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for i in 0..10 {
            fs::write(r.join(format!("f{i}")), format!("content {i}")).unwrap();
        }
        let chunker = Chunker::new(ChunkParams::DEFAULT).unwrap();
        let ex = Excludes::none();
        let (first, _, _) = scan(r, &chunker, &ex, None, 2).unwrap();
        fs::write(r.join("f3"), b"changed").unwrap();
        let (second, stats, _) = scan(r, &chunker, &ex, Some(&first), 2).unwrap();
        assert_eq!((stats.hashed_files, stats.reused_files), (1, 9));
        assert_ne!(first.manifest.digest(), second.manifest.digest());
        let (third, stats, _) = scan(r, &chunker, &ex, Some(&second), 2).unwrap();
        assert_eq!((stats.hashed_files, stats.reused_files), (0, 10));
        assert_eq!(third.manifest.digest(), second.manifest.digest());
    }

    #[test]
    fn a_missing_root_is_an_error_not_an_empty_folder() {
        let dir = tempfile::tempdir().unwrap();
        let chunker = Chunker::new(ChunkParams::DEFAULT).unwrap();
        assert!(
            scan(
                &dir.path().join("gone"),
                &chunker,
                &Excludes::none(),
                None,
                1
            )
            .is_err()
        );
        fs::write(dir.path().join("file"), b"x").unwrap();
        assert!(
            scan(
                &dir.path().join("file"),
                &chunker,
                &Excludes::none(),
                None,
                1
            )
            .is_err()
        );
    }

    /// Chunking an archive in parts gives the very chunks (and file hash) of chunking it whole,
    /// wherever the forced cuts fall and however many parts.
    #[test]
    fn chunking_in_parts_matches_chunking_whole() {
        let chunker = Chunker::new(syncd_manifest::ChunkParams::DEFAULT).expect("params");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.war");
        // Numbers and bytes from BLAKE3's output stream.
        let mut stream = blake3::Hasher::new().update(b"parts").finalize_xof();
        let mut next = || {
            let mut b = [0u8; 8];
            stream.fill(&mut b);
            u64::from_le_bytes(b)
        };
        for case in 0..6u64 {
            let size = 3_000_000 + next() % 2_000_000;
            let mut data = vec![0u8; size as usize];
            blake3::Hasher::new()
                .update(&case.to_le_bytes())
                .finalize_xof()
                .fill(&mut data);
            fs::write(&path, &data).expect("write");
            let mut cuts: Vec<u64> = (0..case * 7 + 1)
                .map(|_| next() % size)
                .filter(|&c| c > 0)
                .collect();
            cuts.sort_unstable();
            cuts.dedup();
            let file = fs::File::open(&path).expect("open");
            let whole = chunk_reader_with_cuts(&chunker, &file, &cuts, |_, _| {}).expect("whole");
            for parts in [1, 2, 3, 5] {
                let Stretched {
                    chunks: split,
                    stretches: tiling,
                    reused,
                } = chunk_stretches(&chunker, &file, size, &cuts, None, parts).expect("parts");
                assert_eq!(reused, 0);
                assert!(
                    split.chunks == whole.chunks && split.hash == whole.hash,
                    "case {case}, {parts} parts"
                );
                assert_eq!(split.size, size);
                assert_eq!(tiling.len(), cuts.len() + 1);
                assert_eq!(
                    tiling.iter().map(|t| t.1 as usize).sum::<usize>(),
                    whole.chunks.len()
                );
            }
        }
    }

    /// A new version chunked with the last one's tiling gives the very chunks and tiling of
    /// chunking it from scratch, whatever changed: stretches kept, moved, edited by one byte,
    /// resized, new, or of the same length as an old one but other bytes.
    #[test]
    fn chunking_with_the_last_version_matches_chunking_from_scratch() {
        let chunker = Chunker::new(syncd_manifest::ChunkParams::DEFAULT).expect("params");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut stream = blake3::Hasher::new().update(b"reuse").finalize_xof();
        let mut next = || {
            let mut b = [0u8; 8];
            stream.fill(&mut b);
            u64::from_le_bytes(b)
        };
        let bytes = |seed: u64, len: u64| {
            let mut v = vec![0u8; len as usize];
            blake3::Hasher::new()
                .update(&seed.to_le_bytes())
                .finalize_xof()
                .fill(&mut v);
            v
        };
        // Writes the stretches as one file; returns it, its size and its cuts.
        let write = |name: &str, stretches: &[Vec<u8>]| {
            let path = dir.path().join(name);
            let all: Vec<u8> = stretches.concat();
            fs::write(&path, &all).expect("write");
            let mut cuts = Vec::new();
            let mut at = 0u64;
            for s in &stretches[..stretches.len() - 1] {
                at += s.len() as u64;
                cuts.push(at);
            }
            (fs::File::open(&path).expect("open"), all.len() as u64, cuts)
        };
        for case in 0..8u64 {
            // Entries from a few bytes (a header) to 700 KB (a library); two of one length.
            let mut v1: Vec<Vec<u8>> = (0..20 + case * 5)
                .map(|i| bytes(case * 1000 + i, 1 + next() % 700_000))
                .collect();
            v1[3] = bytes(case * 1000 + 500, v1[7].len() as u64);
            let (f1, size1, cuts1) = write("v1.war", &v1);
            let first = chunk_stretches(&chunker, &f1, size1, &cuts1, None, 2).expect("v1");
            let (old, tiling) = (first.chunks, first.stretches);
            let reuse = Reuse {
                tiling: Tiling {
                    of: old.hash,
                    stretches: tiling.into(),
                },
                content: old,
            };
            let mut v2 = v1.clone();
            for s in v2.iter_mut() {
                match next() % 6 {
                    0 => {
                        let at = (next() % s.len() as u64) as usize;
                        s[at] ^= 0x5a;
                    }
                    1 => s.extend_from_slice(b"grown"),
                    2 => *s = bytes(next(), s.len() as u64),
                    _ => {}
                }
            }
            v2.swap(1, 10);
            v2.insert(5, bytes(next(), 123_456));
            let (f2, size2, cuts2) = write("v2.war", &v2);
            let scratch = chunk_reader_with_cuts(&chunker, &f2, &cuts2, |_, _| {}).expect("v2");
            let plain_tiling = chunk_stretches(&chunker, &f2, size2, &cuts2, None, 2)
                .expect("v2 plain")
                .stretches;
            for parts in [1, 2, 3] {
                let Stretched {
                    chunks: content,
                    stretches: tiling,
                    reused,
                } = chunk_stretches(&chunker, &f2, size2, &cuts2, Some(&reuse), parts)
                    .expect("v2 reusing");
                assert!(
                    content.chunks == scratch.chunks && content.hash == scratch.hash,
                    "case {case}, {parts} parts"
                );
                assert_eq!(tiling, plain_tiling, "case {case}");
                // Half the stretches are kept as they were: their bytes were not chunked again.
                assert!(
                    reused > size2 / 5 && reused < size2,
                    "case {case}: {reused}"
                );
            }
            // A tiling of another version is not used.
            let stale = Reuse {
                tiling: Tiling {
                    of: scratch.hash,
                    stretches: reuse.tiling.stretches.clone(),
                },
                content: reuse.content.clone(),
            };
            let other =
                chunk_stretches(&chunker, &f2, size2, &cuts2, Some(&stale), 2).expect("stale");
            assert!(other.chunks.chunks == scratch.chunks);
            assert_eq!(other.reused, 0);
        }
    }
}
