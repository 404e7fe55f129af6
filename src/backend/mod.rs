//! The op surface models are written against, and its implementations.
//!
//! A model (see `model::llama`, `model::vision`) is written once over [`Backend`]; each backend
//! decides how tensors live (host `Vec<f32>` on the CPU, device buffers on CUDA) and how each op
//! runs. The op list is what a Llama-family decoder and the Qwen2-VL vision tower need; an op is
//! added only when a model needs it. The CPU
//! backend is the oracle: every fast path (and later every CUDA kernel) is tested against the plain
//! CPU loops in `cpu::reference`.
//!
//! Shapes: activations are row-major matrices `[rows, cols]`, one row per token. Weights are
//! matrices `[out_features, in_features]` stored as GGUF stores them (rows of quantization blocks
//! along `in_features`), so `linear` computes `y = x · Wᵀ`.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod dtype;

pub use dtype::GgmlType;

use crate::model::weights::awq::AwqMatrix;

/// Why an op could not run. Shape mismatches are bugs in the model code and assert; this enum is
/// for what depends on input data (weights from a file, a context that is full).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("weight '{name}': {reason}")]
    BadWeight { name: String, reason: String },
    #[error("out of memory allocating {what}: {bytes} bytes")]
    OutOfMemory { what: String, bytes: usize },
    #[error("{0}")]
    Device(String),
}

/// The GELU variants of [`Backend::gelu`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gelu {
    /// `x · sigmoid(1.702 · x)` (transformers' `quick_gelu`: CLIP-style vision MLPs).
    Quick,
    /// The exact `x · Φ(x) = x/2 · (1 + erf(x/√2))` (torch `nn.GELU()`).
    Erf,
}

/// Checks raw weight bytes against their claimed shape and type (every backend's `weight` starts
/// here); returns the bytes of one row.
pub fn weight_row_bytes(
    name: &str,
    dtype: GgmlType,
    rows: usize,
    cols: usize,
    bytes: &[u8],
) -> Result<usize, BackendError> {
    let bad = |reason: String| BackendError::BadWeight { name: name.into(), reason };
    let row_bytes = dtype.row_bytes(cols).ok_or_else(|| {
        bad(format!("{cols} columns is not a whole number of {dtype} blocks of {}", dtype.block_len()))
    })?;
    if bytes.len() != rows * row_bytes {
        return Err(bad(format!(
            "{} bytes for a {rows}x{cols} {dtype} matrix, expected {}",
            bytes.len(),
            rows * row_bytes
        )));
    }
    Ok(row_bytes)
}

/// How rotary position embedding pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// HF "rotate half": dimension `i` is paired with `i + head_dim/2` (Llama, Qwen2 in HF layout).
    Neox,
    /// GPT-J / Meta original: dimension `2i` is paired with `2i+1` (GGUF `llama` rows as stored).
    Norm,
}

/// The rotary table of one model: per-frequency inverse wavelengths already adjusted for any
/// scaling type (llama3, GGUF `rope_freqs`), so every backend applies `angle = pos · inv_freq[i]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub style: RopeStyle,
    pub head_dim: usize,
    /// `head_dim / 2` entries.
    pub inv_freq: Vec<f32>,
    /// Multimodal RoPE (Qwen2-VL): frequencies `[0, s0)` turn with a token's temporal position,
    /// `[s0, s0+s1)` with its height position, the rest with its width position; positions then
    /// come three per row `(t, h, w)`. A text token has `t = h = w`, which is plain RoPE.
    pub mrope_section: Option<[usize; 3]>,
}

impl Rope {
    /// Positions per row: 3 with M-RoPE, else 1.
    pub fn positions_per_row(&self) -> usize {
        if self.mrope_section.is_some() {
            3
        } else {
            1
        }
    }

    /// Which of a row's positions frequency `i` turns with (0 without M-RoPE).
    pub fn component(&self, i: usize) -> usize {
        match self.mrope_section {
            Some([s0, s1, _]) if i >= s0 + s1 => 2,
            Some([s0, _, _]) if i >= s0 => 1,
            _ => 0,
        }
    }
}

/// Where a token's K and V rows live in the cache, and which cached positions a query row sees.
///
/// One `AttnSeq` per sequence in the batch. Query rows `q_rows` of the batch belong to the last
/// `q_rows.len()` positions of the sequence; `slots[p]` is the cache slot holding position `p`
/// for `p < slots.len()` (the context length including the new tokens). A contiguous cache passes
/// `0..len`; a paged cache passes slots computed from its block table.
#[derive(Clone, Debug)]
pub struct AttnSeq<'a> {
    pub q_rows: std::ops::Range<usize>,
    pub slots: &'a [u32],
}

/// Column layout of a fused QKV activation `[tokens, (n_heads + 2·n_kv_heads) · head_dim]`:
/// q heads first, then k heads, then v heads (how `model::llama` fuses the projections).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QkvLayout {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl QkvLayout {
    pub fn q_cols(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_cols(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    pub fn k_offset(&self) -> usize {
        self.q_cols()
    }
    pub fn v_offset(&self) -> usize {
        self.q_cols() + self.kv_cols()
    }
    pub fn total_cols(&self) -> usize {
        self.q_cols() + 2 * self.kv_cols()
    }
}

/// The ops a Llama-family decoder needs. Every method is infallible for well-shaped inputs:
/// shapes are the caller's invariant (asserted), data-dependent failures surface at load time.
pub trait Backend: Send + Sync + 'static {
    /// An activation matrix (f32 semantics).
    type Tensor: Send + Sync;
    /// A weight matrix in its storage type (quantized blocks or floats).
    type Weight: Send + Sync;
    /// K and V storage of one layer: `slots` rows of `kv_cols` values each.
    type KvLayer: Send + Sync;

    fn name(&self) -> &'static str;

    /// Another handle on the same device for work that runs beside this one's (the vision tower
    /// encodes a request's images on the request's thread while the engine thread decodes):
    /// its own CPU worker pool, or its own CUDA stream and cuBLAS handle on the same context.
    fn sibling(&self) -> Result<Self, BackendError>
    where
        Self: Sized;

    /// Runs `f` where this backend's ops are cheapest to call (the CPU backend enters its thread
    /// pool once per forward pass instead of once per op). Ops called outside `run` are correct
    /// but, on the CPU, use rayon's global pool instead of the backend's physical-core pool.
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    // Memory.
    fn zeros(&self, rows: usize, cols: usize) -> Self::Tensor;
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Self::Tensor;
    fn download(&self, t: &Self::Tensor) -> Vec<f32>;
    fn shape(&self, t: &Self::Tensor) -> (usize, usize);
    /// A weight `[rows, cols]` from raw bytes in `dtype` (GGUF row layout).
    fn weight(
        &self,
        name: &str,
        dtype: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Self::Weight, BackendError>;
    /// An AWQ 4-bit weight `[m.n, m.k]` (`linear` semantics as for any weight: `y = x · Wᵀ` with
    /// `W[n][k] = f16((q − z) · s)`); the backend repacks it into the layout its kernels read.
    fn awq_weight(&self, name: &str, m: AwqMatrix) -> Result<Self::Weight, BackendError>;
    fn kv_layer(&self, slots: usize, kv_cols: usize) -> Result<Self::KvLayer, BackendError>;
    /// Bytes one cached K or V value takes in this backend's KV layers.
    fn kv_value_bytes(&self) -> usize;
    /// Bytes a `linear` with `w` reads from memory (its storage size).
    fn weight_bytes(&self, w: &Self::Weight) -> usize;
    /// Measured copy bandwidth of this backend's memory in bytes/s (bytes read + bytes written),
    /// the denominator of the benchmark's roofline fraction.
    fn copy_bandwidth(&self) -> f64;

    // Ops.
    /// `out[i] = table[ids[i]]`; `out` is `[ids.len(), table.cols]`.
    fn embedding(&self, table: &Self::Weight, ids: &[u32], out: &mut Self::Tensor);
    /// `out[:, col0..col0+m] = x · wᵀ` (+ `bias` per column); `x: [n, k]`, `w: [m, k]`,
    /// `out: [n, ≥ col0+m]`. Writing at a column offset lets a layer whose projections cannot be
    /// fused into one matrix (different storage types) still produce one fused activation.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        bias: Option<&Self::Tensor>,
        out: &mut Self::Tensor,
        col0: usize,
    );
    /// `out = x / rms(x) · weight` per row, computed in f32 (HF order: normalize, then scale).
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Tensor, eps: f32, out: &mut Self::Tensor);
    /// Fused residual step: `residual += x; out = rms_norm(residual)`.
    fn add_rms_norm(
        &self,
        residual: &mut Self::Tensor,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        eps: f32,
        out: &mut Self::Tensor,
    );
    /// `acc += x`.
    fn add(&self, acc: &mut Self::Tensor, x: &Self::Tensor);
    /// Rotates the first `n_heads` heads of every row of `x` in place; row `r` is at `positions[r]`
    /// (M-RoPE: at `positions[3r..3r+3]`, see [`Rope::mrope_section`]).
    fn rope(&self, x: &mut Self::Tensor, n_heads: usize, positions: &[u32], rope: &Rope);
    /// `out = silu(gu[:, :h]) * gu[:, h:]` where `gu` is the fused gate|up activation `[n, 2h]`.
    fn silu_mul(&self, gate_up: &Self::Tensor, out: &mut Self::Tensor);
    /// Stores the K and V columns of `qkv` row `r` into cache slot `slots[r]`.
    fn write_kv(
        &self,
        kv: (&mut Self::KvLayer, &mut Self::KvLayer),
        qkv: &Self::Tensor,
        layout: QkvLayout,
        slots: &[u32],
    );
    /// Causal grouped-query attention of the q columns of `qkv` over the cache, scale 1/sqrt(d),
    /// softmax in f32. `out` is `[rows, n_heads·head_dim]`.
    fn attention(
        &self,
        qkv: &Self::Tensor,
        kv: (&Self::KvLayer, &Self::KvLayer),
        layout: QkvLayout,
        seqs: &[AttnSeq<'_>],
        out: &mut Self::Tensor,
    );
    /// `out[i] = x[rows[i]]`.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Self::Tensor;
    /// `x[rows[i]] = values[i·cols..(i+1)·cols]` (image embeddings into a prompt's embeddings).
    fn set_rows(&self, x: &mut Self::Tensor, rows: &[usize], values: &[f32]);

    // Vision-tower ops (Qwen2-VL: pre-norm blocks with LayerNorm, bidirectional attention, GELU).
    /// `out = (x − mean) / sqrt(var + eps) · weight + bias` per row (biased variance, f32).
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: &Self::Tensor,
        eps: f32,
        out: &mut Self::Tensor,
    );
    /// `x = gelu(x)` element-wise, in place.
    fn gelu(&self, x: &mut Self::Tensor, kind: Gelu);
    /// Bidirectional attention within spans of rows, K and V taken from `qkv` itself (no cache):
    /// a row attends to every row of its span and to no other, scale 1/sqrt(d), softmax in f32.
    /// The spans tile `0..rows` in order (one per image frame of a vision tower's input). `out`
    /// is `[rows, n_heads·head_dim]`.
    fn attention_spans(
        &self,
        qkv: &Self::Tensor,
        layout: QkvLayout,
        spans: &[std::ops::Range<usize>],
        out: &mut Self::Tensor,
    );
    /// The same values read as `[rows, cols]` (`rows · cols` must equal the tensor's size).
    fn reshape(&self, x: Self::Tensor, rows: usize, cols: usize) -> Self::Tensor;
}

/// Checks that `spans` tile `0..rows` in order (the [`Backend::attention_spans`] contract).
pub fn check_spans(spans: &[std::ops::Range<usize>], rows: usize) {
    let mut at = 0;
    for s in spans {
        assert!(s.start == at && s.end > s.start, "attention spans must tile the rows in order: {spans:?}");
        at = s.end;
    }
    assert_eq!(at, rows, "attention spans must tile the {rows} rows: {spans:?}");
}
