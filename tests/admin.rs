//! The admin socket and syncctl: who may use it, how syncctl finds it, what its exit codes say,
//! and pauses decided on the agent or on the manager, with time limits and while offline.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::cluster::{Cluster, MANAGER, SYNCCTL, SYNCD};
use support::{assert_same_tree, snapshot};
use syncd_devtools::{Scale, generate};

#[test]
fn a_non_privileged_user_is_refused_even_when_the_socket_mode_allows_it() {
    let mut c = Cluster::new(&["worker-1"]);
    c.start(MANAGER);
    // Open the way to the socket for everyone: only the credential check stands.
    for dir in [c.root.path().to_owned(), c.root.path().join(MANAGER)] {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::set_permissions(c.socket(MANAGER), fs::Permissions::from_mode(0o666)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            SYNCCTL,
            "--socket",
        ])
        .arg(c.socket(MANAGER))
        .arg("status")
        .output();
    let Ok(out) = out else {
        eprintln!("skipping: setpriv is not available");
        return;
    };
    if String::from_utf8_lossy(&out.stderr).contains("setpriv:") {
        eprintln!(
            "skipping: cannot drop privileges here: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("permission denied: uid 65534"));
    // Root still can.
    c.ctl(MANAGER, &["status"]);
}

#[test]
fn syncctl_finds_the_socket_and_says_what_went_wrong_with_distinct_exit_codes() {
    let mut c = Cluster::new(&["worker-1"]);
    c.start(MANAGER);
    c.start("worker-1");
    // SYNCD_SOCKET is used when --socket is absent.
    let out = Command::new(SYNCCTL)
        .arg("status")
        .env("SYNCD_SOCKET", c.socket(MANAGER))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("mgr (manager)"));
    // Unreachable daemon.
    let out = Command::new(SYNCCTL)
        .args(["--socket", "/nonexistent/admin.sock", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is syncd running"));
    // Unknown node, and a request that does not fit the role.
    assert_eq!(
        c.syncctl(MANAGER, &["pause", "no-such-worker"])
            .status
            .code(),
        Some(6)
    );
    assert_eq!(
        c.syncctl("worker-1", &["pause", "worker-2"]).status.code(),
        Some(6)
    );
    assert_eq!(c.syncctl(MANAGER, &["changes"]).status.code(), Some(6));
    // Bad command line.
    assert_eq!(
        c.syncctl(MANAGER, &["pause", "--for", "soon"])
            .status
            .code(),
        Some(2)
    );
    // JSON status has the documented fields.
    let v: serde_json::Value =
        serde_json::from_str(&c.ctl(MANAGER, &["status", "--json"])).unwrap();
    for key in [
        "role",
        "node",
        "generation",
        "hold",
        "pending",
        "pending_total",
        "held_files",
        "nodes",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    let row = &v["nodes"][0];
    for key in [
        "name",
        "address",
        "state",
        "connected",
        "applied",
        "behind_generations",
        "behind_bytes",
        "last_seen",
        "last_error",
        "paused_until",
        "paused_by",
        "bytes_transferred",
        "bytes_reused",
    ] {
        assert!(row.get(key).is_some(), "missing nodes[].{key}: {row}");
    }
}

#[test]
fn a_pause_on_the_agent_holds_until_resumed_or_its_time_limit() {
    let mut c = Cluster::new(&["worker-1"]);
    generate(&c.data(MANAGER), Scale::SMALL, 8).unwrap();
    c.start(MANAGER);
    c.start("worker-1");
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);

    let out = c.ctl("worker-1", &["pause"]);
    assert!(out.contains("paused"), "{out}");
    c.wait_row("worker-1", Duration::from_secs(10), |r| {
        r.state == "paused" && r.paused_by.as_deref() == Some("agent")
    });
    let frozen = snapshot(&c.data("worker-1"));
    fs::write(
        c.data(MANAGER).join("synapse-configs/default/api/x.xml"),
        b"<x/>",
    )
    .unwrap();
    // The paused agent does not count for wait, and is named.
    let out = c.ctl(MANAGER, &["wait", "--timeout", "10s"]);
    assert!(out.contains("worker-1: paused"), "{out}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(snapshot(&c.data("worker-1")), frozen);
    // A hand edit while paused; a local resume backs it up, and `wait` returns only once the
    // worker holds the manager's version again.
    fs::write(
        c.data("worker-1")
            .join("synapse-configs/default/api/service-0002.xml"),
        b"<edited/>",
    )
    .unwrap();
    let out = c.ctl("worker-1", &["resume"]);
    assert!(out.contains("1 local change(s) backed up"), "{out}");
    // `resume` returns once the manager has recorded it: a plain `wait` (which leaves paused
    // agents out) then waits for this worker.
    c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));

    // A pause with a time limit ends by itself.
    c.ctl("worker-1", &["pause", "--for", "2s"]);
    fs::write(
        c.data(MANAGER).join("synapse-configs/default/api/y.xml"),
        b"<y/>",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        !c.data("worker-1")
            .join("synapse-configs/default/api/y.xml")
            .exists()
    );
    c.wait_row("worker-1", Duration::from_secs(10), |r| {
        r.state == "in sync"
    });
    assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));
}

/// The procedure "hold a patch on one node, test it, release it" ends with `syncctl resume` on
/// the worker and `syncctl wait` on the manager. The manager must have heard of the resume by
/// the time `resume` returns, or the `wait` leaves the still-"paused" worker out and returns
/// before it converged (seen 1 run in 6 under load before the manager confirmed pause states).
#[test]
fn a_wait_right_after_a_worker_side_resume_waits_for_that_worker() {
    let mut c = Cluster::new(&["worker-1"]);
    generate(&c.data(MANAGER), Scale::SMALL, 10).unwrap();
    c.start(MANAGER);
    c.start("worker-1");
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    for round in 0..12 {
        c.ctl("worker-1", &["pause"]);
        let rel = format!("synapse-configs/default/api/round-{round}.xml");
        let body = format!("<round n=\"{round}\"/>");
        fs::write(c.data(MANAGER).join(&rel), &body).unwrap();
        // Published, and the paused worker left out.
        let out = c.ctl(MANAGER, &["wait", "--timeout", "10s"]);
        assert!(out.contains("worker-1: paused"), "round {round}: {out}");
        c.ctl("worker-1", &["resume"]);
        c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
        assert_eq!(
            fs::read_to_string(c.data("worker-1").join(&rel))
                .ok()
                .as_deref(),
            Some(body.as_str()),
            "round {round}: wait returned before the resumed worker had the change"
        );
    }
}

#[test]
fn an_offline_agent_is_paused_when_it_connects_and_is_sent_nothing_meanwhile() {
    let mut c = Cluster::new(&["worker-1"]);
    generate(&c.data(MANAGER), Scale::SMALL, 9).unwrap();
    c.start(MANAGER);
    c.start("worker-1");
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    c.stop("worker-1");
    let frozen = snapshot(&c.data("worker-1"));

    c.ctl(MANAGER, &["pause", "worker-1", "--for", "1h"]);
    fs::write(
        c.data(MANAGER)
            .join("synapse-configs/default/api/while-away.xml"),
        b"<a/>",
    )
    .unwrap();
    c.ctl(MANAGER, &["wait", "--timeout", "10s"]);
    c.start("worker-1");
    c.wait_row("worker-1", Duration::from_secs(10), |r| {
        r.state == "paused" && r.connected
    });
    let own = c.status("worker-1").nodes[0].clone();
    assert_eq!(own.state, "paused");
    assert_eq!(own.paused_by.as_deref(), Some("manager"));
    assert!(own.paused_until.is_some());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        snapshot(&c.data("worker-1")),
        frozen,
        "sent a generation to a paused agent"
    );

    // Resumed from the agent's side: the manager learns it and sends what it lacks.
    c.ctl("worker-1", &["resume"]);
    c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    assert_same_tree(&c.data(MANAGER), &c.data("worker-1"));
    assert_eq!(c.row("worker-1").state, "in sync");
}

/// A child process killed and reaped when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A worker cloned with its state directory (a copied VM) connects with the identity of the
/// node it was copied from. The two used to replace each other's connection several times a
/// second, forever, while `status` showed the node in sync. Now the manager keeps the
/// connection it has once they took turns a few times, refuses the other with the reason, and
/// shows it on the node's row.
#[test]
fn two_nodes_sharing_one_identity_do_not_take_turns_forever() {
    let mut c = Cluster::new(&["worker-1", "clone"]);
    // The clone holds worker-1's identity (the one `syncd init` made for it is never used).
    std::fs::remove_dir_all(c.dir("clone", "state")).unwrap();
    support::cluster::copy_tree(&c.dir("worker-1", "state"), &c.dir("clone", "state"));
    // A copied machine has the same config too: it calls itself worker-1.
    let config = c.root.path().join("clone.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("name = \"clone\"", "name = \"worker-1\""),
    )
    .unwrap();
    std::fs::write(c.data(MANAGER).join("a.xml"), "<a/>").unwrap();
    c.start(MANAGER);
    c.start("worker-1");
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    let clone_log = c.dir("clone", "agent.log");
    let clone = Command::new(SYNCD)
        .arg("agent")
        .arg("--config")
        .arg(&config)
        .env("SYNCD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&clone_log).unwrap())
        .spawn()
        .unwrap();
    // Killed however the test ends: a panic must not leave it running.
    let clone = KillOnDrop(clone);
    c.wait_row("worker-1", Duration::from_secs(20), |row| {
        row.last_error
            .as_deref()
            .is_some_and(|e| e.contains("share one identity"))
    });
    let replaced = |c: &Cluster| {
        std::fs::read_to_string(c.log(MANAGER))
            .unwrap()
            .matches("replaced by a newer connection")
            .count()
    };
    let before = replaced(&c);
    std::thread::sleep(Duration::from_secs(5));
    let after = replaced(&c);
    assert!(
        after <= before + 1,
        "the connections still take turns: {before} -> {after} replacements in 5 s; see {}",
        c.log(MANAGER)
    );
    // The node is still served: a deploy reaches whichever of the two holds the connection.
    std::fs::write(c.data(MANAGER).join("b.xml"), "<b/>").unwrap();
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    assert!(c.data("worker-1").join("b.xml").exists() || c.data("clone").join("b.xml").exists());
    drop(clone);
    let said = std::fs::read_to_string(&clone_log).unwrap();
    let held = std::fs::read_to_string(c.log("worker-1")).unwrap();
    assert!(
        said.contains("share one identity") || held.contains("share one identity"),
        "neither agent was told why: {said}"
    );
}

/// `last seen` of a connected worker is now, however long the cluster has been quiet (it showed
/// the time of the worker's last message, which read as a node gone stale); of a worker that
/// left, when it left.
#[test]
fn a_quiet_connected_worker_is_seen_now_and_one_that_left_when_it_left() {
    let mut c = Cluster::new(&["worker-1"]);
    c.start(MANAGER);
    c.start("worker-1");
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    std::thread::sleep(Duration::from_secs(4));
    let seen = c.row("worker-1").last_seen.unwrap();
    assert!(
        now() - seen <= 1,
        "connected, but last seen {}s ago",
        now() - seen
    );
    c.stop("worker-1");
    let left = now();
    std::thread::sleep(Duration::from_secs(3));
    let row = c.row("worker-1");
    assert!(!row.connected);
    let seen = row.last_seen.unwrap();
    assert!(
        seen >= left - 1 && seen <= left + 1,
        "left at {left}, last seen {seen}"
    );
}

/// `syncctl wait` while a file is still being written waits for it to be closed and published:
/// the watch's events trail the admin socket (after a copy of gigabytes, by seconds), and a
/// wait used to answer as soon as a late event marked the file as still open.
#[test]
fn a_wait_while_a_file_is_being_written_waits_for_that_file() {
    use std::io::Write;
    let mut c = Cluster::new(&["worker-1"]);
    c.start(MANAGER);
    c.start("worker-1");
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    let path = c.data(MANAGER).join("being-written.bin");
    let writer = {
        let path = path.clone();
        std::thread::spawn(move || {
            let mut f = fs::File::create(&path).unwrap();
            let block = vec![7u8; 64 * 1024];
            let until = std::time::Instant::now() + Duration::from_millis(1500);
            while std::time::Instant::now() < until {
                f.write_all(&block).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    writer.join().unwrap();
    let on_worker = fs::metadata(c.data("worker-1").join("being-written.bin")).map(|m| m.len());
    assert_eq!(
        on_worker.ok(),
        Some(fs::metadata(&path).unwrap().len()),
        "wait returned before the file was on the worker"
    );
}

/// A folder in the manager's config but not in a worker's (say, the new version's folder of an
/// upgrade, forgotten on one node), and one only in the worker's: that worker never gets the
/// one and the manager never fills the other. Both are shown in `status` on either side, not
/// only logged, since the row otherwise says `in sync`.
#[test]
fn folders_a_worker_and_the_manager_do_not_share_are_shown_in_status() {
    let mut c = Cluster::new(&["worker-1", "worker-2"]);
    c.add_folder_on(&[MANAGER, "worker-1"], "deployment-4.3", "next");
    c.add_folder_on(&["worker-2"], "tenants", "tenants");
    std::fs::write(c.dir(MANAGER, "next").join("api.xml"), "<api/>").unwrap();
    c.start(MANAGER);
    c.start("worker-1");
    c.start("worker-2");
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    assert!(c.dir("worker-1", "next").join("api.xml").exists());
    assert!(!c.dir("worker-2", "next").exists());

    let both = c.row("worker-1");
    assert!(both.folders_not_taken.is_empty(), "{both:?}");
    assert!(both.folders_not_published.is_empty(), "{both:?}");
    let row = c.row("worker-2");
    assert_eq!(row.state, "in sync");
    assert_eq!(row.folders_not_taken, ["deployment-4.3"]);
    assert_eq!(row.folders_not_published, ["tenants"]);
    let text = c.ctl(MANAGER, &["status"]);
    assert!(
        text.contains("does not sync folder(s) deployment-4.3 (not in its config)"),
        "{text}"
    );
    assert!(
        text.contains("its folder(s) tenants are not published by the manager"),
        "{text}"
    );

    // The worker's own status says the same.
    let own = &c.status("worker-2").nodes[0];
    assert_eq!(own.folders_not_taken, ["deployment-4.3"]);
    assert_eq!(own.folders_not_published, ["tenants"]);
    let own = &c.status("worker-1").nodes[0];
    assert!(own.folders_not_taken.is_empty() && own.folders_not_published.is_empty());
}

/// `syncctl status | head -1`: the reader going away ends the output quietly; it used to panic
/// with a backtrace ("failed printing to stdout: Broken pipe"). The command's own exit code
/// stands.
#[test]
fn a_reader_that_stops_early_ends_syncctl_output_quietly() {
    let mut c = Cluster::new(&["worker-1"]);
    c.start(MANAGER);
    c.start("worker-1");
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["changes", "worker-1"],
    ] {
        let mut child = Command::new(SYNCCTL)
            .arg("--socket")
            .arg(c.socket(MANAGER))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {:?} {stderr}", out.status);
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

/// Thousands of entries the manager cannot carry (FIFOs here) are all listed in status, and
/// logged one by one only for the first 20 a minute: 50,000 FIFOs made 50,000 log lines.
#[test]
fn many_entries_the_manager_cannot_carry_are_listed_and_logged_in_brief() {
    let mut c = Cluster::new(&["worker-1"]);
    c.start(MANAGER);
    c.start("worker-1");
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    let dir = c.data(MANAGER).join("pipes");
    fs::create_dir(&dir).unwrap();
    let fifos = 500;
    for i in 0..fifos {
        let out = Command::new("mkfifo")
            .arg(dir.join(format!("p{i}")))
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while c.status(MANAGER).skipped_total != fifos {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            c.status(MANAGER)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = fs::read_to_string(c.log(MANAGER)).unwrap();
    let lines = log.matches("not synced folder=").count();
    assert_eq!(lines, 20, "{lines} lines for {fifos} entries");
    assert!(log.contains("more entries not synced: counted"), "{log}");
}
