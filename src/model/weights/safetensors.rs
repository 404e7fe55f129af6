//! Hugging Face checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`, each memory-mapped (nothing is read until a tensor is used).
//!
//! The `safetensors` crate parses and validates each header; this type only keeps the maps and the
//! name → (shard, byte range) table.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("{0}: no model.safetensors, model.safetensors.index.json or *.safetensors file")]
    Empty(String),
}

/// Where one tensor is.
#[derive(Clone, Debug)]
pub struct StTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    file: usize,
    /// Byte range within the file (header included in the offset).
    start: usize,
    end: usize,
}

impl StTensor {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

pub struct SafetensorsDir {
    files: Vec<Mmap>,
    tensors: HashMap<String, StTensor>,
}

impl SafetensorsDir {
    /// Opens the checkpoint in `dir`: the index's shards when there is an index, else every
    /// `*.safetensors` file (sorted). A name found in two shards is an error.
    pub fn open(dir: &Path) -> Result<Self, SafetensorsError> {
        let p = |path: &Path| path.display().to_string();
        let index = dir.join("model.safetensors.index.json");
        let mut shards: Vec<PathBuf> = if index.is_file() {
            let text =
                std::fs::read_to_string(&index).map_err(|source| SafetensorsError::Io { path: p(&index), source })?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| SafetensorsError::Invalid { path: p(&index), reason: e.to_string() })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| SafetensorsError::Invalid {
                path: p(&index),
                reason: "no \"weight_map\" object".into(),
            })?;
            let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            for n in &names {
                // Shard names come from a file: keep them inside the model directory.
                if n.contains('/') || n.contains('\\') || *n == ".." {
                    return Err(SafetensorsError::Invalid {
                        path: p(&index),
                        reason: format!("shard name '{n}' is not a plain file name"),
                    });
                }
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let rd = std::fs::read_dir(dir).map_err(|source| SafetensorsError::Io { path: p(dir), source })?;
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "safetensors"))
                .collect()
        };
        shards.sort();
        if shards.is_empty() {
            return Err(SafetensorsError::Empty(p(dir)));
        }
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for path in shards {
            let file = File::open(&path).map_err(|source| SafetensorsError::Io { path: p(&path), source })?;
            // SAFETY: the map is read-only; a checkpoint rewritten while serving is outside what
            // any mmap-based loader (llama.cpp, safetensors itself) can protect against.
            let map = unsafe { Mmap::map(&file) }.map_err(|source| SafetensorsError::Io { path: p(&path), source })?;
            let (header, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| SafetensorsError::Invalid { path: p(&path), reason: e.to_string() })?;
            let base = 8 + header;
            for (name, info) in meta.tensors() {
                let t = StTensor {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    file: files.len(),
                    start: base + info.data_offsets.0,
                    end: base + info.data_offsets.1,
                };
                if tensors.insert(name.clone(), t).is_some() {
                    return Err(SafetensorsError::Invalid {
                        path: p(&path),
                        reason: format!("tensor '{name}' is in more than one shard"),
                    });
                }
            }
            files.push(map);
        }
        Ok(Self { files, tensors })
    }

    pub fn tensor(&self, name: &str) -> Option<&StTensor> {
        self.tensors.get(name)
    }

    /// The tensor's bytes (little-endian, row-major), straight from the map.
    pub fn data(&self, t: &StTensor) -> &[u8] {
        &self.files[t.file][t.start..t.end]
    }

    /// Total bytes of every tensor.
    pub fn total_bytes(&self) -> usize {
        self.tensors.values().map(|t| t.end - t.start).sum()
    }
}

/// A tensor for tests to write with `safetensors::serialize_to_file`: (dtype, shape, bytes).
#[cfg(test)]
pub(crate) struct TestTensor(pub Dtype, pub Vec<usize>, pub Vec<u8>);

#[cfg(test)]
impl safetensors::View for &TestTensor {
    fn dtype(&self) -> Dtype {
        self.0
    }
    fn shape(&self) -> &[usize] {
        &self.1
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.2)
    }
    fn data_len(&self) -> usize {
        self.2.len()
    }
}

#[cfg(test)]
mod tests {
    use super::TestTensor as T;
    use super::*;

    #[test]
    fn shards_from_the_index_are_one_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let a = T(Dtype::F16, vec![2, 2], vec![1, 2, 3, 4, 5, 6, 7, 8]);
        let b = T(Dtype::I32, vec![1], vec![9, 0, 0, 0]);
        safetensors::serialize_to_file([("a", &a)], None, &dir.path().join("s1.safetensors")).unwrap();
        safetensors::serialize_to_file([("b", &b)], None, &dir.path().join("s2.safetensors")).unwrap();
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}"#,
        )
        .unwrap();
        let st = SafetensorsDir::open(dir.path()).unwrap();
        let (ta, tb) = (st.tensor("a").unwrap(), st.tensor("b").unwrap());
        assert_eq!((ta.dtype, ta.shape.clone(), st.data(ta)), (Dtype::F16, vec![2, 2], &a.2[..]));
        assert_eq!(st.data(tb), &b.2[..]);
        assert_eq!(st.total_bytes(), 12);

        std::fs::write(dir.path().join("model.safetensors.index.json"), r#"{"weight_map": {"a": "../x.safetensors"}}"#)
            .unwrap();
        let err = SafetensorsDir::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("not a plain file name"), "{err}");
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("s1.safetensors"), b"garbage").unwrap();
        assert!(SafetensorsDir::open(dir.path()).is_err());
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(SafetensorsDir::open(empty.path()), Err(SafetensorsError::Empty(_))));
    }
}
