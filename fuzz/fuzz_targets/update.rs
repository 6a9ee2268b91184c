//! A stream of manager messages as an agent receives it: paged changes are reassembled, chunk-list
//! edits (with their inline chunks) resolved, applied to a manifest and validated. Nothing may
//! panic, whatever validates must be a real tree, checking only the changes must agree with
//! checking everything, and inline chunks must come back with their own hashes. Pushed chunks
//! go through the assembler's bounds and are decoded as the agent does (against a fixed base).
#![no_main]

use libfuzzer_sys::fuzz_target;
use syncd_manifest::{ChunkHash, ChunkRef, FileContent, Manifest, Mtime, Node, NodeKind};
use syncd_proto::*;

fuzz_target!(|data: &[u8]| {
    // Split the input into length-prefixed frames, as the control stream would deliver them.
    let mut rest = data;
    let mut asm = UpdateAssembler::new();
    let mut resolved = Vec::new();
    while rest.len() >= 2 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        rest = &rest[2..];
        let (payload, tail) = rest.split_at(len.min(rest.len()));
        rest = tail;
        match decode::<ManagerMsg>(payload) {
            Ok(ManagerMsg::Changes(c)) => {
                if asm.push_changes(c).is_err() {
                    return;
                }
            }
            Ok(ManagerMsg::MoreChunks(c)) => {
                if asm.push_chunks(c).is_err() {
                    return;
                }
            }
            Ok(ManagerMsg::Patched(p)) => {
                // The version the edit names, as the agent would hold it.
                let chunks: Vec<ChunkRef> = (0u8..8)
                    .map(|i| ChunkRef {
                        hash: ChunkHash::of(&[i]),
                        len: 1,
                    })
                    .collect();
                let old = Node {
                    kind: NodeKind::File(FileContent {
                        size: 8,
                        hash: p.from,
                        chunks: chunks.into(),
                    }),
                    mode: 0o644,
                    mtime: Mtime { secs: 0, nanos: 0 },
                };
                if let Ok(r) = p.resolve(Some(&old)) {
                    for (hash, bytes) in &r.inline {
                        assert_eq!(ChunkHash::of(bytes), *hash);
                        assert!(!bytes.is_empty() && bytes.len() <= MAX_INLINE_CHUNK as usize);
                    }
                    resolved.push(r.change);
                }
            }
            Ok(ManagerMsg::Pushed(p)) => {
                let (encoding, len, data, base) = (p.encoding, p.len, p.data.clone(), p.base);
                if asm.push_pushed(p).is_err() {
                    return;
                }
                // Accepted: never longer than a chunk may be pushed, and decoding allocates no
                // more than that, whatever the bytes.
                assert!(len <= MAX_PUSHED_CHUNK && data.len() <= len as usize);
                let base_bytes = base.map(|_| b"<api name=\"base\"/>".as_slice());
                let mut out = Vec::new();
                if decode_chunk(encoding, &data, len as usize, base_bytes, &mut out).is_ok() {
                    assert_eq!(out.len(), len as usize);
                }
            }
            _ => {}
        }
    }
    let mut changes = asm.finish();
    changes.extend(resolved);
    let mut manifest = Manifest::default();
    manifest.apply(&changes);
    // From an empty (valid) manifest, checking the changes is checking everything.
    assert_eq!(
        manifest.validate_changes(&changes).is_ok(),
        manifest.validate().is_ok()
    );
    if manifest.validate().is_ok() {
        for (path, node) in manifest.iter() {
            if let Some(parent) = path.parent() {
                assert!(manifest.get(&parent).is_some_and(|n| n.is_dir()));
            }
            if let NodeKind::Symlink(t) = &node.kind {
                assert!(t.check_within(path).is_ok());
            }
        }
        let _ = manifest.digest();
    }
});
