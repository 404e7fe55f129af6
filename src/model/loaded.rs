//! A model ready to generate: weights on a backend plus its tokenizer and limits. The CLI and the
//! benchmark load through here; the model manager (engine-core issue) will hold these.

use std::path::Path;

use crate::backend::cpu::{CpuBackend, Precision};
use crate::backend::Backend;
use crate::hub::{Format, Manifest};
use crate::model::llama::{Llama, ModelError};
use crate::model::tokenizer::{Tokenizer, TokenizerError};
use crate::model::weights::{GgufError, GgufFile};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Gguf { path: String, source: GgufError },
    #[error("{path}: {source}")]
    Model { path: String, source: ModelError },
    #[error("{path}: tokenizer: {source}")]
    Tokenizer { path: String, source: TokenizerError },
    #[error("model '{id}' is {format:?}, which needs the CUDA engine; this build runs GGUF models on the CPU only")]
    NeedsCuda { id: String, format: Format },
}

pub struct LoadedModel<B: Backend> {
    pub id: String,
    pub backend: B,
    pub model: Llama<B>,
    pub tokenizer: Tokenizer,
    /// The smaller of the file's and the manifest's context length.
    pub context_length: usize,
}

impl LoadedModel<CpuBackend> {
    /// Loads the GGUF at `path` onto a CPU backend with `threads` workers.
    pub fn load_gguf(
        id: &str,
        path: &Path,
        threads: usize,
        precision: Precision,
        context_limit: Option<usize>,
    ) -> Result<Self, LoadError> {
        let p = || path.display().to_string();
        let file = GgufFile::open(path).map_err(|source| LoadError::Gguf { path: p(), source })?;
        let tokenizer = Tokenizer::from_gguf(&file).map_err(|source| LoadError::Tokenizer { path: p(), source })?;
        let backend = CpuBackend::with_precision(threads, precision);
        let model = Llama::from_gguf(&file, &backend).map_err(|source| LoadError::Model { path: p(), source })?;
        let context_length = context_limit.map_or(model.config.context_length, |l| l.min(model.config.context_length));
        Ok(Self { id: id.to_owned(), backend, model, tokenizer, context_length })
    }

    /// Loads a manifest's primary file (already present at `path`).
    pub fn load(manifest: &Manifest, path: &Path, threads: usize, precision: Precision) -> Result<Self, LoadError> {
        match manifest.format {
            Format::Gguf => {
                Self::load_gguf(&manifest.id, path, threads, precision, Some(manifest.defaults.context_length as usize))
            }
            format => Err(LoadError::NeedsCuda { id: manifest.id.clone(), format }),
        }
    }
}
