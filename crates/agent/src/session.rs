//! The agent's side of a connection: handshake, join, then receive and apply generations;
//! reconnect with backoff when anything fails.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use syncd_fsops::Seen;
use syncd_fsops::{LocalDelta, LocalManifest};
use syncd_manifest::{Change, Chunker, Manifest, NodeKind, RelPath};
use syncd_proto::{
    AgentMsg, Base, Generation, HELLO_LEN, Hello, MAX_CONTROL_FRAME, MAX_REQUEST_FRAME, ManagerMsg,
    Pause, UpdateAssembler, close,
};
use syncd_transport::{Conn, Endpoint, RecvStream, SendStream, TransportError};
use tokio::sync::{mpsc, oneshot, watch};

use crate::apply::{self, ApplyError, ApplyStats, Target};
use crate::drift;
use crate::journal::Journal;
use crate::pause::{self, LocalChange, ResumeReport};
use crate::state::AppliedRecord;
use crate::{Agent, AgentError, Command};

/// A handshake takes a few round trips; QUIC ignores ICMP errors, so an unreachable manager
/// is only noticed by this timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// An apply that moved at least this many bytes leaves receive and staging buffers free in the
/// heap: they are handed back after it (see `syncd_fsops::trim_heap`).
const TRIM_AFTER_BYTES: u64 = 16 << 20;

/// How a session ended, other than by an error.
enum End {
    Shutdown,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("manager sent {0} out of place")]
    Unexpected(&'static str),
    #[error("manager ended the control stream")]
    Ended,
    #[error("{0}")]
    Protocol(String),
}

pub(crate) async fn run(
    mut agent: Agent,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let mut endpoint = Endpoint::client(&agent.identity, agent.config.manager_addr)?;
    let (_, mut commands) = {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        (tx, std::mem::replace(&mut agent.commands, rx))
    };
    // A pause that ended while the agent was down ends now.
    expire_pause(&mut agent, None).await.ok();
    let paths: Vec<std::path::PathBuf> = agent
        .folders
        .iter()
        .map(|f| f.root.path().to_owned())
        .collect();
    let mut drift = DriftCtl {
        watch: drift::watch(&paths),
        verify: tokio::time::interval(drift::VERIFY_EVERY),
        due: None,
    };
    let mut backoff = BACKOFF_MIN;
    'outer: loop {
        if *shutdown.borrow() {
            break;
        }
        // A client endpoint holds one connection at a time (see `Endpoint::client`): if the
        // last session's is still closing, this attempt gets a socket of its own, and the old
        // endpoint finishes the close in the background.
        if endpoint.has_connections() {
            match Endpoint::client(&agent.identity, agent.config.manager_addr) {
                Ok(fresh) => {
                    let old = std::mem::replace(&mut endpoint, fresh);
                    tokio::spawn(async move {
                        let _ =
                            tokio::time::timeout(Duration::from_secs(10), old.wait_idle()).await;
                    });
                }
                // The attempt below fails with its own error and is retried later.
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open a new UDP socket for the next connection attempt")
                }
            }
        }
        let started = Instant::now();
        // The session watches `shutdown` itself, between frames: an apply in progress is
        // finished, never cut off in the middle of its renames.
        let result = session(
            &mut agent,
            &endpoint,
            &mut shutdown,
            &mut commands,
            &mut drift,
        )
        .await;
        agent.status.send_modify(|s| s.connected = false);
        match result {
            Ok(End::Shutdown) => break,
            Err(e) => {
                tracing::warn!(manager = %agent.config.manager_addr, error = %e, "session with the manager ended; reconnecting");
                agent
                    .status
                    .send_modify(|s| s.last_error = Some(e.to_string()));
            }
        }
        // A session that got as far as joining resets the backoff: a restarted manager is
        // reconnected to at once, an unreachable one is retried less and less often.
        if started.elapsed() > BACKOFF_MAX || std::mem::take(&mut agent.joined) {
            backoff = BACKOFF_MIN;
        }
        // Operators may pause, resume and look while the manager is out of reach.
        let sleep = tokio::time::sleep(backoff);
        tokio::pin!(sleep);
        loop {
            if std::mem::take(&mut agent.drift.check_now) {
                drift.now();
            }
            let expiry = pause_expiry(&agent);
            let check = drift.check_due();
            tokio::select! {
                _ = &mut sleep => break,
                _ = shutdown.changed() => break 'outer,
                Some(cmd) = commands.recv() => {
                    let _ = handle_command(&mut agent, cmd, None).await;
                }
                _ = expiry => {
                    let _ = expire_pause(&mut agent, None).await;
                }
                _ = drift.watch.changed.notified() => drift.schedule(),
                _ = drift.verify.tick() => drift.now(),
                _ = check => {
                    drift.due = None;
                    let _ = check_drift(&mut agent, &mut drift.watch, None, None).await;
                }
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    endpoint.close(close::SHUTDOWN, "agent shutting down");
    tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle())
        .await
        .ok();
    Ok(())
}

/// Resolves when the pause in force ends by its time limit (never, without one).
fn pause_expiry(agent: &Agent) -> impl std::future::Future<Output = ()> + 'static {
    let until = agent.state.pause.as_ref().and_then(pause::ends_at);
    async move {
        match until {
            Some(t) => {
                let left = t.duration_since(SystemTime::now()).unwrap_or_default();
                tokio::time::sleep(left).await;
            }
            None => std::future::pending().await,
        }
    }
}

async fn session(
    agent: &mut Agent,
    endpoint: &Endpoint,
    shutdown: &mut watch::Receiver<bool>,
    commands: &mut mpsc::Receiver<Command>,
    drift: &mut DriftCtl,
) -> Result<End, SessionError> {
    let addr = agent.config.manager_addr;
    let identity = std::sync::Arc::clone(&agent.identity);
    let connect = tokio::time::timeout(
        CONNECT_TIMEOUT,
        endpoint.connect(&identity, addr, agent.config.manager_id),
    );
    tokio::pin!(connect);
    let conn = loop {
        tokio::select! {
            c = &mut connect => break c.map_err(|_| TransportError::Connect(format!("no answer from {addr} within {CONNECT_TIMEOUT:?}")))??,
            _ = shutdown.changed() => return Ok(End::Shutdown),
            Some(cmd) = commands.recv() => {
                let _ = handle_command(agent, cmd, None).await;
            }
        }
    };
    let (mut tx, mut rx) = conn.open_bi().await?;
    handshake(&conn, &mut tx, &mut rx).await?;

    tx.send(
        &AgentMsg::Join {
            node_name: agent.config.node_name.clone(),
            software: env!("CARGO_PKG_VERSION").to_owned(),
            applied: agent.state.applied,
            folders: agent.folders.iter().map(|f| f.state()).collect(),
        },
        MAX_REQUEST_FRAME,
    )
    .await?;
    let (not_taken, not_published) = match rx.expect::<ManagerMsg>(MAX_CONTROL_FRAME).await {
        Ok(ManagerMsg::Welcome {
            manager_name,
            software,
            folders,
        }) => {
            let not_published: Vec<String> = agent
                .folders
                .iter()
                .map(|f| f.name.clone())
                .filter(|f| !folders.contains(f))
                .collect();
            let not_taken: Vec<String> = folders
                .into_iter()
                .filter(|f| !agent.folders.iter().any(|mine| &mine.name == f))
                .collect();
            for f in &not_published {
                tracing::warn!(folder = %f, manager = %manager_name, "the manager does not publish this folder; it will not be synced");
            }
            for f in &not_taken {
                tracing::warn!(folder = %f, manager = %manager_name, "the manager publishes a folder that is not in this node's config; this node will not get it");
            }
            tracing::info!(manager = %manager_name, %addr, version = %software, "connected to the manager");
            (not_taken, not_published)
        }
        Ok(_) => {
            return Err(protocol_violation(
                &conn,
                SessionError::Unexpected("a message before Welcome"),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    agent.joined = true;
    // The manager sends nothing before it knows whether this agent is paused.
    send_pause_state(agent, &mut tx).await?;
    agent.status.send_modify(|s| {
        s.connected = true;
        s.last_error = None;
        s.folders_not_taken = not_taken;
        s.folders_not_published = not_published;
    });

    let mut updates: Vec<(syncd_proto::ManagerMsg, UpdateAssembler)> = Vec::new();
    // Drift left in place while the manager was out of reach: tell it, and look again now.
    send_drift(agent, &mut tx).await?;
    drift.now();
    // An operator's pause or resume waiting for the manager's confirmation.
    let mut pause_ack: Option<PauseAck> = None;
    // A comparison with what was applied, under way.
    let mut walk: Option<DriftWalk> = None;
    let mut walk_again = false;
    loop {
        if std::mem::take(&mut agent.drift.check_now) {
            drift.now();
        }
        let expiry = pause_expiry(agent);
        let check = drift.check_due();
        let ack_deadline = pause_ack.as_ref().map(|a| a.deadline);
        let ack_wait = async move {
            match ack_deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let msg = tokio::select! {
            m = rx.recv::<ManagerMsg>(MAX_CONTROL_FRAME) => m,
            Some(cmd) = commands.recv() => {
                // A newer decision answers the one still waiting (dropping it).
                if let Some(ack) = handle_command(agent, cmd, Some(&mut tx)).await? {
                    pause_ack = Some(ack);
                }
                continue;
            }
            _ = ack_wait => {
                tracing::warn!(wait = ?PAUSE_ACK_WAIT, "the manager has not confirmed the pause state; answering the operator anyway");
                pause_ack = None;
                continue;
            }
            _ = expiry => {
                expire_pause(agent, Some(&mut tx)).await?;
                continue;
            }
            _ = drift.watch.changed.notified() => {
                drift.schedule();
                continue;
            }
            _ = drift.verify.tick() => {
                drift.now();
                continue;
            }
            _ = check => {
                drift.due = None;
                if walk.is_some() {
                    // Something changed during the walk under way: look again after it.
                    walk_again = true;
                } else {
                    walk = Some(DriftWalk::start(agent, &mut drift.watch));
                }
                continue;
            }
            found = async { (&mut walk.as_mut().expect("guarded").task).await }, if walk.is_some() => {
                let done = walk.take().expect("guarded");
                let found = found.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                // A generation applied during the walk made it stale, and a change seen during
                // it may have been missed: look again once things are quiet. So did a pause or
                // resume meanwhile (what it found is to be reverted, or only listed, now).
                let stale = !done.current(agent);
                if stale {
                    drift.watch.put_back(done.scopes);
                } else {
                    act_on_drift(agent, Some(&conn), Some(&mut tx), found).await?;
                }
                if std::mem::take(&mut walk_again) || stale {
                    drift.schedule();
                }
                continue;
            }
            _ = shutdown.changed() => {
                conn.close(close::SHUTDOWN, "agent shutting down");
                return Ok(End::Shutdown);
            }
        };
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) => return Err(SessionError::Ended),
            Err(e @ TransportError::Decode(_)) => return Err(protocol_violation(&conn, e.into())),
            Err(e) => return Err(e.into()),
        };
        match msg {
            header @ ManagerMsg::Update { .. } => {
                // One update per folder: more is a peer trying to make us hold without bound.
                if updates.len() >= agent.folders.len().max(1) * 2 {
                    return Err(protocol_violation(
                        &conn,
                        SessionError::Protocol(
                            "more folder updates in one generation than folders".into(),
                        ),
                    ));
                }
                updates.push((header, UpdateAssembler::new()))
            }
            ManagerMsg::Changes(page) => {
                assemble(&conn, &mut updates, "Changes before Update", |asm| {
                    asm.push_changes(page)
                })?;
            }
            ManagerMsg::Patched(patched) => {
                assemble(&conn, &mut updates, "Patched before Update", |asm| {
                    asm.push_patched(patched)
                })?;
            }
            ManagerMsg::Pushed(pushed) => {
                assemble(&conn, &mut updates, "Pushed before Update", |asm| {
                    asm.push_pushed(pushed)
                })?;
            }
            ManagerMsg::MoreChunks(chunks) => {
                assemble(&conn, &mut updates, "MoreChunks before Update", |asm| {
                    asm.push_chunks(chunks)
                })?;
            }
            ManagerMsg::UpdateEnd { generation } => {
                let updates = std::mem::take(&mut updates);
                if agent.state.pause.is_some() {
                    tracing::info!(%generation, "paused: generation not applied");
                    tx.send(&AgentMsg::Deferred { generation }, MAX_REQUEST_FRAME)
                        .await?;
                    continue;
                }
                agent.status.send_modify(|s| s.syncing = true);
                follow_moved_folders(agent, &mut drift.watch);
                let (reply, changed) =
                    apply_generation(agent, &conn, generation, updates, &mut drift.watch).await;
                agent.status.send_modify(|s| s.syncing = false);
                // The reply goes first: the folders are already right and durable, and the
                // record only spares a rehash after a restart. It is written even when the
                // reply cannot be sent.
                let sent = tx.send(&reply, MAX_REQUEST_FRAME).await;
                record_state(agent, changed);
                sent?;
            }
            ManagerMsg::SetPause { pause, set_at } => {
                if set_at > agent.state.pause_set_at {
                    match pause {
                        Some(p) => set_pause(agent, p),
                        None => {
                            if let Err(e) = resume(agent, set_at, "resumed from the manager").await
                            {
                                tracing::error!(error = %e, "resume failed");
                            }
                        }
                    }
                }
                // Either way, tell the manager what holds now (ours may be the newer decision).
                send_pause_state(agent, &mut tx).await?;
                // The manager's echo of our decision (or a newer one of its own) confirms it.
                if pause_ack.as_ref().is_some_and(|a| set_at >= a.set_at) {
                    pause_ack = None;
                }
            }
            ManagerMsg::Welcome { .. } => {
                return Err(protocol_violation(
                    &conn,
                    SessionError::Unexpected("a second Welcome"),
                ));
            }
        }
    }
}

/// Records the agent state: after a successful apply, the generation's changes (in `changed`)
/// are appended, and the apply journal goes; after a failed one, the whole state is written and
/// the journal stays, so that a restart tells the agent's partial work from edits.
fn record_state(agent: &mut Agent, changed: Option<Vec<(String, LocalDelta)>>) {
    let dir = agent.config.state_dir.clone();
    let applied = changed.is_some();
    let result = match changed {
        Some(folders) => {
            let record = AppliedRecord {
                applied: agent.state.applied,
                folders,
            };
            let Agent {
                state,
                store,
                folders,
                ..
            } = agent;
            crate::state::record(store, &record, state, |state| {
                state.folders = crate::folder::locals(folders);
            })
            .map(|()| true)
        }
        None => agent.save_state().map(|()| false),
    };
    match result {
        Ok(true) => {
            if let Err(e) = Journal::clear(&dir) {
                tracing::warn!(error = %e, "cannot remove the apply journal");
            }
        }
        Ok(false) => {}
        Err(e) if applied => tracing::error!(error = %e, "cannot record the applied generation"),
        Err(e) => {
            tracing::error!(error = %e, "cannot record what the folders hold after the failed apply")
        }
    }
}

/// When the folders are next compared with what was applied.
pub(crate) struct DriftCtl {
    watch: drift::Watch,
    verify: tokio::time::Interval,
    due: Option<tokio::time::Instant>,
}

impl DriftCtl {
    /// A change was seen: compare once things are quiet.
    fn schedule(&mut self) {
        self.due
            .get_or_insert_with(|| tokio::time::Instant::now() + drift::DEBOUNCE);
    }

    /// Compare every folder in full, at once.
    fn now(&mut self) {
        self.watch.report_all();
        self.due = Some(tokio::time::Instant::now());
    }

    fn check_due(&self) -> impl std::future::Future<Output = ()> + 'static {
        let due = self.due;
        async move {
            match due {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        }
    }
}

/// Local changes left in place (new ones) or reverted that a comparison logs one by one; the
/// rest are counted (a `touch` over 100,000 files made 100,000 lines).
const DRIFT_LOGGED: usize = 20;

async fn send_drift(agent: &Agent, tx: &mut SendStream) -> Result<(), TransportError> {
    tx.send(
        &AgentMsg::Drift {
            entries: syncd_proto::drift_reported(&agent.drift.entries).to_vec(),
            reverted_total: agent.drift.reverted_total,
        },
        MAX_REQUEST_FRAME,
    )
    .await
}

/// Follows each folder's path to the directory now there, if its directory was moved away or
/// replaced (`mv server server.old; mkdir server`, a restore): writes through the old one would
/// land where the operator no longer looks. What applied there is then compared in full with
/// what the new directory holds, and reverted or reported like any local change. A path with
/// nothing at it is created, as at start.
fn follow_moved_folders(agent: &mut Agent, watch: &mut drift::Watch) {
    for (i, folder) in agent.folders.iter_mut().enumerate() {
        match folder.root.still_at_path() {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(folder = %folder.name, path = %folder.root.path().display(), error = %e, "cannot tell whether the folder is still at its path");
                continue;
            }
        }
        let path = folder.root.path().to_owned();
        let reopened =
            std::fs::create_dir_all(&path).and_then(|()| syncd_fsops::FolderRoot::open(&path));
        match reopened {
            Ok(root) => {
                tracing::warn!(folder = %folder.name, path = %path.display(), "the folder's directory was moved away or replaced; following its path: what the directory there holds is compared with what was applied");
                folder.root = Arc::new(root);
                watch.rewatch(i);
            }
            Err(e) => {
                tracing::error!(folder = %folder.name, path = %path.display(), error = %e, "the folder's directory was moved away or replaced, and the path cannot be opened");
            }
        }
    }
}

/// Compares the folders with what was applied; reverts or reports what differs (see
/// `drift.rs`). Nothing happens while paused. Without a connection, changes are only reported
/// (as waiting for the manager).
async fn check_drift(
    agent: &mut Agent,
    watch: &mut drift::Watch,
    conn: Option<&Conn>,
    tx: Option<&mut SendStream>,
) -> Result<(), TransportError> {
    let found = DriftWalk::start(agent, watch)
        .task
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    act_on_drift(agent, conn, tx, found).await
}

/// A comparison of the folders with what was applied, walking on the blocking pool while the
/// session goes on (a full walk of 10,000 files takes ~50 ms, of 100,000 half a second: a
/// generation arriving meanwhile must not wait for it). Usually it looks only at the paths the
/// watch reported.
struct DriftWalk {
    task: tokio::task::JoinHandle<Vec<drift::Found>>,
    /// What it compares in each folder (put back if the walk has to be redone).
    scopes: Vec<drift::Scope>,
    /// Each folder's applied digest when the walk started: if one moved (a generation was
    /// applied meanwhile), the walk compared against a stale expectation and is redone.
    digests: Vec<syncd_manifest::ManifestDigest>,
    /// Whether the agent was paused when the walk started (a walk that outlives a pause or a
    /// resume is redone).
    paused: bool,
}

impl DriftWalk {
    fn start(agent: &mut Agent, watch: &mut drift::Watch) -> DriftWalk {
        follow_moved_folders(agent, watch);
        let mut scopes = watch.take();
        if std::mem::take(&mut agent.drift.recheck_all) {
            scopes = vec![drift::Scope::All; scopes.len()];
        }
        tracing::debug!(
            scopes = ?scopes.iter().map(drift::Scope::summary).collect::<Vec<_>>(),
            "comparing the folders with what was applied"
        );
        // Only the folders with something to compare are copied for the blocking pool.
        let compared: Vec<_> = agent
            .folders
            .iter()
            .zip(&scopes)
            .enumerate()
            .filter(|(_, (_, scope))| **scope != drift::Scope::Nothing)
            .map(|(i, (folder, scope))| (i, folder.clone(), scope.clone()))
            .collect();
        DriftWalk {
            paused: agent.state.pause.is_some(),
            digests: agent
                .folders
                .iter()
                .map(|f| f.local.manifest.digest())
                .collect(),
            task: tokio::task::spawn_blocking(move || drift::compare(compared)),
            scopes,
        }
    }

    /// Whether what the walk compared against is still what was applied.
    fn current(&self, agent: &Agent) -> bool {
        self.paused == agent.state.pause.is_some()
            && self
                .digests
                .iter()
                .copied()
                .eq(agent.folders.iter().map(|f| f.local.manifest.digest()))
    }
}

/// Reports, reverts or leaves what a comparison found, by each folder's policy.
async fn act_on_drift(
    agent: &mut Agent,
    conn: Option<&Conn>,
    tx: Option<&mut SendStream>,
    found: Vec<drift::Found>,
) -> Result<(), TransportError> {
    let now = Instant::now();
    // What is left in place where nothing was compared this time stays listed.
    let mut left: Vec<syncd_proto::DriftEntry> = agent
        .drift
        .entries
        .iter()
        .filter(|e| {
            !found
                .iter()
                .any(|f| agent.folders[f.folder].name == e.folder && f.covered.covers(&e.path))
        })
        .cloned()
        .collect();
    let mut reverted = 0u64;
    let may = if agent.state.pause.is_some() {
        drift::May::List
    } else if conn.is_some() {
        drift::May::Revert
    } else {
        drift::May::Wait
    };
    for found in found {
        let i = found.folder;
        for path in &found.skipped.unreadable {
            left.push(syncd_proto::DriftEntry {
                folder: agent.folders[i].name.clone(),
                path: path.to_string(),
                change: drift::UNREADABLE.into(),
                action: "left".into(),
            });
        }
        let remove = drift::plan_foreign(
            &agent.folders[i],
            &found.skipped.foreign,
            &mut agent.drift,
            may,
            now,
            &mut left,
        );
        if !remove.is_empty() {
            reverted += remove_foreign(agent, i, &remove, &mut left);
        }
        if found.changes.is_empty() {
            // Same content: only metadata such as ctime moved; remember the new stat keys.
            found
                .actual
                .refresh_keys(Arc::make_mut(&mut agent.folders[i].local));
            continue;
        }
        let actual = found
            .actual
            .resolve(&agent.folders[i].local, &found.changes);
        let plan = drift::plan(
            &agent.folders[i],
            &actual.manifest,
            &found.changes,
            &mut agent.drift,
            may,
            now,
            &mut left,
        );
        let Some(conn) = conn.filter(|_| !plan.revert.is_empty()) else {
            continue;
        };
        let described = pause::describe(&agent.folders[i], &plan.revert);
        let backup_root = pause::backup_dir_named(&agent.config.state_dir, "drift");
        let backed_up = {
            let folder = &agent.folders[i];
            pause::back_up(&backup_root, folder, &plan.revert)
                .and_then(|_| pause::write_index(&backup_root, &described))
        };
        if let Err(e) = backed_up {
            // Nothing is overwritten unless its local version is kept.
            tracing::error!(folder = %agent.folders[i].name, error = %e, "cannot back up local changes; not reverting them");
            continue;
        }
        drift::prune_backups(
            &agent.config.state_dir,
            agent.config.max_backups,
            agent.config.max_backup_bytes,
        );
        let changes = syncd_manifest::diff(&actual.manifest, &plan.target);
        let expected = std::mem::replace(&mut agent.folders[i].local, Arc::new(actual));
        let mut stats = ApplyStats::default();
        let target = Target {
            folder: i,
            changes,
            inline: Vec::new(),
            pushed: Vec::new(),
            clear: Vec::new(),
        };
        // The watch stays on: a revert is small, and is what the watch is for.
        let result = apply::apply(
            conn,
            &agent.folders,
            vec![target],
            &mut stats,
            &agent.received,
            &agent.config.state_dir,
            &mut agent.chunks,
            None,
        )
        .await;
        let mut expected = expected;
        match result {
            Ok(applied) => {
                // What the journal covered is what the state already records.
                if let Err(e) = Journal::clear(&agent.config.state_dir) {
                    tracing::warn!(error = %e, "cannot remove the apply journal");
                }
                let expected = Arc::make_mut(&mut expected);
                for (_, applied) in applied {
                    let mut now = LocalManifest::clone(&agent.folders[i].local);
                    applied.commit_to(&mut now);
                    for (p, key) in now.stats {
                        if now.manifest.get(&p) == expected.manifest.get(&p) {
                            expected.stats.insert(p, key);
                        }
                    }
                }
                for c in described.iter().take(DRIFT_LOGGED) {
                    tracing::warn!(
                        folder = %c.folder,
                        path = %c.path,
                        change = c.kind,
                        backup = %backup_root.display(),
                        "reverted a local change (the local version is backed up)"
                    );
                }
                if described.len() > DRIFT_LOGGED {
                    tracing::warn!(
                        folder = %agent.folders[i].name,
                        more = described.len() - DRIFT_LOGGED,
                        backup = %backup_root.display(),
                        "reverted more local changes (the backup's CHANGES file lists them all)"
                    );
                }
                reverted += described.len() as u64;
            }
            Err(e) => {
                tracing::error!(folder = %agent.folders[i].name, error = %e, "could not revert local changes; will try again");
                for c in described {
                    left.push(syncd_proto::DriftEntry {
                        folder: c.folder,
                        path: c.path,
                        change: c.kind.into(),
                        action: "waiting".into(),
                    });
                }
            }
        }
        agent.folders[i].local = expected;
    }
    let left = drift::normalize(left);
    let changed = left != agent.drift.entries || reverted > 0;
    // Both lists are sorted by folder and path (a search each, not a pass: there may be
    // 100,000 of them); only the first few new ones are logged one by one.
    let known = |e: &syncd_proto::DriftEntry| {
        agent
            .drift
            .entries
            .binary_search_by(|x| (&x.folder, &x.path).cmp(&(&e.folder, &e.path)))
            .is_ok_and(|i| agent.drift.entries[i] == *e)
    };
    let new: Vec<&syncd_proto::DriftEntry> = left.iter().filter(|e| !known(e)).collect();
    for e in new.iter().take(DRIFT_LOGGED) {
        tracing::warn!(folder = %e.folder, path = %e.path, change = %e.change, action = %e.action, "local change left in place");
    }
    if new.len() > DRIFT_LOGGED {
        tracing::warn!(
            more = new.len() - DRIFT_LOGGED,
            left = left.len(),
            "more local changes left in place (`syncctl changes` lists them all)"
        );
    }
    agent.drift.entries = left;
    agent.drift.reverted_total += reverted;
    if changed {
        let (entries, total) = (agent.drift.entries.clone(), agent.drift.reverted_total);
        agent.status.send_modify(|s| {
            s.drift = entries;
            s.drift_reverted = total;
        });
        if let Some(tx) = tx {
            send_drift(agent, tx).await?;
        }
    }
    Ok(())
}

/// Removes entries syncd never carries (a socket, a FIFO, a link that is absolute or leaves the
/// folder) from folder `i`, links backed up first; returns how many went. What cannot be
/// backed up or removed is left, listed in `left`.
fn remove_foreign(
    agent: &Agent,
    i: usize,
    paths: &[RelPath],
    left: &mut Vec<syncd_proto::DriftEntry>,
) -> u64 {
    let folder = &agent.folders[i];
    let described = pause::describe_added(&folder.name, paths);
    let backup_root = pause::backup_dir_named(&agent.config.state_dir, "drift");
    let kept = pause::back_up_paths(&backup_root, folder, paths)
        .and_then(|_| pause::write_index(&backup_root, &described));
    let mut removed = 0;
    for (path, c) in paths.iter().zip(described) {
        let outcome = match &kept {
            Ok(()) => folder.root.remove_entry(path).map_err(|e| e.to_string()),
            Err(e) => Err(format!("cannot back it up: {e}")),
        };
        match outcome {
            Ok(()) => {
                tracing::warn!(folder = %folder.name, %path, backup = %backup_root.display(), "removed an entry syncd never carries (a socket, FIFO, device, or a link that is absolute or leaves the folder); a link is backed up");
                removed += 1;
            }
            Err(e) => {
                tracing::error!(folder = %folder.name, %path, error = %e, "cannot remove an entry syncd never carries; will try again");
                left.push(syncd_proto::DriftEntry {
                    folder: c.folder,
                    path: c.path,
                    change: c.kind.into(),
                    action: "waiting".into(),
                });
            }
        }
    }
    // Their directories get back the mtimes that were applied.
    let mut dirs: Vec<RelPath> = paths.iter().filter_map(RelPath::parent).collect();
    dirs.sort_unstable();
    dirs.dedup();
    for dir in dirs {
        if let Some(node) = folder.local.manifest.get(&dir).filter(|n| n.is_dir())
            && let Err(e) = folder.root.set_dir_meta(&dir, node.mode, node.mtime)
        {
            tracing::warn!(folder = %folder.name, path = %dir, error = %e, "cannot restore a directory's mtime");
        }
    }
    drift::prune_backups(
        &agent.config.state_dir,
        agent.config.max_backups,
        agent.config.max_backup_bytes,
    );
    removed
}

async fn send_pause_state(agent: &Agent, tx: &mut SendStream) -> Result<(), TransportError> {
    tx.send(
        &AgentMsg::PauseState {
            pause: agent.state.pause.clone(),
            set_at: agent.state.pause_set_at,
            folders: agent.folders.iter().map(|f| f.state()).collect(),
        },
        MAX_REQUEST_FRAME,
    )
    .await
}

/// How long `syncctl pause|resume` on a worker waits for the manager to confirm that it
/// recorded the decision: a `syncctl wait` on the manager right after the command returns then
/// counts this agent as it now is (paused agents are left out of a plain `wait`).
const PAUSE_ACK_WAIT: Duration = Duration::from_secs(5);

/// A pause or resume decided here, its operator's answer held until the manager confirms the
/// decision (a `SetPause` carrying its time or a later one). Answered then, after
/// `PAUSE_ACK_WAIT`, or when dropped (the connection ended), whichever comes first.
struct PauseAck {
    set_at: u64,
    deadline: tokio::time::Instant,
    reply: Option<AckReply>,
}

enum AckReply {
    Pause(oneshot::Sender<Result<Pause, String>>, Pause),
    Resume(oneshot::Sender<Result<ResumeReport, String>>, ResumeReport),
}

impl Drop for PauseAck {
    fn drop(&mut self) {
        match self.reply.take() {
            Some(AckReply::Pause(tx, p)) => {
                let _ = tx.send(Ok(p));
            }
            Some(AckReply::Resume(tx, r)) => {
                let _ = tx.send(Ok(r));
            }
            None => {}
        }
    }
}

/// Handles an operator's command; with a connection, tells the manager about pause changes and
/// returns the answer to hold until the manager confirms them.
async fn handle_command(
    agent: &mut Agent,
    cmd: Command,
    tx: Option<&mut SendStream>,
) -> Result<Option<PauseAck>, TransportError> {
    let decided = match cmd {
        Command::Pause { until, reply } => {
            let p = Pause {
                until,
                set_at: pause::now_ms(),
                by: "agent".into(),
            };
            set_pause(agent, p.clone());
            Some(AckReply::Pause(reply, p))
        }
        Command::Resume { reply } => {
            // `syncctl resume` also tells the agent to fight flapping paths again.
            agent.drift.forgive_all();
            match resume(agent, pause::now_ms(), "resumed").await {
                Ok(report) => Some(AckReply::Resume(reply, report)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                    None
                }
            }
        }
        Command::Changes { reply } => {
            let _ = reply.send(changes(agent).await);
            return Ok(None);
        }
        Command::Backups { reply } => {
            let list = drift::list_backups(&agent.config.state_dir)
                .into_iter()
                .map(|(name, bytes, changes)| crate::BackupInfo {
                    name,
                    bytes,
                    changes,
                })
                .collect();
            let _ = reply.send(list);
            return Ok(None);
        }
    };
    // Without a connection (or if telling the manager fails) the answer goes at once, as the
    // `PauseAck` is dropped.
    let ack = decided.map(|reply| PauseAck {
        set_at: agent.state.pause_set_at,
        deadline: tokio::time::Instant::now() + PAUSE_ACK_WAIT,
        reply: Some(reply),
    });
    match tx {
        Some(tx) => {
            send_pause_state(agent, tx).await?;
            Ok(ack)
        }
        None => Ok(None),
    }
}

/// Ends a pause whose time limit has passed.
async fn expire_pause(
    agent: &mut Agent,
    tx: Option<&mut SendStream>,
) -> Result<(), TransportError> {
    let expired = agent
        .state
        .pause
        .as_ref()
        .is_some_and(|p| !pause::in_force(p, SystemTime::now()));
    if !expired {
        return Ok(());
    }
    let set_at = pause::now_ms();
    if let Err(e) = resume(agent, set_at, "pause time limit reached").await {
        tracing::error!(error = %e, "resume failed");
    }
    match tx {
        Some(tx) => send_pause_state(agent, tx).await,
        None => Ok(()),
    }
}

fn set_pause(agent: &mut Agent, p: Pause) {
    tracing::warn!(by = %p.by, until = ?p.until, "paused: nothing in the folders will change until resumed");
    agent.state.pause_set_at = p.set_at;
    agent.state.pause = Some(p.clone());
    if let Err(e) = agent.save_state() {
        tracing::error!(error = %e, "cannot record the pause; it will not survive a restart");
    }
    agent.status.send_modify(|s| s.paused = Some(p));
}

/// Lists local changes (scanning on the blocking pool).
async fn changes(agent: &mut Agent) -> Result<Vec<LocalChange>, String> {
    let folders = std::mem::take(&mut agent.folders);
    let (folders, result) = tokio::task::spawn_blocking(move || {
        let result = pause::local_changes(&folders).map(|per_folder| {
            folders
                .iter()
                .zip(&per_folder)
                .flat_map(|(f, (_, c, skipped))| {
                    let mut listed = pause::describe(f, c);
                    listed.extend(pause::describe_added(&f.name, &skipped.foreign));
                    listed
                })
                .collect()
        });
        (folders, result)
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    agent.folders = folders;
    result
}

/// Resumes: backs up local changes, adopts what the folders hold now, clears the pause. The
/// manager, told the new digests, then sends what differs and the folders converge.
async fn resume(agent: &mut Agent, set_at: u64, why: &str) -> Result<ResumeReport, String> {
    let folders = std::mem::take(&mut agent.folders);
    let backup_root = pause::backup_dir(&agent.config.state_dir);
    let (mut folders, result) = tokio::task::spawn_blocking(move || {
        let result = (|| -> Result<_, String> {
            let per_folder = pause::local_changes(&folders)?;
            let mut report = ResumeReport::default();
            for (f, (_, changes, _)) in folders.iter().zip(&per_folder) {
                report.changes.extend(pause::describe(f, changes));
                pause::back_up(&backup_root, f, changes)
                    .map_err(|e| format!("backing up local changes: {e}"))?;
            }
            if !report.changes.is_empty() {
                pause::write_index(&backup_root, &report.changes).map_err(|e| e.to_string())?;
                report.backup = Some(backup_root.clone());
            }
            Ok((per_folder, report))
        })();
        (folders, result)
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    let outcome = match result {
        Ok((per_folder, report)) => {
            for (f, (now, _, _)) in folders.iter_mut().zip(per_folder) {
                f.local = Arc::new(now);
            }
            Ok(report)
        }
        Err(e) => Err(e),
    };
    agent.folders = folders;
    let report = outcome?;
    drift::prune_backups(
        &agent.config.state_dir,
        agent.config.max_backups,
        agent.config.max_backup_bytes,
    );
    agent.state.pause = None;
    agent.state.pause_set_at = set_at;
    // What the comparisons listed as changed during the pause is backed up and is now what
    // this agent holds: compare afresh, so those entries go (here and on the manager).
    agent.drift.check_now = true;
    if let Err(e) = agent.save_state() {
        tracing::error!(error = %e, "cannot record the resume");
    }
    agent.status.send_modify(|s| s.paused = None);
    match &report.backup {
        Some(dir) => tracing::warn!(
            local_changes = report.changes.len(),
            backup = %dir.display(),
            "{why}: local changes made during the pause were backed up; converging"
        ),
        None => tracing::info!("{why}: no local changes; converging"),
    }
    Ok(report)
}

/// Hands a part of a folder's update to the assembler of the update begun last; a part before
/// any `Update` (`what`), or one the assembler refuses, closes the connection.
fn assemble(
    conn: &Conn,
    updates: &mut [(syncd_proto::ManagerMsg, UpdateAssembler)],
    what: &'static str,
    f: impl FnOnce(&mut UpdateAssembler) -> Result<(), syncd_proto::AssembleError>,
) -> Result<(), SessionError> {
    let (_, asm) = updates
        .last_mut()
        .ok_or_else(|| protocol_violation(conn, SessionError::Unexpected(what)))?;
    f(asm).map_err(|e| protocol_violation(conn, SessionError::Protocol(e.to_string())))
}

/// Closes the connection telling the manager why, and returns the error for the log.
fn protocol_violation(conn: &Conn, e: SessionError) -> SessionError {
    conn.close(close::PROTOCOL_ERROR, &e.to_string());
    e
}

/// How long a refusal of the manager's hello waits for ours to be acknowledged before closing.
const HELLO_FLUSH: Duration = Duration::from_secs(1);

async fn handshake(
    conn: &Conn,
    tx: &mut SendStream,
    rx: &mut RecvStream,
) -> Result<u16, SessionError> {
    tx.write_all(&Hello::OURS.encode()).await?;
    let mut bytes = [0u8; HELLO_LEN];
    rx.read_exact(&mut bytes).await?;
    let theirs = Hello::decode(&bytes).map_err(TransportError::from)?;
    match Hello::OURS.negotiate(&theirs) {
        Ok(v) => Ok(v),
        Err(e) => {
            tracing::error!(error = %e, "cannot talk to this manager; upgrade one side");
            // Our hello may still be unsent: flushed first, or the close could be held behind
            // it (see `SendStream::finish_and_flush`).
            tx.finish_and_flush(HELLO_FLUSH).await;
            conn.close(close::VERSION_MISMATCH, &e.to_string());
            Err(TransportError::from(e).into())
        }
    }
}

/// Applies one generation and returns the reply for the manager and, when it was applied, what
/// changed in each folder (to be recorded).
async fn apply_generation(
    agent: &mut Agent,
    conn: &Conn,
    generation: Generation,
    updates: Vec<(ManagerMsg, UpdateAssembler)>,
    watch: &mut drift::Watch,
) -> (AgentMsg, Option<Vec<(String, LocalDelta)>>) {
    let started = Instant::now();
    let mut stats = ApplyStats::default();
    tracing::debug!(%generation, folders = updates.len(), "applying generation");
    let result = match prepare(agent, updates) {
        Ok(targets) if targets.is_empty() => Ok(Vec::new()),
        Ok(mut targets) => match back_up_replaced(agent, generation, &mut targets) {
            Err(e) => Err(e),
            Ok(()) => {
                apply::apply(
                    conn,
                    &agent.folders,
                    targets,
                    &mut stats,
                    &agent.received,
                    &agent.config.state_dir,
                    &mut agent.chunks,
                    Some(watch),
                )
                .await
            }
        },
        Err(e) => Err(e),
    };
    let received = agent.received.load(std::sync::atomic::Ordering::Relaxed);
    agent.status.send_modify(|s| {
        s.bytes_fetched = received;
        s.bytes_pushed += stats.bytes_pushed;
        s.bytes_reused += stats.bytes_reused;
        s.files_written += stats.files_written;
    });
    match result {
        Ok(applied) => {
            let mut changed = Vec::new();
            for (i, applied) in applied {
                let f = &mut agent.folders[i];
                let before = f.digest();
                // In place: nothing else holds the folder's manifest now (a comparison under
                // way holds it, and is then redone as stale: it is copied once for it).
                let delta = applied.commit_to(Arc::make_mut(&mut f.local));
                agent.chunks.note(i, before, &delta, f.digest());
                if !delta.is_empty() {
                    changed.push((f.name.clone(), delta));
                }
            }
            // Leftovers of an interrupted apply that this generation did not need (even an
            // empty staging directory: the folder must hold exactly what was published).
            for f in &agent.folders {
                if let Err(e) = f.root.clear_staging() {
                    tracing::warn!(folder = %f.name, error = %e, "cannot clear the staging directory");
                }
            }
            agent.state.applied = generation;
            let took = started.elapsed().as_secs_f64();
            agent.status.send_modify(|s| {
                s.applied = generation;
                s.last_error = None;
                s.last_applied = Some(SystemTime::now());
                s.apply_seconds.observe(took);
            });
            if stats.bytes_fetched + stats.bytes_reused >= TRIM_AFTER_BYTES {
                tokio::task::spawn_blocking(syncd_fsops::trim_heap);
            }
            tracing::info!(
                %generation,
                files_written = stats.files_written,
                removed = stats.removed,
                bytes_fetched = stats.bytes_fetched,
                bytes_reused = stats.bytes_reused,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "applied generation"
            );
            (
                AgentMsg::Applied {
                    generation,
                    folders: agent.folders.iter().map(|f| f.state()).collect(),
                },
                Some(changed),
            )
        }
        Err(e) => {
            tracing::error!(%generation, error = %e, "could not apply generation");
            if matches!(e, ApplyError::Commit { .. }) {
                // Part of the generation may be in place: learn what the folders hold now. The
                // journal (written before the first rename) tells this apply's work from local
                // changes, which stay local changes.
                let journal = Journal::load(&agent.config.state_dir);
                for f in &mut agent.folders {
                    let chunker = Chunker::new(f.local.manifest.params)
                        .expect("params of a held manifest are valid");
                    let applied = Arc::clone(&f.local);
                    match f.rescan(&chunker) {
                        Ok(()) => crate::adopt_local_changes(
                            &agent.config,
                            f,
                            &applied,
                            journal.as_ref(),
                            crate::Found::AfterFailedApply,
                        ),
                        Err(e) => {
                            tracing::error!(folder = %f.name, error = %e, "rescan after a failed apply failed");
                        }
                    }
                }
            }
            agent
                .status
                .send_modify(|s| s.last_error = Some(e.to_string()));
            (
                AgentMsg::Failed {
                    generation,
                    reason: e.to_string(),
                    folders: agent.folders.iter().map(|f| f.state()).collect(),
                },
                None,
            )
        }
    }
}

/// Backs up what a generation is about to replace or remove where the folder does not hold what
/// this node last applied: a local change left in place (policy `report`, a path left alone as
/// flapping) or made just before the drift check could see it. The apply then overwrites it;
/// its local version is in `backups/replaced-<time>/`. If it cannot be kept, nothing is applied.
///
/// A directory that becomes a file or link is looked into: what was added in it by hand is
/// backed up too, and listed in the target's `clear` for the commit to remove.
fn back_up_replaced(
    agent: &Agent,
    generation: Generation,
    targets: &mut [Target],
) -> Result<(), ApplyError> {
    let mut backup_root = None;
    let mut described = Vec::new();
    for t in targets {
        let folder = &agent.folders[t.folder];
        let local = &folder.local;
        // Changes come parents first: beneath a directory found absent nothing is looked at
        // (an initial sync into an empty folder costs a few looks, not one per file).
        let mut absent: HashSet<&str> = HashSet::new();
        let mut changed: Vec<RelPath> = Vec::new();
        let mut clear: Vec<RelPath> = Vec::new();
        for change in &t.changes {
            let path = change.path();
            let mut up = path.as_str();
            let mut beneath_absent = false;
            while let Some(i) = up.rfind('/') {
                up = &up[..i];
                if absent.contains(up) {
                    beneath_absent = true;
                    break;
                }
            }
            if beneath_absent {
                continue;
            }
            let seen = match syncd_fsops::observe(folder.root.path(), path) {
                Ok(None) => {
                    absent.insert(path.as_str());
                    continue;
                }
                // Nothing this node can read: left to the drift check.
                Err(_) => continue,
                Ok(Some(seen)) => seen,
            };
            // A directory holds nothing of its own (what is in it is listed path by path),
            // unless a file or link takes its place: then whatever the manager did not put
            // there goes with it. (A directory the manager removes keeps what it did not put
            // there: the commit leaves it.)
            let becomes_entry = matches!(change, Change::Put(_, node) if !node.is_dir());
            if let Seen::Dir { .. } = seen {
                if !becomes_entry {
                    continue;
                }
                if !local.manifest.get(path).is_some_and(|n| n.is_dir()) {
                    clear.push(path.clone());
                }
                let added = added_beneath(folder, path).map_err(ApplyError::Backup)?;
                for (p, is_dir) in added {
                    if !is_dir {
                        changed.push(p.clone());
                    }
                    clear.push(p);
                }
            } else if !as_applied(local, path, &seen) {
                changed.push(path.clone());
            }
        }
        t.clear = clear;
        changed.sort_unstable();
        changed.dedup();
        if changed.is_empty() {
            continue;
        }
        let root = backup_root
            .get_or_insert_with(|| pause::backup_dir_named(&agent.config.state_dir, "replaced"));
        let kept = pause::back_up_paths(root, folder, &changed).map_err(|e| {
            ApplyError::Backup(format!(
                "cannot back up local changes it would replace: {e}"
            ))
        })?;
        for path in &changed {
            let kind = if local.manifest.get(path).is_some() {
                "modified"
            } else {
                "added"
            };
            tracing::warn!(folder = %folder.name, %path, %generation, change = kind, backup = %root.display(), "replacing a local change (its local version is backed up)");
            described.push(LocalChange {
                folder: folder.name.clone(),
                path: path.to_string(),
                kind,
            });
        }
        tracing::debug!(folder = %folder.name, kept, "backed up local changes before applying");
    }
    if let Some(root) = backup_root {
        pause::write_index(&root, &described)
            .map_err(|e| ApplyError::Backup(format!("cannot write the backup index: {e}")))?;
        drift::prune_backups(
            &agent.config.state_dir,
            agent.config.max_backups,
            agent.config.max_backup_bytes,
        );
    }
    Ok(())
}

/// Whether what is at `path` is what this node last put there.
fn as_applied(local: &LocalManifest, path: &RelPath, seen: &Seen) -> bool {
    match seen {
        Seen::File { key, .. } => local.reusable(path, key).is_some(),
        Seen::Symlink { target, .. } => local
            .manifest
            .get(path)
            .is_some_and(|n| matches!(&n.kind, NodeKind::Symlink(t) if t == target)),
        Seen::Dir { .. } => local.manifest.get(path).is_some_and(|n| n.is_dir()),
    }
}

/// What the folder holds beneath the directory `dir` that this node did not put there, in path
/// order, each with whether it is a directory. Fails if part of it cannot be read: what cannot
/// be seen cannot be kept.
fn added_beneath(
    folder: &crate::folder::Folder,
    dir: &RelPath,
) -> Result<Vec<(RelPath, bool)>, String> {
    let mut seen = Vec::new();
    let mut warnings = Vec::new();
    syncd_fsops::walk(
        folder.root.path(),
        Some(dir),
        &folder.excludes,
        &mut seen,
        &mut warnings,
    )
    .map_err(|e| format!("cannot look into {}: {e}", folder.root.abs(dir).display()))?;
    if let Some(w) = warnings.iter().find(|w| w.is_unreadable()) {
        return Err(format!(
            "cannot back up what {} holds: {}",
            folder.root.abs(dir).display(),
            w.reason()
        ));
    }
    // Entries syncd never carries (a FIFO, a link out of the folder) go too; the rest of what
    // the walk skipped stays, and stops the commit with its name.
    let foreign = pause::skipped(folder, warnings).foreign;
    let mut added: Vec<(RelPath, bool)> = seen
        .into_iter()
        .filter(|(p, s)| !as_applied(&folder.local, p, s))
        .map(|(p, s)| (p, matches!(s, Seen::Dir { .. })))
        .chain(foreign.into_iter().map(|p| (p, false)))
        .collect();
    added.sort_unstable();
    Ok(added)
}

/// Rebuilds each folder's target manifest from the update and checks it.
fn prepare(
    agent: &mut Agent,
    updates: Vec<(ManagerMsg, UpdateAssembler)>,
) -> Result<Vec<Target>, ApplyError> {
    let mut targets = Vec::new();
    for (header, mut asm) in updates {
        let ManagerMsg::Update {
            folder,
            params,
            base,
            target,
            ..
        } = header
        else {
            unreachable!("only Update headers are collected")
        };
        let Some(i) = agent.folders.iter().position(|f| f.name == folder) else {
            tracing::debug!(%folder, "ignoring an update for a folder this node does not sync");
            continue;
        };
        let invalid = |source| ApplyError::Invalid {
            folder: folder.clone(),
            source,
        };
        let chunker = Chunker::new(params).map_err(|_| {
            ApplyError::Protocol(format!(
                "folder {folder}: invalid chunk parameters {params:?}"
            ))
        })?;
        let local = &mut agent.folders[i];
        if local.local.manifest.params != params {
            tracing::info!(%folder, ?params, "manager uses other chunk parameters; rescanning to match");
            local.rescan(&chunker).map_err(|e| ApplyError::Stage {
                path: folder.clone(),
                source: std::io::Error::other(e),
            })?;
        }
        // Files sent as chunk-list edits are rebuilt from the versions this node holds.
        let patches = asm.take_patches();
        let pushed = asm.take_pushed();
        let mut changes = asm.finish();
        let mut inline = Vec::new();
        for p in patches {
            let resolved = p
                .resolve(local.local.manifest.get(&p.path))
                .map_err(|e| ApplyError::Protocol(e.to_string()))?;
            changes.push(resolved.change);
            inline.extend(resolved.inline);
        }
        // What this node excludes is never touched, whatever the manager publishes (the base
        // holds nothing excluded: only what changed can be).
        let excluded: Vec<_> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Put(p, n) if local.excludes.is_excluded(p, n.is_dir()) => Some(p.clone()),
                _ => None,
            })
            .collect();
        // Usually the folder's manifest with the update's changes, looked at without copying
        // it (a generation costs what it changes, not the folder's size); an empty one for a
        // full update. The base is a tree: checking what changed checks the whole.
        let empty;
        let (from, delta) = match base {
            Base::Delta { from } if from == local.digest() => (&local.local.manifest, true),
            Base::Full => {
                empty = Manifest::new(params);
                (&empty, false)
            }
            Base::Delta { .. } => return Err(ApplyError::BaseMismatch { folder }),
        };
        let mut preview = from.preview(changes);
        preview.validate().map_err(invalid)?;
        if preview.digest() != target {
            return Err(ApplyError::DigestMismatch { folder });
        }
        for p in &excluded {
            preview.remove(p);
        }
        // A delta's preview holds the exact changes to the folder; a full update's result is
        // compared with the folder as a whole.
        let changes = if delta {
            preview.into_changes()
        } else {
            syncd_manifest::diff(&local.local.manifest, &preview.into_manifest())
        };
        targets.push(Target {
            folder: i,
            changes,
            inline,
            pushed,
            clear: Vec::new(),
        });
    }
    Ok(targets)
}
