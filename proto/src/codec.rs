//! Framing and the message codec: a 4-byte little-endian length, then a bincode-encoded message.
//!
//! The length is checked against the stream's limit before anything is allocated, and a payload
//! must decode exactly, with no trailing bytes.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Bytes in a frame header (the payload length, `u32` little-endian).
pub const FRAME_HEADER_LEN: usize = 4;
/// Largest frame a manager may send an agent on the control stream.
pub const MAX_CONTROL_FRAME: usize = 4 << 20;
/// Largest frame an agent may send a manager (control messages and fetch requests).
pub const MAX_REQUEST_FRAME: usize = 1 << 20;

/// bincode 2's standard configuration (little-endian, variable-length integers), with a limit
/// no frame can exceed so a claimed length can never make the decoder allocate past it.
fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_CONTROL_FRAME }>()
}

/// Largest local state file (a node's persisted manifests) the decoder accepts.
pub const MAX_STATE_FILE: usize = 1 << 30;
/// First bytes of a state file: what it is and the version of its layout.
const STATE_MAGIC: &[u8; 8] = b"SYNCDST1";

fn state_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_STATE_FILE }>()
}

/// Encodes a node's own persisted state (not a network message), behind a magic header.
pub fn encode_state<T: Serialize>(value: &T) -> Result<Vec<u8>, EncodeError> {
    let mut out = STATE_MAGIC.to_vec();
    bincode::serde::encode_into_std_write(value, &mut out, state_config())
        .map_err(|e| EncodeError::Codec(e.to_string()))?;
    Ok(out)
}

/// Decodes what [`encode_state`] wrote.
pub fn decode_state<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let body = bytes
        .strip_prefix(STATE_MAGIC)
        .ok_or_else(|| DecodeError::Malformed("not a syncd state file of this version".into()))?;
    let (value, used) = bincode::serde::decode_from_slice(body, state_config())
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(DecodeError::TrailingBytes {
            extra: body.len() - used,
        });
    }
    Ok(value)
}

/// Why bytes from a peer were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix exceeds the stream's limit.
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Claimed length.
        len: u64,
        /// Limit for this stream.
        limit: usize,
    },
    /// The payload is not a valid message (includes invalid paths, which fail while decoding).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The message decoded but bytes were left over.
    #[error("message followed by {extra} unexpected bytes")]
    TrailingBytes {
        /// How many bytes were left.
        extra: usize,
    },
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoded message would exceed the receiving stream's limit.
    #[error("encoded message of {len} bytes exceeds the frame limit of {limit} bytes")]
    TooLarge {
        /// Encoded length.
        len: usize,
        /// Limit it had to fit in.
        limit: usize,
    },
    /// The codec failed (a bug: our own types always encode).
    #[error("cannot encode message: {0}")]
    Codec(String),
}

/// The payload length announced by a frame header, refused if over `limit`.
pub fn frame_len(header: [u8; FRAME_HEADER_LEN], limit: usize) -> Result<usize, DecodeError> {
    let len = u32::from_le_bytes(header) as u64;
    if len > limit as u64 {
        return Err(DecodeError::TooLarge { len, limit });
    }
    Ok(len as usize)
}

/// Encodes `msg` as a whole frame (header and payload), refusing one larger than `limit`.
pub fn encode_frame<T: Serialize>(msg: &T, limit: usize) -> Result<Vec<u8>, EncodeError> {
    let mut out = vec![0u8; FRAME_HEADER_LEN];
    let written = bincode::serde::encode_into_std_write(msg, &mut out, config())
        .map_err(|e| EncodeError::Codec(e.to_string()))?;
    if written > limit {
        return Err(EncodeError::TooLarge {
            len: written,
            limit,
        });
    }
    out[..FRAME_HEADER_LEN].copy_from_slice(&(written as u32).to_le_bytes());
    Ok(out)
}

/// Decodes one whole payload.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    let (msg, used) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(DecodeError::TrailingBytes {
            extra: payload.len() - used,
        });
    }
    Ok(msg)
}

/// The encoded size of `msg`'s payload, for callers that pack several items into one frame.
pub fn encoded_len<T: Serialize>(msg: &T) -> usize {
    let mut counter = Counter(0);
    // Encoding into a counter cannot fail for our types; a failure would be caught by
    // `encode_frame` right after.
    let _ = bincode::serde::encode_into_std_write(msg, &mut counter, config());
    counter.0
}

struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_checked_before_allocation() {
        let huge = (1u32 << 31).to_le_bytes();
        assert!(matches!(
            frame_len(huge, MAX_CONTROL_FRAME),
            Err(DecodeError::TooLarge { .. })
        ));
        assert_eq!(frame_len(16u32.to_le_bytes(), 16), Ok(16));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let frame = encode_frame(&7u32, 100).unwrap();
        let mut payload = frame[FRAME_HEADER_LEN..].to_vec();
        payload.push(0);
        assert_eq!(
            decode::<u32>(&payload),
            Err(DecodeError::TrailingBytes { extra: 1 })
        );
    }

    #[test]
    fn a_vector_claiming_2_pow_60_elements_is_refused_without_allocating() {
        // varint marker 0xFD = u64 follows.
        let mut payload = vec![0xFDu8];
        payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(
            decode::<Vec<u64>>(&payload),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn oversized_messages_are_not_encoded() {
        let big = vec![0u8; 200];
        assert!(matches!(
            encode_frame(&big, 100),
            Err(EncodeError::TooLarge { .. })
        ));
        assert_eq!(
            encoded_len(&big),
            encode_frame(&big, 1000).unwrap().len() - 4
        );
    }
}
