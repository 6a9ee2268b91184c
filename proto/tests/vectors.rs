//! Golden encodings of every message, and encode/decode round trips.
//!
//! bincode is not self-describing: reordering a field or a variant silently changes the wire.
//! These vectors make any such change fail here. To accept a deliberate change (with a protocol
//! version bump), run with `SYNCD_UPDATE_VECTORS=1` and commit the new files.

use std::path::PathBuf;

use proptest::prelude::*;
use syncd_manifest::{
    Change, ChunkHash, ChunkParams, ChunkRef, FileContent, FileHash, ManifestDigest, Mtime, Node,
    NodeKind, RelPath, SymlinkTarget,
};
use syncd_proto::*;

fn file_node(data: &[&[u8]]) -> Node {
    let chunks: Vec<ChunkRef> = data
        .iter()
        .map(|d| ChunkRef {
            hash: ChunkHash::of(d),
            len: d.len() as u32,
        })
        .collect();
    let size = chunks.iter().map(|c| c.len as u64).sum();
    Node {
        kind: NodeKind::File(FileContent {
            size,
            hash: FileHash::from_chunks(size, chunks.iter().map(|c| &c.hash)),
            chunks: chunks.into(),
        }),
        mode: 0o644,
        mtime: Mtime {
            secs: 1_700_000_000,
            nanos: 123_456_789,
        },
    }
}

fn p(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

fn samples() -> Vec<(&'static str, Vec<u8>)> {
    let digest = ManifestDigest([7; 32]);
    let frame = |m: &dyn erased::Enc| m.frame();
    vec![
        (
            "agent_join",
            frame(&AgentMsg::Join {
                node_name: "worker-1".into(),
                software: "0.1.0".into(),
                applied: Generation(41),
                folders: vec![FolderState {
                    folder: "deployment".into(),
                    digest,
                }],
            }),
        ),
        (
            "agent_applied",
            frame(&AgentMsg::Applied {
                generation: Generation(42),
                folders: vec![],
            }),
        ),
        (
            "agent_failed",
            frame(&AgentMsg::Failed {
                generation: Generation(42),
                reason: "disk full".into(),
                folders: vec![],
            }),
        ),
        (
            "agent_pause_state",
            frame(&AgentMsg::PauseState {
                pause: Some(Pause {
                    until: Some(1_800_000_000),
                    set_at: 1_790_000_000_123,
                    by: "manager".into(),
                }),
                set_at: 1_790_000_000_123,
                folders: vec![],
            }),
        ),
        (
            "agent_drift",
            frame(&AgentMsg::Drift {
                entries: vec![DriftEntry {
                    folder: "deployment".into(),
                    path: "synapse-configs/default/api/a.xml".into(),
                    change: "modified".into(),
                    action: "flapping".into(),
                }],
                reverted_total: 3,
            }),
        ),
        (
            "agent_deferred",
            frame(&AgentMsg::Deferred {
                generation: Generation(43),
            }),
        ),
        (
            "manager_set_pause",
            frame(&ManagerMsg::SetPause {
                pause: None,
                set_at: 1_790_000_000_456,
            }),
        ),
        (
            "manager_pushed",
            frame(&ManagerMsg::Pushed(PushedChunk {
                hash: ChunkHash::of(b"<api name=\"orders\"/>"),
                len: 21,
                encoding: ChunkEncoding::ZstdWithBase,
                base: Some(ChunkHash::of(b"<api name=\"order\"/>")),
                data: vec![0x28, 0xb5, 0x2f, 0xfd, 0x20, 0x15, 0x01],
            })),
        ),
        (
            "manager_welcome",
            frame(&ManagerMsg::Welcome {
                manager_name: "mgr-1".into(),
                software: "0.1.0".into(),
                folders: vec!["deployment".into(), "tenants".into()],
            }),
        ),
        (
            "manager_update_delta",
            frame(&ManagerMsg::Update {
                generation: Generation(42),
                folder: "deployment".into(),
                params: ChunkParams::DEFAULT,
                base: Base::Delta { from: digest },
                target: ManifestDigest([9; 32]),
            }),
        ),
        (
            "manager_update_full",
            frame(&ManagerMsg::Update {
                generation: Generation(1),
                folder: "deployment".into(),
                params: ChunkParams::DEFAULT,
                base: Base::Full,
                target: ManifestDigest([9; 32]),
            }),
        ),
        (
            "manager_changes",
            frame(&ManagerMsg::Changes(vec![
                Change::Put(
                    p("carbonapps"),
                    Node {
                        kind: NodeKind::Dir,
                        mode: 0o755,
                        mtime: Mtime { secs: 5, nanos: 0 },
                    },
                ),
                Change::Put(p("carbonapps/a.car"), file_node(&[b"PK\x03\x04", b"rest"])),
                Change::Put(
                    p("lib"),
                    Node {
                        kind: NodeKind::Symlink(SymlinkTarget::new("carbonapps").unwrap()),
                        mode: 0o777,
                        mtime: Mtime { secs: -1, nanos: 1 },
                    },
                ),
                Change::Remove(p("old.xml")),
            ])),
        ),
        (
            "manager_more_chunks",
            frame(&ManagerMsg::MoreChunks(vec![ChunkRef {
                hash: ChunkHash::of(b"x"),
                len: 1,
            }])),
        ),
        (
            "manager_update_end",
            frame(&ManagerMsg::UpdateEnd {
                generation: Generation(42),
            }),
        ),
        (
            "fetch_request",
            frame(&FetchRequest {
                folder: "deployment".into(),
                files: vec![FetchFile {
                    path: p("webapps/x.war"),
                    hash: FileHash([3; 32]),
                    chunks: vec![0, 5, 300],
                    base: Some(ChunkHash([4; 32])),
                }],
            }),
        ),
        (
            "fetch_reply_chunk",
            frame(&FetchReply::Chunk {
                len: 65536,
                encoding: ChunkEncoding::Raw,
            }),
        ),
        (
            "fetch_reply_chunk_zstd",
            frame(&FetchReply::Chunk {
                len: 1234,
                encoding: ChunkEncoding::Zstd,
            }),
        ),
        (
            "fetch_reply_chunk_zstd_with_base",
            frame(&FetchReply::Chunk {
                len: 99,
                encoding: ChunkEncoding::ZstdWithBase,
            }),
        ),
        (
            "manager_patched",
            frame(&ManagerMsg::Patched(PatchedPut {
                path: p("webapps/x.war"),
                mode: 0o644,
                mtime: Mtime { secs: 7, nanos: 8 },
                size: 70_000,
                hash: FileHash([5; 32]),
                from: FileHash([6; 32]),
                ops: vec![
                    ListOp::New(vec![ChunkRef {
                        hash: ChunkHash([7; 32]),
                        len: 1000,
                    }]),
                    ListOp::Copy { start: 1, len: 2 },
                    ListOp::Inline(vec![3, 2]),
                ],
                inline: vec![1, 2, 3, 4, 5],
            })),
        ),
        (
            "fetch_reply_gone",
            frame(&FetchReply::Gone {
                path: p("webapps/x.war"),
                reason: "changed since".into(),
            }),
        ),
    ]
}

/// Lets the sample table hold messages of different types.
mod erased {
    pub trait Enc {
        fn frame(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Enc for T {
        fn frame(&self) -> Vec<u8> {
            syncd_proto::encode_frame(self, syncd_proto::MAX_CONTROL_FRAME).unwrap()
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::new();
    for line in bytes.chunks(32) {
        for b in line {
            s.push_str(&format!("{b:02x}"));
        }
        s.push('\n');
    }
    s
}

#[test]
fn encodings_match_the_golden_vectors() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors");
    let update = std::env::var_os("SYNCD_UPDATE_VECTORS").is_some();
    let mut mismatches = Vec::new();
    for (name, bytes) in samples() {
        let path = dir.join(format!("{name}.hex"));
        if update {
            std::fs::write(&path, hex(&bytes)).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("{}: {e} (run with SYNCD_UPDATE_VECTORS=1)", path.display())
        });
        if want != hex(&bytes) {
            mismatches.push(name);
        }
    }
    assert!(
        mismatches.is_empty(),
        "wire encoding changed for {mismatches:?}: bump PROTOCOL_VERSION and update the vectors"
    );
}

#[test]
fn golden_vectors_decode_back() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors");
    let text = std::fs::read_to_string(dir.join("manager_changes.hex")).unwrap();
    let bytes: Vec<u8> = text
        .split_whitespace()
        .flat_map(|l| {
            (0..l.len())
                .step_by(2)
                .map(move |i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
        })
        .collect();
    let len = frame_len(bytes[..4].try_into().unwrap(), MAX_CONTROL_FRAME).unwrap();
    let msg: ManagerMsg = decode(&bytes[4..4 + len]).unwrap();
    let ManagerMsg::Changes(changes) = msg else {
        panic!("{msg:?}")
    };
    assert_eq!(changes.len(), 4);
    assert_eq!(changes[3], Change::Remove(p("old.xml")));
}

#[test]
fn a_path_with_dotdot_does_not_decode() {
    // Encode a message with a plain string where a RelPath goes, as a hostile peer would.
    #[derive(serde::Serialize)]
    enum FakeChange {
        #[allow(dead_code)]
        Put,
        Remove(String),
    }
    #[derive(serde::Serialize)]
    enum FakeManagerMsg {
        #[allow(dead_code)]
        Welcome,
        #[allow(dead_code)]
        Update,
        Changes(Vec<FakeChange>),
    }
    for bad in ["../../etc/passwd", "/etc/passwd", "a//b", "a/\0"] {
        let frame = encode_frame(
            &FakeManagerMsg::Changes(vec![FakeChange::Remove(bad.into())]),
            1 << 20,
        )
        .unwrap();
        let err = decode::<ManagerMsg>(&frame[4..]).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed(_)), "{bad}: {err}");
    }
}

fn arb_path() -> impl Strategy<Value = RelPath> {
    prop::collection::vec("[a-zA-Z0-9._ -]{1,12}", 1..4)
        .prop_filter_map("dot components", |v| RelPath::new(v.join("/")).ok())
}

fn arb_change() -> impl Strategy<Value = Change> {
    prop_oneof![
        arb_path().prop_map(Change::Remove),
        (
            arb_path(),
            prop::collection::vec(prop::collection::vec(any::<u8>(), 1..40), 0..5)
        )
            .prop_map(|(path, chunks)| {
                let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
                Change::Put(path, file_node(&refs))
            }),
    ]
}

proptest! {
    #[test]
    fn manager_messages_round_trip(changes in prop::collection::vec(arb_change(), 0..20), g in any::<u64>()) {
        for msg in [ManagerMsg::Changes(changes), ManagerMsg::UpdateEnd { generation: Generation(g) }] {
            let frame = encode_frame(&msg, MAX_CONTROL_FRAME).unwrap();
            let back: ManagerMsg = decode(&frame[4..]).unwrap();
            prop_assert_eq!(back, msg);
        }
    }

    #[test]
    fn agent_messages_round_trip(name in ".{0,40}", reason in ".{0,100}", g in any::<u64>()) {
        for msg in [
            AgentMsg::Join { node_name: name.clone(), software: "x".into(), applied: Generation(g), folders: vec![] },
            AgentMsg::Failed { generation: Generation(g), reason, folders: vec![] },
        ] {
            let frame = encode_frame(&msg, MAX_REQUEST_FRAME).unwrap();
            let back: AgentMsg = decode(&frame[4..]).unwrap();
            prop_assert_eq!(back, msg);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode::<ManagerMsg>(&bytes);
        let _ = decode::<AgentMsg>(&bytes);
        let _ = decode::<FetchRequest>(&bytes);
        let _ = decode::<FetchReply>(&bytes);
    }
}
