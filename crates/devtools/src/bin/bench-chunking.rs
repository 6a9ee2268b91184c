//! `bench-chunking`: chunking + hashing throughput of syncd (FastCDC and BLAKE3, as the manager
//! and agents run them) against `b3sum` (BLAKE3 alone) on the same files, in one run, from the page
//! cache. One core: one file, one thread each. Both cores: one file per core.
//!
//!   apt-get install -y b3sum
//!   cargo build --release -p syncd-devtools
//!   target/release/bench-chunking            # 1 GiB per file, 3 repetitions, median

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use syncd_devtools::{Rng, write_random};
use syncd_manifest::{ChunkParams, Chunker, chunk_reader};

#[derive(Parser, Debug)]
#[command(about = "Chunking + hashing throughput of syncd against b3sum on the same files")]
struct Args {
    /// Size of each test file in MiB.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Directory for the test files (a fresh temporary one by default).
    #[arg(long)]
    work: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if Command::new("b3sum").arg("--version").output().is_err() {
        bail!("b3sum is not installed: apt-get install -y b3sum");
    }
    let work = match &args.work {
        Some(w) => w.clone(),
        None => std::env::temp_dir().join(format!("bench-chunking.{}", std::process::id())),
    };
    std::fs::create_dir_all(&work)?;
    let files: Vec<PathBuf> = (0..2).map(|i| work.join(format!("f{i}.bin"))).collect();
    for (i, f) in files.iter().enumerate() {
        write_random(f, args.mib << 20, &mut Rng::new(100 + i as u64))?;
        // Read once so every run below reads from the page cache.
        std::fs::read(f)?;
    }
    let bytes = (args.mib << 20) as f64;
    let gib = |d: Duration, files: f64| files * bytes / d.as_secs_f64() / (1u64 << 30) as f64;
    let mut rows = Vec::new();
    let mut run = |name: &str, files_n: f64, f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let mut times = Vec::new();
        for _ in 0..args.reps {
            let t = Instant::now();
            f()?;
            times.push(t.elapsed());
        }
        times.sort();
        let rate = gib(times[times.len() / 2], files_n);
        rows.push((name.to_owned(), rate));
        Ok(rate)
    };
    let chunker = Chunker::new(ChunkParams::DEFAULT)?;
    let one = files[0].clone();
    let ours_1 = run("syncd FastCDC + BLAKE3, one core", 1.0, &mut || {
        chunk(&chunker, &one)
    })?;
    let b3_1 = run("b3sum --num-threads 1", 1.0, &mut || {
        b3sum(&[&one], Some(1))
    })?;
    let both = files.clone();
    let ours_2 = run(
        "syncd FastCDC + BLAKE3, two files on two cores",
        2.0,
        &mut || {
            std::thread::scope(|s| {
                let handles: Vec<_> = both
                    .iter()
                    .map(|f| {
                        let chunker = &chunker;
                        s.spawn(move || chunk(chunker, f))
                    })
                    .collect();
                handles
                    .into_iter()
                    .try_for_each(|h| h.join().expect("no panic"))
            })
        },
    )?;
    let b3_2 = run("b3sum, two files, all cores", 2.0, &mut || {
        b3sum(&[&files[0], &files[1]], None)
    })?;
    println!(
        "# bench-chunking: {} MiB per file, {} repetitions, median",
        args.mib, args.reps
    );
    println!();
    println!("| what | GiB/s |");
    println!("| --- | --- |");
    for (name, rate) in &rows {
        println!("| {name} | {rate:.2} |");
    }
    println!();
    println!(
        "syncd ÷ b3sum: one core {:.2}, two cores {:.2}",
        ours_1 / b3_1,
        ours_2 / b3_2
    );
    if args.work.is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}

fn chunk(chunker: &Chunker, path: &Path) -> Result<()> {
    let file = std::fs::File::open(path)?;
    let content = chunk_reader(chunker, file, |_, _| {})?;
    assert!(content.size > 0);
    Ok(())
}

fn b3sum(paths: &[&Path], threads: Option<usize>) -> Result<()> {
    let mut cmd = Command::new("b3sum");
    if let Some(n) = threads {
        cmd.arg("--num-threads").arg(n.to_string());
    }
    let st = cmd.args(paths).stdout(Stdio::null()).status()?;
    if !st.success() {
        bail!("b3sum failed");
    }
    Ok(())
}
