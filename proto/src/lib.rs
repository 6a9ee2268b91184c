//! The wire contract between a syncd manager and its agents: the version handshake, framing, and
//! every message. See `PROTOCOL.md` beside this crate for the prose description.
//!
//! This crate does no I/O. Bytes come in as slices and leave as `Vec<u8>`; the `transport` crate
//! moves them over QUIC streams. The codec (bincode 2, standard configuration) is named only in
//! `codec.rs`, guarded by golden vectors in `vectors/`, so it can be swapped without touching
//! callers.

mod chunk;
mod codec;
mod hello;
mod messages;
mod patch;
mod update;

pub use chunk::{
    ChunkDecodeError, decode_chunk, encode_chunk, encode_chunk_keeping_plain,
    encode_chunk_with_base,
};
pub use codec::{
    DecodeError, EncodeError, FRAME_HEADER_LEN, MAX_CONTROL_FRAME, MAX_REQUEST_FRAME,
    MAX_STATE_FILE, decode, decode_state, encode_frame, encode_state, encoded_len, frame_len,
};
pub use hello::{ALPN, HELLO_LEN, Hello, HelloError, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
pub use messages::{
    AgentMsg, Base, ChunkEncoding, DRIFT_REPORTED, DRIFT_REPORTED_BYTES, DriftEntry, FetchFile,
    FetchReply, FetchRequest, FolderState, Generation, MAX_CHUNK_LEN, ManagerMsg, Pause,
    PushedChunk, drift_reported,
};
pub use patch::{
    ListOp, MAX_INLINE_BYTES, MAX_INLINE_CHUNK, PatchError, PatchedPut, Resolved, patch,
};
pub use update::{
    AssembleError, MAX_PUSHED_BYTES, MAX_PUSHED_CHUNK, MAX_UPDATE_ITEMS, PAGE_BUDGET,
    UpdateAssembler, paginate,
};

/// QUIC application close codes, so each side can tell the other why a connection ended.
pub mod close {
    /// Normal shutdown of either daemon.
    pub const SHUTDOWN: u32 = 0;
    /// The peers speak no common protocol version.
    pub const VERSION_MISMATCH: u32 = 1;
    /// The peer is not who the configuration says it must be (name, identity).
    pub const NOT_ALLOWED: u32 = 2;
    /// The peer sent bytes that do not decode, or a message out of place.
    pub const PROTOCOL_ERROR: u32 = 3;
    /// Another connection from the same agent replaced this one.
    pub const REPLACED: u32 = 4;
    /// Another live connection already uses this agent's identity, and the two kept replacing
    /// each other: two nodes share one identity.
    pub const IDENTITY_IN_USE: u32 = 5;
}
