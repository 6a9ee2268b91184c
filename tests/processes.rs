//! Real `syncd` processes: command-line behaviour, exit codes, and memory that does not grow
//! with file size.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SYNCD: &str = env!("CARGO_BIN_EXE_syncd");

fn syncd(args: &[&str]) -> Output {
    Command::new(SYNCD).args(args).output().unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn init(state: &Path) -> String {
    let o = syncd(&["init", "--state-dir", state.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_owned()
}

#[test]
fn init_and_id_print_the_same_node_id_on_the_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let first = init(&state);
    assert_eq!(first.len(), 55, "{first}");
    assert_eq!(init(&state), first, "init keeps an existing identity");
    let o = syncd(&["id", "--state-dir", state.to_str().unwrap()]);
    assert_eq!(String::from_utf8(o.stdout).unwrap().trim(), first);
    let o = syncd(&[
        "id",
        "--state-dir",
        dir.path().join("none").to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 4, "missing identity");
    assert!(stderr(&o).contains("syncd init"), "{}", stderr(&o));
}

#[test]
fn a_bad_config_lists_every_problem_and_exits_3_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[node]\nname = \"w 1\"\n[agent]\nmanager = \"nowhere\"\nmanager_id = \"short\"\ncolor = 1\n",
    )
    .unwrap();
    for sub in ["check-config", "agent", "manager"] {
        let o = syncd(&[sub, "--config", cfg.to_str().unwrap()]);
        assert_eq!(code(&o), 3, "{sub}: {}", stderr(&o));
        let err = stderr(&o);
        for key in ["node.name", "agent.manager_id", "agent.color", "folders"] {
            assert!(err.contains(key), "{sub}: {key} not named in:\n{err}");
        }
    }
    let o = syncd(&[
        "check-config",
        "--config",
        dir.path().join("missing.toml").to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 3);
    let o = syncd(&["manager", "--bogus"]);
    assert_eq!(code(&o), 2, "usage errors exit 2");
}

#[test]
fn check_config_counts_capped_agents_and_names_a_wrong_rate() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("m/data")).unwrap();
    let id = init(&dir.path().join("a/state"));
    let (m, _) = write_configs(dir.path(), 7780, &id, &id);
    let text = std::fs::read_to_string(&m).unwrap();
    let capped = text.replace(
        "[[manager.agents]]",
        "max_rate = \"30Mbit/s\"\n[[manager.agents]]",
    );
    std::fs::write(&m, &capped).unwrap();
    let o = syncd(&["check-config", "--config", m.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("1 agent(s) (1 with a max_rate)"), "{out}");
    std::fs::write(&m, capped.replace("30Mbit/s", "30 mbps")).unwrap();
    let o = syncd(&["check-config", "--config", m.to_str().unwrap()]);
    assert_eq!(code(&o), 3);
    assert!(
        stderr(&o).contains("manager.max_rate: \"30 mbps\" is not a rate"),
        "{}",
        stderr(&o)
    );
}

fn write_configs(root: &Path, port: u16, manager_id: &str, agent_id: &str) -> (PathBuf, PathBuf) {
    let m = root.join("manager.toml");
    let a = root.join("agent.toml");
    std::fs::write(
        &m,
        format!(
            "[node]\nname = \"mgr-1\"\nstate_dir = \"m/state\"\nadmin_socket = \"m/admin.sock\"\n[manager]\nlisten = \"127.0.0.1:{port}\"\n\
             [[manager.agents]]\nname = \"worker-1\"\nid = \"{agent_id}\"\n\
             [[folders]]\nname = \"deployment\"\npath = \"m/data\"\n"
        ),
    )
    .unwrap();
    std::fs::write(
        &a,
        format!(
            "[node]\nname = \"worker-1\"\nstate_dir = \"a/state\"\nadmin_socket = \"a/admin.sock\"\n[agent]\nmanager = \"127.0.0.1:{port}\"\n\
             manager_id = \"{manager_id}\"\n[[folders]]\nname = \"deployment\"\npath = \"a/data\"\n"
        ),
    )
    .unwrap();
    (m, a)
}

fn spawn(role: &str, cfg: &Path, log: &Path) -> Child {
    Command::new(SYNCD)
        .args([role, "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Peak resident set size of a live process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

fn stop(mut child: Child) {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
}

#[test]
fn a_second_manager_on_the_same_port_exits_5() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("m/data")).unwrap();
    let mid = init(&root.join("m/state"));
    let aid = init(&root.join("a/state"));
    let port = support::free_udp_port();
    let (m, _) = write_configs(root, port, &mid, &aid);
    let first = spawn("manager", &m, &root.join("m1.log"));
    std::thread::sleep(Duration::from_millis(500));
    // The same admin socket: refused before anything else.
    let o = Command::new(SYNCD)
        .args(["manager", "--config", m.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("another syncd is running"),
        "{}",
        stderr(&o)
    );
    // Another admin socket, the same UDP port.
    let m2 = root.join("manager2.toml");
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replace("m/admin.sock", "m/admin2.sock");
    std::fs::write(&m2, text).unwrap();
    let o = Command::new(SYNCD)
        .args(["manager", "--config", m2.to_str().unwrap()])
        .output()
        .unwrap();
    stop(first);
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot bind"), "{}", stderr(&o));
}

#[test]
fn a_1_gib_file_crosses_with_both_daemons_under_100_mib_of_memory() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("m/data/webapps")).unwrap();
    let big = root.join("m/data/webapps/huge.bin");
    let mut rng = syncd_devtools::Rng::new(11);
    syncd_devtools::write_random(&big, 1 << 30, &mut rng).unwrap();
    let mid = init(&root.join("m/state"));
    let aid = init(&root.join("a/state"));
    let (m, a) = write_configs(root, support::free_udp_port(), &mid, &aid);
    let manager = spawn("manager", &m, &root.join("manager.log"));
    let agent = spawn("agent", &a, &root.join("agent.log"));

    let target = root.join("a/data/webapps/huge.bin");
    let deadline = Instant::now() + Duration::from_secs(240);
    // The file appears under its final name only once complete (it is renamed into place).
    while !target.exists() {
        assert!(
            Instant::now() < deadline,
            "not synced in time; see {}",
            root.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (m_rss, a_rss) = (peak_rss(manager.id()), peak_rss(agent.id()));
    stop(agent);
    stop(manager);
    assert_eq!(std::fs::metadata(&target).unwrap().len(), 1 << 30);
    support::assert_same_tree(&root.join("m/data"), &root.join("a/data"));
    let limit = 100 << 20;
    assert!(m_rss < limit, "manager peak RSS {} MiB", m_rss >> 20);
    assert!(a_rss < limit, "agent peak RSS {} MiB", a_rss >> 20);
    eprintln!(
        "peak RSS: manager {} MiB, agent {} MiB",
        m_rss >> 20,
        a_rss >> 20
    );
}

#[test]
fn real_daemons_sync_live_changes_with_relative_folder_paths() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("m/data/synapse-configs")).unwrap();
    let mid = init(&root.join("m/state"));
    let aid = init(&root.join("a/state"));
    // Configs use relative paths; the daemons run from another working directory.
    let (m, a) = write_configs(root, support::free_udp_port(), &mid, &aid);
    let spawn_in = |role: &str, cfg: &Path, log: &str| {
        Command::new(SYNCD)
            .args([role, "--config", cfg.to_str().unwrap()])
            .current_dir("/")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(root.join(log)).unwrap())
            .spawn()
            .unwrap()
    };
    let manager = spawn_in("manager", &m, "manager.log");
    let agent = spawn_in("agent", &a, "agent.log");
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(
        root.join("m/data/synapse-configs/live.xml"),
        b"<api name=\"live\"/>",
    )
    .unwrap();
    let target = root.join("a/data/synapse-configs/live.xml");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read(&target).ok().as_deref() != Some(b"<api name=\"live\"/>".as_slice()) {
        assert!(
            Instant::now() < deadline,
            "live change not synced; see {}",
            root.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    stop(agent);
    stop(manager);
    support::assert_same_tree(&root.join("m/data"), &root.join("a/data"));
}

/// A daemon started from a shell with the usual soft limit on open files raises it to the hard
/// limit: an apply holds a few hundred staged files and their sources open at once.
#[test]
fn a_daemon_raises_its_soft_limit_on_open_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let manager_id = init(&root.join("m/state"));
    let agent_id = init(&root.join("a/state"));
    let (_, a) = write_configs(root, support::free_udp_port(), &manager_id, &agent_id);
    let child = Command::new("sh")
        .current_dir(root)
        .args([
            "-c",
            &format!(
                "ulimit -S -n 256 && exec {SYNCD} agent --config {}",
                a.display()
            ),
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(root.join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    let limits = |pid: u32| -> (String, String) {
        let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap()
            .to_owned();
        let mut fields = line.split_whitespace().skip(3);
        (
            fields.next().unwrap().to_owned(),
            fields.next().unwrap().to_owned(),
        )
    };
    // Read once the daemon is up: its admin socket is made after the limit is raised.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !root.join("a/admin.sock").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (soft, hard) = limits(child.id());
    stop(child);
    assert_eq!(soft, hard, "soft limit left at {soft} (hard {hard})");
}
