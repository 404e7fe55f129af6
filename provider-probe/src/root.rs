//! Reading files below a root directory: `/` on a live box, a fixture directory in tests.
//!
//! Every read is bounded (a `/proc` file reports size 0, so the limit is applied while reading),
//! decoded lossily (device-tree strings end in NUL; a corrupt file must not stop the probe) and
//! confined to the root: a symlink that leads outside it is not followed, so a fixture can never
//! see the machine the tests run on.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Directory entries examined per listing; a library directory holds a few thousand.
const MAX_ENTRIES: usize = 20_000;

pub(crate) struct Root {
    root: PathBuf,
    /// The root with symlinks resolved, for the containment check.
    canonical: Option<PathBuf>,
}

impl Root {
    pub(crate) fn new(root: &Path) -> Root {
        Root { root: root.to_path_buf(), canonical: fs::canonicalize(root).ok() }
    }

    /// `rel` below the root, if it exists and resolves inside it.
    fn path(&self, rel: &str) -> Option<PathBuf> {
        let path = self.root.join(rel.trim_start_matches('/'));
        let canonical = fs::canonicalize(&path).ok()?;
        match &self.canonical {
            Some(root) if canonical.starts_with(root) => Some(canonical),
            _ => None,
        }
    }

    /// Up to `limit` bytes of a regular file.
    pub(crate) fn read(&self, rel: &str, limit: usize) -> Option<Vec<u8>> {
        let path = self.path(rel)?;
        let file = fs::File::open(&path).ok()?;
        if !file.metadata().ok()?.is_file() {
            return None;
        }
        let mut bytes = Vec::new();
        file.take(limit as u64).read_to_end(&mut bytes).ok()?;
        Some(bytes)
    }

    /// A file as text: lossy UTF-8, at most `limit` bytes.
    pub(crate) fn text(&self, rel: &str, limit: usize) -> Option<String> {
        self.read(rel, limit).map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    /// A one-line sysfs/device-tree value: NULs and surrounding whitespace removed, `None` when
    /// empty or not printable text.
    pub(crate) fn value(&self, rel: &str) -> Option<String> {
        printable(&self.text(rel, 4096)?)
    }

    /// Whether anything (file, directory, device node) exists at `rel`.
    pub(crate) fn exists(&self, rel: &str) -> bool {
        self.path(rel).is_some()
    }

    /// Whether `rel` is a regular file (after symlinks).
    pub(crate) fn is_file(&self, rel: &str) -> bool {
        self.path(rel).is_some_and(|p| p.is_file())
    }

    /// Names in a directory (sorted, at most [`MAX_ENTRIES`]); empty when it is missing.
    pub(crate) fn list(&self, rel: &str) -> Vec<String> {
        let Some(dir) = self.path(rel) else { return Vec::new() };
        let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
        let mut names: Vec<String> =
            entries.take(MAX_ENTRIES).filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
        names.sort();
        names
    }
}

/// `text` without NULs and surrounding whitespace, if what is left is short printable text.
/// Garbage (binary junk, control characters, undecodable bytes) is `None`: unknown, not a name.
pub(crate) fn printable(text: &str) -> Option<String> {
    let t = text.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    let ok = !t.is_empty() && t.len() <= 256 && t.chars().all(|c| !c.is_control() && c != char::REPLACEMENT_CHARACTER);
    ok.then(|| t.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_text_only() {
        assert_eq!(
            printable("NVIDIA Jetson AGX Orin Developer Kit\0"),
            Some("NVIDIA Jetson AGX Orin Developer Kit".into())
        );
        assert_eq!(printable("  \n\0"), None);
        assert_eq!(printable("a\u{1}b"), None);
        assert_eq!(printable(&String::from_utf8_lossy(&[0xff, 0xfe, b'x'])), None);
        assert_eq!(printable(&"x".repeat(300)), None);
    }

    #[test]
    fn reads_are_bounded_and_confined() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("proc")).unwrap();
        fs::write(dir.path().join("proc/big"), vec![b'a'; 10_000]).unwrap();
        let root = Root::new(dir.path());
        assert_eq!(root.read("proc/big", 100).unwrap().len(), 100);
        assert_eq!(root.read("/proc/big", 20_000).unwrap().len(), 10_000);
        assert!(root.read("proc", 10).is_none(), "a directory is not a file");
        assert!(root.read("proc/missing", 10).is_none());
        // A symlink out of the root is not followed.
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("proc/escape")).unwrap();
        assert!(root.read("proc/escape", 100).is_none());
        assert!(!root.exists("proc/escape"));
        assert!(root.read("../../etc/hostname", 100).is_none());
        assert_eq!(root.list("proc"), vec!["big".to_string(), "escape".to_string()]);
    }
}
