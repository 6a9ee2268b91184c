//! The operator's procedures of PRODUCT.md, each a script of operator steps against real daemons
//! on loopback, driven with `syncctl`.

mod support;

use std::fs;
use std::time::Duration;

use support::cluster::{Cluster, MANAGER, copy_tree};
use support::{assert_same_tree, snapshot};
use syncd_devtools::{Archive, Rng, Scale, generate, write_archive};

/// Deploys an artifact as a build pipeline does: written beside, renamed into place.
fn deploy(c: &Cluster, path: &str, kind: Archive, len: u64, seed: u64) {
    let tmp = c.root.path().join("build-output");
    write_archive(&tmp, kind, len, &mut Rng::new(seed), seed as u32).unwrap();
    let dest = c.data(MANAGER).join(path);
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    fs::rename(&tmp, dest).unwrap();
}

#[test]
fn procedure_1_adding_a_new_service() {
    let mut c = Cluster::new(&["worker-1", "worker-2"]);
    generate(&c.data(MANAGER), Scale::SMALL, 1).unwrap();
    for n in [MANAGER, "worker-1", "worker-2"] {
        c.start(n);
    }
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);

    // Deploy once on the manager; `syncctl wait` returns when every worker has it.
    deploy(
        &c,
        "carbonapps/orders-service_1.0.0.car",
        Archive::Car,
        3_000_000,
        7,
    );
    let out = c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    assert!(out.contains("applied by every agent"), "{out}");
    for w in ["worker-1", "worker-2"] {
        assert_same_tree(&c.data(MANAGER), &c.data(w));
        assert_eq!(c.row(w).state, "in sync");
    }
}

#[test]
fn procedure_2_updating_a_service_with_an_extra_worker_and_a_hold() {
    let mut c = Cluster::new(&["worker-1", "worker-2", "worker-3"]);
    generate(&c.data(MANAGER), Scale::SMALL, 2).unwrap();
    // The extra worker is prepared from an old copy of the tree.
    copy_tree(&c.data(MANAGER), &c.data("worker-3"));
    for n in [MANAGER, "worker-1", "worker-2"] {
        c.start(n);
    }
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    let xml = c
        .data(MANAGER)
        .join("synapse-configs/default/api/service-0005.xml");
    let text = fs::read_to_string(&xml)
        .unwrap()
        .replacen("GET", "PATCH", 1);
    fs::write(&xml, &text).unwrap();
    c.ctl(MANAGER, &["wait", "--timeout", "30s"]);

    // The extra worker joins: only the difference from its old copy crosses.
    c.start("worker-3");
    c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    assert_same_tree(&c.data(MANAGER), &c.data("worker-3"));
    let joined = c.status("worker-3").nodes[0].clone();
    assert_eq!(
        joined.bytes_transferred,
        text.len() as u64,
        "only the edited XML crossed: {joined:?}"
    );

    // Hold distribution, deploy the patch on the manager, test it there.
    let out = c.ctl(MANAGER, &["pause"]);
    assert!(out.contains("holding publication"), "{out}");
    let before: Vec<_> = ["worker-1", "worker-2", "worker-3"]
        .iter()
        .map(|w| snapshot(&c.data(w)))
        .collect();
    deploy(
        &c,
        "carbonapps/app-001_1.0.0.car",
        Archive::Car,
        1_500_000,
        99,
    );
    fs::write(
        c.data(MANAGER)
            .join("synapse-configs/default/api/patched.xml"),
        b"<api name=\"patched\"/>",
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let status = c.status(MANAGER);
    assert!(status.hold.is_some());
    assert_eq!(status.pending_total, 2, "{:?}", status.pending);
    assert!(
        status
            .nodes
            .iter()
            .filter(|n| n.connected)
            .all(|n| n.state == "held"),
        "{:?}",
        status.nodes
    );
    let table = c.ctl(MANAGER, &["status"]);
    assert!(table.contains("HOLDING publication"), "{table}");
    assert!(table.contains("carbonapps/app-001_1.0.0.car"), "{table}");
    for (w, b) in ["worker-1", "worker-2", "worker-3"].iter().zip(&before) {
        assert_eq!(&snapshot(&c.data(w)), b, "{w} changed during the hold");
    }

    // Traffic switched: resume, wait, every worker has exactly the patch.
    let out = c.ctl(MANAGER, &["resume"]);
    assert!(out.contains("publication resumed"), "{out}");
    c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    for w in ["worker-1", "worker-2", "worker-3"] {
        assert_same_tree(&c.data(MANAGER), &c.data(w));
    }

    // The extra worker leaves: it shows as offline, and waits do not count it.
    c.stop("worker-3");
    c.wait_row("worker-3", Duration::from_secs(10), |r| {
        r.state == "offline"
    });
    fs::write(
        c.data(MANAGER)
            .join("synapse-configs/default/api/after.xml"),
        b"<api/>",
    )
    .unwrap();
    let out = c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    assert!(
        out.contains("worker-3: offline") && out.contains("not waited for"),
        "{out}"
    );
    let strict = c.syncctl(MANAGER, &["wait", "--timeout", "2s", "--all"]);
    assert_eq!(
        strict.status.code(),
        Some(3),
        "with --all the offline worker counts"
    );
    assert!(String::from_utf8_lossy(&strict.stdout).contains("worker-3: offline"));
}

/// Files written by the rolling-restart writer carry their own length and hash, so a reader can
/// tell a complete file from a partial one without knowing which version it holds.
fn self_checking(i: u64, rng: &mut Rng) -> Vec<u8> {
    let mut body = vec![0u8; rng.range(1_000, 400_000) as usize];
    rng.fill(&mut body);
    let mut out = format!(
        "{i} {} {}\n",
        body.len(),
        syncd_manifest::ChunkHash::of(&body).to_hex()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

fn is_whole(bytes: &[u8]) -> bool {
    let Some(nl) = bytes.iter().position(|&b| b == b'\n') else {
        return false;
    };
    let head = String::from_utf8_lossy(&bytes[..nl]).into_owned();
    let mut parts = head.split(' ');
    let (_, len, hash) = (parts.next(), parts.next(), parts.next());
    let body = &bytes[nl + 1..];
    len.and_then(|l| l.parse::<usize>().ok()) == Some(body.len())
        && hash == Some(syncd_manifest::ChunkHash::of(body).to_hex().as_str())
}

#[test]
fn procedure_3_rolling_restarts_while_artifacts_change() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let mut c = Cluster::new(&["worker-1", "worker-2"]);
    generate(&c.data(MANAGER), Scale::SMALL, 3).unwrap();
    fs::create_dir_all(c.data(MANAGER).join("rolling")).unwrap();
    for n in [MANAGER, "worker-1", "worker-2"] {
        c.start(n);
    }
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);

    // A writer keeps changing artifacts on the manager (in place, no rename); watchers check
    // that every file a worker exposes is whole.
    let stop = Arc::new(AtomicBool::new(false));
    let partial = Arc::new(AtomicUsize::new(0));
    let checked = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, dir) = (stop.clone(), c.data(MANAGER).join("rolling"));
        std::thread::spawn(move || {
            let mut rng = Rng::new(5);
            let mut i = 0;
            while !stop.load(Ordering::Acquire) {
                fs::write(
                    dir.join(format!("artifact-{}.bin", i % 12)),
                    self_checking(i, &mut rng),
                )
                .unwrap();
                i += 1;
                std::thread::sleep(Duration::from_millis(40));
            }
        })
    };
    let watchers: Vec<_> = ["worker-1", "worker-2"]
        .iter()
        .map(|w| {
            let (stop, partial, checked, dir) = (
                stop.clone(),
                partial.clone(),
                checked.clone(),
                c.data(w).join("rolling"),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                        if let Ok(bytes) = fs::read(e.path()) {
                            checked.fetch_add(1, Ordering::Relaxed);
                            if !is_whole(&bytes) {
                                partial.fetch_add(1, Ordering::Relaxed);
                                eprintln!("partial file exposed: {}", e.path().display());
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();

    // Restart every daemon, one at a time, cleanly and then by SIGKILL.
    for node in [MANAGER, "worker-1", "worker-2"] {
        std::thread::sleep(Duration::from_millis(700));
        c.stop(node);
        std::thread::sleep(Duration::from_millis(300));
        c.start(node);
    }
    for node in ["worker-1", MANAGER, "worker-2"] {
        std::thread::sleep(Duration::from_millis(700));
        c.kill(node);
        std::thread::sleep(Duration::from_millis(300));
        c.start(node);
    }
    stop.store(true, Ordering::Release);
    writer.join().unwrap();
    for w in watchers {
        w.join().unwrap();
    }
    // `--all`: a worker still reconnecting after its restart counts too.
    c.ctl(MANAGER, &["wait", "--timeout", "60s", "--all"]);
    for w in ["worker-1", "worker-2"] {
        assert_same_tree(&c.data(MANAGER), &c.data(w));
        assert!(
            !c.data(w).join(".syncd-staging").exists(),
            "staging left in {w}"
        );
    }
    assert_eq!(
        partial.load(Ordering::Relaxed),
        0,
        "a worker exposed a partial file"
    );
    assert!(checked.load(Ordering::Relaxed) > 100);

    // Restarting an agent with nothing changed re-sends nothing.
    c.stop("worker-1");
    c.start("worker-1");
    c.wait_row("worker-1", Duration::from_secs(20), |r| {
        r.state == "in sync"
    });
    assert_eq!(c.status("worker-1").nodes[0].bytes_transferred, 0);
}

#[test]
fn procedure_4_version_upgrade_fills_a_new_folder_from_local_bytes() {
    let mut c = Cluster::new(&["worker-1"]);
    generate(&c.data(MANAGER), Scale::SMALL, 4).unwrap();
    c.start(MANAGER);
    c.start("worker-1");
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    c.stop("worker-1");
    c.stop(MANAGER);

    // The new product version's deployment folder: the old artifacts plus one new CAR.
    c.add_folder("deployment-4.3", "wso2am-4.3/deployment");
    copy_tree(&c.data(MANAGER), &c.dir(MANAGER, "wso2am-4.3/deployment"));
    let new_car = c.dir(
        MANAGER,
        "wso2am-4.3/deployment/carbonapps/new-feature_1.0.0.car",
    );
    write_archive(&new_car, Archive::Car, 400_000, &mut Rng::new(43), 1).unwrap();
    let new_len = fs::metadata(&new_car).unwrap().len();
    c.start(MANAGER);
    c.start("worker-1");
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    assert_same_tree(
        &c.dir(MANAGER, "wso2am-4.3/deployment"),
        &c.dir("worker-1", "wso2am-4.3/deployment"),
    );
    assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));
    let row = c.status("worker-1").nodes[0].clone();
    // Everything but the new CAR came from the old folder on the worker itself.
    assert!(row.bytes_transferred <= new_len, "{row:?}");
    assert!(row.bytes_reused > 5_000_000, "{row:?}");
}

#[test]
fn procedure_5_a_worker_down_catches_up_and_a_paused_worker_stays_untouched() {
    let mut c = Cluster::new(&["worker-1", "worker-2"]);
    generate(&c.data(MANAGER), Scale::SMALL, 5).unwrap();
    for n in [MANAGER, "worker-1", "worker-2"] {
        c.start(n);
    }
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);

    // worker-1 goes down for several generations.
    c.stop("worker-1");
    // worker-2 is paused from the manager.
    let out = c.ctl(MANAGER, &["pause", "worker-2"]);
    assert!(out.contains("worker-2 paused"), "{out}");
    c.wait_row("worker-2", Duration::from_secs(10), |r| r.state == "paused");
    let frozen = snapshot(&c.data("worker-2"));
    for g in 0..3 {
        fs::write(
            c.data(MANAGER)
                .join(format!("synapse-configs/default/api/gen-{g}.xml")),
            format!("<api g=\"{g}\"/>"),
        )
        .unwrap();
        c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    }
    assert_eq!(
        snapshot(&c.data("worker-2")),
        frozen,
        "a paused worker changed"
    );
    let row = c.row("worker-2");
    assert!(
        row.behind_generations >= 3 && row.paused_by.as_deref() == Some("manager"),
        "{row:?}"
    );
    let table = c.ctl(MANAGER, &["status"]);
    assert!(table.contains("paused by manager"), "{table}");

    // The pause survives restarts of both daemons.
    c.stop("worker-2");
    c.stop(MANAGER);
    c.start(MANAGER);
    c.start("worker-2");
    assert_eq!(c.status("worker-2").nodes[0].state, "paused");
    fs::write(
        c.data(MANAGER)
            .join("synapse-configs/default/api/gen-3.xml"),
        b"<api/>",
    )
    .unwrap();
    c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    assert_eq!(
        snapshot(&c.data("worker-2")),
        frozen,
        "a paused worker changed after restarts"
    );

    // worker-1 returns and catches up.
    c.start("worker-1");
    c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));

    // A local edit on the paused worker is listed, then backed up on resume; it converges.
    let edited = c
        .data("worker-2")
        .join("synapse-configs/default/api/service-0001.xml");
    fs::write(&edited, b"<api name=\"hand-edited\"/>").unwrap();
    let changes = c.ctl("worker-2", &["changes"]);
    assert!(
        changes.contains("modified") && changes.contains("service-0001.xml"),
        "{changes}"
    );
    // The operator on the manager sees it too: a paused worker compares its folders and
    // reports what changed, reverting nothing.
    let listed = "modified  deployment/synapse-configs/default/api/service-0001.xml (paused)";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = c.ctl(MANAGER, &["changes", "worker-2"]);
        if out.contains(listed) {
            assert!(out.starts_with("worker-2 is paused"), "{out}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the manager never listed the paused worker's change: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let table = c.ctl(MANAGER, &["status"]);
    assert!(
        table.contains(
            "drift: modified deployment/synapse-configs/default/api/service-0001.xml (paused)"
        ),
        "{table}"
    );
    assert_eq!(fs::read(&edited).unwrap(), b"<api name=\"hand-edited\"/>");
    let out = c.ctl(MANAGER, &["resume", "worker-2"]);
    assert!(out.contains("resumed"), "{out}");
    c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    assert_same_tree(&c.data(MANAGER), &c.data("worker-2"));
    // What was listed during the pause goes once it is backed up and converged.
    c.wait_row("worker-2", Duration::from_secs(10), |r| r.drift.is_empty());
    let out = c.ctl(MANAGER, &["changes", "worker-2"]);
    assert!(out.contains("no local changes"), "{out}");
    let backups = c.dir("worker-2", "state/backups");
    let kept: Vec<_> = walk(&backups)
        .into_iter()
        .filter(|p| p.ends_with("service-0001.xml"))
        .collect();
    assert_eq!(kept.len(), 1, "the hand edit was backed up");
    assert_eq!(fs::read(&kept[0]).unwrap(), b"<api name=\"hand-edited\"/>");
}

#[test]
fn procedure_5_a_recovery_site_behind_a_rate_cap_holds_back_no_other_worker() {
    // A second data center is reached over a slow link: its agent gets a cap (`max_rate` in
    // its entry of the manager's config); the worker beside the manager has none.
    const RATE: f64 = 1_048_576.0;
    let mut c = Cluster::new(&["worker-1", "dr-1"]);
    c.agent_entry_option("dr-1", "max_rate = \"1MiB/s\"");
    for n in [MANAGER, "worker-1", "dr-1"] {
        c.start(n);
    }
    c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    let table = c.ctl(MANAGER, &["status"]);
    assert!(
        table.contains("sending capped at 1.0 MB/s (max_rate)"),
        "{table}"
    );
    assert_eq!(c.row("dr-1").max_rate, Some(1_048_576));
    assert_eq!(c.row("worker-1").max_rate, None);

    // 4 MB of random bytes (nothing to compress, nothing to reuse).
    let mut bytes = vec![0u8; 4_000_000];
    std::io::Read::read_exact(&mut fs::File::open("/dev/urandom").unwrap(), &mut bytes).unwrap();
    let tmp = c.root.path().join("build-output");
    fs::write(&tmp, &bytes).unwrap();
    let start = std::time::Instant::now();
    fs::rename(&tmp, c.data(MANAGER).join("blob.bin")).unwrap();
    let arrived =
        |node: &str| fs::read(c.data(node).join("blob.bin")).ok().as_ref() == Some(&bytes);
    let mut lan = None;
    while !arrived("dr-1") {
        if lan.is_none() && arrived("worker-1") {
            lan = Some(start.elapsed());
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "dr-1 never got the file"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let dr = start.elapsed();
    let lan = lan.expect("worker-1 had the file before dr-1");
    // At 1 MiB/s, less the cap's first burst (64 KiB), 4 MB take at least 3.75 s.
    let floor = Duration::from_secs_f64((4_000_000.0 - 65_536.0) / RATE);
    assert!(
        dr >= floor,
        "dr-1 got 4 MB in {dr:?}: faster than its cap allows ({floor:?})"
    );
    assert!(
        lan < dr / 2,
        "worker-1 took {lan:?}, dr-1 {dr:?}: the cap held back an uncapped worker"
    );
    c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    assert_same_tree(&c.data(MANAGER), &c.data("dr-1"));
    assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));
    eprintln!("worker-1 {lan:?}, dr-1 {dr:?} (cap 1 MiB/s, floor {floor:?})");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
