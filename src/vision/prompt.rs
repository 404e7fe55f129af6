//! A vision-language model's images in a prompt: the loaded vision part of a checkpoint
//! ([`Vision`]: tower, token ids, preprocessing), and [`Vision::attach`], which turns a prompt
//! rendered with one `<|image_pad|>` per image into what the decoder and the batching engine take —
//! one pad per merged image row, the tower's rows for them, M-RoPE positions, and prefix-cache
//! keys that tell images apart.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::cache::{EmbedCache, ImageKey};
use super::{ImageInput, PreprocessConfig};
use crate::backend::Backend;
use crate::model::llama::MmPrompt;
use crate::model::vision::{mrope_positions, ImageEncoder, VisionConfig, VisionTokenIds, VisionTower};
use crate::model::weights::safetensors::SafetensorsDir;

/// Bytes of tower output kept per model for images seen again ([`EmbedCache`]): three camera
/// frames at max_pixels 1003520 on Qwen2-VL-7B (1222 tokens × 3584 × 4 bytes ≈ 17.5 MB each).
pub const EMBED_CACHE_BYTES: usize = 64 << 20;

/// The vision part of a loaded model.
pub struct Vision {
    /// The tower, on the backend of the model's decoder (its own CPU pool or CUDA stream).
    pub tower: Box<dyn ImageEncoder>,
    pub tokens: VisionTokenIds,
    pub preprocess: PreprocessConfig,
    cache: Mutex<EmbedCache>,
    /// Tower runs in progress.
    encoding: AtomicUsize,
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
    /// `stop` said to stop (the client has gone; nobody reads this).
    #[error("the request was cancelled while its images were being encoded")]
    Cancelled,
}

impl Vision {
    /// The vision part of the Hugging Face checkpoint in `dir` (`config` is its config.json),
    /// or `None` when it has no `vision_config`. `preprocessor_config.json`, when present,
    /// overrides the pixel budget and normalization.
    /// `llm_hidden` is the language model's width, which the tower's output must have; the
    /// tower's weights go onto `backend`.
    pub fn load<B: Backend>(
        dir: &Path,
        config: &Value,
        st: &SafetensorsDir,
        llm_hidden: usize,
        backend: impl FnOnce() -> Result<B, String>,
    ) -> Result<Option<Self>, String> {
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
        let tower = VisionTower::from_safetensors(backend()?, st, vc).map_err(|e| e.to_string())?;
        Ok(Some(Self::new(Box::new(tower), tokens, preprocess)))
    }

    /// A vision part from its pieces, with an empty embedding cache of [`EMBED_CACHE_BYTES`].
    pub fn new(tower: Box<dyn ImageEncoder>, tokens: VisionTokenIds, preprocess: PreprocessConfig) -> Self {
        let cache = Mutex::new(EmbedCache::new(EMBED_CACHE_BYTES));
        Self { tower, tokens, preprocess, cache, encoding: AtomicUsize::new(0) }
    }

    /// Tower runs in progress now.
    pub fn encoding(&self) -> usize {
        self.encoding.load(Ordering::Relaxed)
    }

    /// This model's tower output for an image (file SHA-256 and grid, as [`crate::vision::probe`]
    /// gives them before decoding), when it is still cached: the caller then skips decoding and
    /// passes it on in [`ImageInput::embeds`]. The returned rows stay valid even if the entry is
    /// evicted meanwhile.
    pub fn cached(&self, hash: [u8; 32], grid_thw: [usize; 3]) -> Option<Arc<[f32]>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).peek(&(hash, grid_thw))
    }

    /// The embedding cache's bytes, entries, hits and misses.
    pub fn cache_stats(&self) -> (usize, usize, u64, u64) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).stats()
    }

    /// Expands each `<|image_pad|>` of `prompt` (one per image, in order) to the image's merged
    /// rows, runs the tower on the images it has not seen recently, and returns the new prompt
    /// with its [`MmPrompt`]. A prompt that would not leave a token of `context` is refused
    /// before the (costly) tower runs; `stop`, asked between tower blocks, abandons the work
    /// ([`AttachError::Cancelled`]) when the client has gone.
    pub fn attach(
        &self,
        prompt: &[u32],
        images: &[ImageInput],
        context: usize,
        stop: &dyn Fn() -> bool,
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
        let (positions, rope_delta) =
            mrope_positions(&ids, &grids, pad, self.tokens.vision_start, self.tower.config().spatial_merge_size)
                .map_err(|e| AttachError::Positions(e.to_string()))?;
        let embeds = self.embed(images, stop)?;
        debug_assert_eq!(embeds.len(), embed_rows.len() * self.tower.config().out_hidden);
        Ok((ids, MmPrompt { positions, rope_delta, embed_rows, embeds, key_ids }))
    }
}

impl Vision {
    /// The tower's output for `images`, in order: cached images as they were, the others (each
    /// distinct one once) from one tower run, then cached. Images never attend to each other, so
    /// an image's rows are the same alone or with others (tests/qwen2_vl_golden.rs).
    fn embed(&self, images: &[ImageInput], stop: &dyn Fn() -> bool) -> Result<Vec<f32>, AttachError> {
        let key = |i: &ImageInput| -> ImageKey { (i.hash, i.grid_thw) };
        let mut found: HashMap<ImageKey, Arc<[f32]>> = HashMap::new();
        let mut todo: Vec<&ImageInput> = Vec::new();
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            for image in images {
                let k = key(image);
                if found.contains_key(&k) || todo.iter().any(|t| key(t) == k) {
                    continue;
                }
                if let Some(e) = &image.embeds {
                    cache.record_hit();
                    found.insert(k, e.clone());
                    continue;
                }
                match cache.get(&k) {
                    Some(v) => {
                        found.insert(k, v);
                    }
                    None => todo.push(image),
                }
            }
        }
        if !todo.is_empty() {
            let grids: Vec<[usize; 3]> = todo.iter().map(|i| i.grid_thw).collect();
            let pixels: Vec<f32> = todo.iter().flat_map(|i| i.pixel_values.iter().copied()).collect();
            struct Running<'a>(&'a AtomicUsize);
            impl Drop for Running<'_> {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::Relaxed);
                }
            }
            self.encoding.fetch_add(1, Ordering::Relaxed);
            let running = Running(&self.encoding);
            let out = self.tower.forward_until(&pixels, &grids, stop);
            drop(running);
            let out = out.ok_or(AttachError::Cancelled)?;
            let hidden = self.tower.config().out_hidden;
            let mut rest = out.as_slice();
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            for image in todo {
                let (mine, tail) = rest.split_at(image.llm_tokens() * hidden);
                rest = tail;
                let v: Arc<[f32]> = mine.into();
                cache.insert(key(image), v.clone());
                found.insert(key(image), v);
            }
        }
        Ok(images.iter().flat_map(|i| found[&key(i)].iter().copied()).collect())
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

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn tiny() -> Vision {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_vl_tiny");
        let config: Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let st = SafetensorsDir::open(&dir).unwrap();
        let be = || Ok(crate::backend::cpu::CpuBackend::new(2));
        Vision::load(&dir, &config, &st, 64, be).unwrap().expect("a vision checkpoint")
    }

    /// A 2×4-patch image (2 merged tokens) whose pixels follow `seed`.
    fn image(seed: u8) -> ImageInput {
        let grid_thw = [1, 2, 4];
        let pixel_values =
            (0..8 * 1176).map(|i| ((i * 31 + usize::from(seed) * 17) % 97) as f32 / 48.0 - 1.0).collect();
        ImageInput { pixel_values, grid_thw, merge_size: 2, hash: [seed; 32], embeds: None }
    }

    /// A prompt with one `<|vision_start|><|image_pad|><|vision_end|>` per image.
    fn prompt(v: &Vision, images: usize) -> Vec<u32> {
        let mut p = vec![1, 2];
        for _ in 0..images {
            p.extend([v.tokens.vision_start, v.tokens.image_pad, v.tokens.vision_end, 3]);
        }
        p
    }

    #[test]
    fn an_image_seen_again_reuses_its_embeddings() {
        let v = tiny();
        let (a, b) = (image(1), image(2));
        let blocks = Cell::new(0);
        let count = || {
            blocks.set(blocks.get() + 1);
            false
        };
        let (ids, first) = v.attach(&prompt(&v, 2), &[a.clone(), b.clone()], 512, &count).unwrap();
        assert_eq!(blocks.get(), 2, "one tower run over both images (2 blocks)");
        assert_eq!(v.cache_stats().1, 2);

        // The same two images again: no tower run, the same rows.
        let (ids2, again) = v.attach(&prompt(&v, 2), &[a.clone(), b.clone()], 512, &count).unwrap();
        assert_eq!(blocks.get(), 2, "the tower ran for cached images");
        assert_eq!((ids2, &again.embeds), (ids, &first.embeds));

        // b cached, c new, a repeated: the tower runs for c only, and every image's rows are what
        // a run of its own gives.
        let c = image(3);
        let (_, mixed) = v.attach(&prompt(&v, 3), &[b.clone(), c.clone(), a.clone()], 512, &count).unwrap();
        assert_eq!(blocks.get(), 4);
        let alone = |i: &ImageInput| v.tower.forward(&i.pixel_values, &[i.grid_thw]);
        let want: Vec<f32> = [&b, &c, &a].into_iter().flat_map(alone).collect();
        assert_eq!(mixed.embeds, want);
        let (_, entries, hits, _) = v.cache_stats();
        assert_eq!((entries, hits), (3, 4));

        // One new image twice in a request: encoded once.
        let d = image(4);
        let (_, twice) = v.attach(&prompt(&v, 2), &[d.clone(), d.clone()], 512, &count).unwrap();
        assert_eq!(blocks.get(), 6);
        let n = twice.embeds.len() / 2;
        assert_eq!(twice.embeds[..n], twice.embeds[n..]);
    }

    /// The request path looks an image up before decoding it: what `cached` returns, passed on
    /// without pixels, gives the same prompt as the pixels did, without the tower, counted once.
    #[test]
    fn a_cached_image_needs_no_pixels() {
        let v = tiny();
        let a = image(1);
        assert!(v.cached(a.hash, a.grid_thw).is_none());
        let (ids, first) = v.attach(&prompt(&v, 1), std::slice::from_ref(&a), 512, &|| false).unwrap();
        let rows = v.cached(a.hash, a.grid_thw).expect("cached after the first run");
        assert_eq!(&rows[..], &first.embeds[..]);
        assert!(v.cached(a.hash, [1, 4, 2]).is_none(), "another grid is another entry");
        let no_pixels = ImageInput { pixel_values: Vec::new(), embeds: Some(rows), ..a.clone() };
        let (ids2, again) = v.attach(&prompt(&v, 1), &[no_pixels], 512, &|| panic!("the tower must not run")).unwrap();
        assert_eq!((ids2, again.embeds, again.key_ids), (ids, first.embeds, first.key_ids));
        let (_, entries, hits, misses) = v.cache_stats();
        assert_eq!((entries, hits, misses), (1, 1, 1));
    }

    #[test]
    fn a_stop_abandons_the_tower_between_blocks_and_caches_nothing() {
        let v = tiny();
        let asked = Cell::new(0);
        let stop_at_second = || {
            asked.set(asked.get() + 1);
            asked.get() == 2
        };
        let e = v.attach(&prompt(&v, 1), &[image(1)], 512, &stop_at_second).unwrap_err();
        assert!(matches!(e, AttachError::Cancelled), "{e}");
        assert_eq!(asked.get(), 2, "stopped at the second block");
        assert_eq!(v.cache_stats().1, 0);
        // Refusals that need no tower come first.
        let e = v.attach(&prompt(&v, 1), &[image(1)], 5, &|| panic!("the tower must not run")).unwrap_err();
        assert!(matches!(e, AttachError::TooLong { .. }), "{e}");
    }
}
