//! QUIC endpoints: the manager's server, the agent's client, with pinned identities and UDP
//! buffers sized for bulk transfer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::conn::{Conn, TransportError};
use crate::identity::{Identity, NodeId};
use crate::verify::{PinnedClients, PinnedServer};

/// Socket buffer size requested (the kernel doubles it and clamps to `net.core.rmem_max`).
/// At the kernel default of 208 KiB, about 1% of packets were dropped at full loopback speed.
const UDP_BUFFER: usize = 2 << 20;

/// The congestion controller of every connection this process makes or accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC, loss-based: quinn's default. Throughput collapses on lossy links (about 0.16 MB/s
    /// at 5% loss and 100 ms RTT here).
    Cubic,
    /// BBR, model-based: far better on lossy, long links (about 4 MB/s on the same path), about
    /// 10% slower for bulk transfers on loopback; marked experimental by quinn.
    Bbr,
}

static CONGESTION: std::sync::OnceLock<Congestion> = std::sync::OnceLock::new();

/// Largest UDP payload a connection may grow to by path MTU discovery (RFC 8899, probing up
/// from QUIC's 1,200 bytes; a probe the path drops costs nothing but the probe).
///
/// Per-packet work (header protection, acknowledgements, stream framing, syscalls) is what
/// limits QUIC throughput on these machines, not the encryption of the bytes: on loopback one
/// stream moves 1.05 GiB/s in 1,452-byte packets and 2.69 GiB/s in 6,500-byte ones
/// (`bench-quic`, BENCHMARKS.md). So the bound is above Ethernet's 1,452: a 1,500-byte network
/// stays at 1,452, jumbo frames and loopback get 6,500.
///
/// Why not 8,952 (jumbo frames) or 65,000 (loopback): quinn 0.11 sends up to 10 packets as one
/// segmentation-offload (GSO) write, and Linux refuses a UDP write over 65,507 bytes with
/// EMSGSIZE, which quinn-udp drops in silence (it expects that only of probes). At 8,952 bytes
/// every full batch of 10 (89,520 bytes) vanished: bursts of "lost" packets, quinn judged the
/// path a black hole and fell back to 1,200 bytes, a third slower than 1,452. 10 x 6,500 fits.
pub const DEFAULT_MAX_UDP_PAYLOAD: u16 = 6500;

/// The highest bound that keeps quinn's 10-packet GSO writes within Linux's 65,507-byte UDP
/// limit (see [`DEFAULT_MAX_UDP_PAYLOAD`]).
pub const MAX_UDP_PAYLOAD_LIMIT: u16 = 6550;

static MAX_UDP_PAYLOAD: std::sync::OnceLock<u16> = std::sync::OnceLock::new();

/// Sets the largest UDP payload for the whole process (once, before any endpoint), within
/// QUIC's 1,200 and [`MAX_UDP_PAYLOAD_LIMIT`]; 1,452 is quinn's own default.
pub fn set_max_udp_payload(bytes: u16) {
    let _ = MAX_UDP_PAYLOAD.set(bytes.clamp(1200, MAX_UDP_PAYLOAD_LIMIT));
}

fn max_udp_payload() -> u16 {
    *MAX_UDP_PAYLOAD.get().unwrap_or(&DEFAULT_MAX_UDP_PAYLOAD)
}

fn endpoint_config() -> quinn::EndpointConfig {
    let mut c = quinn::EndpointConfig::default();
    c.max_udp_payload_size(max_udp_payload())
        .expect("the payload bound is clamped to what QUIC allows");
    c
}

/// A client endpoint's configuration: its connection IDs are empty.
///
/// Every packet carries the connection ID its receiver chose: the manager's 8-byte IDs tell its
/// agents' connections apart, but an agent has one connection, so the manager's packets to it
/// (every byte of every file) need none, and its endpoint finds that connection by the
/// manager's address instead (RFC 9000, 5.1). Eight bytes fewer in every 1,466-byte packet on
/// an Ethernet link: a new 5 MB archive crossed in 5.28 MB of frames, 5.25 MB without them,
/// against 5.27 MB for rsync's TCP (BENCHMARKS.md, session 17). The price: quinn routes by
/// address, so a client endpoint must not hold two connections to the same peer at once (a
/// closing one would take the new one's route with it): [`Endpoint::connect`] refuses a second.
fn client_endpoint_config() -> quinn::EndpointConfig {
    let mut c = endpoint_config();
    c.cid_generator(|| Box::new(NoConnectionIds));
    c
}

/// Issues the empty connection ID (quinn does not export its own generator).
struct NoConnectionIds;

impl quinn::ConnectionIdGenerator for NoConnectionIds {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        quinn::ConnectionId::new(&[])
    }

    fn cid_len(&self) -> usize {
        0
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Chooses the congestion controller for the whole process (once, before any endpoint).
pub fn set_congestion(c: Congestion) {
    let _ = CONGESTION.set(c);
}

/// Makes ring the process-wide rustls crypto provider (if another one were compiled in,
/// rustls would panic when asked to choose). Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// ring's provider with AES-128-GCM preferred: TLS 1.3's mandatory suite, as strong as this
/// needs, and with 10 AES rounds instead of 14 it encrypts a packet faster than AES-256-GCM,
/// which rustls would otherwise pick (both ends prefer the same, so it is what is negotiated).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(4)));
    t.max_idle_timeout(Some(
        Duration::from_secs(15)
            .try_into()
            .expect("15 s is a valid idle timeout"),
    ));
    t.max_concurrent_bidi_streams(256u32.into());
    // Before the first RTT sample quinn assumes 333 ms, so an Initial lost (or sent to a manager
    // that is still scanning before it listens) is retried only after about a second. Cluster
    // links are LAN links: assume 100 ms; a longer path costs one spare Initial.
    t.initial_rtt(Duration::from_millis(100));
    if *CONGESTION.get().unwrap_or(&Congestion::Cubic) == Congestion::Bbr {
        t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    }
    t.max_concurrent_uni_streams(0u32.into());
    // A receiver acknowledges every second packet at once, a lone one only after its
    // max_ack_delay (25 ms by default). A fetch reply on a connection that was idle starts with
    // a small congestion window, so the sender soon waits for the acknowledgement of a lone
    // packet: a 73 KB reply took 30 ms instead of 3 (measured on loopback). Asking the peer
    // (ACK frequency extension, both ends are quinn) for 1 ms removes the stall; bulk
    // transfers acknowledge every second packet anyway and ran as fast (`bench-quic`).
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.max_ack_delay(Some(Duration::from_millis(1)));
    t.ack_frequency_config(Some(ack));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(max_udp_payload());
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

/// A QUIC endpoint bound to one UDP socket.
#[derive(Debug, Clone)]
pub struct Endpoint {
    inner: quinn::Endpoint,
}

/// A connection attempt arriving at a server endpoint.
#[derive(Debug)]
pub struct Incoming(quinn::Incoming);

impl Endpoint {
    /// A server on `listen` that accepts only agents whose IDs are keys of `allowed` (the values
    /// are their configured names, for logs).
    pub fn server(
        identity: &Identity,
        allowed: HashMap<NodeId, String>,
        listen: SocketAddr,
    ) -> Result<Endpoint, TransportError> {
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(Arc::new(PinnedClients {
                allowed: Arc::new(allowed),
            }))
            .with_single_cert(identity.cert_chain(), identity.private_key())
            .map_err(tls_err)?;
        tls.alpn_protocols = vec![syncd_proto::ALPN.to_vec()];
        let crypto = QuicServerConfig::try_from(tls).map_err(tls_err)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(transport_config());
        let socket = udp_socket(listen)?;
        let inner = quinn::Endpoint::new(
            endpoint_config(),
            Some(config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| TransportError::Bind {
            addr: listen,
            reason: e.to_string(),
        })?;
        Ok(Endpoint { inner })
    }

    /// A client bound to an ephemeral port of the same address family as `peer`, for one
    /// connection at a time (see [`client_endpoint_config`]): make a new one to connect again
    /// while an earlier connection may still be closing.
    pub fn client(identity: &Identity, peer: SocketAddr) -> Result<Endpoint, TransportError> {
        let bind: SocketAddr = if peer.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let socket = udp_socket(bind)?;
        let mut inner = quinn::Endpoint::new(
            client_endpoint_config(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| TransportError::Bind {
            addr: bind,
            reason: e.to_string(),
        })?;
        inner.set_default_client_config(client_config(identity, NodeId::of_spki(&[]))?);
        Ok(Endpoint { inner })
    }

    /// Connects to `addr`, accepting the peer only if its ID is `expected`. A client endpoint
    /// refuses while an earlier connection of its own is open or closing (see [`Endpoint::client`]).
    pub async fn connect(
        &self,
        identity: &Identity,
        addr: SocketAddr,
        expected: NodeId,
    ) -> Result<Conn, TransportError> {
        if self.has_connections() {
            return Err(TransportError::Connect(
                "this client endpoint still holds a connection (one at a time: connect again from a new endpoint)".into(),
            ));
        }
        let config = client_config(identity, expected)?;
        let connecting = self
            .inner
            .connect_with(config, addr, "syncd")
            .map_err(|e| TransportError::Connect(e.to_string()))?;
        let conn = connecting
            .await
            .map_err(|e| TransportError::Connect(e.to_string()))?;
        Conn::new(conn)
    }

    /// Whether a connection of this endpoint is open or still closing.
    pub fn has_connections(&self) -> bool {
        self.inner.open_connections() > 0
    }

    /// The next incoming connection attempt; `None` once the endpoint is closed.
    pub async fn accept(&self) -> Option<Incoming> {
        self.inner.accept().await.map(Incoming)
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Closes every connection with `reason` and stops accepting.
    pub fn close(&self, code: u32, reason: &str) {
        self.inner.close(code.into(), reason.as_bytes());
    }

    /// Waits until every connection's close has been delivered (or timed out).
    pub async fn wait_idle(&self) {
        self.inner.wait_idle().await;
    }
}

impl Incoming {
    /// The address the attempt comes from.
    pub fn remote_addr(&self) -> SocketAddr {
        self.0.remote_address()
    }

    /// Completes the handshake (identity checks included).
    pub async fn accept(self) -> Result<Conn, TransportError> {
        let conn = self
            .0
            .await
            .map_err(|e| TransportError::Connect(e.to_string()))?;
        Conn::new(conn)
    }
}

fn client_config(
    identity: &Identity,
    expected: NodeId,
) -> Result<quinn::ClientConfig, TransportError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer { expected }))
        .with_client_auth_cert(identity.cert_chain(), identity.private_key())
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![syncd_proto::ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(tls_err)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config());
    Ok(config)
}

fn tls_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(e.to_string())
}

fn udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, TransportError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind_err = |e: std::io::Error| TransportError::Bind {
        addr,
        reason: e.to_string(),
    };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(bind_err)?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    let rcv = socket.recv_buffer_size().unwrap_or(0);
    let snd = socket.send_buffer_size().unwrap_or(0);
    // An agent binds a new socket when it reconnects while its last connection closes: say it
    // once.
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if rcv < UDP_BUFFER && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            requested = UDP_BUFFER,
            granted = rcv,
            "UDP receive buffer smaller than requested; raise net.core.rmem_max to avoid packet loss at high throughput"
        );
    } else if rcv >= UDP_BUFFER {
        tracing::debug!(rcv, snd, "UDP socket buffers");
    }
    socket.bind(&addr.into()).map_err(bind_err)?;
    Ok(socket.into())
}
