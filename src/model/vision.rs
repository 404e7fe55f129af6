//! Qwen2-VL's vision tower (`visual.*`) in plain f32 on the CPU, and the multimodal rotary
//! positions of a prompt that holds images (transformers' `get_rope_index`).
//!
//! This is the oracle for a later backend version: every step is one of the small functions in
//! [`ops`] (linear, LayerNorm, rotary from an angle table, attention within spans, QuickGELU, erf
//! GELU, add), each a candidate backend op, and [`VisionTower::forward`] only strings them
//! together. Semantics follow transformers 4.46.3 `modeling_qwen2_vl.py` (summarized in the
//! shared model-formats reference §3.1 and §3.4), checked by `tests/qwen2_vl_golden.rs` against
//! a tiny checkpoint written by transformers.
//!
//! The tower, for `pixel_values` `[Σ t·h·w, C·T·P·P]` (rows in 2×2-merge-block order, as the image
//! processor emits them) and the images' patch grids `(t, h, w)`:
//! 1. patch embedding: the Conv3d with kernel = stride is a matmul with its weight viewed as
//!    `[embed, C·T·P·P]`;
//! 2. `depth` pre-norm blocks: `x += proj(attn(LN1(x)))`, `x += fc2(quick_gelu(fc1(LN2(x))))`, where
//!    attention is bidirectional within each image frame (`cu_seqlens`) and q, k are rotated by a
//!    2-D rotary embedding: the first half of each head's frequencies turn with the patch row, the
//!    second half with the patch column;
//! 3. the merger: LayerNorm each row, view each 2×2 block's 4 consecutive rows as one row,
//!    Linear, exact (erf) GELU, Linear to the language model's width.

use std::ops::Range;

use safetensors::Dtype;
use serde_json::Value;

use crate::backend::cpu::blocks::dequantize_row;
use crate::backend::GgmlType;
use crate::model::config::ConfigError;
use crate::model::weights::safetensors::SafetensorsDir;

/// `VisionRotaryEmbedding`'s base; not in config.json (hard-coded in transformers).
pub const VISION_ROPE_THETA: f32 = 10000.0;
/// Epsilon of every LayerNorm in the tower (`norm1`, `norm2`, `merger.ln_q`); hard-coded too.
pub const VISION_LN_EPS: f32 = 1e-6;

#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("tensor '{0}' is missing from the model file")]
    MissingTensor(String),
    #[error("tensor '{name}' has shape {found:?}, expected {expected:?}")]
    Shape { name: String, found: Vec<usize>, expected: Vec<usize> },
    #[error("tensor '{name}': dtype {dtype} is not a float type (F16, BF16, F32)")]
    Dtype { name: String, dtype: String },
    #[error("image input: {0}")]
    Input(String),
}

/// The `vision_config` block of a Qwen2-VL config.json.
///
/// transformers' `save_pretrained` writes only the fields that differ from its defaults (a saved
/// tiny model's block may hold just depth, embed_dim, hidden_size, num_heads), so the fields with
/// a transformers default take that default here too; the four that size the tower are required.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    /// Transformer blocks (`depth`).
    pub depth: usize,
    /// Width of the patch rows inside the tower (`embed_dim`, 1280 in Qwen2-VL-7B).
    pub embed_dim: usize,
    pub num_heads: usize,
    /// Width of each block's MLP: `int(embed_dim · mlp_ratio)`.
    pub mlp_hidden: usize,
    /// Width of the merger output, which must equal the language model's hidden size
    /// (`hidden_size` of the vision block, 3584 in Qwen2-VL-7B).
    pub out_hidden: usize,
    /// Colour channels (`in_channels`, which transformers reads; real configs say `in_chans`).
    pub in_channels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    /// Side of the square of patches merged into one language-model token.
    pub spatial_merge_size: usize,
}

impl VisionConfig {
    /// Qwen2-VL-7B-Instruct's tower: 32 blocks of width 1280, 16 heads, MLP 5120, merger into
    /// the 3584-wide language model.
    pub fn qwen2_vl_7b() -> Self {
        Self {
            depth: 32,
            embed_dim: 1280,
            num_heads: 16,
            mlp_hidden: 5120,
            out_hidden: 3584,
            in_channels: 3,
            patch_size: 14,
            temporal_patch_size: 2,
            spatial_merge_size: 2,
        }
    }

    /// Floating-point operations of one forward over images of `grids`: the linears (2 per
    /// multiply-add) and attention's two products within each image (`4·n²·embed` per block).
    pub fn flops(&self, grids: &[[usize; 3]]) -> f64 {
        let e = self.embed_dim as f64;
        let patches: f64 = grids.iter().map(|g| g.iter().product::<usize>() as f64).sum();
        let per_block = 2.0 * e * (3.0 * e + e + 2.0 * self.mlp_hidden as f64);
        let merged = e * self.merge_unit() as f64;
        let linear = patches * 2.0 * e * self.patch_cols() as f64
            + patches * self.depth as f64 * per_block
            + patches / self.merge_unit() as f64 * 2.0 * merged * (merged + self.out_hidden as f64);
        let attn: f64 =
            grids.iter().map(|&[t, h, w]| t as f64 * 4.0 * ((h * w) as f64).powi(2) * e * self.depth as f64).sum();
        linear + attn
    }

    /// Reads `vision_config` from a whole Qwen2-VL config.json. Errors name the field.
    pub fn from_hf_json(config: &Value) -> Result<Self, ConfigError> {
        let bad = |m: String| ConfigError::Invalid(format!("config.json: {m}"));
        let v = config
            .get("vision_config")
            .filter(|v| v.is_object())
            .ok_or_else(|| bad("no \"vision_config\" object (not a Qwen2-VL config)".into()))?;
        let int = |k: &str, default: Option<usize>| -> Result<usize, ConfigError> {
            match v.get(k) {
                None | Some(Value::Null) => default.ok_or_else(|| bad(format!("\"vision_config.{k}\" is missing"))),
                Some(x) => x
                    .as_u64()
                    .filter(|&x| x > 0 && x <= 1 << 24)
                    .map(|x| x as usize)
                    .ok_or_else(|| bad(format!("\"vision_config.{k}\" must be a positive integer up to 2^24"))),
            }
        };
        let depth = int("depth", None)?;
        if depth > 1024 {
            return Err(bad(format!("\"vision_config.depth\" {depth} is beyond any real model")));
        }
        let embed_dim = int("embed_dim", None)?;
        let num_heads = int("num_heads", None)?;
        let out_hidden = int("hidden_size", None)?;
        if embed_dim % num_heads != 0 || (embed_dim / num_heads) % 4 != 0 {
            // The 2-D rotary gives each of h and w a quarter of the head's dimensions.
            return Err(bad(format!(
                "\"vision_config.embed_dim\" {embed_dim} over \"vision_config.num_heads\" {num_heads} must give a \
                 head dimension divisible by 4"
            )));
        }
        let mlp_ratio = match v.get("mlp_ratio") {
            None | Some(Value::Null) => 4.0,
            Some(x) => x
                .as_f64()
                .filter(|r| *r > 0.0 && *r <= 64.0)
                .ok_or_else(|| bad("\"vision_config.mlp_ratio\" must be a number in (0, 64]".into()))?,
        };
        // transformers: int(embed_dim * mlp_ratio), truncation.
        let mlp_hidden = (embed_dim as f64 * mlp_ratio) as usize;
        if mlp_hidden == 0 {
            return Err(bad("\"vision_config.mlp_ratio\" gives an empty MLP".into()));
        }
        let in_channels =
            match (v.get("in_channels").filter(|x| !x.is_null()), v.get("in_chans").filter(|x| !x.is_null())) {
                (Some(_), Some(_)) if v["in_channels"] != v["in_chans"] => {
                    return Err(bad("\"vision_config.in_channels\" and \"vision_config.in_chans\" disagree".into()))
                }
                (Some(_), _) => int("in_channels", None)?,
                (None, Some(_)) => int("in_chans", None)?,
                (None, None) => 3,
            };
        match v.get("hidden_act").and_then(|a| a.as_str()) {
            None | Some("quick_gelu") => {}
            Some(other) => {
                return Err(bad(format!("\"vision_config.hidden_act\" '{other}' is not supported (quick_gelu)")))
            }
        }
        let cfg = Self {
            depth,
            embed_dim,
            num_heads,
            mlp_hidden,
            out_hidden,
            in_channels,
            patch_size: int("patch_size", Some(14))?,
            temporal_patch_size: int("temporal_patch_size", Some(2))?,
            spatial_merge_size: int("spatial_merge_size", Some(2))?,
        };
        if cfg.patch_cols() > 1 << 24 {
            return Err(bad("\"vision_config.patch_size\" gives patches beyond any real model".into()));
        }
        Ok(cfg)
    }

    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    /// Values per `pixel_values` row: `C · T · P · P` (3·2·14·14 = 1176).
    pub fn patch_cols(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Patch rows merged into one output row (4).
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }
}

/// The special token ids of image prompts (top-level config.json fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VisionTokenIds {
    /// `<|image_pad|>` (`image_token_id`, 151655): one per merged image row.
    pub image_pad: u32,
    /// `<|vision_start|>` (`vision_start_token_id`, 151652).
    pub vision_start: u32,
    /// `<|vision_end|>` (`vision_end_token_id`, 151653).
    pub vision_end: u32,
}

impl VisionTokenIds {
    pub fn from_hf_json(config: &Value) -> Result<Self, ConfigError> {
        let id = |k: &str| -> Result<u32, ConfigError> {
            config
                .get(k)
                .and_then(|x| x.as_u64())
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| ConfigError::Invalid(format!("config.json: \"{k}\" must be a token id")))
        };
        Ok(Self {
            image_pad: id("image_token_id")?,
            vision_start: id("vision_start_token_id")?,
            vision_end: id("vision_end_token_id")?,
        })
    }
}

/// A linear layer `y = x · Wᵀ + b`, `w` is `[out, inp]`.
struct Linear {
    w: Vec<f32>,
    b: Vec<f32>,
    out: usize,
    inp: usize,
}

impl Linear {
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        ops::linear(x, self.inp, &self.w, self.out, Some(&self.b))
    }
}

struct LayerNorm {
    w: Vec<f32>,
    b: Vec<f32>,
}

impl LayerNorm {
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        ops::layer_norm(x, self.w.len(), &self.w, &self.b, VISION_LN_EPS)
    }
}

struct Block {
    norm1: LayerNorm,
    norm2: LayerNorm,
    /// `[3·embed, embed]`: output columns are q (heads-major), then k, then v.
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
}

/// The Qwen2-VL vision encoder with f32 weights.
pub struct VisionTower {
    pub config: VisionConfig,
    /// The Conv3d weight `[embed, C, T, P, P]` viewed as `[embed, C·T·P·P]` (no bias).
    patch_embed: Vec<f32>,
    blocks: Vec<Block>,
    ln_q: LayerNorm,
    /// `merger.mlp.0`: `[4·embed, 4·embed]`.
    merge_fc1: Linear,
    /// `merger.mlp.2`: `[out_hidden, 4·embed]`.
    merge_fc2: Linear,
    /// `head_dim / 4` inverse frequencies shared by the row and column halves.
    inv_freq: Vec<f32>,
}

/// Reads tensors below one name prefix, checking shapes, as f32.
struct Loader<'a> {
    st: &'a SafetensorsDir,
    prefix: &'static str,
}

impl Loader<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, VisionError> {
        let full = format!("{}{name}", self.prefix);
        let t = self.st.tensor(&full).ok_or_else(|| VisionError::MissingTensor(full.clone()))?;
        if t.shape != shape {
            return Err(VisionError::Shape { name: full, found: t.shape.clone(), expected: shape.to_vec() });
        }
        let dtype = match t.dtype {
            Dtype::F16 => GgmlType::F16,
            Dtype::BF16 => GgmlType::BF16,
            Dtype::F32 => GgmlType::F32,
            other => return Err(VisionError::Dtype { name: full, dtype: format!("{other:?}") }),
        };
        let mut out = vec![0.0; t.n_elements()];
        dequantize_row(dtype, self.st.data(t), &mut out);
        Ok(out)
    }

    fn linear(&self, name: &str, out: usize, inp: usize) -> Result<Linear, VisionError> {
        Ok(Linear {
            w: self.get(&format!("{name}.weight"), &[out, inp])?,
            b: self.get(&format!("{name}.bias"), &[out])?,
            out,
            inp,
        })
    }

    fn layer_norm(&self, name: &str, n: usize) -> Result<LayerNorm, VisionError> {
        Ok(LayerNorm { w: self.get(&format!("{name}.weight"), &[n])?, b: self.get(&format!("{name}.bias"), &[n])? })
    }
}

impl VisionTower {
    /// Loads the tower from a Qwen2-VL checkpoint: tensors `visual.*` (the published checkpoints,
    /// transformers 4.46's `save_pretrained`) or `model.visual.*` (later transformers versions
    /// nest the tower under `model.`), F16, BF16 or F32, converted to f32.
    pub fn from_safetensors(st: &SafetensorsDir, config: VisionConfig) -> Result<Self, VisionError> {
        let prefix = ["visual.", "model.visual."]
            .into_iter()
            .find(|p| st.tensor(&format!("{p}patch_embed.proj.weight")).is_some())
            .ok_or_else(|| VisionError::MissingTensor("visual.patch_embed.proj.weight".into()))?;
        let l = Loader { st, prefix };
        let c = &config;
        let e = c.embed_dim;
        let patch_embed =
            l.get("patch_embed.proj.weight", &[e, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size])?;
        let blocks = (0..c.depth)
            .map(|i| {
                let b = format!("blocks.{i}");
                Ok(Block {
                    norm1: l.layer_norm(&format!("{b}.norm1"), e)?,
                    norm2: l.layer_norm(&format!("{b}.norm2"), e)?,
                    qkv: l.linear(&format!("{b}.attn.qkv"), 3 * e, e)?,
                    proj: l.linear(&format!("{b}.attn.proj"), e, e)?,
                    fc1: l.linear(&format!("{b}.mlp.fc1"), c.mlp_hidden, e)?,
                    fc2: l.linear(&format!("{b}.mlp.fc2"), e, c.mlp_hidden)?,
                })
            })
            .collect::<Result<Vec<_>, VisionError>>()?;
        let merged = e * c.merge_unit();
        let ln_q = l.layer_norm("merger.ln_q", e)?;
        let merge_fc1 = l.linear("merger.mlp.0", merged, merged)?;
        let merge_fc2 = l.linear("merger.mlp.2", c.out_hidden, merged)?;
        // VisionRotaryEmbedding(dim = head_dim / 2): inv_freq[j] = θ^(−2j/dim), j < dim/2.
        let dim = c.head_dim() / 2;
        let inv_freq = (0..dim / 2).map(|j| 1.0 / VISION_ROPE_THETA.powf((2 * j) as f32 / dim as f32)).collect();
        Ok(Self { config, patch_embed, blocks, ln_q, merge_fc1, merge_fc2, inv_freq })
    }

    /// A tower of `config`'s shapes with pseudo-random weights (`seed`), for benchmarks of
    /// shapes whose checkpoint is not at hand.
    pub fn synthetic(config: VisionConfig, seed: u64) -> Self {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut vec = |n: usize, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
                })
                .collect()
        };
        let c = &config;
        let e = c.embed_dim;
        let mut linear = |out: usize, inp: usize| Linear {
            w: vec(out * inp, 2.0 / (inp as f32).sqrt()),
            b: vec(out, 0.02),
            out,
            inp,
        };
        let ln = |n: usize| LayerNorm { w: vec![1.0; n], b: vec![0.0; n] };
        let blocks = (0..c.depth)
            .map(|_| Block {
                norm1: ln(e),
                norm2: ln(e),
                qkv: linear(3 * e, e),
                proj: linear(e, e),
                fc1: linear(c.mlp_hidden, e),
                fc2: linear(e, c.mlp_hidden),
            })
            .collect();
        let merged = e * c.merge_unit();
        let (merge_fc1, merge_fc2) = (linear(merged, merged), linear(c.out_hidden, merged));
        let patch_embed = linear(e, c.patch_cols()).w;
        let dim = c.head_dim() / 2;
        let inv_freq = (0..dim / 2).map(|j| 1.0 / VISION_ROPE_THETA.powf((2 * j) as f32 / dim as f32)).collect();
        Self { config, patch_embed, blocks, ln_q: ln(e), merge_fc1, merge_fc2, inv_freq }
    }

    /// Checks `pixel_values` (length) against the grids; returns the output rows
    /// (`Σ t·h·w / merge²`).
    pub fn check_input(&self, pixel_len: usize, grid_thw: &[[usize; 3]]) -> Result<usize, VisionError> {
        let c = &self.config;
        let m = c.spatial_merge_size;
        let mut rows = 0usize;
        for (i, &[t, h, w]) in grid_thw.iter().enumerate() {
            if t == 0 || h == 0 || w == 0 || h % m != 0 || w % m != 0 {
                return Err(VisionError::Input(format!(
                    "image {i}: grid ({t}, {h}, {w}) must be positive with h and w multiples of {m}"
                )));
            }
            rows = t
                .checked_mul(h)
                .and_then(|x| x.checked_mul(w))
                .and_then(|x| x.checked_add(rows))
                .ok_or_else(|| VisionError::Input(format!("image {i}: grid ({t}, {h}, {w}) is too large")))?;
        }
        if grid_thw.is_empty() || rows.checked_mul(c.patch_cols()) != Some(pixel_len) {
            return Err(VisionError::Input(format!(
                "{pixel_len} pixel values for {} image(s) of {rows} patches of {} values",
                grid_thw.len(),
                c.patch_cols()
            )));
        }
        Ok(rows / c.merge_unit())
    }

    /// The tower's output for `pixel_values` (`[Σ t·h·w, patch_cols]`, row-major, rows of each
    /// image in 2×2-block order as the image processor emits them) of the images with patch
    /// grids `grid_thw`: `[Σ t·h·w / merge², out_hidden]`, each image's rows in raster order of its
    /// merged grid, images in order. Images never attend to each other, so running several
    /// together equals running them one by one.
    ///
    /// Panics when the input does not match the grids (see [`Self::check_input`]).
    pub fn forward(&self, pixel_values: &[f32], grid_thw: &[[usize; 3]]) -> Vec<f32> {
        self.forward_until(pixel_values, grid_thw, &|| false).expect("never stopped")
    }

    /// [`Self::forward`], asking `stop` before each block (a 7B tower's block over a camera frame
    /// takes a noticeable time): `None` once it says to stop, e.g. when the client has gone.
    pub fn forward_until(
        &self,
        pixel_values: &[f32],
        grid_thw: &[[usize; 3]],
        stop: &dyn Fn() -> bool,
    ) -> Option<Vec<f32>> {
        let out_rows = self.check_input(pixel_values.len(), grid_thw).unwrap_or_else(|e| panic!("{e}"));
        let c = &self.config;
        let (e, heads, d) = (c.embed_dim, c.num_heads, c.head_dim());

        // 1. Patch embedding.
        let mut x = ops::linear(pixel_values, c.patch_cols(), &self.patch_embed, e, None);

        // Rotary angles per patch row (shared by every block and head) and attention spans.
        let angles = rope_angles(&patch_positions(grid_thw, c.spatial_merge_size), &self.inv_freq);
        let spans = frame_spans(grid_thw);

        // 2. Blocks.
        for b in &self.blocks {
            if stop() {
                return None;
            }
            let h = b.norm1.forward(&x);
            let mut qkv = b.qkv.forward(&h);
            ops::rope_from_angles(&mut qkv, 3 * e, 0, heads, d, &angles);
            ops::rope_from_angles(&mut qkv, 3 * e, e, heads, d, &angles);
            let attn = ops::attention_spans(&qkv, heads, d, &spans);
            ops::add(&mut x, &b.proj.forward(&attn));
            let h = b.norm2.forward(&x);
            let mut m = b.fc1.forward(&h);
            ops::quick_gelu(&mut m);
            ops::add(&mut x, &b.fc2.forward(&m));
        }

        // 3. Merger: the 4 rows of each block are consecutive, so the [rows, e] matrix read as
        // [rows/4, 4e] is the merged input.
        let h = self.ln_q.forward(&x);
        let mut m = self.merge_fc1.forward(&h);
        ops::gelu_erf(&mut m);
        let out = self.merge_fc2.forward(&m);
        debug_assert_eq!(out.len(), out_rows * c.out_hidden);
        Some(out)
    }
}

/// Each patch row's `(h, w)` in its image's patch grid, rows in the 2×2-block order:
/// row `((t·(H/m) + bh)·(W/m) + bw)·m² + mh·m + mw` is patch `(bh·m + mh, bw·m + mw)`; every frame
/// of an image repeats the same positions.
pub fn patch_positions(grid_thw: &[[usize; 3]], merge: usize) -> Vec<[u32; 2]> {
    let mut pos = Vec::new();
    for &[t, h, w] in grid_thw {
        for _ in 0..t {
            for bh in 0..h / merge {
                for bw in 0..w / merge {
                    for mh in 0..merge {
                        for mw in 0..merge {
                            pos.push([(bh * merge + mh) as u32, (bw * merge + mw) as u32]);
                        }
                    }
                }
            }
        }
    }
    pos
}

/// Rotary angles `[rows, 2·inv_freq.len()]`: a row at `(h, w)` gets `h·f_j` then `w·f_j` (f32 product,
/// as transformers computes its `freqs` table).
pub fn rope_angles(positions: &[[u32; 2]], inv_freq: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(positions.len() * 2 * inv_freq.len());
    for &[h, w] in positions {
        out.extend(inv_freq.iter().map(|f| h as f32 * f));
        out.extend(inv_freq.iter().map(|f| w as f32 * f));
    }
    out
}

/// Attention spans (`cu_seqlens`): one per frame of each image, `h·w` rows each.
pub fn frame_spans(grid_thw: &[[usize; 3]]) -> Vec<Range<usize>> {
    let mut spans = Vec::new();
    let mut at = 0;
    for &[t, h, w] in grid_thw {
        for _ in 0..t {
            spans.push(at..at + h * w);
            at += h * w;
        }
    }
    spans
}

/// Why [`mrope_positions`] cannot place a prompt's images.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MropeError {
    #[error("the prompt has {found} image(s) (vision_start followed by image_pad), but {grids} grid(s) were given")]
    ImageCount { found: usize, grids: usize },
    #[error("image {image}: expected {expected} image_pad tokens from index {at}, found {found}")]
    PadRun { image: usize, at: usize, expected: usize, found: usize },
    #[error("image_pad token at index {0} is not part of an image")]
    StrayPad(usize),
    #[error("image {image}: grid ({t}, {h}, {w}) is not divisible by the merge size {merge}")]
    Grid { image: usize, t: usize, h: usize, w: usize, merge: usize },
}

/// The M-RoPE positions `(t, h, w)` of every token of a prompt holding images, and the rope delta
/// (transformers 4.46.3 `Qwen2VLForConditionalGeneration.get_rope_index`, one sequence, no
/// padding, images only).
///
/// Text tokens advance all three components together. An image whose merged grid is
/// `t × h' × w'` (`h' = h/merge`, `w' = w/merge`) occupies `t·h'·w'` image pads starting at `base` =
/// the position the first pad would have had as text; pad `(tt, i, j)` in raster order gets
/// `(base + tt, base + i, base + j)`. The next token continues at the largest position so far + 1.
/// `rope_delta = max position + 1 − ids.len()` (≤ 0 for images): a token appended at sequence
/// index `k` (decoding) is at position `k + rope_delta` on all three components.
///
/// Images are found as transformers does, by `vision_start_id` followed by `image_pad_id`, in
/// order; `grids[i]` is image `i`'s patch grid `(t, h, w)`. Unlike transformers, which trusts the
/// pads, each image's pad run must be exactly its merged size and every pad must belong to an
/// image (a pad count that does not match the vision tower's rows would otherwise misplace
/// positions silently).
pub fn mrope_positions(
    ids: &[u32],
    grids: &[[usize; 3]],
    image_pad_id: u32,
    vision_start_id: u32,
    merge: usize,
) -> Result<(Vec<[u32; 3]>, i64), MropeError> {
    let starts: Vec<usize> =
        (0..ids.len().saturating_sub(1)).filter(|&i| ids[i] == vision_start_id && ids[i + 1] == image_pad_id).collect();
    if starts.len() != grids.len() {
        return Err(MropeError::ImageCount { found: starts.len(), grids: grids.len() });
    }
    let mut pos: Vec<[u32; 3]> = Vec::with_capacity(ids.len());
    // The next text position: the largest position so far + 1.
    let mut next: u32 = 0;
    let mut cursor = 0;
    let text = |pos: &mut Vec<[u32; 3]>, next: &mut u32, n: usize| {
        for _ in 0..n {
            pos.push([*next; 3]);
            *next += 1;
        }
    };
    for (image, (&vs, &[t, h, w])) in starts.iter().zip(grids).enumerate() {
        if merge == 0 || t == 0 || h == 0 || w == 0 || h % merge != 0 || w % merge != 0 {
            return Err(MropeError::Grid { image, t, h, w, merge });
        }
        let (gh, gw) = (h / merge, w / merge);
        let first_pad = vs + 1;
        if let Some(i) = (cursor..first_pad).find(|&i| ids[i] == image_pad_id) {
            return Err(MropeError::StrayPad(i));
        }
        text(&mut pos, &mut next, first_pad - cursor);
        let n = t * gh * gw;
        let found = ids[first_pad..].iter().take_while(|&&x| x == image_pad_id).count();
        if found != n {
            return Err(MropeError::PadRun { image, at: first_pad, expected: n, found });
        }
        let base = next;
        for tt in 0..t {
            for i in 0..gh {
                for j in 0..gw {
                    pos.push([base + tt as u32, base + i as u32, base + j as u32]);
                }
            }
        }
        next = base + t.max(gh).max(gw) as u32;
        cursor = first_pad + n;
    }
    if let Some(i) = (cursor..ids.len()).find(|&i| ids[i] == image_pad_id) {
        return Err(MropeError::StrayPad(i));
    }
    text(&mut pos, &mut next, ids.len() - cursor);
    // `next` is the largest position + 1 (0 for an empty prompt).
    let delta = next as i64 - ids.len() as i64;
    Ok((pos, delta))
}

/// The tower's ops, plain f32 loops (rows in parallel), each the semantics of a backend op.
/// Activations are row-major `[rows, cols]`.
pub mod ops {
    use std::ops::Range;

    use rayon::prelude::*;

    use crate::backend::cpu::dot;

    /// `x [n, k] · w[m, k]ᵀ (+ b)` → `[n, m]`.
    pub fn linear(x: &[f32], k: usize, w: &[f32], m: usize, b: Option<&[f32]>) -> Vec<f32> {
        assert!(k > 0 && x.len().is_multiple_of(k) && w.len() == m * k && b.is_none_or(|b| b.len() == m));
        let n = x.len() / k;
        let mut out = vec![0.0; n * m];
        out.par_chunks_mut(m).zip(x.par_chunks(k)).for_each(|(o, xr)| {
            for (j, (oj, wr)) in o.iter_mut().zip(w.chunks_exact(k)).enumerate() {
                *oj = dot(xr, wr) + b.map_or(0.0, |b| b[j]);
            }
        });
        out
    }

    /// LayerNorm over each row: `(x − mean) / sqrt(var + eps) · w + b` (biased variance).
    pub fn layer_norm(x: &[f32], cols: usize, w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
        assert!(w.len() == cols && b.len() == cols && x.len().is_multiple_of(cols));
        let mut out = vec![0.0; x.len()];
        out.par_chunks_mut(cols).zip(x.par_chunks(cols)).for_each(|(o, xr)| {
            let mean = xr.iter().sum::<f32>() / cols as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / cols as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for i in 0..cols {
                o[i] = (xr[i] - mean) * inv * w[i] + b[i];
            }
        });
        out
    }

    /// Rotate-half rotary embedding of `n_heads` heads of `head_dim` starting at column `col0` of
    /// each row (row length `cols`), with explicit angles `[rows, head_dim/2]`: dimension `i` and
    /// `i + head_dim/2` of a head turn by `angles[row][i]`. (Covers 1-D, the vision 2-D and M-RoPE
    /// alike: they differ only in how the angle table is filled.)
    pub fn rope_from_angles(x: &mut [f32], cols: usize, col0: usize, n_heads: usize, head_dim: usize, angles: &[f32]) {
        let half = head_dim / 2;
        assert!(
            x.len().is_multiple_of(cols) && col0 + n_heads * head_dim <= cols && angles.len() == x.len() / cols * half
        );
        x.par_chunks_mut(cols).zip(angles.par_chunks(half)).for_each(|(row, ang)| {
            let (cos, sin): (Vec<f32>, Vec<f32>) = ang.iter().map(|a| (a.cos(), a.sin())).unzip();
            for h in 0..n_heads {
                let head = &mut row[col0 + h * head_dim..col0 + (h + 1) * head_dim];
                for i in 0..half {
                    let (x0, x1) = (head[i], head[i + half]);
                    head[i] = x0 * cos[i] - x1 * sin[i];
                    head[i + half] = x1 * cos[i] + x0 * sin[i];
                }
            }
        });
    }

    /// Bidirectional multi-head attention within spans of rows. `qkv` rows are `[q | k | v]`,
    /// each `n_heads · head_dim` wide, heads-major; a row attends to every row of its span (and
    /// only those), scale `1/sqrt(head_dim)`, softmax in f32. Returns `[rows, n_heads·head_dim]`;
    /// the spans must tile `0..rows`.
    pub fn attention_spans(qkv: &[f32], n_heads: usize, head_dim: usize, spans: &[Range<usize>]) -> Vec<f32> {
        let e = n_heads * head_dim;
        let rows = qkv.len() / (3 * e);
        assert!(qkv.len() == rows * 3 * e);
        let mut span_of = vec![usize::MAX; rows];
        let mut at = 0;
        for (s, r) in spans.iter().enumerate() {
            assert_eq!(r.start, at, "spans must tile the rows");
            span_of[r.clone()].fill(s);
            at = r.end;
        }
        assert_eq!(at, rows, "spans must tile the rows");
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut out = vec![0.0; rows * e];
        out.par_chunks_mut(e).enumerate().for_each(|(r, o)| {
            let span = spans[span_of[r]].clone();
            let mut scores = vec![0.0f32; span.len()];
            for h in 0..n_heads {
                let q = &qkv[r * 3 * e + h * head_dim..][..head_dim];
                for (s, p) in scores.iter_mut().zip(span.clone()) {
                    let k = &qkv[p * 3 * e + e + h * head_dim..][..head_dim];
                    *s = dot(q, k) * scale;
                }
                let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let oh = &mut o[h * head_dim..(h + 1) * head_dim];
                for (s, p) in scores.iter().zip(span.clone()) {
                    let v = &qkv[p * 3 * e + 2 * e + h * head_dim..][..head_dim];
                    let wgt = s / sum;
                    for j in 0..head_dim {
                        oh[j] += wgt * v[j];
                    }
                }
            }
        });
        out
    }

    /// `x · sigmoid(1.702 · x)` in place (transformers' `quick_gelu`).
    pub fn quick_gelu(x: &mut [f32]) {
        x.par_iter_mut().for_each(|v| *v *= 1.0 / (1.0 + (-1.702 * *v).exp()));
    }

    /// Exact GELU `x · Φ(x) = x/2 · (1 + erf(x/√2))` in place (torch `nn.GELU()`); erf in f64.
    pub fn gelu_erf(x: &mut [f32]) {
        x.par_iter_mut().for_each(|v| {
            let xd = *v as f64;
            *v = (0.5 * xd * (1.0 + libm::erf(xd * std::f64::consts::FRAC_1_SQRT_2))) as f32;
        });
    }

    /// `acc += x`.
    pub fn add(acc: &mut [f32], x: &[f32]) {
        assert_eq!(acc.len(), x.len());
        acc.par_iter_mut().zip(x.par_iter()).for_each(|(a, b)| *a += b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cost model behind the image time-to-first-token estimate: Qwen2-VL-7B on a 1080p
    /// frame at max_pixels 1003520 (4888 patches, 1222 tokens) is about 6.2 TFLOP of linears
    /// and 3.9 TFLOP of attention (model-formats.md §3.1).
    #[test]
    fn tower_flops_match_the_worked_example() {
        let c = VisionConfig::qwen2_vl_7b();
        let all = c.flops(&[[1, 52, 94]]);
        let attn = 4.0 * 4888f64.powi(2) * 1280.0 * 32.0;
        assert!((attn / 1e12 - 3.91).abs() < 0.01);
        assert!(((all - attn) / 1e12 - 6.2).abs() < 0.1, "linears {} TFLOP", (all - attn) / 1e12);
        // A tiny synthetic tower runs and has the right output shape.
        let tiny = VisionConfig { depth: 1, embed_dim: 32, num_heads: 2, mlp_hidden: 64, out_hidden: 16, ..c };
        let t = VisionTower::synthetic(tiny, 3);
        let out = t.forward(&vec![0.5; 16 * t.config.patch_cols()], &[[1, 4, 4]]);
        assert_eq!(out.len(), 4 * 16);
        assert!(out.iter().all(|v| v.is_finite()));
    }

    /// The vision block of Qwen2-VL-7B-Instruct's config.json (as published; every field spelled
    /// out, `in_chans` rather than `in_channels`).
    fn qwen2_vl_7b() -> Value {
        serde_json::json!({
            "model_type": "qwen2_vl",
            "hidden_size": 3584,
            "image_token_id": 151655,
            "vision_start_token_id": 151652,
            "vision_end_token_id": 151653,
            "vision_config": {
                "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                "temporal_patch_size": 2
            }
        })
    }

    #[test]
    fn vision_config_reads_qwen2_vl_7b() {
        let c = VisionConfig::from_hf_json(&qwen2_vl_7b()).unwrap();
        assert_eq!(
            c,
            VisionConfig {
                depth: 32,
                embed_dim: 1280,
                num_heads: 16,
                mlp_hidden: 5120,
                out_hidden: 3584,
                in_channels: 3,
                patch_size: 14,
                temporal_patch_size: 2,
                spatial_merge_size: 2,
            }
        );
        assert_eq!((c.head_dim(), c.patch_cols(), c.merge_unit()), (80, 1176, 4));
        let ids = VisionTokenIds::from_hf_json(&qwen2_vl_7b()).unwrap();
        assert_eq!(ids, VisionTokenIds { image_pad: 151655, vision_start: 151652, vision_end: 151653 });
    }

    #[test]
    fn vision_config_defaults_what_save_pretrained_leaves_out_and_names_bad_fields() {
        // What transformers 4.46.3 writes for a tiny model: only non-default fields.
        let tiny = serde_json::json!({"vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 64, "in_chans": 3, "num_heads": 2}});
        let c = VisionConfig::from_hf_json(&tiny).unwrap();
        assert_eq!(
            (c.mlp_hidden, c.patch_size, c.temporal_patch_size, c.spatial_merge_size, c.in_channels),
            (128, 14, 2, 2, 3)
        );

        let err = |mut v: Value, path: &[&str], x: Value| {
            let mut at = &mut v;
            for p in &path[..path.len() - 1] {
                at = at.get_mut(*p).unwrap();
            }
            match x {
                Value::Null => {
                    at.as_object_mut().unwrap().remove(path[path.len() - 1]);
                }
                x => at[path[path.len() - 1]] = x,
            }
            VisionConfig::from_hf_json(&v).unwrap_err().to_string()
        };
        let e = err(qwen2_vl_7b(), &["vision_config", "embed_dim"], Value::Null);
        assert!(e.contains("vision_config.embed_dim") && e.contains("missing"), "{e}");
        let e = err(qwen2_vl_7b(), &["vision_config", "depth"], serde_json::json!(-1));
        assert!(e.contains("vision_config.depth"), "{e}");
        let e = err(qwen2_vl_7b(), &["vision_config", "num_heads"], serde_json::json!(3));
        assert!(e.contains("vision_config.num_heads"), "{e}");
        let e = err(qwen2_vl_7b(), &["vision_config", "hidden_act"], serde_json::json!("silu"));
        assert!(e.contains("vision_config.hidden_act"), "{e}");
        let e = err(qwen2_vl_7b(), &["vision_config", "in_channels"], serde_json::json!(4));
        assert!(e.contains("in_chans") && e.contains("disagree"), "{e}");
        let e = err(qwen2_vl_7b(), &["vision_config"], Value::Null);
        assert!(e.contains("vision_config"), "{e}");
        let e = VisionTokenIds::from_hf_json(&serde_json::json!({"image_token_id": 1, "vision_start_token_id": 2}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("vision_end_token_id"), "{e}");
    }

    #[test]
    fn patch_rows_are_in_two_by_two_block_order() {
        // A 4×6 grid: rows 0..4 are the block at (0, 0): (0,0) (0,1) (1,0) (1,1); the next block
        // is one block to the right.
        let p = patch_positions(&[[1, 4, 6]], 2);
        assert_eq!(p.len(), 24);
        assert_eq!(&p[..8], &[[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]);
        assert_eq!(&p[12..16], &[[2, 0], [2, 1], [3, 0], [3, 1]]);
        assert_eq!(p[23], [3, 5]);
        // Frames repeat positions; spans are per frame.
        let p2 = patch_positions(&[[2, 2, 2], [1, 2, 4]], 2);
        assert_eq!(&p2[..4], &p2[4..8]);
        assert_eq!(frame_spans(&[[2, 2, 2], [1, 2, 4]]), vec![0..4, 4..8, 8..16]);
    }

    #[test]
    fn mrope_positions_reproduce_the_reference_worked_example() {
        // model-formats.md §3.4: 19 text tokens + vision_start (positions 0..19), a 52×94 patch
        // grid = 26×47 = 1222 pads at t = 20, h ∈ 20..=45, w ∈ 20..=66; vision_end gets 67.
        let (vs, pad, ve) = (151652, 151655, 151653);
        let mut ids: Vec<u32> = (0..19).collect();
        ids.push(vs);
        ids.extend(std::iter::repeat_n(pad, 1222));
        ids.push(ve);
        let (pos, delta) = mrope_positions(&ids, &[[1, 52, 94]], pad, vs, 2).unwrap();
        assert_eq!(pos.len(), ids.len());
        assert_eq!(pos[19], [19; 3]);
        assert_eq!(pos[20], [20, 20, 20]);
        assert_eq!(pos[20 + 46], [20, 20, 66]);
        assert_eq!(pos[20 + 47], [20, 21, 20]);
        assert_eq!(pos[1241], [20, 45, 66]);
        assert_eq!(pos[1242], [67; 3]);
        assert_eq!(delta, 67 + 1 - 1243);
        assert_eq!(delta, -1175);
    }

    #[test]
    fn mrope_positions_of_text_only_and_edge_placements() {
        let (vs, pad, ve) = (90, 93, 91);
        // Text only: 1-D positions, delta 0.
        let (pos, delta) = mrope_positions(&[5, 6, 7], &[], pad, vs, 2).unwrap();
        assert_eq!((pos, delta), (vec![[0; 3], [1; 3], [2; 3]], 0));
        assert_eq!(mrope_positions(&[], &[], pad, vs, 2).unwrap(), (vec![], 0));
        // An image first, a tall one (h' > w'), ending the prompt without vision_end.
        let ids = [vs, pad, pad, pad];
        let (pos, delta) = mrope_positions(&ids, &[[1, 6, 2]], pad, vs, 2).unwrap();
        assert_eq!(pos, vec![[0; 3], [1, 1, 1], [1, 2, 1], [1, 3, 1]]);
        assert_eq!(delta, 4 - 4);
        // A frame count t > 1 spans t positions on the first component.
        let ids = [vs, pad, pad, ve];
        let (pos, delta) = mrope_positions(&ids, &[[2, 2, 2]], pad, vs, 2).unwrap();
        assert_eq!(pos, vec![[0; 3], [1, 1, 1], [2, 1, 1], [3; 3]]);
        assert_eq!(delta, 0);
    }

    #[test]
    fn mrope_positions_reject_pads_that_do_not_match_the_grids() {
        let (vs, pad, ve) = (90, 93, 91);
        let ids = [1, vs, pad, pad, ve];
        assert_eq!(
            mrope_positions(&ids, &[[1, 2, 2]], pad, vs, 2),
            Err(MropeError::PadRun { image: 0, at: 2, expected: 1, found: 2 })
        );
        assert_eq!(
            mrope_positions(&ids, &[[1, 2, 2], [1, 2, 2]], pad, vs, 2),
            Err(MropeError::ImageCount { found: 1, grids: 2 })
        );
        assert_eq!(mrope_positions(&[pad, vs, pad, ve], &[[1, 2, 2]], pad, vs, 2), Err(MropeError::StrayPad(0)));
        assert_eq!(mrope_positions(&[vs, pad, ve, pad], &[[1, 2, 2]], pad, vs, 2), Err(MropeError::StrayPad(3)));
        assert!(matches!(mrope_positions(&[vs, pad], &[[1, 3, 2]], pad, vs, 2), Err(MropeError::Grid { .. })));
    }

    #[test]
    fn ops_match_their_definitions() {
        // GELU and QuickGELU at known points.
        let mut g = vec![-1.0f32, 0.0, 1.0, 3.0];
        ops::gelu_erf(&mut g);
        for (a, b) in g.iter().zip([-0.158_655_25f32, 0.0, 0.841_344_8, 2.995_950_5]) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let mut q = vec![1.0f32];
        ops::quick_gelu(&mut q);
        assert!((q[0] - 1.0 / (1.0 + (-1.702f32).exp())).abs() < 1e-7);
        // LayerNorm of [1, 2, 3, 4]: mean 2.5, var 1.25.
        let y = ops::layer_norm(&[1.0, 2.0, 3.0, 4.0], 4, &[1.0, 2.0, 1.0, 1.0], &[0.0, 0.0, 0.5, 0.0], 0.0);
        let s = 1.25f32.sqrt();
        for (a, b) in y.iter().zip([-1.5 / s, -1.0 / s, 0.5 / s + 0.5, 1.5 / s]) {
            assert!((a - b).abs() < 1e-6);
        }
        // Linear against the plain reference.
        let x: Vec<f32> = (0..15).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..20).map(|i| (i as f32 * 0.11).cos()).collect();
        let b = [0.1, -0.2, 0.3, 0.0];
        let ours = ops::linear(&x, 5, &w, 4, Some(&b));
        let want = crate::backend::cpu::reference::linear(&x, 3, 5, &w, 4, Some(&b));
        assert!(ours.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6));
    }

    #[test]
    fn rope_from_angles_pairs_each_dimension_with_the_one_half_a_head_away() {
        // One row, one head of 4: dims (0, 2) turn by a0 = π/2, dims (1, 3) by a1 = 0.
        let mut x = vec![9.0, 1.0, 2.0, 3.0, 4.0];
        ops::rope_from_angles(&mut x, 5, 1, 1, 4, &[std::f32::consts::FRAC_PI_2, 0.0]);
        let want = [9.0, -3.0, 2.0, 1.0, 4.0];
        assert!(x.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{x:?}");
    }

    #[test]
    fn attention_stays_within_spans() {
        // 3 rows, 1 head of 2; spans {0, 1} and {2}. Row 2 alone sees only its own v.
        let row = |q: [f32; 2], k: [f32; 2], v: [f32; 2]| [q, k, v].concat();
        let mut qkv = [
            row([1.0, 0.0], [1.0, 0.0], [1.0, 2.0]),
            row([0.0, 1.0], [0.0, 3.0], [5.0, 6.0]),
            row([1.0, 1.0], [1.0, 1.0], [7.0, 8.0]),
        ]
        .concat();
        let out = ops::attention_spans(&qkv, 1, 2, &[0..2, 2..3]);
        assert_eq!(&out[4..], &[7.0, 8.0]);
        // Row 0: scores (1, 0)/√2 over rows 0, 1.
        let s = 1.0f32 / 2f32.sqrt();
        let (e0, e1) = (s.exp(), 1.0f32);
        let w0 = e0 / (e0 + e1);
        assert!((out[0] - (w0 * 1.0 + (1.0 - w0) * 5.0)).abs() < 1e-6);
        // Changing row 2 changes nothing in the first span.
        qkv[2 * 6 + 4] = 100.0;
        qkv[2 * 6 + 2] = 100.0;
        let out2 = ops::attention_spans(&qkv, 1, 2, &[0..2, 2..3]);
        assert_eq!(&out[..4], &out2[..4]);
    }
}
