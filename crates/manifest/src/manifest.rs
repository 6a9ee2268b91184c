//! A manifest: what a synced folder holds, as a sorted map from [`RelPath`] to [`Node`].

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::chunker::ChunkParams;
use crate::hash::{ChunkHash, FileHash, ManifestDigest};
use crate::path::{RelPath, SymlinkTarget, TargetError};

/// Modification time, as the filesystem stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Mtime {
    /// Seconds since the Unix epoch (negative before it).
    pub secs: i64,
    /// Nanoseconds within the second, below 1e9.
    pub nanos: u32,
}

/// One chunk of a file: its hash and length. Its offset is the sum of the lengths before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    /// BLAKE3 of the chunk's bytes.
    pub hash: ChunkHash,
    /// Length in bytes, at most the manifest's `ChunkParams::max`.
    pub len: u32,
}

/// A regular file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileContent {
    /// Length in bytes; the sum of the chunk lengths.
    pub size: u64,
    /// Hash over `size` and the chunk list.
    pub hash: FileHash,
    /// The chunks in file order; empty for an empty file.
    pub chunks: ChunkList,
}

/// A file's chunks, in file order. Most files in a deployment are small configuration files
/// of one chunk, kept inline (no allocation of their own); longer lists are shared, so cloning
/// a node (into a snapshot, a history step, a change) does not copy a large file's list.
/// Encoded as a plain sequence, the same as a `Vec<ChunkRef>`.
#[derive(Clone, Default)]
pub struct ChunkList(ChunkRepr);

#[derive(Clone, Default)]
enum ChunkRepr {
    #[default]
    Empty,
    One(ChunkRef),
    Many(Arc<[ChunkRef]>),
}

impl std::ops::Deref for ChunkList {
    type Target = [ChunkRef];

    fn deref(&self) -> &[ChunkRef] {
        match &self.0 {
            ChunkRepr::Empty => &[],
            ChunkRepr::One(c) => std::slice::from_ref(c),
            ChunkRepr::Many(list) => list,
        }
    }
}

impl From<Vec<ChunkRef>> for ChunkList {
    fn from(v: Vec<ChunkRef>) -> Self {
        match v.as_slice() {
            [] => ChunkList(ChunkRepr::Empty),
            [one] => ChunkList(ChunkRepr::One(*one)),
            _ => ChunkList(ChunkRepr::Many(v.into())),
        }
    }
}

impl From<&[ChunkRef]> for ChunkList {
    fn from(s: &[ChunkRef]) -> Self {
        match s {
            [] => ChunkList(ChunkRepr::Empty),
            [one] => ChunkList(ChunkRepr::One(*one)),
            _ => ChunkList(ChunkRepr::Many(s.into())),
        }
    }
}

impl PartialEq for ChunkList {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for ChunkList {}

impl std::fmt::Debug for ChunkList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for ChunkList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for ChunkList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<ChunkRef>::deserialize(d).map(ChunkList::from)
    }
}

impl FileContent {
    /// Where each chunk starts in the file, in chunk order.
    pub fn chunk_offsets(&self) -> Vec<u64> {
        self.chunks
            .iter()
            .scan(0u64, |at, c| {
                let start = *at;
                *at += u64::from(c.len);
                Some(start)
            })
            .collect()
    }
}

/// What kind of thing is at a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    /// A directory; what it contains are entries of their own.
    Dir,
    /// A regular file.
    File(FileContent),
    /// A symbolic link, kept as a link and never followed.
    Symlink(SymlinkTarget),
}

/// Everything syncd keeps about one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Directory, file or link.
    pub kind: NodeKind,
    /// Permission bits (`mode & 0o7777`); ignored for symlinks.
    pub mode: u32,
    /// Modification time.
    pub mtime: Mtime,
}

impl Node {
    /// The file content, if this is a file.
    pub fn file(&self) -> Option<&FileContent> {
        match &self.kind {
            NodeKind::File(f) => Some(f),
            _ => None,
        }
    }

    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir)
    }
}

/// Why a set of entries is not a consistent tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// An entry's parent is absent or is not a directory.
    #[error("{path} has no parent directory in the manifest")]
    Orphan {
        /// The entry without a parent.
        path: RelPath,
    },
    /// A file's chunk list does not add up to its size, or a chunk is out of bounds.
    #[error("{path}: chunk list does not describe a file of {size} bytes under {params:?}")]
    BadChunks {
        /// The file.
        path: RelPath,
        /// Its claimed size.
        size: u64,
        /// The manifest's chunk parameters.
        params: ChunkParams,
    },
    /// A file's hash does not match its chunk list.
    #[error("{path}: file hash does not match its chunk list")]
    BadFileHash {
        /// The file.
        path: RelPath,
    },
    /// A symlink points outside the folder.
    #[error(transparent)]
    Symlink(#[from] TargetError),
    /// A permission mode has bits outside 0o7777, or an mtime has nanoseconds over a second.
    #[error("{path}: mode {mode:o} or mtime nanoseconds {nanos} out of range")]
    BadMeta {
        /// The entry.
        path: RelPath,
        /// Its mode.
        mode: u32,
        /// Its mtime's nanoseconds.
        nanos: u32,
    },
}

/// The state of one folder: chunk parameters and a sorted map of entries.
///
/// It keeps a running sum of its entries' hashes, so [`Manifest::digest`] costs the same for
/// ten files and for a hundred thousand, and a change costs in proportion to what it touches.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(from = "ManifestRepr")]
pub struct Manifest {
    /// The parameters every file's chunks were cut with.
    pub params: ChunkParams,
    nodes: BTreeMap<RelPath, Node>,
    #[serde(skip_serializing)]
    sum: EntrySum,
}

/// How a manifest is encoded: its parameters and entries (the sum is recomputed on decoding).
#[derive(Deserialize)]
struct ManifestRepr {
    params: ChunkParams,
    #[serde(deserialize_with = "packed_map")]
    nodes: BTreeMap<RelPath, Node>,
}

/// Decodes a map the way serde's own impl does (a later duplicate key replaces an earlier one),
/// but builds it from the whole list at once, with full nodes: inserting the entries one by one
/// in order leaves every node of the map half empty.
fn packed_map<'de, D>(d: D) -> Result<BTreeMap<RelPath, Node>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Entries;
    impl<'de> serde::de::Visitor<'de> for Entries {
        type Value = BTreeMap<RelPath, Node>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of paths to nodes")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            // The length comes from the peer or the disk: trust it only so far.
            let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(4096));
            while let Some(entry) = map.next_entry()? {
                entries.push(entry);
            }
            Ok(entries.into_iter().collect())
        }
    }
    d.deserialize_map(Entries)
}

impl From<ManifestRepr> for Manifest {
    fn from(r: ManifestRepr) -> Self {
        let sum = EntrySum::of(&r.nodes);
        Manifest {
            params: r.params,
            nodes: r.nodes,
            sum,
        }
    }
}

/// The sum, modulo 2^256, of every entry's hash: a multiset hash (AdHash) that an insertion or a
/// removal updates in constant time. It detects divergence between two nodes' views of a folder
/// (bugs, lost writes, a wrong base); it is not meant to resist someone choosing file contents to
/// collide, who would have to be able to publish files, which is already the power to deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct EntrySum([u64; 4]);

impl EntrySum {
    fn of(nodes: &BTreeMap<RelPath, Node>) -> Self {
        let mut sum = EntrySum::default();
        for (path, node) in nodes {
            sum.add(&entry_hash(path, node));
        }
        sum
    }

    fn add(&mut self, h: &[u8; 32]) {
        let mut carry = false;
        for (limb, bytes) in self.0.iter_mut().zip(h.chunks_exact(8)) {
            let v = u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
            let (r, c1) = limb.overflowing_add(v);
            let (r, c2) = r.overflowing_add(carry as u64);
            *limb = r;
            carry = c1 || c2;
        }
    }

    fn sub(&mut self, h: &[u8; 32]) {
        let mut borrow = false;
        for (limb, bytes) in self.0.iter_mut().zip(h.chunks_exact(8)) {
            let v = u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
            let (r, b1) = limb.overflowing_sub(v);
            let (r, b2) = r.overflowing_sub(borrow as u64);
            *limb = r;
            borrow = b1 || b2;
        }
    }

    fn to_le_bytes(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (dst, limb) in out.chunks_exact_mut(8).zip(self.0) {
            dst.copy_from_slice(&limb.to_le_bytes());
        }
        out
    }
}

/// BLAKE3 over one entry's canonical encoding (see PROTOCOL.md, "manifest digest").
fn entry_hash(path: &RelPath, node: &Node) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"syncd entry v2\0");
    h.update(&(path.as_str().len() as u64).to_le_bytes());
    h.update(path.as_str().as_bytes());
    h.update(&node.mode.to_le_bytes());
    h.update(&node.mtime.secs.to_le_bytes());
    h.update(&node.mtime.nanos.to_le_bytes());
    match &node.kind {
        NodeKind::Dir => {
            h.update(b"d");
        }
        NodeKind::File(f) => {
            // The file hash covers size and chunks.
            h.update(b"f");
            h.update(&f.hash.0);
        }
        NodeKind::Symlink(t) => {
            h.update(b"l");
            h.update(&(t.as_str().len() as u64).to_le_bytes());
            h.update(t.as_str().as_bytes());
        }
    }
    *h.finalize().as_bytes()
}

impl Manifest {
    /// An empty manifest.
    pub fn new(params: ChunkParams) -> Self {
        Manifest {
            params,
            nodes: BTreeMap::new(),
            sum: EntrySum::default(),
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the folder is empty.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The entry at `path` (a `RelPath`, or a `str` holding one).
    pub fn get<Q>(&self, path: &Q) -> Option<&Node>
    where
        RelPath: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.nodes.get(path)
    }

    /// The path as the manifest holds it: a clone of it shares the manifest's allocation.
    pub fn key<Q>(&self, path: &Q) -> Option<&RelPath>
    where
        RelPath: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.nodes.get_key_value(path).map(|(k, _)| k)
    }

    /// All entries in path order (a directory before its contents).
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&RelPath, &Node)> + ExactSizeIterator {
        self.nodes.iter()
    }

    /// Entries at `dir` and beneath it, in path order.
    pub fn subtree<'a>(
        &'a self,
        dir: &'a RelPath,
    ) -> impl Iterator<Item = (&'a RelPath, &'a Node)> {
        self.nodes
            .range(dir.clone()..)
            .take_while(move |(p, _)| p.as_str().starts_with(dir.as_str()))
            .filter(move |(p, _)| p.starts_with(dir))
    }

    /// Rebuilds the map with full nodes: one built by inserting entries in path order (a walk)
    /// holds every entry in about twice the memory it needs.
    pub fn compact(&mut self) {
        self.nodes = std::mem::take(&mut self.nodes).into_iter().collect();
    }

    /// Sets the entry at `path`, returning the previous one.
    pub fn insert(&mut self, path: RelPath, node: Node) -> Option<Node> {
        self.sum.add(&entry_hash(&path, &node));
        let old = self.nodes.insert(path.clone(), node);
        if let Some(old) = &old {
            self.sum.sub(&entry_hash(&path, old));
        }
        old
    }

    /// Removes the entry at `path`.
    pub fn remove(&mut self, path: &RelPath) -> Option<Node> {
        let old = self.nodes.remove(path);
        if let Some(old) = &old {
            self.sum.sub(&entry_hash(path, old));
        }
        old
    }

    /// Total bytes of regular files.
    pub fn total_bytes(&self) -> u64 {
        self.nodes
            .values()
            .filter_map(Node::file)
            .map(|f| f.size)
            .sum()
    }

    /// Checks that the entries form a tree a filesystem can hold and that every file's chunk list
    /// is consistent with its size, its hash and the chunk parameters. Run on anything decoded
    /// from the network before it is planned or applied.
    pub fn validate(&self) -> Result<(), TreeError> {
        for (path, node) in &self.nodes {
            validate_node(self.params, path, node)?;
            if let Some(parent) = path.parent_str()
                && !self.nodes.get(parent).is_some_and(Node::is_dir)
            {
                return Err(TreeError::Orphan { path: path.clone() });
            }
        }
        Ok(())
    }

    /// Checks, after `changes` were applied to a manifest that was valid before them, what
    /// [`Manifest::validate`] would check, looking only at the entries the changes touch: each
    /// entry put is valid and has a directory as its parent, and nothing is left beneath a path
    /// that was removed or is no longer a directory. Costs in proportion to the changes.
    pub fn validate_changes(&self, changes: &[crate::Change]) -> Result<(), TreeError> {
        validate_at(
            self.params,
            changes.iter().map(crate::Change::path),
            |p| self.nodes.get(p),
            |d| self.first_beneath(d),
        )
    }

    /// An entry at or beneath `paths` that has no directory as its parent, in a manifest whose
    /// other entries form a tree (as [`Manifest::validate`] checks): an entry at one of `paths`
    /// whose parent is not a directory, or one beneath a path there that is not a directory.
    /// Costs in proportion to `paths`: for a holder of a manifest that notes the paths it changed.
    pub fn orphan_at<'a>(&self, paths: impl IntoIterator<Item = &'a RelPath>) -> Option<RelPath> {
        paths.into_iter().find_map(|path| {
            orphan_at(path, |p| self.nodes.get(p), |d| self.first_beneath(d)).cloned()
        })
    }

    /// The first entry strictly beneath `dir`, if any.
    fn first_beneath(&self, dir: &RelPath) -> Option<&RelPath> {
        use std::ops::Bound;
        let prefix = format!("{dir}/");
        self.nodes
            .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
            .next()
            .map(|(p, _)| p)
            .filter(|p| p.as_str().starts_with(&prefix))
    }

    /// A digest of the whole manifest (parameters and every entry), stable across versions of
    /// syncd and independent of the wire codec. Constant time: it hashes the running sum of the
    /// entries' hashes.
    pub fn digest(&self) -> ManifestDigest {
        digest_of(self.params, self.nodes.len(), self.sum)
    }

    /// This manifest as it would be after `changes` (applied in order, as [`Manifest::apply`]
    /// does), without copying it: checking an update against a folder of a hundred thousand
    /// entries costs what the update touches.
    pub fn preview(&self, changes: impl IntoIterator<Item = crate::Change>) -> Preview<'_> {
        let mut over = BTreeMap::new();
        for change in changes {
            match change {
                crate::Change::Put(path, node) => over.insert(path, Some(node)),
                crate::Change::Remove(path) => over.insert(path, None),
            };
        }
        Preview { base: self, over }
    }
}

/// What [`Manifest::validate_changes`] checks, at `paths` of a manifest (or a [`Preview`]) seen
/// through `get` and `first_beneath`: each entry there is valid and has a directory as its
/// parent, and nothing is beneath one that is not a directory.
fn validate_at<'a, 'm>(
    params: ChunkParams,
    paths: impl IntoIterator<Item = &'a RelPath>,
    get: impl Fn(&str) -> Option<&'m Node>,
    first_beneath: impl Fn(&RelPath) -> Option<&'m RelPath>,
) -> Result<(), TreeError> {
    for path in paths {
        if let Some(node) = get(path.as_str()) {
            validate_node(params, path, node)?;
        }
        if let Some(orphan) = orphan_at(path, &get, &first_beneath) {
            return Err(TreeError::Orphan {
                path: orphan.clone(),
            });
        }
    }
    Ok(())
}

/// The tree half of [`validate_at`] at one path: the entry there if its parent is not a
/// directory, else the first entry beneath it if it is not a directory itself.
fn orphan_at<'r, 'm: 'r>(
    path: &'r RelPath,
    get: impl Fn(&str) -> Option<&'m Node>,
    first_beneath: impl Fn(&RelPath) -> Option<&'m RelPath>,
) -> Option<&'r RelPath> {
    let node = get(path.as_str());
    if node.is_some()
        && let Some(parent) = path.parent_str()
        && !get(parent).is_some_and(Node::is_dir)
    {
        return Some(path);
    }
    if node.is_some_and(Node::is_dir) {
        return None;
    }
    first_beneath(path)
}

fn digest_of(params: ChunkParams, len: usize, sum: EntrySum) -> ManifestDigest {
    let mut h = blake3::Hasher::new();
    h.update(b"syncd manifest v2\0");
    for v in [params.min, params.avg, params.max] {
        h.update(&v.to_le_bytes());
    }
    h.update(&(len as u64).to_le_bytes());
    h.update(&sum.to_le_bytes());
    ManifestDigest(*h.finalize().as_bytes())
}

/// A manifest as it would be after some changes (see [`Manifest::preview`]): the base, and the
/// entry each changed path would hold.
#[derive(Debug)]
pub struct Preview<'a> {
    base: &'a Manifest,
    over: BTreeMap<RelPath, Option<Node>>,
}

impl Preview<'_> {
    /// The entry at `path` (a `RelPath`, or a `str` holding one).
    pub fn get<Q>(&self, path: &Q) -> Option<&Node>
    where
        RelPath: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        match self.over.get(path) {
            Some(over) => over.as_ref(),
            None => self.base.get(path),
        }
    }

    /// Removes the entry at `path`.
    pub fn remove(&mut self, path: &RelPath) {
        self.over.insert(path.clone(), None);
    }

    /// The result as a manifest of its own (a copy of the base with the changes applied).
    pub fn into_manifest(self) -> Manifest {
        let mut m = self.base.clone();
        for (path, node) in self.over {
            match node {
                Some(node) => m.insert(path, node),
                None => m.remove(&path),
            };
        }
        m
    }

    /// [`Manifest::digest`] of the result.
    pub fn digest(&self) -> ManifestDigest {
        let (mut sum, mut len) = (self.base.sum, self.base.len());
        for (path, node) in &self.over {
            if let Some(old) = self.base.get(path) {
                sum.sub(&entry_hash(path, old));
                len -= 1;
            }
            if let Some(node) = node {
                sum.add(&entry_hash(path, node));
                len += 1;
            }
        }
        digest_of(self.base.params, len, sum)
    }

    /// [`Manifest::validate_changes`] of the result: from a valid base, whether the result is
    /// valid.
    pub fn validate(&self) -> Result<(), TreeError> {
        validate_at(
            self.base.params,
            self.over.keys(),
            |p| self.get(p),
            |d| self.first_beneath(d),
        )
    }

    /// The first entry strictly beneath `dir` in the result, if any.
    fn first_beneath(&self, dir: &RelPath) -> Option<&RelPath> {
        use std::ops::Bound;
        let prefix = format!("{dir}/");
        let range = (Bound::Included(prefix.as_str()), Bound::Unbounded);
        let kept = self
            .base
            .nodes
            .range::<str, _>(range)
            .map(|(p, _)| p)
            .take_while(|p| p.as_str().starts_with(&prefix))
            .find(|p| !matches!(self.over.get(*p), Some(None)));
        let put = self
            .over
            .range::<str, _>(range)
            .take_while(|(p, _)| p.as_str().starts_with(&prefix))
            .find(|(_, n)| n.is_some())
            .map(|(p, _)| p);
        match (kept, put) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The changes that turn the base into the result, as [`crate::diff`] lists them (only
    /// entries that differ, in path order).
    pub fn into_changes(self) -> Vec<crate::Change> {
        let base = self.base;
        self.over
            .into_iter()
            .filter_map(|(path, node)| match (base.get(&path), node) {
                (Some(_), None) => Some(crate::Change::Remove(path)),
                (old, Some(node)) if old != Some(&node) => Some(crate::Change::Put(path, node)),
                _ => None,
            })
            .collect()
    }
}

/// Checks one entry on its own (not its place in the tree).
pub(crate) fn validate_node(
    params: ChunkParams,
    path: &RelPath,
    node: &Node,
) -> Result<(), TreeError> {
    if node.mode & !0o7777 != 0 || node.mtime.nanos >= 1_000_000_000 {
        return Err(TreeError::BadMeta {
            path: path.clone(),
            mode: node.mode,
            nanos: node.mtime.nanos,
        });
    }
    match &node.kind {
        NodeKind::Dir => Ok(()),
        NodeKind::Symlink(target) => Ok(target.check_within(path)?),
        NodeKind::File(f) => {
            let bad = || TreeError::BadChunks {
                path: path.clone(),
                size: f.size,
                params,
            };
            let mut sum = 0u64;
            for c in f.chunks.iter() {
                // Chunks may be shorter than `min` anywhere: archives are cut at their entries.
                if c.len == 0 || c.len > params.max {
                    return Err(bad());
                }
                sum += c.len as u64;
            }
            if sum != f.size {
                return Err(bad());
            }
            if FileHash::from_chunks(f.size, f.chunks.iter().map(|c| &c.hash)) != f.hash {
                return Err(TreeError::BadFileHash { path: path.clone() });
            }
            Ok(())
        }
    }
}

impl FromIterator<(RelPath, Node)> for Manifest {
    /// Collects entries under the default chunk parameters.
    fn from_iter<I: IntoIterator<Item = (RelPath, Node)>>(iter: I) -> Self {
        let nodes = iter.into_iter().collect();
        Manifest {
            params: ChunkParams::DEFAULT,
            sum: EntrySum::of(&nodes),
            nodes,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::hash::ChunkHash;

    pub(crate) fn file(data: &[u8], mode: u32, secs: i64) -> Node {
        let chunks = if data.is_empty() {
            vec![]
        } else {
            vec![ChunkRef {
                hash: ChunkHash::of(data),
                len: data.len() as u32,
            }]
        };
        Node {
            kind: NodeKind::File(FileContent {
                size: data.len() as u64,
                hash: FileHash::from_chunks(data.len() as u64, chunks.iter().map(|c| &c.hash)),
                chunks: chunks.into(),
            }),
            mode,
            mtime: Mtime { secs, nanos: 7 },
        }
    }

    pub(crate) fn dir() -> Node {
        Node {
            kind: NodeKind::Dir,
            mode: 0o755,
            mtime: Mtime { secs: 1, nanos: 0 },
        }
    }

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn a_consistent_tree_validates() {
        let m: Manifest = [(p("a"), dir()), (p("a/x.xml"), file(b"<x/>", 0o644, 5))]
            .into_iter()
            .collect();
        m.validate().unwrap();
    }

    #[test]
    fn orphans_and_files_as_parents_are_refused() {
        let orphan: Manifest = [(p("a/x.xml"), file(b"x", 0o644, 5))].into_iter().collect();
        assert!(matches!(orphan.validate(), Err(TreeError::Orphan { .. })));
        let under_file: Manifest = [(p("a"), file(b"x", 0o644, 5)), (p("a/b"), dir())]
            .into_iter()
            .collect();
        assert!(matches!(
            under_file.validate(),
            Err(TreeError::Orphan { .. })
        ));
    }

    #[test]
    fn lying_chunk_lists_are_refused() {
        let mut node = file(b"hello", 0o644, 1);
        if let NodeKind::File(f) = &mut node.kind {
            f.size = 6;
        }
        let m: Manifest = [(p("x"), node)].into_iter().collect();
        assert!(matches!(m.validate(), Err(TreeError::BadChunks { .. })));

        let mut node = file(b"hello", 0o644, 1);
        if let NodeKind::File(f) = &mut node.kind {
            f.hash = FileHash([0; 32]);
        }
        let m: Manifest = [(p("x"), node)].into_iter().collect();
        assert!(matches!(m.validate(), Err(TreeError::BadFileHash { .. })));
    }

    #[test]
    fn escaping_symlinks_are_refused() {
        let link = Node {
            kind: NodeKind::Symlink(SymlinkTarget::new("../../etc").unwrap()),
            mode: 0o777,
            mtime: Mtime { secs: 0, nanos: 0 },
        };
        let m: Manifest = [(p("a"), dir()), (p("a/l"), link)].into_iter().collect();
        assert!(matches!(m.validate(), Err(TreeError::Symlink(_))));
    }

    #[test]
    fn chunk_offsets_are_where_each_chunk_starts() {
        let chunk = |len| ChunkRef {
            hash: ChunkHash::of(&[len as u8]),
            len,
        };
        let content = FileContent {
            size: 17,
            hash: FileHash::from_chunks(17, []),
            chunks: vec![chunk(5), chunk(10), chunk(2)].into(),
        };
        assert_eq!(content.chunk_offsets(), vec![0, 5, 15]);
        let empty = FileContent {
            chunks: Vec::new().into(),
            ..content
        };
        assert!(empty.chunk_offsets().is_empty());
    }

    #[test]
    fn digest_sees_every_field() {
        let base: Manifest = [(p("a"), file(b"x", 0o644, 5))].into_iter().collect();
        let variants = [
            [(p("b"), file(b"x", 0o644, 5))],
            [(p("a"), file(b"y", 0o644, 5))],
            [(p("a"), file(b"x", 0o600, 5))],
            [(p("a"), file(b"x", 0o644, 6))],
            [(p("a"), dir())],
        ];
        for v in variants {
            let m: Manifest = v.into_iter().collect();
            assert_ne!(m.digest(), base.digest(), "{m:?}");
        }
        assert_eq!(base.digest(), base.clone().digest());
    }

    #[test]
    fn validating_changes_finds_what_validating_everything_finds() {
        use crate::Change;
        let base: Manifest = [
            (p("a"), dir()),
            (p("a/x"), file(b"x", 0o644, 5)),
            (p("a-b"), dir()),
            (p("b"), dir()),
        ]
        .into_iter()
        .collect();
        base.validate().unwrap();
        let mut lying = file(b"y", 0o644, 5);
        if let NodeKind::File(f) = &mut lying.kind {
            f.size = 2;
        }
        let cases: Vec<Vec<Change>> = vec![
            vec![Change::Put(p("b/y"), file(b"y", 0o644, 1))],
            vec![Change::Put(p("c/y"), file(b"y", 0o644, 1))],
            vec![Change::Remove(p("a"))],
            vec![Change::Remove(p("a/x")), Change::Remove(p("a"))],
            vec![Change::Put(p("a"), file(b"now a file", 0o644, 1))],
            vec![Change::Put(p("b"), file(b"b", 0o644, 1))],
            vec![Change::Put(p("b/z"), lying)],
            vec![Change::Remove(p("a-b")), Change::Put(p("a-b/q"), dir())],
        ];
        for changes in cases {
            let mut m = base.clone();
            m.apply(&changes);
            assert_eq!(
                m.validate_changes(&changes).is_ok(),
                m.validate().is_ok(),
                "{changes:?}"
            );
        }
    }

    #[test]
    fn the_running_digest_matches_one_computed_afresh() {
        let mut m = Manifest::new(ChunkParams::DEFAULT);
        let mut seen = vec![m.digest()];
        m.insert(p("a"), dir());
        m.insert(p("a/x"), file(b"one", 0o644, 1));
        m.insert(p("a/y"), file(b"two", 0o644, 1));
        seen.push(m.digest());
        // Replacing and removing keep the sum in step with the entries.
        m.insert(p("a/x"), file(b"three", 0o644, 1));
        m.remove(&p("a/y"));
        m.remove(&p("absent"));
        let fresh: Manifest = m.iter().map(|(p, n)| (p.clone(), n.clone())).collect();
        assert_eq!(m.digest(), fresh.digest());
        assert_eq!(m, fresh);
        // Back to an earlier content, back to its digest.
        m.insert(p("a/x"), file(b"one", 0o644, 1));
        m.insert(p("a/y"), file(b"two", 0o644, 1));
        assert_eq!(m.digest(), seen[1]);
        m.remove(&p("a/x"));
        m.remove(&p("a/y"));
        m.remove(&p("a"));
        assert_eq!(m.digest(), seen[0]);
        // Decoding recomputes the sum.
        let bytes = bincode::serde::encode_to_vec(&fresh, bincode::config::standard()).unwrap();
        let (back, _): (Manifest, _) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(back.digest(), fresh.digest());
    }

    #[test]
    fn packing_and_decoding_keep_every_entry_and_the_digest() {
        let mut m = Manifest::new(ChunkParams::DEFAULT);
        m.insert(p("d"), dir());
        for i in 0..1000i64 {
            m.insert(p(&format!("d/f{i:04}")), file(&i.to_le_bytes(), 0o644, i));
        }
        let before = m.clone();
        m.compact();
        assert_eq!(m, before);
        assert_eq!(m.digest(), before.digest());
        assert_eq!(m.iter().count(), 1001);
        // Still an ordinary map afterwards.
        m.insert(p("d/f0500"), file(b"new", 0o600, 9));
        m.remove(&p("d/f0001"));
        let mut expected = before.clone();
        expected.insert(p("d/f0500"), file(b"new", 0o600, 9));
        expected.remove(&p("d/f0001"));
        assert_eq!(m, expected);
        assert_eq!(m.digest(), expected.digest());

        // Decoding builds the map at once; a repeated path keeps its last entry, as serde's
        // own map decoding does.
        #[derive(Serialize)]
        struct Raw {
            params: ChunkParams,
            nodes: Vec<(RelPath, Node)>,
        }
        let raw = Raw {
            params: ChunkParams::DEFAULT,
            nodes: vec![
                (p("a"), file(b"first", 0o644, 1)),
                (p("b"), dir()),
                (p("a"), file(b"second", 0o644, 1)),
            ],
        };
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&raw, config).unwrap();
        let (back, _): (Manifest, _) = bincode::serde::decode_from_slice(&bytes, config).unwrap();
        let (serde_map, _): ((ChunkParams, BTreeMap<RelPath, Node>), _) =
            bincode::serde::decode_from_slice(&bytes, config).unwrap();
        assert_eq!(back.iter().count(), 2);
        assert_eq!(back.get(&p("a")), Some(&file(b"second", 0o644, 1)));
        assert!(back.iter().eq(serde_map.1.iter()));
        let m_bytes = bincode::serde::encode_to_vec(&m, config).unwrap();
        let (m_back, _): (Manifest, _) =
            bincode::serde::decode_from_slice(&m_bytes, config).unwrap();
        assert_eq!(m_back, m);
        assert_eq!(m_back.digest(), m.digest());
    }

    #[test]
    fn chunk_lists_encode_as_sequences_and_keep_one_chunk_inline() {
        let config = bincode::config::standard();
        for n in [0u8, 1, 2, 7] {
            let v: Vec<ChunkRef> = (0..n)
                .map(|i| ChunkRef {
                    hash: ChunkHash::of(&[i]),
                    len: u32::from(i) + 1,
                })
                .collect();
            let list = ChunkList::from(v.clone());
            assert_eq!(&*list, v.as_slice());
            assert_eq!(ChunkList::from(v.as_slice()), list);
            let bytes = bincode::serde::encode_to_vec(&list, config).unwrap();
            assert_eq!(bytes, bincode::serde::encode_to_vec(&v, config).unwrap());
            let (back, _): (ChunkList, _) =
                bincode::serde::decode_from_slice(&bytes, config).unwrap();
            assert_eq!(back, list);
            assert_eq!(matches!(list.0, ChunkRepr::One(_)), n == 1);
        }
        // What each entry of a manifest costs in memory (a map entry is a path and a node);
        // one more word per file is 800 KB at 100,000 files.
        assert!(
            std::mem::size_of::<Node>() <= 104,
            "{}",
            std::mem::size_of::<Node>()
        );
    }

    #[test]
    fn subtree_stops_at_siblings_with_a_common_prefix() {
        let m: Manifest = [
            (p("a"), dir()),
            (p("a/x"), dir()),
            (p("a-b"), dir()),
            (p("ab"), dir()),
        ]
        .into_iter()
        .collect();
        let a = p("a");
        let sub: Vec<_> = m.subtree(&a).map(|(p, _)| p.as_str()).collect();
        assert_eq!(sub, ["a", "a/x"]);
    }
}
