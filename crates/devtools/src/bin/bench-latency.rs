//! `bench-latency`: how long from the moment an artifact is complete on the manager until it is
//! present and identical on every worker, for syncd and for lsyncd on the same files.
//!
//! For each tool, worker count and artifact (a 10 KB Synapse XML, a 50 MB CAR), each repetition
//! deploys a new artifact (new name, new content) in two ways: written elsewhere on the same
//! filesystem and renamed into place, and copied in with plain `cp`. The clock starts when the
//! rename returns or `cp` exits, and stops at the inotify event of the last worker whose copy
//! then proves complete and identical. Run it on purpose (it takes minutes):
//!
//!   cargo build --release -p syncd -p syncd-devtools
//!   target/release/bench-latency --syncd target/release/syncd

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use notify::{RecursiveMode, Watcher};
use syncd_devtools::bench::{cores, kernel, syncd_init};
use syncd_devtools::{Archive, Rng, Scale, generate, synapse_xml, write_archive};

#[derive(Parser, Debug)]
#[command(about = "Deploy-to-all-workers latency of syncd and lsyncd, p50/p95/p99")]
struct Args {
    /// The syncd binary (a release build).
    #[arg(long, default_value = "target/release/syncd")]
    syncd: PathBuf,
    /// Worker counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,5,10")]
    workers: Vec<usize>,
    /// Repetitions per tool, worker count, artifact and deploy mode.
    #[arg(long, default_value_t = 50)]
    reps: usize,
    /// Artifacts: xml (10 KB), car (50 MB).
    #[arg(long, value_delimiter = ',', default_value = "xml,car")]
    artifacts: Vec<String>,
    /// Tools: syncd, lsyncd (delay 0), lsyncd-default (its default 15 s delay).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "syncd,lsyncd,lsyncd-default"
    )]
    tools: Vec<String>,
    /// Repetitions for lsyncd with its default delay (each takes about 15 s).
    #[arg(long, default_value_t = 3)]
    default_delay_reps: usize,
    /// Working directory (a fresh temporary one by default).
    #[arg(long)]
    work: Option<PathBuf>,
    /// First UDP port for syncd.
    #[arg(long, default_value_t = 17900)]
    port: u16,
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Rename,
    Cp,
}

struct Cluster {
    children: Vec<Child>,
    manager: PathBuf,
    workers: Vec<PathBuf>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let work = match &args.work {
        Some(w) => w.clone(),
        None => tempdir()?,
    };
    std::fs::create_dir_all(&work)?;
    println!("# bench-latency: work dir {}", work.display());
    println!("# machine: {} cores, {}", cores(), kernel());
    let mut rows = Vec::new();
    let mut port = args.port;
    for tool in &args.tools {
        for &n in &args.workers {
            let reps = if tool == "lsyncd-default" {
                args.default_delay_reps
            } else {
                args.reps
            };
            if tool == "lsyncd-default" && n != 1 {
                continue;
            }
            let dir = work.join(format!("{tool}-{n}"));
            let _ = std::fs::remove_dir_all(&dir);
            let cluster = match tool.as_str() {
                "syncd" => {
                    port += 1;
                    start_syncd(&args.syncd, &dir, n, port)?
                }
                "lsyncd" => start_lsyncd(&dir, n, Some(0))?,
                "lsyncd-default" => start_lsyncd(&dir, n, None)?,
                other => bail!("unknown tool {other}"),
            };
            for artifact in &args.artifacts {
                for mode in [Mode::Rename, Mode::Cp] {
                    let reps = if artifact == "car" && tool == "lsyncd-default" {
                        1
                    } else {
                        reps
                    };
                    let lat = measure(&cluster, &dir, artifact, mode, reps)?;
                    let row = format!(
                        "| {tool} | {n} | {artifact} | {mode:?} | {reps} | {} | {} | {} |",
                        ms(pct(&lat, 50.0)),
                        ms(pct(&lat, 95.0)),
                        ms(pct(&lat, 99.0))
                    );
                    println!("{row}");
                    rows.push(row);
                }
            }
            drop(cluster);
        }
    }
    println!();
    println!("| tool | workers | artifact | deployed by | reps | p50 | p95 | p99 |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

fn tempdir() -> Result<PathBuf> {
    let out = Command::new("mktemp")
        .args(["-d", "/tmp/bench-latency.XXXXXX"])
        .output()?;
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn base_tree(manager: &Path) -> Result<()> {
    generate(manager, Scale::SMALL, 1)?;
    Ok(())
}

fn start_syncd(syncd: &Path, dir: &Path, n: usize, port: u16) -> Result<Cluster> {
    let manager = dir.join("mgr/server");
    std::fs::create_dir_all(&manager)?;
    base_tree(&manager)?;
    let mid = syncd_init(syncd, &dir.join("mgr/state"))?;
    let mut agents_toml = String::new();
    let mut workers = Vec::new();
    let mut children = Vec::new();
    for i in 0..n {
        let w = dir.join(format!("w{i}"));
        let id = syncd_init(syncd, &w.join("state"))?;
        agents_toml.push_str(&format!(
            "[[manager.agents]]\nname = \"w{i}\"\nid = \"{id}\"\n"
        ));
        std::fs::write(
            w.join("syncd.toml"),
            format!(
                "[node]\nname = \"w{i}\"\nstate_dir = \"state\"\nadmin_socket = \"admin.sock\"\n[agent]\nmanager = \"127.0.0.1:{port}\"\nmanager_id = \"{mid}\"\n[[folders]]\nname = \"deployment\"\npath = \"server\"\n"
            ),
        )?;
        workers.push(w.join("server"));
    }
    std::fs::write(
        dir.join("mgr/syncd.toml"),
        format!(
            "[node]\nname = \"mgr\"\nstate_dir = \"state\"\nadmin_socket = \"admin.sock\"\n[manager]\nlisten = \"127.0.0.1:{port}\"\n{agents_toml}[[folders]]\nname = \"deployment\"\npath = \"server\"\n"
        ),
    )?;
    let spawn = |role: &str, cfg: PathBuf, log: PathBuf| -> Result<Child> {
        Ok(Command::new(syncd)
            .args([role, "--config"])
            .arg(cfg)
            .env("SYNCD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()?)
    };
    children.push(spawn(
        "manager",
        dir.join("mgr/syncd.toml"),
        dir.join("mgr.log"),
    )?);
    for i in 0..n {
        let w = dir.join(format!("w{i}"));
        children.push(spawn(
            "agent",
            w.join("syncd.toml"),
            dir.join(format!("w{i}.log")),
        )?);
    }
    let cluster = Cluster {
        children,
        manager,
        workers,
    };
    wait_initial(&cluster)?;
    Ok(cluster)
}

fn start_lsyncd(dir: &Path, n: usize, delay: Option<u32>) -> Result<Cluster> {
    if Command::new("lsyncd").arg("--version").output().is_err() {
        bail!("lsyncd is not installed (apt-get install lsyncd rsync)");
    }
    let manager = dir.join("mgr/server");
    std::fs::create_dir_all(&manager)?;
    base_tree(&manager)?;
    let mut conf = format!(
        "settings {{ nodaemon = true, logfile = \"{}\", statusFile = \"{}\" }}\n",
        dir.join("lsyncd.log").display(),
        dir.join("lsyncd.status").display()
    );
    let mut workers = Vec::new();
    for i in 0..n {
        let w = dir.join(format!("w{i}/server"));
        std::fs::create_dir_all(&w)?;
        let delay = delay.map(|d| format!(", delay = {d}")).unwrap_or_default();
        conf.push_str(&format!(
            "sync {{ default.rsync, source = \"{}\", target = \"{}\"{delay} }}\n",
            manager.display(),
            w.display()
        ));
        workers.push(w);
    }
    std::fs::write(dir.join("lsyncd.conf.lua"), conf)?;
    let child = Command::new("lsyncd")
        .arg(dir.join("lsyncd.conf.lua"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("lsyncd.stderr"))?)
        .spawn()?;
    let cluster = Cluster {
        children: vec![child],
        manager,
        workers,
    };
    wait_initial(&cluster)?;
    Ok(cluster)
}

/// Waits until every worker holds the base tree (its largest file).
fn wait_initial(c: &Cluster) -> Result<()> {
    let probe = "webapps/service-000.war";
    let want = std::fs::read(c.manager.join(probe))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    for w in &c.workers {
        while std::fs::read(w.join(probe)).ok().as_deref() != Some(want.as_slice()) {
            if Instant::now() > deadline {
                bail!("initial sync to {} did not finish", w.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// Deploys `reps` new artifacts and returns the sorted latencies.
fn measure(
    c: &Cluster,
    dir: &Path,
    artifact: &str,
    mode: Mode,
    reps: usize,
) -> Result<Vec<Duration>> {
    let sub = match artifact {
        "xml" => "synapse-configs/default/api",
        "car" => "carbonapps",
        other => bail!("unknown artifact {other}"),
    };
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&scratch)?;
    let (tx, rx) = mpsc::channel::<(PathBuf, Instant)>();
    let mut watchers = Vec::new();
    for w in &c.workers {
        let tx = tx.clone();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                if let Ok(ev) = res {
                    let now = Instant::now();
                    for p in ev.paths {
                        let _ = tx.send((p, now));
                    }
                }
            })?;
        watcher.watch(&w.join(sub), RecursiveMode::NonRecursive)?;
        watchers.push(watcher);
    }
    let mut rng = Rng::new(artifact.len() as u64 * 1000 + reps as u64);
    let mut latencies = Vec::with_capacity(reps);
    for rep in 0..reps {
        let name = format!(
            "bench-{mode:?}-{rep:03}.{}",
            if artifact == "xml" { "xml" } else { "car" }
        );
        let tmp = scratch.join(&name);
        match artifact {
            "xml" => std::fs::write(&tmp, synapse_xml(&format!("bench{rep}"), 10_000, &mut rng))?,
            _ => write_archive(&tmp, Archive::Car, 50_000_000, &mut rng, rep as u32)?,
        }
        let want = std::fs::read(&tmp)?;
        let target = c.manager.join(sub).join(&name);
        while rx.try_recv().is_ok() {}
        let t0 = match mode {
            Mode::Rename => {
                std::fs::rename(&tmp, &target)?;
                Instant::now()
            }
            Mode::Cp => {
                let st = Command::new("cp").arg(&tmp).arg(&target).status()?;
                let t = Instant::now();
                if !st.success() {
                    bail!("cp failed");
                }
                std::fs::remove_file(&tmp)?;
                t
            }
        };
        let mut done: HashMap<usize, Instant> = HashMap::new();
        let deadline = t0 + Duration::from_secs(if artifact == "xml" { 60 } else { 120 });
        while done.len() < c.workers.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok((path, at)) = rx.recv_timeout(left.max(Duration::from_millis(1))) else {
                if Instant::now() >= deadline {
                    bail!(
                        "{name} did not reach every worker within the deadline ({} of {})",
                        done.len(),
                        c.workers.len()
                    );
                }
                continue;
            };
            if path.file_name().and_then(|f| f.to_str()) != Some(name.as_str()) {
                continue;
            }
            let Some(i) = c.workers.iter().position(|w| path.starts_with(w)) else {
                continue;
            };
            if done.contains_key(&i) {
                continue;
            }
            if std::fs::read(w_path(c, i, sub, &name)).ok().as_deref() == Some(want.as_slice()) {
                done.insert(i, at);
            }
        }
        let last = done.values().max().copied().expect("at least one worker");
        latencies.push(last.saturating_duration_since(t0));
        // Remove it and wait until the workers did, so runs do not accumulate.
        std::fs::remove_file(&target)?;
        let gone_by = Instant::now() + Duration::from_secs(60);
        for i in 0..c.workers.len() {
            while w_path(c, i, sub, &name).exists() {
                if Instant::now() > gone_by {
                    bail!("deletion of {name} did not reach worker {i}");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    latencies.sort();
    Ok(latencies)
}

fn w_path(c: &Cluster, i: usize, sub: &str, name: &str) -> PathBuf {
    c.workers[i].join(sub).join(name)
}
