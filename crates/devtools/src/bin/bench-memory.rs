//! `bench-memory`: the manager's resident memory with many files, its idle CPU, and its restart
//! time. A manager with no agents serves an empty folder, then a folder of N small files (1 KB
//! Synapse-like XML in directories of 1,000); the difference in RSS divided by N is the per-file
//! cost. Then it idles for a while (CPU ticks from /proc), and is restarted: the time until it
//! answers `syncctl wait` again, with its persisted manifest (a stat walk, no rehash).
//!
//!   cargo build --release -p syncd -p syncd-devtools
//!   target/release/bench-memory --files 100000

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use syncd_devtools::{Rng, synapse_xml};

#[derive(Parser, Debug)]
#[command(about = "Manager RSS per file, idle CPU and restart time")]
struct Args {
    /// The syncd binary (a release build); syncctl is looked for beside it.
    #[arg(long, default_value = "target/release/syncd")]
    syncd: PathBuf,
    /// Files in the large folder.
    #[arg(long, default_value_t = 100_000)]
    files: usize,
    /// Seconds of idling measured.
    #[arg(long, default_value_t = 60)]
    idle: u64,
    /// Working directory (a fresh temporary one by default).
    #[arg(long)]
    work: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let work = match &args.work {
        Some(w) => w.clone(),
        None => std::env::temp_dir().join(format!("bench-memory.{}", std::process::id())),
    };
    std::fs::create_dir_all(&work)?;
    let syncctl = args.syncd.with_file_name("syncctl");

    let empty = work.join("empty");
    let m = Manager::start(&args.syncd, &syncctl, &empty, 0, 17801)?;
    std::thread::sleep(Duration::from_secs(2));
    let base_rss = m.rss_kib()?;
    drop(m);

    let full = work.join("full");
    let t = Instant::now();
    let data = full.join("server");
    let mut rng = Rng::new(9);
    for i in 0..args.files {
        let dir = data.join(format!("synapse-configs/default/api/d{:03}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&dir)?;
        }
        std::fs::write(
            dir.join(format!("api-{i:06}.xml")),
            synapse_xml("a", 1000, &mut rng),
        )?;
    }
    println!(
        "# wrote {} files in {:.1} s",
        args.files,
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let m = Manager::start(&args.syncd, &syncctl, &full, args.files, 17802)?;
    let first_start = t.elapsed();
    // Let the first publication's aftermath (persisting the manifest) finish.
    std::thread::sleep(Duration::from_secs(5));
    let rss = m.rss_kib()?;
    let ticks0 = m.cpu_ticks()?;
    std::thread::sleep(Duration::from_secs(args.idle));
    let idle_ticks = m.cpu_ticks()? - ticks0;
    let rss_after_idle = m.rss_kib()?;
    drop(m);
    let t = Instant::now();
    let m = Manager::start(&args.syncd, &syncctl, &full, args.files, 17803)?;
    let restart = t.elapsed();
    std::thread::sleep(Duration::from_secs(5));
    let rss_restarted = m.rss_kib()?;
    drop(m);

    let per_file = (rss.saturating_sub(base_rss) * 1024) as f64 / args.files as f64;
    println!();
    println!("| what | value |");
    println!("| --- | --- |");
    println!(
        "| manager RSS, empty folder | {:.1} MiB |",
        base_rss as f64 / 1024.0
    );
    println!(
        "| manager RSS, {} files | {:.1} MiB |",
        args.files,
        rss as f64 / 1024.0
    );
    println!("| per file | {per_file:.0} bytes |");
    println!(
        "| RSS after {} s idle | {:.1} MiB |",
        args.idle,
        rss_after_idle as f64 / 1024.0
    );
    println!(
        "| CPU while idle for {} s | {idle_ticks} ticks ({:.2}% of a core) |",
        args.idle,
        idle_ticks as f64 / (args.idle as f64 * 100.0) * 100.0
    );
    println!(
        "| first start (scan and hash of every file) | {:.2} s |",
        first_start.as_secs_f64()
    );
    println!(
        "| restart (persisted manifest, stat walk) | {:.2} s |",
        restart.as_secs_f64()
    );
    println!(
        "| RSS after the restart | {:.1} MiB ({:.0} bytes per file) |",
        rss_restarted as f64 / 1024.0,
        (rss_restarted.saturating_sub(base_rss) * 1024) as f64 / args.files as f64
    );
    if args.work.is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}

struct Manager {
    child: Child,
}

impl Manager {
    /// Starts a manager on `dir/server` and waits until it has published its first walk.
    fn start(syncd: &Path, syncctl: &Path, dir: &Path, files: usize, port: u16) -> Result<Manager> {
        std::fs::create_dir_all(dir.join("server"))?;
        if !dir.join("state").exists() {
            let out = Command::new(syncd)
                .args(["init", "--state-dir"])
                .arg(dir.join("state"))
                .output()?;
            if !out.status.success() {
                bail!("syncd init: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        // A made-up agent: the manager needs one to be configured.
        std::fs::write(
            dir.join("syncd.toml"),
            format!(
                "[node]\nname = \"mgr\"\nstate_dir = \"state\"\nadmin_socket = \"admin.sock\"\n[manager]\nlisten = \"127.0.0.1:{port}\"\n[[manager.agents]]\nname = \"w\"\nid = \"AAAAAAAAAAAAA-AAAAAAAAAAAAA-AAAAAAAAAAAAA-AAAAAAAAAAAAA\"\n[[folders]]\nname = \"deployment\"\npath = \"server\"\n"
            ),
        )?;
        let child = Command::new(syncd)
            .args(["manager", "--config"])
            .arg(dir.join("syncd.toml"))
            .env("SYNCD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("mgr.log"))?)
            .spawn()?;
        let m = Manager { child };
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let out = Command::new(syncctl)
                .arg("--socket")
                .arg(dir.join("admin.sock"))
                .args(["status", "--json"])
                .output()?;
            if out.status.success() {
                let text = String::from_utf8_lossy(&out.stdout);
                // Published: a generation exists (or the folder is empty).
                if files == 0 || !text.contains("\"generation\":0") {
                    return Ok(m);
                }
            }
            if Instant::now() > deadline {
                bail!("the manager did not publish its first walk within 10 minutes");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no VmRSS"))
    }

    /// User plus system CPU ticks (1/100 s) used so far.
    fn cpu_ticks(&self) -> Result<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let utime: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0);
        let stime: u64 = fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
        Ok(utime + stime)
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}
