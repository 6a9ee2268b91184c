//! Newtypes for the three kinds of BLAKE3 hash, so that one can never stand in for another.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! hash_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The lowercase hex form, as `b3sum` prints hashes.
            pub fn to_hex(&self) -> String {
                blake3::Hash::from_bytes(self.0).to_hex().to_string()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), &self.to_hex()[..16])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }
    };
}

hash_type!(
    /// BLAKE3 of one chunk's bytes.
    ChunkHash
);
hash_type!(
    /// Identity of a whole file: BLAKE3 over its size and the list of its chunk hashes.
    ///
    /// Every byte of the file is covered (each chunk hash covers its bytes), and computing it
    /// costs no second pass over the data, which keeps chunking + hashing at one BLAKE3 pass.
    FileHash
);
hash_type!(
    /// BLAKE3 over a manifest's canonical encoding: two trees with equal digests are identical.
    ManifestDigest
);

impl ChunkHash {
    /// Hashes one chunk's bytes.
    pub fn of(data: &[u8]) -> Self {
        ChunkHash(*blake3::hash(data).as_bytes())
    }
}

impl FileHash {
    /// Computes the file hash from its chunk list.
    pub fn from_chunks<'a>(size: u64, chunks: impl IntoIterator<Item = &'a ChunkHash>) -> Self {
        let mut hasher = FileHasher::new();
        for chunk in chunks {
            hasher.push(chunk);
        }
        hasher.finish(size)
    }
}

/// Incremental form of [`FileHash::from_chunks`], for callers that see chunks one at a time.
#[derive(Debug, Clone)]
pub(crate) struct FileHasher(blake3::Hasher);

impl FileHasher {
    pub(crate) fn new() -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"syncd file v1\0");
        FileHasher(hasher)
    }

    pub(crate) fn push(&mut self, chunk: &ChunkHash) {
        self.0.update(&chunk.0);
    }

    pub(crate) fn finish(mut self, size: u64) -> FileHash {
        self.0.update(&size.to_le_bytes());
        FileHash(*self.0.finalize().as_bytes())
    }
}
