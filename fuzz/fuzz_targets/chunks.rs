//! Chunk payloads from the network: whatever the bytes and the claimed encoding, decoding never
//! panics, never grows its buffer past the chunk's length, and a success has exactly that length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use syncd_proto::{ChunkEncoding, decode_chunk, encode_chunk};

fuzz_target!(|input: (bool, u16, &[u8])| {
    let (zstd, expected, wire) = input;
    let encoding = if zstd { ChunkEncoding::Zstd } else { ChunkEncoding::Raw };
    let expected = expected as usize;
    let mut out = Vec::new();
    if decode_chunk(encoding, wire, expected, &mut out).is_ok() {
        assert_eq!(out.len(), expected);
    }
    assert!(out.len() <= expected.max(wire.len()));
    // What the manager encodes, the agent decodes back to the same bytes.
    let (sent, enc) = encode_chunk(wire.to_vec());
    decode_chunk(enc, &sent, wire.len(), &mut out).expect("own encoding decodes");
    assert_eq!(out, wire);
});
