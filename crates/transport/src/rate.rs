//! A cap on the bytes a connection sends per second, shared by all its streams.
//!
//! The operator's protection of a slow link (a disaster-recovery site behind a WAN): what the
//! manager writes into an agent's connection, on every stream, is paced so that over any second
//! it stays at the cap. QUIC's own headers, acknowledgements and retransmissions come on top
//! (0.5-3% measured on loopback).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A write is paced in pieces of a fiftieth of a second's worth, between these sizes: a large
/// write (a 1 MiB chunk) goes out at the cap's pace rather than as one burst and a silence, and
/// a small message never waits behind more than a few pieces of other streams.
const PIECE_MIN: usize = 4 * 1024;
const PIECE_MAX: usize = 64 * 1024;

/// How much sending the cap lets through at once after a quiet time: a twentieth of a second's
/// worth, and at least one piece.
const BURST: Duration = Duration::from_millis(50);

/// A byte rate shared by the streams of one connection (virtual scheduling: each write reserves
/// its bytes in order and waits until the cap has earned them, so concurrent streams share the
/// rate in the order they asked).
#[derive(Debug)]
pub struct SendLimit {
    bytes_per_sec: u64,
    piece: usize,
    burst: f64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes that may be sent now; negative when writes have reserved more than was earned.
    credit: f64,
    at: Instant,
}

impl SendLimit {
    /// A cap of `bytes_per_sec` (at least 1).
    pub fn new(bytes_per_sec: u64) -> SendLimit {
        let bytes_per_sec = bytes_per_sec.max(1);
        let piece = usize::try_from(bytes_per_sec / 50)
            .unwrap_or(PIECE_MAX)
            .clamp(PIECE_MIN, PIECE_MAX);
        let burst = (bytes_per_sec as f64 * BURST.as_secs_f64()).max(piece as f64);
        SendLimit {
            bytes_per_sec,
            piece,
            burst,
            bucket: Mutex::new(Bucket {
                credit: burst,
                at: Instant::now(),
            }),
        }
    }

    /// The cap, in bytes per second.
    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    /// The size of the pieces a write is paced in.
    pub(crate) fn piece(&self) -> usize {
        self.piece
    }

    /// Reserves `n` bytes; returns how long to wait before sending them.
    fn reserve(&self, n: usize) -> Duration {
        let mut b = self.bucket.lock().expect("no panic while holding the lock");
        let now = Instant::now();
        let earned = now.duration_since(b.at).as_secs_f64() * self.bytes_per_sec as f64;
        b.credit = (b.credit + earned).min(self.burst) - n as f64;
        b.at = now;
        if b.credit >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.credit / self.bytes_per_sec as f64)
        }
    }

    /// Waits until `n` more bytes may be sent. A wait that is cancelled keeps its reservation
    /// (the cap then errs on the slow side).
    pub(crate) async fn take(&self, n: usize) {
        let wait = self.reserve(n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Time here is tokio's paused clock: only the limiter's own sleeps move it.
    const PIECE: usize = 64 * 1024;

    #[test]
    fn pieces_are_a_fiftieth_of_a_second_within_bounds() {
        assert_eq!(SendLimit::new(10_000).piece(), 4 * 1024);
        assert_eq!(SendLimit::new(1_000_000).piece(), 20_000);
        assert_eq!(SendLimit::new(1_000_000_000).piece(), 64 * 1024);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_send_takes_its_bytes_over_the_rate() {
        let limit = SendLimit::new(1_000_000);
        let start = Instant::now();
        for _ in 0..100 {
            limit.take(PIECE).await;
        }
        let took = start.elapsed().as_secs_f64();
        // 6,553,600 bytes, less the first burst (50 ms at 1 MB/s).
        let expected = (100.0 * PIECE as f64 - 50_000.0) / 1_000_000.0;
        assert!(
            (took - expected).abs() < 0.001,
            "took {took} s, expected {expected} s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn streams_share_the_rate() {
        let limit = std::sync::Arc::new(SendLimit::new(2_000_000));
        let start = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let limit = std::sync::Arc::clone(&limit);
                tokio::spawn(async move {
                    for _ in 0..40 {
                        limit.take(PIECE).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let took = start.elapsed().as_secs_f64();
        // 160 pieces at 2 MB/s, less the first burst (100,000 bytes).
        let expected = (160.0 * PIECE as f64 - 100_000.0) / 2_000_000.0;
        assert!(
            (took - expected).abs() < 0.01,
            "took {took} s, expected {expected} s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_time_earns_one_burst_not_more() {
        let limit = SendLimit::new(1_000_000);
        limit.take(PIECE).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        let start = Instant::now();
        // A minute of silence earns one burst (50 ms at 1 MB/s), not a minute's worth.
        for _ in 0..11 {
            limit.take(PIECE).await;
        }
        let took = start.elapsed().as_secs_f64();
        let expected = (11.0 * PIECE as f64 - 50_000.0) / 1_000_000.0;
        assert!(
            (took - expected).abs() < 0.001,
            "took {took} s, expected {expected} s"
        );
    }
}
