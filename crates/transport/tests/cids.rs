//! Real QUIC on loopback: an agent's connection IDs are empty, so the manager's packets to it
//! carry none, and a client endpoint holds one connection at a time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use syncd_transport::{Endpoint, Identity, TransportError, install_crypto_provider};
use tokio::net::UdpSocket;

fn identity() -> (tempfile::TempDir, Identity) {
    let dir = tempfile::tempdir().unwrap();
    let id = Identity::create(dir.path()).unwrap();
    (dir, id)
}

fn server(manager: &Identity, agent: &Identity) -> Endpoint {
    let allowed: HashMap<_, _> = [(agent.id(), "agent".to_owned())].into_iter().collect();
    Endpoint::server(manager, allowed, "127.0.0.1:0".parse().unwrap()).unwrap()
}

/// A UDP relay between one client and `server`: returns the address clients send to and the
/// first byte and destination connection ID length of every long-header packet the server
/// sent back (the length is written in those headers; short headers leave it implicit).
async fn relay(server: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<(u8, u8)>>>) {
    let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(server).await.unwrap();
    let addr = front.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        let (mut up, mut down) = (vec![0u8; 65_536], vec![0u8; 65_536]);
        let mut client = None;
        loop {
            tokio::select! {
                r = front.recv_from(&mut up) => {
                    let (n, from) = r.unwrap();
                    client = Some(from);
                    let _ = back.send(&up[..n]).await;
                }
                r = back.recv(&mut down) => {
                    let n = r.unwrap();
                    if down[0] & 0x80 != 0 && n > 5 {
                        log.lock().unwrap().push((down[0], down[5]));
                    }
                    if let Some(c) = client {
                        let _ = front.send_to(&down[..n], c).await;
                    }
                }
            }
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn the_managers_packets_to_an_agent_carry_no_connection_id() {
    install_crypto_provider();
    let (_d1, manager) = identity();
    let (_d2, agent) = identity();
    let ep = server(&manager, &agent);
    let (addr, seen) = relay(ep.local_addr().unwrap()).await;
    const LEN: usize = 1 << 20;
    let srv = tokio::spawn(async move {
        let conn = ep.accept().await.unwrap().accept().await.unwrap();
        let (mut tx, mut rx) = conn.accept_bi().await.unwrap();
        let mut buf = vec![0u8; LEN];
        rx.read_exact(&mut buf).await.unwrap();
        // Back through short-header packets, which the agent finds by the manager's address.
        tx.write_all(&buf).await.unwrap();
        tx.finish();
        conn.closed().await;
    });
    let client = Endpoint::client(&agent, addr).unwrap();
    let conn = client.connect(&agent, addr, manager.id()).await.unwrap();
    let (mut tx, mut rx) = conn.open_bi().await.unwrap();
    let sent: Vec<u8> = (0..LEN).map(|i| (i * 7 % 251) as u8).collect();
    tx.write_all(&sent).await.unwrap();
    let mut back = vec![0u8; LEN];
    tokio::time::timeout(Duration::from_secs(20), rx.read_exact(&mut back))
        .await
        .expect("the echo arrives")
        .unwrap();
    assert!(back == sent, "the echo is what was sent");
    conn.close(0, "done");
    let _ = tokio::time::timeout(Duration::from_secs(5), srv).await;
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the handshake went through the relay");
    for (first, dcid_len) in seen {
        assert_eq!(
            dcid_len, 0,
            "long-header packet {first:#04x} to the agent names a connection ID of {dcid_len} bytes"
        );
    }
}

#[tokio::test]
async fn a_client_endpoint_holds_one_connection_at_a_time() {
    install_crypto_provider();
    let (_d1, manager) = identity();
    let (_d2, agent) = identity();
    let ep = server(&manager, &agent);
    let addr = ep.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        // Echo a frame on each stream of each connection.
        while let Some(incoming) = ep.accept().await {
            let conn = incoming.accept().await.unwrap();
            tokio::spawn(async move {
                while let Ok((mut tx, mut rx)) = conn.accept_bi().await {
                    let n: u32 = rx.expect(16).await.unwrap();
                    tx.send(&n, 16).await.unwrap();
                    tx.finish();
                }
            });
        }
    });
    async fn echo(conn: &syncd_transport::Conn, n: u32) -> u32 {
        let (mut tx, mut rx) = conn.open_bi().await.unwrap();
        tx.send(&n, 16).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.expect::<u32>(16))
            .await
            .expect("the echo arrives")
            .unwrap()
    }
    let client = Endpoint::client(&agent, addr).unwrap();
    let first = client.connect(&agent, addr, manager.id()).await.unwrap();
    assert_eq!(echo(&first, 1).await, 1);
    match client.connect(&agent, addr, manager.id()).await {
        Err(TransportError::Connect(why)) => assert!(why.contains("one at a time"), "{why}"),
        Err(e) => panic!("a second connection is refused as such, not with {e}"),
        Ok(_) => panic!("a second connection on the same client endpoint is refused"),
    }
    // While the first one closes, a new endpoint connects at once...
    first.close(0, "reconnecting");
    drop(first);
    let other = Endpoint::client(&agent, addr).unwrap();
    let second = other.connect(&agent, addr, manager.id()).await.unwrap();
    assert_eq!(echo(&second, 2).await, 2);
    // ...and the old endpoint connects again once its connection is gone.
    tokio::time::timeout(Duration::from_secs(10), client.wait_idle())
        .await
        .expect("the close completes");
    assert!(!client.has_connections());
    let third = client.connect(&agent, addr, manager.id()).await.unwrap();
    assert_eq!(echo(&third, 3).await, 3);
    assert_eq!(
        echo(&second, 4).await,
        4,
        "the other endpoint's connection still works"
    );
    srv.abort();
}
