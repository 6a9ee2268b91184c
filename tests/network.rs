//! Network faults between separate hosts: the manager and the agent each in a network namespace
//! of their own, joined by a veth pair. Loss and partitions are made by the kernel (nftables
//! rules in the agent's namespace); the 100 ms of delay by a relay thread inside the agent's
//! namespace, because this kernel has no netem qdisc. The suite creates and removes its own
//! namespaces, and skips with a message where it lacks the privilege.

mod support;

use std::fs;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::cluster::{Cluster, MANAGER};
use support::try_snapshot;
use syncd_devtools::{Archive, Rng, Scale, generate, write_archive};

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

fn nft(ns: &str, rule: &str) {
    let ok = Command::new("ip")
        .args(["netns", "exec", ns, "nft", rule])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "nft {rule} in {ns}");
}

/// Two namespaces (`m` for the manager, `a` for the agent) joined by a veth pair on
/// 10.77.<net>.0/24; removed on drop.
struct Hosts {
    m: String,
    a: String,
    net: u8,
}

impl Hosts {
    fn new(net: u8) -> Option<Hosts> {
        let id = std::process::id() % 10_000;
        let h = Hosts {
            m: format!("sdm{id}n{net}"),
            a: format!("sda{id}n{net}"),
            net,
        };
        if !ip(&["netns", "add", &h.m]) {
            return None;
        }
        let (vm, va) = (format!("vm{net}x{id}"), format!("va{net}x{id}"));
        let ok = ip(&["netns", "add", &h.a])
            && ip(&["link", "add", &vm, "type", "veth", "peer", "name", &va])
            && ip(&["link", "set", &vm, "netns", &h.m])
            && ip(&["link", "set", &va, "netns", &h.a])
            && ip(&[
                "-n",
                &h.m,
                "addr",
                "add",
                &format!("10.77.{net}.1/24"),
                "dev",
                &vm,
            ])
            && ip(&[
                "-n",
                &h.a,
                "addr",
                "add",
                &format!("10.77.{net}.2/24"),
                "dev",
                &va,
            ])
            && ip(&["-n", &h.m, "link", "set", &vm, "up"])
            && ip(&["-n", &h.a, "link", "set", &va, "up"])
            && ip(&["-n", &h.m, "link", "set", "lo", "up"])
            && ip(&["-n", &h.a, "link", "set", "lo", "up"]);
        assert!(ok, "could not set up the namespaces");
        nft(&h.a, "add table inet impair");
        nft(
            &h.a,
            "add chain inet impair in { type filter hook input priority 0; }",
        );
        nft(
            &h.a,
            "add chain inet impair out { type filter hook output priority 0; }",
        );
        Some(h)
    }

    fn veth(&self) -> String {
        format!("va{}x{}", self.net, std::process::id() % 10_000)
    }

    /// Drops `percent`% of the packets crossing the veth, each way.
    fn loss(&self, percent: u32) {
        let v = self.veth();
        nft(
            &self.a,
            &format!(
                "add rule inet impair in iifname \"{v}\" numgen random mod 100 < {percent} drop"
            ),
        );
        nft(
            &self.a,
            &format!(
                "add rule inet impair out oifname \"{v}\" numgen random mod 100 < {percent} drop"
            ),
        );
    }

    /// Cuts the link (every packet dropped) until [`Hosts::heal`].
    fn partition(&self) {
        let v = self.veth();
        nft(
            &self.a,
            &format!("add rule inet impair in iifname \"{v}\" drop"),
        );
        nft(
            &self.a,
            &format!("add rule inet impair out oifname \"{v}\" drop"),
        );
    }

    fn heal(&self) {
        nft(&self.a, "flush chain inet impair in");
        nft(&self.a, "flush chain inet impair out");
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        ip(&["netns", "del", &self.m]);
        ip(&["netns", "del", &self.a]);
    }
}

/// A UDP relay running in the agent's namespace: the agent talks to 127.0.0.1:<port> there;
/// the relay forwards to the manager across the veth, delaying every packet by `delay` each way.
struct Relay {
    port: u16,
    stop: Arc<AtomicBool>,
    /// UDP payload bytes forwarded up (agent to manager) and down (manager to agent).
    forwarded: Arc<AtomicU64>,
    delivered: Arc<AtomicU64>,
}

impl Relay {
    fn start(ns: &str, manager: SocketAddr, delay: Duration) -> Relay {
        let ns_file = fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicU64::new(0));
        let delivered = Arc::new(AtomicU64::new(0));
        let (stop2, fwd2, dlv2) = (stop.clone(), forwarded.clone(), delivered.clone());
        std::thread::spawn(move || {
            use std::os::fd::AsFd;
            rustix::thread::move_into_link_name_space(
                ns_file.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .expect("entering the agent's namespace");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let client = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
                let up = Arc::new(tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap());
                tx.send(client.local_addr().unwrap().port()).unwrap();
                let peer = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
                let down = {
                    let (client, up, peer, stop) =
                        (client.clone(), up.clone(), peer.clone(), stop2.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        while !stop.load(Ordering::Relaxed) {
                            let Ok((n, _)) = up.recv_from(&mut buf).await else {
                                continue;
                            };
                            dlv2.fetch_add(n as u64, Ordering::Relaxed);
                            let data = buf[..n].to_vec();
                            let to = *peer.lock().unwrap();
                            let client = client.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                if let Some(to) = to {
                                    let _ = client.send_to(&data, to).await;
                                }
                            });
                        }
                    })
                };
                let mut buf = vec![0u8; 65536];
                while !stop2.load(Ordering::Relaxed) {
                    let got = tokio::time::timeout(
                        Duration::from_millis(200),
                        client.recv_from(&mut buf),
                    )
                    .await;
                    let Ok(Ok((n, from))) = got else { continue };
                    *peer.lock().unwrap() = Some(from);
                    fwd2.fetch_add(n as u64, Ordering::Relaxed);
                    let data = buf[..n].to_vec();
                    let up = up.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = up.send_to(&data, manager).await;
                    });
                }
                down.abort();
            });
        });
        Relay {
            port: rx.recv().unwrap(),
            stop,
            forwarded,
            delivered,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A manager in one namespace and an agent in another, through the relay; `None` without the
/// privilege to make namespaces.
fn setup(net: u8, delay: Duration) -> Option<(Hosts, Relay, Cluster)> {
    if !Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("skipping: nft is not installed (apt-get install nftables)");
        return None;
    }
    let Some(hosts) = Hosts::new(net) else {
        eprintln!("skipping: cannot create network namespaces here (needs root and iproute2)");
        return None;
    };
    let mut c = Cluster::new(&["worker-1"]);
    let manager: SocketAddr = format!("10.77.{net}.1:{}", c.port()).parse().unwrap();
    let relay = Relay::start(&hosts.a, manager, delay);
    c.addresses(
        &format!("0.0.0.0:{}", c.port()),
        &format!("127.0.0.1:{}", relay.port),
    );
    c.wrap(MANAGER, &["ip", "netns", "exec", &hosts.m]);
    c.wrap("worker-1", &["ip", "netns", "exec", &hosts.a]);
    Some((hosts, relay, c))
}

fn converge(c: &Cluster, timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let m = try_snapshot(&c.data(MANAGER));
        if m.is_some() && m == try_snapshot(&c.data("worker-1")) {
            return started.elapsed();
        }
        if started.elapsed() > timeout {
            support::assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tree_bytes(dir: &std::path::Path) -> u64 {
    try_snapshot(dir)
        .unwrap()
        .values()
        .map(|i| match i {
            support::Item::File { size, .. } => *size,
            _ => 0,
        })
        .sum()
}

fn lossy(net: u8, congestion: &str) {
    let Some((hosts, _relay, mut c)) = setup(net, Duration::from_millis(50)) else {
        return;
    };
    c.node_option(&format!("congestion = \"{congestion}\""));
    hosts.loss(5);
    generate(&c.data(MANAGER), Scale::SMALL, 41).unwrap();
    write_archive(
        &c.data(MANAGER).join("webapps/big.war"),
        Archive::War,
        20 << 20,
        &mut Rng::new(4),
        1,
    )
    .unwrap();
    let bytes = tree_bytes(&c.data(MANAGER));
    c.start(MANAGER);
    c.start("worker-1");
    let took = converge(&c, Duration::from_secs(600));
    eprintln!(
        "{congestion}: 5% loss each way, 100 ms RTT added: {:.1} MB in {:.1} s = {:.2} MB/s",
        bytes as f64 / 1e6,
        took.as_secs_f64(),
        bytes as f64 / 1e6 / took.as_secs_f64()
    );
}

#[test]
fn five_percent_loss_and_100ms_delay_converge_with_bbr() {
    lossy(11, "bbr");
}

/// The default controller: it converges too, much more slowly (run on purpose; minutes).
#[test]
fn five_percent_loss_and_100ms_delay_converge_with_cubic() {
    if std::env::var_os("SYNCD_LONG").is_none() {
        eprintln!("skipping: takes minutes with CUBIC; set SYNCD_LONG=1 to run it");
        return;
    }
    lossy(15, "cubic");
}

#[test]
fn a_30_second_partition_mid_transfer_heals_without_resending_what_arrived() {
    let Some((hosts, relay, mut c)) = setup(12, Duration::from_millis(50)) else {
        return;
    };
    generate(&c.data(MANAGER), Scale::SMALL, 42).unwrap();
    c.start(MANAGER);
    c.start("worker-1");
    converge(&c, Duration::from_secs(120));
    let size: u64 = 60 << 20;
    let mut bytes = vec![0u8; size as usize];
    Rng::new(9).fill(&mut bytes);
    let tmp = c.root.path().join("upload");
    fs::write(&tmp, &bytes).unwrap();
    let start = c.status("worker-1").nodes[0].bytes_transferred;
    fs::rename(&tmp, c.data(MANAGER).join("webapps/new.bin")).unwrap();
    // Cut the link once part of the file has crossed.
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.status("worker-1").nodes[0].bytes_transferred - start < size / 5 {
        assert!(
            Instant::now() < deadline,
            "no progress before the partition"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    hosts.partition();
    let cut_at = c.status("worker-1").nodes[0].bytes_transferred - start;
    std::thread::sleep(Duration::from_secs(30));
    assert!(!c.data("worker-1").join("webapps/new.bin").exists() || cut_at >= size);
    hosts.heal();
    converge(&c, Duration::from_secs(120));
    let total = c.status("worker-1").nodes[0].bytes_transferred - start;
    eprintln!(
        "partition after {} MiB of {} MiB; {} MiB crossed in all (relay forwarded {} MiB up)",
        cut_at >> 20,
        size >> 20,
        total >> 20,
        relay.forwarded.load(Ordering::Relaxed) >> 20
    );
    assert!(
        total <= size + (16 << 20),
        "{total} bytes crossed for a {size}-byte file"
    );
}

#[test]
fn the_manager_restarted_while_the_agent_is_cut_off_converges_after_healing() {
    let Some((hosts, _relay, mut c)) = setup(13, Duration::from_millis(20)) else {
        return;
    };
    generate(&c.data(MANAGER), Scale::SMALL, 43).unwrap();
    c.start(MANAGER);
    c.start("worker-1");
    converge(&c, Duration::from_secs(120));
    hosts.partition();
    c.stop(MANAGER);
    fs::write(
        c.data(MANAGER)
            .join("synapse-configs/default/api/while-cut-off.xml"),
        b"<api/>",
    )
    .unwrap();
    c.start(MANAGER);
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        !c.data("worker-1")
            .join("synapse-configs/default/api/while-cut-off.xml")
            .exists()
    );
    hosts.heal();
    converge(&c, Duration::from_secs(60));
}

#[test]
fn an_agent_whose_address_changes_keeps_converging() {
    let Some((hosts, _relay, mut c)) = setup(14, Duration::from_millis(20)) else {
        return;
    };
    generate(&c.data(MANAGER), Scale::SMALL, 44).unwrap();
    c.start(MANAGER);
    c.start("worker-1");
    converge(&c, Duration::from_secs(120));
    let v = hosts.veth();
    let net = hosts.net;
    // The old address goes, a new one comes (as after a DHCP renewal or a failover).
    assert!(ip(&["-n", &hosts.a, "addr", "flush", "dev", &v]));
    assert!(ip(&[
        "-n",
        &hosts.a,
        "addr",
        "add",
        &format!("10.77.{net}.3/24"),
        "dev",
        &v
    ]));
    fs::write(
        c.data(MANAGER)
            .join("synapse-configs/default/api/after-move.xml"),
        b"<api/>",
    )
    .unwrap();
    let took = converge(&c, Duration::from_secs(60));
    eprintln!(
        "converged {:.1} s after the address change",
        took.as_secs_f64()
    );
    // The files are in place a moment before the agent's verdict reaches the manager, which
    // then updates its row (address included).
    c.wait_row("worker-1", Duration::from_secs(10), |row| {
        row.applied == c.status(MANAGER).generation
            && row
                .address
                .as_deref()
                .is_some_and(|a| a.starts_with(&format!("10.77.{net}.3")))
    });
}

#[test]
fn a_capped_worker_across_a_100ms_link_gets_its_bytes_at_its_cap_on_the_wire() {
    let Some((_hosts, relay, mut c)) = setup(16, Duration::from_millis(50)) else {
        return;
    };
    const RATE: f64 = 2_000_000.0;
    c.agent_entry_option("worker-1", "max_rate = \"2MB/s\"");
    c.start(MANAGER);
    c.start("worker-1");
    converge(&c, Duration::from_secs(60));
    // 10 MB of random bytes, deployed as a build pipeline does.
    let mut bytes = vec![0u8; 10_000_000];
    std::io::Read::read_exact(&mut fs::File::open("/dev/urandom").unwrap(), &mut bytes).unwrap();
    let tmp = c.root.path().join("build-output");
    fs::write(&tmp, &bytes).unwrap();
    let down_before = relay.delivered.load(Ordering::Relaxed);
    fs::rename(&tmp, c.data(MANAGER).join("dr-blob.bin")).unwrap();
    let took = converge(&c, Duration::from_secs(120));
    let wire = relay.delivered.load(Ordering::Relaxed) - down_before;
    let rate = wire as f64 / took.as_secs_f64();
    eprintln!(
        "cap 2 MB/s across 100 ms RTT: 10 MB in {:.2} s, {:.2} MB of UDP payload down = {:.2} MB/s",
        took.as_secs_f64(),
        wire as f64 / 1e6,
        rate / 1e6
    );
    // No faster than the cap allows (less its first burst of 50 ms)...
    let floor = (10_000_000.0 - 0.05 * RATE) / RATE;
    assert!(
        took.as_secs_f64() >= floor,
        "10 MB in {took:?}: faster than the cap ({floor} s)"
    );
    // ...and what crossed the link, QUIC and all, stayed within 10% of it.
    assert!(wire >= 10_000_000, "only {wire} bytes came down");
    assert!(
        rate <= RATE * 1.1,
        "{:.2} MB/s on the wire against a cap of 2 MB/s",
        rate / 1e6
    );
}
