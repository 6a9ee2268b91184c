//! `gen-tree DIR [--seed N] [--scale small|medium|large]`: writes a deterministic WSO2-like
//! deployment tree into DIR.

use std::path::PathBuf;

use clap::Parser;
use syncd_devtools::Scale;

#[derive(Parser, Debug)]
#[command(
    about = "Write a deterministic WSO2-like deployment tree (Synapse XML, CAR, WAR, an exploded webapp)"
)]
struct Args {
    /// Directory to fill (created if absent).
    dir: PathBuf,
    /// Seed: the same seed writes the same bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// small (a few MB), medium (about 200 MB, 2,000 files) or large (about 1.5 GB, 10,000 files).
    #[arg(long, default_value = "small")]
    scale: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scale = match args.scale.as_str() {
        "small" => Scale::SMALL,
        "medium" => Scale::MEDIUM,
        "large" => Scale::LARGE,
        other => anyhow::bail!("unknown scale {other}: small, medium or large"),
    };
    syncd_devtools::generate(&args.dir, scale, args.seed)?;
    Ok(())
}
