//! `gen-tree DIR [--seed N]`: writes a deterministic WSO2-like deployment tree into DIR.

use std::path::PathBuf;

use clap::Parser;

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
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    syncd_devtools::generate(&args.dir, syncd_devtools::Scale::SMALL, args.seed)?;
    Ok(())
}
