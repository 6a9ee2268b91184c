//! Every message of protocol version 1.

use serde::{Deserialize, Serialize};
use syncd_manifest::{Change, ChunkHash, ChunkParams, ChunkRef, FileHash, ManifestDigest, RelPath};

/// Largest chunk payload a fetch reply may carry (FastCDC's largest maximum).
pub const MAX_CHUNK_LEN: u32 = 16 << 20;

/// A generation: the number of a published set of changes. Generation 0 is "nothing yet".
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Generation(pub u64);

impl std::fmt::Display for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What an agent holds in one folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderState {
    /// Folder name, as both configs name it.
    pub folder: String,
    /// Digest of the folder's actual content.
    pub digest: ManifestDigest,
}

/// Messages an agent sends on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMsg {
    /// First message after the hello: who the agent is and what it holds.
    Join {
        /// The agent's configured name; must match the manager's entry for its identity.
        node_name: String,
        /// The agent's software version, for logs and status.
        software: String,
        /// The last generation the agent applied completely.
        applied: Generation,
        /// What each folder actually holds now.
        folders: Vec<FolderState>,
    },
    /// A generation was applied completely and durably.
    Applied {
        /// The generation.
        generation: Generation,
        /// What each folder holds now.
        folders: Vec<FolderState>,
    },
    /// A generation could not be applied; nothing of it was renamed into place.
    Failed {
        /// The generation.
        generation: Generation,
        /// Why, for the manager's log and status.
        reason: String,
        /// What each folder holds now.
        folders: Vec<FolderState>,
    },
    /// The agent's pause state changed (or, right after `Join`, what it is), with what its
    /// folders hold now. While paused, the manager sends it no generation.
    PauseState {
        /// The pause, or `None` when the agent is not paused.
        pause: Option<Pause>,
        /// When the latest pause or resume was decided (milliseconds since the Unix epoch).
        set_at: u64,
        /// What each folder holds now.
        folders: Vec<FolderState>,
    },
    /// A generation arrived while the agent was paused: nothing of it was applied.
    Deferred {
        /// The generation.
        generation: Generation,
    },
    /// Local changes syncd did not make, as the agent sees them now (sent when they change).
    Drift {
        /// Changes left in place (reported, or drifting again and again), for status: the
        /// first [`DRIFT_REPORTED`] at most (a list of exactly that many may have been cut).
        entries: Vec<DriftEntry>,
        /// Local changes reverted since the agent started.
        reverted_total: u64,
    },
}

/// Most local changes a `Drift` report lists (and at most [`DRIFT_REPORTED_BYTES`] of their
/// text): the manager shows a few and points at the worker for the rest. Uncut, 100,000 of
/// them (a `touch` over a tree while paused) made a 6 MB report, over the frame limit, and the
/// agent's session ended and began again, forever.
pub const DRIFT_REPORTED: usize = 1_000;
/// Most bytes of folder names, paths and words a `Drift` report carries.
pub const DRIFT_REPORTED_BYTES: usize = 256 << 10;

/// The first local changes of `entries` that a `Drift` report carries (see [`DRIFT_REPORTED`]).
pub fn drift_reported(entries: &[DriftEntry]) -> &[DriftEntry] {
    let mut bytes = 0;
    let n = entries
        .iter()
        .take(DRIFT_REPORTED)
        .take_while(|e| {
            bytes += e.folder.len() + e.path.len() + e.change.len() + e.action.len() + 8;
            bytes <= DRIFT_REPORTED_BYTES
        })
        .count();
    &entries[..n]
}

/// A local change on an agent that syncd did not make and has not undone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftEntry {
    /// The folder.
    pub folder: String,
    /// The path in it.
    pub path: String,
    /// `added`, `modified` or `removed`.
    pub change: String,
    /// Why it is left: `reported` (the folder's policy), `flapping` (changed again and again),
    /// `waiting` (to be reverted once the manager is reachable), `paused` (the agent is paused:
    /// listed only; agents before this value existed report nothing while paused).
    pub action: String,
}

/// A pause of an agent: it changes nothing in its folders until resumed or until `until`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    /// When the pause ends by itself, in seconds since the Unix epoch; `None` for no limit.
    pub until: Option<u64>,
    /// When the pause (or the resume that cleared the previous one) was decided, in
    /// milliseconds since the Unix epoch: between two decisions, the later one wins.
    pub set_at: u64,
    /// Who decided it: `"agent"` (syncctl on the worker) or `"manager"`.
    pub by: String,
}

/// What the changes of an [`ManagerMsg::Update`] apply to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Base {
    /// The changes are the whole manifest: apply them to an empty one.
    Full,
    /// The changes apply to the manifest with this digest, which the agent reported holding.
    Delta {
        /// Digest of the manifest the changes apply to.
        from: ManifestDigest,
    },
}

/// Messages a manager sends on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManagerMsg {
    /// Reply to `Join`: the manager accepted the agent.
    Welcome {
        /// The manager's configured name.
        manager_name: String,
        /// The manager's software version.
        software: String,
        /// The folders the manager publishes.
        folders: Vec<String>,
    },
    /// Starts the changes of one folder within a generation. `Changes` and `MoreChunks`
    /// messages follow, then either another `Update` or `UpdateEnd`.
    Update {
        /// The generation being sent.
        generation: Generation,
        /// The folder the changes are for.
        folder: String,
        /// Chunk parameters of the target manifest.
        params: ChunkParams,
        /// What the changes apply to.
        base: Base,
        /// Digest the folder's manifest must have once the changes are applied.
        target: ManifestDigest,
    },
    /// A page of changes, in path order.
    Changes(Vec<Change>),
    /// More chunks of the last file put by the previous `Changes` page (a file whose chunk list
    /// would not fit in one frame).
    MoreChunks(Vec<ChunkRef>),
    /// A file put as an edit of the chunk list of the version the agent holds.
    Patched(crate::patch::PatchedPut),
    /// The generation is complete: the agent may stage and apply it.
    UpdateEnd {
        /// The generation.
        generation: Generation,
    },
    /// The operator paused (`pause: Some`) or resumed (`pause: None`, `set_at` saying when)
    /// this agent on the manager.
    SetPause {
        /// The pause, or `None` to resume.
        pause: Option<Pause>,
        /// When this was decided (milliseconds since the Unix epoch).
        set_at: u64,
    },
    /// A small file's only chunk, inside the update (protocol 4 on): the agent need not fetch
    /// it. It belongs to the current `Update` and is a hint: an agent that cannot use it (the
    /// base is not among its files any more) fetches the chunk as usual.
    Pushed(PushedChunk),
}

/// A chunk carried inside an update ([`ManagerMsg::Pushed`]), so that an edit of a small file
/// costs no fetch round trip: mostly an edited XML, compressed against the version the agent
/// holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushedChunk {
    /// The chunk's hash (the agent checks the decoded bytes against it).
    pub hash: ChunkHash,
    /// The chunk's length.
    pub len: u32,
    /// How `data` is encoded.
    pub encoding: ChunkEncoding,
    /// For [`ChunkEncoding::ZstdWithBase`]: the chunk used as the dictionary (the agent's
    /// current version of the file, found among its chunks by hash).
    pub base: Option<ChunkHash>,
    /// The encoded bytes.
    pub data: Vec<u8>,
}

/// A request for chunk bytes, sent by an agent on a bidirectional stream of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRequest {
    /// The folder the files are in.
    pub folder: String,
    /// The files and chunks wanted, answered in this order.
    pub files: Vec<FetchFile>,
}

/// The chunks wanted of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchFile {
    /// The file's path.
    pub path: RelPath,
    /// The file version the chunk indices refer to.
    pub hash: FileHash,
    /// Indices into that version's chunk list, ascending.
    pub chunks: Vec<u32>,
    /// A chunk the agent holds that is likely much like some it asks for (the last chunk of its
    /// current version of the file: all of a small file, an archive's central directory): the
    /// manager may send chunks compressed with it as the dictionary
    /// ([`ChunkEncoding::ZstdWithBase`]).
    pub base: Option<ChunkHash>,
}

/// How a chunk's bytes are carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkEncoding {
    /// As they are.
    Raw,
    /// One zstd frame, shorter than the chunk, that decompresses to exactly the chunk's bytes.
    Zstd,
    /// Like `Zstd`, with the file's `base` chunk (from the request) as the dictionary: an edit
    /// of a small file costs about the size of the edit.
    ZstdWithBase,
}

/// Header of each item of a fetch reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchReply {
    /// `len` bytes of the next requested chunk follow, unframed.
    Chunk {
        /// Bytes that follow.
        len: u32,
        /// How they are encoded.
        encoding: ChunkEncoding,
    },
    /// The manager no longer has that version of the file; the reply ends here.
    Gone {
        /// The file.
        path: RelPath,
        /// Why (changed since, removed, unreadable).
        reason: String,
    },
}
