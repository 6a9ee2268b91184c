//! A QUIC connection to an authenticated peer, and framed messages on its streams.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use syncd_proto::{DecodeError, EncodeError, FRAME_HEADER_LEN, HelloError};

use crate::identity::NodeId;
use crate::rate::SendLimit;

/// Why a connection or a stream failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The TLS configuration could not be built from the identity.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// The connection could not be established (unreachable, refused identity, ...).
    #[error("connection failed: {0}")]
    Connect(String),
    /// A side closed the connection on purpose.
    #[error("connection closed by {}: {reason} (code {code})", if *.by_peer { "peer" } else { "us" })]
    Closed {
        /// Whether the peer closed it.
        by_peer: bool,
        /// Application close code (see `syncd_proto::close`).
        code: u32,
        /// The reason given.
        reason: String,
    },
    /// The connection was lost (timeout, reset).
    #[error("connection lost: {0}")]
    Lost(String),
    /// A stream failed.
    #[error("stream error: {0}")]
    Stream(String),
    /// The stream ended in the middle of a message.
    #[error("stream ended in the middle of a message")]
    UnexpectedEnd,
    /// The version handshake failed.
    #[error(transparent)]
    Handshake(#[from] HelloError),
    /// The peer sent a malformed or oversized message.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A message could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

impl From<quinn::ConnectionError> for TransportError {
    fn from(e: quinn::ConnectionError) -> Self {
        match e {
            quinn::ConnectionError::ApplicationClosed(c) => TransportError::Closed {
                by_peer: true,
                code: c.error_code.into_inner() as u32,
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            },
            quinn::ConnectionError::LocallyClosed => TransportError::Closed {
                by_peer: false,
                code: 0,
                reason: "closed locally".into(),
            },
            other => TransportError::Lost(other.to_string()),
        }
    }
}

impl From<quinn::ReadExactError> for TransportError {
    fn from(e: quinn::ReadExactError) -> Self {
        match e {
            quinn::ReadExactError::FinishedEarly(_) => TransportError::UnexpectedEnd,
            quinn::ReadExactError::ReadError(e) => e.into(),
        }
    }
}

impl From<quinn::ReadError> for TransportError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(c) => c.into(),
            other => TransportError::Stream(other.to_string()),
        }
    }
}

impl From<quinn::WriteError> for TransportError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(c) => c.into(),
            other => TransportError::Stream(other.to_string()),
        }
    }
}

/// Byte counters of a connection, as UDP payload (QUIC headers, encryption and retransmissions
/// included): what actually crossed the network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnStats {
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// UDP datagrams sent.
    pub tx_datagrams: u64,
    /// The largest UDP payload the path is known to carry now (path MTU discovery).
    pub mtu: u16,
    /// Packets declared lost (and their data sent again).
    pub lost_packets: u64,
    /// Times path MTU discovery judged larger packets to be lost on the path and fell back to
    /// QUIC's 1,200 bytes.
    pub black_holes: u64,
}

/// An established, mutually authenticated connection.
#[derive(Debug, Clone)]
pub struct Conn {
    inner: quinn::Connection,
    peer: NodeId,
    /// How we closed it, if we did: quinn reports a local close without its reason.
    closed_by_us: Arc<Mutex<Option<(u32, String)>>>,
    /// The cap on what its streams send, if any.
    send_limit: Option<Arc<SendLimit>>,
}

impl Conn {
    pub(crate) fn new(inner: quinn::Connection) -> Result<Conn, TransportError> {
        let certs = inner
            .peer_identity()
            .and_then(|any| {
                any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .ok_or_else(|| TransportError::Connect("peer presented no certificate".into()))?;
        let first = certs
            .first()
            .ok_or_else(|| TransportError::Connect("peer presented no certificate".into()))?;
        let peer =
            NodeId::of_certificate(first).map_err(|e| TransportError::Connect(e.to_string()))?;
        Ok(Conn {
            inner,
            peer,
            closed_by_us: Arc::default(),
            send_limit: None,
        })
    }

    /// Caps what every stream of this connection sends, together, at `bytes_per_sec` (streams
    /// opened or accepted from this value and its clones made afterwards).
    pub fn with_send_limit(mut self, bytes_per_sec: u64) -> Conn {
        self.send_limit = Some(Arc::new(SendLimit::new(bytes_per_sec)));
        self
    }

    /// The cap on what this connection sends, in bytes per second, if any.
    pub fn send_limit(&self) -> Option<u64> {
        self.send_limit.as_ref().map(|l| l.bytes_per_sec())
    }

    /// The verified ID of the peer.
    pub fn peer_id(&self) -> NodeId {
        self.peer
    }

    /// The peer's current address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// Opens a bidirectional stream.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), TransportError> {
        let (s, r) = self.inner.open_bi().await?;
        Ok((self.send_stream(s), RecvStream::new(r)))
    }

    /// Waits for the peer to open a bidirectional stream.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), TransportError> {
        let (s, r) = self.inner.accept_bi().await?;
        Ok((self.send_stream(s), RecvStream::new(r)))
    }

    fn send_stream(&self, inner: quinn::SendStream) -> SendStream {
        SendStream {
            inner,
            limit: self.send_limit.clone(),
        }
    }

    /// Closes the connection, telling the peer why.
    pub fn close(&self, code: u32, reason: &str) {
        self.closed_by_us
            .lock()
            .expect("no panic while holding the lock")
            .get_or_insert_with(|| (code, reason.to_owned()));
        self.inner.close(code.into(), reason.as_bytes());
    }

    /// The code and reason we first closed the connection with, if we closed it (a stream
    /// operation on it then fails with a local close that does not say why).
    pub fn closed_by_us(&self) -> Option<(u32, String)> {
        self.closed_by_us
            .lock()
            .expect("no panic while holding the lock")
            .clone()
    }

    /// Resolves when the connection ends, with the reason.
    pub async fn closed(&self) -> TransportError {
        self.inner.closed().await.into()
    }

    /// Bytes that crossed the network on this connection so far.
    pub fn stats(&self) -> ConnStats {
        let s = self.inner.stats();
        ConnStats {
            tx_bytes: s.udp_tx.bytes,
            rx_bytes: s.udp_rx.bytes,
            tx_datagrams: s.udp_tx.datagrams,
            mtu: s.path.current_mtu,
            lost_packets: s.path.lost_packets,
            black_holes: s.path.black_holes_detected,
        }
    }
}

/// The sending half of a stream.
#[derive(Debug)]
pub struct SendStream {
    inner: quinn::SendStream,
    /// The connection's cap, shared with its other streams.
    limit: Option<Arc<SendLimit>>,
}

/// The receiving half of a stream.
///
/// [`RecvStream::recv`] is cancel-safe: a frame read in part when its future is dropped (the
/// other branch of a `select!` won) stays in `pending`, and the next call carries on from there.
#[derive(Debug)]
pub struct RecvStream {
    inner: quinn::RecvStream,
    /// The bytes of the frame being read so far; never more than that one frame.
    pending: Vec<u8>,
}

impl RecvStream {
    fn new(inner: quinn::RecvStream) -> RecvStream {
        RecvStream {
            inner,
            pending: Vec::new(),
        }
    }
}

impl SendStream {
    /// Sends `msg` as one frame; refuses a message over `limit` (the receiver's limit).
    pub async fn send<T: Serialize>(
        &mut self,
        msg: &T,
        limit: usize,
    ) -> Result<(), TransportError> {
        let frame = syncd_proto::encode_frame(msg, limit)?;
        self.write_all(&frame).await
    }

    /// Writes raw bytes (the hello, chunk payloads).
    pub async fn write_all(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        let Some(limit) = &self.limit else {
            return Ok(self.inner.write_all(bytes).await?);
        };
        for piece in bytes.chunks(limit.piece()) {
            limit.take(piece.len()).await;
            self.inner.write_all(piece).await?;
        }
        Ok(())
    }

    /// Writes an owned buffer without copying it.
    pub async fn write_bytes(&mut self, mut bytes: bytes::Bytes) -> Result<(), TransportError> {
        let Some(limit) = &self.limit else {
            return Ok(self.inner.write_chunk(bytes).await?);
        };
        while !bytes.is_empty() {
            let piece = bytes.split_to(bytes.len().min(limit.piece()));
            limit.take(piece.len()).await;
            self.inner.write_chunk(piece).await?;
        }
        Ok(())
    }

    /// Ends the stream cleanly.
    pub fn finish(&mut self) {
        let _ = self.inner.finish();
    }

    /// Ends the stream and waits, at most `limit`, until the peer has acknowledged all of it.
    ///
    /// Call this before [`Conn::close`] when the stream was just written to: quinn 0.11 holds
    /// a closing connection's CONNECTION_CLOSE behind congestion control while stream data is
    /// still unsent (quinn-rs/quinn#2785, fixed after 0.11.19), so a close right after a write
    /// into a full window may never leave, and the peer then learns only "reset by peer".
    pub async fn finish_and_flush(&mut self, limit: Duration) {
        let _ = self.inner.finish();
        let _ = tokio::time::timeout(limit, self.inner.stopped()).await;
    }

    /// Abandons the stream.
    pub fn reset(&mut self, code: u32) {
        let _ = self.inner.reset(code.into());
    }
}

impl RecvStream {
    /// Receives one frame of at most `limit` bytes and decodes it. `None` when the peer ended
    /// the stream cleanly between frames.
    pub async fn recv<T: DeserializeOwned>(
        &mut self,
        limit: usize,
    ) -> Result<Option<T>, TransportError> {
        // Read exactly what the current frame still needs, so the stream's position only ever
        // moves together with `pending`: each read either completes (its bytes are kept) or is
        // dropped before taking any (quinn's `read_chunk` is cancel-safe).
        loop {
            let want = if self.pending.len() < FRAME_HEADER_LEN {
                FRAME_HEADER_LEN
            } else {
                let header: [u8; FRAME_HEADER_LEN] = self.pending[..FRAME_HEADER_LEN]
                    .try_into()
                    .expect("a whole header");
                let want = FRAME_HEADER_LEN + syncd_proto::frame_len(header, limit)?;
                if self.pending.len() == want {
                    let frame = std::mem::take(&mut self.pending);
                    return Ok(Some(syncd_proto::decode(&frame[FRAME_HEADER_LEN..])?));
                }
                want
            };
            match self
                .inner
                .read_chunk(want - self.pending.len(), true)
                .await?
            {
                Some(chunk) => {
                    if self.pending.capacity() < want {
                        self.pending.reserve_exact(want - self.pending.len());
                    }
                    self.pending.extend_from_slice(&chunk.bytes);
                }
                None if self.pending.is_empty() => return Ok(None),
                None => return Err(TransportError::UnexpectedEnd),
            }
        }
    }

    /// Like [`RecvStream::recv`], but a clean end of stream is an error.
    pub async fn expect<T: DeserializeOwned>(&mut self, limit: usize) -> Result<T, TransportError> {
        self.recv(limit).await?.ok_or(TransportError::UnexpectedEnd)
    }

    /// Reads exactly `buf.len()` raw bytes. Not cancel-safe: use it only where nothing else
    /// races it, and never between the pieces of a frame.
    pub async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        debug_assert!(self.pending.is_empty(), "raw read inside a frame");
        Ok(self.inner.read_exact(buf).await?)
    }

    /// Tells the peer to stop sending on this stream.
    pub fn stop(&mut self, code: u32) {
        let _ = self.inner.stop(code.into());
    }
}
