//! The models directory: `<root>/<model-id>/<file name>` for every file of a manifest, plus
//! `<root>/manifests/*.toml` for local manifests (see registry.rs).
//!
//! Beside each verified file sits `<file>.verified`, a small JSON record of the sha256 it was
//! checked against and the file's size and mtime when it was. `is_present` trusts a record that
//! still matches the file's size and mtime, so a start-up does not rehash gigabytes; replacing or
//! touching the file invalidates it and the next `pull`/`ensure` rehashes.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use super::manifest::{FileSpec, Manifest};
use super::HubError;

/// Environment variable naming the models directory (below `--models-dir`, above the default).
pub const MODELS_ENV: &str = "ZOE_MODELS";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Store {
    root: PathBuf,
}

/// The record in `<file>.verified`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Marker {
    sha256: String,
    size: u64,
    mtime_ns: u128,
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    /// `flag` (`--models-dir`) if given, else `$ZOE_MODELS`, else `<data dir>/zoe-llm/models`.
    pub fn locate(flag: Option<&Path>) -> Result<Store, HubError> {
        locate_with(flag, std::env::var_os(MODELS_ENV).map(PathBuf::from), dirs::data_dir())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where local manifests live.
    pub fn manifests_dir(&self) -> PathBuf {
        self.root.join("manifests")
    }

    pub fn model_dir(&self, m: &Manifest) -> PathBuf {
        self.root.join(&m.id)
    }

    pub fn file_path(&self, m: &Manifest, f: &FileSpec) -> PathBuf {
        self.model_dir(m).join(&f.name)
    }

    /// The file the loader opens first (GGUF, safetensors, or shard index).
    pub fn primary_path(&self, m: &Manifest) -> PathBuf {
        self.file_path(m, m.primary())
    }

    /// True when every file is in place with the right size and a verification record that
    /// still matches it. Cheap: metadata and a few bytes per file, no hashing.
    pub fn is_present(&self, m: &Manifest) -> bool {
        self.missing(m).is_empty()
    }

    /// The files of `m` that `is_present` would not accept.
    pub fn missing<'m>(&self, m: &'m Manifest) -> Vec<&'m FileSpec> {
        m.files.iter().filter(|f| !self.is_verified(&self.file_path(m, f), f)).collect()
    }

    /// `path` holds `f` as last verified: record present, same size and mtime, same pinned hash.
    pub(crate) fn is_verified(&self, path: &Path, f: &FileSpec) -> bool {
        let Ok(meta) = fs::metadata(path) else {
            return false;
        };
        if f.size.is_some_and(|size| size != meta.len()) {
            return false;
        }
        let Some(marker) = read_marker(path) else {
            return false;
        };
        let same_file = marker.size == meta.len() && Some(marker.mtime_ns) == mtime_ns(&meta);
        let same_hash = f.sha256.as_ref().is_none_or(|sha| *sha == marker.sha256);
        same_file && same_hash
    }

    /// Records that `path` (already in its final place) hashed to `sha256`.
    pub(crate) fn mark_verified(&self, path: &Path, sha256: &str) -> Result<(), HubError> {
        let meta = fs::metadata(path).map_err(|source| HubError::Read { path: path.to_path_buf(), source })?;
        let marker = Marker { sha256: sha256.to_owned(), size: meta.len(), mtime_ns: mtime_ns(&meta).unwrap_or(0) };
        let marker_path = marker_path(path);
        let json = serde_json::to_string(&marker).expect("a struct of strings and integers serializes");
        fs::write(&marker_path, json).map_err(|source| HubError::Write { path: marker_path, source })
    }

    /// Removes a file and its record; a file that is already gone is fine.
    pub(crate) fn remove(&self, path: &Path) -> Result<(), HubError> {
        for p in [path.to_path_buf(), marker_path(path)] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(HubError::Write { path: p, source }),
            }
        }
        Ok(())
    }
}

fn locate_with(flag: Option<&Path>, env: Option<PathBuf>, data_dir: Option<PathBuf>) -> Result<Store, HubError> {
    if let Some(dir) = flag {
        return Ok(Store::new(dir));
    }
    // An empty ZOE_MODELS= is treated as unset, as shells make it easy to export by accident.
    if let Some(dir) = env.filter(|d| !d.as_os_str().is_empty()) {
        return Ok(Store::new(dir));
    }
    data_dir.map(|d| Store::new(d.join("zoe-llm").join("models"))).ok_or(HubError::NoModelsDir)
}

fn marker_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".verified");
    PathBuf::from(name)
}

fn read_marker(path: &Path) -> Option<Marker> {
    let text = fs::read_to_string(marker_path(path)).ok()?;
    serde_json::from_str(&text).ok()
}

fn mtime_ns(meta: &fs::Metadata) -> Option<u128> {
    Some(meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(size: Option<u64>) -> Manifest {
        let size = size.map(|s| format!("size = {s}")).unwrap_or_default();
        let text = format!(
            r#"
id = "m"
format = "gguf"
architecture = "llama"
[source]
kind = "huggingface"
repo = "a/b"
[[files]]
name = "w.gguf"
sha256 = "{}"
{size}
primary = true
[[files]]
name = "sub/config.json"
[defaults]
context_length = 512
"#,
            "ab".repeat(32)
        );
        Manifest::from_toml(&text, "test").unwrap()
    }

    #[test]
    fn locate_prefers_flag_then_env_then_data_dir() {
        let flag = Path::new("/flag");
        let env = Some(PathBuf::from("/env"));
        let data = Some(PathBuf::from("/data"));
        assert_eq!(locate_with(Some(flag), env.clone(), data.clone()).unwrap().root(), flag);
        assert_eq!(locate_with(None, env, data.clone()).unwrap().root(), Path::new("/env"));
        assert_eq!(
            locate_with(None, Some(PathBuf::new()), data.clone()).unwrap().root(),
            Path::new("/data/zoe-llm/models")
        );
        assert_eq!(locate_with(None, None, data).unwrap().root(), Path::new("/data/zoe-llm/models"));
        assert!(matches!(locate_with(None, None, None), Err(HubError::NoModelsDir)));
    }

    #[test]
    fn layout() {
        let store = Store::new("/models");
        let m = manifest(None);
        assert_eq!(store.model_dir(&m), Path::new("/models/m"));
        assert_eq!(store.primary_path(&m), Path::new("/models/m/w.gguf"));
        assert_eq!(store.file_path(&m, &m.files[1]), Path::new("/models/m/sub/config.json"));
        assert_eq!(store.manifests_dir(), Path::new("/models/manifests"));
    }

    #[test]
    fn presence_needs_file_size_and_a_matching_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let m = manifest(Some(4));
        assert!(!store.is_present(&m));
        assert_eq!(store.missing(&m).len(), 2);

        let weights = store.primary_path(&m);
        let config = store.file_path(&m, &m.files[1]);
        fs::create_dir_all(config.parent().unwrap()).unwrap();
        fs::write(&weights, b"1234").unwrap();
        fs::write(&config, b"{}").unwrap();
        // Files without records are not trusted.
        assert!(!store.is_present(&m));

        store.mark_verified(&weights, &"ab".repeat(32)).unwrap();
        store.mark_verified(&config, &"cd".repeat(32)).unwrap();
        assert!(store.is_present(&m), "{:?}", store.missing(&m));

        // A record of another hash than the pinned one does not count.
        store.mark_verified(&weights, &"ef".repeat(32)).unwrap();
        assert_eq!(store.missing(&m)[0].name, "w.gguf");
        store.mark_verified(&weights, &"ab".repeat(32)).unwrap();

        // Replacing the file (new size) or touching it (new mtime) invalidates the record.
        let f = fs::OpenOptions::new().write(true).open(&weights).unwrap();
        f.set_modified(UNIX_EPOCH + std::time::Duration::from_secs(1_000_000)).unwrap();
        drop(f);
        assert!(!store.is_present(&m));
        store.mark_verified(&weights, &"ab".repeat(32)).unwrap();
        assert!(store.is_present(&m));
        fs::write(&weights, b"12345").unwrap();
        store.mark_verified(&weights, &"ab".repeat(32)).unwrap();
        assert!(!store.is_present(&m), "size differs from the manifest");

        store.remove(&weights).unwrap();
        assert!(!weights.exists() && !marker_path(&weights).exists());
        store.remove(&weights).unwrap();
    }
}
