//! The delete guard: a manager folder that vanishes, is emptied or unmounted, or loses most of
//! its files is not published as mass deletion until the operator confirms it.

mod support;

use std::fs;
use std::process::Command;
use std::time::Duration;

use support::cluster::{Cluster, MANAGER};
use support::{assert_same_tree, snapshot};
use syncd_devtools::{Scale, generate};

fn cluster(seed: u64) -> Cluster {
    let mut c = Cluster::new(&["worker-1"]);
    generate(&c.data(MANAGER), Scale::SMALL, seed).unwrap();
    c.start(MANAGER);
    c.start("worker-1");
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    c
}

/// Waits until the manager's status shows the guard on the deployment folder.
fn wait_guarded(c: &Cluster) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = c.status(MANAGER);
        if let Some(g) = s.guarded.iter().find(|g| g.folder == "deployment") {
            return g.reason.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "guard never engaged: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn empty_dir(dir: &std::path::Path) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && !p.is_symlink() {
            fs::remove_dir_all(p).unwrap();
        } else {
            fs::remove_file(p).unwrap();
        }
    }
}

#[test]
fn an_emptied_folder_deletes_nothing_until_confirmed_then_exactly_everything() {
    let c = cluster(11);
    let before = snapshot(&c.data("worker-1"));
    empty_dir(&c.data(MANAGER));
    let reason = wait_guarded(&c);
    assert!(
        reason.starts_with("would delete") && reason.contains("files"),
        "{reason}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        snapshot(&c.data("worker-1")),
        before,
        "deleted before confirmation"
    );
    let table = c.ctl(MANAGER, &["status"]);
    assert!(
        table.contains("DELETE GUARD on folder deployment"),
        "{table}"
    );

    let out = c.ctl(MANAGER, &["confirm", "deployment"]);
    assert!(out.contains("confirmed"), "{out}");
    c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));
    assert!(c.status(MANAGER).guarded.is_empty());
}

#[test]
fn a_removed_folder_root_deletes_nothing_until_confirmed() {
    let c = cluster(12);
    let before = snapshot(&c.data("worker-1"));
    fs::remove_dir_all(c.data(MANAGER)).unwrap();
    // The files go first (the guard may hold them as a mass deletion), then the root itself.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut reason = wait_guarded(&c);
    while !reason.contains("gone or unreadable") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        reason = wait_guarded(&c);
    }
    assert!(reason.contains("gone or unreadable"), "{reason}");
    // The root comes back with one artifact changed: no confirmation needed, nothing lost.
    generate(&c.data(MANAGER), Scale::SMALL, 12).unwrap();
    fs::write(
        c.data(MANAGER).join("synapse-configs/default/api/back.xml"),
        b"<back/>",
    )
    .unwrap();
    c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));
    assert!(snapshot(&c.data("worker-1")).len() > before.len());
    assert!(c.status(MANAGER).guarded.is_empty());
}

#[test]
fn most_files_deleted_is_held_some_is_not() {
    let c = cluster(13);
    let api = c.data(MANAGER).join("synapse-configs/default/api");
    let files: Vec<_> = fs::read_dir(&api)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    // A third of the XMLs: fine.
    let third = files.len() / 3;
    for f in &files[..third] {
        fs::remove_file(f).unwrap();
    }
    c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));
    // Then everything but a handful of files in the folder: held.
    let before = snapshot(&c.data("worker-1"));
    for dir in ["synapse-configs", "webapps", "carbonapps/app-000_1.0.0.car"] {
        let p = c.data(MANAGER).join(dir);
        if p.is_dir() {
            fs::remove_dir_all(p).unwrap();
        } else {
            fs::remove_file(p).unwrap();
        }
    }
    assert!(wait_guarded(&c).starts_with("would delete"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(snapshot(&c.data("worker-1")), before);
    c.ctl(MANAGER, &["confirm"]);
    c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));
}

#[test]
fn an_unmounted_folder_deletes_nothing_until_confirmed() {
    let mut c = Cluster::new(&["worker-1"]);
    let mnt = c.data(MANAGER);
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
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
    let guard = Unmount(mnt.clone());
    generate(&mnt, Scale::SMALL, 14).unwrap();
    c.start(MANAGER);
    c.start("worker-1");
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    let before = snapshot(&c.data("worker-1"));
    // The manager holds the mount busy (its watch, its open folder): detach it lazily, as an
    // administrator would, or as a failing network mount does.
    assert!(
        Command::new("umount")
            .arg("-l")
            .arg(&mnt)
            .status()
            .unwrap()
            .success()
    );
    std::mem::forget(guard);
    // The mount point is an empty directory now.
    wait_guarded(&c);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        snapshot(&c.data("worker-1")),
        before,
        "an unmount deleted files on a worker"
    );
}

#[test]
fn with_the_guard_off_an_emptied_folder_is_published_at_once() {
    let mut c = Cluster::new(&["worker-1"]);
    c.folder_option(MANAGER, "delete_guard = false");
    generate(&c.data(MANAGER), Scale::SMALL, 15).unwrap();
    c.start(MANAGER);
    c.start("worker-1");
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    empty_dir(&c.data(MANAGER));
    c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));
    assert!(c.status(MANAGER).guarded.is_empty());
}

/// `rm -rf` of a large tree outlasts one generation: slices of it, each under the share, are
/// added up over a window of seconds, and the slice that takes the total over is held.
#[test]
fn a_tree_deleted_in_slices_is_held_once_the_slices_add_up() {
    let c = cluster(14);
    let mut files: Vec<_> = snapshot(&c.data(MANAGER))
        .into_iter()
        .filter(|(_, item)| matches!(item, support::Item::File { .. }))
        .map(|(path, _)| c.data(MANAGER).join(path))
        .collect();
    files.sort();
    let fifth = files.len() / 5;
    // Two fifths, one at a time, each published on its own: 40% in all, under the 50% share.
    for slice in files.chunks(fifth).take(2) {
        for f in slice {
            fs::remove_file(f).unwrap();
        }
        c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    }
    assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));
    // The third fifth brings it to 60% within seconds: held. (Its first files may go out in
    // a generation of their own while the total is still under the share; the one that takes
    // it over is held.)
    for f in &files[2 * fifth..3 * fifth] {
        fs::remove_file(f).unwrap();
    }
    let reason = wait_guarded(&c);
    assert!(reason.starts_with("would delete"), "{reason}");
    std::thread::sleep(Duration::from_millis(500));
    let left = snapshot(&c.data("worker-1"))
        .into_values()
        .filter(|item| matches!(item, support::Item::File { .. }))
        .count();
    assert!(
        left * 2 >= files.len(),
        "the worker kept {left} of {} files: more than the 50% share went without confirmation",
        files.len()
    );
    for f in &files[..2 * fifth] {
        let rel = f.strip_prefix(c.data(MANAGER)).unwrap();
        assert!(!c.data("worker-1").join(rel).exists(), "{}", rel.display());
    }
    c.ctl(MANAGER, &["confirm"]);
    c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));
}

/// An `rm -rf` of a large tree pauses now and then (100-200 ms at directory boundaries for
/// 100,000 files here): each pause used to let the removals so far go out as a generation of
/// their own, and the guard engaged only once they added up to the share, half the tree
/// already deleted on every worker. Removals that are not few now wait until they stop for a
/// second: the whole deletion reaches the guard, and the worker loses nothing.
#[test]
fn a_deletion_that_pauses_now_and_then_reaches_the_guard_whole() {
    let c = cluster(15);
    let before = snapshot(&c.data("worker-1"));
    let mut files: Vec<_> = snapshot(&c.data(MANAGER))
        .into_iter()
        .filter(|(_, item)| matches!(item, support::Item::File { .. }))
        .map(|(path, _)| c.data(MANAGER).join(path))
        .collect();
    files.sort();
    for burst in files.chunks(files.len() / 20 + 1) {
        for f in burst {
            fs::remove_file(f).unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let reason = wait_guarded(&c);
    assert!(reason.starts_with("would delete"), "{reason}");
    assert!(
        reason.contains(&format!(" {} of ", files.len())),
        "the guard saw only part of the deletion: {reason}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        snapshot(&c.data("worker-1")),
        before,
        "files deleted on the worker before confirmation"
    );
    c.ctl(MANAGER, &["confirm", "deployment"]);
    c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));
}

/// CPU time (user + system, in clock ticks) a process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// The manager runs as an unprivileged user (as its systemd unit does) and meets a directory
/// and a file it may not read: the directory's files are not published as deleted, the file
/// is held with the reason (its last version stays published) and tried again without spinning,
/// and both are shown; once readable, they converge.
#[test]
fn what_the_manager_cannot_read_is_shown_kept_on_workers_and_never_taken_as_deleted() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to run the manager as another user");
        return;
    }
    let mut c = Cluster::new(&["worker-1"]);
    let data = c.data(MANAGER);
    fs::create_dir(data.join("locked")).unwrap();
    fs::write(data.join("locked/inside.xml"), b"<inside/>").unwrap();
    fs::write(data.join("private.xml"), b"<v1/>").unwrap();
    c.run_as_nobody(MANAGER, false);
    c.start(MANAGER);
    c.start("worker-1");
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    let worker = c.data("worker-1");
    assert_eq!(
        fs::read(worker.join("locked/inside.xml")).unwrap(),
        b"<inside/>"
    );

    // Both become unreadable to the manager while it is down; its first walk meets them.
    c.stop(MANAGER);
    set_mode(&data.join("locked"), 0o700);
    fs::write(data.join("private.xml"), b"<v2/>").unwrap();
    set_mode(&data.join("private.xml"), 0o600);
    c.start(MANAGER);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let s = loop {
        let s = c.status(MANAGER);
        if !s.skipped.is_empty() && !s.held_files.is_empty() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "not shown: {s:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(s.skipped_total, 1, "{s:?}");
    assert_eq!(s.skipped[0].path, "locked");
    assert!(s.skipped[0].reason.contains("cannot be read"), "{s:?}");
    assert_eq!(s.held_files[0].path, "private.xml");
    assert!(s.held_files[0].reason.contains("cannot be read"), "{s:?}");
    let text = c.ctl(MANAGER, &["status"]);
    assert!(text.contains("not synced (1 entries"), "{text}");
    assert!(text.contains("deployment/locked: cannot be read"), "{text}");
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    assert_eq!(
        fs::read(worker.join("locked/inside.xml")).unwrap(),
        b"<inside/>"
    );
    assert_eq!(fs::read(worker.join("private.xml")).unwrap(), b"<v1/>");

    // The directory it cannot read is left out of the watch, not the whole folder: a deploy
    // beside it arrives at once, not at the next periodic walk (every 5 s).
    fs::write(data.join("deployed.xml"), b"<deployed/>").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !worker.join("deployed.xml").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "not sent at once; see {}",
            c.log(MANAGER)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = fs::read_to_string(c.log(MANAGER)).unwrap();
    assert!(!log.contains("cannot watch"), "{log}");

    // A file that cannot be read is tried again now and then, not in a loop: the manager is
    // idle (a loop re-hashing it cost a tenth of a core).
    let pid = c.pid(MANAGER);
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(5));
    let used = cpu_ticks(pid) - before;
    assert!(
        used < 25,
        "manager used {used} ticks in 5 s; see {}",
        c.log(MANAGER)
    );

    // Readable again: both converge.
    set_mode(&data.join("private.xml"), 0o644);
    set_mode(&data.join("locked"), 0o755);
    fs::write(data.join("locked/new.xml"), b"<new/>").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !(worker.join("locked/new.xml").exists()
        && fs::read(worker.join("private.xml")).unwrap() == b"<v2/>")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "did not converge; see {}",
            c.log(MANAGER)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = c.status(MANAGER);
    assert_eq!((s.skipped_total, s.held_files.len()), (0, 0), "{s:?}");
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    assert_same_tree(&data, &worker);
}

/// Most of a folder's files moved (a directory renamed, or a tree moved under another name)
/// are not deleted: the guard lets it through, while deleting the same files is held.
#[test]
fn most_files_moved_is_not_a_mass_deletion() {
    let c = cluster(14);
    let m = c.data(MANAGER);
    // Everything under synapse-configs and webapps moves under new names: well over half of
    // the folder's files leave their paths, with the same contents.
    fs::create_dir(m.join("moved")).unwrap();
    for dir in ["synapse-configs", "webapps"] {
        fs::rename(m.join(dir), m.join("moved").join(dir)).unwrap();
    }
    c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    assert_same_tree(&m, &c.data("worker-1"));
    assert!(c.status(MANAGER).guarded.is_empty());

    // Deleting them is still held.
    fs::remove_dir_all(m.join("moved")).unwrap();
    assert!(wait_guarded(&c).starts_with("would delete"));
}
