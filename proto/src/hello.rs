//! The version handshake: eight raw bytes each side sends first on the control stream, before any
//! framed message, so that peers of any two versions can always read each other's versions.

/// ALPN protocol name offered and required on every QUIC connection.
pub const ALPN: &[u8] = b"syncd";
/// The protocol version this build speaks best.
pub const PROTOCOL_VERSION: u16 = 4;
/// The oldest protocol version this build still speaks (3 has no [`crate::ManagerMsg::Pushed`]:
/// a manager sends it only to agents that speak 4).
pub const MIN_PROTOCOL_VERSION: u16 = 3;
/// Length of an encoded [`Hello`].
pub const HELLO_LEN: usize = 8;

const MAGIC: &[u8; 4] = b"SYNC";

/// The range of protocol versions a peer speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Oldest version spoken.
    pub min: u16,
    /// Newest version spoken.
    pub max: u16,
}

/// Why a handshake fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// The first bytes are not a syncd hello at all.
    #[error("peer is not speaking the syncd protocol (first bytes {0:02x?})")]
    BadMagic([u8; 4]),
    /// The version range is empty.
    #[error("peer sent an empty protocol version range {min}..={max}")]
    BadRange {
        /// Claimed oldest version.
        min: u16,
        /// Claimed newest version.
        max: u16,
    },
    /// No version is spoken by both sides.
    #[error(
        "protocol version mismatch: we speak {ours_min}..={ours_max}, the peer speaks {theirs_min}..={theirs_max}"
    )]
    NoCommonVersion {
        /// Our oldest version.
        ours_min: u16,
        /// Our newest version.
        ours_max: u16,
        /// The peer's oldest version.
        theirs_min: u16,
        /// The peer's newest version.
        theirs_max: u16,
    },
}

impl Hello {
    /// What this build speaks.
    pub const OURS: Hello = Hello {
        min: MIN_PROTOCOL_VERSION,
        max: PROTOCOL_VERSION,
    };

    /// The eight bytes on the wire: `SYNC`, then `min` and `max` big-endian.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[..4].copy_from_slice(MAGIC);
        out[4..6].copy_from_slice(&self.min.to_be_bytes());
        out[6..8].copy_from_slice(&self.max.to_be_bytes());
        out
    }

    /// Parses the peer's eight bytes.
    pub fn decode(bytes: &[u8; HELLO_LEN]) -> Result<Hello, HelloError> {
        if &bytes[..4] != MAGIC {
            return Err(HelloError::BadMagic([
                bytes[0], bytes[1], bytes[2], bytes[3],
            ]));
        }
        let min = u16::from_be_bytes([bytes[4], bytes[5]]);
        let max = u16::from_be_bytes([bytes[6], bytes[7]]);
        if min > max {
            return Err(HelloError::BadRange { min, max });
        }
        Ok(Hello { min, max })
    }

    /// The version both sides will speak: the newest one both know.
    pub fn negotiate(&self, theirs: &Hello) -> Result<u16, HelloError> {
        let best = self.max.min(theirs.max);
        if best >= self.min.max(theirs.min) {
            Ok(best)
        } else {
            Err(HelloError::NoCommonVersion {
                ours_min: self.min,
                ours_max: self.max,
                theirs_min: theirs.min,
                theirs_max: theirs.max,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_golden_bytes() {
        let h = Hello { min: 1, max: 2 };
        assert_eq!(&h.encode(), b"SYNC\x00\x01\x00\x02");
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn negotiation_picks_the_newest_common_version() {
        let ours = Hello { min: 1, max: 2 };
        assert_eq!(ours.negotiate(&Hello { min: 1, max: 1 }), Ok(1));
        assert_eq!(ours.negotiate(&Hello { min: 2, max: 3 }), Ok(2));
    }

    #[test]
    fn a_mismatch_names_both_ranges() {
        let err = Hello { min: 1, max: 1 }
            .negotiate(&Hello { min: 2, max: 2 })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "protocol version mismatch: we speak 1..=1, the peer speaks 2..=2"
        );
    }

    #[test]
    fn garbage_is_not_a_hello() {
        assert!(matches!(
            Hello::decode(b"GET / HT"),
            Err(HelloError::BadMagic(_))
        ));
        assert!(matches!(
            Hello::decode(b"SYNC\x00\x03\x00\x01"),
            Err(HelloError::BadRange { .. })
        ));
    }
}
