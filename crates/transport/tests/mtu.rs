//! Real QUIC on loopback: path MTU discovery reaches the configured bound and keeps it under a
//! bulk transfer.
//!
//! Loopback carries 64 KiB packets, so the only limit is ours. quinn sends up to 10 packets in
//! one segmentation-offload write and Linux refuses such a write over 65,507 bytes, which quinn
//! drops in silence: with a bound of 8,952 every full batch vanished, quinn took the path for a
//! black hole and fell back to 1,200 bytes. This test fails if the bound (or a quinn upgrade)
//! brings that back.

use std::collections::HashMap;

use syncd_transport::{DEFAULT_MAX_UDP_PAYLOAD, Endpoint, Identity, install_crypto_provider};

#[tokio::test]
async fn a_bulk_transfer_on_loopback_runs_at_the_bound_without_a_black_hole() {
    install_crypto_provider();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let server_id = Identity::create(dirs[0].path()).unwrap();
    let client_id = Identity::create(dirs[1].path()).unwrap();
    let allowed: HashMap<_, _> = [(client_id.id(), "client".to_owned())].into();
    let ep = Endpoint::server(&server_id, allowed, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = ep.local_addr().unwrap();
    const TOTAL: usize = 64 << 20;
    let receiver = tokio::spawn(async move {
        let conn = ep.accept().await.unwrap().accept().await.unwrap();
        let (_tx, mut rx) = conn.accept_bi().await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..TOTAL / buf.len() {
            rx.read_exact(&mut buf).await.unwrap();
        }
        conn
    });
    let client = Endpoint::client(&client_id, addr).unwrap();
    let conn = client
        .connect(&client_id, addr, server_id.id())
        .await
        .unwrap();
    let (mut tx, _rx) = conn.open_bi().await.unwrap();
    let block = bytes::Bytes::from(vec![0xa5u8; 1 << 20]);
    for _ in 0..TOTAL / block.len() {
        tx.write_bytes(block.clone()).await.unwrap();
    }
    tx.finish();
    let server_side = receiver.await.unwrap();
    let stats = conn.stats();
    server_side.close(0, "done");
    assert_eq!(
        stats.black_holes, 0,
        "quinn judged loopback a black hole: {stats:?}"
    );
    assert_eq!(
        stats.mtu, DEFAULT_MAX_UDP_PAYLOAD,
        "path MTU discovery did not reach the bound: {stats:?}"
    );
    // Every byte went out in packets of about the bound, not of QUIC's minimum.
    let per_datagram = stats.tx_bytes / stats.tx_datagrams;
    assert!(
        per_datagram > u64::from(DEFAULT_MAX_UDP_PAYLOAD) * 3 / 4,
        "{per_datagram} bytes per datagram: {stats:?}"
    );
}
