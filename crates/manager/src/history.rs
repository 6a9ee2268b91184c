//! Recent generations' changes per folder, so an agent a few generations behind receives only
//! what changed since the version it holds instead of the whole manifest.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use std::collections::HashMap;

use syncd_manifest::{Change, FileContent, ManifestDigest, RelPath};

/// Generations remembered.
const MAX_GENERATIONS: usize = 256;
/// Changes remembered in all (a bound on memory; an agent further behind gets a full manifest).
const MAX_CHANGES: usize = 500_000;

/// One folder's step from one version to the next.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub from: ManifestDigest,
    pub to: ManifestDigest,
    pub changes: Arc<Vec<Change>>,
    /// The previous content of large files this step puts (what their new chunk lists are sent
    /// as edits of) and of small ones (what their new chunk is pushed as a delta of).
    pub olds: Arc<HashMap<RelPath, FileContent>>,
}

/// Files with at least this many chunks are worth sending as chunk-list edits.
pub(crate) const PATCH_FROM_CHUNKS: usize = 16;

/// The previous content of each large file `changes` puts over a file of `old`, and of each
/// small one (a single chunk of at most `crate::serve::PUSH_FILE_MAX` bytes).
pub(crate) fn olds_of(
    old: &syncd_manifest::Manifest,
    changes: &[Change],
) -> HashMap<RelPath, FileContent> {
    changes
        .iter()
        .filter_map(|c| match c {
            Change::Put(p, n)
                if n.file().is_some_and(|f| {
                    f.chunks.len() >= PATCH_FROM_CHUNKS
                        || matches!(&f.chunks[..], [c] if c.len <= crate::serve::PUSH_FILE_MAX)
                }) =>
            {
                Some((p.clone(), old.get(p)?.file()?.clone()))
            }
            _ => None,
        })
        .collect()
}

/// A merged delta: the changes, and for files the agent holds in an older version that the
/// delta replaces, that version's content.
#[derive(Debug, Default)]
pub(crate) struct Delta {
    pub changes: Vec<Change>,
    pub olds: HashMap<RelPath, FileContent>,
}

/// Steps of recent generations, oldest first.
#[derive(Debug, Clone, Default)]
pub(crate) struct History {
    entries: VecDeque<BTreeMap<String, Step>>,
    changes: usize,
}

impl History {
    /// Records one generation's steps.
    pub(crate) fn push(&mut self, steps: BTreeMap<String, Step>) {
        self.changes += steps.values().map(|s| s.changes.len()).sum::<usize>();
        self.entries.push_back(steps);
        while self.entries.len() > MAX_GENERATIONS
            || (self.changes > MAX_CHANGES && self.entries.len() > 1)
        {
            if let Some(old) = self.entries.pop_front() {
                self.changes -= old.values().map(|s| s.changes.len()).sum::<usize>();
            }
        }
    }

    /// The changes that turn `folder` from version `from` into version `to` (its current one),
    /// merged so each path appears once, in path order; `None` if the history does not reach
    /// back to `from`.
    pub(crate) fn delta(
        &self,
        folder: &str,
        from: ManifestDigest,
        to: ManifestDigest,
    ) -> Option<Delta> {
        if from == to {
            return Some(Delta::default());
        }
        // Walk back from the current version until `from`, following the chain of digests.
        let mut want = to;
        let mut steps = Vec::new();
        for entry in self.entries.iter().rev() {
            let Some(step) = entry.get(folder) else {
                continue;
            };
            if step.to != want {
                return None;
            }
            steps.push(step);
            if step.from == from {
                let mut merged: BTreeMap<RelPath, Change> = BTreeMap::new();
                let mut olds = HashMap::new();
                for step in steps.iter().rev() {
                    for c in step.changes.iter() {
                        // The version at `from` is the one before the first step touching it.
                        if !merged.contains_key(c.path())
                            && let Some(old) = step.olds.get(c.path())
                        {
                            olds.insert(c.path().clone(), old.clone());
                        }
                        merged.insert(c.path().clone(), c.clone());
                    }
                }
                return Some(Delta {
                    changes: merged.into_values().collect(),
                    olds,
                });
            }
            want = step.from;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use syncd_manifest::{Manifest, Mtime, Node, NodeKind, diff};

    use super::*;

    fn dir(secs: i64) -> Node {
        Node {
            kind: NodeKind::Dir,
            mode: 0o755,
            mtime: Mtime { secs, nanos: 0 },
        }
    }

    #[test]
    fn a_delta_over_several_generations_equals_the_direct_diff() {
        let p = |s: &str| RelPath::new(s).unwrap();
        let mut versions = vec![Manifest::default()];
        let mut m = Manifest::default();
        m.insert(p("a"), dir(1));
        versions.push(m.clone());
        m.insert(p("b"), dir(2));
        versions.push(m.clone());
        m.remove(&p("a"));
        m.insert(p("b"), dir(3));
        versions.push(m.clone());

        let mut h = History::default();
        for w in versions.windows(2) {
            let mut steps = BTreeMap::new();
            steps.insert(
                "f".to_owned(),
                Step {
                    from: w[0].digest(),
                    to: w[1].digest(),
                    changes: Arc::new(diff(&w[0], &w[1])),
                    olds: Default::default(),
                },
            );
            h.push(steps);
        }
        let last = versions.last().unwrap();
        for (i, v) in versions.iter().enumerate() {
            let delta = h.delta("f", v.digest(), last.digest()).unwrap();
            let mut rebuilt = v.clone();
            rebuilt.apply(&delta.changes);
            assert_eq!(&rebuilt, last, "from version {i}");
        }
        let stranger = Manifest::from_iter([(p("zzz"), dir(9))]);
        assert!(h.delta("f", stranger.digest(), last.digest()).is_none());
        assert!(
            h.delta("other", versions[0].digest(), last.digest())
                .is_none()
        );
    }
}
