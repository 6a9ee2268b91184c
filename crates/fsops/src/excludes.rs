//! Exclude patterns: glob patterns matched against a path relative to its folder root.

use globset::{GlobSet, GlobSetBuilder};
use syncd_manifest::RelPath;

/// The directory at a folder's root where the agent stages files before renaming them into
/// place. Hidden, never synced, never reported as drift, removed after every generation.
pub const STAGING_DIR: &str = ".syncd-staging";

/// Patterns excluded by default in every folder (`default_excludes = false` turns them off):
/// what WSO2's runtime and editors leave in deployment folders, never artifacts.
pub const WSO2_DEFAULT_EXCLUDES: &[&str] = &[
    // Synapse's backup of a file it rewrote or failed to parse.
    "**/*.back",
    // Runtime scratch directories.
    "tmp/**",
    "work/**",
    // Editors' swap and backup files.
    "**/*.swp",
    "**/*~",
    "**/.#*",
];

/// A compiled set of exclude patterns. The staging directory is always excluded.
#[derive(Debug, Clone)]
pub struct Excludes {
    set: GlobSet,
    patterns: Vec<String>,
}

/// A pattern that does not compile.
#[derive(Debug, Clone, thiserror::Error)]
#[error("exclude pattern {pattern:?} is invalid: {reason}")]
pub struct ExcludeError {
    /// The pattern as written.
    pub pattern: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Excludes {
    /// Compiles `patterns`. `*` does not cross `/`; `**` does. A pattern matching a directory
    /// excludes everything beneath it, and `dir/**` excludes `dir` itself as well.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, ExcludeError> {
        let mut builder = GlobSetBuilder::new();
        let mut all: Vec<String> = vec![STAGING_DIR.to_owned()];
        all.extend(patterns.iter().map(|p| p.as_ref().to_owned()));
        for pattern in &all {
            let glob = globset::GlobBuilder::new(pattern)
                .literal_separator(true)
                .build()
                .map_err(|e| ExcludeError {
                    pattern: pattern.clone(),
                    reason: e.kind().to_string(),
                })?;
            builder.add(glob);
        }
        let set = builder.build().map_err(|e| ExcludeError {
            pattern: all.join(", "),
            reason: e.to_string(),
        })?;
        Ok(Excludes { set, patterns: all })
    }

    /// Only the built-in exclusion of the staging directory.
    pub fn none() -> Self {
        Excludes::new::<&str>(&[]).expect("the built-in pattern compiles")
    }

    /// Whether `path` is excluded. `is_dir` makes `dir/**` patterns exclude `dir` itself.
    pub fn is_excluded(&self, path: &RelPath, is_dir: bool) -> bool {
        if self.set.is_match(path.as_str()) {
            return true;
        }
        // Any ancestor excluded excludes the path too (the scanner never descends there, but
        // paths also arrive from the network).
        if path.ancestors().any(|a| self.set.is_match(a.as_str())) {
            return true;
        }
        is_dir && self.set.is_match(format!("{}/", path.as_str()))
    }

    /// The patterns, the built-in one first.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn wso2_style_patterns() {
        let ex = Excludes::new(&["**/*.back", "work/**", "tmp"]).unwrap();
        assert!(ex.is_excluded(&p("synapse-configs/default/api/a.xml.back"), false));
        assert!(ex.is_excluded(&p("a.back"), false));
        assert!(ex.is_excluded(&p("work"), true));
        assert!(ex.is_excluded(&p("work/x/y"), false));
        assert!(ex.is_excluded(&p("tmp"), true));
        assert!(ex.is_excluded(&p("tmp/inside"), false));
        assert!(!ex.is_excluded(&p("workers.xml"), false));
        assert!(!ex.is_excluded(&p("carbonapps/x.car"), false));
        assert!(ex.is_excluded(&p(".syncd-staging"), true));
        assert!(ex.is_excluded(&p(".syncd-staging/f1"), false));
    }

    #[test]
    fn a_single_star_does_not_cross_directories() {
        let ex = Excludes::new(&["*.tmp"]).unwrap();
        assert!(ex.is_excluded(&p("a.tmp"), false));
        assert!(!ex.is_excluded(&p("dir/a.tmp"), false));
    }

    #[test]
    fn a_bad_pattern_is_named() {
        let err = Excludes::new(&["a[b"]).unwrap_err();
        assert_eq!(err.pattern, "a[b");
    }
}
