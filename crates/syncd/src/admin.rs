//! The admin socket: a Unix socket on which `syncctl` asks for status, pauses, resumes and waits.
//! Only root, the daemon's own user, and members of the daemon's group may use it: the peer's
//! credentials are checked on every connection (`SO_PEERCRED`), not only the file mode.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use syncd_admin::{
    BackupView, DriftView, ErrorKind, GuardView, HeldView, HoldView, Laggard, LocalChange,
    NodeView, PendingView, Request, Response, SkippedView, Status, WaitReport,
};
use syncd_agent::{AgentHandle, AgentStatus};
use syncd_manager::{ManagerHandle, NodeState};
use syncd_proto::Generation;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

/// The role whose requests the socket answers.
#[derive(Debug, Clone)]
pub enum Role {
    Manager(ManagerHandle),
    Agent {
        handle: AgentHandle,
        name: String,
        manager: SocketAddr,
    },
}

/// A bound admin socket.
#[derive(Debug)]
pub struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the socket at `path`: mode 0660, its directory created if missing. A socket file left
/// by a daemon that died is replaced; one that answers means another daemon is running.
pub fn bind(path: &Path) -> Result<AdminSocket, String> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "{} is in use: another syncd is running with this admin socket",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale {}: {e}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
    Ok(AdminSocket {
        listener,
        path: path.to_owned(),
    })
}

/// Answers requests until shutdown.
pub async fn serve(socket: AdminSocket, role: Role, mut shutdown: watch::Receiver<bool>) {
    tracing::info!(path = %socket.path.display(), "admin socket ready");
    loop {
        let stream = tokio::select! {
            s = socket.listener.accept() => match s {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let role = role.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, role).await {
                tracing::debug!(error = %e, "admin request failed");
            }
        });
    }
}

/// Who may use the socket: root, our user, or a member of our group.
fn allowed(stream: &UnixStream) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot read the caller's credentials: {e}"))?;
    let our_uid = rustix::process::geteuid().as_raw();
    let our_gid = rustix::process::getegid().as_raw();
    if cred.uid() == 0 || cred.uid() == our_uid || cred.gid() == our_gid {
        return Ok(());
    }
    // Supplementary groups of the caller.
    if let Some(pid) = cred.pid() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let in_group = status
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .is_some_and(|g| g.split_whitespace().any(|x| x.parse() == Ok(our_gid)));
        if in_group {
            return Ok(());
        }
    }
    Err(format!(
        "permission denied: uid {} is neither root nor in the syncd group (gid {our_gid})",
        cred.uid()
    ))
}

async fn answer(stream: UnixStream, role: Role) -> std::io::Result<()> {
    let permitted = allowed(&stream);
    let (read, mut write) = stream.into_split();
    // The request is read in every case, so that a refused client still gets its answer instead
    // of a broken pipe.
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(syncd_admin::MAX_REQUEST as u64);
    reader.read_line(&mut line).await?;
    let response = match permitted {
        Err(message) => {
            tracing::warn!("{message}");
            Response::Error {
                kind: ErrorKind::PermissionDenied,
                message,
            }
        }
        Ok(()) => match serde_json::from_str::<Request>(&line) {
            Ok(request) => handle(&role, request).await,
            Err(e) => Response::Error {
                kind: ErrorKind::BadRequest,
                message: format!("malformed request: {e}"),
            },
        },
    };
    let mut out = serde_json::to_string(&response).map_err(std::io::Error::other)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
    write.shutdown().await
}

fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error {
        kind,
        message: message.into(),
    }
}

fn done(message: impl Into<String>) -> Response {
    Response::Done {
        message: message.into(),
        generation: None,
        changes: Vec::new(),
        backup: None,
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn until(for_secs: Option<u64>) -> Option<u64> {
    for_secs.map(|s| secs(SystemTime::now()) + s)
}

async fn handle(role: &Role, request: Request) -> Response {
    match role {
        Role::Manager(m) => manager(m, request).await,
        Role::Agent {
            handle,
            name,
            manager,
        } => agent(handle, name, *manager, request).await,
    }
}

async fn manager(m: &ManagerHandle, request: Request) -> Response {
    match request {
        Request::Status => Response::Status(manager_status(m)),
        Request::Pause {
            node: None,
            for_secs,
        } => match m.hold(until(for_secs)).await {
            Ok(_) => done(
                "holding publication: the manager's folders may change, nothing is sent until `syncctl resume`",
            ),
            Err(e) => error(ErrorKind::Failed, e),
        },
        Request::Pause {
            node: Some(node),
            for_secs,
        } => match m.pause_agent(&node, until(for_secs)) {
            Ok(_) => done(format!(
                "{node} paused: nothing is sent to it until `syncctl resume {node}`{}",
                for_secs
                    .map(|s| format!(" or for {s} s"))
                    .unwrap_or_default()
            )),
            Err(e) => error(ErrorKind::UnknownNode, e),
        },
        Request::Resume { node: None } => match m.release().await {
            Ok(g) => Response::Done {
                message: "publication resumed: what changed meanwhile is published".into(),
                generation: Some(g.0),
                changes: Vec::new(),
                backup: None,
            },
            Err(e) => error(ErrorKind::Failed, e),
        },
        Request::Resume { node: Some(node) } => match m.resume_agent(&node) {
            Ok(()) => done(format!("{node} resumed")),
            Err(e) => error(ErrorKind::UnknownNode, e),
        },
        Request::Wait {
            generation,
            timeout_secs,
            all,
        } => {
            let timeout = Duration::from_secs_f64(timeout_secs.clamp(0.0, 86_400.0 * 7.0));
            let w = m.wait(generation.map(Generation), timeout, all).await;
            Response::Wait(WaitReport {
                generation: w.generation.0,
                reached: w.reached,
                laggards: w
                    .laggards
                    .into_iter()
                    .map(|l| Laggard {
                        name: l.name,
                        state: l.state.as_str().into(),
                        applied: l.applied.0,
                        counted: l.counted,
                        last_error: l.last_error,
                    })
                    .collect(),
            })
        }
        Request::Changes { node: Some(node) } => agent_changes(m, &node),
        Request::Changes { node: None } => error(
            ErrorKind::WrongRole,
            "on the manager, name the agent: `syncctl changes NODE` (or run `syncctl changes` on the worker)",
        ),
        Request::Backups => error(
            ErrorKind::WrongRole,
            "`backups` lists an agent's backups of local changes: run it on the worker",
        ),
        Request::Confirm { folder } => match m.confirm(folder).await {
            Ok(g) => Response::Done {
                message: "confirmed: the held-back generation is published".into(),
                generation: Some(g.0),
                changes: Vec::new(),
                backup: None,
            },
            Err(e) => error(ErrorKind::Failed, e),
        },
    }
}

fn manager_status(m: &ManagerHandle) -> Status {
    let s = m.status().borrow().clone();
    let nodes = s
        .agents
        .iter()
        .map(|(name, v)| {
            let state = v.state(s.generation);
            let (behind_generations, behind_bytes) = if state == NodeState::InSync {
                (0, 0)
            } else {
                m.behind(v)
            };
            let (folders_not_taken, folders_not_published) = m.unmatched_folders(v);
            // During a hold with changes pending, an up-to-date agent is waiting on the hold.
            let shown = if state == NodeState::InSync && s.hold.is_some() && s.pending_total > 0 {
                "held"
            } else {
                state.as_str()
            };
            NodeView {
                name: name.clone(),
                address: v.addr.map(|a| a.to_string()),
                state: shown.into(),
                connected: v.connected,
                applied: v.applied.0,
                behind_generations,
                behind_bytes,
                // A connected agent is seen now: QUIC keep-alives every 4 s, and a connection
                // silent for 15 s is closed. (Its last message may be hours old on a quiet
                // cluster, which read as a node gone stale.)
                last_seen: if v.connected {
                    Some(secs(SystemTime::now()))
                } else {
                    v.last_seen.map(secs)
                },
                last_error: v.last_error.clone(),
                paused_until: v.paused.as_ref().and_then(|p| p.until),
                paused_by: v.paused.as_ref().map(|p| p.by.clone()),
                bytes_transferred: v.bytes_sent,
                bytes_reused: 0,
                drift: v.drift.iter().map(drift_view).collect(),
                drift_cut: v.drift_cut(),
                drift_reverted: v.drift_reverted,
                max_rate: v.max_rate,
                folders_not_taken,
                folders_not_published,
            }
        })
        .collect();
    Status {
        role: "manager".into(),
        node: m.node_name().to_owned(),
        generation: s.generation.0,
        hold: s.hold.as_ref().map(|h| HoldView {
            since: h.since_ms / 1000,
            until: h.until,
        }),
        pending: s
            .pending
            .iter()
            .map(|p| PendingView {
                folder: p.folder.clone(),
                path: p.path.clone(),
                change: p.kind.into(),
            })
            .collect(),
        pending_total: s.pending_total,
        guarded: s
            .guarded
            .iter()
            .map(|g| GuardView {
                folder: g.folder.clone(),
                reason: g.reason.clone(),
                since: secs(g.since),
            })
            .collect(),
        held_files: s
            .held
            .iter()
            .map(|h| HeldView {
                folder: h.folder.clone(),
                path: h.path.clone(),
                reason: h.reason.clone(),
                since: secs(h.since),
            })
            .collect(),
        skipped: s
            .skipped
            .iter()
            .map(|e| SkippedView {
                folder: e.folder.clone(),
                path: e.path.clone(),
                reason: e.reason.clone(),
            })
            .collect(),
        skipped_total: s.skipped_total,
        nodes,
    }
}

async fn agent(a: &AgentHandle, name: &str, manager: SocketAddr, request: Request) -> Response {
    match request {
        Request::Status => {
            let mut status = agent_status(&a.status().borrow(), name, manager);
            // Bytes are counted as they arrive, also in the middle of an apply.
            status.nodes[0].bytes_transferred = a.bytes_received();
            Response::Status(status)
        }
        Request::Pause { node: Some(_), .. } | Request::Resume { node: Some(_) } => error(
            ErrorKind::WrongRole,
            "this is an agent: run `syncctl pause` / `syncctl resume` without a node name here, or name the node on the manager",
        ),
        Request::Pause {
            node: None,
            for_secs,
        } => match a.pause(until(for_secs)).await {
            Ok(_) => {
                done("paused: nothing in this node's folders will change until `syncctl resume`")
            }
            Err(e) => error(ErrorKind::Failed, e),
        },
        Request::Resume { node: None } => match a.resume().await {
            Ok(report) => Response::Done {
                message: if report.changes.is_empty() {
                    "resumed: no local changes; converging".into()
                } else {
                    format!(
                        "resumed: {} local change(s) backed up; converging",
                        report.changes.len()
                    )
                },
                generation: None,
                changes: report.changes.into_iter().map(local_change).collect(),
                backup: report.backup.map(|b| b.display().to_string()),
            },
            Err(e) => error(ErrorKind::Failed, e),
        },
        Request::Confirm { .. } => error(
            ErrorKind::WrongRole,
            "`confirm` releases the manager's delete guard: run it on the manager",
        ),
        Request::Backups => match a.backups().await {
            Ok(list) => Response::Backups {
                backups: list
                    .into_iter()
                    .map(|b| BackupView {
                        name: b.name,
                        bytes: b.bytes,
                        changes: b.changes,
                    })
                    .collect(),
            },
            Err(e) => error(ErrorKind::Failed, e),
        },
        Request::Changes { node: Some(other) } if other != name => error(
            ErrorKind::WrongRole,
            format!("this is agent {name:?}: ask the manager about {other:?}"),
        ),
        Request::Changes { .. } => match a.changes().await {
            Ok(changes) => Response::Changes {
                changes: changes.into_iter().map(local_change).collect(),
                note: None,
            },
            Err(e) => error(ErrorKind::Failed, e),
        },
        Request::Wait {
            generation,
            timeout_secs,
            ..
        } => {
            let Some(target) = generation else {
                return error(
                    ErrorKind::WrongRole,
                    "on an agent, give --generation N (or run `syncctl wait` on the manager)",
                );
            };
            let mut status = a.status();
            let timeout = Duration::from_secs_f64(timeout_secs.clamp(0.0, 86_400.0 * 7.0));
            let reached = tokio::time::timeout(timeout, status.wait_for(|s| s.applied.0 >= target))
                .await
                .is_ok_and(|r| r.is_ok());
            let s = a.status().borrow().clone();
            let row = agent_row(&s, name, manager);
            Response::Wait(WaitReport {
                generation: target,
                reached,
                laggards: if reached {
                    Vec::new()
                } else {
                    vec![Laggard {
                        name: name.to_owned(),
                        state: row.state,
                        applied: s.applied.0,
                        counted: true,
                        last_error: s.last_error,
                    }]
                },
            })
        }
    }
}

fn local_change(c: syncd_agent::LocalChange) -> LocalChange {
    LocalChange {
        folder: c.folder,
        path: c.path,
        change: c.kind.into(),
        action: None,
    }
}

/// On the manager: an agent's local changes as it last reported them (a paused agent lists
/// every change it finds; an unpaused one, the changes it leaves in place).
fn agent_changes(m: &ManagerHandle, node: &str) -> Response {
    let s = m.status().borrow().clone();
    let Some(v) = s.agents.get(node) else {
        return error(
            ErrorKind::UnknownNode,
            format!("no agent named {node:?} in the manager's config"),
        );
    };
    let cut = if v.drift_cut() {
        format!(
            "; it reported its first {} only: `syncctl changes` on {node} lists them all",
            v.drift.len()
        )
    } else {
        String::new()
    };
    let note = if !v.connected {
        format!("{node} is offline: its local changes as it last reported them{cut}")
    } else if v.paused.is_some() {
        format!(
            "{node} is paused: its local changes as it reports them; `syncctl resume {node}` backs them up and converges{cut}"
        )
    } else {
        format!(
            "{node} is not paused: local changes it leaves in place (it reverts the others, keeping them in its backups: `syncctl backups` on it){cut}"
        )
    };
    Response::Changes {
        changes: v
            .drift
            .iter()
            .map(|e| LocalChange {
                folder: e.folder.clone(),
                path: e.path.clone(),
                change: e.change.clone(),
                action: Some(e.action.clone()),
            })
            .collect(),
        note: Some(note),
    }
}

fn agent_row(s: &AgentStatus, name: &str, manager: SocketAddr) -> NodeView {
    let state = if s.paused.is_some() {
        "paused"
    } else if !s.connected {
        "offline"
    } else if s.syncing {
        "syncing"
    } else if s.last_error.is_some() {
        "error"
    } else if !s.drift.is_empty() {
        "drifted"
    } else {
        "in sync"
    };
    NodeView {
        name: name.to_owned(),
        address: Some(manager.to_string()),
        state: state.into(),
        connected: s.connected,
        applied: s.applied.0,
        behind_generations: 0,
        behind_bytes: 0,
        last_seen: s.last_applied.map(secs),
        last_error: s.last_error.clone(),
        paused_until: s.paused.as_ref().and_then(|p| p.until),
        paused_by: s.paused.as_ref().map(|p| p.by.clone()),
        bytes_transferred: s.bytes_fetched,
        bytes_reused: s.bytes_reused,
        drift: s.drift.iter().map(drift_view).collect(),
        drift_cut: false,
        drift_reverted: s.drift_reverted,
        max_rate: None,
        folders_not_taken: s.folders_not_taken.clone(),
        folders_not_published: s.folders_not_published.clone(),
    }
}

fn drift_view(e: &syncd_proto::DriftEntry) -> DriftView {
    DriftView {
        folder: e.folder.clone(),
        path: e.path.clone(),
        change: e.change.clone(),
        action: e.action.clone(),
    }
}

fn agent_status(s: &AgentStatus, name: &str, manager: SocketAddr) -> Status {
    Status {
        role: "agent".into(),
        node: name.to_owned(),
        generation: s.applied.0,
        hold: None,
        pending: Vec::new(),
        pending_total: 0,
        guarded: Vec::new(),
        held_files: Vec::new(),
        skipped: Vec::new(),
        skipped_total: 0,
        nodes: vec![agent_row(s, name, manager)],
    }
}
