//! Paths and symlink targets from anywhere: a path that validates never escapes, and a link
//! target accepted for a location stays inside the folder when resolved lexically.
#![no_main]

use libfuzzer_sys::fuzz_target;
use syncd_manifest::{RelPath, SymlinkTarget};

fuzz_target!(|input: (&str, &str)| {
    let (path, target) = input;
    if let Ok(p) = RelPath::new(path) {
        assert!(!p.as_str().starts_with('/'));
        assert!(p.components().all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0')));
        assert_eq!(p.parent().map_or(1, |d| d.depth() + 1), p.depth());
        if let Ok(t) = SymlinkTarget::new(target) {
            if t.check_within(&p).is_ok() {
                // Resolve lexically from the link's directory: never above the root.
                let mut stack: Vec<&str> = p.components().collect();
                stack.pop();
                for c in t.as_str().split('/') {
                    match c {
                        "" | "." => {}
                        ".." => assert!(stack.pop().is_some(), "{p} -> {t:?} escaped"),
                        other => stack.push(other),
                    }
                }
            }
        }
    }
});
