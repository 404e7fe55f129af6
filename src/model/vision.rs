//! Qwen2-VL's vision tower (`visual.*`) over the backend ops, and the multimodal rotary positions
//! of a prompt that holds images (transformers' `get_rope_index`).
//!
//! The tower is written once over [`Backend`] (as the decoder is): LayerNorm, linear with bias,
//! the backend's M-RoPE as the 2-D rotary embedding ([`vision_rope`]), bidirectional attention
//! within spans, GELU, add. On the CPU backend it is the oracle; on CUDA the same code runs on
//! the device (fp16 weights, f32 activations, fp16 K/V inside attention). Semantics follow
//! transformers 4.46.3 `modeling_qwen2_vl.py` (summarized in the shared model-formats reference
//! §3.1 and §3.4), checked by `tests/qwen2_vl_golden.rs` against a tiny checkpoint written by
//! transformers, and CUDA against the CPU by `tests/cuda_parity.rs`.
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
use crate::backend::{Backend, BackendError, Gelu, GgmlType, QkvLayout, Rope, RopeStyle};
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
    #[error(transparent)]
    Backend(#[from] BackendError),
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
struct Linear<B: Backend> {
    w: B::Weight,
    b: B::Tensor,
}

struct LayerNorm<B: Backend> {
    w: B::Tensor,
    b: B::Tensor,
}

struct Block<B: Backend> {
    norm1: LayerNorm<B>,
    norm2: LayerNorm<B>,
    /// `[3·embed, embed]`: output columns are q (heads-major), then k, then v.
    qkv: Linear<B>,
    proj: Linear<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
}

/// The Qwen2-VL vision encoder on a backend: weights in the checkpoint's float type (fp16 for
/// the published checkpoints; the CUDA backend keeps fp16, the CPU computes in f32 from it),
/// activations f32.
pub struct VisionTower<B: Backend> {
    pub config: VisionConfig,
    backend: B,
    /// The Conv3d weight `[embed, C, T, P, P]` viewed as `[embed, C·T·P·P]` (no bias).
    patch_embed: B::Weight,
    blocks: Vec<Block<B>>,
    ln_q: LayerNorm<B>,
    /// `merger.mlp.0`: `[4·embed, 4·embed]`.
    merge_fc1: Linear<B>,
    /// `merger.mlp.2`: `[out_hidden, 4·embed]`.
    merge_fc2: Linear<B>,
    /// The 2-D rotary embedding as the backend's M-RoPE: see [`vision_rope`].
    rope: Rope,
}

/// The tower's 2-D rotary embedding (transformers' `VisionRotaryEmbedding(head_dim / 2)` with
/// `apply_rotary_pos_emb_vision`): dimension `i < head_dim/2` of a head pairs with `i + head_dim/2`
/// (rotate half) and turns by `h·f[i]` for `i < head_dim/4`, by `w·f[i − head_dim/4]` above, with
/// `f[j] = θ^(−4j/head_dim)`. That is the backend's multimodal RoPE with sections
/// `(0, head_dim/4, head_dim/4)`, the frequency table repeated for the two halves, and positions
/// `(0, h, w)` per patch row.
pub fn vision_rope(head_dim: usize) -> Rope {
    let dim = head_dim / 2;
    let f: Vec<f32> = (0..dim / 2).map(|j| 1.0 / VISION_ROPE_THETA.powf((2 * j) as f32 / dim as f32)).collect();
    Rope {
        style: RopeStyle::Neox,
        head_dim,
        inv_freq: [f.as_slice(), f.as_slice()].concat(),
        mrope_section: Some([0, dim / 2, dim / 2]),
    }
}

/// Reads tensors below one name prefix, checking shapes.
struct Loader<'a, B: Backend> {
    st: &'a SafetensorsDir,
    prefix: &'static str,
    be: &'a B,
}

impl<B: Backend> Loader<'_, B> {
    /// The tensor's bytes and float type, after checking its shape.
    fn raw(&self, name: &str, shape: &[usize]) -> Result<(String, GgmlType, &[u8]), VisionError> {
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
        Ok((full, dtype, self.st.data(t)))
    }

    /// A vector (norm weights, biases) as a `[1, n]` activation in f32.
    fn vector(&self, name: &str, n: usize) -> Result<B::Tensor, VisionError> {
        let (_, dtype, bytes) = self.raw(name, &[n])?;
        let mut v = vec![0.0; n];
        dequantize_row(dtype, bytes, &mut v);
        Ok(self.be.upload(&v, 1, n))
    }

    /// A matrix `[shape[0], Π shape[1..]]` in its stored type.
    fn matrix(&self, name: &str, shape: &[usize]) -> Result<B::Weight, VisionError> {
        let (full, dtype, bytes) = self.raw(name, shape)?;
        Ok(self.be.weight(&full, dtype, shape[0], shape[1..].iter().product(), bytes)?)
    }

    fn linear(&self, name: &str, out: usize, inp: usize) -> Result<Linear<B>, VisionError> {
        Ok(Linear {
            w: self.matrix(&format!("{name}.weight"), &[out, inp])?,
            b: self.vector(&format!("{name}.bias"), out)?,
        })
    }

    fn layer_norm(&self, name: &str, n: usize) -> Result<LayerNorm<B>, VisionError> {
        Ok(LayerNorm { w: self.vector(&format!("{name}.weight"), n)?, b: self.vector(&format!("{name}.bias"), n)? })
    }
}

/// A vision tower whatever its backend: what a loaded model's [`crate::vision::Vision`] holds.
pub trait ImageEncoder: Send + Sync {
    fn config(&self) -> &VisionConfig;
    /// The backend it runs on (`cpu`, `cuda`).
    fn backend_name(&self) -> &'static str;
    /// See [`VisionTower::forward_until`].
    fn forward_until(&self, pixel_values: &[f32], grid_thw: &[[usize; 3]], stop: &dyn Fn() -> bool)
        -> Option<Vec<f32>>;
    /// See [`VisionTower::forward`].
    fn forward(&self, pixel_values: &[f32], grid_thw: &[[usize; 3]]) -> Vec<f32> {
        self.forward_until(pixel_values, grid_thw, &|| false).expect("never stopped")
    }
}

impl<B: Backend> ImageEncoder for VisionTower<B> {
    fn config(&self) -> &VisionConfig {
        &self.config
    }
    fn backend_name(&self) -> &'static str {
        self.backend.name()
    }
    fn forward_until(
        &self,
        pixel_values: &[f32],
        grid_thw: &[[usize; 3]],
        stop: &dyn Fn() -> bool,
    ) -> Option<Vec<f32>> {
        VisionTower::forward_until(self, pixel_values, grid_thw, stop)
    }
}

/// The activations one forward pass reuses from block to block.
struct Scratch<T> {
    h: T,
    qkv: T,
    attn: T,
    mlp: T,
    out: T,
}

impl<B: Backend> VisionTower<B> {
    /// Loads the tower onto `backend` from a Qwen2-VL checkpoint: tensors `visual.*` (the
    /// published checkpoints, transformers 4.46's `save_pretrained`) or `model.visual.*` (later
    /// transformers versions nest the tower under `model.`), F16, BF16 or F32.
    pub fn from_safetensors(backend: B, st: &SafetensorsDir, config: VisionConfig) -> Result<Self, VisionError> {
        let prefix = ["visual.", "model.visual."]
            .into_iter()
            .find(|p| st.tensor(&format!("{p}patch_embed.proj.weight")).is_some())
            .ok_or_else(|| VisionError::MissingTensor("visual.patch_embed.proj.weight".into()))?;
        let l = Loader { st, prefix, be: &backend };
        let c = &config;
        let e = c.embed_dim;
        let patch_embed = l.matrix(
            "patch_embed.proj.weight",
            &[e, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size],
        )?;
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
        let rope = vision_rope(c.head_dim());
        Ok(Self { config, backend, patch_embed, blocks, ln_q, merge_fc1, merge_fc2, rope })
    }

    /// A tower of `config`'s shapes with pseudo-random fp16 weights (`seed`) on `backend`, for
    /// benchmarks of shapes whose checkpoint is not at hand.
    pub fn synthetic(backend: B, config: VisionConfig, seed: u64) -> Self {
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
        let be = &backend;
        let mut linear = |out: usize, inp: usize| {
            let bytes: Vec<u8> = vec(out * inp, 2.0 / (inp as f32).sqrt())
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect();
            let w = be.weight("synthetic", GgmlType::F16, out, inp, &bytes).expect("synthetic weight");
            Linear { w, b: be.upload(&vec(out, 0.02), 1, out) }
        };
        let c = &config;
        let e = c.embed_dim;
        let ln = |n: usize| LayerNorm { w: be.upload(&vec![1.0; n], 1, n), b: be.zeros(1, n) };
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
        let ln_q = ln(e);
        let rope = vision_rope(c.head_dim());
        Self { config, backend, patch_embed, blocks, ln_q, merge_fc1, merge_fc2, rope }
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
        let (be, c) = (&self.backend, &self.config);
        let (e, n) = (c.embed_dim, out_rows * c.merge_unit());
        let layout = QkvLayout { n_heads: c.num_heads, n_kv_heads: c.num_heads, head_dim: c.head_dim() };
        // Each patch row's (0, h, w) rotary positions and the attention spans (one per frame).
        let positions: Vec<u32> =
            patch_positions(grid_thw, c.spatial_merge_size).iter().flat_map(|&[h, w]| [0, h, w]).collect();
        let spans = frame_spans(grid_thw);

        // 1. Patch embedding.
        let (mut x, mut s) = be.run(|| {
            let px = be.upload(pixel_values, n, c.patch_cols());
            let mut x = be.zeros(n, e);
            be.linear(&px, &self.patch_embed, None, &mut x, 0);
            let s = Scratch {
                h: be.zeros(n, e),
                qkv: be.zeros(n, layout.total_cols()),
                attn: be.zeros(n, e),
                mlp: be.zeros(n, c.mlp_hidden),
                out: be.zeros(n, e),
            };
            (x, s)
        });

        // 2. Blocks.
        for b in &self.blocks {
            if stop() {
                return None;
            }
            be.run(|| self.block(b, &mut x, &mut s, &positions, &spans, layout));
        }
        drop(s);

        // 3. Merger: the 4 rows of each block are consecutive, so the [rows, e] matrix read as
        // [rows/4, 4e] is the merged input.
        let out = be.run(|| {
            let mut h = be.zeros(n, e);
            be.layer_norm(&x, &self.ln_q.w, &self.ln_q.b, VISION_LN_EPS, &mut h);
            drop(x);
            let h = be.reshape(h, out_rows, e * c.merge_unit());
            let mut m = be.zeros(out_rows, e * c.merge_unit());
            be.linear(&h, &self.merge_fc1.w, Some(&self.merge_fc1.b), &mut m, 0);
            be.gelu(&mut m, Gelu::Erf);
            let mut y = be.zeros(out_rows, c.out_hidden);
            be.linear(&m, &self.merge_fc2.w, Some(&self.merge_fc2.b), &mut y, 0);
            be.download(&y)
        });
        debug_assert_eq!(out.len(), out_rows * c.out_hidden);
        Some(out)
    }

    /// One pre-norm block: `x += proj(attn(LN1(x)))`, `x += fc2(quick_gelu(fc1(LN2(x))))`.
    fn block(
        &self,
        b: &Block<B>,
        x: &mut B::Tensor,
        s: &mut Scratch<B::Tensor>,
        positions: &[u32],
        spans: &[Range<usize>],
        layout: QkvLayout,
    ) {
        let be = &self.backend;
        be.layer_norm(x, &b.norm1.w, &b.norm1.b, VISION_LN_EPS, &mut s.h);
        be.linear(&s.h, &b.qkv.w, Some(&b.qkv.b), &mut s.qkv, 0);
        // q and k are the first 2·heads heads of each row.
        be.rope(&mut s.qkv, 2 * layout.n_heads, positions, &self.rope);
        be.attention_spans(&s.qkv, layout, spans, &mut s.attn);
        be.linear(&s.attn, &b.proj.w, Some(&b.proj.b), &mut s.out, 0);
        be.add(x, &s.out);
        be.layer_norm(x, &b.norm2.w, &b.norm2.b, VISION_LN_EPS, &mut s.h);
        be.linear(&s.h, &b.fc1.w, Some(&b.fc1.b), &mut s.mlp, 0);
        be.gelu(&mut s.mlp, Gelu::Quick);
        be.linear(&s.mlp, &b.fc2.w, Some(&b.fc2.b), &mut s.out, 0);
        be.add(x, &s.out);
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
        let t = VisionTower::synthetic(crate::backend::cpu::CpuBackend::new(1), tiny, 3);
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
    fn vision_rope_turns_the_first_half_with_the_patch_row_and_the_second_with_the_column() {
        use crate::backend::cpu::CpuBackend;
        use crate::backend::Backend;
        // transformers: freqs = cat(h·f, w·f) (head_dim/2 angles), each turning dims (i, i + d/2).
        let d = 16;
        let rope = vision_rope(d);
        let f: Vec<f32> = (0..d / 4).map(|j| 1.0 / 10000f32.powf((2 * j) as f32 / (d / 2) as f32)).collect();
        let (h, w) = (3u32, 5u32);
        let angles: Vec<f32> = f.iter().map(|x| h as f32 * x).chain(f.iter().map(|x| w as f32 * x)).collect();
        let x: Vec<f32> = (0..2 * d).map(|i| (i as f32 * 0.7).sin()).collect();
        let be = CpuBackend::new(1);
        let mut t = be.upload(&x, 1, 2 * d);
        be.rope(&mut t, 2, &[0, h, w], &rope);
        for head in 0..2 {
            for i in 0..d / 2 {
                let (a, b) = (x[head * d + i], x[head * d + i + d / 2]);
                let (sn, cs) = angles[i].sin_cos();
                let want = [a * cs - b * sn, b * cs + a * sn];
                let got = [t.data[head * d + i], t.data[head * d + i + d / 2]];
                assert!((got[0] - want[0]).abs() < 1e-6 && (got[1] - want[1]).abs() < 1e-6, "head {head} pair {i}");
            }
        }
    }
}
