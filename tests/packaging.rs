//! What a production node runs: systemd units that verify, readiness through NOTIFY_SOCKET,
//! the metrics endpoint, JSON logs, and the WSO2-aware config helper.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::cluster::SYNCD;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn the_systemd_units_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipping: systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for unit in ["syncd-manager.service", "syncd-agent.service"] {
        // The unit as installed, but pointing at the binary just built.
        let text = std::fs::read_to_string(repo().join("systemd").join(unit))
            .unwrap()
            .replace("/usr/bin/syncd", SYNCD);
        let path = dir.path().join(unit);
        std::fs::write(&path, text).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .env("SYSTEMD_LOG_LEVEL", "warning")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Offline verification cannot see users or a running manager, and the man pages are
        // installed by the package: only other complaints about our unit count.
        let ours: Vec<&str> = stderr.lines().filter(|l| l.contains(unit)).collect();
        assert!(out.status.success() && ours.is_empty(), "{unit}:\n{stderr}");
    }
}

/// Writes a minimal manager config in `dir` and returns its path.
fn manager_config(dir: &Path, extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("data/carbonapps")).unwrap();
    std::fs::write(dir.join("data/carbonapps/a.xml"), b"<a/>").unwrap();
    let out = Command::new(SYNCD)
        .args(["init", "--state-dir"])
        .arg(dir.join("state"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let port = support::free_udp_port();
    let cfg = dir.join("syncd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nname = \"mgr-1\"\nstate_dir = \"state\"\nadmin_socket = \"admin.sock\"\n[manager]\nlisten = \"127.0.0.1:{port}\"\n{extra}\n[[folders]]\nname = \"deployment\"\npath = \"data\"\n"
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn the_daemon_reports_ready_to_systemd_once_serving() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = manager_config(dir.path(), "");
    let notify_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&notify_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut child = Command::new(SYNCD)
        .args(["manager", "--config"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "2000000")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline
        && !(seen.iter().any(|m: &String| m.contains("READY=1"))
            && seen.iter().any(|m| m.contains("WATCHDOG=1")))
    {
        if let Ok(n) = socket.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    // The admin socket answers by the time READY=1 was sent.
    assert!(dir.path().join("admin.sock").exists());
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    assert!(
        seen.iter()
            .any(|m| m.contains("READY=1") && m.contains("STATUS=manager: generation 1")),
        "{seen:?}"
    );
    assert!(seen.iter().any(|m| m.contains("WATCHDOG=1")), "{seen:?}");
}

#[test]
fn metrics_are_served_in_prometheus_format_and_logs_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_tcp_port();
    // Two agents (never connected), one with a rate cap: each family's samples stay together.
    let agents = "[[manager.agents]]\nname = \"w1\"\nid = \"AAAAAAAAAAAAA-AAAAAAAAAAAAA-AAAAAAAAAAAAA-AAAAAAAAAAAAA\"\nmax_rate = \"2MB/s\"\n\
                  [[manager.agents]]\nname = \"w2\"\nid = \"BAAAAAAAAAAAA-AAAAAAAAAAAAA-AAAAAAAAAAAAA-AAAAAAAAAAAAA\"\n";
    let cfg = manager_config(
        dir.path(),
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n{agents}"),
    );
    let log = dir.path().join("log.json");
    let mut child = Command::new(SYNCD)
        .args(["--log-format", "json", "manager", "--config"])
        .arg(&cfg)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let body = scrape(port);
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    for want in [
        "syncd_generation 1",
        "# TYPE syncd_agent_lag_generations gauge",
        "syncd_held 0",
        "syncd_forced_rescans_total 0",
        "syncd_agent_up{agent=\"w1\"} 0",
        "syncd_agent_up{agent=\"w2\"} 0",
        "syncd_agent_max_rate_bytes{agent=\"w1\"} 2000000",
    ] {
        assert!(body.contains(want), "{want} not in\n{body}");
    }
    assert!(
        !body.contains("syncd_agent_max_rate_bytes{agent=\"w2\"}"),
        "{body}"
    );
    assert_grouped(&body);
    // Every log line is a JSON object carrying the node's name.
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 3, "{text}");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["span"]["node"], "mgr-1", "{line}");
    }
    assert!(
        text.contains("\"generation\":\"1\"") || text.contains("\"generation\":1"),
        "{text}"
    );
}

/// Checks the exposition format's rule that all samples of a family come together, after its
/// `# TYPE` line.
fn assert_grouped(body: &str) {
    let text = body.split("\r\n\r\n").nth(1).unwrap_or(body);
    let mut typed = std::collections::HashSet::new();
    let mut done = std::collections::HashSet::new();
    let mut current = String::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let family = if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap().to_owned();
            assert!(typed.insert(name.clone()), "a second TYPE line for {name}");
            name
        } else if line.starts_with('#') {
            continue;
        } else {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                .unwrap_or(name);
            assert!(
                typed.contains(family),
                "{line}: sample before its TYPE line"
            );
            family.to_owned()
        };
        if family != current {
            assert!(
                done.insert(current.clone()) || current.is_empty(),
                "{current} is split"
            );
            assert!(
                !done.contains(&family),
                "{family}'s samples are split:\n{text}"
            );
            current = family;
        }
    }
}

/// One scrape of a metrics endpoint: the HTTP response, headers and body.
fn scrape(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            return out;
        }
        assert!(Instant::now() < deadline, "metrics endpoint never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of the sample `name` (with its labels, if any) in a Prometheus text body.
fn sample(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in\n{body}"))
}

#[test]
fn an_agent_serves_what_it_applied_as_metrics() {
    use support::cluster::{Cluster, MANAGER};
    let mut c = Cluster::new(&["worker-1"]);
    let data = c.data(MANAGER);
    let mut rng = syncd_devtools::Rng::new(3);
    // Not an archive (a random .car would be held as broken until it parses).
    syncd_devtools::write_random(&data.join("lib.bin"), 3_000_000, &mut rng).unwrap();
    std::fs::write(data.join("api.xml"), b"<api name=\"a\"/>\n").unwrap();
    let port = support::free_tcp_port();
    let cfg = c.root.path().join("worker-1.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
    std::fs::write(&cfg, text).unwrap();
    c.start(MANAGER);
    c.start("worker-1");
    c.ctl(MANAGER, &["wait", "--timeout", "60s"]);
    // A second generation: the histogram counts both applies.
    std::fs::write(data.join("api.xml"), b"<api name=\"b\"/>\n").unwrap();
    c.ctl(MANAGER, &["wait", "--timeout", "30s"]);
    let body = scrape(port);
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    let applied = sample(&body, "syncd_applied_generation");
    assert_eq!(applied, c.status(MANAGER).generation as f64, "{body}");
    assert_eq!(sample(&body, "syncd_connected"), 1.0, "{body}");
    assert_eq!(sample(&body, "syncd_paused"), 0.0, "{body}");
    assert!(
        sample(&body, "syncd_bytes_received_total") >= 3_000_000.0,
        "{body}"
    );
    assert!(sample(&body, "syncd_files_written_total") >= 3.0, "{body}");
    assert!(
        body.contains("# TYPE syncd_apply_seconds histogram"),
        "{body}"
    );
    let count = sample(&body, "syncd_apply_seconds_count");
    assert!(count >= 2.0, "{body}");
    assert_eq!(
        sample(&body, "syncd_apply_seconds_bucket{le=\"+Inf\"}"),
        count,
        "{body}"
    );
    assert!(sample(&body, "syncd_apply_seconds_sum") > 0.0, "{body}");
    // Buckets are cumulative.
    let buckets: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with("syncd_apply_seconds_bucket"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(buckets.len() > 2, "{body}");
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{body}");
}

#[test]
fn syncd_config_writes_a_working_config_for_a_wso2_home() {
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join("repository/deployment/server/carbonapps")).unwrap();
    std::fs::create_dir_all(home.path().join("repository/tenants")).unwrap();
    std::fs::create_dir_all(home.path().join("bin")).unwrap();
    std::fs::write(home.path().join("bin/api-manager.sh"), b"#!/bin/sh\n").unwrap();
    let cfg = home.path().join("syncd.toml");
    let out = Command::new(SYNCD)
        .args([
            "config",
            "--role",
            "agent",
            "--name",
            "worker-1",
            "--manager",
            "10.0.0.5:7780",
        ])
        .args([
            "--manager-id",
            "AAAAAAAAAAAAA-AAAAAAAAAAAAA-AAAAAAAAAAAAA-AAAAAAAAAAAAA",
        ])
        .arg("--carbon-home")
        .arg(home.path())
        .arg("--out")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ReadWritePaths=") && stderr.contains("syncd-agent.service.d"),
        "{stderr}"
    );
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        text.contains("WSO2 API Manager") && text.contains("repository/tenants"),
        "{text}"
    );
    let check = Command::new(SYNCD)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    // Not a WSO2 home: a clear error.
    let out = Command::new(SYNCD)
        .args(["config", "--role", "manager", "--carbon-home", "/tmp"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CARBON_HOME"));
}

#[test]
fn man_pages_and_completions_are_generated_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(SYNCD)
        .arg("generate-assets")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let man = std::fs::read_to_string(dir.path().join("man/syncctl.1")).unwrap();
    assert!(man.contains("pause") && man.contains("wait"), "{man}");
    assert!(dir.path().join("completions/bash/syncd").exists());
    assert!(dir.path().join("completions/zsh/_syncctl").exists());
}
