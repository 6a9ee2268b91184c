//! `bench-quic`: QUIC throughput on loopback through syncd's own transport (pinned-identity
//! TLS 1.3, the daemons' endpoint and transport settings), over one stream and several, with
//! path MTU discovery bounded at quinn's default (1,452 bytes, syncd's too) and higher. Each
//! configuration runs in a process of its own (the bound is per process); configurations are
//! interleaved and repeated, and the median is reported.
//!
//!   cargo build --release -p syncd-devtools
//!   target/release/bench-quic                # 1 GiB per run, 3 repetitions
//!
//! `--rates 1000000,50000000` also measures the `max_rate` cap (what the manager sends one agent):
//! three seconds' worth at each rate over four streams, and what actually went.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use syncd_transport::{ConnStats, DEFAULT_MAX_UDP_PAYLOAD, Endpoint, Identity};

#[derive(Parser, Debug)]
#[command(
    about = "QUIC throughput on loopback through syncd's transport, by streams and MTU bound"
)]
struct Args {
    /// MiB sent per run (split evenly across the streams).
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Stream counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    streams: Vec<usize>,
    /// Bounds on the UDP payload (path MTU discovery) to measure.
    #[arg(long, value_delimiter = ',', default_value = "1452,6500")]
    payloads: Vec<u16>,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Send caps to measure (bytes per second, as `max_rate` sets them); none by default.
    #[arg(long, value_delimiter = ',')]
    rates: Vec<u64>,
    /// Run one configuration and print its figures (used by the parent process).
    #[arg(long, hide = true)]
    child: bool,
}

/// A configuration measured: (payload bound, streams).
type Config = (u16, usize);
/// One run's figures: seconds, datagrams sent, path MTU reached, packets lost, black holes.
type Run = (f64, u64, u64, u64, u64);

fn main() -> Result<()> {
    let args = Args::parse();
    if args.child {
        // `RUST_LOG=quinn_proto=trace` shows, for one configuration, what quinn decides.
        if std::env::var_os("RUST_LOG").is_some() {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_writer(std::io::stderr)
                .init();
        }
        let (streams, payload) = (args.streams[0], args.payloads[0]);
        let rt = tokio::runtime::Runtime::new()?;
        let (secs, stats) = rt.block_on(run(args.mib, streams, payload))?;
        println!(
            "{secs} {} {} {} {}",
            stats.tx_datagrams, stats.mtu, stats.lost_packets, stats.black_holes
        );
        return Ok(());
    }
    println!(
        "# bench-quic: {} MiB per run, {} repetitions; machine: {} cores, Linux {}",
        args.mib,
        args.reps,
        syncd_devtools::bench::cores(),
        syncd_devtools::bench::kernel()
    );
    let exe = std::env::current_exe()?;
    let mut results: Vec<(Config, Vec<Run>)> = Vec::new();
    for &p in &args.payloads {
        for &s in &args.streams {
            results.push(((p, s), Vec::new()));
        }
    }
    for _ in 0..args.reps {
        for ((p, s), runs) in results.iter_mut() {
            let out = Command::new(&exe)
                .args(["--child", "--mib", &args.mib.to_string()])
                .args(["--streams", &s.to_string(), "--payloads", &p.to_string()])
                .output()?;
            if !out.status.success() {
                bail!(
                    "child failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let text = String::from_utf8(out.stdout)?;
            let f: Vec<&str> = text.split_whitespace().collect();
            let parse = |i: usize| -> Result<f64> {
                f.get(i)
                    .context("short child output")?
                    .parse::<f64>()
                    .map_err(Into::into)
            };
            runs.push((
                parse(0)?,
                parse(1)? as u64,
                parse(2)? as u64,
                parse(3)? as u64,
                parse(4)? as u64,
            ));
        }
    }
    println!();
    println!(
        "| MTU bound | streams | throughput | datagrams sent | path MTU reached | packets lost | black holes |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for ((p, s), runs) in &mut results {
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (secs, datagrams, mtu, lost, holes) = runs[runs.len() / 2];
        let gib = args.mib as f64 / 1024.0 / secs;
        println!("| {p} | {s} | {gib:.2} GiB/s | {datagrams} | {mtu} | {lost} | {holes} |");
    }
    let rt = tokio::runtime::Runtime::new()?;
    let mut times = rt.block_on(replies_after_idle(20))?;
    times.sort();
    println!();
    println!(
        "Replies of {} KB on a connection idle for 200 ms before each (a fetch after a quiet spell), 20 runs:",
        REPLY / 1000
    );
    println!();
    println!("| median | slowest |");
    println!("| --- | --- |");
    println!(
        "| {:.1} ms | {:.1} ms |",
        times[times.len() / 2].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3
    );
    if !args.rates.is_empty() {
        println!();
        println!(
            "Send caps (`max_rate`): three seconds' worth over four streams, 6,500-byte bound:"
        );
        println!();
        println!(
            "| cap | sent | seconds | payload rate | payload ÷ cap | on the wire (UDP payload) ÷ cap |"
        );
        println!("| --- | --- | --- | --- | --- | --- |");
        for &rate in &args.rates {
            let bytes = (rate * 3).max(1 << 20);
            let (secs, stats) =
                rt.block_on(transfer(bytes, 4, DEFAULT_MAX_UDP_PAYLOAD, Some(rate)))?;
            let got = bytes as f64 / secs;
            println!(
                "| {:.1} MB/s | {:.1} MB | {secs:.2} | {:.2} MB/s | {:.3} | {:.3} |",
                rate as f64 / 1e6,
                bytes as f64 / 1e6,
                got / 1e6,
                got / rate as f64,
                stats.tx_bytes as f64 / secs / rate as f64
            );
        }
    }
    Ok(())
}

/// The client half of a [`loopback`] pair.
struct Client {
    endpoint: Endpoint,
    id: Identity,
    server: std::net::SocketAddr,
    server_id: syncd_transport::NodeId,
}

/// A server endpoint on loopback and a client that may connect to it, with fresh identities
/// (kept in the returned directory).
fn loopback() -> Result<(tempfile::TempDir, Endpoint, Client)> {
    syncd_transport::install_crypto_provider();
    let dir = tempfile::tempdir()?;
    let server_id = Identity::create(&dir.path().join("server"))?;
    let client_id = Identity::create(&dir.path().join("client"))?;
    let allowed = [(client_id.id(), "client".to_owned())]
        .into_iter()
        .collect();
    let server = Endpoint::server(&server_id, allowed, "127.0.0.1:0".parse()?)?;
    let addr = server.local_addr()?;
    let client = Client {
        endpoint: Endpoint::client(&client_id, addr)?,
        id: client_id,
        server: addr,
        server_id: server_id.id(),
    };
    Ok((dir, server, client))
}

/// The next connection to `server`, handshake done.
async fn accept(server: &Endpoint) -> Result<syncd_transport::Conn> {
    Ok(server
        .accept()
        .await
        .context("no connection")?
        .accept()
        .await?)
}

impl Client {
    async fn connect(&self) -> Result<syncd_transport::Conn> {
        Ok(self
            .endpoint
            .connect(&self.id, self.server, self.server_id)
            .await?)
    }
}

/// The size of a reply in [`replies_after_idle`]: one archive chunk changed by an edit.
const REPLY: usize = 73_000;

/// Times `n` request/reply exchanges of [`REPLY`] bytes on one connection, each after 200 ms of
/// silence: from opening the stream to the last byte read.
async fn replies_after_idle(n: usize) -> Result<Vec<std::time::Duration>> {
    let (_dir, server, client) = loopback()?;
    let replier = tokio::spawn(async move {
        let conn = accept(&server).await?;
        let reply = bytes::Bytes::from(vec![0x3cu8; REPLY]);
        while let Ok((mut tx, mut rx)) = conn.accept_bi().await {
            let mut ask = [0u8; 1];
            rx.read_exact(&mut ask).await?;
            tx.write_bytes(reply.clone()).await?;
            tx.finish();
            // Keep the stream until the client has read it all.
            tokio::spawn(async move {
                let _ = rx.read_exact(&mut ask).await;
                drop(tx);
            });
        }
        anyhow::Ok(())
    });
    let conn = client.connect().await?;
    let mut times = Vec::with_capacity(n);
    let mut buf = vec![0u8; REPLY];
    for _ in 0..n {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let t0 = Instant::now();
        let (mut tx, mut rx) = conn.open_bi().await?;
        tx.write_all(b"?").await?;
        rx.read_exact(&mut buf).await?;
        times.push(t0.elapsed());
        tx.finish();
    }
    conn.close(0, "done");
    replier.abort();
    Ok(times)
}

/// Sends `mib` MiB from a client to a server over `streams` streams; returns the seconds from
/// the first byte written to the last byte read, and the sender's connection figures.
async fn run(mib: u64, streams: usize, payload: u16) -> Result<(f64, ConnStats)> {
    transfer(mib << 20, streams, payload, None).await
}

/// Sends `bytes` over `streams` streams, the connection capped at `rate` bytes per second if
/// given; figures as [`run`]'s.
async fn transfer(
    bytes: u64,
    streams: usize,
    payload: u16,
    rate: Option<u64>,
) -> Result<(f64, ConnStats)> {
    syncd_transport::set_max_udp_payload(payload);
    let (_dir, server, client) = loopback()?;
    let per_stream = bytes / streams as u64;
    let receiver = tokio::spawn(async move {
        let conn = accept(&server).await?;
        let mut tasks = Vec::new();
        for _ in 0..streams {
            let (_tx, mut rx) = conn.accept_bi().await?;
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 20];
                let mut left = per_stream;
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    rx.read_exact(&mut buf[..n]).await?;
                    left -= n as u64;
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        anyhow::Ok(Instant::now())
    });
    let mut conn = client.connect().await?;
    if let Some(rate) = rate {
        conn = conn.with_send_limit(rate);
    }
    let block = bytes::Bytes::from(vec![0x5au8; 1 << 20]);
    let start = Instant::now();
    let mut senders = Vec::new();
    for _ in 0..streams {
        let (mut tx, _rx) = conn.open_bi().await?;
        let block = block.clone();
        senders.push(tokio::spawn(async move {
            let mut left = per_stream;
            while left > 0 {
                let n = left.min(block.len() as u64) as usize;
                tx.write_bytes(block.slice(..n)).await?;
                left -= n as u64;
            }
            tx.finish();
            anyhow::Ok(tx)
        }));
    }
    let mut keep = Vec::new();
    for s in senders {
        keep.push(s.await??);
    }
    let done = receiver.await??;
    let stats = conn.stats();
    conn.close(0, "done");
    Ok(((done - start).as_secs_f64(), stats))
}
