//! A model ready to generate: weights on a backend plus its tokenizer and limits. The CLI and the
//! benchmark load through here; the model manager (engine-core issue) will hold these.

use std::path::Path;

use crate::backend::cpu::{CpuBackend, Precision};
use crate::backend::Backend;
use crate::hub::{Format, Manifest};
use crate::model::config::ModelConfig;
use crate::model::llama::{Llama, ModelError};
use crate::model::tokenizer::{Tokenizer, TokenizerError};
use crate::model::weights::safetensors::{SafetensorsDir, SafetensorsError};
use crate::model::weights::{GgufError, GgufFile};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Gguf { path: String, source: GgufError },
    #[error("{path}: {source}")]
    Model { path: String, source: ModelError },
    #[error("{path}: tokenizer: {source}")]
    Tokenizer { path: String, source: TokenizerError },
    #[error("{path}: {source}")]
    Safetensors { path: String, source: SafetensorsError },
    #[error("{path}: {reason}")]
    Config { path: String, reason: String },
}

/// A loaded model on whichever backend holds it: the engine runs the same loop over either.
pub enum AnyModel {
    Cpu(Box<LoadedModel<CpuBackend>>),
    #[cfg(feature = "cuda")]
    Cuda(Box<LoadedModel<crate::backend::cuda::CudaBackend>>),
}

impl From<LoadedModel<CpuBackend>> for AnyModel {
    fn from(m: LoadedModel<CpuBackend>) -> Self {
        AnyModel::Cpu(Box::new(m))
    }
}

impl AnyModel {
    /// Loads a manifest's files (present at `path`, the primary file): GGUF on the CPU; AWQ on
    /// the CUDA engine when this build has it and a device is there, else on the CPU's exact
    /// (slow) AWQ path, with a warning.
    pub fn load(manifest: &Manifest, path: &Path, threads: usize, precision: Precision) -> Result<Self, LoadError> {
        #[cfg(feature = "cuda")]
        if manifest.format == Format::AwqSafetensors {
            match crate::backend::cuda::CudaBackend::new(0) {
                Ok(be) => {
                    let dir = path.parent().unwrap_or(Path::new("."));
                    let limit = Some(manifest.defaults.context_length as usize);
                    return Ok(AnyModel::Cuda(Box::new(LoadedModel::load_hf_dir(&manifest.id, dir, be, limit)?)));
                }
                Err(e) => tracing::warn!(model = %manifest.id, "{e}; the AWQ model runs on the CPU (exact, slow)"),
            }
        }
        #[cfg(not(feature = "cuda"))]
        if manifest.format == Format::AwqSafetensors {
            tracing::warn!(model = %manifest.id, "built without the cuda feature: the AWQ model runs on the CPU (exact, slow)");
        }
        Ok(LoadedModel::load(manifest, path, threads, precision)?.into())
    }
}

pub struct LoadedModel<B: Backend> {
    pub id: String,
    pub backend: B,
    pub model: Llama<B>,
    pub tokenizer: Tokenizer,
    /// The smaller of the file's and the manifest's context length.
    pub context_length: usize,
    /// The vision tower and image settings of a vision-language checkpoint.
    pub vision: Option<std::sync::Arc<crate::vision::Vision>>,
}

impl<B: Backend> LoadedModel<B> {
    /// Loads a Hugging Face checkpoint directory (config.json, tokenizer.json,
    /// tokenizer_config.json, safetensors shards; fp16 or AWQ 4-bit) onto `backend`.
    pub fn load_hf_dir(id: &str, dir: &Path, backend: B, context_limit: Option<usize>) -> Result<Self, LoadError> {
        let p = |f: &str| dir.join(f).display().to_string();
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| LoadError::Config { path: p("config.json"), reason: e.to_string() })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| LoadError::Config { path: p("config.json"), reason: e.to_string() })?;
        let (cfg, awq) = ModelConfig::from_hf_json(&json)
            .map_err(|e| LoadError::Config { path: p("config.json"), reason: e.to_string() })?;
        let tok_config = dir.join("tokenizer_config.json");
        let tokenizer =
            Tokenizer::from_file(&dir.join("tokenizer.json"), tok_config.is_file().then_some(tok_config.as_path()))
                .map_err(|source| LoadError::Tokenizer { path: p("tokenizer.json"), source })?;
        let st = SafetensorsDir::open(dir)
            .map_err(|source| LoadError::Safetensors { path: dir.display().to_string(), source })?;
        let model = Llama::from_safetensors(&st, cfg, awq.as_ref(), &backend)
            .map_err(|source| LoadError::Model { path: dir.display().to_string(), source })?;
        // The vision tower runs on the decoder's device, through a sibling handle (its own CPU
        // pool or CUDA stream): it encodes on the request's thread while the engine decodes.
        let sibling = || backend.sibling().map_err(|e| format!("the vision tower's backend: {e}"));
        let vision = crate::vision::Vision::load(dir, &json, &st, model.config.hidden_size, sibling)
            .map_err(|reason| LoadError::Config { path: dir.display().to_string(), reason })?
            .map(std::sync::Arc::new);
        let context_length = context_limit.map_or(model.config.context_length, |l| l.min(model.config.context_length));
        Ok(Self { id: id.to_owned(), backend, model, tokenizer, context_length, vision })
    }
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
        Ok(Self { id: id.to_owned(), backend, model, tokenizer, context_length, vision: None })
    }

    /// Loads a manifest's primary file (already present at `path`) onto the CPU. An AWQ
    /// checkpoint runs on the CPU's exact (slow) AWQ path, the oracle of the CUDA engine.
    pub fn load(manifest: &Manifest, path: &Path, threads: usize, precision: Precision) -> Result<Self, LoadError> {
        let limit = Some(manifest.defaults.context_length as usize);
        match manifest.format {
            Format::Gguf => Self::load_gguf(&manifest.id, path, threads, precision, limit),
            Format::AwqSafetensors => {
                let dir = path.parent().unwrap_or(Path::new("."));
                Self::load_hf_dir(&manifest.id, dir, CpuBackend::with_precision(threads, precision), limit)
            }
        }
    }
}
