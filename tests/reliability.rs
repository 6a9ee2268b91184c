//! The reliability suite: real daemons killed with SIGKILL at random moments, interrupted
//! transfers, a full disk. Every case ends with a byte-for-byte comparison of the worker with the
//! manager.
//!
//! `SYNCD_RELIABILITY_ITERATIONS` sets how many kills each crash case runs (8 by default, for
//! CI; 200 for the long mode: `SYNCD_RELIABILITY_ITERATIONS=200 cargo test -p syncd --test
//! reliability -- --nocapture`).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::cluster::{Cluster, MANAGER};
use support::{assert_same_tree, try_snapshot};
use syncd_devtools::Rng;

fn iterations() -> usize {
    std::env::var("SYNCD_RELIABILITY_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

/// Every version of every file ever written on the manager: a worker's file must be one of them.
#[derive(Default)]
struct Versions(BTreeMap<String, BTreeSet<String>>);

impl Versions {
    /// Writes `len` bytes of version `v` of `rel` on the manager (beside it, then renamed in) and
    /// remembers its hash.
    fn write(&mut self, root: &Path, rel: &str, len: usize, v: u64) -> String {
        let mut bytes = vec![0u8; len];
        Rng::new(
            v.wrapping_mul(1_000_003)
                ^ rel.len() as u64
                ^ (rel.as_bytes()[rel.len() - 1] as u64) << 32,
        )
        .fill(&mut bytes);
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let tmp = root
            .parent()
            .unwrap()
            .join(format!("upload-{}", rel.replace('/', "_")));
        fs::write(&tmp, &bytes).unwrap();
        fs::rename(&tmp, &path).unwrap();
        let hash = syncd_manifest::ChunkHash::of(&bytes).to_hex();
        self.0
            .entry(rel.to_owned())
            .or_default()
            .insert(hash.clone());
        hash
    }

    /// Checks that every file in `worker` is a complete version written on the manager, and that
    /// nothing temporary is visible under a final name.
    fn check(&self, worker: &Path) {
        let mut stack = vec![worker.to_owned()];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let p = e.path();
                let rel = p
                    .strip_prefix(worker)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                if rel == ".syncd-staging" {
                    continue; // hidden staging, reused or cleared by the next apply
                }
                let meta = fs::symlink_metadata(&p).unwrap();
                if meta.is_dir() {
                    stack.push(p);
                    continue;
                }
                let bytes = fs::read(&p).unwrap();
                let hash = syncd_manifest::ChunkHash::of(&bytes).to_hex();
                let known = self.0.get(&rel).is_some_and(|v| v.contains(&hash));
                assert!(
                    known,
                    "{rel}: {} bytes that are no version written on the manager (partial or mixed)",
                    bytes.len()
                );
            }
        }
    }
}

fn wait_converged(c: &Cluster, timeout: Duration) {
    c.ctl(
        MANAGER,
        &[
            "wait",
            "--all",
            "--timeout",
            &format!("{}s", timeout.as_secs()),
        ],
    );
    let deadline = Instant::now() + timeout;
    loop {
        let m = try_snapshot(&c.data(MANAGER));
        if m.is_some() && m == try_snapshot(&c.data("worker-1")) {
            return;
        }
        if Instant::now() > deadline {
            assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn files(rng: &mut Rng, n: usize) -> Vec<(String, usize)> {
    (0..n)
        .map(|i| {
            let len = if i % 25 == 0 {
                rng.range(20 << 20, 40 << 20)
            } else {
                rng.range(50_000, 2_000_000)
            } as usize;
            (
                format!("carbonapps/group-{}/artifact-{i:03}.bin", i % 7),
                len,
            )
        })
        .collect()
}

#[test]
fn an_agent_killed_at_random_moments_never_exposes_a_partial_file_and_converges() {
    let mut c = Cluster::new(&["worker-1"]);
    let mut versions = Versions::default();
    let mut rng = Rng::new(77);
    let set = files(&mut rng, 60);
    for (rel, len) in &set {
        versions.write(&c.data(MANAGER), rel, *len, 0);
    }
    c.start(MANAGER);
    c.start("worker-1");
    wait_converged(&c, Duration::from_secs(120));
    let n = iterations();
    let mut killed_during_apply = 0;
    for v in 1..=n as u64 {
        // A large generation: about half the files change, big ones included.
        for (rel, len) in &set {
            if rng.range(0, 2) == 0 {
                versions.write(&c.data(MANAGER), rel, *len, v);
            }
        }
        // Kill it while it applies: as soon as it is syncing, after a random part of the apply.
        let deadline = Instant::now() + Duration::from_secs(3);
        while c.status("worker-1").nodes[0].state != "syncing" && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(rng.range(0, 150)));
        if c.status("worker-1").nodes[0].state == "syncing" {
            killed_during_apply += 1;
        }
        c.kill("worker-1");
        versions.check(&c.data("worker-1"));
        c.start("worker-1");
        wait_converged(&c, Duration::from_secs(120));
        assert!(
            !c.data("worker-1").join(".syncd-staging").exists(),
            "iteration {v}: staging left after converging"
        );
        // Nobody edited the worker: its own interrupted renames are not taken for edits.
        let backups = c.dir("worker-1", "state/backups");
        let found: Vec<_> = fs::read_dir(&backups)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(
            found.is_empty(),
            "iteration {v}: the agent backed up its own partial apply as local changes: {found:?}"
        );
    }
    eprintln!("{n} kills of the agent, {killed_during_apply} while it was applying");
    assert!(
        killed_during_apply * 2 >= n,
        "too few kills landed during an apply to mean anything"
    );
}

#[test]
fn a_manager_killed_at_random_moments_leaves_workers_whole_and_they_converge() {
    let mut c = Cluster::new(&["worker-1"]);
    let mut versions = Versions::default();
    let mut rng = Rng::new(78);
    let set = files(&mut rng, 40);
    for (rel, len) in &set {
        versions.write(&c.data(MANAGER), rel, *len, 0);
    }
    c.start(MANAGER);
    c.start("worker-1");
    wait_converged(&c, Duration::from_secs(120));
    for v in 1..=iterations() as u64 {
        for (rel, len) in &set {
            if rng.range(0, 3) == 0 {
                versions.write(&c.data(MANAGER), rel, *len, v);
            }
        }
        // Somewhere in its scan, its publication or its transfer.
        std::thread::sleep(Duration::from_millis(rng.range(0, 300)));
        c.kill(MANAGER);
        versions.check(&c.data("worker-1"));
        c.start(MANAGER);
        wait_converged(&c, Duration::from_secs(120));
    }
}

#[test]
fn an_interrupted_transfer_resumes_without_resending_what_arrived() {
    let mut c = Cluster::new(&["worker-1"]);
    c.start(MANAGER);
    c.start("worker-1");
    let size: u64 = 500 << 20;
    let mut versions = Versions::default();
    let target = c.data("worker-1").join("webapps/huge.bin");
    // Kill the agent once about 70% has crossed. The transfer is fast on loopback: if the kill
    // lands after the new version was complete, try again with another one.
    let mut before_kill = 0;
    for attempt in 1..=5u64 {
        let newest = versions.write(&c.data(MANAGER), "webapps/huge.bin", size as usize, attempt);
        let start = c.status("worker-1").nodes[0].bytes_transferred;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let got = c.status("worker-1").nodes[0].bytes_transferred - start;
            if got >= size * 7 / 10 {
                before_kill = got;
                break;
            }
            assert!(Instant::now() < deadline, "the transfer did not progress");
        }
        c.kill("worker-1");
        versions.check(&c.data("worker-1"));
        let arrived =
            fs::read(&target).is_ok_and(|b| syncd_manifest::ChunkHash::of(&b).to_hex() == newest);
        c.start("worker-1");
        if !arrived {
            break;
        }
        eprintln!("attempt {attempt}: the kill came after the file was complete; again");
        wait_converged(&c, Duration::from_secs(120));
        assert!(attempt < 5, "never interrupted the transfer");
    }
    wait_converged(&c, Duration::from_secs(120));
    let after = c.status("worker-1").nodes[0].clone();
    eprintln!(
        "killed after {} MiB of {} MiB; after the restart {} MiB crossed, {} MiB reused",
        before_kill >> 20,
        size >> 20,
        after.bytes_transferred >> 20,
        after.bytes_reused >> 20
    );
    // What arrived before the kill and was written is not sent again (a few chunks in flight
    // at the kill may be).
    assert!(before_kill > 0);
    assert!(
        after.bytes_transferred <= size - before_kill + (16 << 20),
        "{after:?}"
    );
    assert!(!c.data("worker-1").join(".syncd-staging").exists());
}

#[test]
fn a_full_disk_on_a_worker_is_reported_keeps_its_artifacts_and_recovers_when_space_returns() {
    let mut c = Cluster::new(&["worker-1"]);
    let mnt = c.data("worker-1");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipping: cannot mount a tmpfs here (not root?)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let mut versions = Versions::default();
    fs::create_dir_all(c.data(MANAGER).join("webapps")).unwrap();
    for i in 0..8 {
        versions.write(
            &c.data(MANAGER),
            &format!("carbonapps/app-{i}.bin"),
            1 << 20,
            0,
        );
    }
    c.start(MANAGER);
    c.start("worker-1");
    wait_converged(&c, Duration::from_secs(60));
    // Files only: a directory's mtime may follow the manager's while the big file is refused.
    let files_only = |m: BTreeMap<String, support::Item>| -> BTreeMap<String, support::Item> {
        m.into_iter()
            .filter(|(_, i)| matches!(i, support::Item::File { .. }))
            .collect()
    };
    let before = files_only(try_snapshot(&mnt).unwrap());

    // 30 MiB more than the worker's disk holds.
    versions.write(&c.data(MANAGER), "webapps/too-big.bin", 30 << 20, 0);
    c.wait_row("worker-1", Duration::from_secs(30), |r| {
        r.last_error
            .as_deref()
            .is_some_and(|e| e.contains("No space left"))
    });
    let own = c.status("worker-1").nodes[0].clone();
    assert!(own.last_error.unwrap().contains("No space left"));
    assert_eq!(
        files_only(try_snapshot(&mnt).unwrap()),
        before,
        "the previous artifacts changed"
    );
    assert!(
        !mnt.join(".syncd-staging").exists(),
        "temporary files left on a full disk"
    );

    // Space returns: the worker catches up by itself, without a restart.
    assert!(
        Command::new("mount")
            .args(["-o", "remount,size=96m"])
            .arg(&mnt)
            .status()
            .unwrap()
            .success()
    );
    wait_converged(&c, Duration::from_secs(90));
    assert!(c.status("worker-1").nodes[0].last_error.is_none());
}
