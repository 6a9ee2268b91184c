//! Chunk payloads from the network: whatever the bytes, the claimed encoding and the base, decoding
//! never panics, never grows its buffer past the chunk's length, and a success has exactly that
//! length. What the manager encodes (with or without a base), the agent decodes back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use syncd_proto::{ChunkEncoding, decode_chunk, encode_chunk_with_base};

fuzz_target!(|input: (u8, u16, &[u8], &[u8])| {
    let (mode, expected, base, wire) = input;
    let encoding = match mode % 3 {
        0 => ChunkEncoding::Raw,
        1 => ChunkEncoding::Zstd,
        _ => ChunkEncoding::ZstdWithBase,
    };
    let with_base = (mode & 0x80 != 0).then_some(base);
    let expected = expected as usize;
    let mut out = Vec::new();
    if decode_chunk(encoding, wire, expected, with_base, &mut out).is_ok() {
        assert_eq!(out.len(), expected);
    }
    assert!(out.len() <= expected.max(wire.len()));
    let (sent, enc) = encode_chunk_with_base(wire.to_vec(), with_base);
    decode_chunk(enc, &sent, wire.len(), with_base, &mut out).expect("own encoding decodes");
    assert_eq!(out, wire);
});
