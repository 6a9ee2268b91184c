//! A stream of manager messages as an agent receives it: paged changes are reassembled, applied
//! to a manifest and validated. Nothing may panic, and whatever validates must be a real tree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use syncd_manifest::{Manifest, NodeKind};
use syncd_proto::*;

fuzz_target!(|data: &[u8]| {
    // Split the input into length-prefixed frames, as the control stream would deliver them.
    let mut rest = data;
    let mut asm = UpdateAssembler::new();
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
            _ => {}
        }
    }
    let mut manifest = Manifest::default();
    manifest.apply(&asm.finish());
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
