//! Real QUIC on loopback: only pinned identities connect.

use std::collections::HashMap;
use std::time::Duration;

use syncd_transport::{Endpoint, Identity, TransportError, install_crypto_provider};

fn identity() -> (tempfile::TempDir, Identity) {
    let dir = tempfile::tempdir().unwrap();
    let id = Identity::create(dir.path()).unwrap();
    (dir, id)
}

async fn server(manager: &Identity, allowed: &[&Identity]) -> Endpoint {
    let allowed: HashMap<_, _> = allowed
        .iter()
        .map(|i| (i.id(), "agent".to_owned()))
        .collect();
    Endpoint::server(manager, allowed, "127.0.0.1:0".parse().unwrap()).unwrap()
}

/// Connects as `agent` and uses the connection once. TLS 1.3: the client finishes its side
/// before the server checks its certificate, so a refusal shows up on the first use.
async fn first_use(
    agent: &Identity,
    addr: std::net::SocketAddr,
    manager: syncd_transport::NodeId,
) -> Result<(), TransportError> {
    let client = Endpoint::client(agent, addr).unwrap();
    let conn = client.connect(agent, addr, manager).await?;
    let (mut tx, mut rx) = conn.open_bi().await?;
    let _ = tx.send(&1u8, 16).await;
    tokio::time::timeout(Duration::from_secs(5), rx.recv::<u8>(16))
        .await
        .expect("refusal arrives promptly")
        .map(|_| ())
}

#[tokio::test]
async fn a_listed_agent_and_the_right_manager_connect_and_exchange_frames() {
    install_crypto_provider();
    let (_d1, manager) = identity();
    let (_d2, agent) = identity();
    let ep = server(&manager, &[&agent]).await;
    let addr = ep.local_addr().unwrap();
    let manager_id = manager.id();
    let agent_id = agent.id();
    let srv = tokio::spawn(async move {
        let conn = ep.accept().await.unwrap().accept().await.unwrap();
        assert_eq!(conn.peer_id(), agent_id);
        let (mut tx, mut rx) = conn.accept_bi().await.unwrap();
        let msg: String = rx.expect(1024).await.unwrap();
        tx.send(&format!("echo {msg}"), 1024).await.unwrap();
        tx.finish();
        conn.closed().await;
    });
    let client = Endpoint::client(&agent, addr).unwrap();
    let conn = client.connect(&agent, addr, manager_id).await.unwrap();
    assert_eq!(conn.peer_id(), manager_id);
    let (mut tx, mut rx) = conn.open_bi().await.unwrap();
    tx.send(&"hi".to_owned(), 1024).await.unwrap();
    let reply: String = rx.expect(1024).await.unwrap();
    assert_eq!(reply, "echo hi");
    assert!(rx.recv::<String>(1024).await.unwrap().is_none());
    assert!(conn.stats().tx_bytes > 0);
    conn.close(0, "done");
    srv.await.unwrap();
}

#[tokio::test]
async fn an_unknown_agent_is_refused_during_the_handshake() {
    install_crypto_provider();
    let (_d1, manager) = identity();
    let (_d2, listed) = identity();
    let (_d3, stranger) = identity();
    let ep = server(&manager, &[&listed]).await;
    let addr = ep.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let incoming = ep.accept().await.unwrap();
        incoming.accept().await.map(|_| ())
    });
    let outcome = first_use(&stranger, addr, manager.id()).await;
    assert!(
        outcome.is_err(),
        "stranger must not get a working connection"
    );
    let server_side = srv.await.unwrap();
    assert!(server_side.is_err(), "server must refuse the handshake");
}

#[tokio::test]
async fn an_agent_refuses_a_manager_with_another_id() {
    install_crypto_provider();
    let (_d1, impostor) = identity();
    let (_d2, real_manager) = identity();
    let (_d3, agent) = identity();
    let ep = server(&impostor, &[&agent]).await;
    let addr = ep.local_addr().unwrap();
    tokio::spawn(async move {
        if let Some(i) = ep.accept().await {
            let _ = i.accept().await;
        }
    });
    let client = Endpoint::client(&agent, addr).unwrap();
    let err = client
        .connect(&agent, addr, real_manager.id())
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Connect(_)), "{err}");
}

/// An identity whose certificate lapsed in 2020 but whose key is pinned.
fn expired_identity() -> (tempfile::TempDir, Identity) {
    let dir = tempfile::tempdir().unwrap();
    let id = Identity::create_valid_between(dir.path(), (2019, 1, 1), (2020, 1, 1)).unwrap();
    (dir, id)
}

#[tokio::test]
async fn a_listed_agent_with_an_expired_certificate_is_refused() {
    install_crypto_provider();
    let (_d1, manager) = identity();
    let (_d2, agent) = expired_identity();
    let ep = server(&manager, &[&agent]).await;
    let addr = ep.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let incoming = ep.accept().await.unwrap();
        incoming.accept().await.map(|_| ())
    });
    let outcome = first_use(&agent, addr, manager.id()).await;
    assert!(
        outcome.is_err(),
        "an expired agent must not get a working connection"
    );
    let err = srv
        .await
        .unwrap()
        .expect_err("server must refuse the handshake");
    assert!(err.to_string().contains("Expired"), "{err}");
}

#[tokio::test]
async fn an_agent_refuses_its_manager_with_an_expired_certificate() {
    install_crypto_provider();
    let (_d1, manager) = expired_identity();
    let (_d2, agent) = identity();
    let ep = server(&manager, &[&agent]).await;
    let addr = ep.local_addr().unwrap();
    tokio::spawn(async move {
        if let Some(i) = ep.accept().await {
            let _ = i.accept().await;
        }
    });
    let client = Endpoint::client(&agent, addr).unwrap();
    let err = client
        .connect(&agent, addr, manager.id())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Expired"), "{err}");
}

#[test]
fn an_expired_or_future_identity_does_not_load() {
    let (dir, _) = expired_identity();
    let err = Identity::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("expired on 2020-01-01 00:00:00 UTC"), "{err}");
    let future = tempfile::tempdir().unwrap();
    Identity::create_valid_between(future.path(), (2999, 1, 1), (3000, 1, 1)).unwrap();
    let err = Identity::load(future.path()).unwrap_err().to_string();
    assert!(err.contains("valid only from 2999-01-01"), "{err}");
}
