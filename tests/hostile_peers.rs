//! Peers with valid credentials that misbehave: paths that escape, links to follow, lying
//! chunks, oversized frames, other protocol versions, borrowed names. Each is refused with a
//! clear reason, nothing is written outside a folder, and the daemon stays up.

mod support;

use std::collections::HashMap;
use std::fs;
use std::time::Duration;

use serde::Serialize;
use support::*;
use syncd_manifest::{
    ChunkHash, ChunkParams, ChunkRef, FileContent, FileHash, Manifest, Mtime, Node, NodeKind,
    RelPath, SymlinkTarget,
};
use syncd_proto::*;
use syncd_transport::{Conn, Endpoint, Identity, RecvStream, SendStream, TransportError};

/// A manager impostor with a real identity that the agent under test is configured to trust.
struct FakeManager {
    endpoint: Endpoint,
    identity: Identity,
    _dir: tempfile::TempDir,
}

impl FakeManager {
    fn new(agent: &Identity) -> FakeManager {
        syncd_transport::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let identity = Identity::create(dir.path()).unwrap();
        let allowed = HashMap::from([(agent.id(), "worker-1".to_owned())]);
        let endpoint =
            Endpoint::server(&identity, allowed, "127.0.0.1:0".parse().unwrap()).unwrap();
        FakeManager {
            endpoint,
            identity,
            _dir: dir,
        }
    }

    /// Accepts the agent, completes hello and join, sends Welcome.
    async fn accept(&self, hello: Hello) -> (Conn, SendStream, RecvStream) {
        let conn = self
            .endpoint
            .accept()
            .await
            .unwrap()
            .accept()
            .await
            .unwrap();
        let (mut tx, mut rx) = conn.accept_bi().await.unwrap();
        let mut theirs = [0u8; HELLO_LEN];
        rx.read_exact(&mut theirs).await.unwrap();
        tx.write_all(&hello.encode()).await.unwrap();
        if hello != Hello::OURS {
            return (conn, tx, rx);
        }
        let join: AgentMsg = rx.expect(MAX_REQUEST_FRAME).await.unwrap();
        assert!(matches!(join, AgentMsg::Join { .. }));
        tx.send(
            &ManagerMsg::Welcome {
                manager_name: "fake".into(),
                software: "0".into(),
                folders: vec![FOLDER.into()],
            },
            MAX_CONTROL_FRAME,
        )
        .await
        .unwrap();
        // The agent says whether it is paused before anything is sent to it.
        let state: AgentMsg = rx.expect(MAX_REQUEST_FRAME).await.unwrap();
        assert!(
            matches!(state, AgentMsg::PauseState { pause: None, .. }),
            "{state:?}"
        );
        // And which local changes it left in place (none here).
        let drift: AgentMsg = rx.expect(MAX_REQUEST_FRAME).await.unwrap();
        assert!(
            matches!(&drift, AgentMsg::Drift { entries, .. } if entries.is_empty()),
            "{drift:?}"
        );
        (conn, tx, rx)
    }
}

async fn agent_of(fake: &FakeManager, dirs: NodeDirs) -> TestAgent {
    TestAgent::start_with(
        "worker-1",
        dirs,
        fake.endpoint.local_addr().unwrap(),
        fake.identity.id(),
    )
    .await
}

/// A test layout: the agent's folder sits inside `outer`, which must stay untouched.
fn agent_dirs() -> NodeDirs {
    let dirs = NodeDirs::new();
    fs::write(dirs.tmp.path().join("outside-marker"), b"untouched").unwrap();
    dirs
}

fn assert_nothing_written(dirs: &NodeDirs) {
    assert_eq!(
        fs::read_dir(&dirs.data).unwrap().count(),
        0,
        "the folder must stay empty"
    );
    let outer: Vec<String> = fs::read_dir(dirs.tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut outer = outer;
    outer.sort();
    assert_eq!(
        outer,
        ["data", "outside-marker", "state"],
        "nothing written beside the folder"
    );
    assert_eq!(
        fs::read(dirs.tmp.path().join("outside-marker")).unwrap(),
        b"untouched"
    );
}

fn update_header(target: syncd_manifest::ManifestDigest) -> ManagerMsg {
    ManagerMsg::Update {
        generation: Generation(1),
        folder: FOLDER.into(),
        params: ChunkParams::DEFAULT,
        base: Base::Full,
        target,
    }
}

/// Mirrors of the wire enums with plain strings where `RelPath`s go: what a hostile peer can send.
#[derive(Serialize)]
enum RawChange {
    Put(String, Node),
}

#[derive(Serialize)]
enum RawManagerMsg {
    _Welcome,
    _Update,
    Changes(Vec<RawChange>),
}

fn file_node(data: &[u8]) -> Node {
    file_node_in_chunks(data, data.len().max(1))
}

/// A file of `data` cut into chunks of `chunk` bytes (the last one shorter).
fn file_node_in_chunks(data: &[u8], chunk: usize) -> Node {
    let chunks: Vec<ChunkRef> = data
        .chunks(chunk)
        .map(|c| ChunkRef {
            hash: ChunkHash::of(c),
            len: c.len() as u32,
        })
        .collect();
    Node {
        kind: NodeKind::File(FileContent {
            size: data.len() as u64,
            hash: FileHash::from_chunks(data.len() as u64, chunks.iter().map(|c| &c.hash)),
            chunks: chunks.into(),
        }),
        mode: 0o644,
        mtime: Mtime { secs: 1, nanos: 0 },
    }
}

async fn closed_reason(conn: &Conn) -> (u32, String) {
    match tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .unwrap()
    {
        TransportError::Closed { code, reason, .. } => (code, reason),
        other => panic!("expected an application close, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_that_escape_are_refused_and_the_connection_closed() {
    for bad in [
        "../escape",
        "/etc/passwd-syncd-test",
        "a/../../x",
        "a//b",
        "evil\0name",
    ] {
        let dirs = agent_dirs();
        let fake = FakeManager::new(&dirs.identity());
        let mut agent = agent_of(&fake, dirs).await;
        let (conn, mut tx, _rx) = fake.accept(Hello::OURS).await;
        tx.send(
            &update_header(Manifest::default().digest()),
            MAX_CONTROL_FRAME,
        )
        .await
        .unwrap();
        let crafted =
            RawManagerMsg::Changes(vec![RawChange::Put(bad.into(), file_node(b"payload"))]);
        tx.send(&crafted, MAX_CONTROL_FRAME).await.unwrap();
        let (code, reason) = closed_reason(&conn).await;
        assert_eq!(code, close::PROTOCOL_ERROR, "{bad}: {reason}");
        assert!(reason.contains("malformed"), "{bad}: {reason}");
        assert!(!std::path::Path::new("/etc/passwd-syncd-test").exists());
        let dirs = {
            let st = wait_for(&mut agent.status, Duration::from_secs(5), |s| {
                s.last_error.is_some()
            })
            .await
            .unwrap();
            assert_eq!(st.applied.0, 0);
            agent.stop().await
        };
        assert_nothing_written(&dirs);
    }
}

/// Sends a whole (well-formed) generation and returns the agent's verdict.
async fn send_generation(
    tx: &mut SendStream,
    rx: &mut RecvStream,
    manifest: &Manifest,
) -> AgentMsg {
    send_generation_with(tx, rx, manifest, &[]).await
}

/// Sends `manifest` as generation 1, with `extra` messages before its end, and returns the
/// agent's verdict.
async fn send_generation_with(
    tx: &mut SendStream,
    rx: &mut RecvStream,
    manifest: &Manifest,
    extra: &[ManagerMsg],
) -> AgentMsg {
    tx.send(&update_header(manifest.digest()), MAX_CONTROL_FRAME)
        .await
        .unwrap();
    let changes: Vec<RawChange> = manifest
        .iter()
        .map(|(p, n)| RawChange::Put(p.as_str().to_owned(), n.clone()))
        .collect();
    tx.send(&RawManagerMsg::Changes(changes), MAX_CONTROL_FRAME)
        .await
        .unwrap();
    for msg in extra {
        tx.send(msg, MAX_CONTROL_FRAME).await.unwrap();
    }
    tx.send(
        &ManagerMsg::UpdateEnd {
            generation: Generation(1),
        },
        MAX_CONTROL_FRAME,
    )
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx.expect(MAX_REQUEST_FRAME))
        .await
        .unwrap()
        .unwrap()
}

fn p(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

fn dir_node() -> Node {
    Node {
        kind: NodeKind::Dir,
        mode: 0o755,
        mtime: Mtime { secs: 1, nanos: 0 },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_out_of_the_folder_and_files_through_links_are_refused() {
    let link = |t: &str| Node {
        kind: NodeKind::Symlink(SymlinkTarget::new(t).unwrap()),
        mode: 0o777,
        mtime: Mtime { secs: 1, nanos: 0 },
    };
    let cases: Vec<(&str, Manifest)> = vec![
        (
            "absolute link target",
            [(p("lib"), link("/etc"))].into_iter().collect(),
        ),
        (
            "relative link climbing out",
            [(p("a"), dir_node()), (p("a/lib"), link("../../outside"))]
                .into_iter()
                .collect(),
        ),
        (
            "a file through a link",
            [
                (p("lib"), link("sub")),
                (p("sub"), dir_node()),
                (p("lib/x.car"), file_node(b"x")),
            ]
            .into_iter()
            .collect(),
        ),
        ("a file whose chunk list lies about its size", {
            let mut n = file_node(b"hello");
            if let NodeKind::File(f) = &mut n.kind {
                f.size = 1 << 40;
            }
            [(p("x.car"), n)].into_iter().collect()
        }),
    ];
    for (what, manifest) in cases {
        let dirs = agent_dirs();
        let fake = FakeManager::new(&dirs.identity());
        let agent = agent_of(&fake, dirs).await;
        let (_conn, mut tx, mut rx) = fake.accept(Hello::OURS).await;
        let verdict = send_generation(&mut tx, &mut rx, &manifest).await;
        let AgentMsg::Failed { reason, .. } = verdict else {
            panic!("{what}: accepted: {verdict:?}")
        };
        assert!(reason.contains("refusing the update"), "{what}: {reason}");
        let dirs = agent.stop().await;
        assert_nothing_written(&dirs);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_that_does_not_match_its_hash_is_never_written() {
    served_chunk_is_refused(5, b"HELLO", "does not match its hash").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_chunk_shorter_than_the_chunk_is_never_written() {
    served_chunk_is_refused(3, b"hel", "raw chunk of 3 bytes where 5 were expected").await;
}

/// A large file's chunks are read from the network straight into the buffer of its direct
/// writes and checked there: one that does not match its hash is never written either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_chunk_of_a_large_file_is_never_written() {
    const CHUNK: usize = 200_000;
    // Past the size from which the agent writes directly (1 MiB).
    let data: Vec<u8> = (0..6 * CHUNK).map(|i| (i * 7 % 251) as u8).collect();
    let dirs = agent_dirs();
    let fake = FakeManager::new(&dirs.identity());
    let agent = agent_of(&fake, dirs).await;
    let (conn, mut tx, mut rx) = fake.accept(Hello::OURS).await;
    let manifest: Manifest = [(p("app.war"), file_node_in_chunks(&data, CHUNK))]
        .into_iter()
        .collect();
    let serve = {
        let conn = conn.clone();
        let data = data.clone();
        tokio::spawn(async move {
            let (mut ftx, mut frx) = conn.accept_bi().await.unwrap();
            let req: FetchRequest = frx.expect(MAX_REQUEST_FRAME).await.unwrap();
            assert_eq!(req.files.len(), 1);
            assert_eq!(req.files[0].chunks, [0, 1, 2, 3, 4, 5]);
            // The first chunk as it is, the second with one byte changed.
            for (i, chunk) in data.chunks(CHUNK).take(2).enumerate() {
                let mut bytes = chunk.to_vec();
                if i == 1 {
                    bytes[CHUNK / 2] ^= 1;
                }
                let reply = FetchReply::Chunk {
                    len: CHUNK as u32,
                    encoding: ChunkEncoding::Raw,
                };
                // The agent stops reading after the bad chunk: later writes may fail.
                if ftx.send(&reply, MAX_CONTROL_FRAME).await.is_err()
                    || ftx.write_all(&bytes).await.is_err()
                {
                    return;
                }
            }
            ftx.finish();
        })
    };
    let verdict = send_generation(&mut tx, &mut rx, &manifest).await;
    serve.await.unwrap();
    let AgentMsg::Failed { reason, .. } = verdict else {
        panic!("accepted: {verdict:?}")
    };
    assert!(reason.contains("does not match its hash"), "{reason}");
    let dirs = agent.stop().await;
    assert_nothing_written(&dirs);
}

/// Answers the agent's one fetch request, which must be for `path` alone, with `bytes` as a raw
/// chunk of `len` bytes.
fn serve_one_fetch(
    conn: &Conn,
    path: &'static str,
    len: u32,
    bytes: &'static [u8],
) -> tokio::task::JoinHandle<()> {
    let conn = conn.clone();
    tokio::spawn(async move {
        let (mut ftx, mut frx) = conn.accept_bi().await.unwrap();
        let req: FetchRequest = frx.expect(MAX_REQUEST_FRAME).await.unwrap();
        let paths: Vec<&str> = req.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, [path]);
        ftx.send(
            &FetchReply::Chunk {
                len,
                encoding: ChunkEncoding::Raw,
            },
            MAX_CONTROL_FRAME,
        )
        .await
        .unwrap();
        ftx.write_all(bytes).await.unwrap();
        ftx.finish();
    })
}

/// The agent asks for `a.xml` ("hello"), is served `bytes` as a raw chunk of `len` bytes, and
/// must refuse the generation for `why` without writing anything.
async fn served_chunk_is_refused(len: u32, bytes: &'static [u8], why: &str) {
    let dirs = agent_dirs();
    let fake = FakeManager::new(&dirs.identity());
    let agent = agent_of(&fake, dirs).await;
    let (conn, mut tx, mut rx) = fake.accept(Hello::OURS).await;
    let manifest: Manifest = [(p("a.xml"), file_node(b"hello"))].into_iter().collect();
    let serve = serve_one_fetch(&conn, "a.xml", len, bytes);
    let verdict = send_generation(&mut tx, &mut rx, &manifest).await;
    serve.await.unwrap();
    let AgentMsg::Failed { reason, .. } = verdict else {
        panic!("accepted: {verdict:?}")
    };
    assert!(reason.contains(why), "{reason}");
    let dirs = agent.stop().await;
    assert_nothing_written(&dirs);
}

/// Chunks pushed inside an update are checked like fetched ones: one that does not decode to
/// its hash is not written, and the chunk is fetched instead; one that does is not fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_chunk_that_does_not_match_its_hash_is_fetched_instead() {
    let dirs = agent_dirs();
    let fake = FakeManager::new(&dirs.identity());
    let agent = agent_of(&fake, dirs).await;
    let (conn, mut tx, mut rx) = fake.accept(Hello::OURS).await;
    let manifest: Manifest = [
        (p("a.xml"), file_node(b"hello")),
        (p("b.xml"), file_node(b"world")),
    ]
    .into_iter()
    .collect();
    // Only the chunk pushed wrong is fetched.
    let serve = serve_one_fetch(&conn, "b.xml", 5, b"world");
    let pushed: Vec<ManagerMsg> = [(&b"hello"[..], &b"hello"[..]), (b"world", b"WORLD")]
        .into_iter()
        .map(|(chunk, sent)| {
            ManagerMsg::Pushed(PushedChunk {
                hash: ChunkHash::of(chunk),
                len: 5,
                encoding: ChunkEncoding::Raw,
                base: None,
                data: sent.to_vec(),
            })
        })
        .collect();
    let verdict = send_generation_with(&mut tx, &mut rx, &manifest, &pushed).await;
    serve.await.unwrap();
    assert!(matches!(verdict, AgentMsg::Applied { .. }), "{verdict:?}");
    let stats = agent.stats();
    assert_eq!(
        (stats.bytes_fetched, stats.bytes_pushed),
        (10, 5),
        "{stats:?}"
    );
    let dirs = agent.stop().await;
    assert_eq!(fs::read(dirs.data.join("a.xml")).unwrap(), b"hello");
    assert_eq!(fs::read(dirs.data.join("b.xml")).unwrap(), b"world");
}

/// A pushed chunk longer than any chunk (or carried in more bytes than it has) is a protocol
/// violation: the connection is closed and nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_chunk_larger_than_a_chunk_closes_the_connection() {
    let dirs = agent_dirs();
    let fake = FakeManager::new(&dirs.identity());
    let agent = agent_of(&fake, dirs).await;
    let (conn, mut tx, _rx) = fake.accept(Hello::OURS).await;
    let manifest: Manifest = [(p("a.xml"), file_node(b"hello"))].into_iter().collect();
    tx.send(&update_header(manifest.digest()), MAX_CONTROL_FRAME)
        .await
        .unwrap();
    let pushed = ManagerMsg::Pushed(PushedChunk {
        hash: ChunkHash::of(b"hello"),
        len: 5,
        encoding: ChunkEncoding::Raw,
        base: None,
        data: b"hello, and more".to_vec(),
    });
    tx.send(&pushed, MAX_CONTROL_FRAME).await.unwrap();
    let (_, reason) = closed_reason(&conn).await;
    assert!(
        reason.contains("pushed chunk of 5 bytes carried in 15 bytes"),
        "{reason}"
    );
    let dirs = agent.stop().await;
    assert_nothing_written(&dirs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_length_prefix_closes_the_connection_before_any_allocation() {
    // Against the agent.
    let dirs = agent_dirs();
    let fake = FakeManager::new(&dirs.identity());
    let agent = agent_of(&fake, dirs).await;
    let (conn, mut tx, _rx) = fake.accept(Hello::OURS).await;
    tx.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    let (code, reason) = closed_reason(&conn).await;
    assert_eq!(code, close::PROTOCOL_ERROR);
    assert!(reason.contains("exceeds the limit"), "{reason}");
    let dirs = agent.stop().await;
    assert_nothing_written(&dirs);

    // Against the manager, which then keeps serving a well-behaved agent.
    let mdirs = NodeDirs::new();
    fs::write(mdirs.data.join("x.xml"), b"<x/>").unwrap();
    let good = NodeDirs::new();
    let bad = NodeDirs::new();
    let bad_identity = bad.identity();
    let manager = TestManager::start(
        mdirs,
        &[
            ("worker-1", good.identity().id()),
            ("worker-2", bad_identity.id()),
        ],
    )
    .await;
    let client = Endpoint::client(&bad_identity, manager.addr).unwrap();
    let conn = client
        .connect(&bad_identity, manager.addr, manager.id)
        .await
        .unwrap();
    let (mut tx, mut rx) = conn.open_bi().await.unwrap();
    tx.write_all(&Hello::OURS.encode()).await.unwrap();
    let mut hello = [0u8; HELLO_LEN];
    rx.read_exact(&mut hello).await.unwrap();
    tx.write_all(&0xFFFF_FFF0u32.to_le_bytes()).await.unwrap();
    let (code, reason) = closed_reason(&conn).await;
    assert_eq!(code, close::PROTOCOL_ERROR);
    assert!(reason.contains("exceeds the limit"), "{reason}");
    let mut agent = TestAgent::start("worker-1", good, &manager).await;
    agent.wait_applied(manager.generation()).await;
    assert_same_tree(&manager.dirs.data, &agent.dirs.data);
    agent.stop().await;
    manager.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_version_mismatch_is_refused_naming_both_versions() {
    // A manager from the future.
    let dirs = agent_dirs();
    let fake = FakeManager::new(&dirs.identity());
    let mut agent = agent_of(&fake, dirs).await;
    let (conn, _tx, _rx) = fake.accept(Hello { min: 9, max: 9 }).await;
    let (code, reason) = closed_reason(&conn).await;
    assert_eq!(code, close::VERSION_MISMATCH);
    assert_eq!(
        reason,
        format!(
            "protocol version mismatch: we speak {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}, the peer speaks 9..=9"
        )
    );
    let st = wait_for(&mut agent.status, Duration::from_secs(5), |s| {
        s.last_error.is_some()
    })
    .await
    .unwrap();
    assert!(st.last_error.unwrap().contains("version mismatch"));
    let dirs = agent.stop().await;
    assert_nothing_written(&dirs);

    // An agent from the future.
    let mdirs = NodeDirs::new();
    let adirs = NodeDirs::new();
    let identity = adirs.identity();
    let manager = TestManager::start(mdirs, &[("worker-1", identity.id())]).await;
    let client = Endpoint::client(&identity, manager.addr).unwrap();
    let conn = client
        .connect(&identity, manager.addr, manager.id)
        .await
        .unwrap();
    let (mut tx, mut rx) = conn.open_bi().await.unwrap();
    tx.write_all(
        &Hello {
            min: PROTOCOL_VERSION + 1,
            max: PROTOCOL_VERSION + 1,
        }
        .encode(),
    )
    .await
    .unwrap();
    // The manager's own hello may or may not arrive before its close; the close says it all.
    let mut hello = [0u8; HELLO_LEN];
    if rx.read_exact(&mut hello).await.is_ok() {
        assert_eq!(Hello::decode(&hello).unwrap(), Hello::OURS);
    }
    let (code, reason) = closed_reason(&conn).await;
    assert_eq!(code, close::VERSION_MISMATCH);
    assert_eq!(
        reason,
        format!(
            "agent \"worker-1\": protocol version mismatch: we speak {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}, the peer speaks {0}..={0}",
            PROTOCOL_VERSION + 1
        )
    );
    manager.stop().await;
}

/// A manager over `mdirs` that knows two agents, worker-1 and worker-2, and their directories.
async fn manager_with_two_workers(mdirs: NodeDirs) -> (TestManager, NodeDirs, NodeDirs) {
    let w1 = NodeDirs::new();
    let w2 = NodeDirs::new();
    let manager = TestManager::start(
        mdirs,
        &[
            ("worker-1", w1.identity().id()),
            ("worker-2", w2.identity().id()),
        ],
    )
    .await;
    (manager, w1, w2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_claiming_another_agents_name_is_refused() {
    let mdirs = NodeDirs::new();
    let (manager, _w1, w2) = manager_with_two_workers(mdirs).await;
    // worker-2's identity, calling itself worker-1.
    let mut agent = TestAgent::start("worker-1", w2, &manager).await;
    let st = wait_for(&mut agent.status, Duration::from_secs(10), |s| {
        s.last_error.is_some()
    })
    .await
    .unwrap();
    let err = st.last_error.unwrap();
    assert!(err.contains("configured as agent \"worker-2\""), "{err}");
    assert!(!manager.status.borrow().agents["worker-1"].connected);
    agent.stop().await;
    manager.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_stream_of_changes_is_cut_off_at_its_bound() {
    let dirs = agent_dirs();
    let fake = FakeManager::new(&dirs.identity());
    let mut agent = agent_of(&fake, dirs).await;
    let (conn, mut tx, _rx) = fake.accept(Hello::OURS).await;
    tx.send(
        &update_header(Manifest::default().digest()),
        MAX_CONTROL_FRAME,
    )
    .await
    .unwrap();
    // Pages of valid removals, forever: the agent must refuse once the update passes its bound,
    // not keep allocating.
    let page: Vec<RawChange> = (0..10_000)
        .map(|i| RawChange::Put(format!("f{i}"), file_node(b"x")))
        .collect();
    let frame = RawManagerMsg::Changes(page);
    let mut sent = 0usize;
    let closed = loop {
        if tx.send(&frame, MAX_CONTROL_FRAME).await.is_err() {
            break true;
        }
        sent += 10_000;
        if sent > 3 * MAX_UPDATE_ITEMS {
            break false;
        }
    };
    assert!(closed, "the agent accepted {sent} changes");
    // The agent's verdict is its own record of why it ended the session. Its CONNECTION_CLOSE
    // usually reaches us too, but quinn 0.11 holds a close behind congestion control while the
    // closing side still has unsent stream data (quinn-rs/quinn#2785) and we are flooding: the
    // close may never leave, the agent forgets the connection after its draining period and
    // answers what we still send with a stateless reset, which is a correct end as well.
    match tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .unwrap()
    {
        TransportError::Closed { code, reason, .. } => {
            assert_eq!(code, close::PROTOCOL_ERROR);
            assert!(reason.contains("exceeds"), "{reason}");
        }
        TransportError::Lost(why) if why.contains("reset") => {}
        other => panic!("expected an application close or a reset, got {other}"),
    }
    let st = wait_for(&mut agent.status, Duration::from_secs(5), |s| {
        s.last_error.is_some()
    })
    .await
    .unwrap();
    let err = st.last_error.unwrap();
    assert!(err.contains("exceeds"), "{err}");
    assert_eq!(st.applied.0, 0);
    let dirs = agent.stop().await;
    assert_nothing_written(&dirs);
}

/// An agent impostor: worker-1's real identity, speaking the protocol by hand.
/// Returns the control stream too: the manager ends a session whose control stream is gone.
async fn fake_agent(
    manager: &TestManager,
    identity: &Identity,
) -> (Endpoint, Conn, SendStream, RecvStream) {
    let endpoint = Endpoint::client(identity, manager.addr).unwrap();
    let conn = endpoint
        .connect(identity, manager.addr, manager.id)
        .await
        .unwrap();
    let (mut tx, mut rx) = conn.open_bi().await.unwrap();
    tx.write_all(&Hello::OURS.encode()).await.unwrap();
    let mut theirs = [0u8; HELLO_LEN];
    rx.read_exact(&mut theirs).await.unwrap();
    tx.send(
        &AgentMsg::Join {
            node_name: "worker-1".into(),
            software: "0".into(),
            applied: Generation(0),
            folders: vec![],
        },
        MAX_REQUEST_FRAME,
    )
    .await
    .unwrap();
    let welcome: ManagerMsg = rx.expect(MAX_CONTROL_FRAME).await.unwrap();
    assert!(matches!(welcome, ManagerMsg::Welcome { .. }), "{welcome:?}");
    (endpoint, conn, tx, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_of_chunks_that_do_not_exist_are_refused_and_the_manager_serves_on() {
    let mdirs = NodeDirs::new();
    fs::write(mdirs.data.join("empty.xml"), b"").unwrap();
    fs::write(mdirs.data.join("a.xml"), b"<api name=\"a\"/>").unwrap();
    let (manager, w1, w2) = manager_with_two_workers(mdirs).await;
    // The version the manager published: small files are one chunk (none when empty).
    let published = |path: &str| {
        let data = fs::read(manager.dirs.data.join(path)).unwrap();
        let chunks: Vec<ChunkHash> = (!data.is_empty())
            .then(|| ChunkHash::of(&data))
            .into_iter()
            .collect();
        FileHash::from_chunks(data.len() as u64, chunks.iter())
    };
    let identity = w1.identity();
    for (folder, path, chunks, expected) in [
        // An empty file has no chunk 0 (this once panicked the serving task).
        (FOLDER, "empty.xml", vec![0], "empty.xml: no chunk 0"),
        (FOLDER, "a.xml", vec![0, 5], "a.xml: no chunk 5"),
        (
            FOLDER,
            "a.xml",
            vec![u32::MAX],
            "a.xml: no chunk 4294967295",
        ),
        (
            "elsewhere",
            "a.xml",
            vec![0],
            "fetch from unknown folder \"elsewhere\"",
        ),
    ] {
        let (_endpoint, conn, _control_tx, _control_rx) = fake_agent(&manager, &identity).await;
        let (mut tx, _rx) = conn.open_bi().await.unwrap();
        tx.send(
            &FetchRequest {
                folder: folder.into(),
                files: vec![FetchFile {
                    path: RelPath::new(path).unwrap(),
                    hash: published(path),
                    chunks,
                    base: None,
                }],
            },
            MAX_REQUEST_FRAME,
        )
        .await
        .unwrap();
        // The close usually reaches the impostor; at times it is answered with a stateless
        // reset instead (see the endless-changes test). The manager's status says why either way.
        match tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .unwrap()
        {
            TransportError::Closed { code, reason, .. } => {
                assert_eq!(code, close::PROTOCOL_ERROR, "{reason}");
                assert_eq!(reason, expected);
            }
            TransportError::Lost(why) if why.contains("reset") => {}
            other => panic!("expected an application close or a reset, got {other}"),
        }
        let mut status = manager.status.clone();
        let st = wait_for(&mut status, Duration::from_secs(5), |s| {
            s.agents["worker-1"]
                .last_error
                .as_deref()
                .is_some_and(|e| e.ends_with(expected))
        })
        .await
        .unwrap_or_else(|s| panic!("{:?}", s.agents["worker-1"]));
        assert_eq!(
            st.agents["worker-1"].last_error.as_deref(),
            Some(format!("connection closed by us: {expected}").as_str())
        );
    }
    // The manager is still up and serves a real agent the whole folder.
    let mut agent = TestAgent::start("worker-2", w2, &manager).await;
    let generation = manager.status.borrow().generation.0;
    agent.wait_applied(generation).await;
    assert_same_tree(&manager.dirs.data, &agent.dirs.data);
    agent.stop().await;
    manager.stop().await;
}
