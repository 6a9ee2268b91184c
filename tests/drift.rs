//! Read-only workers: local changes on a worker are caught within seconds, backed up, and
//! reverted (or only reported); a path rewritten in a loop is left alone after a few reverts;
//! excluded paths are untouched on both sides.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use support::cluster::{Cluster, MANAGER};
use support::{assert_same_tree, converge_blocking, snapshot};
use syncd_devtools::{Scale, generate};

fn cluster(seed: u64, report: bool) -> Cluster {
    let mut c = Cluster::new(&["worker-1"]);
    if report {
        c.folder_option("worker-1", "drift = \"report\"");
    }
    generate(&c.data(MANAGER), Scale::SMALL, seed).unwrap();
    c.start(MANAGER);
    c.start("worker-1");
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    c
}

/// The hand changes of the issue, applied to a worker's folder.
fn tamper(w: &std::path::Path) {
    let api = w.join("synapse-configs/default/api");
    fs::write(api.join("service-0001.xml"), b"<api name=\"hand-edited\"/>").unwrap();
    fs::remove_file(api.join("service-0002.xml")).unwrap();
    fs::write(api.join("hand-added.xml"), b"<api name=\"stray\"/>").unwrap();
    fs::set_permissions(
        api.join("service-0003.xml"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    fs::File::options()
        .write(true)
        .open(api.join("service-0005.xml"))
        .unwrap()
        .set_times(fs::FileTimes::new().set_modified(t))
        .unwrap();
}

fn backed_up_files(c: &Cluster) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![c.dir("worker-1", "state/backups")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out
}

/// Asserts that each `(file name, contents)` is among worker-1's backups.
fn assert_backed_up(c: &Cluster, files: &[(&str, &[u8])]) {
    let kept = backed_up_files(c);
    for (name, hand) in files {
        assert!(
            kept.iter().any(|(n, b)| n == name && b == hand),
            "{name} not backed up: {kept:?}; see {}",
            c.log("worker-1")
        );
    }
}

#[test]
fn hand_changes_are_reverted_within_seconds_and_kept_in_backups() {
    let c = cluster(31, false);
    tamper(&c.data("worker-1"));
    let started = Instant::now();
    converge_blocking(
        &c.data(MANAGER),
        &c.data("worker-1"),
        Duration::from_secs(10),
    );
    eprintln!("reverted in {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(5));
    let kept = backed_up_files(&c);
    assert!(
        kept.iter()
            .any(|(n, b)| n == "service-0001.xml" && b == b"<api name=\"hand-edited\"/>"),
        "{:?}",
        kept.iter().map(|k| &k.0).collect::<Vec<_>>()
    );
    assert!(
        kept.iter()
            .any(|(n, b)| n == "hand-added.xml" && b == b"<api name=\"stray\"/>")
    );
    // The tampering takes several steps; a check may land between them and revert in two
    // rounds, each with its own index.
    let index = kept
        .iter()
        .filter(|(n, _)| n == "CHANGES")
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(!index.is_empty(), "no CHANGES index among the backups");
    for want in [
        "modified\tdeployment/synapse-configs/default/api/service-0001.xml",
        "removed\tdeployment/synapse-configs/default/api/service-0002.xml",
        "added\tdeployment/synapse-configs/default/api/hand-added.xml",
    ] {
        assert!(index.contains(want), "{want} not in {index}");
    }
    let listed = c.ctl("worker-1", &["backups"]);
    assert!(
        listed.contains("drift-") && listed.contains("service-0001.xml"),
        "{listed}"
    );
    let row = c.row("worker-1");
    assert!(row.drift_reverted >= 5, "{row:?}");
    assert_eq!(row.state, "in sync");
}

#[test]
fn under_report_hand_changes_are_flagged_and_left() {
    let c = cluster(32, true);
    tamper(&c.data("worker-1"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let row = c.row("worker-1");
        if row.drift.len() == 5 {
            assert_eq!(row.state, "drifted");
            assert!(row.drift.iter().all(|d| d.action == "reported"), "{row:?}");
            break;
        }
        assert!(Instant::now() < deadline, "drift not reported: {row:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let table = c.ctl(MANAGER, &["status"]);
    assert!(
        table.contains("drifted")
            && table.contains(
                "drift: modified deployment/synapse-configs/default/api/service-0001.xml (reported)"
            ),
        "{table}"
    );
    // Nothing was touched.
    let w = c.data("worker-1").join("synapse-configs/default/api");
    assert_eq!(
        fs::read(w.join("service-0001.xml")).unwrap(),
        b"<api name=\"hand-edited\"/>"
    );
    assert!(!w.join("service-0002.xml").exists());
    assert!(w.join("hand-added.xml").exists());
    // A restart keeps reporting them instead of undoing them.
    let mut c = c;
    c.stop("worker-1");
    c.start("worker-1");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        fs::read(w.join("service-0001.xml")).unwrap(),
        b"<api name=\"hand-edited\"/>"
    );
    c.wait_row("worker-1", Duration::from_secs(10), |r| r.drift.len() == 5);

    // A later change is compared on its own (only the paths the watch reported): the five
    // stay listed beside it.
    let edited = "synapse-configs/default/api/service-0010.xml";
    fs::write(c.data("worker-1").join(edited), b"<api name=\"later\"/>").unwrap();
    c.wait_row("worker-1", Duration::from_secs(10), |r| r.drift.len() == 6);
    let row = c.row("worker-1");
    assert!(
        row.drift
            .iter()
            .any(|d| d.path.ends_with("service-0010.xml")),
        "{row:?}"
    );
    // Put back by hand exactly as published (bytes, mode, mtime): no longer listed, and the
    // others still are.
    let published = c.data(MANAGER).join(edited);
    let local = c.data("worker-1").join(edited);
    fs::write(&local, fs::read(&published).unwrap()).unwrap();
    let meta = fs::metadata(&published).unwrap();
    fs::set_permissions(&local, meta.permissions()).unwrap();
    fs::File::options()
        .write(true)
        .open(&local)
        .unwrap()
        .set_times(fs::FileTimes::new().set_modified(meta.modified().unwrap()))
        .unwrap();
    c.wait_row("worker-1", Duration::from_secs(10), |r| {
        r.drift.len() == 5 && !r.drift.iter().any(|d| d.path.ends_with("service-0010.xml"))
    });
    let row = c.row("worker-1");
    assert!(
        row.drift
            .iter()
            .any(|d| d.path.ends_with("service-0001.xml")),
        "{row:?}"
    );
}

#[test]
fn a_path_rewritten_in_a_loop_is_left_alone_after_a_few_reverts() {
    let c = cluster(33, false);
    let target = c
        .data("worker-1")
        .join("synapse-configs/default/api/service-0004.xml");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, target) = (stop.clone(), target.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let _ = fs::write(&target, format!("<api rewritten=\"{i}\"/>"));
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    c.wait_row("worker-1", Duration::from_secs(20), |r| {
        r.drift.iter().any(|d| d.action == "flapping")
    });
    let reverted_then = c.row("worker-1").drift_reverted;
    std::thread::sleep(Duration::from_secs(2));
    let row = c.row("worker-1");
    assert_eq!(
        row.drift_reverted, reverted_then,
        "kept fighting the loop: {row:?}"
    );
    stop.store(true, std::sync::atomic::Ordering::Release);
    writer.join().unwrap();
    assert!(String::from_utf8_lossy(&fs::read(&target).unwrap()).contains("rewritten"));
    // The operator takes it back: resume forgives the path, and it is reverted.
    c.ctl("worker-1", &["resume"]);
    converge_blocking(
        &c.data(MANAGER),
        &c.data("worker-1"),
        Duration::from_secs(10),
    );
}

#[test]
fn excluded_paths_are_untouched_on_both_sides() {
    let c = cluster(34, false);
    fs::write(
        c.data(MANAGER)
            .join("synapse-configs/default/api/service-0001.xml.back"),
        b"manager backup",
    )
    .unwrap();
    fs::create_dir_all(c.data(MANAGER).join("work/cache")).unwrap();
    fs::write(c.data(MANAGER).join("work/cache/x"), b"scratch").unwrap();
    let worker_back = c
        .data("worker-1")
        .join("synapse-configs/default/api/local.xml.back");
    fs::write(&worker_back, b"worker's own").unwrap();
    fs::write(
        c.data(MANAGER)
            .join("synapse-configs/default/api/trigger.xml"),
        b"<t/>",
    )
    .unwrap();
    c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !c.data("worker-1")
            .join("synapse-configs/default/api/service-0001.xml.back")
            .exists()
    );
    assert!(!c.data("worker-1").join("work").exists());
    assert_eq!(fs::read(&worker_back).unwrap(), b"worker's own");
    let row = c.row("worker-1");
    assert!(row.drift.is_empty() && row.drift_reverted == 0, "{row:?}");
}

#[test]
fn changes_made_while_the_agent_was_down_are_backed_up_then_undone() {
    let mut c = cluster(35, false);
    c.stop("worker-1");
    fs::write(
        c.data("worker-1")
            .join("synapse-configs/default/api/service-0001.xml"),
        b"<edited-offline/>",
    )
    .unwrap();
    c.start("worker-1");
    c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    converge_blocking(
        &c.data(MANAGER),
        &c.data("worker-1"),
        Duration::from_secs(10),
    );
    assert!(
        backed_up_files(&c)
            .iter()
            .any(|(n, b)| n == "service-0001.xml" && b == b"<edited-offline/>")
    );
    assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));
    let _ = snapshot(&c.data("worker-1"));
}

/// A file edited by hand and left in place (`report`) is not a source of unchanged chunks for
/// the manager's next version of it: its bytes are checked, and those that changed are fetched.
/// (An untouched file's chunks are copied unhashed: its stat key is the one it was written with.)
#[test]
fn a_hand_edited_file_lends_none_of_its_changed_bytes_to_the_next_version() {
    let c = cluster(36, true);
    let (mgr, worker) = (c.data(MANAGER), c.data("worker-1"));
    let deploy = |bytes: &[u8]| {
        let tmp = c.dir(MANAGER, "big.tmp");
        fs::write(&tmp, bytes).unwrap();
        fs::rename(&tmp, mgr.join("big.bin")).unwrap();
        c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    };
    // Large enough for direct writes and many chunks.
    let mut v1 = vec![0u8; 3 << 20];
    syncd_devtools::Rng::new(36).fill(&mut v1);
    deploy(&v1);
    assert_eq!(fs::read(worker.join("big.bin")).unwrap(), v1);
    // Bytes in the middle changed by hand on the worker, the length kept.
    let mut edited = v1.clone();
    edited[1 << 20..(1 << 20) + 4096].fill(0xAB);
    fs::write(worker.join("big.bin"), &edited).unwrap();
    c.wait_row("worker-1", Duration::from_secs(10), |r| {
        r.drift.iter().any(|d| d.path.ends_with("big.bin"))
    });
    // The next version shares every chunk but the last with the first.
    let mut v2 = v1.clone();
    v2.extend_from_slice(b"a new last chunk");
    deploy(&v2);
    assert_eq!(fs::read(worker.join("big.bin")).unwrap(), v2);
}

#[test]
fn a_paused_worker_lists_its_hand_changes_without_reverting_them_even_cut_off() {
    let mut c = cluster(16, false);
    c.ctl("worker-1", &["pause"]);
    c.stop(MANAGER);
    let frozen = snapshot(&c.data("worker-1"));
    tamper(&c.data("worker-1"));
    let tampered = snapshot(&c.data("worker-1"));
    assert_ne!(frozen, tampered);
    // Listed in its status within seconds, each as `paused`, and nothing reverted.
    let deadline = Instant::now() + Duration::from_secs(10);
    let row = loop {
        let row = c.status("worker-1").nodes.remove(0);
        if row.drift.len() == 5 {
            break row;
        }
        assert!(Instant::now() < deadline, "not listed: {row:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(row.drift.iter().all(|d| d.action == "paused"), "{row:?}");
    assert_eq!(
        snapshot(&c.data("worker-1")),
        tampered,
        "a paused worker changed"
    );
    // A resume while the manager is away backs them up; they are what the worker holds now,
    // so the list empties at once rather than at the next periodic check.
    let out = c.ctl("worker-1", &["resume"]);
    assert!(out.contains("backed up"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.status("worker-1").nodes[0].drift.is_empty() {
        assert!(
            Instant::now() < deadline,
            "still listed after the resume: {:?}",
            c.status("worker-1").nodes[0].drift
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Once the manager is back, the worker converges.
    c.start(MANAGER);
    converge_blocking(
        &c.data(MANAGER),
        &c.data("worker-1"),
        Duration::from_secs(30),
    );
}

/// The agent runs as an unprivileged user (as its systemd unit does). A hand edit it may not
/// read (a file written by root, mode 0600) is not taken as a removal and recreated over: it is
/// left as it is, through a restart too, until the agent can read it; then it is backed up and
/// reverted like any other. Nothing is lost.
#[test]
fn a_hand_edit_the_agent_cannot_read_is_left_not_overwritten_until_it_can_be_backed_up() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to run the agent as another user");
        return;
    }
    let mut c = Cluster::new(&["worker-1"]);
    fs::write(c.data(MANAGER).join("a.xml"), b"<a/>").unwrap();
    c.run_as_nobody("worker-1", true);
    c.start(MANAGER);
    c.start("worker-1");
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    let file = c.data("worker-1").join("a.xml");
    assert_eq!(fs::read(&file).unwrap(), b"<a/>");

    // Root replaces the file with one the agent may not read.
    fs::remove_file(&file).unwrap();
    fs::write(&file, b"<hand-edited by root/>").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    let left = |c: &Cluster| {
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(
            fs::read(&file).unwrap(),
            b"<hand-edited by root/>",
            "overwritten; see {}",
            c.log("worker-1")
        );
        // Listed where the operator looks, on the manager too.
        let row = c.row("worker-1");
        assert_eq!(row.state, "drifted", "{row:?}");
        assert!(
            row.drift
                .iter()
                .any(|d| d.path == "a.xml" && d.change == "unreadable" && d.action == "left"),
            "{row:?}"
        );
    };
    left(&c);
    c.stop("worker-1");
    c.start("worker-1");
    left(&c);

    // Readable again: backed up, then reverted.
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while fs::read(&file).unwrap() != b"<a/>" {
        assert!(
            Instant::now() < deadline,
            "not reverted; see {}",
            c.log("worker-1")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        backed_up_files(&c)
            .iter()
            .any(|(name, bytes)| name == "a.xml" && bytes == b"<hand-edited by root/>"),
        "{:?}",
        backed_up_files(&c)
    );
}

/// Under `drift = "report"` a hand change is left in place, but a new generation that replaces
/// the same path does not lose it: the local version is backed up (`replaced-<time>`) before
/// the manager's overwrites it, for an edited file and for a file added by hand at a path the
/// manager then adds too.
#[test]
fn a_reported_hand_change_that_a_new_generation_replaces_is_backed_up_first() {
    let c = cluster(33, true);
    let (m, w) = (
        c.data(MANAGER).join("synapse-configs/default/api"),
        c.data("worker-1").join("synapse-configs/default/api"),
    );
    fs::write(w.join("service-0001.xml"), b"<api name=\"hand-edited\"/>").unwrap();
    fs::write(w.join("both-added.xml"), b"<api name=\"added by hand\"/>").unwrap();
    fs::create_dir(w.join("new-dir")).unwrap();
    fs::write(
        w.join("new-dir/in-both.xml"),
        b"<api name=\"in a new dir by hand\"/>",
    )
    .unwrap();
    let reported = |c: &Cluster| {
        let drift = c.row("worker-1").drift;
        ["service-0001.xml", "both-added.xml", "new-dir"]
            .iter()
            .all(|name| drift.iter().any(|d| d.path.contains(name)))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !reported(&c) {
        assert!(
            Instant::now() < deadline,
            "not reported: {:?}",
            c.row("worker-1")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    fs::write(
        m.join("service-0001.xml"),
        b"<api name=\"from the manager\"/>",
    )
    .unwrap();
    fs::write(
        m.join("both-added.xml"),
        b"<api name=\"added on the manager\"/>",
    )
    .unwrap();
    fs::create_dir(m.join("new-dir")).unwrap();
    fs::write(
        m.join("new-dir/in-both.xml"),
        b"<api name=\"in a new dir\"/>",
    )
    .unwrap();
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));
    assert_backed_up(
        &c,
        &[
            ("service-0001.xml", b"<api name=\"hand-edited\"/>"),
            ("both-added.xml", b"<api name=\"added by hand\"/>"),
            ("in-both.xml", b"<api name=\"in a new dir by hand\"/>"),
        ],
    );
    let backups = c.ctl("worker-1", &["backups"]);
    assert!(backups.contains("replaced-"), "{backups}");
}

/// Waits until the manager's row of worker-1 lists every one of `names` as drift.
fn wait_reported(c: &Cluster, names: &[&str]) {
    c.wait_row("worker-1", Duration::from_secs(10), |row| {
        names
            .iter()
            .all(|name| row.drift.iter().any(|d| d.path.ends_with(name)))
    });
}

/// A cluster under `report` whose manager deployed `synapse-configs/default/bundle/first.xml`;
/// with that directory (`synapse-configs/default`) on the manager and on worker-1.
fn with_bundle(seed: u64) -> (Cluster, PathBuf, PathBuf) {
    let c = cluster(seed, true);
    let (m, w) = (
        c.data(MANAGER).join("synapse-configs/default"),
        c.data("worker-1").join("synapse-configs/default"),
    );
    fs::create_dir(m.join("bundle")).unwrap();
    fs::write(m.join("bundle/first.xml"), b"<api name=\"first\"/>").unwrap();
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    (c, m, w)
}

/// Under `report`, files added by hand inside a directory that the manager then replaces with
/// a file are backed up before the directory goes (they used to fail the apply, and the retry,
/// which had taken them for applied, removed them without a backup).
#[test]
fn a_directory_the_manager_turns_into_a_file_keeps_what_was_added_in_it_by_hand() {
    let (c, m, w) = with_bundle(34);
    fs::write(w.join("bundle/by-hand.xml"), b"<api name=\"by hand\"/>").unwrap();
    fs::create_dir(w.join("bundle/hand-dir")).unwrap();
    fs::write(w.join("bundle/hand-dir/deep.xml"), b"<api name=\"deep\"/>").unwrap();
    wait_reported(&c, &["bundle/by-hand.xml", "bundle/hand-dir/deep.xml"]);

    fs::remove_dir_all(m.join("bundle")).unwrap();
    fs::write(m.join("bundle"), b"now a file").unwrap();
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));
    assert_backed_up(
        &c,
        &[
            ("by-hand.xml", b"<api name=\"by hand\"/>"),
            ("deep.xml", b"<api name=\"deep\"/>"),
        ],
    );
    c.wait_row("worker-1", Duration::from_secs(10), |row| {
        row.drift.is_empty() && row.last_error.is_none()
    });
}

/// A generation that fails part-way through its renames (here: a directory the manager turned
/// into a file still holds a file the worker excludes, which syncd never touches) makes the
/// agent look at its folder again. What it finds there that it did not put is a local change,
/// not something applied: under `report` it stays listed, and it is backed up before a later
/// generation replaces it.
#[test]
fn a_failed_apply_does_not_take_hand_changes_for_applied_ones() {
    let (c, m, w) = with_bundle(35);
    fs::write(
        w.join("api/service-0001.xml"),
        b"<api name=\"hand-edited\"/>",
    )
    .unwrap();
    // Excluded by default (`**/*.back`): neither side ever touches it.
    fs::write(w.join("bundle/first.xml.back"), b"written by the server").unwrap();
    wait_reported(&c, &["api/service-0001.xml"]);

    fs::remove_dir_all(m.join("bundle")).unwrap();
    fs::write(m.join("bundle"), b"now a file").unwrap();
    c.wait_row("worker-1", Duration::from_secs(20), |row| {
        row.last_error
            .as_deref()
            .is_some_and(|e| e.contains("bundle"))
    });
    let error = c.row("worker-1").last_error.unwrap();
    assert!(error.contains("first.xml.back"), "{error}");
    // The failed apply left the hand edit listed.
    std::thread::sleep(Duration::from_secs(2));
    wait_reported(&c, &["api/service-0001.xml"]);

    // The operator clears the way; the next attempt applies the generation and a later one
    // replaces the hand-edited file, whose hand version must be kept.
    fs::remove_file(w.join("bundle/first.xml.back")).unwrap();
    fs::write(
        m.join("api/service-0001.xml"),
        b"<api name=\"from the manager\"/>",
    )
    .unwrap();
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));
    assert_backed_up(&c, &[("service-0001.xml", b"<api name=\"hand-edited\"/>")]);
}

/// A socket, FIFO or device, or a link that is absolute or leaves the folder, can never have
/// come from the manager: on a worker it is a local change. Under `revert` it is removed (a
/// link backed up as a link); under `report` it is listed and left. It used to be only logged,
/// at every comparison, while the worker showed `in sync`.
#[test]
fn entries_syncd_never_carries_are_local_changes_on_a_worker() {
    for report in [false, true] {
        let c = cluster(36, report);
        let w = c.data("worker-1").join("synapse-configs/default/api");
        std::os::unix::fs::symlink("/etc", w.join("etc-link")).unwrap();
        std::os::unix::fs::symlink("../../../..", w.join("up-link")).unwrap();
        let fifo = w.join("fifo");
        let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        let names = ["api/etc-link", "api/up-link", "api/fifo"];
        if report {
            c.wait_row("worker-1", Duration::from_secs(10), |row| {
                row.state == "drifted"
                    && names.iter().all(|n| {
                        row.drift
                            .iter()
                            .any(|d| d.path.ends_with(n) && d.change == "added")
                    })
            });
            assert!(fs::symlink_metadata(w.join("etc-link")).is_ok());
            assert!(fs::symlink_metadata(&fifo).is_ok());
            let listed = c.ctl("worker-1", &["changes"]);
            assert!(listed.contains("etc-link"), "{listed}");
            continue;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while names
            .iter()
            .any(|n| fs::symlink_metadata(w.join(&n[4..])).is_ok())
        {
            assert!(
                Instant::now() < deadline,
                "not removed; see {}",
                c.log("worker-1")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));
        // The links are kept, as links.
        let mut links = Vec::new();
        let mut stack = vec![c.dir("worker-1", "state/backups")];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).into_iter().flatten().flatten() {
                let meta = fs::symlink_metadata(e.path()).unwrap();
                if meta.is_dir() {
                    stack.push(e.path());
                } else if meta.file_type().is_symlink() {
                    links.push(fs::read_link(e.path()).unwrap());
                }
            }
        }
        links.sort();
        assert_eq!(
            links,
            [PathBuf::from("/etc"), PathBuf::from("../../../..")],
            "see {}",
            c.log("worker-1")
        );
        c.wait_row("worker-1", Duration::from_secs(10), |row| {
            row.state == "in sync" && row.drift.is_empty()
        });
    }
}

/// An operator moves a worker's folder away and puts a new directory at its path (or removes
/// it): the agent used to go on writing into the directory it held open, while the path
/// showed a folder it never filled. It follows the path: the new directory is filled (what
/// was in it backed up), nothing more lands in the old one, and a folder removed outright is
/// made again.
#[test]
fn a_worker_folder_moved_away_or_removed_is_filled_again_at_its_path() {
    let c = cluster(37, false);
    let w = c.data("worker-1");
    let old = w.with_extension("old");
    fs::rename(&w, &old).unwrap();
    fs::create_dir(&w).unwrap();
    fs::write(w.join("restored-by-hand.xml"), b"<api name=\"restored\"/>").unwrap();
    let api = c.data(MANAGER).join("synapse-configs/default/api");
    fs::write(api.join("after-the-move.xml"), b"<api name=\"after\"/>").unwrap();
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    converge_blocking(&c.data(MANAGER), &w, Duration::from_secs(10));
    assert!(
        !old.join("synapse-configs/default/api/after-the-move.xml")
            .exists(),
        "a generation still went into the old directory"
    );
    assert_backed_up(&c, &[("restored-by-hand.xml", b"<api name=\"restored\"/>")]);

    fs::remove_dir_all(&w).unwrap();
    converge_blocking(&c.data(MANAGER), &w, Duration::from_secs(10));
    c.wait_row("worker-1", Duration::from_secs(10), |row| {
        row.state == "in sync" && row.drift.is_empty()
    });
}

/// Under `report`, a file added by hand inside a directory that the manager removes is left in
/// place with its directory (listed), not backed up and logged as replaced: nothing replaces it.
#[test]
fn a_hand_file_in_a_directory_the_manager_removes_is_left_and_listed() {
    let (c, m, w) = with_bundle(38);
    fs::write(w.join("bundle/by-hand.xml"), b"<api name=\"by hand\"/>").unwrap();
    wait_reported(&c, &["bundle/by-hand.xml"]);
    fs::remove_dir_all(m.join("bundle")).unwrap();
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    assert_eq!(
        fs::read(w.join("bundle/by-hand.xml")).unwrap(),
        b"<api name=\"by hand\"/>"
    );
    assert!(!w.join("bundle/first.xml").exists());
    wait_reported(&c, &["bundle/by-hand.xml"]);
    let log = fs::read_to_string(c.log("worker-1")).unwrap();
    assert!(
        !log.contains("replacing a local change"),
        "nothing replaced the hand file; see {}",
        c.log("worker-1")
    );
}

/// Puts `files` Synapse XMLs named `<stem>-<i>.xml` on the manager, starts the cluster, waits
/// until worker-1 has them, then edits every one of them by hand on worker-1.
fn edit_all_on_the_worker(c: &mut Cluster, stem: &str, files: usize) {
    let name = |i: usize| format!("synapse-configs/{stem}-{i}.xml");
    fs::create_dir_all(c.data(MANAGER).join("synapse-configs")).unwrap();
    for i in 0..files {
        fs::write(c.data(MANAGER).join(name(i)), format!("<api n=\"{i}\"/>")).unwrap();
    }
    c.start(MANAGER);
    c.start("worker-1");
    c.ctl(MANAGER, &["wait", "--timeout", "120s"]);
    for i in 0..files {
        fs::write(
            c.data("worker-1").join(name(i)),
            format!("<api n=\"{i}\" x=\"1\"/>"),
        )
        .unwrap();
    }
}

/// Thousands of hand changes left in place on a worker (a `touch` or an edit over a whole
/// tree, under `report` or while paused): the agent reports the first of them to the manager,
/// which says there are more; the uncut list (6,000 long paths here, over 1 MiB) exceeded the
/// frame limit, and the agent's session with the manager ended and began again, forever.
#[test]
fn thousands_of_local_changes_are_reported_in_part_and_the_worker_stays_connected() {
    let mut c = Cluster::new(&["worker-1"]);
    c.folder_option("worker-1", "drift = \"report\"");
    let files = 6_000;
    edit_all_on_the_worker(&mut c, &"a".repeat(180), files);
    c.wait_row("worker-1", Duration::from_secs(60), |r| {
        r.drift.len() == syncd_proto::DRIFT_REPORTED && r.drift_cut
    });
    // The worker lists all of them itself (once its comparisons have found them all).
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.status("worker-1").nodes[0].drift.len() != files {
        assert!(
            Instant::now() < deadline,
            "the worker does not list all of them"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Still the same session a few seconds later: it was not cut off for an oversized report.
    std::thread::sleep(Duration::from_secs(3));
    let log = fs::read_to_string(c.log("worker-1")).unwrap();
    assert!(!log.contains("exceeds the frame limit"), "{log}");
    assert_eq!(log.matches("connected to the manager").count(), 1, "{log}");
    assert!(
        log.contains("more local changes left in place"),
        "one line counts the changes not logged one by one"
    );
    // (Each comparison logs its first 20 new ones: the changes were found over a few.)
    let lines = log.matches("local change left in place").count();
    assert!(lines < files / 10, "{lines} lines for {files} changes");
    let table = c.ctl(MANAGER, &["status"]);
    assert!(
        table.contains("and more than 995 more (`syncctl changes` on worker-1 lists all)"),
        "{table}"
    );
    let listed = c.ctl(MANAGER, &["changes", "worker-1"]);
    assert!(listed.contains("lists them all"), "{listed}");
}

/// Thousands of hand changes reverted at once are logged in brief: the first 20 of each
/// comparison one by one, then a count (the backup's CHANGES file lists them all).
#[test]
fn thousands_of_reverted_changes_are_logged_in_brief_and_listed_in_the_backup() {
    let mut c = Cluster::new(&["worker-1"]);
    let files = 3_000;
    edit_all_on_the_worker(&mut c, "api", files);
    c.wait_row("worker-1", Duration::from_secs(60), |r| {
        r.drift_reverted >= files as u64
    });
    assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));
    let log = fs::read_to_string(c.log("worker-1")).unwrap();
    let lines = log.matches("reverted a local change").count();
    assert!(lines < files / 10, "{lines} lines for {files} reverts");
    assert!(log.contains("reverted more local changes"), "{log}");
    // Every one of them is in a backup's list.
    let backups = c.data("worker-1").join("../state/backups");
    let listed: usize = fs::read_dir(&backups)
        .unwrap()
        .map(|e| {
            fs::read_to_string(e.unwrap().path().join("CHANGES"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with("modified"))
                .count()
        })
        .sum();
    assert_eq!(listed, files);
}

/// A backup larger than `max_backup_mb` by itself (hand edits over more than the limit) is
/// kept: pruning removed it right after the log said the changes were backed up, and then the
/// originals were reverted.
#[test]
fn a_backup_alone_over_the_size_limit_is_kept() {
    let mut c = Cluster::new(&["worker-1"]);
    c.agent_option("max_backup_mb = 1");
    for i in 0..3 {
        fs::write(
            c.data(MANAGER).join(format!("lib-{i}.bin")),
            vec![i as u8; 1 << 20],
        )
        .unwrap();
    }
    c.start(MANAGER);
    c.start("worker-1");
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    for i in 0..3 {
        fs::write(
            c.data("worker-1").join(format!("lib-{i}.bin")),
            vec![9u8; 1 << 20],
        )
        .unwrap();
    }
    c.wait_row("worker-1", Duration::from_secs(30), |r| {
        r.drift_reverted >= 3
    });
    assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));
    let backups = c.data("worker-1").join("../state/backups");
    let kept: Vec<PathBuf> = fs::read_dir(&backups)
        .unwrap()
        .flat_map(|e| {
            fs::read_dir(e.unwrap().path().join("deployment"))
                .into_iter()
                .flatten()
        })
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(kept.len(), 3, "the hand edits were not all kept: {kept:?}");
    for p in kept {
        assert_eq!(fs::read(p).unwrap(), vec![9u8; 1 << 20]);
    }
}
