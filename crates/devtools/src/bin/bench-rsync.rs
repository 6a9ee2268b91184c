//! `bench-rsync`: syncd against an rsync daemon on 127.0.0.1 (and lsyncd driving it) on the same
//! WSO2-like tree, in one run, as ratios: initial sync, each incremental change (time to converge
//! and bytes on the wire), and fan-out to several workers.
//!
//! Bytes are counted the same way for every tool: nftables counters on the loopback interface,
//! in the input hook, for the manager's UDP port (syncd) and the rsync daemon's TCP port (rsync,
//! lsyncd), both directions, whole IP packets (headers, handshakes, acknowledgements and, for
//! syncd, QUIC's encryption included). Needs root, nft, rsync and lsyncd. Run it on purpose:
//!
//!   apt-get install -y rsync lsyncd nftables
//!   cargo build --release -p syncd -p syncd-devtools
//!   target/release/bench-rsync --scale medium

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use syncd_devtools::bench::{cores, kernel, syncd_init};
use syncd_devtools::{Archive, Rng, Scale, generate, write_archive_edited};

#[derive(Parser, Debug)]
#[command(about = "syncd against rsync and lsyncd on a WSO2-like tree: time and bytes, as ratios")]
struct Args {
    /// The syncd binary (a release build); syncctl is looked for beside it.
    #[arg(long, default_value = "target/release/syncd")]
    syncd: PathBuf,
    /// Tree size: medium (about 200 MB, 2,000 files) or large (about 1.5 GB, 10,000 files).
    #[arg(long, default_value = "medium")]
    scale: String,
    /// Repetitions of the initial sync (the median is reported; 0 skips it).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// The incremental changes measured, in this order (all of them by default).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = MUTATIONS)]
    changes: Vec<Mutation>,
    /// Times each change is made in a row, each time a new version of the same kind (the median
    /// time and bytes are reported: one deploy's time varies by a third here, lsyncd's too).
    #[arg(long, default_value_t = 3)]
    change_reps: usize,
    /// Worker counts for the fan-out part (empty to skip it).
    #[arg(long, default_value = "1,5,10", value_parser = parse_counts)]
    fanout: Counts,
    /// New CARs deployed per worker count in the fan-out part (the median is reported: one
    /// deploy's time to ten workers varies by 10-20% here).
    #[arg(long, default_value_t = 5)]
    fanout_reps: usize,
    /// Skip lsyncd.
    #[arg(long)]
    no_lsyncd: bool,
    /// Working directory (a fresh temporary one by default; removed at the end unless given).
    #[arg(long)]
    work: Option<PathBuf>,
    /// UDP port of the syncd manager.
    #[arg(long, default_value_t = 17700)]
    port: u16,
    /// TCP port of the rsync daemon.
    #[arg(long, default_value_t = 17873)]
    rsync_port: u16,
}

/// A change made to the manager's tree, the same for every tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mutation {
    XmlEdit,
    WarEntry,
    WarRebuilt,
    NewCar,
    Delete,
    FrontInsert,
    TenPercentXml,
}

const MUTATIONS: [Mutation; 7] = [
    Mutation::XmlEdit,
    Mutation::WarEntry,
    Mutation::WarRebuilt,
    Mutation::NewCar,
    Mutation::Delete,
    Mutation::FrontInsert,
    Mutation::TenPercentXml,
];

impl Mutation {
    fn label(self) -> &'static str {
        match self {
            Mutation::XmlEdit => "one XML edited (88 bytes)",
            Mutation::WarEntry => "63 MB WAR, one inner entry changed",
            Mutation::WarRebuilt => "63 MB WAR rebuilt (new timestamps), one entry changed",
            Mutation::NewCar => "a new 5 MB CAR",
            Mutation::Delete => "a CAR deleted",
            Mutation::FrontInsert => "1,000 bytes inserted at the front of a 23 MB WAR",
            Mutation::TenPercentXml => "10% of XMLs edited",
        }
    }
}

const BIG_WAR: &str = "webapps/api-gateway.war";
const FRONT_WAR: &str = "webapps/portal.war";
const BIG_WAR_LEN: u64 = 63_000_000;
const FRONT_WAR_LEN: u64 = 23_000_000;

/// A comma-separated list of worker counts; empty for none.
#[derive(Debug, Clone)]
struct Counts(Vec<usize>);

fn parse_counts(s: &str) -> Result<Counts, std::num::ParseIntError> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| p.trim().parse())
        .collect::<Result<_, _>>()
        .map(Counts)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let scale = match args.scale.as_str() {
        "medium" => Scale::MEDIUM,
        "large" => Scale::LARGE,
        "small" => Scale::SMALL,
        other => bail!("unknown scale {other}: medium or large"),
    };
    preflight(&args)?;
    let (work, keep) = match &args.work {
        Some(w) => (w.clone(), true),
        None => (mktemp()?, false),
    };
    std::fs::create_dir_all(&work)?;
    let counters = Counters::install(args.port, args.rsync_port)?;
    let bench = Bench {
        args: &args,
        scale,
        work: work.clone(),
        counters,
        discarded: std::cell::Cell::new(0),
    };
    let result = bench.run();
    let _ = std::fs::remove_dir_all(work.join(TRASH));
    if !keep {
        let _ = std::fs::remove_dir_all(&work);
    }
    result
}

fn preflight(args: &Args) -> Result<()> {
    for (tool, hint) in [
        ("nft", "nftables"),
        ("rsync", "rsync"),
        ("lsyncd", "lsyncd"),
    ] {
        if tool == "lsyncd" && args.no_lsyncd {
            continue;
        }
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()?
            .success();
        if !found {
            bail!("{tool} is not installed: apt-get install -y {hint}");
        }
    }
    if !args.syncd.exists() {
        bail!(
            "{} not found: cargo build --release -p syncd",
            args.syncd.display()
        );
    }
    // A daemon left from an earlier run (or a hand rig) on the same ports would answer in place
    // of the ones this run starts: the run would fail minutes later, or measure the wrong one.
    if let Err(e) = std::net::UdpSocket::bind(("127.0.0.1", args.port)) {
        bail!(
            "UDP port {} is in use ({e}): stop what holds it (`ss -ulpn | grep {}`) or pass --port",
            args.port,
            args.port
        );
    }
    if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", args.rsync_port)) {
        bail!(
            "TCP port {} is in use ({e}): stop what holds it (`ss -tlpn | grep {}`) or pass --rsync-port",
            args.rsync_port,
            args.rsync_port
        );
    }
    Ok(())
}

struct Bench<'a> {
    args: &'a Args,
    scale: Scale,
    work: PathBuf,
    counters: Counters,
    /// Trees set aside so far (see `Bench::discard`).
    discarded: std::cell::Cell<usize>,
}

/// Where `Bench::discard` puts trees until the end of the run.
const TRASH: &str = "trash";

/// One measured outcome.
#[derive(Debug, Clone, Copy, Default)]
struct Outcome {
    time: Duration,
    bytes: u64,
}

impl Bench<'_> {
    fn run(&self) -> Result<()> {
        println!(
            "# bench-rsync: scale {}, work dir {}",
            self.args.scale,
            self.work.display()
        );
        println!("# machine: {} cores, Linux {}", cores(), kernel());
        if Path::new(REPORTED_KIB).exists() {
            println!(
                "# memory: a VM guest with free page reporting; every timed run starts once it has been quiet for 3 s"
            );
            // Which of its two states decides how fast page-cache writes are (BENCHMARKS.md,
            // session 8): with much clean cache, new pages are reclaimed from it at memory
            // speed; with much free memory, each is faulted in from the host.
            if let (Some(cached), Some(free)) = (meminfo_kib("Cached"), meminfo_kib("MemFree")) {
                println!(
                    "# page cache at the start: {:.1} GiB cached, {:.1} GiB free ({})",
                    cached as f64 / 1048576.0,
                    free as f64 / 1048576.0,
                    if cached > free {
                        "page-cache writes reclaim cached pages: fast, as on ordinary hardware"
                    } else {
                        "page-cache writes fault memory in from the host: slow"
                    }
                );
            }
        }
        let base = self.work.join("base");
        let t = Instant::now();
        build_tree(&base, self.scale)?;
        let (files, bytes) = tree_size(&base)?;
        println!(
            "# tree: {files} files, {:.1} MB (generated in {:.1} s)",
            bytes as f64 / 1e6,
            t.elapsed().as_secs_f64()
        );

        // Initial sync, one worker.
        if self.args.reps > 0 {
            self.initial(&base)?;
        }
        self.incremental(&base)
    }

    /// Sets a finished tree aside instead of deleting it: on ext4 without a journal (this
    /// machine's root), an inode freed in the last minute or more is skipped when a new one is
    /// allocated, and every file creation in the same block group scans past all of them.
    /// Deleting 10,000 files before the next tool's run made that run's creations several
    /// times slower (measured: 0.3 ms instead of 20 µs per file), whichever tool it was.
    /// Everything set aside is deleted once the whole run is over.
    fn discard(&self, tree: &Path) -> Result<()> {
        let trash = self.work.join(TRASH);
        std::fs::create_dir_all(&trash)?;
        let n = self.discarded.get();
        self.discarded.set(n + 1);
        std::fs::rename(tree, trash.join(n.to_string()))
            .with_context(|| format!("setting {} aside", tree.display()))
    }

    fn initial(&self, base: &Path) -> Result<()> {
        let mut rsync_init = Vec::new();
        let mut rsync_fsync_init = Vec::new();
        let mut syncd_init = Vec::new();
        let mut syncd_join = Vec::new();
        for rep in 0..self.args.reps {
            let dir = self.work.join(format!("init-rsync-{rep}"));
            let daemon = RsyncDaemon::start(&dir, 1, self.args.rsync_port)?;
            flush_disk()?;
            rsync_init.push(daemon.push(base, 0, &[])?);
            same_tree(base, &daemon.workers[0])?;
            self.discard(&daemon.workers[0])?;
            std::fs::create_dir_all(&daemon.workers[0])?;
            flush_disk()?;
            rsync_fsync_init.push(daemon.push(base, 0, &["--fsync"])?);
            same_tree(base, &daemon.workers[0])?;
            drop(daemon);
            self.discard(&dir)?;

            syncd_init.push(self.syncd_initial(base, &format!("init-syncd-{rep}"), false)?);
            syncd_join.push(self.syncd_initial(base, &format!("join-syncd-{rep}"), true)?);
        }
        let (r, rf, s, j) = (
            median(&mut rsync_init),
            median(&mut rsync_fsync_init),
            median(&mut syncd_init),
            median(&mut syncd_join),
        );
        println!();
        println!(
            "## Initial sync, one worker, from empty ({} runs, median)",
            self.args.reps
        );
        println!();
        println!("| tool | time | syncd joining ÷ tool | syncd cold ÷ tool |");
        println!("| --- | --- | --- | --- |");
        println!(
            "| syncd, a worker joining a running manager (agent start, transfer, fsync) | {} | 1.00 | {:.2} |",
            secs(j),
            ratio(s, j)
        );
        println!(
            "| syncd, both processes started cold (scan, hash, transfer, fsync) | {} | {:.2} | 1.00 |",
            secs(s),
            ratio(j, s)
        );
        println!(
            "| rsync daemon | {} | {:.2} | {:.2} |",
            secs(r),
            ratio(j, r),
            ratio(s, r)
        );
        println!(
            "| rsync daemon, `--fsync` | {} | {:.2} | {:.2} |",
            secs(rf),
            ratio(j, rf),
            ratio(s, rf)
        );
        Ok(())
    }

    /// One syncd initial sync of `base` to an empty worker in `work/name`, timed: both daemons
    /// started on the clock, or (`joining`) the agent alone, once the manager runs and has
    /// published, as a new or rebuilt worker joins a cluster.
    fn syncd_initial(&self, base: &Path, name: &str, joining: bool) -> Result<Duration> {
        let dir = self.work.join(name);
        let mgr = dir.join("mgr/server");
        copy_tree(base, &mgr)?;
        let (syncd, port) = (&self.args.syncd, self.args.port);
        let running = if joining {
            let cluster = SyncdCluster::start_manager(syncd, &dir, 1, port)?;
            cluster.wait_published(Duration::from_secs(300))?;
            Some(cluster)
        } else {
            None
        };
        flush_disk()?;
        let t0 = Instant::now();
        let cluster = match running {
            Some(mut cluster) => {
                cluster.start_agents()?;
                cluster
            }
            None => SyncdCluster::start(syncd, &dir, 1, port)?,
        };
        cluster.wait_all(Duration::from_secs(300))?;
        let took = t0.elapsed();
        same_tree(&mgr, &cluster.workers[0])?;
        drop(cluster);
        self.discard(&dir)?;
        Ok(took)
    }

    /// Every change made, in order: each of `--changes`, `--change-reps` times in a row.
    fn plan(&self) -> Vec<(Mutation, usize)> {
        let reps = self.args.change_reps.max(1);
        self.args
            .changes
            .iter()
            .flat_map(|&m| (0..reps).map(move |rep| (m, rep)))
            .collect()
    }

    /// The median outcome of each change's repetitions (times and bytes each on their own).
    fn medians(&self, outcomes: Vec<Outcome>) -> Vec<Outcome> {
        outcomes
            .chunks(self.args.change_reps.max(1))
            .map(|reps| {
                let mut times: Vec<Duration> = reps.iter().map(|o| o.time).collect();
                let mut bytes: Vec<u64> = reps.iter().map(|o| o.bytes).collect();
                Outcome {
                    time: median(&mut times),
                    bytes: median(&mut bytes),
                }
            })
            .collect()
    }

    fn incremental(&self, base: &Path) -> Result<()> {
        // Incremental changes, one worker per tool, the same sequence of changes for each.
        // syncd and lsyncd (whose times are compared) run side by side, each on its own tree,
        // and take turns change by change, the first to go alternating: this machine's speed
        // drifts over minutes, and a ratio of two phases run one after the other measured the
        // drift as much as the tools.
        let (syncd, lsyncd) = self.incremental_live(base)?;
        let syncd_rows = self.medians(syncd);
        let rsync_rows = self.medians(self.incremental_rsync(base)?);
        let lsyncd_rows = match lsyncd {
            None => vec![None; self.args.changes.len()],
            Some(l) => self.medians(l).into_iter().map(Some).collect(),
        };
        println!();
        println!(
            "## Incremental changes, one worker (time to converge; bytes on the wire, both directions; median of {})",
            self.args.change_reps.max(1)
        );
        println!();
        println!(
            "| change | syncd | rsync | lsyncd (delay 0) | syncd bytes | rsync bytes | lsyncd bytes | syncd ÷ best bytes | syncd ÷ lsyncd time |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        for (i, m) in self.args.changes.iter().enumerate() {
            let (s, r, l) = (syncd_rows[i], rsync_rows[i], lsyncd_rows[i]);
            let best = l.map_or(r.bytes, |l| l.bytes.min(r.bytes));
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {} |",
                m.label(),
                ms(s.time),
                ms(r.time),
                l.map_or("-".into(), |l| ms(l.time)),
                kb(s.bytes),
                kb(r.bytes),
                l.map_or("-".into(), |l| kb(l.bytes)),
                s.bytes as f64 / best.max(1) as f64,
                l.map_or("-".into(), |l| format!("{:.2}", ratio(s.time, l.time))),
            );
        }

        if !self.args.fanout.0.is_empty() {
            println!();
            println!(
                "## Fan-out: a new 5 MB CAR to N workers (rsync: one run per worker, in turn; median of {})",
                self.args.fanout_reps
            );
            println!();
            println!("| workers | syncd | rsync | syncd ÷ rsync | syncd ÷ syncd with 1 worker |");
            println!("| --- | --- | --- | --- | --- |");
            let mut one = None;
            for &n in &self.args.fanout.0 {
                let (s, r) = self.fanout(base, n)?;
                let one = *one.get_or_insert(s);
                println!(
                    "| {n} | {} | {} | {:.2} | {:.2} |",
                    ms(s),
                    ms(r),
                    ratio(s, r),
                    ratio(s, one)
                );
            }
        }
        Ok(())
    }

    /// syncd's and (unless `--no-lsyncd`) lsyncd's outcomes of every change of the plan, the
    /// two tools taking turns.
    fn incremental_live(&self, base: &Path) -> Result<(Vec<Outcome>, Option<Vec<Outcome>>)> {
        let syncd = LiveSyncd::start(self, base)?;
        let lsyncd = if self.args.no_lsyncd {
            None
        } else {
            Some(LiveLsyncd::start(self, base)?)
        };
        let (mut s_out, mut l_out) = (Vec::new(), Vec::new());
        for (i, (m, rep)) in self.plan().into_iter().enumerate() {
            match &lsyncd {
                None => s_out.push(syncd.step(self, m, rep)?),
                Some(l) if i % 2 == 0 => {
                    s_out.push(syncd.step(self, m, rep)?);
                    l_out.push(l.step(self, m, rep)?);
                }
                Some(l) => {
                    l_out.push(l.step(self, m, rep)?);
                    s_out.push(syncd.step(self, m, rep)?);
                }
            }
        }
        syncd.finish(self)?;
        let l_out = match lsyncd {
            Some(l) => {
                l.finish(self)?;
                Some(l_out)
            }
            None => None,
        };
        Ok((s_out, l_out))
    }

    fn incremental_rsync(&self, base: &Path) -> Result<Vec<Outcome>> {
        let dir = self.work.join("inc-rsync");
        let mgr = dir.join("mgr");
        copy_tree(base, &mgr)?;
        let daemon = RsyncDaemon::start(&dir, 1, self.args.rsync_port)?;
        daemon.push(&mgr, 0, &[])?;
        let scratch = dir.join("scratch");
        std::fs::create_dir_all(&scratch)?;
        let mut out = Vec::new();
        for (m, rep) in self.plan() {
            flush_disk()?;
            mutate(&mgr, &scratch, m, rep)?;
            self.counters.reset()?;
            let time = daemon.push(&mgr, 0, &[])?;
            let bytes = self.counters.tcp()?;
            same_tree(&mgr, &daemon.workers[0])?;
            out.push(Outcome { time, bytes });
        }
        drop(daemon);
        self.discard(&dir)?;
        Ok(out)
    }

    /// New CARs to `n` workers, `--fanout-reps` times each: syncd pushes to all at once, rsync
    /// runs once per worker. Medians.
    fn fanout(&self, base: &Path, n: usize) -> Result<(Duration, Duration)> {
        let reps = self.args.fanout_reps.max(1);
        let dir = self.work.join(format!("fan-syncd-{n}"));
        let mgr = dir.join("mgr/server");
        copy_tree(base, &mgr)?;
        let cluster = SyncdCluster::start(&self.args.syncd, &dir, n, self.args.port)?;
        cluster.wait_all(Duration::from_secs(600))?;
        let scratch = dir.join("scratch");
        std::fs::create_dir_all(&scratch)?;
        let mut syncd = Vec::new();
        for rep in 0..reps {
            std::thread::sleep(Duration::from_millis(300));
            flush_disk()?;
            let changed = new_car(&mgr, &scratch, rep)?;
            let t0 = Instant::now();
            syncd.push(wait_paths(
                &mgr,
                &cluster.workers,
                &changed,
                t0,
                Duration::from_secs(120),
            )?);
        }
        for w in &cluster.workers {
            same_tree(&mgr, w)?;
        }
        drop(cluster);
        self.discard(&dir)?;

        let dir = self.work.join(format!("fan-rsync-{n}"));
        let mgr = dir.join("mgr");
        copy_tree(base, &mgr)?;
        let daemon = RsyncDaemon::start(&dir, n, self.args.rsync_port)?;
        for i in 0..n {
            daemon.push(&mgr, i, &[])?;
        }
        let scratch = dir.join("scratch");
        std::fs::create_dir_all(&scratch)?;
        let mut rsync = Vec::new();
        for rep in 0..reps {
            flush_disk()?;
            new_car(&mgr, &scratch, rep)?;
            let t0 = Instant::now();
            for i in 0..n {
                daemon.push(&mgr, i, &[])?;
            }
            rsync.push(t0.elapsed());
        }
        for w in &daemon.workers {
            same_tree(&mgr, w)?;
        }
        drop(daemon);
        self.discard(&dir)?;
        Ok((median(&mut syncd), median(&mut rsync)))
    }
}

/// A syncd manager and one agent over their own copy of the tree, for the incremental changes.
struct LiveSyncd {
    dir: PathBuf,
    mgr: PathBuf,
    scratch: PathBuf,
    cluster: SyncdCluster,
}

impl LiveSyncd {
    fn start(bench: &Bench<'_>, base: &Path) -> Result<LiveSyncd> {
        let dir = bench.work.join("inc-syncd");
        let mgr = dir.join("mgr/server");
        copy_tree(base, &mgr)?;
        let cluster = SyncdCluster::start(&bench.args.syncd, &dir, 1, bench.args.port)?;
        cluster.wait_all(Duration::from_secs(300))?;
        // The initial copy is checked, as lsyncd's is (which is how lsyncd's initial sync is
        // awaited). Reading the worker's files also leaves both tools' worker trees in the page
        // cache alike: syncd writes large files past it, and the first WAR edit's local copy
        // otherwise read its source from the device while lsyncd's rsync read its from memory.
        same_tree(&mgr, &cluster.workers[0])?;
        let scratch = dir.join("scratch");
        std::fs::create_dir_all(&scratch)?;
        Ok(LiveSyncd {
            dir,
            mgr,
            scratch,
            cluster,
        })
    }

    fn step(&self, bench: &Bench<'_>, m: Mutation, rep: usize) -> Result<Outcome> {
        let settle = Duration::from_millis(500);
        live_step(
            bench,
            &self.mgr,
            &self.scratch,
            &self.cluster.workers,
            (m, rep),
            settle,
            Counters::udp,
        )
    }

    fn finish(self, bench: &Bench<'_>) -> Result<()> {
        drop(self.cluster);
        if std::env::var_os("BENCH_SYNCD_LOG").is_none() {
            bench.discard(&self.dir)?;
        }
        Ok(())
    }
}

/// lsyncd (delay 0) driving an rsync daemon over its own copy of the tree.
struct LiveLsyncd {
    dir: PathBuf,
    mgr: PathBuf,
    scratch: PathBuf,
    daemon: RsyncDaemon,
    lsyncd: Lsyncd,
}

impl LiveLsyncd {
    fn start(bench: &Bench<'_>, base: &Path) -> Result<LiveLsyncd> {
        let dir = bench.work.join("inc-lsyncd");
        let mgr = dir.join("mgr");
        copy_tree(base, &mgr)?;
        let daemon = RsyncDaemon::start(&dir, 1, bench.args.rsync_port)?;
        let lsyncd = Lsyncd::start(&dir, &mgr, bench.args.rsync_port)?;
        let deadline = Instant::now() + Duration::from_secs(300);
        while same_tree(&mgr, &daemon.workers[0]).is_err() {
            if Instant::now() > deadline {
                bail!("lsyncd's initial sync did not finish");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let scratch = dir.join("scratch");
        std::fs::create_dir_all(&scratch)?;
        Ok(LiveLsyncd {
            dir,
            mgr,
            scratch,
            daemon,
            lsyncd,
        })
    }

    fn step(&self, bench: &Bench<'_>, m: Mutation, rep: usize) -> Result<Outcome> {
        // Long enough for a trailing rsync run to finish before the counters are read.
        let settle = Duration::from_millis(1500);
        live_step(
            bench,
            &self.mgr,
            &self.scratch,
            &self.daemon.workers,
            (m, rep),
            settle,
            Counters::tcp,
        )
    }

    fn finish(self, bench: &Bench<'_>) -> Result<()> {
        drop(self.lsyncd);
        drop(self.daemon);
        bench.discard(&self.dir)
    }
}

/// One change on a live setup: made in `mgr`, timed until every worker has the changed paths,
/// then its bytes read from `counter` once `settle` has passed, and the trees compared.
fn live_step(
    bench: &Bench<'_>,
    mgr: &Path,
    scratch: &Path,
    workers: &[PathBuf],
    (m, rep): (Mutation, usize),
    settle: Duration,
    counter: fn(&Counters) -> Result<u64>,
) -> Result<Outcome> {
    std::thread::sleep(Duration::from_millis(300));
    flush_disk()?;
    bench.counters.reset()?;
    let changed = mutate(mgr, scratch, m, rep)?;
    let t0 = Instant::now();
    let time = wait_paths(mgr, workers, &changed, t0, Duration::from_secs(120))?;
    std::thread::sleep(settle);
    let bytes = counter(&bench.counters)?;
    same_tree(mgr, &workers[0])?;
    Ok(Outcome { time, bytes })
}

/// Deploys the fan-out's `rep`th new CAR and returns its path.
fn new_car(root: &Path, scratch: &Path, rep: usize) -> Result<Vec<String>> {
    let rel = format!("carbonapps/fan-out-{rep}_1.0.0.car");
    deploy_car(root, scratch, &rel, 91 + rep as u64)
}

/// Writes a new 5 MB CAR of fresh content (from `seed`) beside the tree and renames it in at
/// `rel`, as a deployment does; returns its path.
fn deploy_car(root: &Path, scratch: &Path, rel: &str, seed: u64) -> Result<Vec<String>> {
    let tmp = scratch.join("car.tmp");
    syncd_devtools::write_archive(&tmp, Archive::Car, 5_000_000, &mut Rng::new(seed), 3)?;
    std::fs::rename(&tmp, root.join(rel))?;
    Ok(vec![rel.to_owned()])
}

/// The base tree: the generator's tree at `scale`, plus the two WARs the changes work on.
fn build_tree(root: &Path, scale: Scale) -> Result<()> {
    generate(root, scale, 11)?;
    write_archive_edited(
        &root.join(BIG_WAR),
        Archive::War,
        BIG_WAR_LEN,
        &mut Rng::new(7001),
        1,
        None,
    )?;
    write_archive_edited(
        &root.join(FRONT_WAR),
        Archive::War,
        FRONT_WAR_LEN,
        &mut Rng::new(7002),
        1,
        None,
    )?;
    Ok(())
}

/// Applies `m` to the tree at `root` the way a deployment does (written beside, renamed in) and
/// returns the paths it changed. Repetition `rep` of a change makes a new version of the same
/// kind (the first is the same whatever the number of repetitions).
fn mutate(root: &Path, scratch: &Path, m: Mutation, rep: usize) -> Result<Vec<String>> {
    let nth = |text: &str| {
        if rep == 0 {
            text.to_owned()
        } else {
            format!("{text} {rep}")
        }
    };
    let deploy = |rel: &str, bytes: &[u8]| -> Result<()> {
        let tmp = scratch.join("deploy.tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, root.join(rel))?;
        Ok(())
    };
    let edit_xml = |rel: &str, tag: &str| -> Result<()> {
        let mut bytes = std::fs::read(root.join(rel))?;
        let at = bytes.len() / 2;
        let patch = format!("<!-- {tag:-<80} -->");
        let end = (at + patch.len()).min(bytes.len());
        bytes.splice(at..end, patch.bytes().take(end - at));
        deploy(rel, &bytes)
    };
    let xmls = || -> Result<Vec<String>> {
        let mut v: Vec<String> = walk(root)?
            .into_iter()
            .filter(|p| p.starts_with("synapse-configs/") && p.ends_with(".xml"))
            .collect();
        v.sort();
        Ok(v)
    };
    Ok(match m {
        Mutation::XmlEdit => {
            let rel = xmls()?[1].clone();
            edit_xml(&rel, &nth("edited"))?;
            vec![rel]
        }
        Mutation::WarEntry | Mutation::WarRebuilt => {
            // A rebuild gets new timestamps each time (the build number sets them).
            let (build, edit) = match m {
                Mutation::WarEntry => (1, nth("<!-- one class changed") + " -->"),
                _ => (
                    2 + rep as u32,
                    nth("<!-- one class changed, then rebuilt") + " -->",
                ),
            };
            let tmp = scratch.join("war.tmp");
            write_archive_edited(
                &tmp,
                Archive::War,
                BIG_WAR_LEN,
                &mut Rng::new(7001),
                build,
                Some(&edit),
            )?;
            std::fs::rename(&tmp, root.join(BIG_WAR))?;
            vec![BIG_WAR.to_owned()]
        }
        Mutation::NewCar => {
            let rel = format!("carbonapps/new-app-{}_1.0.0.car", walk(root)?.len());
            deploy_car(root, scratch, &rel, 91 + 1000 * rep as u64)?
        }
        Mutation::Delete => {
            // The first CAR left (a repeated deletion takes the next one).
            let mut cars: Vec<String> = walk(root)?
                .into_iter()
                .filter(|p| p.starts_with("carbonapps/app-") && p.ends_with(".car"))
                .collect();
            cars.sort();
            let rel = cars.first().context("no CAR left to delete")?.clone();
            std::fs::remove_file(root.join(&rel))?;
            vec![rel]
        }
        Mutation::FrontInsert => {
            let old = std::fs::read(root.join(FRONT_WAR))?;
            let mut front = vec![0u8; 1000];
            Rng::new(5 + rep as u64).fill(&mut front);
            front.extend_from_slice(&old);
            deploy(FRONT_WAR, &front)?;
            vec![FRONT_WAR.to_owned()]
        }
        Mutation::TenPercentXml => {
            let all = xmls()?;
            let picked: Vec<String> = all.iter().step_by(10).cloned().collect();
            for rel in &picked {
                edit_xml(rel, &nth("touched"))?;
            }
            picked
        }
    })
}

/// Waits until every worker holds each of `paths` as the manager does (or lacks it too) and
/// returns how long after `t0` the last one got there.
///
/// Polls with `stat` alone (length and mtime: every tool here renames a complete file into place
/// with the source's mtime) and takes a worker's time when its stat first matches; the contents
/// are compared after that, outside the timing, and a mismatch goes back to polling. Reading the
/// files on every poll, as this did before session 8, made the poller compete with the tools for
/// the two cores, the more so the more workers and the larger the file (two 63 MB reads per
/// worker for a WAR), and read syncd's copies, written with O_DIRECT, from disk.
fn wait_paths(
    mgr: &Path,
    workers: &[PathBuf],
    paths: &[String],
    t0: Instant,
    timeout: Duration,
) -> Result<Duration> {
    let deadline = t0 + timeout;
    let want: Vec<(PathBuf, Option<std::fs::Metadata>)> = paths
        .iter()
        .map(|p| (PathBuf::from(p), std::fs::metadata(mgr.join(p)).ok()))
        .collect();
    let stat_matches = |w: &Path, rel: &Path, meta: &Option<std::fs::Metadata>| {
        let got = std::fs::symlink_metadata(w.join(rel)).ok();
        match (meta, got) {
            (None, None) => true,
            (Some(m), Some(g)) => {
                g.is_file() && m.len() == g.len() && m.modified().ok() == g.modified().ok()
            }
            _ => false,
        }
    };
    let same_bytes =
        |w: &Path, rel: &Path| std::fs::read(w.join(rel)).ok() == std::fs::read(mgr.join(rel)).ok();
    // When each (worker, path) first matched by stat; None while it has not.
    let mut matched: Vec<Vec<Option<Instant>>> = vec![vec![None; want.len()]; workers.len()];
    loop {
        let mut pending = false;
        for (w, times) in workers.iter().zip(&mut matched) {
            for ((rel, meta), at) in want.iter().zip(times.iter_mut()) {
                if at.is_none() {
                    if stat_matches(w, rel, meta) {
                        *at = Some(Instant::now());
                    } else {
                        pending = true;
                    }
                }
            }
        }
        if !pending {
            // Everything matches by stat: now compare contents, outside the timing.
            for (w, times) in workers.iter().zip(&mut matched) {
                for ((rel, meta), at) in want.iter().zip(times.iter_mut()) {
                    if meta.is_some() && !same_bytes(w, rel) {
                        *at = None;
                        pending = true;
                    }
                }
            }
            if !pending {
                let last = matched.iter().flatten().flatten().max().copied();
                return Ok(last.map_or(Duration::ZERO, |t| t.saturating_duration_since(t0)));
            }
        }
        if Instant::now() > deadline {
            let left = matched.iter().flatten().filter(|t| t.is_none()).count();
            bail!("{left} paths did not reach the workers in {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// nftables counters on loopback for the syncd (UDP) and rsync (TCP) ports.
struct Counters {
    table: &'static str,
    /// The rule counters at the last reset (nft resets named counters only, so the difference
    /// is taken instead).
    base: std::cell::RefCell<Vec<u64>>,
}

impl Counters {
    fn install(udp: u16, tcp: u16) -> Result<Counters> {
        let table = "syncd_bench";
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", table])
            .stderr(Stdio::null())
            .status();
        let rules = format!(
            "table inet {table} {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  iifname \"lo\" udp dport {udp} counter\n  iifname \"lo\" udp sport {udp} counter\n  iifname \"lo\" tcp dport {tcp} counter\n  iifname \"lo\" tcp sport {tcp} counter\n }}\n}}\n"
        );
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .context("nft")?;
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(rules.as_bytes())?;
        if !child.wait()?.success() {
            bail!("nft could not install the counting rules (root needed)");
        }
        Ok(Counters {
            table,
            base: Default::default(),
        })
    }

    fn reset(&self) -> Result<()> {
        *self.base.borrow_mut() = self.read()?;
        Ok(())
    }

    /// Bytes counted by each rule, in order: udp in, udp out, tcp in, tcp out.
    fn read(&self) -> Result<Vec<u64>> {
        let out = Command::new("nft")
            .args(["list", "table", "inet", self.table])
            .output()?;
        let text = String::from_utf8(out.stdout)?;
        Ok(text
            .lines()
            .filter_map(|l| l.split("bytes ").nth(1))
            .filter_map(|b| b.split_whitespace().next()?.parse().ok())
            .collect())
    }

    /// Bytes counted by rules `rules` since the last reset.
    fn since_reset(&self, rules: [usize; 2]) -> Result<u64> {
        let now = self.read()?;
        let base = self.base.borrow();
        let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
        Ok(rules.iter().map(|&i| at(&now, i) - at(&base, i)).sum())
    }

    fn udp(&self) -> Result<u64> {
        self.since_reset([0, 1])
    }

    fn tcp(&self) -> Result<u64> {
        self.since_reset([2, 3])
    }
}

impl Drop for Counters {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", self.table])
            .status();
    }
}

/// Kills its children when dropped.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

struct RsyncDaemon {
    _child: Children,
    port: u16,
    workers: Vec<PathBuf>,
}

impl RsyncDaemon {
    fn start(dir: &Path, n: usize, port: u16) -> Result<RsyncDaemon> {
        std::fs::create_dir_all(dir)?;
        let mut conf = format!(
            "use chroot = no\nmunge symlinks = no\nuid = root\ngid = root\nmax connections = 0\npid file = {}\n",
            dir.join("rsyncd.pid").display()
        );
        let mut workers = Vec::new();
        for i in 0..n {
            let w = dir.join(format!("w{i}"));
            std::fs::create_dir_all(&w)?;
            conf.push_str(&format!("[w{i}]\npath = {}\nread only = no\n", w.display()));
            workers.push(w);
        }
        std::fs::write(dir.join("rsyncd.conf"), conf)?;
        let child = Command::new("rsync")
            .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(format!("--config={}", dir.join("rsyncd.conf").display()))
            .stderr(std::fs::File::create(dir.join("rsyncd.log"))?)
            .spawn()?;
        let d = RsyncDaemon {
            _child: Children(vec![child]),
            port,
            workers,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "the rsync daemon did not start (see {})",
                    dir.join("rsyncd.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    /// One `rsync -a --delete` of `src` to worker `i`, timed.
    fn push(&self, src: &Path, i: usize, extra: &[&str]) -> Result<Duration> {
        let t0 = Instant::now();
        let st = Command::new("rsync")
            .args(["-a", "--delete"])
            .args(extra)
            .arg(format!("{}/", src.display()))
            .arg(format!("rsync://127.0.0.1:{}/w{i}/", self.port))
            .status()?;
        let t = t0.elapsed();
        if !st.success() {
            bail!("rsync failed: {st}");
        }
        Ok(t)
    }
}

struct Lsyncd {
    _child: Children,
}

impl Lsyncd {
    fn start(dir: &Path, src: &Path, port: u16) -> Result<Lsyncd> {
        let conf = format!(
            "settings {{ nodaemon = true, logfile = \"{}\", statusFile = \"{}\" }}\nsync {{ default.rsync, source = \"{}\", target = \"rsync://127.0.0.1:{port}/w0/\", delay = 0 }}\n",
            dir.join("lsyncd.log").display(),
            dir.join("lsyncd.status").display(),
            src.display()
        );
        std::fs::write(dir.join("lsyncd.conf.lua"), conf)?;
        let child = Command::new("lsyncd")
            .arg(dir.join("lsyncd.conf.lua"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("lsyncd.stderr"))?)
            .spawn()?;
        Ok(Lsyncd {
            _child: Children(vec![child]),
        })
    }
}

struct SyncdCluster {
    children: Children,
    syncd: PathBuf,
    dir: PathBuf,
    mgr_socket: PathBuf,
    syncctl: PathBuf,
    workers: Vec<PathBuf>,
}

impl SyncdCluster {
    /// Starts a manager serving `dir/mgr/server` and `n` agents on `dir/w*/server`.
    fn start(syncd: &Path, dir: &Path, n: usize, port: u16) -> Result<SyncdCluster> {
        let mut cluster = SyncdCluster::start_manager(syncd, dir, n, port)?;
        cluster.start_agents()?;
        Ok(cluster)
    }

    /// Configures a manager and `n` agents and starts the manager alone.
    fn start_manager(syncd: &Path, dir: &Path, n: usize, port: u16) -> Result<SyncdCluster> {
        let mid = syncd_init(syncd, &dir.join("mgr/state"))?;
        let mut agents = String::new();
        let mut workers = Vec::new();
        for i in 0..n {
            let w = dir.join(format!("w{i}"));
            let id = syncd_init(syncd, &w.join("state"))?;
            agents.push_str(&format!(
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
                "[node]\nname = \"mgr\"\nstate_dir = \"state\"\nadmin_socket = \"admin.sock\"\n[manager]\nlisten = \"127.0.0.1:{port}\"\n{agents}[[folders]]\nname = \"deployment\"\npath = \"server\"\n"
            ),
        )?;
        let mut cluster = SyncdCluster {
            children: Children(Vec::new()),
            syncd: syncd.to_owned(),
            dir: dir.to_owned(),
            mgr_socket: dir.join("mgr/admin.sock"),
            syncctl: syncd.with_file_name("syncctl"),
            workers,
        };
        cluster.spawn("manager", dir.join("mgr/syncd.toml"), dir.join("mgr.log"))?;
        Ok(cluster)
    }

    /// Starts the agents.
    fn start_agents(&mut self) -> Result<()> {
        for i in 0..self.workers.len() {
            let w = self.dir.join(format!("w{i}"));
            let log = self.dir.join(format!("w{i}.log"));
            self.spawn("agent", w.join("syncd.toml"), log)?;
        }
        Ok(())
    }

    fn spawn(&mut self, role: &str, cfg: PathBuf, log: PathBuf) -> Result<()> {
        let child = Command::new(&self.syncd)
            .args([role, "--config"])
            .arg(cfg)
            // `BENCH_SYNCD_LOG=debug` (with `--work`) keeps what the daemons did in w*.log.
            .env(
                "SYNCD_LOG",
                std::env::var("BENCH_SYNCD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()?;
        self.children.0.push(child);
        Ok(())
    }

    /// Runs `syncctl` against the manager.
    fn syncctl(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        Command::new(&self.syncctl)
            .arg("--socket")
            .arg(&self.mgr_socket)
            .args(args)
            .output()
    }

    /// Waits until the manager has published its first generation.
    fn wait_published(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.syncctl(&["status", "--json"])?;
            if out.status.success() {
                let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
                if status["generation"].as_u64().is_some_and(|g| g > 0) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "the manager published nothing in {timeout:?}: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until every agent applied the manager's latest generation.
    fn wait_all(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.syncctl(&[
                "wait",
                "--all",
                "--timeout",
                &format!("{}s", timeout.as_secs()),
            ])?;
            match out.status.code() {
                Some(0) => return Ok(()),
                // Not listening yet.
                Some(4) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => bail!(
                    "syncctl wait: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            }
        }
    }
}

/// Relative paths of every file and link under `root`.
/// Readies the machine for a timed run: writes every dirty page back, then lets the VM's
/// memory settle (see [`settle_memory`]).
///
/// The write-back is so that no tool pays for the writes of the setup or of the tool before
/// it: syncd's agent makes a large apply durable with one `syncfs`, which flushes whatever else
/// is dirty on the filesystem too (on this one machine: the manager's fresh copy of the tree).
fn flush_disk() -> Result<()> {
    if !Command::new("sync").status()?.success() {
        bail!("sync failed");
    }
    settle_memory();
    Ok(())
}

/// Where a VM guest with free page reporting counts the memory it has handed back to the host.
const REPORTED_KIB: &str = "/sys/module/page_reporting/parameters/reported_kib";

/// Waits until the guest has stopped handing freed memory back to the host (at most a minute).
///
/// This machine is a VM with free page reporting: memory the kernel frees is returned to the
/// host within seconds, and the first write to such a page faults it back in. Page-cache
/// writes into memory the host has taken back run at about 430 MB/s here; into memory freed a
/// moment before, at 1.8 GB/s (`dd` of 1.5 GB: 3.5 s against 0.9 s). So whichever tool ran
/// right after a large free (the tree generator's buffers, a tree deleted) wrote four times
/// faster than the others: the earlier sessions' rsync initial syncs of 1.4 s were such runs.
/// Every timed run therefore starts once reporting has been quiet for three seconds: every
/// tool writes into memory the host has taken back, as a machine does after an idle while.
/// Not a VM (no such counter): returns at once.
fn settle_memory() {
    let read = || std::fs::read_to_string(REPORTED_KIB).ok();
    let Some(mut last) = read() else {
        return;
    };
    let start = Instant::now();
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(3)
        && start.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(250));
        let now = read().unwrap_or_default();
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
}

fn walk(root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root)?.to_string_lossy().into_owned());
            }
        }
    }
    Ok(out)
}

fn tree_size(root: &Path) -> Result<(usize, u64)> {
    let files = walk(root)?;
    let mut bytes = 0;
    for f in &files {
        bytes += std::fs::symlink_metadata(root.join(f))?.len();
    }
    Ok((files.len(), bytes))
}

/// Checks that `b` holds exactly what `a` does: every file's bytes and mode, every link.
fn same_tree(a: &Path, b: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut fa = walk(a)?;
    let mut fb = walk(b)?;
    fa.sort();
    fb.sort();
    if fa != fb {
        let missing = fa
            .iter()
            .filter(|p| !fb.contains(p))
            .take(3)
            .collect::<Vec<_>>();
        let extra = fb
            .iter()
            .filter(|p| !fa.contains(p))
            .take(3)
            .collect::<Vec<_>>();
        bail!(
            "{} and {} differ: missing {missing:?}, extra {extra:?}",
            a.display(),
            b.display()
        );
    }
    for f in &fa {
        let (ma, mb) = (
            std::fs::symlink_metadata(a.join(f))?,
            std::fs::symlink_metadata(b.join(f))?,
        );
        let same = if ma.file_type().is_symlink() {
            mb.file_type().is_symlink()
                && std::fs::read_link(a.join(f))? == std::fs::read_link(b.join(f))?
        } else {
            ma.len() == mb.len()
                && ma.permissions().mode() & 0o777 == mb.permissions().mode() & 0o777
                && std::fs::read(a.join(f))? == std::fs::read(b.join(f))?
        };
        if !same {
            bail!("{f} differs between {} and {}", a.display(), b.display());
        }
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to.parent().expect("not the root"))?;
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    if !st.success() {
        bail!("cp -a {} {} failed", from.display(), to.display());
    }
    Ok(())
}

fn mktemp() -> Result<PathBuf> {
    let out = Command::new("mktemp")
        .args(["-d", "/tmp/bench-rsync.XXXXXX"])
        .output()?;
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

fn median<T: Ord + Copy>(v: &mut [T]) -> T {
    v.sort_unstable();
    v[v.len() / 2]
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn kb(b: u64) -> String {
    if b >= 1_000_000 {
        format!("{:.2} MB", b as f64 / 1e6)
    } else {
        format!("{:.1} KB", b as f64 / 1e3)
    }
}

/// A `/proc/meminfo` field, in KiB.
fn meminfo_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}
