//! Content-defined chunking (FastCDC 2020) with parameters that travel with the manifest, and the
//! streaming reader that turns a file's bytes into its [`FileContent`] in bounded memory.

use std::io::{self, Read};

use fastcdc::v2020;
use serde::{Deserialize, Serialize};

use crate::hash::{ChunkHash, FileHasher};
use crate::manifest::{ChunkRef, FileContent};

/// FastCDC parameters: minimum, average and maximum chunk size in bytes.
///
/// They are recorded in every manifest: chunk hashes are only comparable between manifests made
/// with the same parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkParams {
    /// No content-defined cut comes sooner (a forced cut, at an archive entry, may).
    pub min: u32,
    /// The size the cut-point mask aims for.
    pub avg: u32,
    /// No chunk is longer.
    pub max: u32,
}

/// Why chunk parameters are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "chunk parameters min={min} avg={avg} max={max} are invalid: need 64 <= min <= avg <= max <= 16 MiB, all even, avg a power of two"
)]
pub struct ChunkParamsError {
    min: u32,
    avg: u32,
    max: u32,
}

impl ChunkParams {
    /// 16/64/256 KiB: the sizes measured to suit WSO2 artifacts (see BENCHMARKS.md).
    pub const DEFAULT: ChunkParams = ChunkParams {
        min: 16 * 1024,
        avg: 64 * 1024,
        max: 256 * 1024,
    };

    /// Checks the parameters against what FastCDC supports.
    pub fn validate(&self) -> Result<(), ChunkParamsError> {
        let ChunkParams { min, avg, max } = *self;
        let ok = (v2020::MINIMUM_MIN as u64..=v2020::MINIMUM_MAX as u64).contains(&(min as u64))
            && (v2020::AVERAGE_MIN as u64..=v2020::AVERAGE_MAX as u64).contains(&(avg as u64))
            && (v2020::MAXIMUM_MIN as u64..=v2020::MAXIMUM_MAX as u64).contains(&(max as u64))
            && min <= avg
            && avg <= max
            && max <= 16 * 1024 * 1024
            && avg.is_power_of_two()
            && min % 2 == 0
            && max % 2 == 0;
        if ok {
            Ok(())
        } else {
            Err(ChunkParamsError { min, avg, max })
        }
    }
}

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams::DEFAULT
    }
}

/// Finds cut points with a fixed set of [`ChunkParams`].
#[derive(Debug, Clone)]
pub struct Chunker {
    params: ChunkParams,
    mask_s: u64,
    mask_l: u64,
}

impl Chunker {
    /// A chunker for `params`, which must be valid.
    pub fn new(params: ChunkParams) -> Result<Self, ChunkParamsError> {
        params.validate()?;
        let (mask_s, mask_l) =
            v2020::select_masks(params.avg as usize, v2020::Normalization::Level1);
        Ok(Chunker {
            params,
            mask_s,
            mask_l,
        })
    }

    /// The parameters this chunker cuts with.
    pub fn params(&self) -> ChunkParams {
        self.params
    }

    /// Length of the chunk that starts at `data[0]`.
    ///
    /// `data` must hold at least `max` bytes unless it reaches the end of the file; otherwise the
    /// cut would depend on how the file happened to be read.
    pub fn cut(&self, data: &[u8]) -> usize {
        if data.is_empty() {
            return 0;
        }
        let (_, len) = v2020::cut(
            data,
            self.params.min as usize,
            self.params.avg as usize,
            self.params.max as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        len
    }

    /// Splits a whole in-memory file into chunk lengths.
    pub fn cut_all<'a>(&'a self, mut data: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        std::iter::from_fn(move || {
            let len = self.cut(data);
            if len == 0 {
                return None;
            }
            let (chunk, rest) = data.split_at(len);
            data = rest;
            Some(chunk)
        })
    }
}

/// The buffer a file is first read into; a larger file gets one of a few times the largest
/// chunk.
const FIRST_BUFFER: usize = 64 << 10;

/// Reads `reader` to its end and returns its chunk list, size and hash.
///
/// Memory stays at one buffer of a few times `params.max` whatever the file's size. `on_chunk`
/// sees every chunk's bytes and hash in order (the scanner passes a no-op; tests and the
/// benchmark use it to look at boundaries).
pub fn chunk_reader(
    chunker: &Chunker,
    reader: impl Read,
    on_chunk: impl FnMut(&[u8], &ChunkHash),
) -> io::Result<FileContent> {
    chunk_reader_with_cuts(chunker, reader, &[], on_chunk)
}

/// [`chunk_reader`] that also ends a chunk at each offset of `cuts` (sorted): the file is
/// chunked as if each stretch between two cuts were a file of its own. Archives use it to keep
/// each entry's data in chunks of its own (see `syncd_fsops::cut_points`).
pub fn chunk_reader_with_cuts(
    chunker: &Chunker,
    mut reader: impl Read,
    cuts: &[u64],
    mut on_chunk: impl FnMut(&[u8], &ChunkHash),
) -> io::Result<FileContent> {
    let mut cuts = cuts.iter().copied().peekable();
    let max = chunker.params.max as usize;
    let cap = (4 * max).max(1 << 20);
    // Most files are small: start with a buffer to match, and take the full one only for a file
    // that fills it (zeroing a megabyte for each 2 KB file cost more than hashing it).
    let mut buf = vec![0u8; FIRST_BUFFER.min(cap)];
    let (mut start, mut end) = (0usize, 0usize);
    let mut eof = false;
    let mut size = 0u64;
    let mut chunks = Vec::new();
    let mut file_hasher = FileHasher::new();
    loop {
        // Keep at least `max` bytes ahead of the cursor so a cut never depends on read sizes.
        if !eof && end - start < max {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
            loop {
                if end == buf.len() {
                    if buf.len() >= cap {
                        break;
                    }
                    buf.resize(cap, 0);
                }
                match reader.read(&mut buf[end..]) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => end += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        // A forced cut ahead ends the stretch the chunker may look at, as a file's end would.
        while cuts.next_if(|&c| c <= size).is_some() {}
        let window = match cuts.peek() {
            Some(&c) => end.min(start + usize::try_from(c - size).unwrap_or(usize::MAX)),
            None => end,
        };
        let len = chunker.cut(&buf[start..window]);
        if len == 0 {
            break;
        }
        let data = &buf[start..start + len];
        let hash = ChunkHash::of(data);
        on_chunk(data, &hash);
        file_hasher.push(&hash);
        chunks.push(ChunkRef {
            hash,
            len: len as u32,
        });
        size += len as u64;
        start += len;
    }
    Ok(FileContent {
        size,
        hash: file_hasher.finish(size),
        chunks: chunks.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (xorshift), so golden boundaries do not depend on a crate.
    pub(crate) fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// A reader that returns at most `step` bytes per call, to prove cuts ignore read sizes.
    struct Dribble<'a>(&'a [u8], usize);
    impl Read for Dribble<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(self.1).min(out.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn forced_cuts_chunk_each_stretch_as_a_file_of_its_own() {
        let data = noise(3 << 20, 9);
        let chunker = Chunker::new(ChunkParams::DEFAULT).unwrap();
        let cuts = [100u64, 70_000, 70_001, 1 << 20, 2_500_000];
        let mut lens = Vec::new();
        let content = chunk_reader_with_cuts(&chunker, Dribble(&data, 4097), &cuts, |c, _| {
            lens.push(c.len())
        })
        .unwrap();
        // The same as chunking every stretch alone.
        let mut expected = Vec::new();
        let mut from = 0usize;
        for to in cuts.iter().map(|&c| c as usize).chain([data.len()]) {
            expected.extend(chunker.cut_all(&data[from..to]).map(<[u8]>::len));
            from = to;
        }
        assert_eq!(lens, expected);
        assert_eq!(content.size, data.len() as u64);
        // No cuts: the plain chunking.
        let plain = chunk_reader_with_cuts(&chunker, &data[..], &[], |_, _| {}).unwrap();
        assert_eq!(plain, chunk_reader(&chunker, &data[..], |_, _| {}).unwrap());
    }

    #[test]
    fn golden_chunk_boundaries_for_default_params() {
        // Pinned: changing these lengths changes every chunk hash on the wire and on disk.
        let data = noise(1 << 20, 42);
        let chunker = Chunker::new(ChunkParams::DEFAULT).unwrap();
        let lens: Vec<usize> = chunker.cut_all(&data).map(<[u8]>::len).collect();
        assert_eq!(lens, GOLDEN_DEFAULT, "FastCDC boundaries moved");
        // The crate's own iterator must agree with our streaming use of its cut function.
        let reference: Vec<usize> = v2020::FastCDC::new(&data, 16384, 65536, 262144)
            .map(|c| c.length)
            .collect();
        assert_eq!(lens, reference);
        let content = chunk_reader(&chunker, &data[..], |_, _| {}).unwrap();
        assert_eq!(
            content.hash.to_hex(),
            GOLDEN_DEFAULT_FILE_HASH,
            "file hash definition moved"
        );
    }

    const GOLDEN_DEFAULT: &[usize] = &[
        34625, 89372, 16949, 119607, 145954, 104697, 106705, 109539, 32775, 82218, 107730, 78326,
        20079,
    ];
    const GOLDEN_DEFAULT_FILE_HASH: &str =
        "ee734492aca51588ee90b376f013bc9f8629efb9fc8c7545c133562e30f49164";

    #[test]
    fn streaming_matches_in_memory_whatever_the_read_size() {
        let data = noise(3 << 20, 7);
        let chunker = Chunker::new(ChunkParams::DEFAULT).unwrap();
        let in_memory: Vec<u32> = chunker.cut_all(&data).map(|c| c.len() as u32).collect();
        for step in [1usize << 20, 65_537, 4096, 300_000] {
            let content = chunk_reader(&chunker, Dribble(&data, step), |_, _| {}).unwrap();
            let lens: Vec<u32> = content.chunks.iter().map(|c| c.len).collect();
            assert_eq!(lens, in_memory, "read size {step}");
            assert_eq!(content.size, data.len() as u64);
        }
    }

    #[test]
    fn empty_and_tiny_files() {
        let chunker = Chunker::new(ChunkParams::DEFAULT).unwrap();
        let empty = chunk_reader(&chunker, &[][..], |_, _| {}).unwrap();
        assert_eq!(empty.size, 0);
        assert!(empty.chunks.is_empty());
        let tiny = chunk_reader(&chunker, &b"<api/>"[..], |_, _| {}).unwrap();
        assert_eq!(tiny.chunks.len(), 1);
        assert_eq!(tiny.chunks[0].hash, ChunkHash::of(b"<api/>"));
    }

    #[test]
    fn an_insertion_moves_only_nearby_boundaries() {
        let chunker = Chunker::new(ChunkParams::DEFAULT).unwrap();
        let data = noise(4 << 20, 9);
        let mut edited = b"inserted at the front".to_vec();
        edited.extend_from_slice(&data);
        let a = chunk_reader(&chunker, &data[..], |_, _| {}).unwrap();
        let b = chunk_reader(&chunker, &edited[..], |_, _| {}).unwrap();
        let old: std::collections::HashSet<_> = a.chunks.iter().map(|c| c.hash).collect();
        let new_chunks = b.chunks.iter().filter(|c| !old.contains(&c.hash)).count();
        assert!(
            new_chunks <= 2,
            "{new_chunks} chunks changed after a front insertion"
        );
    }

    #[test]
    fn invalid_params_are_refused() {
        for bad in [
            ChunkParams {
                min: 10,
                avg: 64,
                max: 256,
            },
            ChunkParams {
                min: 65536,
                avg: 16384,
                max: 262144,
            },
            ChunkParams {
                min: 16384,
                avg: 65535,
                max: 262144,
            },
        ] {
            assert!(Chunker::new(bad).is_err(), "{bad:?}");
        }
    }
}
