//! How a chunk's bytes travel in a fetch reply: as they are, or as one zstd frame when that saves
//! at least a tenth (Synapse XML, descriptors, an archive's central directory; never the
//! already-compressed body of an archive entry, which a quick probe tells apart).

use std::cell::RefCell;

use crate::messages::ChunkEncoding;

/// Chunks shorter than this travel raw: the frame overhead eats the gain.
const MIN_COMPRESS: usize = 256;
/// How much of a chunk the probe compresses first.
const PROBE: usize = 4096;
/// zstd level: 3 is zstd's default, fast enough to run per agent on the manager.
const LEVEL: i32 = 3;

/// Why a received chunk could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkDecodeError {
    /// The raw bytes are not as long as the chunk.
    #[error("raw chunk of {got} bytes where {expected} were expected")]
    Length {
        /// Bytes received.
        got: usize,
        /// The chunk's length from its manifest.
        expected: usize,
    },
    /// A compressed chunk that is no smaller than the chunk itself: never sent by a manager.
    #[error("compressed chunk of {got} bytes is not smaller than the chunk ({expected} bytes)")]
    NotSmaller {
        /// Bytes received.
        got: usize,
        /// The chunk's length.
        expected: usize,
    },
    /// A chunk compressed against a base the request did not offer.
    #[error("chunk compressed against a base chunk that was not offered")]
    NoBase,
    /// The zstd frame is malformed, or does not decompress to exactly the chunk's length.
    #[error("compressed chunk does not decompress to its {expected} bytes: {reason}")]
    Zstd {
        /// The chunk's length.
        expected: usize,
        /// What zstd said.
        reason: String,
    },
}

thread_local! {
    /// zstd contexts cost a large allocation each: one per thread, reused for every chunk.
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    /// Room for the worst case of the largest chunk compressed on this thread so far.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Compresses `data` at `level` with this thread's context and returns the frame, exactly as
/// long as it is.
///
/// zstd's own `compress` returns a vector with room for the worst case, about the input's
/// length, however small the frame: a 60 KB XML chunk's 9 KB frame, kept as a delta base in
/// the manager's cache, held 60 KB, and every call allocated that much. After a worker joined
/// the 1.5 GB tree, the manager held 111 MB at rest instead of 35 MB (peak 230 MB instead of
/// 155 MB). The frame is written into a scratch buffer kept per thread and copied out.
fn compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    compressed_with(data, level, <[u8]>::to_vec)
}

/// The length of `data`'s frame at `level`, kept nowhere.
fn compressed_len(data: &[u8], level: i32) -> std::io::Result<usize> {
    compressed_with(data, level, <[u8]>::len)
}

fn compressed_with<T>(data: &[u8], level: i32, f: impl FnOnce(&[u8]) -> T) -> std::io::Result<T> {
    COMPRESSOR.with_borrow_mut(|c| {
        let c = match c {
            Some(c) => c,
            None => c.insert(zstd::bulk::Compressor::new(level)?),
        };
        c.set_compression_level(level)?;
        framed(c, data, f)
    })
}

/// Compresses `data` with `c` into this thread's scratch buffer and returns what `f` makes of
/// the frame (see [`compress`]).
fn framed<T>(
    c: &mut zstd::bulk::Compressor<'_>,
    data: &[u8],
    f: impl FnOnce(&[u8]) -> T,
) -> std::io::Result<T> {
    SCRATCH.with_borrow_mut(|buf| {
        buf.clear();
        buf.reserve(zstd::zstd_safe::compress_bound(data.len()));
        c.compress_to_buffer(data, buf)?;
        Ok(f(buf))
    })
}

fn decompress_into(wire: &[u8], out: &mut [u8]) -> std::io::Result<usize> {
    DECOMPRESSOR.with_borrow_mut(|d| {
        let d = match d {
            Some(d) => d,
            None => d.insert(zstd::bulk::Decompressor::new()?),
        };
        d.decompress_to_buffer(wire, out)
    })
}

/// Encodes a chunk for the wire: zstd when it saves at least a tenth, raw otherwise.
pub fn encode_chunk(chunk: Vec<u8>) -> (Vec<u8>, ChunkEncoding) {
    encode_chunk_with_base(chunk, None)
}

/// [`encode_chunk`], also trying `base` (a chunk the agent holds) as the dictionary, and
/// keeping whichever encoding is shortest.
pub fn encode_chunk_with_base(chunk: Vec<u8>, base: Option<&[u8]>) -> (Vec<u8>, ChunkEncoding) {
    let (wire, encoding, _) = encode_chunk_keeping_plain(chunk, base);
    (wire, encoding)
}

/// [`encode_chunk_with_base`], also returning the plain zstd frame of the chunk when that frame
/// pays on its own (the manager keeps it as a future base) without compressing twice.
pub fn encode_chunk_keeping_plain(
    chunk: Vec<u8>,
    base: Option<&[u8]>,
) -> (Vec<u8>, ChunkEncoding, Option<Vec<u8>>) {
    if chunk.len() < MIN_COMPRESS {
        return (chunk, ChunkEncoding::Raw, None);
    }
    let pays = |from: usize, to: usize| to < from - from / 10;
    // A chunk no longer than the probe is compressed once, below: probing it would compress
    // it twice (most Synapse XMLs are a single chunk of a few KB).
    if chunk.len() > PROBE {
        let probe = &chunk[..PROBE];
        match compressed_len(probe, 1) {
            Ok(c) if pays(probe.len(), c) => {}
            _ => return (chunk, ChunkEncoding::Raw, None),
        }
    }
    let plain = compress(&chunk, LEVEL)
        .ok()
        .filter(|p| pays(chunk.len(), p.len()));
    let with_base = base
        .and_then(|b| {
            zstd::bulk::Compressor::with_dictionary(LEVEL, b)
                .and_then(|mut c| framed(&mut c, &chunk, <[u8]>::to_vec))
                .ok()
        })
        .filter(|d| pays(chunk.len(), d.len()));
    match (&plain, with_base) {
        (Some(p), Some(d)) if d.len() < p.len() => (d, ChunkEncoding::ZstdWithBase, plain),
        (Some(p), _) => (p.clone(), ChunkEncoding::Zstd, plain),
        (None, Some(d)) => (d, ChunkEncoding::ZstdWithBase, None),
        (None, None) => (chunk, ChunkEncoding::Raw, None),
    }
}

/// Decodes `wire`, received with `encoding`, into `out` (cleared first), which must come out
/// exactly `expected` bytes long. Never allocates more than `expected` bytes, whatever `wire`
/// holds. The caller still checks the chunk's hash.
pub fn decode_chunk(
    encoding: ChunkEncoding,
    wire: &[u8],
    expected: usize,
    base: Option<&[u8]>,
    out: &mut Vec<u8>,
) -> Result<(), ChunkDecodeError> {
    out.clear();
    match encoding {
        ChunkEncoding::Raw => {
            if wire.len() != expected {
                return Err(ChunkDecodeError::Length {
                    got: wire.len(),
                    expected,
                });
            }
            out.extend_from_slice(wire);
        }
        ChunkEncoding::Zstd | ChunkEncoding::ZstdWithBase => {
            if wire.len() >= expected {
                return Err(ChunkDecodeError::NotSmaller {
                    got: wire.len(),
                    expected,
                });
            }
            out.resize(expected, 0);
            let zstd = |reason: String| ChunkDecodeError::Zstd { expected, reason };
            let n = match (encoding, base) {
                (ChunkEncoding::ZstdWithBase, None) => return Err(ChunkDecodeError::NoBase),
                (ChunkEncoding::ZstdWithBase, Some(base)) => {
                    zstd::bulk::Decompressor::with_dictionary(base)
                        .and_then(|mut d| d.decompress_to_buffer(wire, &mut out[..]))
                }
                _ => decompress_into(wire, &mut out[..]),
            }
            .map_err(|e| zstd(e.to_string()))?;
            if n != expected {
                return Err(zstd(format!("it gave {n} bytes")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xml(len: usize) -> Vec<u8> {
        let mut s = String::new();
        let mut i = 0u64;
        while s.len() < len {
            s.push_str(&format!(
                "<resource uri=\"/r{i}\"><log level=\"custom\"/></resource>\n"
            ));
            i = i
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
        }
        s.truncate(len);
        s.into_bytes()
    }

    fn noise(len: usize) -> Vec<u8> {
        let mut x = 0x1234_5678_9abc_def1u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn text_is_compressed_noise_and_tiny_chunks_are_not() {
        let text = xml(60_000);
        let (wire, enc) = encode_chunk(text.clone());
        assert_eq!(enc, ChunkEncoding::Zstd);
        assert!(wire.len() < text.len() / 4, "{} bytes", wire.len());
        let mut out = Vec::new();
        decode_chunk(enc, &wire, text.len(), None, &mut out).unwrap();
        assert_eq!(out, text);

        let random = noise(60_000);
        let (wire, enc) = encode_chunk(random.clone());
        assert_eq!((enc, &wire), (ChunkEncoding::Raw, &random));
        decode_chunk(enc, &wire, random.len(), None, &mut out).unwrap();
        assert_eq!(out, random);

        assert_eq!(encode_chunk(vec![b'a'; 100]).1, ChunkEncoding::Raw);
    }

    #[test]
    fn an_edit_costs_about_its_size_against_the_base() {
        let old = xml(12_000);
        let mut new = old.clone();
        new.splice(6_000..6_088, std::iter::repeat_n(b'#', 88));
        let (plain, enc) = encode_chunk(new.clone());
        assert_eq!(enc, ChunkEncoding::Zstd);
        let (wire, enc) = encode_chunk_with_base(new.clone(), Some(&old));
        assert_eq!(enc, ChunkEncoding::ZstdWithBase);
        assert!(wire.len() < 200, "{} bytes against the base", wire.len());
        assert!(
            wire.len() * 5 < plain.len(),
            "{} vs {}",
            wire.len(),
            plain.len()
        );
        let mut out = Vec::new();
        decode_chunk(enc, &wire, new.len(), Some(&old), &mut out).unwrap();
        assert_eq!(out, new);
        // Without the base, or with another one, it does not decode to the chunk.
        assert_eq!(
            decode_chunk(enc, &wire, new.len(), None, &mut out),
            Err(ChunkDecodeError::NoBase)
        );
        let other = xml(5_000);
        assert!(decode_chunk(enc, &wire, new.len(), Some(&other), &mut out).is_err() || out != new);
    }

    #[test]
    fn a_frame_holds_no_more_memory_than_its_length() {
        // The manager keeps frames as delta bases: room for zstd's worst case would cost each
        // about the chunk's whole length.
        let old = xml(60_000);
        let mut new = old.clone();
        new.splice(30_000..30_088, std::iter::repeat_n(b'#', 88));
        let (wire, enc, plain) = encode_chunk_keeping_plain(new.clone(), None);
        let plain = plain.expect("text compresses");
        assert_eq!(enc, ChunkEncoding::Zstd);
        assert_eq!(
            (wire.capacity(), plain.capacity()),
            (wire.len(), plain.len())
        );
        let (wire, enc, plain) = encode_chunk_keeping_plain(new, Some(&old));
        assert_eq!(enc, ChunkEncoding::ZstdWithBase);
        assert_eq!(wire.capacity(), wire.len());
        let plain = plain.expect("text compresses");
        assert_eq!(plain.capacity(), plain.len());
    }

    #[test]
    fn bad_input_is_refused_without_allocating_beyond_the_chunk() {
        let text = xml(10_000);
        let (wire, _) = encode_chunk(text.clone());
        let mut out = Vec::new();
        // Decompressing to more than the chunk's length is refused, not grown into.
        assert!(matches!(
            decode_chunk(ChunkEncoding::Zstd, &wire, 9_999, None, &mut out),
            Err(ChunkDecodeError::Zstd { .. })
        ));
        assert!(out.capacity() <= 10_000);
        // ... and to less.
        assert!(decode_chunk(ChunkEncoding::Zstd, &wire, 10_001, None, &mut out).is_err());
        // Corrupt frames, a frame no smaller than the chunk, a raw chunk of the wrong length.
        let mut corrupt = wire.clone();
        let mid = corrupt.len() / 2;
        corrupt[mid] ^= 0xff;
        let _ = decode_chunk(ChunkEncoding::Zstd, &corrupt, 10_000, None, &mut out);
        assert!(decode_chunk(ChunkEncoding::Zstd, b"junk", 10_000, None, &mut out).is_err());
        assert!(matches!(
            decode_chunk(ChunkEncoding::Zstd, &text, 10_000, None, &mut out),
            Err(ChunkDecodeError::NotSmaller { .. })
        ));
        assert!(matches!(
            decode_chunk(ChunkEncoding::Raw, &text[1..], 10_000, None, &mut out),
            Err(ChunkDecodeError::Length { .. })
        ));
    }
}
