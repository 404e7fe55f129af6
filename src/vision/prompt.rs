//! A vision-language model's images in a prompt: the loaded vision part of a checkpoint
//! ([`Vision`]: tower, token ids, preprocessing), and [`Vision::attach`], which turns a prompt
//! rendered with one `<|image_pad|>` per image into what the decoder and the batching engine take —
//! one pad per merged image row, the tower's rows for them, M-RoPE positions, and prefix-cache
//! keys that tell images apart.

use std::path::Path;

use serde_json::Value;

use super::{ImageInput, PreprocessConfig};
use crate::model::llama::MmPrompt;
use crate::model::vision::{mrope_positions, VisionConfig, VisionTokenIds, VisionTower};
use crate::model::weights::safetensors::SafetensorsDir;

/// The vision part of a loaded model.
pub struct Vision {
    pub tower: VisionTower,
    pub tokens: VisionTokenIds,
    pub preprocess: PreprocessConfig,
}

impl std::fmt::Debug for Vision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vision").field("tokens", &self.tokens).field("preprocess", &self.preprocess).finish()
    }
}

/// Why images could not be placed in a prompt (the client's doing: a 400).
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("the chat template placed {slots} image slots for {images} images")]
    SlotCount { slots: usize, images: usize },
    #[error("{0}")]
    Positions(String),
    #[error(
        "with its images the prompt is {tokens} tokens ({image_tokens} of them for the images), but the context is \
         {context}: send fewer or smaller images"
    )]
    TooLong { tokens: usize, image_tokens: usize, context: usize },
}

impl Vision {
    /// The vision part of the Hugging Face checkpoint in `dir` (`config` is its config.json),
    /// or `None` when it has no `vision_config`. `preprocessor_config.json`, when present,
    /// overrides the pixel budget and normalization.
    /// `llm_hidden` is the language model's width, which the tower's output must have.
    pub fn load(dir: &Path, config: &Value, st: &SafetensorsDir, llm_hidden: usize) -> Result<Option<Self>, String> {
        if config.get("vision_config").is_none() {
            return Ok(None);
        }
        let vc = VisionConfig::from_hf_json(config).map_err(|e| e.to_string())?;
        if vc.out_hidden != llm_hidden {
            return Err(format!(
                "config.json: vision_config.hidden_size {} differs from the language model's hidden_size {llm_hidden}",
                vc.out_hidden
            ));
        }
        let tokens = VisionTokenIds::from_hf_json(config).map_err(|e| e.to_string())?;
        let mut preprocess = PreprocessConfig {
            patch_size: vc.patch_size,
            temporal_patch_size: vc.temporal_patch_size,
            merge_size: vc.spatial_merge_size,
            ..PreprocessConfig::default()
        };
        let pp = dir.join("preprocessor_config.json");
        if pp.is_file() {
            let text = std::fs::read_to_string(&pp).map_err(|e| format!("{}: {e}", pp.display()))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", pp.display()))?;
            apply_preprocessor_config(&mut preprocess, &v).map_err(|e| format!("{}: {e}", pp.display()))?;
        }
        preprocess.validate().map_err(|e| e.to_string())?;
        let tower = VisionTower::from_safetensors(st, vc).map_err(|e| e.to_string())?;
        Ok(Some(Self { tower, tokens, preprocess }))
    }

    /// Expands each `<|image_pad|>` of `prompt` (one per image, in order) to the image's merged
    /// rows, runs the tower, and returns the new prompt with its [`MmPrompt`]. A prompt that would
    /// not leave a token of `context` is refused before the (costly) tower runs.
    pub fn attach(
        &self,
        prompt: &[u32],
        images: &[ImageInput],
        context: usize,
    ) -> Result<(Vec<u32>, MmPrompt), AttachError> {
        let pad = self.tokens.image_pad;
        let slots = prompt.iter().filter(|&&t| t == pad).count();
        if slots != images.len() {
            return Err(AttachError::SlotCount { slots, images: images.len() });
        }
        let image_tokens: usize = images.iter().map(ImageInput::llm_tokens).sum();
        let tokens = prompt.len() - slots + image_tokens;
        if tokens >= context {
            return Err(AttachError::TooLong { tokens, image_tokens, context });
        }
        let mut ids = Vec::with_capacity(prompt.len() + images.iter().map(ImageInput::llm_tokens).sum::<usize>());
        let mut key_ids = Vec::with_capacity(ids.capacity());
        let mut embed_rows = Vec::new();
        let mut next = images.iter();
        for &t in prompt {
            if t != pad {
                ids.push(t);
                key_ids.push(t);
                continue;
            }
            let image = next.next().expect("counted above");
            // Ids past any vocabulary from the image's SHA-256, its eight 31-bit pieces in turn: a
            // cache block of 8 or more image rows commits to 248 bits of the hash.
            let pieces: Vec<u32> =
                image.hash.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
            for k in 0..image.llm_tokens() {
                embed_rows.push(ids.len());
                ids.push(pad);
                key_ids.push(0x8000_0000 | (pieces[k % pieces.len()] & 0x7fff_ffff));
            }
        }
        let grids: Vec<[usize; 3]> = images.iter().map(|i| i.grid_thw).collect();
        let pixels: Vec<f32> = images.iter().flat_map(|i| i.pixel_values.iter().copied()).collect();
        let (positions, rope_delta) =
            mrope_positions(&ids, &grids, pad, self.tokens.vision_start, self.tower.config.spatial_merge_size)
                .map_err(|e| AttachError::Positions(e.to_string()))?;
        let embeds = self.tower.forward(&pixels, &grids);
        debug_assert_eq!(embeds.len(), embed_rows.len() * self.tower.config.out_hidden);
        Ok((ids, MmPrompt { positions, rope_delta, embed_rows, embeds, key_ids }))
    }
}

/// `min_pixels`, `max_pixels`, `image_mean`, `image_std` from a preprocessor_config.json (older
/// files nest the pixel budget under `size`).
fn apply_preprocessor_config(cfg: &mut PreprocessConfig, v: &Value) -> Result<(), String> {
    let int = |k: &str| v.get(k).or_else(|| v.get("size").and_then(|s| s.get(k))).and_then(Value::as_u64);
    if let Some(n) = int("min_pixels") {
        cfg.min_pixels = n as usize;
    }
    if let Some(n) = int("max_pixels") {
        cfg.max_pixels = n as usize;
    }
    let triple = |k: &str| -> Result<Option<[f64; 3]>, String> {
        match v.get(k) {
            None => Ok(None),
            Some(a) => {
                let xs: Vec<f64> = a.as_array().into_iter().flatten().filter_map(Value::as_f64).collect();
                <[f64; 3]>::try_from(xs).map(Some).map_err(|_| format!("\"{k}\" must be three numbers"))
            }
        }
    };
    if let Some(m) = triple("image_mean")? {
        cfg.image_mean = m;
    }
    if let Some(s) = triple("image_std")? {
        cfg.image_std = s;
    }
    Ok(())
}
