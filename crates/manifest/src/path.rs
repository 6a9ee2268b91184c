//! `RelPath`, the only form in which a path inside a synced folder exists in syncd, and
//! `SymlinkTarget`, the checked target of a symbolic link.
//!
//! Both are validated when they are made, including when they are decoded from the network, so
//! code holding one never has to ask whether it is absolute, contains `..`, or escapes its folder.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest path syncd accepts, in bytes (Linux's `PATH_MAX` less the terminating NUL).
pub const MAX_PATH_LEN: usize = 4095;
/// Longest single path component, in bytes (Linux's `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;

/// A path relative to a synced folder's root: `/`-separated, non-empty components, none of them
/// `.` or `..`, no NUL byte, not absolute, at most [`MAX_PATH_LEN`] bytes.
///
/// Ordering is byte order of the string, so a directory sorts before everything beneath it.
/// Cloning is cheap (the string is shared): manifests, stat maps and histories hold the same
/// path many times.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct RelPath(Arc<str>);

impl Serialize for RelPath {
    /// Encoded as a string (the same bytes as a `String`).
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Why a string is not a valid [`RelPath`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path is the empty string.
    #[error("path is empty")]
    Empty,
    /// The path starts with `/`.
    #[error("path {0:?} is absolute")]
    Absolute(String),
    /// A component is empty (`a//b`, or a trailing `/`).
    #[error("path {0:?} has an empty component")]
    EmptyComponent(String),
    /// A component is `.` or `..`.
    #[error("path {0:?} has a `.` or `..` component")]
    DotComponent(String),
    /// The path contains a NUL byte.
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    /// The path or one of its components is longer than Linux allows.
    #[error("path of {len} bytes is too long (or has a component over {MAX_NAME_LEN} bytes)")]
    TooLong {
        /// Length of the whole path in bytes.
        len: usize,
    },
}

impl RelPath {
    /// Validates `s` as a relative path.
    pub fn new(s: impl Into<String>) -> Result<Self, PathError> {
        let s = s.into();
        if s.is_empty() {
            return Err(PathError::Empty);
        }
        if s.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong { len: s.len() });
        }
        if s.starts_with('/') {
            return Err(PathError::Absolute(s));
        }
        if s.contains('\0') {
            return Err(PathError::Nul(s));
        }
        for component in s.split('/') {
            match component {
                "" => return Err(PathError::EmptyComponent(s)),
                "." | ".." => return Err(PathError::DotComponent(s)),
                c if c.len() > MAX_NAME_LEN => return Err(PathError::TooLong { len: s.len() }),
                _ => {}
            }
        }
        Ok(RelPath(Arc::from(s)))
    }

    /// The path as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path's components, outermost first.
    pub fn components(&self) -> impl DoubleEndedIterator<Item = &str> {
        self.0.split('/')
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// The enclosing directory, or `None` for a path directly under the folder root.
    pub fn parent(&self) -> Option<RelPath> {
        self.0.rfind('/').map(|i| RelPath(Arc::from(&self.0[..i])))
    }

    /// The enclosing directory as a string slice (no allocation), or `None` at the root.
    pub fn parent_str(&self) -> Option<&str> {
        self.0.rfind('/').map(|i| &self.0[..i])
    }

    /// Every enclosing directory, outermost first (`a`, `a/b` for `a/b/c`).
    pub fn ancestors(&self) -> impl Iterator<Item = RelPath> + '_ {
        self.0
            .match_indices('/')
            .map(|(i, _)| RelPath(Arc::from(&self.0[..i])))
    }

    /// Number of components.
    pub fn depth(&self) -> usize {
        self.0.bytes().filter(|&b| b == b'/').count() + 1
    }

    /// `self/name`, validating `name` as a single component.
    pub fn join(&self, name: &str) -> Result<RelPath, PathError> {
        RelPath::new(format!("{}/{}", self.0, name))
    }

    /// Whether `self` is `other` or lies beneath it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        self.0 == other.0
            || (self.0.starts_with(&*other.0)
                && self.0.as_bytes().get(other.0.len()) == Some(&b'/'))
    }
}

impl std::borrow::Borrow<str> for RelPath {
    /// Ordering, equality and hashing are the string's, so maps keyed by `RelPath` can be
    /// searched by `&str`.
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RelPath {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, PathError> {
        RelPath::new(s)
    }
}

impl From<RelPath> for String {
    fn from(p: RelPath) -> String {
        p.0.as_ref().to_owned()
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The target of a symbolic link: non-empty, no NUL byte, at most [`MAX_PATH_LEN`] bytes.
///
/// Whether a target stays inside its folder depends on where the link is; see
/// [`SymlinkTarget::check_within`].
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SymlinkTarget(String);

/// Why a symbolic link target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// The target is empty, contains NUL or is too long.
    #[error("symlink target {0:?} is malformed")]
    Malformed(String),
    /// The target is an absolute path.
    #[error("symlink target {0:?} is absolute")]
    Absolute(String),
    /// Followed from where the link is, the target would leave the folder.
    #[error("symlink {link} -> {target:?} points outside its folder")]
    Escapes {
        /// Where the link is.
        link: RelPath,
        /// What it points to.
        target: String,
    },
}

impl SymlinkTarget {
    /// Validates the form of a target (not where it points).
    pub fn new(s: impl Into<String>) -> Result<Self, TargetError> {
        let s = s.into();
        if s.is_empty() || s.len() > MAX_PATH_LEN || s.contains('\0') {
            return Err(TargetError::Malformed(s));
        }
        Ok(SymlinkTarget(s))
    }

    /// The target as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Refuses a target that is absolute or that, resolved lexically from the directory holding
    /// `link`, climbs above the folder root.
    ///
    /// syncd never follows a link while writing, so this check is what keeps a link published by
    /// syncd from handing the WSO2 runtime a path outside the folder.
    pub fn check_within(&self, link: &RelPath) -> Result<(), TargetError> {
        if self.0.starts_with('/') {
            return Err(TargetError::Absolute(self.0.clone()));
        }
        let mut depth = link.depth() as isize - 1;
        for component in self.0.split('/') {
            match component {
                "" | "." => {}
                ".." => {
                    depth -= 1;
                    if depth < 0 {
                        return Err(TargetError::Escapes {
                            link: link.clone(),
                            target: self.0.clone(),
                        });
                    }
                }
                _ => depth += 1,
            }
        }
        Ok(())
    }
}

impl TryFrom<String> for SymlinkTarget {
    type Error = TargetError;
    fn try_from(s: String) -> Result<Self, TargetError> {
        SymlinkTarget::new(s)
    }
}

impl From<SymlinkTarget> for String {
    fn from(t: SymlinkTarget) -> String {
        t.0
    }
}

impl fmt::Debug for SymlinkTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_paths() {
        for ok in [
            "a",
            "a/b",
            "carbonapps/x.car",
            ".hidden",
            "a..b",
            "...",
            "a b/c",
        ] {
            assert!(RelPath::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_paths_that_could_escape_or_confuse() {
        let cases = [
            ("", PathError::Empty),
            ("/etc/passwd", PathError::Absolute("/etc/passwd".into())),
            ("a//b", PathError::EmptyComponent("a//b".into())),
            ("a/", PathError::EmptyComponent("a/".into())),
            ("../x", PathError::DotComponent("../x".into())),
            ("a/../../x", PathError::DotComponent("a/../../x".into())),
            ("./a", PathError::DotComponent("./a".into())),
            ("a/\0b", PathError::Nul("a/\0b".into())),
        ];
        for (input, want) in cases {
            assert_eq!(RelPath::new(input), Err(want), "{input:?}");
        }
        assert!(matches!(
            RelPath::new("x".repeat(256)),
            Err(PathError::TooLong { .. })
        ));
        assert!(matches!(
            RelPath::new("a/".repeat(2048) + "b"),
            Err(PathError::TooLong { .. })
        ));
    }

    #[test]
    fn conversion_from_string_validates() {
        assert!(RelPath::try_from("../../etc/shadow".to_owned()).is_err());
        assert!(SymlinkTarget::try_from("a\0b".to_owned()).is_err());
    }

    #[test]
    fn parents_and_ancestors() {
        let p = RelPath::new("a/b/c").unwrap();
        assert_eq!(p.parent().unwrap().as_str(), "a/b");
        assert_eq!(p.file_name(), "c");
        assert_eq!(p.depth(), 3);
        let anc: Vec<_> = p.ancestors().map(String::from).collect();
        assert_eq!(anc, ["a", "a/b"]);
        assert!(RelPath::new("a").unwrap().parent().is_none());
        assert!(p.starts_with(&RelPath::new("a/b").unwrap()));
        assert!(
            !RelPath::new("a/bc")
                .unwrap()
                .starts_with(&RelPath::new("a/b").unwrap())
        );
    }

    #[test]
    fn symlink_targets_that_stay_inside() {
        let link = RelPath::new("webapps/app/lib").unwrap();
        for ok in ["x", "../x", "../../x", "./y/../z", "../.."] {
            SymlinkTarget::new(ok).unwrap().check_within(&link).unwrap();
        }
    }

    #[test]
    fn symlink_targets_that_escape() {
        let link = RelPath::new("webapps/lib").unwrap();
        for bad in ["../../x", "/etc", "a/../../../b", "../.."] {
            assert!(
                SymlinkTarget::new(bad)
                    .unwrap()
                    .check_within(&link)
                    .is_err(),
                "{bad}"
            );
        }
        assert!(
            SymlinkTarget::new("..")
                .unwrap()
                .check_within(&RelPath::new("top").unwrap())
                .is_err()
        );
        assert!(SymlinkTarget::new("").is_err());
    }
}
