//! Applying one generation to this node's folders: plan, stage every changed file in full,
//! make it durable, then rename into place, and only then delete.
//!
//! Staging fetches from the manager only the chunks not found locally: in the previous version
//! of the file, in any other file the node holds, or in a file staged earlier in the same
//! generation. Every chunk is checked against its BLAKE3 hash before it is written, and a file
//! is renamed into place only when every one of its chunks has been written and checked.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use syncd_fsops::{
    CopyReader, DirectFile, FolderRoot, LocalDelta, LocalManifest, Retired, RunWriter, Staging,
    StatKey, stat_key,
};
use syncd_manifest::{
    Change, ChunkHash, ChunkRef, FileContent, Manifest, Node, NodeKind, RelPath, TreeError,
};
use syncd_proto::{
    ChunkEncoding, FetchFile, FetchReply, FetchRequest, MAX_CONTROL_FRAME, MAX_REQUEST_FRAME,
    PushedChunk,
};
use syncd_transport::{Conn, TransportError};
use tokio::task::JoinSet;

use crate::chunks::LocalChunks;
use crate::folder::Folder;
use crate::journal::Journal;

/// Files staged together; bounds the number of open staged files.
const BATCH_FILES: usize = 128;
/// Bytes staged together before the next batch starts.
const BATCH_BYTES: u64 = 256 << 20;
/// Chunks asked for in one fetch request (one QUIC stream), at most...
const REQUEST_CHUNKS: usize = 512;
/// ...and, when a batch's chunks are spread over the requests in flight, at least. A batch of
/// 128 small files went as one request of 128 chunks, read and compressed one after the other by
/// one reader on the manager while the other core idled: spread over four, the manager's reader
/// tasks and the agent's fetch tasks run side by side.
const REQUEST_MIN_CHUNKS: usize = 16;
/// Only a batch of at least this many files is spread so: the chunks of one file (a new CAR)
/// spread over four streams cost more than they gained (a new 5 MB CAR to ten workers: 88-94 ms
/// against 76 ms in one request per worker).
const SPREAD_MIN_FILES: usize = 2 * REQUESTS_IN_FLIGHT;
/// Batches staged at once: the next one's requests go out while the last replies of the one
/// before are still arriving and being written.
const BATCHES_IN_FLIGHT: usize = 2;
/// Fetch requests in flight at once, per batch.
const REQUESTS_IN_FLIGHT: usize = 4;
/// Chunks up to this long are offered as bases for deltas of their files' new versions.
const MAX_BASE: u32 = 256 * 1024;
/// Up to this many files (or directories), each is fsynced on its own; beyond it one `syncfs`
/// of the folder's filesystem is cheaper. Per-file fsync keeps a small deploy from waiting on
/// unrelated dirty data elsewhere on the filesystem.
const FSYNC_EACH_LIMIT: usize = 32;
/// Staged files from this size on have their fetched chunks written past the page cache
/// (`O_DIRECT`, see `syncd_fsops::RunWriter`): their bytes go straight to the disk, where the
/// durability step would otherwise have to write them back.
const DIRECT_MIN: u64 = 1 << 20;
/// Bytes written through the page cache after which a flush starts while staging goes on.
const EARLY_SYNC_BYTES: u64 = 8 << 20;
/// Bytes a fetch task gathers before writing them directly.
const RUN_BUFFER: usize = 1 << 20;
/// Local copies run in up to this many parts at once (four: the cold copy of a 63 MB WAR, read
/// and written directly, took 92-95 ms against 94-114 ms in two)...
const COPY_PARTS: usize = 4;
/// ...of at least this many bytes each.
const COPY_PART_MIN: u64 = 8 << 20;

/// Why a generation could not be applied. Nothing was renamed into place unless the error
/// says so ([`ApplyError::Commit`]).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A delta was for another version of the folder than the one held here.
    #[error("folder {folder}: update is based on a version this node does not hold")]
    BaseMismatch {
        /// The folder.
        folder: String,
    },
    /// The target manifest is not a consistent tree, or escapes the folder.
    #[error("folder {folder}: refusing the update: {source}")]
    Invalid {
        /// The folder.
        folder: String,
        /// What is wrong.
        source: TreeError,
    },
    /// The manifest rebuilt from the update does not have the digest the manager announced.
    #[error("folder {folder}: rebuilt manifest does not match the manager's digest")]
    DigestMismatch {
        /// The folder.
        folder: String,
    },
    /// The connection failed while fetching.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The manager no longer has the file version being fetched (it changed since).
    #[error(
        "{path}: changed on the manager since it was published ({reason}); waiting for the next generation"
    )]
    Gone {
        /// The file.
        path: RelPath,
        /// The manager's reason.
        reason: String,
    },
    /// The manager sent bytes that do not hash to the chunk asked for.
    #[error("{path}: received a chunk that does not match its hash")]
    BadChunk {
        /// The file being assembled.
        path: RelPath,
    },
    /// The manager's reply did not follow the protocol.
    #[error("fetch reply out of protocol: {0}")]
    Protocol(String),
    /// A disk operation failed while staging; nothing was renamed into place.
    #[error("staging {path}: {source}")]
    Stage {
        /// What was being staged.
        path: String,
        /// The error.
        source: io::Error,
    },
    /// The apply journal could not be written; nothing was renamed into place.
    #[error("cannot write the apply journal in {dir}: {source}")]
    Journal {
        /// The state directory.
        dir: String,
        /// The error.
        source: io::Error,
    },
    /// A local change the generation would replace could not be backed up; nothing was
    /// renamed into place.
    #[error("{0}; nothing was applied")]
    Backup(String),
    /// A disk operation failed while renaming into place; some files of the generation may be
    /// in place (each one complete), the rest not.
    #[error("applying {path}: {source}")]
    Commit {
        /// The path.
        path: String,
        /// The error.
        source: io::Error,
    },
}

/// What one folder must become.
#[derive(Debug)]
pub(crate) struct Target {
    /// Index of the folder.
    pub folder: usize,
    /// What turns what the folder holds into what it must hold (already validated and
    /// stripped of local excludes), as [`syncd_manifest::diff`] lists it: only entries that
    /// differ, in path order.
    pub changes: Vec<Change>,
    /// Chunks that came inside the update (small new chunks of chunk-list edits), by hash.
    pub inline: Vec<(ChunkHash, Arc<[u8]>)>,
    /// Small files' chunks pushed inside the update, still encoded (decoded and checked when
    /// staging; one that cannot be is fetched).
    pub pushed: Vec<PushedChunk>,
    /// What the folder holds at and beneath a directory that a change replaces with a file or
    /// link, beyond what this node put there (added by hand), already backed up: removed with
    /// that directory's applied entries, deepest first. Anything else left in the directory
    /// (an excluded path, which syncd never touches) fails the commit with its name.
    pub clear: Vec<RelPath>,
}

/// What an apply did to one folder: what it holds now, the changes that led there from what it
/// held, and the stat keys of the files put.
#[derive(Debug)]
pub(crate) struct Applied {
    changes: Vec<Change>,
    keys: Vec<(RelPath, StatKey)>,
}

impl Applied {
    /// Makes `local`, what the folder held before the apply, what it holds now, and returns the
    /// delta to record. Costs in proportion to the changes.
    pub(crate) fn commit_to(self, local: &mut LocalManifest) -> LocalDelta {
        local.manifest.apply(&self.changes);
        for change in &self.changes {
            local.stats.remove(change.path());
        }
        local.stats.extend(self.keys);
        // Entries inserted one by one in path order (a join) leave the map's nodes half full.
        if self.changes.len() >= COMPACT_AFTER {
            local.compact();
        }
        LocalDelta::new(self.changes, local)
    }
}

/// Changes in one apply beyond which the folder's map is packed again.
const COMPACT_AFTER: usize = 4096;

/// Counters of one applied generation.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ApplyStats {
    pub files_written: u64,
    pub bytes_fetched: u64,
    pub bytes_pushed: u64,
    pub bytes_reused: u64,
    pub removed: u64,
    pub left_non_empty: u64,
}

struct StageJob {
    folder: usize,
    path: RelPath,
    content: FileContent,
    mode: u32,
    mtime: syncd_manifest::Mtime,
    staged: Option<String>,
}

/// Where a chunk already exists on this node.
#[derive(Debug, Clone)]
enum Source {
    Live {
        folder: usize,
        path: RelPath,
        offset: u64,
        /// The file's stat key when this node last wrote or hashed it: while the file still
        /// has it, its chunks are what the manifest says (the restart scan and the drift check
        /// trust the same key) and are copied without hashing them again.
        key: Option<StatKey>,
    },
    Staged {
        folder: usize,
        name: String,
        offset: u64,
    },
    /// Received inside the update itself.
    Memory(Arc<[u8]>),
}

/// Applies `targets` to `folders`: stages everything, syncs, renames, deletes, and returns what
/// changed in each folder.
// Each argument is a different part of the agent, borrowed differently (the folders shared,
// the chunk index and the watch exclusively): a struct of them would only be taken apart again.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn apply(
    conn: &Conn,
    folders: &[Folder],
    targets: Vec<Target>,
    stats: &mut ApplyStats,
    received: &Arc<AtomicU64>,
    state_dir: &Path,
    chunks: &mut LocalChunks,
    watch: Option<&mut crate::drift::Watch>,
) -> Result<Vec<(usize, Applied)>, ApplyError> {
    let mut jobs = Vec::new();
    let mut plans = Vec::new();
    let mut inline: HashMap<ChunkHash, Arc<[u8]>> = HashMap::new();
    let mut pushed = Vec::new();
    for mut target in targets {
        inline.extend(std::mem::take(&mut target.inline));
        pushed.append(&mut target.pushed);
        let folder = &folders[target.folder];
        let changes = std::mem::take(&mut target.changes);
        for change in &changes {
            if let Change::Put(path, node) = change
                && let NodeKind::File(content) = &node.kind
            {
                let same_content = folder
                    .local
                    .manifest
                    .get(path)
                    .and_then(Node::file)
                    .is_some_and(|f| f.hash == content.hash);
                if !same_content {
                    jobs.push(StageJob {
                        folder: target.folder,
                        path: path.clone(),
                        content: content.clone(),
                        mode: node.mode,
                        mtime: node.mtime,
                        staged: None,
                    });
                }
            }
        }
        plans.push((target, changes));
    }

    let mut stagings: HashMap<usize, Arc<Staging>> = HashMap::new();
    for job in &jobs {
        if let std::collections::hash_map::Entry::Vacant(e) = stagings.entry(job.folder) {
            let staging =
                folders[job.folder]
                    .root
                    .staging()
                    .map_err(|source| ApplyError::Stage {
                        path: folders[job.folder].root.path().display().to_string(),
                        source,
                    })?;
            e.insert(Arc::new(staging));
        }
    }

    let fsync_each = jobs.len() <= FSYNC_EACH_LIMIT;
    // Many files written: the drift watch would wake for each (it is back, and the folders
    // are compared, when this returns).
    let _paused = watch
        .filter(|_| !fsync_each)
        .map(crate::drift::Watch::pause);
    tracing::debug!(
        files = jobs.len(),
        bytes = jobs.iter().map(|j| j.content.size).sum::<u64>(),
        "staging files"
    );
    let cx = StageCtx {
        conn,
        folders,
        stagings: &stagings,
        fsync_each,
        received,
    };
    let staged = stage_all(&cx, &mut jobs, stats, chunks, inline, pushed).await;
    if let Err(e) = staged {
        // A lost connection keeps what was staged: the next attempt (after a reconnect, or a
        // restart) reuses every chunk already written and checked. Anything else starts over.
        if !matches!(e, ApplyError::Transport(_)) {
            discard_staging(folders, &stagings);
        }
        return Err(e);
    }

    // Everything staged is made durable before the first rename: few files are fsynced one by
    // one as they are finished, many at once here.
    let t_staged = std::time::Instant::now();
    if jobs.len() > FSYNC_EACH_LIMIT {
        let roots: Vec<Arc<FolderRoot>> = stagings
            .keys()
            .map(|&i| Arc::clone(&folders[i].root))
            .collect();
        blocking(move || sync_roots(&roots)).await?;
    }

    // Before the first rename: what is about to change, so that a crash part-way through is
    // not later mistaken for local edits.
    let mut journal = Journal::default();
    for (target, changes) in &plans {
        journal.add(&folders[target.folder].name, changes);
    }
    let state_dir = state_dir.to_owned();
    blocking(move || {
        journal
            .write(&state_dir)
            .map_err(|source| ApplyError::Journal {
                dir: state_dir.display().to_string(),
                source,
            })
    })
    .await?;

    let t_journaled = std::time::Instant::now();
    let mut staged_names: HashMap<(usize, RelPath), String> = HashMap::new();
    for job in jobs {
        if let Some(name) = job.staged {
            staged_names.insert((job.folder, job.path), name);
        }
    }

    let mut results = Vec::new();
    let mut touched: Vec<(usize, Vec<Option<RelPath>>)> = Vec::new();
    let mut retired = Retired::default();
    for (target, changes) in plans {
        // Every directory whose entries change: the parents of changed paths.
        let mut dirs: Vec<Option<RelPath>> = changes.iter().map(|c| c.path().parent()).collect();
        dirs.sort();
        dirs.dedup();
        if !dirs.is_empty() {
            touched.push((target.folder, dirs));
        }
        let folder = &folders[target.folder];
        let root = Arc::clone(&folder.root);
        let staging = stagings.get(&target.folder).cloned();
        let names: HashMap<RelPath, String> = staged_names
            .iter()
            .filter(|((f, _), _)| *f == target.folder)
            .map(|((_, p), n)| (p.clone(), n.clone()))
            .collect();
        let old = Arc::clone(&folder.local);
        let clear = target.clear;
        let (applied, commit_stats) = blocking(move || {
            commit_folder(
                &root,
                staging.as_deref(),
                &old.manifest,
                changes,
                &clear,
                &names,
            )
        })
        .await?;
        stats.files_written += commit_stats.files_written;
        stats.removed += commit_stats.removed;
        stats.left_non_empty += commit_stats.left_non_empty;
        retired.append(commit_stats.retired);
        results.push((target.folder, applied));
    }
    for (_, staging) in stagings {
        drop(staging);
    }
    let t_committed = std::time::Instant::now();
    // The renames and deletions are made durable, and staging is cleared, in every folder that
    // changed.
    for (i, dirs) in touched {
        let root = Arc::clone(&folders[i].root);
        blocking(move || {
            let err = |source| ApplyError::Commit {
                path: root.path().display().to_string(),
                source,
            };
            root.clear_staging().map_err(err)?;
            if dirs.len() > FSYNC_EACH_LIMIT {
                root.sync_filesystem().map_err(err)
            } else {
                dirs.iter()
                    .try_for_each(|d| root.sync_dir(d.as_ref()))
                    .map_err(err)
            }
        })
        .await?;
    }
    tracing::debug!(
        durable_ms = (t_journaled - t_staged).as_millis() as u64,
        renamed_ms = (t_committed - t_journaled).as_millis() as u64,
        synced_ms = t_committed.elapsed().as_millis() as u64,
        retired = retired.len(),
        "committed"
    );
    // The replaced files' blocks are freed off the apply's path: nothing waits for it.
    if !retired.is_empty() {
        tokio::task::spawn_blocking(move || drop(retired));
    }
    Ok(results)
}

/// Removes what staging left; failures only matter at the next start, which clears it again.
fn discard_staging(folders: &[Folder], stagings: &HashMap<usize, Arc<Staging>>) {
    for &i in stagings.keys() {
        if let Err(e) = folders[i].root.clear_staging() {
            tracing::warn!(folder = %folders[i].name, error = %e, "could not clear the staging directory");
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApplyError> + Send + 'static,
) -> Result<T, ApplyError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Where this node holds the chunks the jobs need (their own, and the last chunk of each job's
/// current version, offered as a delta base), by hash.
fn local_sources(
    folders: &[Folder],
    jobs: &[StageJob],
    chunks: &mut LocalChunks,
) -> HashMap<ChunkHash, Source> {
    let needed = jobs.iter().flat_map(|j| {
        let old_last = current_last_chunk(folders, j).map(|c| c.hash);
        j.content.chunks.iter().map(|c| c.hash).chain(old_last)
    });
    chunks
        .find(folders, needed)
        .into_iter()
        .map(|(h, f)| {
            let key = folders[f.folder].local.stats.get(&f.path).copied();
            (
                h,
                Source::Live {
                    folder: f.folder,
                    path: f.path,
                    offset: f.offset,
                    key,
                },
            )
        })
        .collect()
}

/// The last chunk of the version of `job`'s file this node holds now, the base a delta of the
/// new version is made against: a small file's only chunk; for a larger one its last, which in
/// an archive is the central directory, rewritten by every rebuild but mostly the same.
fn current_last_chunk(folders: &[Folder], job: &StageJob) -> Option<ChunkRef> {
    let old = folders[job.folder].local.manifest.get(&job.path)?.file()?;
    old.chunks.last().copied()
}

/// The name key of a staged file holding content `hash`.
fn leftover_key(hash: &syncd_manifest::FileHash) -> String {
    hash.to_hex()[..32].to_owned()
}

/// Files staged by an interrupted apply for content a job needs now: each of that content's
/// chunks may already be in them at its offset (checked on read; missing ones are fetched).
fn add_leftovers(folders: &[Folder], jobs: &[StageJob], index: &mut HashMap<ChunkHash, Source>) {
    let mut by_key: HashMap<(usize, String), String> = HashMap::new();
    let mut folders_with_jobs: Vec<usize> = jobs.iter().map(|j| j.folder).collect();
    folders_with_jobs.sort_unstable();
    folders_with_jobs.dedup();
    for f in folders_with_jobs {
        for (name, key) in folders[f].root.staged_leftovers().unwrap_or_default() {
            by_key.insert((f, key), name);
        }
    }
    if by_key.is_empty() {
        return;
    }
    for job in jobs {
        let Some(name) = by_key.get(&(job.folder, leftover_key(&job.content.hash))) else {
            continue;
        };
        // A leftover may hold the chunk; an earlier source of the same bytes is as good.
        index_staged(index, job.folder, name, &job.content);
    }
}

/// Records the chunks of a staged file as sources, where no earlier source has them.
fn index_staged(
    index: &mut HashMap<ChunkHash, Source>,
    folder: usize,
    name: &str,
    content: &FileContent,
) {
    let mut offset = 0u64;
    for c in content.chunks.iter() {
        index.entry(c.hash).or_insert_with(|| Source::Staged {
            folder,
            name: name.to_owned(),
            offset,
        });
        offset += c.len as u64;
    }
}

/// One staged file being written, shared by the tasks that write its chunks.
struct Dest {
    file: Arc<File>,
    /// For a large file, where the filesystem takes them: direct writes of what is fetched.
    direct: Option<DirectFile>,
    path: RelPath,
    written: AtomicU64,
}

/// A fetch request with the chunk (hash, length) expected for each reply item, in order.
struct Request {
    folder_name: String,
    request: FetchRequest,
    /// Each reply item's chunk (hash, length), its file, and the base offered for that file.
    expect: Vec<(ChunkHash, u32, RelPath, Option<ChunkHash>)>,
}

/// What every batch of one apply shares.
struct StageCtx<'a> {
    conn: &'a Conn,
    folders: &'a [Folder],
    stagings: &'a HashMap<usize, Arc<Staging>>,
    /// Whether each staged file is fsynced as it is finished (few files), or the filesystem
    /// once before the renames (many).
    fsync_each: bool,
    /// The live count of bytes received, for status.
    received: &'a Arc<AtomicU64>,
}

async fn stage_all(
    cx: &StageCtx<'_>,
    jobs: &mut [StageJob],
    stats: &mut ApplyStats,
    chunks: &mut LocalChunks,
    inline: HashMap<ChunkHash, Arc<[u8]>>,
    pushed: Vec<PushedChunk>,
) -> Result<(), ApplyError> {
    let mut index = local_sources(cx.folders, jobs, chunks);
    add_leftovers(cx.folders, jobs, &mut index);
    // What came inside the update costs no read at all.
    for (hash, bytes) in inline {
        index.insert(hash, Source::Memory(bytes));
    }
    if !pushed.is_empty() {
        // They crossed the network like fetched chunks, and count as such.
        let bytes = decode_pushed(cx.folders, jobs, pushed, &mut index).await?;
        cx.received.fetch_add(bytes, Ordering::Relaxed);
        stats.bytes_fetched += bytes;
        stats.bytes_pushed += bytes;
    }
    let mut batches = Vec::new();
    let mut start = 0;
    while start < jobs.len() {
        let mut end = start;
        let mut bytes = 0u64;
        while end < jobs.len() && end - start < BATCH_FILES && (end == start || bytes < BATCH_BYTES)
        {
            bytes += jobs[end].content.size;
            end += 1;
        }
        batches.push(start..end);
        start = end;
    }
    // The next batch's files are created on the blocking pool while this one is fetched:
    // creating thousands of files costs as much as receiving small ones.
    let mut next = batches
        .first()
        .map(|r| spawn_create(cx.stagings, &jobs[r.clone()]));
    let env = Arc::new(BatchEnv {
        conn: cx.conn.clone(),
        roots: cx.folders.iter().map(|f| Arc::clone(&f.root)).collect(),
        names: cx.folders.iter().map(|f| f.name.clone()).collect(),
        stagings: cx.stagings.clone(),
        fsync_each: cx.fsync_each,
        received: Arc::clone(cx.received),
    });
    let mut running = Running::default();
    let mut early = EarlySync::new(
        cx.stagings
            .keys()
            .map(|&i| Arc::clone(&cx.folders[i].root))
            .collect(),
    );
    for (i, range) in batches.iter().enumerate() {
        let created = next
            .take()
            .expect("each batch's creation was started")
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
        next = batches
            .get(i + 1)
            .map(|r| spawn_create(cx.stagings, &jobs[r.clone()]));
        // A batch starts beside the one being fetched unless it needs a chunk that one is
        // fetching: it copies that chunk from the other's staged file once it is done.
        while running.batches.len() >= BATCHES_IN_FLIGHT || running.feeds(&jobs[range.clone()]) {
            finish_batch(cx, &mut running, jobs, &mut index, stats, &mut early, false).await?;
        }
        let prepared = prepare_batch(cx, &mut jobs[range.clone()], created, &index);
        let fetching = prepared.wanted.keys().copied().collect();
        let env = Arc::clone(&env);
        running
            .tasks
            .spawn(async move { (i, run_batch(env, prepared).await) });
        running.batches.insert(i, (range.clone(), fetching));
    }
    while !running.batches.is_empty() {
        finish_batch(cx, &mut running, jobs, &mut index, stats, &mut early, true).await?;
    }
    early.finish().await
}

/// The batches being staged, each by a task of its own (aborted if the apply fails: the set
/// is dropped).
#[derive(Default)]
struct Running {
    tasks: JoinSet<(usize, Result<BatchDone, ApplyError>)>,
    /// Each running batch's jobs and the chunks it fetches, by batch number.
    batches: HashMap<usize, (std::ops::Range<usize>, std::collections::HashSet<ChunkHash>)>,
}

impl Running {
    /// Whether a batch running fetches a chunk one of `jobs` needs.
    fn feeds(&self, jobs: &[StageJob]) -> bool {
        self.batches.values().any(|(_, fetching)| {
            jobs.iter()
                .any(|j| j.content.chunks.iter().any(|c| fetching.contains(&c.hash)))
        })
    }
}

/// Waits for the first of the running batches to be staged and counts it: its files become
/// sources for later batches, and what it wrote through the page cache counts towards an early
/// flush (none after the last batch: the flush before the renames follows at once).
async fn finish_batch(
    cx: &StageCtx<'_>,
    running: &mut Running,
    jobs: &[StageJob],
    index: &mut HashMap<ChunkHash, Source>,
    stats: &mut ApplyStats,
    early: &mut EarlySync,
    all_started: bool,
) -> Result<(), ApplyError> {
    let (i, done) = running
        .tasks
        .join_next()
        .await
        .expect("called with batches running")
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    let BatchDone { reused, fetched } = done?;
    let (range, _) = running
        .batches
        .remove(&i)
        .expect("each task's batch is listed");
    stats.bytes_reused += reused;
    stats.bytes_fetched += fetched;
    let batch = &jobs[range];
    for job in batch {
        let name = job
            .staged
            .as_deref()
            .expect("a staged batch names every file");
        index_staged(index, job.folder, name, &job.content);
    }
    let last = all_started && running.batches.is_empty();
    if !cx.fsync_each && !last {
        let buffered = batch
            .iter()
            .map(|j| j.content.size)
            .filter(|&size| size < DIRECT_MIN)
            .sum();
        early.staged(buffered).await?;
    }
    Ok(())
}

/// Flushes of the filesystem while later batches are still being staged, so that the one
/// before the renames finds little left to write: the device writes what earlier batches put
/// in the page cache while the network and the processors work on the next ones.
struct EarlySync {
    /// The roots of the folders being staged.
    roots: Arc<[Arc<FolderRoot>]>,
    /// Bytes written through the page cache since the last flush began.
    pending: u64,
    running: Option<tokio::task::JoinHandle<Result<(), ApplyError>>>,
}

impl EarlySync {
    fn new(roots: Vec<Arc<FolderRoot>>) -> EarlySync {
        EarlySync {
            roots: roots.into(),
            pending: 0,
            running: None,
        }
    }

    /// Starts a flush once [`EARLY_SYNC_BYTES`] wait in the page cache and none is running.
    /// A flush that failed fails the apply: the error would not be reported again by the
    /// flush before the renames (`syncfs` reports a writeback error once per descriptor).
    async fn staged(&mut self, bytes: u64) -> Result<(), ApplyError> {
        self.pending += bytes;
        if self.pending < EARLY_SYNC_BYTES {
            return Ok(());
        }
        if let Some(running) = &self.running {
            if !running.is_finished() {
                return Ok(());
            }
            self.finish().await?;
        }
        self.pending = 0;
        let roots = Arc::clone(&self.roots);
        self.running = Some(tokio::task::spawn_blocking(move || sync_roots(&roots)));
        Ok(())
    }

    /// Waits for the flush running, if any, and returns its outcome.
    async fn finish(&mut self) -> Result<(), ApplyError> {
        match self.running.take() {
            Some(running) => running
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())),
            None => Ok(()),
        }
    }
}

/// `syncfs` of each root's filesystem.
fn sync_roots(roots: &[Arc<FolderRoot>]) -> Result<(), ApplyError> {
    for root in roots {
        root.sync_filesystem().map_err(|source| ApplyError::Stage {
            path: root.path().display().to_string(),
            source,
        })?;
    }
    Ok(())
}

/// Decodes the chunks pushed inside the update into `index`, each checked against its hash, and
/// returns their bytes (those of chunks not already found on this node). One
/// whose base this node does not hold as the current version of a file being replaced (changed
/// by hand, say), or that does not decode to its hash, is left out: it is fetched like any
/// other.
async fn decode_pushed(
    folders: &[Folder],
    jobs: &[StageJob],
    pushed: Vec<PushedChunk>,
    index: &mut HashMap<ChunkHash, Source>,
) -> Result<u64, ApplyError> {
    // The bases a push may name: the last chunk of each replaced file's current version.
    let olds: HashMap<ChunkHash, u32> = jobs
        .iter()
        .filter_map(|j| current_last_chunk(folders, j))
        .map(|c| (c.hash, c.len))
        .collect();
    let pushed: Vec<PushedChunk> = pushed
        .into_iter()
        .filter(|p| !index.contains_key(&p.hash))
        .collect();
    let bases: Vec<(ChunkHash, u32, Source)> = pushed
        .iter()
        .filter_map(|p| {
            let b = p.base?;
            Some((b, *olds.get(&b)?, index.get(&b)?.clone()))
        })
        .collect();
    let roots: Vec<Arc<FolderRoot>> = folders.iter().map(|f| Arc::clone(&f.root)).collect();
    let decoded = blocking(move || {
        let bases = read_bases(&roots, bases);
        let mut out = Vec::with_capacity(pushed.len());
        let mut buf = Vec::new();
        for p in pushed {
            let base = match p.base {
                Some(b) => match bases.get(&b) {
                    Some(bytes) => Some(bytes.as_slice()),
                    None => continue,
                },
                None => None,
            };
            let ok = syncd_proto::decode_chunk(p.encoding, &p.data, p.len as usize, base, &mut buf)
                .is_ok()
                && ChunkHash::of(&buf) == p.hash;
            if ok {
                out.push((p.hash, Arc::<[u8]>::from(buf.as_slice())));
            } else {
                tracing::debug!(chunk = %p.hash, "a pushed chunk did not decode to its hash; fetching it");
            }
        }
        Ok(out)
    })
    .await?;
    let mut total = 0;
    for (hash, bytes) in decoded {
        total += bytes.len() as u64;
        index.insert(hash, Source::Memory(bytes));
    }
    Ok(total)
}

/// Starts creating the staged files of `jobs` on the blocking pool.
fn spawn_create(
    stagings: &HashMap<usize, Arc<Staging>>,
    jobs: &[StageJob],
) -> tokio::task::JoinHandle<Result<Vec<(Dest, String)>, ApplyError>> {
    let files = jobs
        .iter()
        .map(|job| {
            (
                Arc::clone(&stagings[&job.folder]),
                leftover_key(&job.content.hash),
                job.content.size,
                job.path.clone(),
            )
        })
        .collect();
    tokio::task::spawn_blocking(move || create_staged(files))
}

/// Creates a staged file, at its final size, for each of `files` (staging, key, size, path).
fn create_staged(
    files: Vec<(Arc<Staging>, String, u64, RelPath)>,
) -> Result<Vec<(Dest, String)>, ApplyError> {
    files
        .into_iter()
        .map(|(staging, key, size, path)| {
            let err = |source| ApplyError::Stage {
                path: path.to_string(),
                source,
            };
            let staged = staging.create_for(&key).map_err(err)?;
            staged.file.set_len(size).map_err(err)?;
            let name = staged.name().to_owned();
            let file = Arc::new(staged.file);
            let direct = if size >= DIRECT_MIN {
                staging
                    .open_direct(&name)
                    .map_err(err)?
                    .map(|d| DirectFile::new(d, Arc::clone(&file)))
            } else {
                None
            };
            Ok((
                Dest {
                    file,
                    direct,
                    path,
                    written: AtomicU64::new(0),
                },
                name,
            ))
        })
        .collect()
}

/// What the batches of one apply share, owned: each batch is staged by a task of its own.
struct BatchEnv {
    conn: Conn,
    /// Every folder's root and name, by folder index.
    roots: Vec<Arc<FolderRoot>>,
    names: Vec<String>,
    stagings: HashMap<usize, Arc<Staging>>,
    fsync_each: bool,
    received: Arc<AtomicU64>,
}

/// A file of a batch, as the task staging it needs it.
struct BatchFile {
    path: RelPath,
    folder: usize,
    content: FileContent,
    mode: u32,
    mtime: syncd_manifest::Mtime,
    /// The last chunk of this node's current version, where it holds it: offered as the base
    /// of a delta if the file's chunks are fetched.
    base: Option<(ChunkHash, u32, Source)>,
}

/// A batch sorted into local copies and fetches, ready to be staged.
struct PreparedBatch {
    files: Vec<BatchFile>,
    dests: Vec<Dest>,
    local_copies: Vec<LocalCopy>,
    /// Each missing chunk, asked for once, and every position it is written to.
    wanted: HashMap<ChunkHash, Vec<(usize, u64)>>,
    /// Each file's missing chunks (by index), in file order.
    fetch_lists: Vec<(usize, Vec<u32>)>,
}

/// Bytes a staged batch copied from this node and fetched.
struct BatchDone {
    reused: u64,
    fetched: u64,
}

/// Names each job's staged file and sorts every chunk position into a local copy (from
/// `index`) or a fetch.
fn prepare_batch(
    cx: &StageCtx<'_>,
    jobs: &mut [StageJob],
    created: Vec<(Dest, String)>,
    index: &HashMap<ChunkHash, Source>,
) -> PreparedBatch {
    let mut dests = Vec::with_capacity(jobs.len());
    for (job, (dest, name)) in jobs.iter_mut().zip(created) {
        job.staged = Some(name);
        dests.push(dest);
    }
    let mut local_copies: Vec<LocalCopy> = Vec::new();
    let mut wanted: HashMap<ChunkHash, Vec<(usize, u64)>> = HashMap::new();
    let mut fetch_lists: Vec<(usize, Vec<u32>)> = Vec::new();
    for (d, job) in jobs.iter().enumerate() {
        let mut offset = 0u64;
        let mut indices = Vec::new();
        for (i, c) in job.content.chunks.iter().enumerate() {
            if let Some(src) = index.get(&c.hash) {
                local_copies.push((d, offset, c.len, c.hash, src.clone()));
            } else {
                let positions = wanted.entry(c.hash).or_default();
                if positions.is_empty() {
                    indices.push(i as u32);
                }
                positions.push((d, offset));
            }
            offset += c.len as u64;
        }
        if !indices.is_empty() {
            fetch_lists.push((d, indices));
        }
    }
    let files = jobs
        .iter()
        .map(|job| BatchFile {
            path: job.path.clone(),
            folder: job.folder,
            content: job.content.clone(),
            mode: job.mode,
            mtime: job.mtime,
            base: current_last_chunk(cx.folders, job)
                .filter(|c| c.len <= MAX_BASE)
                .and_then(|c| Some((c.hash, c.len, index.get(&c.hash)?.clone()))),
        })
        .collect();
    PreparedBatch {
        files,
        dests,
        local_copies,
        wanted,
        fetch_lists,
    }
}

/// Stages a prepared batch: local copies and fetches of what is missing at once, then each
/// file's mode and time (and fsync, for few files).
async fn run_batch(env: Arc<BatchEnv>, batch: PreparedBatch) -> Result<BatchDone, ApplyError> {
    let PreparedBatch {
        files,
        dests,
        local_copies,
        wanted,
        fetch_lists,
    } = batch;
    let t_start = std::time::Instant::now();
    let dests = Arc::new(dests);
    // The copies of a large archive's unchanged bytes take tens of milliseconds; the few new
    // chunks are fetched meanwhile, not after.
    let copying = async {
        let done = copy_all(&env, &dests, local_copies).await?;
        Ok::<_, ApplyError>((done, t_start.elapsed()))
    };
    let fetching = async {
        let done = fetch_missing(&env, &files, &dests, wanted, fetch_lists).await?;
        Ok::<_, ApplyError>((done, t_start.elapsed()))
    };
    let (((reused, stale), t_copied), (mut fetched, mut t_fetched)) =
        tokio::try_join!(copying, fetching)?;
    if !stale.is_empty() {
        // Local chunks that no longer matched their hash (the file changed since it was
        // scanned) are fetched now, each once.
        let mut wanted: HashMap<ChunkHash, Vec<(usize, u64)>> = HashMap::new();
        let mut lists: Vec<(usize, Vec<u32>)> = Vec::new();
        for (d, offset, hash) in stale {
            let positions = wanted.entry(hash).or_default();
            if positions.is_empty() {
                let (i, _) = chunk_at(&files[d].content, offset);
                match lists.iter_mut().find(|(dd, _)| *dd == d) {
                    Some((_, list)) => {
                        list.push(i);
                        list.sort_unstable();
                    }
                    None => lists.push((d, vec![i])),
                }
            }
            positions.push((d, offset));
        }
        fetched += fetch_missing(&env, &files, &dests, wanted, lists).await?;
        t_fetched = t_start.elapsed();
    }

    // Every byte of every file must have been written and checked.
    for (file, dest) in files.iter().zip(dests.iter()) {
        let written = dest.written.load(Ordering::Relaxed);
        if written != file.content.size {
            return Err(ApplyError::Protocol(format!(
                "{}: assembled {written} of {} bytes",
                file.path, file.content.size
            )));
        }
    }
    let dests = Arc::try_unwrap(dests)
        .map_err(|_| ApplyError::Protocol("a fetch task outlived its batch".into()))?;
    let count = files.len();
    let fsync_each = env.fsync_each;
    let finish: Vec<(Arc<File>, BatchFile)> = dests
        .into_iter()
        .zip(files)
        .map(|(dest, file)| (dest.file, file))
        .collect();
    blocking(move || {
        for (staged, file) in finish {
            finish_staged(&staged, file.mode, file.mtime)
                .and_then(|()| {
                    if fsync_each {
                        staged.sync_all()
                    } else {
                        Ok(())
                    }
                })
                .map_err(|source| ApplyError::Stage {
                    path: file.path.to_string(),
                    source,
                })?;
        }
        Ok(())
    })
    .await?;
    tracing::debug!(
        files = count,
        copied_ms = t_copied.as_millis() as u64,
        fetched_ms = t_fetched.as_millis() as u64,
        finished_ms = (t_start.elapsed() - t_fetched.max(t_copied)).as_millis() as u64,
        "staged a batch"
    );
    Ok(BatchDone { reused, fetched })
}

/// Copies chunks found on this node into the batch's staged files, in parts at once on the
/// blocking pool; returns the bytes copied and the positions whose source no longer matched.
async fn copy_all(
    env: &Arc<BatchEnv>,
    dests: &Arc<Vec<Dest>>,
    local_copies: Vec<LocalCopy>,
) -> Result<(u64, Vec<(usize, u64, ChunkHash)>), ApplyError> {
    let mut copying = JoinSet::new();
    for part in split_copies(local_copies, COPY_PARTS, COPY_PART_MIN) {
        let dests = Arc::clone(dests);
        let env = Arc::clone(env);
        copying.spawn_blocking(move || copy_local(&env.roots, &env.stagings, &dests, part));
    }
    let (mut reused, mut stale) = (0, Vec::new());
    while let Some(done) = copying.join_next().await {
        let (r, s) = done
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
            .map_err(|(path, source)| ApplyError::Stage { path, source })?;
        reused += r;
        stale.extend(s);
    }
    Ok((reused, stale))
}

/// Fetches the chunks of `lists` (each file's missing chunks, by index) on up to
/// [`REQUESTS_IN_FLIGHT`] streams, writing each to every position `wanted` names; returns the
/// chunk bytes received.
async fn fetch_missing(
    env: &Arc<BatchEnv>,
    files: &[BatchFile],
    dests: &Arc<Vec<Dest>>,
    wanted: HashMap<ChunkHash, Vec<(usize, u64)>>,
    lists: Vec<(usize, Vec<u32>)>,
) -> Result<u64, ApplyError> {
    if lists.is_empty() {
        return Ok(0);
    }
    // A small file this node already holds in another version is offered as the base of its
    // new version: the manager may send the new one as a delta against it.
    let base_of: HashMap<usize, (ChunkHash, u32, Source)> = lists
        .iter()
        .filter_map(|(d, _)| Some((*d, files[*d].base.clone()?)))
        .collect();
    let base_bytes = if base_of.is_empty() {
        HashMap::new()
    } else {
        let roots = env.roots.clone();
        let wanted_bases: Vec<(ChunkHash, u32, Source)> = base_of.values().cloned().collect();
        blocking(move || Ok(read_bases(&roots, wanted_bases))).await?
    };
    let bases: HashMap<usize, ChunkHash> = base_of
        .into_iter()
        .filter(|(_, (h, _, _))| base_bytes.contains_key(h))
        .map(|(d, (h, _, _))| (d, h))
        .collect();
    let base_bytes = Arc::new(base_bytes);
    let requests = build_requests(&env.names, files, lists, &bases);
    tracing::debug!(
        files = files.len(),
        requests = requests.len(),
        chunks = wanted.len(),
        "fetching missing chunks"
    );
    let wanted = Arc::new(wanted);
    let mut in_flight = JoinSet::new();
    let mut requests = requests.into_iter();
    let mut fetched = 0u64;
    loop {
        while in_flight.len() < REQUESTS_IN_FLIGHT {
            let Some(req) = requests.next() else { break };
            let env = Arc::clone(env);
            let dests = Arc::clone(dests);
            let wanted = Arc::clone(&wanted);
            let bases = Arc::clone(&base_bytes);
            in_flight.spawn(async move {
                fetch(&env.conn, req, &dests, &wanted, &bases, &env.received).await
            });
        }
        let Some(done) = in_flight.join_next().await else {
            break;
        };
        // An error drops the set, which aborts the other requests.
        fetched += done.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
    }
    Ok(fetched)
}

/// Writes `bytes` at `offset` of `dest` and counts them: a large file's through `run` (the
/// current run goes on, or a new one begins there), a small one's through the page cache.
fn write_chunk(run: &mut RunWriter, dest: &Dest, offset: u64, bytes: &[u8]) -> io::Result<()> {
    match &dest.direct {
        Some(file) => {
            run_at(run, file, offset)?;
            run.push(bytes)?;
        }
        None => dest.file.write_all_at(bytes, offset)?,
    }
    dest.written
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// Makes `run` write at `offset` of `file` next: the run being written if it ends there, else a
/// new one.
fn run_at(run: &mut RunWriter, file: &DirectFile, offset: u64) -> io::Result<()> {
    if !run.continues(file, offset) {
        run.begin(file.clone(), offset)?;
    }
    Ok(())
}

/// Room in `run`'s buffer for a chunk of `n` bytes at `offset` of `file`, to be filled in place
/// (one copy fewer than [`write_chunk`]) and then handed to [`commit_room`].
fn room_at<'r>(
    run: &'r mut RunWriter,
    file: &DirectFile,
    offset: u64,
    n: usize,
) -> io::Result<&'r mut [u8]> {
    run_at(run, file, offset)?;
    run.reserve(n)
}

/// Adds the `n` bytes filled in [`room_at`] to the run, and to what `dest` has written.
fn commit_room(run: &mut RunWriter, dest: &Dest, n: usize) -> io::Result<()> {
    run.commit(n)?;
    dest.written.fetch_add(n as u64, Ordering::Relaxed);
    Ok(())
}

/// Sets the final mode and mtime of a staged file, after its last write.
fn finish_staged(file: &File, mode: u32, mtime: syncd_manifest::Mtime) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
    file.set_times(std::fs::FileTimes::new().set_modified(syncd_fsops::to_system_time(mtime)))
}

/// Reads the chunks offered as bases, keeping those that still match their hash.
fn read_bases(
    roots: &[Arc<FolderRoot>],
    wanted: Vec<(ChunkHash, u32, Source)>,
) -> HashMap<ChunkHash, Vec<u8>> {
    let mut out = HashMap::new();
    for (hash, len, src) in wanted {
        if let Source::Memory(bytes) = &src {
            out.insert(hash, bytes.to_vec());
            continue;
        }
        let Source::Live {
            folder,
            path,
            offset,
            ..
        } = src
        else {
            continue;
        };
        let Ok(file) = roots[folder].open_file(&path) else {
            continue;
        };
        let mut buf = vec![0u8; len as usize];
        if file.read_exact_at(&mut buf, offset).is_ok() && ChunkHash::of(&buf) == hash {
            out.insert(hash, buf);
        }
    }
    out
}

/// The index and length of the chunk at `offset` of a file.
fn chunk_at(content: &FileContent, offset: u64) -> (u32, u32) {
    let mut at = 0u64;
    for (i, c) in content.chunks.iter().enumerate() {
        if at == offset {
            return (i as u32, c.len);
        }
        at += c.len as u64;
    }
    unreachable!("offsets come from the same chunk list")
}

type CopyOutcome = Result<(u64, Vec<(usize, u64, ChunkHash)>), (String, io::Error)>;

/// One local copy: (destination, offset there, length, hash, where the chunk is found).
type LocalCopy = (usize, u64, u32, ChunkHash, Source);

/// Cuts `copies` (in destination and offset order) into at most `parts` consecutive parts of
/// about equal bytes, none under `min` bytes unless it is the only one. A cut inside a file only
/// ends one direct-write run and begins another.
fn split_copies(copies: Vec<LocalCopy>, parts: usize, min: u64) -> Vec<Vec<LocalCopy>> {
    let total: u64 = copies.iter().map(|c| u64::from(c.2)).sum();
    let parts = (total / min.max(1)).clamp(1, parts.max(1) as u64);
    let share = total.div_ceil(parts);
    let mut out = vec![Vec::new()];
    let mut in_part = 0u64;
    for c in copies {
        if in_part >= share {
            out.push(Vec::new());
            in_part = 0;
        }
        in_part += u64::from(c.2);
        out.last_mut().expect("starts with one part").push(c);
    }
    out
}

/// Copies chunks found on this node into staged files, checking each one's hash. Returns the
/// bytes copied and the positions whose source no longer matched.
fn copy_local(
    roots: &[Arc<FolderRoot>],
    stagings: &HashMap<usize, Arc<Staging>>,
    dests: &[Dest],
    copies: Vec<LocalCopy>,
) -> CopyOutcome {
    // Each source file, open, and whether its chunks are trusted without a hash (see
    // `Source::Live::key`); `None` when it could not be opened.
    let mut open: HashMap<String, Option<(File, bool)>> = HashMap::new();
    let mut buf = Vec::new();
    // Sources this node wrote itself are not in the page cache (they were written directly):
    // read those directly too.
    let mut reader = CopyReader::new();
    // Copies come file by file, in offset order: a large file's are runs.
    let mut run = RunWriter::new(RUN_BUFFER);
    let mut reused = 0u64;
    let mut stale = Vec::new();
    for (d, offset, len, hash, src) in copies {
        let dest = &dests[d];
        let (key, src_offset) = match &src {
            Source::Memory(bytes) => {
                // Its hash was computed from these very bytes when the update was resolved.
                write_chunk(&mut run, dest, offset, bytes)
                    .map_err(|e| (dest.path.to_string(), e))?;
                continue;
            }
            Source::Live {
                folder,
                path,
                offset,
                ..
            } => (format!("L{folder}/{path}"), *offset),
            Source::Staged {
                folder,
                name,
                offset,
            } => (format!("S{folder}/{name}"), *offset),
        };
        let file = open.entry(key).or_insert_with(|| match &src {
            Source::Live {
                folder, path, key, ..
            } => {
                let file = roots[*folder].open_file(path).ok()?;
                let trusted = key.is_some_and(|k| k.still_of(&file));
                Some((file, trusted))
            }
            // Left by an interrupted apply: whatever it holds is checked.
            Source::Staged { folder, name, .. } => stagings
                .get(folder)
                .and_then(|s| s.open_staged(name).ok())
                .map(|f| (f, false)),
            Source::Memory(_) => None,
        });
        let Some((f, trusted)) = file.as_ref() else {
            stale.push((d, offset, hash));
            continue;
        };
        let n = len as usize;
        let ok = match &dest.direct {
            // Read straight into the direct-write buffer: one copy of every byte fewer.
            Some(direct) if run.fits(n) => {
                let err = |e| (dest.path.to_string(), e);
                let room = room_at(&mut run, direct, offset, n).map_err(err)?;
                let ok = reader.read_exact_at(f, room, src_offset).is_ok()
                    && (*trusted || ChunkHash::of(room) == hash);
                if ok {
                    commit_room(&mut run, dest, n).map_err(err)?;
                }
                ok
            }
            _ => {
                buf.resize(n, 0);
                let ok = reader.read_exact_at(f, &mut buf, src_offset).is_ok()
                    && (*trusted || ChunkHash::of(&buf) == hash);
                if ok {
                    write_chunk(&mut run, dest, offset, &buf)
                        .map_err(|e| (dest.path.to_string(), e))?;
                }
                ok
            }
        };
        if !ok {
            stale.push((d, offset, hash));
            continue;
        }
        reused += len as u64;
    }
    run.end()
        .map_err(|e| ("a file copied from local chunks".to_owned(), e))?;
    Ok((reused, stale))
}

/// How many of a batch's `total` missing chunks, in `files` files, one fetch request asks for:
/// for many files, enough requests to keep [`REQUESTS_IN_FLIGHT`] busy, none smaller than
/// [`REQUEST_MIN_CHUNKS`] (unless the batch needs fewer); never more than [`REQUEST_CHUNKS`].
fn chunks_per_request(total: usize, files: usize) -> usize {
    if files < SPREAD_MIN_FILES {
        return REQUEST_CHUNKS;
    }
    total
        .div_ceil(REQUESTS_IN_FLIGHT)
        .clamp(REQUEST_MIN_CHUNKS, REQUEST_CHUNKS)
}

/// Groups the missing chunks of a batch's files into fetch requests, file by file in order.
fn build_requests(
    names: &[String],
    jobs: &[BatchFile],
    lists: Vec<(usize, Vec<u32>)>,
    bases: &HashMap<usize, ChunkHash>,
) -> Vec<Request> {
    let mut out: Vec<Request> = Vec::new();
    let per_request = chunks_per_request(lists.iter().map(|(_, l)| l.len()).sum(), lists.len());
    let mut by_folder: HashMap<usize, Vec<(usize, Vec<u32>)>> = HashMap::new();
    for (d, list) in lists {
        by_folder.entry(jobs[d].folder).or_default().push((d, list));
    }
    let mut folder_ids: Vec<usize> = by_folder.keys().copied().collect();
    folder_ids.sort_unstable();
    for f in folder_ids {
        let name = names[f].clone();
        let mut current = Request {
            folder_name: name.clone(),
            request: FetchRequest {
                folder: name.clone(),
                files: Vec::new(),
            },
            expect: Vec::new(),
        };
        for (d, list) in by_folder.remove(&f).unwrap_or_default() {
            let job = &jobs[d];
            for piece in list.chunks(per_request) {
                if current.expect.len() + piece.len() > per_request && !current.expect.is_empty() {
                    out.push(std::mem::replace(
                        &mut current,
                        Request {
                            folder_name: name.clone(),
                            request: FetchRequest {
                                folder: name.clone(),
                                files: Vec::new(),
                            },
                            expect: Vec::new(),
                        },
                    ));
                }
                let base = bases.get(&d).copied();
                for &i in piece {
                    let c = job.content.chunks[i as usize];
                    current.expect.push((c.hash, c.len, job.path.clone(), base));
                }
                current.request.files.push(FetchFile {
                    path: job.path.clone(),
                    hash: job.content.hash,
                    chunks: piece.to_vec(),
                    base,
                });
            }
        }
        if !current.expect.is_empty() {
            out.push(current);
        }
    }
    out
}

/// Runs one fetch request on its own stream, writing each verified chunk to every position that
/// wants it. Returns the chunk bytes received.
async fn fetch(
    conn: &Conn,
    req: Request,
    dests: &[Dest],
    wanted: &HashMap<ChunkHash, Vec<(usize, u64)>>,
    bases: &HashMap<ChunkHash, Vec<u8>>,
    progress: &AtomicU64,
) -> Result<u64, ApplyError> {
    let (mut tx, mut rx) = conn.open_bi().await?;
    tx.send(&req.request, MAX_REQUEST_FRAME).await?;
    tx.finish();
    let (mut wire, mut buf) = (Vec::new(), Vec::new());
    let mut run = RunWriter::new(RUN_BUFFER);
    let mut received = 0u64;
    for (hash, len, path, base) in &req.expect {
        match rx.expect::<FetchReply>(MAX_CONTROL_FRAME).await? {
            FetchReply::Chunk { len: got, encoding } => {
                // Never more on the wire than the chunk itself.
                if got > *len {
                    return Err(ApplyError::Protocol(format!(
                        "{path}: chunk of {got} bytes where {len} were expected (folder {})",
                        req.folder_name
                    )));
                }
                // The usual chunk of a large file: raw, wanted at one position, the next of
                // the run this task writes. Read straight into the run's buffer, checked there.
                if encoding == ChunkEncoding::Raw
                    && got == *len
                    && run.fits(*len as usize)
                    && let Some([(d, offset)]) = wanted.get(hash).map(Vec::as_slice)
                    && let Some(file) = &dests[*d].direct
                {
                    let dest = &dests[*d];
                    let err = |source| ApplyError::Stage {
                        path: dest.path.to_string(),
                        source,
                    };
                    let room = room_at(&mut run, file, *offset, *len as usize).map_err(err)?;
                    rx.read_exact(room).await?;
                    if ChunkHash::of(room) != *hash {
                        return Err(ApplyError::BadChunk { path: path.clone() });
                    }
                    commit_room(&mut run, dest, *len as usize).map_err(err)?;
                    received += *len as u64;
                    progress.fetch_add(*len as u64, Ordering::Relaxed);
                    continue;
                }
                wire.resize(got as usize, 0);
                rx.read_exact(&mut wire).await?;
                let base = base.and_then(|b| bases.get(&b)).map(Vec::as_slice);
                let bad = |e: syncd_proto::ChunkDecodeError| {
                    ApplyError::Protocol(format!("{path}: {e} (folder {})", req.folder_name))
                };
                // Raw bytes are the chunk: checked and written from where they were received
                // (decoding would only copy them, a memcpy of every byte of every archive).
                let chunk: &[u8] = if encoding == ChunkEncoding::Raw {
                    if got != *len {
                        return Err(bad(syncd_proto::ChunkDecodeError::Length {
                            got: got as usize,
                            expected: *len as usize,
                        }));
                    }
                    &wire
                } else {
                    syncd_proto::decode_chunk(encoding, &wire, *len as usize, base, &mut buf)
                        .map_err(bad)?;
                    &buf
                };
                if ChunkHash::of(chunk) != *hash {
                    return Err(ApplyError::BadChunk { path: path.clone() });
                }
                received += *len as u64;
                progress.fetch_add(*len as u64, Ordering::Relaxed);
                for &(d, offset) in wanted.get(hash).map(Vec::as_slice).unwrap_or(&[]) {
                    let dest = &dests[d];
                    let err = |source| ApplyError::Stage {
                        path: dest.path.to_string(),
                        source,
                    };
                    // A large file's chunks come in order, request by request: each
                    // request's part is one run. Writes into the page cache of a small file's
                    // chunk take microseconds: doing them here keeps the stream flowing.
                    write_chunk(&mut run, dest, offset, chunk).map_err(err)?;
                }
            }
            FetchReply::Gone { path, reason } => return Err(ApplyError::Gone { path, reason }),
        }
    }
    run.end().map_err(|source| ApplyError::Stage {
        path: format!("a file fetched in folder {}", req.folder_name),
        source,
    })?;
    rx.stop(0);
    Ok(received)
}

#[derive(Debug, Default)]
struct CommitStats {
    files_written: u64,
    removed: u64,
    left_non_empty: u64,
    /// Large files replaced or removed, freed when this is dropped (after the commit).
    retired: Retired,
}

/// Why the directory at `dir`, which the manager replaced with `node`, cannot be removed: what
/// is left in it after everything syncd may remove is gone.
fn still_holds(root: &FolderRoot, dir: &RelPath, node: &Node) -> io::Error {
    let mut names: Vec<String> = std::fs::read_dir(root.abs(dir))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort_unstable();
    let more = names.len().saturating_sub(5);
    names.truncate(5);
    let mut listed = names.join(", ");
    if more > 0 {
        listed.push_str(&format!(" and {more} more"));
    }
    let kind = match node.kind {
        NodeKind::Symlink(_) => "symbolic link",
        _ => "file",
    };
    io::Error::other(format!(
        "the manager replaced this directory with a {kind}, but it still holds what syncd never \
         removes here (excluded, or with a name it cannot use): {listed}; move that out of the \
         folder"
    ))
}

/// Renames staged files into place and makes the rest of the folder match `target`.
fn commit_folder(
    root: &FolderRoot,
    staging: Option<&Staging>,
    local: &Manifest,
    owned: Vec<Change>,
    clear: &[RelPath],
    staged: &HashMap<RelPath, String>,
) -> Result<(Applied, CommitStats), ApplyError> {
    let changes = owned.as_slice();
    let err = |path: &RelPath| {
        let path = root.abs(path).display().to_string();
        move |source| ApplyError::Commit { path, source }
    };
    let mut stats = CommitStats::default();

    // 1. A directory replaced by a file or link is emptied of what it held, deepest first:
    // what was applied there and what was added by hand (backed up before the apply).
    for change in changes {
        let Change::Put(path, node) = change else {
            continue;
        };
        if node.is_dir() {
            continue;
        }
        let mut inside: Vec<&RelPath> = clear.iter().filter(|p| p.starts_with(path)).collect();
        if local.get(path).is_some_and(Node::is_dir) {
            inside.extend(local.subtree(path).map(|(p, _)| p));
        }
        inside.sort_unstable();
        inside.dedup();
        for p in inside.into_iter().rev() {
            match root.remove_entry_retiring(p, &mut stats.retired) {
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOTEMPTY.raw_os_error()) => {
                    return Err(err(p)(still_holds(root, p, node)));
                }
                r => r.map_err(err(p))?,
            }
        }
    }
    // 2. Directories, parents first (a file or link in the way is removed).
    for change in changes {
        if let Change::Put(path, node) = change
            && node.is_dir()
        {
            root.ensure_dir(path).map_err(err(path))?;
        }
    }
    // 3. Files: staged ones renamed in quick succession; unchanged content gets metadata only.
    let mut committed: Vec<(RelPath, syncd_fsops::StatKey)> = Vec::new();
    let mut touched: Vec<RelPath> = Vec::new();
    let mut committer = staging.map(Staging::committer);
    for change in changes {
        if let Change::Put(path, node) = change
            && node.file().is_some()
        {
            match staged.get(path) {
                Some(name) => {
                    let key = committer
                        .as_mut()
                        .expect("a staged file implies a staging directory")
                        .commit(name, path)
                        .map_err(err(path))?;
                    committed.push((path.clone(), key));
                    stats.files_written += 1;
                }
                None => {
                    root.set_file_meta(path, node.mode, node.mtime)
                        .map_err(err(path))?;
                    touched.push(path.clone());
                }
            }
        }
    }
    if let Some(committer) = committer {
        stats.retired.append(committer.finish());
    }
    // 4. Symbolic links, each replaced atomically.
    for change in changes {
        if let Change::Put(path, node) = change
            && let NodeKind::Symlink(t) = &node.kind
        {
            root.put_symlink(path, t, node.mtime).map_err(err(path))?;
        }
    }
    // 5. Deletions last, deepest first. A directory still holding unmanaged files is left.
    for change in changes.iter().rev() {
        if let Change::Remove(path) = change {
            match root.remove_entry_retiring(path, &mut stats.retired) {
                Ok(()) => stats.removed += 1,
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOTEMPTY.raw_os_error()) => {
                    tracing::warn!(path = %root.abs(path).display(), "directory removed on the manager still holds files syncd does not manage here; left in place");
                    stats.left_non_empty += 1;
                }
                Err(e) => return Err(err(path)(e)),
            }
        }
    }
    // 6. Directory modes and mtimes, deepest first, once nothing inside them changes any more:
    // the directories put and those whose entries changed (no other directory's mtime moved).
    let mut dirs: Vec<&RelPath> = changes
        .iter()
        .filter(|c| matches!(c, Change::Put(_, n) if n.is_dir()))
        .map(Change::path)
        .collect();
    let parents: Vec<RelPath> = changes.iter().filter_map(|c| c.path().parent()).collect();
    dirs.extend(&parents);
    dirs.sort_unstable_by(|a, b| b.cmp(a));
    dirs.dedup();
    // What the folder holds now at `path`: what the changes put there, or what was there.
    let target = |path: &RelPath| match changes.binary_search_by(|c| c.path().cmp(path)) {
        Ok(i) => match &changes[i] {
            Change::Put(_, node) => Some(node),
            Change::Remove(_) => None,
        },
        Err(_) => local.get(path),
    };
    for path in dirs {
        if let Some(node) = target(path).filter(|n| n.is_dir()) {
            let current = root.lstat(path).map_err(err(path))?;
            let matches = current.is_some_and(|st| {
                st.st_mode & 0o7777 == node.mode && syncd_fsops::mtime_of(&st) == node.mtime
            });
            if !matches {
                root.set_dir_meta(path, node.mode, node.mtime)
                    .map_err(err(path))?;
            }
        }
    }

    let mut keys = committed;
    for path in touched {
        let meta = std::fs::symlink_metadata(root.abs(&path)).map_err(err(&path))?;
        keys.push((path, stat_key(&meta)));
    }
    Ok((
        Applied {
            changes: owned,
            keys,
        },
        stats,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copies(lens: &[u32]) -> Vec<LocalCopy> {
        let mut offset = 0u64;
        lens.iter()
            .map(|&len| {
                let c = (
                    0,
                    offset,
                    len,
                    ChunkHash::of(&offset.to_le_bytes()),
                    Source::Memory(Arc::from(&[][..])),
                );
                offset += u64::from(len);
                c
            })
            .collect()
    }

    fn offsets(parts: &[Vec<LocalCopy>]) -> Vec<Vec<u64>> {
        parts
            .iter()
            .map(|p| p.iter().map(|c| c.1).collect())
            .collect()
    }

    #[test]
    fn a_local_source_is_trusted_only_while_it_keeps_the_stat_key_it_was_applied_with() {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let root = Arc::new(FolderRoot::open(dir.path()).unwrap());
        let abs = dir.path().join("app.war");
        std::fs::write(&abs, b"0123456789").unwrap();
        // Through the page cache, and (where the filesystem takes O_DIRECT) read straight into
        // the direct-write buffer.
        let out = dir.path().join("out");
        let cached = Arc::new(
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&out)
                .unwrap(),
        );
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(&out)
            .ok()
            .map(|f| DirectFile::new(f, Arc::clone(&cached)));
        for direct in [None, direct] {
            let dest = Dest {
                file: Arc::clone(&cached),
                direct,
                path: RelPath::new("new.war").unwrap(),
                written: AtomicU64::new(0),
            };
            std::fs::set_permissions(&abs, std::fs::Permissions::from_mode(0o644)).unwrap();
            let applied = stat_key(&std::fs::symlink_metadata(&abs).unwrap());
            // Four bytes from offset 2 to offset 0 of `out`, said to hash to `hash`; returns
            // the bytes copied and the chunks left to fetch, and empties `out` after.
            let copy = |key: Option<StatKey>, hash: ChunkHash| {
                let src = Source::Live {
                    folder: 0,
                    path: RelPath::new("app.war").unwrap(),
                    offset: 2,
                    key,
                };
                let copies = vec![(0, 0, 4, hash, src)];
                let (reused, stale) = copy_local(
                    std::slice::from_ref(&root),
                    &HashMap::new(),
                    std::slice::from_ref(&dest),
                    copies,
                )
                .unwrap();
                let copied = std::fs::read(&out).unwrap();
                assert_eq!(copied, &b"2345"[..reused as usize]);
                cached.set_len(0).unwrap();
                (reused, stale.len())
            };
            let right = ChunkHash::of(b"2345");
            // A hash the bytes do not have shows whether they were checked.
            let wrong = ChunkHash::of(b"else");
            // Unchanged since it was applied: copied as the manifest describes it, unhashed.
            assert_eq!(copy(Some(applied), wrong), (4, 0));
            // No key recorded: checked, and a mismatch is left to be fetched.
            assert_eq!(copy(None, wrong), (0, 1));
            assert_eq!(copy(None, right), (4, 0));
            // Anything done to the file since (here a chmod: a new ctime, a clock tick later)
            // makes it checked again.
            std::thread::sleep(std::time::Duration::from_millis(20));
            std::fs::set_permissions(&abs, std::fs::Permissions::from_mode(0o600)).unwrap();
            assert_eq!(copy(Some(applied), wrong), (0, 1));
            assert_eq!(copy(Some(applied), right), (4, 0));
        }
    }

    #[test]
    fn a_batch_of_small_files_is_fetched_on_every_stream_in_flight() {
        // 128 one-chunk files: four requests of 32, not one of 128.
        assert_eq!(chunks_per_request(128, 128), 32);
        assert_eq!(
            128usize.div_ceil(chunks_per_request(128, 128)),
            REQUESTS_IN_FLIGHT
        );
        // A handful of chunks stays one request; many files' are capped per request.
        assert_eq!(chunks_per_request(10, 10), REQUEST_MIN_CHUNKS);
        assert_eq!(chunks_per_request(100_000, 128), REQUEST_CHUNKS);
        assert_eq!(chunks_per_request(1000, 100), 250);
        // One file's chunks (a new CAR) are not spread; a large one is cut at REQUEST_CHUNKS.
        assert_eq!(chunks_per_request(80, 1), REQUEST_CHUNKS);
        assert_eq!(chunks_per_request(3, 2), REQUEST_CHUNKS);
    }

    #[test]
    fn local_copies_are_split_in_order_into_parts_of_about_equal_bytes() {
        let all = copies(&[64 << 10; 1000]);
        let expected: Vec<u64> = all.iter().map(|c| c.1).collect();
        let parts = split_copies(all, 2, 8 << 20);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].len(), 500);
        // Nothing lost, nothing reordered.
        assert_eq!(offsets(&parts).concat(), expected);
        // Under the minimum: one part; nothing at all: one empty part.
        assert_eq!(split_copies(copies(&[64 << 10; 100]), 2, 8 << 20).len(), 1);
        let none = split_copies(Vec::new(), 2, 8 << 20);
        assert!(none.len() == 1 && none[0].is_empty());
    }
}
