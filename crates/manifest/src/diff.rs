//! Differences between two manifests, and applying them.

use serde::{Deserialize, Serialize};

use crate::manifest::{Manifest, Node};
use crate::path::RelPath;

/// One difference: an entry to create or replace, or one to remove.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// `path` must become `node` (created, or replaced whatever it was).
    Put(RelPath, Node),
    /// `path` must not exist.
    Remove(RelPath),
}

impl Change {
    /// The path this change is about.
    pub fn path(&self) -> &RelPath {
        match self {
            Change::Put(p, _) | Change::Remove(p) => p,
        }
    }
}

/// The changes that turn `old` into `new`, in path order.
///
/// Only entries that differ appear, so the result is empty exactly when the manifests are equal
/// (chunk parameters aside: the caller compares those).
pub fn diff(old: &Manifest, new: &Manifest) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut a = old.iter().peekable();
    let mut b = new.iter().peekable();
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((pa, _)), None) => {
                changes.push(Change::Remove((*pa).clone()));
                a.next();
            }
            (None, Some((pb, nb))) => {
                changes.push(Change::Put((*pb).clone(), (*nb).clone()));
                b.next();
            }
            (Some((pa, na)), Some((pb, nb))) => match pa.cmp(pb) {
                std::cmp::Ordering::Less => {
                    changes.push(Change::Remove((*pa).clone()));
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    changes.push(Change::Put((*pb).clone(), (*nb).clone()));
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if na != nb {
                        changes.push(Change::Put((*pb).clone(), (*nb).clone()));
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
    changes
}

/// The changes that turn `old` into `new` when the two can differ only at `paths`, as
/// [`diff`] would list them (in path order), looking at those paths alone: a generation that
/// touches ten files of a hundred thousand costs ten lookups, not a walk of both trees.
///
/// `paths` need not be sorted or unique. Entries outside them are taken to be equal (the
/// caller knows where `new` changed); nothing checks it.
pub fn diff_at<'a>(
    old: &Manifest,
    new: &Manifest,
    paths: impl IntoIterator<Item = &'a RelPath>,
) -> Vec<Change> {
    let mut paths: Vec<&RelPath> = paths.into_iter().collect();
    paths.sort_unstable();
    paths.dedup();
    paths
        .into_iter()
        .filter_map(|p| match (old.get(p), new.get(p)) {
            (Some(_), None) => Some(Change::Remove(p.clone())),
            (a, Some(b)) if a != Some(b) => Some(Change::Put(p.clone(), b.clone())),
            _ => None,
        })
        .collect()
}

impl Manifest {
    /// Applies changes in order. `apply(diff(a, b))` on `a` gives `b`.
    pub fn apply<'a>(&mut self, changes: impl IntoIterator<Item = &'a Change>) {
        for change in changes {
            match change {
                Change::Put(path, node) => {
                    self.insert(path.clone(), node.clone());
                }
                Change::Remove(path) => {
                    self.remove(path);
                }
            }
        }
    }

    /// Shorthand for the entry at `path` being a node equal to `node`.
    pub fn has(&self, path: &RelPath, node: &Node) -> bool {
        self.get(path) == Some(node)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::manifest::tests::{dir, file};

    fn arb_manifest() -> impl Strategy<Value = Manifest> {
        let name = prop::sample::select(vec!["a", "b", "a-b", "c.xml", "d.car"]);
        let path = prop::collection::vec(name, 1..4)
            .prop_map(|parts| RelPath::new(parts.join("/")).unwrap());
        let node = prop_oneof![
            Just(dir()),
            (
                any::<u8>(),
                prop::sample::select(vec![0o644u32, 0o600, 0o755]),
                0i64..3
            )
                .prop_map(|(b, mode, t)| file(&[b], mode, t)),
        ];
        prop::collection::btree_map(path, node, 0..24).prop_map(|m| m.into_iter().collect())
    }

    /// `m` without the entries whose parent is not a directory: a valid tree.
    fn without_orphans(mut m: Manifest) -> Manifest {
        let orphans: Vec<RelPath> = m
            .iter()
            .filter(|(p, _)| p.ancestors().any(|d| !m.get(&d).is_some_and(Node::is_dir)))
            .map(|(p, _)| p.clone())
            .collect();
        for p in &orphans {
            m.remove(p);
        }
        m
    }

    proptest! {
        #[test]
        fn apply_of_diff_gives_the_target(a in arb_manifest(), b in arb_manifest()) {
            let changes = diff(&a, &b);
            let mut applied = a.clone();
            applied.apply(&changes);
            prop_assert_eq!(&applied, &b);
            prop_assert_eq!(applied.digest(), b.digest());
        }

        #[test]
        fn validating_the_changes_agrees_with_validating_the_result(
            a in arb_manifest(),
            b in arb_manifest(),
        ) {
            // From a valid tree, checking only what changed finds exactly what a full check
            // finds.
            let a = without_orphans(a);
            prop_assert!(a.validate().is_ok());
            let changes = diff(&a, &b);
            let mut applied = a.clone();
            applied.apply(&changes);
            prop_assert_eq!(applied.validate_changes(&changes).is_ok(), b.validate().is_ok());
        }

        #[test]
        fn the_diff_at_the_changed_paths_is_the_whole_diff(
            a in arb_manifest(),
            b in arb_manifest(),
            extra in prop::collection::vec(arb_manifest(), 0..2),
        ) {
            // Given every path where the two differ, in any order, perhaps with paths where
            // they do not, the result is the whole diff.
            let changes = diff(&a, &b);
            let mut paths: Vec<RelPath> = changes.iter().rev().map(|c| c.path().clone()).collect();
            for m in &extra {
                paths.extend(m.iter().map(|(p, _)| p.clone()));
            }
            paths.extend(changes.iter().map(|c| c.path().clone()));
            prop_assert_eq!(diff_at(&a, &b, &paths), changes);
        }

        #[test]
        fn a_preview_is_what_applying_the_changes_gives(
            a in arb_manifest(),
            b in arb_manifest(),
            c in arb_manifest(),
            removed in prop::collection::vec(arb_manifest(), 0..2),
        ) {
            // Any list of changes (an update's, in any order, a path perhaps twice) on a valid
            // tree: the preview agrees with the copy the changes are applied to.
            let a = without_orphans(a);
            let mut changes = diff(&a, &b);
            changes.extend(diff(&a, &c).into_iter().rev());
            for m in &removed {
                changes.extend(m.iter().map(|(p, _)| Change::Remove(p.clone())));
            }
            let mut applied = a.clone();
            applied.apply(&changes);
            let preview = a.preview(changes.clone());
            prop_assert_eq!(preview.digest(), applied.digest());
            prop_assert_eq!(preview.validate().is_ok(), applied.validate().is_ok());
            for (p, n) in applied.iter() {
                prop_assert_eq!(preview.get(p), Some(n));
            }
            for ch in &changes {
                prop_assert_eq!(preview.get(ch.path()), applied.get(ch.path()));
            }
            prop_assert_eq!(preview.into_changes(), diff(&a, &applied));
        }

        #[test]
        fn diff_is_empty_only_for_equal_manifests(a in arb_manifest(), b in arb_manifest()) {
            prop_assert_eq!(diff(&a, &b).is_empty(), a == b);
        }

        #[test]
        fn changes_are_in_path_order_and_unique(a in arb_manifest(), b in arb_manifest()) {
            let changes = diff(&a, &b);
            for w in changes.windows(2) {
                prop_assert!(w[0].path() < w[1].path());
            }
        }
    }
}
