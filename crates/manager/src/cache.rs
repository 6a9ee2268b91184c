//! Recently served chunks that compress (Synapse XML, descriptors), kept compressed and bounded,
//! so that when such a file changes the manager still has the version each agent holds and can
//! send the new one as a zstd delta against it: an 88-byte edit of a 10 KB XML crosses as about
//! a hundred bytes instead of the whole compressed file. Archives' bodies never enter: they do
//! not compress.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use syncd_manifest::ChunkHash;

/// The most compressed bytes kept: about 150 MB of XML at the usual ratio.
pub(crate) const CACHE_BYTES: usize = 32 << 20;

/// A bounded map from chunk hash to the chunk's bytes as one zstd frame, oldest out first.
#[derive(Debug)]
pub(crate) struct ChunkCache {
    inner: Mutex<Inner>,
    limit: usize,
}

#[derive(Debug, Default)]
struct Inner {
    /// (chunk length, zstd frame of it)
    map: HashMap<ChunkHash, (u32, Vec<u8>)>,
    order: VecDeque<ChunkHash>,
    bytes: usize,
}

impl ChunkCache {
    pub(crate) fn new(limit: usize) -> ChunkCache {
        ChunkCache {
            inner: Mutex::default(),
            limit,
        }
    }

    /// The chunk's bytes, if kept.
    pub(crate) fn get(&self, hash: &ChunkHash) -> Option<Vec<u8>> {
        let (len, frame) = {
            let inner = self.inner.lock().expect("the cache lock is never poisoned");
            inner.map.get(hash).cloned()?
        };
        let mut out = Vec::new();
        syncd_proto::decode_chunk(
            syncd_proto::ChunkEncoding::Zstd,
            &frame,
            len as usize,
            None,
            &mut out,
        )
        .ok()?;
        (ChunkHash::of(&out) == *hash).then_some(out)
    }

    /// Keeps `frame`, a zstd frame of the chunk `hash` of `len` bytes, evicting the oldest.
    pub(crate) fn insert(&self, hash: ChunkHash, len: u32, frame: Vec<u8>) {
        if frame.len() > self.limit / 16 {
            return;
        }
        let mut inner = self.inner.lock().expect("the cache lock is never poisoned");
        if inner.map.contains_key(&hash) {
            return;
        }
        inner.bytes += frame.len();
        inner.map.insert(hash, (len, frame));
        inner.order.push_back(hash);
        while inner.bytes > self.limit {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            if let Some((_, f)) = inner.map.remove(&old) {
                inner.bytes -= f.len();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(data: &[u8]) -> Vec<u8> {
        let (wire, enc) = syncd_proto::encode_chunk(data.to_vec());
        assert_eq!(enc, syncd_proto::ChunkEncoding::Zstd);
        wire
    }

    #[test]
    fn keeps_what_fits_and_drops_the_oldest() {
        let texts: Vec<Vec<u8>> = (0..50)
            .map(|i| format!("<api name=\"a{i}\">{}</api>", "<resource/>".repeat(400)).into_bytes())
            .collect();
        let one = frame(&texts[0]).len();
        let cache = ChunkCache::new(one * 16 + one / 2);
        for t in &texts {
            cache.insert(ChunkHash::of(t), t.len() as u32, frame(t));
        }
        // The last sixteen are kept, the older ones were dropped.
        for (i, t) in texts.iter().enumerate() {
            let got = cache.get(&ChunkHash::of(t));
            if i >= 34 {
                assert_eq!(got.as_deref(), Some(t.as_slice()), "chunk {i}");
            } else {
                assert_eq!(got, None, "chunk {i}");
            }
        }
    }

    #[test]
    fn a_frame_that_does_not_match_its_hash_is_never_returned() {
        let cache = ChunkCache::new(1 << 20);
        let text = "<resource/>".repeat(100).into_bytes();
        let liar = ChunkHash::of(b"something else");
        cache.insert(liar, text.len() as u32, frame(&text));
        assert_eq!(cache.get(&liar), None);
    }
}
