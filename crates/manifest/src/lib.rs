//! The pure core of syncd: validated relative paths, content-defined chunking, BLAKE3 hashes,
//! manifests of a folder and the differences between two of them.
//!
//! Nothing in this crate touches the disk, the network or the clock: bytes come in as slices or
//! through `std::io::Read`, and decisions leave as data.

mod chunker;
mod diff;
mod hash;
mod manifest;
mod path;

pub use chunker::{ChunkParams, ChunkParamsError, Chunker, chunk_reader, chunk_reader_with_cuts};
pub use diff::{Change, diff, diff_at};
pub use hash::{ChunkHash, FileHash, ManifestDigest};
pub use manifest::{
    ChunkList, ChunkRef, FileContent, Manifest, Mtime, Node, NodeKind, Preview, TreeError,
};
pub use path::{PathError, RelPath, SymlinkTarget, TargetError};
