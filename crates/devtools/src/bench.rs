//! Helpers the benchmark binaries share: the machine they run on, and node identities.

use std::io;
use std::path::Path;
use std::process::Command;

/// Cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The running kernel's release.
pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Runs `syncd init` for `state` and returns the node ID it prints.
pub fn syncd_init(syncd: &Path, state: &Path) -> io::Result<String> {
    let out = Command::new(syncd)
        .args(["init", "--state-dir"])
        .arg(state)
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "syncd init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned())
}
