//! The opt-in Prometheus endpoint (`[metrics] listen = "127.0.0.1:9780"`): `GET /metrics` in the
//! text exposition format, rendered from the role's status at each scrape. Nothing is computed
//! between scrapes, so an idle daemon stays idle.

use std::fmt::Write;
use std::net::SocketAddr;

use syncd_agent::AgentHandle;
use syncd_manager::{AgentView, ManagerHandle, NodeState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::Role;

/// Binds the endpoint (before the roles start, so a bad address fails start-up).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))
}

/// Serves scrapes until shutdown.
pub async fn serve(listener: TcpListener, role: Role, mut shutdown: watch::Receiver<bool>) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics endpoint ready (GET /metrics)");
    }
    loop {
        let (mut stream, _) = tokio::select! {
            s = listener.accept() => match s {
                Ok(s) => s,
                Err(_) => continue,
            },
            _ = shutdown.changed() => break,
        };
        let role = role.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let n = match tokio::time::timeout(
                std::time::Duration::from_secs(5),
                stream.read(&mut buf),
            )
            .await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if request.starts_with("GET /metrics") {
                ("200 OK", render(&role))
            } else {
                ("404 Not Found", "try GET /metrics\n".to_owned())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

fn render(role: &Role) -> String {
    match role {
        Role::Manager(m) => manager(m),
        Role::Agent { handle, .. } => agent(handle),
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn manager(m: &ManagerHandle) -> String {
    let s = m.status().borrow().clone();
    let mut out = String::new();
    header(
        &mut out,
        "syncd_generation",
        "gauge",
        "The latest generation published.",
    );
    let _ = writeln!(out, "syncd_generation {}", s.generation.0);
    header(
        &mut out,
        "syncd_held",
        "gauge",
        "1 while publication is held (syncctl pause on the manager).",
    );
    let _ = writeln!(out, "syncd_held {}", u8::from(s.hold.is_some()));
    header(
        &mut out,
        "syncd_pending_changes",
        "gauge",
        "Changes waiting for the hold to end.",
    );
    let _ = writeln!(out, "syncd_pending_changes {}", s.pending_total);
    header(
        &mut out,
        "syncd_incomplete_files",
        "gauge",
        "Files not published yet because they are not complete.",
    );
    let _ = writeln!(out, "syncd_incomplete_files {}", s.held.len());
    header(
        &mut out,
        "syncd_skipped_entries",
        "gauge",
        "Entries in the folders that are not synced (sockets, FIFOs, devices, links out of the \
         folder, names that are not UTF-8, entries that cannot be read).",
    );
    let _ = writeln!(out, "syncd_skipped_entries {}", s.skipped_total);
    header(
        &mut out,
        "syncd_delete_guard_engaged",
        "gauge",
        "Folders whose next generation the delete guard holds back.",
    );
    let _ = writeln!(out, "syncd_delete_guard_engaged {}", s.guarded.len());
    header(
        &mut out,
        "syncd_forced_rescans_total",
        "counter",
        "Full rescans forced by lost watcher events.",
    );
    let _ = writeln!(out, "syncd_forced_rescans_total {}", s.forced_rescans);
    // Each family's samples together, after its HELP and TYPE (the exposition format's rule).
    let per_agent = |out: &mut String,
                     name: &str,
                     kind: &str,
                     help: &str,
                     value: &dyn Fn(&AgentView) -> Option<u64>| {
        header(out, name, kind, help);
        for (agent, v) in &s.agents {
            if let Some(x) = value(v) {
                let _ = writeln!(out, "{name}{{agent=\"{agent}\"}} {x}");
            }
        }
    };
    per_agent(
        &mut out,
        "syncd_bytes_sent_total",
        "counter",
        "Chunk bytes sent to agents.",
        &|v| Some(v.bytes_sent),
    );
    per_agent(
        &mut out,
        "syncd_agent_applied_generation",
        "gauge",
        "The generation each agent applied.",
        &|v| Some(v.applied.0),
    );
    per_agent(
        &mut out,
        "syncd_agent_lag_generations",
        "gauge",
        "Generations each agent is behind.",
        &|v| Some(s.generation.0.saturating_sub(v.applied.0)),
    );
    per_agent(
        &mut out,
        "syncd_agent_up",
        "gauge",
        "1 if the agent is connected.",
        &|v| Some(u64::from(v.connected)),
    );
    per_agent(
        &mut out,
        "syncd_agent_paused",
        "gauge",
        "1 if the agent is paused.",
        &|v| Some(u64::from(v.state(s.generation) == NodeState::Paused)),
    );
    per_agent(
        &mut out,
        "syncd_agent_drift",
        "gauge",
        "Local changes an agent left in place.",
        &|v| Some(v.drift.len() as u64),
    );
    per_agent(
        &mut out,
        "syncd_agent_drift_reverted_total",
        "counter",
        "Local changes an agent reverted.",
        &|v| Some(v.drift_reverted),
    );
    per_agent(
        &mut out,
        "syncd_agent_max_rate_bytes",
        "gauge",
        "The cap on bytes per second sent to an agent (max_rate); absent when uncapped.",
        &|v| v.max_rate,
    );
    out
}

fn agent(a: &AgentHandle) -> String {
    let s = a.status().borrow().clone();
    let mut out = String::new();
    header(
        &mut out,
        "syncd_applied_generation",
        "gauge",
        "The last generation applied.",
    );
    let _ = writeln!(out, "syncd_applied_generation {}", s.applied.0);
    header(
        &mut out,
        "syncd_connected",
        "gauge",
        "1 while connected to the manager.",
    );
    let _ = writeln!(out, "syncd_connected {}", u8::from(s.connected));
    header(&mut out, "syncd_paused", "gauge", "1 while paused.");
    let _ = writeln!(out, "syncd_paused {}", u8::from(s.paused.is_some()));
    header(
        &mut out,
        "syncd_bytes_received_total",
        "counter",
        "Chunk bytes received from the manager.",
    );
    let _ = writeln!(out, "syncd_bytes_received_total {}", a.bytes_received());
    header(
        &mut out,
        "syncd_bytes_saved_total",
        "counter",
        "Chunk bytes found locally instead of fetched (deduplication).",
    );
    let _ = writeln!(out, "syncd_bytes_saved_total {}", s.bytes_reused);
    header(
        &mut out,
        "syncd_files_written_total",
        "counter",
        "Files renamed into place.",
    );
    let _ = writeln!(out, "syncd_files_written_total {}", s.files_written);
    header(
        &mut out,
        "syncd_drift",
        "gauge",
        "Local changes left in place.",
    );
    let _ = writeln!(out, "syncd_drift {}", s.drift.len());
    header(
        &mut out,
        "syncd_drift_reverted_total",
        "counter",
        "Local changes reverted.",
    );
    let _ = writeln!(out, "syncd_drift_reverted_total {}", s.drift_reverted);
    header(
        &mut out,
        "syncd_apply_seconds",
        "histogram",
        "Time to apply a generation (stage, verify, sync, rename).",
    );
    let mut cumulative = 0;
    for (le, count) in syncd_agent::APPLY_BUCKETS
        .iter()
        .zip(&s.apply_seconds.buckets)
    {
        cumulative += count;
        let _ = writeln!(
            out,
            "syncd_apply_seconds_bucket{{le=\"{le}\"}} {cumulative}"
        );
    }
    let _ = writeln!(
        out,
        "syncd_apply_seconds_bucket{{le=\"+Inf\"}} {}",
        s.apply_seconds.count
    );
    let _ = writeln!(out, "syncd_apply_seconds_sum {}", s.apply_seconds.sum);
    let _ = writeln!(out, "syncd_apply_seconds_count {}", s.apply_seconds.count);
    out
}
