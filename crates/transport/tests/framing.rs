//! Real QUIC on loopback: framed messages survive a receiver whose reads are cancelled.

use std::collections::HashMap;
use std::time::Duration;

use syncd_transport::{Endpoint, Identity, install_crypto_provider};

/// A `recv` future dropped in the middle of a frame (the other branch of a `select!` won) must
/// not lose the bytes it read: the next `recv` carries on. Frames here arrive in pieces, with
/// pauses longer than the receiver's timer, so nearly every frame is cut several times.
#[tokio::test]
async fn a_frame_read_in_part_by_a_cancelled_recv_is_completed_by_the_next() {
    install_crypto_provider();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let manager = Identity::create(dirs[0].path()).unwrap();
    let agent = Identity::create(dirs[1].path()).unwrap();
    let allowed: HashMap<_, _> = [(agent.id(), "agent".to_owned())].into();
    let ep = Endpoint::server(&manager, allowed, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = ep.local_addr().unwrap();
    let messages: Vec<String> = (0..20)
        .map(|i| format!("message {i} {}", "x".repeat(i * 900)))
        .collect();
    let expected = messages.clone();
    let sender = tokio::spawn(async move {
        let conn = ep.accept().await.unwrap().accept().await.unwrap();
        let (mut tx, _rx) = conn.accept_bi().await.unwrap();
        for m in &messages {
            let frame = syncd_proto::encode_frame(m, 1 << 20).unwrap();
            // Header in two pieces, then the payload in three.
            let cuts = [
                0,
                2,
                4,
                4 + (frame.len() - 4) / 3,
                4 + 2 * (frame.len() - 4) / 3,
                frame.len(),
            ];
            for w in cuts.windows(2) {
                tx.write_all(&frame[w[0]..w[1]]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        }
        tx.finish();
        conn.closed().await;
    });
    let client = Endpoint::client(&agent, addr).unwrap();
    let conn = client.connect(&agent, addr, manager.id()).await.unwrap();
    let (mut tx, mut rx) = conn.open_bi().await.unwrap();
    // Opening a stream is lazy: write something so the peer sees it.
    tx.write_all(b"!").await.unwrap();
    let mut got = Vec::new();
    let mut cancelled = 0;
    loop {
        tokio::select! {
            m = rx.recv::<String>(1 << 20) => match m.unwrap() {
                Some(m) => got.push(m),
                None => break,
            },
            _ = tokio::time::sleep(Duration::from_millis(5)) => cancelled += 1,
        }
    }
    assert_eq!(got, expected);
    assert!(
        cancelled > 40,
        "the reads were cancelled only {cancelled} times"
    );
    conn.close(0, "done");
    sender.await.unwrap();
}
