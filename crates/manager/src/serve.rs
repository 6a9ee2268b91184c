//! Serving agents: the accept loop, one task per agent connection (handshake, join, sending
//! generations, receiving acknowledgements), and one task per fetch stream.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use syncd_manifest::{Change, ChunkHash, ChunkRef, ManifestDigest, RelPath};
use syncd_proto::{
    AgentMsg, Base, ChunkEncoding, FetchReply, FetchRequest, FolderState, Generation, HELLO_LEN,
    Hello, MAX_CONTROL_FRAME, MAX_REQUEST_FRAME, ManagerMsg, PushedChunk, close, paginate,
};
use syncd_transport::{Conn, Endpoint, Incoming, NodeId, RecvStream, SendStream, TransportError};
use tokio::sync::{mpsc, watch};

use crate::cache::ChunkCache;
use crate::control::{Command, Snapshot};
use crate::pauses::{PauseRecord, Pauses};
use crate::wire::{Encoded, WireCache};
use crate::{AgentEntry, ManagerConfig, ManagerStatus};

/// Time an agent has to complete the hello and join after connecting.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait before resending a generation an agent failed to apply.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Bytes read from disk per blocking call when serving chunks. Each fetch stream holds up to
/// `READS_AHEAD` of these queued, one being read and one being sent, and an agent keeps eight
/// streams open at once (two batches of four requests): at 4 MiB the manager's memory rose by
/// some 130 MB while a worker joined the 1.5 GB tree (peak 155 MB; 75 MB at 1 MiB, the join no
/// slower within this machine's noise), and by 79 MiB for a single 1 GiB file (35 MiB now).
const READ_BATCH: usize = 1 << 20;

/// What every connection task shares.
#[derive(Debug)]
pub(crate) struct Ctx {
    config: Arc<ManagerConfig>,
    /// Each configured agent by its node ID.
    agents: HashMap<NodeId, AgentEntry>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    status: Arc<watch::Sender<ManagerStatus>>,
    commands: mpsc::Sender<Command>,
    /// The live connection of each agent, so a reconnecting agent replaces its old one, and
    /// when its connections lately replaced one another or were refused for that (two nodes
    /// sharing one identity take turns without end).
    live: std::sync::Mutex<HashMap<NodeId, (u64, Conn)>>,
    turns: std::sync::Mutex<HashMap<NodeId, std::collections::VecDeque<Instant>>>,
    /// Each agent's pause.
    pub(crate) pauses: Arc<Pauses>,
    serial: AtomicU64,
    /// Compressible chunks served lately: bases for deltas when those files change.
    cache: Arc<ChunkCache>,
    /// Chunks encoded for the fetches under way, shared between agents.
    wire: Arc<WireCache>,
}

impl Ctx {
    pub(crate) fn new(
        config: Arc<ManagerConfig>,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        status: Arc<watch::Sender<ManagerStatus>>,
        commands: mpsc::Sender<Command>,
        pauses: Arc<Pauses>,
    ) -> Arc<Ctx> {
        Arc::new(Ctx {
            agents: config.agents.iter().map(|a| (a.id, a.clone())).collect(),
            config,
            snapshots,
            status,
            commands,
            pauses,
            live: Default::default(),
            turns: Default::default(),
            serial: AtomicU64::new(0),
            cache: Arc::new(ChunkCache::new(crate::cache::CACHE_BYTES)),
            wire: Arc::new(WireCache::new(crate::wire::WIRE_BYTES)),
        })
    }

    /// Notes that a connection of agent `id` is about to replace (or be refused beside) a live
    /// one; returns whether its connections have taken turns [`TURNS_LIMIT`] times within
    /// [`TURNS_WINDOW`]. An agent that restarts or reconnects replaces its old connection once
    /// (the manager may not have seen it go); only two live nodes with one identity keep at it.
    /// Refusals count as turns, so a refused clone retrying keeps being refused while the
    /// connection held lives; once it is gone, the next one is let in.
    fn took_turns(&self, id: NodeId) -> bool {
        let now = Instant::now();
        let mut turns = self.turns.lock().expect("the turns map is never poisoned");
        let times = turns.entry(id).or_default();
        while times.front().is_some_and(|t| now - *t > TURNS_WINDOW) {
            times.pop_front();
        }
        times.push_back(now);
        times.len() > TURNS_LIMIT
    }

    /// Counts `bytes` of chunks sent to agent `name` (fetched, or pushed inside an update).
    fn count_served(&self, name: &str, bytes: u64) {
        self.status.send_modify(|s| {
            s.bytes_served += bytes;
            if let Some(v) = s.agents.get_mut(name) {
                v.bytes_sent += bytes;
            }
        });
    }

    fn update_agent(&self, name: &str, f: impl FnOnce(&mut crate::AgentView)) {
        self.status.send_if_modified(|s| {
            let Some(v) = s.agents.get_mut(name) else {
                return false;
            };
            let before = v.clone();
            f(v);
            *v != before
        });
    }
}

/// Accepts connections until shutdown, then closes them all.
pub(crate) async fn accept_loop(
    ctx: Arc<Ctx>,
    endpoint: Endpoint,
    mut shutdown: watch::Receiver<bool>,
) {
    tracing::info!(addr = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(), "manager listening");
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shutdown.changed() => None,
        };
        let Some(incoming) = incoming else { break };
        let ctx = Arc::clone(&ctx);
        let shutdown = shutdown.clone();
        tasks.spawn(async move { serve_agent(ctx, incoming, shutdown).await });
        // Reap finished tasks so the set does not grow with reconnections.
        while tasks.try_join_next().is_some() {}
    }
    endpoint.close(close::SHUTDOWN, "manager shutting down");
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle())
        .await
        .ok();
}

/// How many times within [`TURNS_WINDOW`] an agent's connections may replace one another before
/// the manager takes them for two nodes sharing one identity and keeps the one it has.
const TURNS_LIMIT: usize = 3;
const TURNS_WINDOW: Duration = Duration::from_secs(30);

/// Why an agent's session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("{0}")]
    Refused(String),
    #[error("agent did not complete its join within {JOIN_TIMEOUT:?}")]
    JoinTimeout,
}

async fn serve_agent(ctx: Arc<Ctx>, incoming: Incoming, mut shutdown: watch::Receiver<bool>) {
    let from = incoming.remote_addr();
    let conn = match incoming.accept().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%from, error = %e, "refused a connection");
            return;
        }
    };
    let entry = ctx.agents.get(&conn.peer_id());
    let name = entry.map(|a| a.name.clone()).unwrap_or_default();
    // Everything sent to this agent, on every stream, shares its cap.
    let conn = match entry.and_then(|a| a.max_rate) {
        Some(r) => conn.with_send_limit(r),
        None => conn,
    };
    let serial = ctx.serial.fetch_add(1, Ordering::Relaxed);
    let result = tokio::select! {
        r = session(&ctx, &conn, &name, serial) => r,
        _ = shutdown.changed() => {
            conn.close(close::SHUTDOWN, "manager shutting down");
            Ok(())
        }
    };
    let mut live = ctx.live.lock().expect("the live map is never poisoned");
    let current = live.get(&conn.peer_id()).is_some_and(|(s, _)| *s == serial);
    if current {
        live.remove(&conn.peer_id());
    }
    drop(live);
    if current {
        ctx.update_agent(&name, |v| {
            v.connected = false;
            v.syncing = false;
            v.addr = None;
            v.last_seen = Some(SystemTime::now());
        });
    }
    match result {
        Ok(()) => tracing::info!(agent = %name, %from, "agent disconnected"),
        Err(e) => {
            // Closed by us (a bad request on a fetch stream): say why, not just that it was.
            let error = match conn.closed_by_us() {
                Some((_, reason)) if !matches!(e, SessionError::Refused(_)) => {
                    format!("connection closed by us: {reason}")
                }
                _ => e.to_string(),
            };
            tracing::warn!(agent = %name, %from, %error, "agent session ended");
            if current || matches!(e, SessionError::Refused(_)) {
                ctx.update_agent(&name, |v| v.last_error = Some(error));
            }
        }
    }
}

async fn session(ctx: &Arc<Ctx>, conn: &Conn, name: &str, serial: u64) -> Result<(), SessionError> {
    let (mut tx, mut rx, join, version) = tokio::time::timeout(JOIN_TIMEOUT, handshake(conn, name))
        .await
        .map_err(|_| {
            conn.close(close::PROTOCOL_ERROR, "no join within the time limit");
            SessionError::JoinTimeout
        })??;
    let AgentMsg::Join {
        applied,
        folders,
        software,
        ..
    } = join
    else {
        unreachable!("handshake returns a Join")
    };
    {
        let mut live = ctx.live.lock().expect("the live map is never poisoned");
        if let Some((_, old)) = live.get(&conn.peer_id()) {
            if ctx.took_turns(conn.peer_id()) {
                let reason = format!(
                    "two nodes share one identity: this node's connection from {} is live, \
                     and connections from it and {} kept replacing each other; refusing the \
                     newer one until the live one ends (a copied state directory? give one of \
                     them its own identity with `syncd init` and configure its new ID; if only \
                     one node has it, its agent is restarting over and over: see its log)",
                    old.remote_addr(),
                    conn.remote_addr()
                );
                drop(live);
                conn.close(close::IDENTITY_IN_USE, &reason);
                return Err(SessionError::Refused(reason));
            }
            old.close(
                close::REPLACED,
                "replaced by a newer connection from the same agent",
            );
        }
        live.insert(conn.peer_id(), (serial, conn.clone()));
    }
    let snapshot = ctx.snapshots.borrow().clone();
    tx.send(
        &ManagerMsg::Welcome {
            manager_name: ctx.config.node_name.clone(),
            software: env!("CARGO_PKG_VERSION").to_owned(),
            folders: snapshot.folders.keys().cloned().collect(),
        },
        MAX_CONTROL_FRAME,
    )
    .await?;
    tracing::info!(agent = %name, addr = %conn.remote_addr(), version = %software, applied = %applied, max_rate = ?conn.send_limit(), "agent joined");
    ctx.update_agent(name, |v| {
        v.connected = true;
        v.addr = Some(conn.remote_addr());
        v.applied = applied;
        v.last_seen = Some(SystemTime::now());
    });

    let fetches = tokio::spawn(serve_fetches(
        Arc::clone(ctx),
        conn.clone(),
        name.to_owned(),
    ));
    let joined = Joined {
        applied,
        folders,
        version,
    };
    let result = feed(ctx, conn, name, &mut tx, &mut rx, joined).await;
    fetches.abort();
    result
}

/// What an agent said on joining, and the protocol version both speak.
struct Joined {
    applied: Generation,
    folders: Vec<FolderState>,
    version: u16,
}

/// Hello exchange and join; returns the control stream, the `Join` and the protocol version
/// both speak.
async fn handshake(
    conn: &Conn,
    name: &str,
) -> Result<(SendStream, RecvStream, AgentMsg, u16), SessionError> {
    let (mut tx, mut rx) = conn.accept_bi().await?;
    let mut bytes = [0u8; HELLO_LEN];
    rx.read_exact(&mut bytes).await?;
    // Our hello goes out whatever theirs says, so the agent can report both versions too.
    tx.write_all(&Hello::OURS.encode()).await?;
    let theirs = match Hello::decode(&bytes) {
        Ok(h) => h,
        Err(e) => {
            return Err(refuse_hello(conn, &mut tx, close::PROTOCOL_ERROR, e.to_string()).await);
        }
    };
    let version = match Hello::OURS.negotiate(&theirs) {
        Ok(v) => v,
        Err(e) => {
            let reason = format!("agent {name:?}: {e}");
            return Err(refuse_hello(conn, &mut tx, close::VERSION_MISMATCH, reason).await);
        }
    };
    let join = match rx.expect::<AgentMsg>(MAX_REQUEST_FRAME).await {
        Ok(j @ AgentMsg::Join { .. }) => j,
        Ok(_) => return Err(refuse(conn, close::PROTOCOL_ERROR, "expected Join".into())),
        Err(TransportError::Decode(e)) => {
            return Err(refuse(conn, close::PROTOCOL_ERROR, e.to_string()));
        }
        Err(e) => return Err(e.into()),
    };
    if let AgentMsg::Join { node_name, .. } = &join
        && node_name != name
    {
        return Err(refuse(
            conn,
            close::NOT_ALLOWED,
            format!(
                "this node ID is configured as agent {name:?}, but the agent calls itself {node_name:?}"
            ),
        ));
    }
    Ok((tx, rx, join, version))
}

/// How long a refusal of an agent's hello waits for ours to be acknowledged before closing.
const REFUSAL_FLUSH: Duration = Duration::from_secs(1);

/// Refuses an agent whose hello we cannot accept. Our hello was written a moment ago: it is
/// flushed first (the stream ends after it), so that the close carrying the reason is not held
/// behind it (see [`SendStream::finish_and_flush`]), then the connection is closed.
async fn refuse_hello(conn: &Conn, tx: &mut SendStream, code: u32, reason: String) -> SessionError {
    tx.finish_and_flush(REFUSAL_FLUSH).await;
    refuse(conn, code, reason)
}

fn refuse(conn: &Conn, code: u32, reason: String) -> SessionError {
    conn.close(code, &reason);
    SessionError::Refused(reason)
}

/// Sends the agent every generation it lacks, one at a time, waiting for each verdict; keeps
/// the agent's pause in step with the manager's record; sends nothing while it is paused.
async fn feed(
    ctx: &Ctx,
    conn: &Conn,
    name: &str,
    tx: &mut SendStream,
    rx: &mut RecvStream,
    joined: Joined,
) -> Result<(), SessionError> {
    let Joined {
        mut applied,
        folders,
        version,
    } = joined;
    let mut held: BTreeMap<String, ManifestDigest> =
        folders.into_iter().map(|f| (f.folder, f.digest)).collect();
    let mut snapshots = ctx.snapshots.clone();
    let Some(mut pauses) = ctx.pauses.subscribe(name) else {
        return Err(refuse(
            conn,
            close::NOT_ALLOWED,
            format!("unknown agent {name:?}"),
        ));
    };
    // On joining, folders are compared by content: an agent that reports the current generation
    // but holds something else (changed while it was away) is sent the difference once.
    let mut compare_content = true;
    // Chunk-list edits, until a generation fails (then whole lists, until one applies).
    let mut patches_ok = true;
    let mut retry = Duration::from_secs(1);
    let mut retry_at: Option<tokio::time::Instant> = None;
    // The generation sent and not yet answered.
    let mut pending: Option<Generation> = None;
    // What the agent last said about its pause; nothing is sent before it has said anything.
    let mut reported: Option<PauseRecord> = None;
    // The newest decision relayed to the agent.
    let mut relayed = 0u64;
    loop {
        let snap = snapshots.borrow_and_update().clone();
        let record = pauses.borrow_and_update().clone();
        let now = SystemTime::now();
        let paused = record
            .pause
            .as_ref()
            .filter(|p| syncd_proto_pause_in_force(p, now))
            .cloned();
        ctx.update_agent(name, |v| {
            v.paused = paused.clone();
            v.digests = held.clone();
            // QUIC follows an agent whose address changes: show where it is now.
            v.addr = Some(conn.remote_addr());
        });
        if let Some(r) = &reported
            && record.set_at > r.set_at
            && record.set_at > relayed
        {
            tx.send(
                &ManagerMsg::SetPause {
                    pause: record.pause.clone(),
                    set_at: record.set_at,
                },
                MAX_CONTROL_FRAME,
            )
            .await?;
            relayed = record.set_at;
        }
        let differs = snap
            .folders
            .iter()
            .any(|(f, s)| held.get(f).is_some_and(|d| *d != s.digest));
        let resync_pending = compare_content && differs && applied == snap.generation;
        ctx.update_agent(name, |v| v.resync_pending = resync_pending);
        let due = retry_at.is_none_or(|t| t <= tokio::time::Instant::now());
        if pending.is_none()
            && reported.is_some()
            && paused.is_none()
            && due
            && (applied != snap.generation || (compare_content && differs))
        {
            compare_content = false;
            tracing::debug!(agent = %name, generation = %snap.generation, "sending generation");
            // Edits and pushed chunks rely on the agent's version of files; a retry after a
            // failure goes without them.
            let edits = patches_ok.then_some(Edits {
                pushes: (version >= PUSHES_SINCE).then_some(&ctx.cache),
            });
            let pushed = send_generation(tx, &snap, &held, edits).await?;
            if pushed > 0 {
                ctx.count_served(name, pushed);
            }
            pending = Some(snap.generation);
            ctx.update_agent(name, |v| v.syncing = true);
        }
        let wake = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        // A pause with a time limit ends by itself: look again then.
        let expiry = async {
            match paused.as_ref().and_then(|p| p.until) {
                Some(until) => {
                    let at = std::time::UNIX_EPOCH + Duration::from_secs(until);
                    tokio::time::sleep(at.duration_since(SystemTime::now()).unwrap_or_default())
                        .await;
                }
                None => std::future::pending().await,
            }
        };
        let msg = tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                // A new generation supersedes a pending retry.
                retry_at = None;
                continue;
            }
            _ = pauses.changed() => continue,
            _ = wake => continue,
            _ = expiry => continue,
            msg = rx.recv::<AgentMsg>(MAX_REQUEST_FRAME) => match msg {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(()),
                Err(TransportError::Decode(e)) => {
                    return Err(refuse(conn, close::PROTOCOL_ERROR, e.to_string()));
                }
                Err(e) => return Err(e.into()),
            },
        };
        ctx.update_agent(name, |v| v.last_seen = Some(SystemTime::now()));
        match msg {
            AgentMsg::PauseState {
                pause,
                set_at,
                folders,
            } => {
                held = folders.into_iter().map(|f| (f.folder, f.digest)).collect();
                compare_content = true;
                tracing::debug!(agent = %name, paused = pause.is_some(), "agent reported its pause state");
                let r = PauseRecord { pause, set_at };
                match &r.pause {
                    Some(p) => {
                        tracing::info!(agent = %name, by = %p.by, until = ?p.until, "agent is paused")
                    }
                    None if reported.as_ref().is_some_and(|old| old.pause.is_some()) => {
                        tracing::info!(agent = %name, "agent resumed");
                    }
                    None => {}
                }
                match ctx.pauses.decide(name, r.clone()) {
                    // Confirms the new decision to the agent, whose operator's `syncctl
                    // pause|resume` returns only then: a `syncctl wait` here right after it
                    // sees the agent as it now is. (The agent answers with its state again,
                    // which is no longer new: no further echo.)
                    Ok(true) => {
                        tx.send(
                            &ManagerMsg::SetPause {
                                pause: r.pause.clone(),
                                set_at: r.set_at,
                            },
                            MAX_CONTROL_FRAME,
                        )
                        .await?;
                        relayed = relayed.max(r.set_at);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(agent = %name, error = %e, "cannot record the agent's pause")
                    }
                }
                reported = Some(r);
            }
            AgentMsg::Applied {
                generation,
                folders,
            } if pending.is_some() => {
                pending = None;
                applied = generation;
                patches_ok = true;
                held = folders.into_iter().map(|f| (f.folder, f.digest)).collect();
                retry = Duration::from_secs(1);
                retry_at = None;
                let mismatched: Vec<&String> = snap
                    .folders
                    .iter()
                    .filter(|(f, s)| held.get(*f).is_some_and(|d| *d != s.digest))
                    .map(|(f, _)| f)
                    .collect();
                if !mismatched.is_empty() && generation == snap.generation {
                    tracing::warn!(agent = %name, folders = ?mismatched, "agent applied the generation but its folders differ from the manager's (different exclude patterns?)");
                }
                tracing::info!(agent = %name, %generation, "agent applied generation");
                ctx.update_agent(name, |v| {
                    v.applied = generation;
                    v.syncing = false;
                    v.last_error = None;
                });
            }
            AgentMsg::Failed {
                generation,
                reason,
                folders,
            } if pending.is_some() => {
                pending = None;
                held = folders.into_iter().map(|f| (f.folder, f.digest)).collect();
                compare_content = true;
                // Whatever went wrong, the retry sends whole chunk lists.
                patches_ok = false;
                tracing::warn!(agent = %name, %generation, %reason, retry_in = ?retry, "agent could not apply generation");
                retry_at = Some(tokio::time::Instant::now() + retry);
                retry = (retry * 2).min(RETRY_MAX);
                ctx.update_agent(name, |v| {
                    v.syncing = false;
                    v.last_error = Some(reason);
                });
            }
            AgentMsg::Drift {
                entries,
                reverted_total,
            } => {
                if !entries.is_empty() {
                    tracing::warn!(agent = %name, left = entries.len(), reverted_total, "agent reports local changes left in place");
                }
                ctx.update_agent(name, |v| {
                    v.drift = entries;
                    v.drift_reverted = reverted_total;
                });
            }
            AgentMsg::Deferred { generation } if pending.is_some() => {
                // It paused just before the generation arrived; its PauseState says so too.
                pending = None;
                tracing::info!(agent = %name, %generation, "agent is paused; generation deferred");
                retry_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                ctx.update_agent(name, |v| v.syncing = false);
            }
            other => {
                return Err(refuse(
                    conn,
                    close::PROTOCOL_ERROR,
                    format!("unexpected message {:?}", std::mem::discriminant(&other)),
                ));
            }
        }
    }
}

fn syncd_proto_pause_in_force(p: &syncd_proto::Pause, now: SystemTime) -> bool {
    p.until
        .is_none_or(|until| now < std::time::UNIX_EPOCH + Duration::from_secs(until))
}

/// The first protocol version with [`ManagerMsg::Pushed`].
const PUSHES_SINCE: u16 = 4;

/// How a generation may use what the agent holds: chunk-list edits of large files, and (with
/// `pushes`, the cache of chunks served lately) small files' chunks pushed inside the update.
struct Edits<'a> {
    pushes: Option<&'a Arc<ChunkCache>>,
}

/// Sends one generation: for each folder the agent holds differently, the changes from what it
/// holds (a delta when history reaches back to it, else the whole manifest); with `edits`, as
/// edits of the agent's versions where that is shorter. Returns the bytes of chunks pushed inside it
/// (served like fetched ones).
async fn send_generation(
    tx: &mut SendStream,
    snap: &Snapshot,
    held: &BTreeMap<String, ManifestDigest>,
    edits: Option<Edits<'_>>,
) -> Result<u64, TransportError> {
    let mut pushed_bytes = 0u64;
    let mut out = Outbox {
        tx,
        buf: Vec::new(),
    };
    for (folder, fs) in &snap.folders {
        let Some(&have) = held.get(folder) else {
            continue;
        };
        if have == fs.digest {
            continue;
        }
        let manifest = &fs.local.manifest;
        let history = snap.history.delta(folder, have, fs.digest);
        // Only an incremental update pushes chunks: a full one is a new or reset agent's
        // whole tree, fetched in bulk.
        let pushes = edits
            .as_ref()
            .and_then(|e| e.pushes)
            .filter(|_| history.is_some());
        let (base, delta) = match history {
            Some(delta) => (Base::Delta { from: have }, delta),
            None => (
                Base::Full,
                crate::history::Delta {
                    changes: manifest
                        .iter()
                        .map(|(p, n)| Change::Put(p.clone(), n.clone()))
                        .collect(),
                    olds: Default::default(),
                },
            ),
        };
        out.send(&ManagerMsg::Update {
            generation: snap.generation,
            folder: folder.clone(),
            params: manifest.params,
            base,
            target: fs.digest,
        })
        .await?;
        // Large files the agent holds in an older version go as edits of its chunk list.
        let mut whole = Vec::with_capacity(delta.changes.len());
        let mut patched = Vec::new();
        for change in delta.changes {
            let p = match (&change, edits.is_some()) {
                (Change::Put(path, node), true) => delta
                    .olds
                    .get(path)
                    .and_then(|old| syncd_proto::patch(path, old, node))
                    .filter(|p| p.items() <= syncd_proto::PAGE_BUDGET / 40),
                _ => None,
            };
            match (p, change) {
                (Some(p), Change::Put(_, node)) => {
                    let content = node.file().cloned().expect("only files are patched");
                    patched.push((p, content));
                }
                (_, change) => whole.push(change),
            }
        }
        let pushed = match pushes {
            Some(cache) => push_small_chunks(&fs.root, cache, &whole, &delta.olds).await,
            None => Vec::new(),
        };
        for page in paginate(whole) {
            out.send(&page).await?;
        }
        for p in pushed {
            pushed_bytes += p.data.len() as u64;
            out.send(&ManagerMsg::Pushed(p)).await?;
        }
        let patched = inline_small_chunks(&fs.root, patched).await;
        for p in patched {
            out.send(&ManagerMsg::Patched(p)).await?;
        }
    }
    out.send(&ManagerMsg::UpdateEnd {
        generation: snap.generation,
    })
    .await?;
    out.flush().await?;
    Ok(pushed_bytes)
}

/// Bytes of frames gathered before they are written.
const OUTBOX_FLUSH: usize = 64 << 10;

/// Frames of one generation, written to the control stream together: a small generation then
/// leaves in one packet instead of one per message.
struct Outbox<'a> {
    tx: &'a mut SendStream,
    buf: Vec<u8>,
}

impl Outbox<'_> {
    async fn send(&mut self, msg: &ManagerMsg) -> Result<(), TransportError> {
        self.buf
            .extend_from_slice(&syncd_proto::encode_frame(msg, MAX_CONTROL_FRAME)?);
        if self.buf.len() >= OUTBOX_FLUSH {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), TransportError> {
        if !self.buf.is_empty() {
            self.tx.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// Files of at most this many bytes, in one chunk, may have that chunk pushed.
pub(crate) const PUSH_FILE_MAX: u32 = 64 << 10;
/// A chunk is pushed only if it crosses in at most this many bytes (compressed, or as a delta
/// of the agent's version): what it saves is a fetch's round trip, not bandwidth.
const PUSH_WIRE_MAX: usize = 4 << 10;
/// Most bytes pushed in one folder's update (beyond, chunks are fetched as usual).
const PUSH_BUDGET: usize = 256 << 10;
/// An update putting more small files than this pushes none: the agent fetches them on several
/// streams at once, which is faster than one task reading and compressing them all before the
/// update leaves (10% of 1,700 XMLs edited: 84 ms pushed against 54-63 ms fetched).
const PUSH_FILES_MAX: usize = 32;

/// The chunks of small files put by `changes` (an XML edited, a few added) encoded for the
/// wire, to go inside the update, when each is short on the wire: against the version the
/// agent holds (`olds`) when `cache` still has its bytes, compressed or raw otherwise. Read,
/// checked and encoded by [`read_chunks`] on the blocking pool, as a fetch would; a file that
/// changed since it was hashed is left to the fetch (which answers `Gone`).
async fn push_small_chunks(
    root: &Arc<syncd_fsops::FolderRoot>,
    cache: &Arc<ChunkCache>,
    changes: &[Change],
    olds: &HashMap<RelPath, syncd_manifest::FileContent>,
) -> Vec<PushedChunk> {
    // (path, its only chunk, the last chunk of the agent's version)
    let candidates: Vec<(RelPath, ChunkRef, Option<ChunkHash>)> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Put(path, node) => {
                let [chunk] = node.file()?.chunks[..] else {
                    return None;
                };
                (chunk.len <= PUSH_FILE_MAX).then_some(())?;
                let base = olds.get(path).and_then(|old| old.chunks.last());
                Some((path.clone(), chunk, base.map(|b| b.hash)))
            }
            Change::Remove(_) => None,
        })
        .take(PUSH_FILES_MAX + 1)
        .collect();
    if candidates.is_empty() || candidates.len() > PUSH_FILES_MAX {
        return Vec::new();
    }
    let (root, cache) = (Arc::clone(root), Arc::clone(cache));
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let mut budget = PUSH_BUDGET;
        for (path, chunk, base) in candidates {
            if budget < 64 {
                break;
            }
            let base = base.and_then(|h| Some((h, cache.get(&h)?)));
            let Ok(file) = root.open_file(&path) else {
                continue;
            };
            let wanted = [(0, chunk.len, chunk.hash)];
            let based = base.as_ref().map(|(h, b)| (0, *h, b.as_slice()));
            let Ok(encoded) = read_chunks(&file, &wanted, based, None, &cache, None) else {
                continue;
            };
            let [(data, encoding)] = &encoded[..] else {
                continue;
            };
            if data.len() > PUSH_WIRE_MAX || data.len() > budget {
                continue;
            }
            budget -= data.len();
            out.push(PushedChunk {
                hash: chunk.hash,
                len: chunk.len,
                encoding: *encoding,
                base: base
                    .map(|(h, _)| h)
                    .filter(|_| *encoding == ChunkEncoding::ZstdWithBase),
                data: data.to_vec(),
            });
        }
        out
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Puts the small new chunks of each chunk-list edit inside it (read from the published file,
/// on the blocking pool): a rebuilt archive's rewritten entry headers then cost their
/// compressed bytes, not a reference and a fetch each.
async fn inline_small_chunks(
    root: &Arc<syncd_fsops::FolderRoot>,
    patched: Vec<(syncd_proto::PatchedPut, syncd_manifest::FileContent)>,
) -> Vec<syncd_proto::PatchedPut> {
    use std::os::unix::fs::FileExt;
    if patched.is_empty() {
        return Vec::new();
    }
    let root = Arc::clone(root);
    tokio::task::spawn_blocking(move || {
        patched
            .into_iter()
            .map(|(mut p, content)| {
                if let Ok(file) = root.open_file(&p.path) {
                    p.inline_small(&content, |at, len| {
                        let mut buf = vec![0u8; len as usize];
                        file.read_exact_at(&mut buf, at).ok().map(|()| buf)
                    });
                }
                if tracing::enabled!(tracing::Level::DEBUG) {
                    let count = |inline: bool| -> usize {
                        p.ops
                            .iter()
                            .map(|op| match op {
                                syncd_proto::ListOp::Inline(l) if inline => l.len(),
                                syncd_proto::ListOp::New(r) if !inline => r.len(),
                                _ => 0,
                            })
                            .sum()
                    };
                    tracing::debug!(
                        path = %p.path,
                        inline_chunks = count(true),
                        inline_bytes = p.inline.len(),
                        new_refs = count(false),
                        "sending a chunk-list edit"
                    );
                }
                p
            })
            .collect()
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Accepts the agent's fetch streams and serves each on its own task.
async fn serve_fetches(ctx: Arc<Ctx>, conn: Conn, name: String) {
    let mut tasks = tokio::task::JoinSet::new();
    while let Ok((tx, rx)) = conn.accept_bi().await {
        let ctx = Arc::clone(&ctx);
        let conn = conn.clone();
        let name = name.clone();
        tasks.spawn(async move {
            if let Err(e) = serve_fetch(&ctx, &name, tx, rx).await {
                if let FetchError::Protocol(reason) = &e {
                    tracing::warn!(agent = %name, %reason, "refusing a fetch request; closing the connection");
                    conn.close(close::PROTOCOL_ERROR, reason);
                }
                tracing::debug!(error = %e, "fetch stream ended");
            }
        });
        while tasks.try_join_next().is_some() {}
    }
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("{0}")]
    Protocol(String),
}

/// Answers one fetch request: each asked-for chunk, read from disk and checked against its hash,
/// in the order asked; `Gone` (and the end of the reply) for a file that changed since.
async fn serve_fetch(
    ctx: &Ctx,
    agent: &str,
    mut tx: SendStream,
    mut rx: RecvStream,
) -> Result<(), FetchError> {
    let req: FetchRequest = match rx.expect(MAX_REQUEST_FRAME).await {
        Ok(r) => r,
        Err(TransportError::Decode(e)) => {
            return Err(FetchError::Protocol(format!("bad fetch request: {e}")));
        }
        Err(e) => return Err(e.into()),
    };
    tracing::debug!(%agent, folder = %req.folder, files = req.files.len(), "fetch request");
    let snap = ctx.snapshots.borrow().clone();
    let Some(folder) = snap.folders.get(&req.folder) else {
        return Err(FetchError::Protocol(format!(
            "fetch from unknown folder {:?}",
            req.folder
        )));
    };
    // Check the whole request first: what is asked for, in order, up to the first file that is
    // no longer published (answered `Gone`, which ends the reply).
    let mut jobs = Vec::with_capacity(req.files.len());
    let mut unpublished = None;
    for file in req.files {
        let content = folder
            .local
            .manifest
            .get(&file.path)
            .and_then(|n| n.file())
            .filter(|f| f.hash == file.hash);
        let Some(content) = content else {
            unpublished = Some(file.path);
            break;
        };
        let offsets = content.chunk_offsets();
        let mut wanted = Vec::with_capacity(file.chunks.len());
        for &i in &file.chunks {
            let c = content
                .chunks
                .get(i as usize)
                .ok_or_else(|| FetchError::Protocol(format!("{}: no chunk {i}", file.path)))?;
            wanted.push((offsets[i as usize], c.len, c.hash));
        }
        jobs.push(ReadJob {
            key: folder.local.stats.get(&file.path).copied(),
            path: file.path,
            base: file.base,
            base_at: offsets.last().copied().unwrap_or(0),
            wanted,
        });
    }
    // Reading, checking and encoding run on the blocking pool, ahead of the sending here, so
    // the disk, the compressor and the connection's encryption overlap.
    let (reads, mut read) = mpsc::channel(READS_AHEAD);
    let (root, cache) = (Arc::clone(&folder.root), Arc::clone(&ctx.cache));
    let wire = ctx.wire.begin();
    // Encoded chunks are shared between agents: with one connected, there is nobody to share
    // them with.
    let several = ctx
        .live
        .lock()
        .expect("the live map is never poisoned")
        .len()
        > 1;
    let shared = several.then(|| Arc::clone(&ctx.wire));
    let reader = tokio::task::spawn_blocking(move || {
        read_jobs(&root, &cache, shared.as_deref(), jobs, &reads)
    });
    let mut served = 0u64;
    let mut outcome = Ok(());
    let mut gone_sent = false;
    while let Some(item) = read.recv().await {
        match item {
            Read::Chunks(chunks) => {
                for (data, encoding) in chunks {
                    let len = data.len() as u32;
                    let sent = async {
                        tx.send(&FetchReply::Chunk { len, encoding }, MAX_CONTROL_FRAME)
                            .await?;
                        tx.write_bytes(data).await
                    };
                    if let Err(e) = sent.await {
                        outcome = Err(e.into());
                        break;
                    }
                    served += u64::from(len);
                }
                if outcome.is_err() {
                    break;
                }
            }
            Read::Gone(path, reason) => {
                // The reply ends with it (`gone` finishes the stream): nothing after it.
                gone_sent = true;
                outcome = gone(ctx, &mut tx, path, reason).await;
                break;
            }
        }
    }
    // Stops the reader at its next chunk if the reply ended early.
    drop(read);
    let _ = reader.await;
    drop(wire);
    ctx.count_served(agent, served);
    if outcome.is_err() || gone_sent {
        return outcome;
    }
    if let Some(path) = unpublished {
        tx.send(
            &FetchReply::Gone {
                path,
                reason: "no longer published in that version".into(),
            },
            MAX_CONTROL_FRAME,
        )
        .await?;
    }
    tx.finish();
    Ok(())
}

/// Bytes of chunks gathered from small files before they are handed to the sender.
const SMALL_ITEM: usize = 128 << 10;
/// Read batches buffered ahead of the sending, per fetch stream (each up to `READ_BATCH`).
const READS_AHEAD: usize = 2;

/// One file's chunks asked for in a fetch request.
#[derive(Clone)]
struct ReadJob {
    path: syncd_manifest::RelPath,
    /// The agent's current version of the file's last chunk, offered as a delta base.
    base: Option<ChunkHash>,
    /// Offset of the file's last chunk, the only one tried against `base`: the new version of
    /// the same part of the file (a small file whole, an archive's central directory). Trying
    /// it on every chunk of a large file cost milliseconds per chunk (a compression dictionary
    /// built from up to 256 KiB) for nothing.
    base_at: u64,
    /// (offset, length, hash) of each chunk, in the order asked.
    wanted: Vec<(u64, u32, ChunkHash)>,
    /// The file's stat key when the published version was hashed (see [`read_chunks`]).
    key: Option<syncd_fsops::StatKey>,
}

/// What the reader hands the sender.
enum Read {
    /// The next chunks, encoded for the wire.
    Chunks(Vec<Encoded>),
    /// The file could not be read as published; the reply ends with it.
    Gone(syncd_manifest::RelPath, String),
}

/// Reads `jobs` in order, in batches of about `READ_BATCH` bytes, into `out`; stops at the
/// first file that cannot be served, or when the sender has gone.
fn read_jobs(
    root: &syncd_fsops::FolderRoot,
    cache: &ChunkCache,
    wire: Option<&WireCache>,
    jobs: Vec<ReadJob>,
    out: &mpsc::Sender<Read>,
) {
    // Small files' chunks go to the sender together, up to `SMALL_ITEM` bytes: one hand-over
    // between threads per few dozen XMLs instead of one per file.
    let mut pending: Vec<Encoded> = Vec::new();
    let mut pending_bytes = 0usize;
    let flush = |pending: &mut Vec<Encoded>, pending_bytes: &mut usize| {
        *pending_bytes = 0;
        pending.is_empty()
            || out
                .blocking_send(Read::Chunks(std::mem::take(pending)))
                .is_ok()
    };
    for job in jobs {
        let file = match root.open_file(&job.path) {
            Ok(f) => f,
            Err(e) => {
                if flush(&mut pending, &mut pending_bytes) {
                    let _ = out.blocking_send(Read::Gone(job.path, format!("cannot open: {e}")));
                }
                return;
            }
        };
        let base = job.base.and_then(|h| Some((h, cache.get(&h)?)));
        let mut start = 0;
        while start < job.wanted.len() {
            let mut end = start;
            let mut bytes = 0usize;
            while end < job.wanted.len() && (end == start || bytes < READ_BATCH) {
                bytes += job.wanted[end].1 as usize;
                end += 1;
            }
            let base = base.as_ref().map(|(h, b)| (job.base_at, *h, b.as_slice()));
            match read_chunks(&file, &job.wanted[start..end], base, job.key, cache, wire) {
                Ok(chunks) => pending.extend(chunks),
                Err(reason) => {
                    if flush(&mut pending, &mut pending_bytes) {
                        let _ = out.blocking_send(Read::Gone(job.path, reason));
                    }
                    return;
                }
            }
            pending_bytes += bytes;
            if pending_bytes >= SMALL_ITEM && !flush(&mut pending, &mut pending_bytes) {
                return;
            }
            start = end;
        }
    }
    flush(&mut pending, &mut pending_bytes);
}

/// Reads, checks and encodes chunks for the wire (compressed where that pays; the chunk at
/// `base`'s offset also against `base`'s bytes, when that is shorter), or takes them from `wire`
/// (if shared) when another fetch did so lately; an error names the first that no longer
/// matches. Chunks that compress are kept in `cache`, as bases for their files' next versions.
///
/// `key` is the file's stat key when the version being served was hashed. A chunk read while
/// the open file still has it (same inode, size, modification and change times, looked at
/// after the read) is that version's, as the scan that hashed it would judge, and is not
/// hashed again: checking every byte served cost a BLAKE3 pass over the whole transfer, about
/// a tenth of the manager's CPU while a worker joins. Without a key, or once the file's key
/// has moved, every chunk is checked and the first that no longer matches ends the reply.
/// The agent checks every chunk it receives in any case, and `cache` checks what it hands out.
fn read_chunks(
    file: &std::fs::File,
    batch: &[(u64, u32, ChunkHash)],
    base: Option<(u64, ChunkHash, &[u8])>,
    key: Option<syncd_fsops::StatKey>,
    cache: &ChunkCache,
    wire: Option<&WireCache>,
) -> Result<Vec<Encoded>, String> {
    use std::os::unix::fs::FileExt;
    let unchanged = || key.is_some_and(|k| k.still_of(file));
    let mut out = Vec::with_capacity(batch.len());
    for &(offset, len, hash) in batch {
        let base = base.filter(|(at, ..)| *at == offset);
        let encode = || {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, offset)
                .map_err(|e| format!("read at {offset}: {e}"))?;
            if !unchanged() && ChunkHash::of(&buf) != hash {
                return Err(format!(
                    "changed on disk since it was scanned (chunk at {offset})"
                ));
            }
            let (wire, encoding, plain) =
                syncd_proto::encode_chunk_keeping_plain(buf, base.map(|(.., b)| b));
            if let Some(plain) = plain {
                cache.insert(hash, len, plain);
            }
            Ok((Bytes::from(wire), encoding))
        };
        let encoded = match wire {
            Some(w) => w.get_or_encode(hash, base.map(|(_, h, _)| h), encode)?,
            None => encode()?,
        };
        out.push(encoded);
    }
    Ok(out)
}

/// Tells the agent a file is gone, and asks for a rescan: the disk has moved on.
async fn gone(
    ctx: &Ctx,
    tx: &mut SendStream,
    path: syncd_manifest::RelPath,
    reason: String,
) -> Result<(), FetchError> {
    tracing::info!(%path, %reason, "file changed since it was published; rescanning");
    let _ = ctx.commands.try_send(Command::Rescan(None));
    tx.send(&FetchReply::Gone { path, reason }, MAX_CONTROL_FRAME)
        .await?;
    tx.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use syncd_proto::ChunkEncoding;

    fn job(path: &str, data: &[u8], chunk: usize) -> ReadJob {
        let mut wanted = Vec::new();
        let mut at = 0;
        for c in data.chunks(chunk) {
            wanted.push((at as u64, c.len() as u32, ChunkHash::of(c)));
            at += c.len();
        }
        ReadJob {
            key: None,
            path: syncd_manifest::RelPath::new(path).expect("valid path"),
            base: None,
            base_at: 0,
            wanted,
        }
    }

    /// Incompressible bytes, different for each seed (BLAKE3's output stream).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut out = vec![0u8; len];
        blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .finalize_xof()
            .fill(&mut out);
        out
    }

    /// Runs the reader over `jobs` and collects what it hands the sender.
    fn read_all(root: &std::path::Path, jobs: Vec<ReadJob>) -> Vec<Read> {
        read_all_sharing(root, jobs, &Arc::new(WireCache::new(64 << 20)))
    }

    /// [`read_all`] with a wire cache that other readers share.
    fn read_all_sharing(
        root: &std::path::Path,
        jobs: Vec<ReadJob>,
        wire: &Arc<WireCache>,
    ) -> Vec<Read> {
        let root = syncd_fsops::FolderRoot::open(root).expect("root opens");
        let cache = ChunkCache::new(1 << 20);
        let wire = Arc::clone(wire);
        let (tx, mut rx) = mpsc::channel(READS_AHEAD);
        let reader = std::thread::spawn(move || read_jobs(&root, &cache, Some(&*wire), jobs, &tx));
        let mut out = Vec::new();
        while let Some(item) = rx.blocking_recv() {
            out.push(item);
        }
        reader.join().expect("the reader does not panic");
        out
    }

    fn bytes_of(items: &[Read]) -> Vec<u8> {
        let mut out = Vec::new();
        for item in items {
            if let Read::Chunks(chunks) = item {
                for (data, encoding) in chunks {
                    assert_eq!(*encoding, ChunkEncoding::Raw, "noise is sent as it is");
                    out.extend_from_slice(data);
                }
            }
        }
        out
    }

    #[test]
    fn the_reader_hands_over_every_chunk_in_the_order_asked() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Larger than a read batch, so it comes in several.
        let big = noise(READ_BATCH * 2 + 12_345, 1);
        let small = noise(3_000, 2);
        std::fs::write(dir.path().join("big"), &big).expect("write");
        std::fs::write(dir.path().join("small"), &small).expect("write");
        let items = read_all(
            dir.path(),
            vec![job("big", &big, 64 * 1024), job("small", &small, 1000)],
        );
        // Big in three batches, its short last one together with small.
        assert_eq!(items.len(), 3, "big comes in three batches");
        assert!(items.iter().all(|i| matches!(i, Read::Chunks(_))));
        assert!(
            bytes_of(&items) == [big, small].concat(),
            "every byte, in order"
        );
    }

    #[test]
    fn small_files_are_handed_over_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut jobs = Vec::new();
        let mut all = Vec::new();
        // 60 files of 3,000 bytes: 180,000 bytes, two hand-overs of at most `SMALL_ITEM`.
        for i in 0..60 {
            let bytes = noise(3_000, 100 + i);
            let name = format!("f{i}");
            std::fs::write(dir.path().join(&name), &bytes).expect("write");
            jobs.push(job(&name, &bytes, 1000));
            all.extend_from_slice(&bytes);
        }
        let items = read_all(dir.path(), jobs);
        assert_eq!(items.len(), 2, "{} hand-overs", items.len());
        assert!(bytes_of(&items) == all, "every byte, in order");
    }

    #[test]
    fn a_file_changed_since_it_was_published_ends_the_reply_with_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = noise(5_000, 3);
        let published = noise(5_000, 6);
        std::fs::write(dir.path().join("first"), &first).expect("write");
        // On disk now: not what was published.
        std::fs::write(dir.path().join("changed"), noise(5_000, 8)).expect("write");
        let items = read_all(
            dir.path(),
            vec![
                job("first", &first, 1000),
                job("changed", &published, 1000),
                job("first", &first, 1000),
            ],
        );
        assert!(
            bytes_of(&items) == first,
            "only the file before it is served"
        );
        match items.last() {
            Some(Read::Gone(path, reason)) => {
                assert_eq!(path.as_str(), "changed");
                assert!(reason.contains("changed on disk"), "{reason}");
            }
            _ => panic!("the reply must end with Gone"),
        }
        // A file that vanished is gone too.
        let items = read_all(dir.path(), vec![job("missing", &first, 1000)]);
        assert!(
            matches!(&items[..], [Read::Gone(p, r)] if p.as_str() == "missing" && r.contains("cannot open"))
        );
    }

    #[test]
    fn a_file_is_trusted_without_hashing_only_while_it_keeps_its_stat_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes = noise(5_000, 12);
        let abs = dir.path().join("app");
        std::fs::write(&abs, &bytes).expect("write");
        let hashed = syncd_fsops::stat_key(&std::fs::metadata(&abs).expect("stat"));
        // Hashes the bytes do not have show whether they were checked.
        let mut lie = job("app", &bytes, 1000);
        for (i, w) in lie.wanted.iter_mut().enumerate() {
            w.2 = ChunkHash::of(format!("not chunk {i}").as_bytes());
        }
        let serve = |key| read_all(dir.path(), vec![ReadJob { key, ..lie.clone() }]);
        // As hashed: served as the manifest describes it, unhashed.
        assert!(bytes_of(&serve(Some(hashed))) == bytes);
        // No key: checked, and the reply ends with Gone.
        assert!(matches!(&serve(None)[..], [Read::Gone(..)]));
        // Anything done to the file since (here a chmod: a new change time, a clock tick
        // later) makes every chunk checked again.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::set_permissions(&abs, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(&serve(Some(hashed))[..], [Read::Gone(..)]));
        // Checked and right: served.
        let mut honest = job("app", &bytes, 1000);
        honest.key = Some(hashed);
        assert!(bytes_of(&read_all(dir.path(), vec![honest])) == bytes);
    }

    #[test]
    fn the_reader_stops_when_the_sender_has_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = noise(READ_BATCH * 8, 6);
        std::fs::write(dir.path().join("big"), &big).expect("write");
        let root = syncd_fsops::FolderRoot::open(dir.path()).expect("root opens");
        let cache = ChunkCache::new(1 << 20);
        let wire = WireCache::new(64 << 20);
        let (tx, mut rx) = mpsc::channel(READS_AHEAD);
        let jobs = vec![job("big", &big, 64 * 1024)];
        let reader = std::thread::spawn(move || read_jobs(&root, &cache, Some(&wire), jobs, &tx));
        // Take one batch, then hang up: the reader must return rather than block.
        assert!(matches!(rx.blocking_recv(), Some(Read::Chunks(_))));
        drop(rx);
        reader.join().expect("the reader returns");
    }

    #[test]
    fn fetches_share_what_one_of_them_read_and_a_changed_file_is_still_caught() {
        let dir = tempfile::tempdir().expect("tempdir");
        let published = noise(5_000, 9);
        let other = noise(3_000, 10);
        std::fs::write(dir.path().join("app"), &published).expect("write");
        std::fs::write(dir.path().join("other"), &other).expect("write");
        let wire = Arc::new(WireCache::new(64 << 20));
        // The first agent's fetch reads the first three chunks of `app`.
        let mut first = job("app", &published, 1000);
        first.wanted.truncate(3);
        let items = read_all_sharing(dir.path(), vec![first], &wire);
        assert!(bytes_of(&items) == published[..3000]);
        // The file changes on disk before a second agent asks for the same chunks: they are
        // the published bytes, whatever the disk holds now, and are shared.
        std::fs::write(dir.path().join("app"), noise(5_000, 11)).expect("write");
        let mut second = job("app", &published, 1000);
        second.wanted.truncate(3);
        let items = read_all_sharing(dir.path(), vec![job("other", &other, 1000), second], &wire);
        assert!(bytes_of(&items) == [&other[..], &published[..3000]].concat());
        // A chunk that must be read from disk no longer matches and ends the reply with Gone,
        // as without the cache.
        let items = read_all_sharing(dir.path(), vec![job("app", &published, 1000)], &wire);
        match items.last() {
            Some(Read::Gone(path, reason)) => {
                assert_eq!(path.as_str(), "app");
                assert!(reason.contains("changed on disk"), "{reason}");
            }
            _ => panic!("the reply must end with Gone"),
        }
    }
}
