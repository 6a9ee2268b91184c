//! QUIC for syncd: node identities, pinned-identity TLS 1.3, endpoints, and framed messages on
//! streams. This is the only crate that names quinn or rustls types; the roles see [`Conn`],
//! [`SendStream`] and [`RecvStream`].

mod conn;
mod endpoint;
mod identity;
mod rate;
mod validity;
mod verify;

pub use conn::{Conn, ConnStats, RecvStream, SendStream, TransportError};
pub use endpoint::{
    Congestion, DEFAULT_MAX_UDP_PAYLOAD, Endpoint, Incoming, MAX_UDP_PAYLOAD_LIMIT,
    install_crypto_provider, set_congestion, set_max_udp_payload,
};
pub use identity::{Identity, IdentityError, NodeId, NodeIdError};
