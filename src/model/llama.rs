//! The Llama-family decoder (Llama, SmolLM2, Qwen2), written once over [`Backend`] ops.
//!
//! Per layer: `a = RMSNorm(h)`; fused `qkv = a·[Wq;Wk;Wv]ᵀ (+bias)`; RoPE on the q and k heads;
//! K/V to the cache; causal GQA attention; `h += o(attn)`; `m = RMSNorm(h)`;
//! `h += down(silu(gate(m)) · up(m))`. Then the final norm and the (possibly tied) head.
//!
//! Differences between checkpoints are config, not code: attention biases (Qwen2), tied head
//! (SmolLM2, Llama 3.2), rope base and scaling. GGUF `llama` files store q/k rows permuted for
//! GPT-J-style rope (convert_hf_to_gguf `permute`); we undo that at load so every checkpoint uses
//! HF's rotate-half convention and one rope kernel.

use crate::backend::{AttnSeq, Backend, BackendError, GgmlType, QkvLayout, Rope, RopeStyle};
use crate::model::config::{Architecture, ConfigError, ModelConfig};
use crate::model::kv_cache::{KvCache, KvError, KvLayers};
use crate::model::paged_kv::{PagedKvCache, Sequence};
use crate::model::weights::awq::{AwqConfig, AwqMatrix};
use crate::model::weights::safetensors::{SafetensorsDir, StTensor};
use crate::model::weights::GgufFile;
use safetensors::Dtype;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("tensor '{0}' is missing from the model file")]
    MissingTensor(String),
    #[error("tensor '{name}' has shape {found:?}, expected {expected:?}")]
    Shape { name: String, found: Vec<u64>, expected: Vec<u64> },
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("empty input: at least one token is needed")]
    Empty,
    #[error("bad multimodal input: {0}")]
    Input(String),
}

/// A projection whose output is one activation. Usually one matrix (q|k|v or gate|up rows fused
/// at load); parts of different storage types stay separate and write at column offsets.
pub struct Linear<B: Backend> {
    parts: Vec<(B::Weight, Option<B::Tensor>, usize)>,
    out_features: usize,
}

impl<B: Backend> Linear<B> {
    pub fn forward(&self, be: &B, x: &B::Tensor) -> B::Tensor {
        let (n, _) = be.shape(x);
        let mut out = be.zeros(n, self.out_features);
        for (w, b, col0) in &self.parts {
            be.linear(x, w, b.as_ref(), &mut out, *col0);
        }
        out
    }
}

struct Layer<B: Backend> {
    attn_norm: B::Tensor,
    qkv: Linear<B>,
    o: Linear<B>,
    ffn_norm: B::Tensor,
    gate_up: Linear<B>,
    down: Linear<B>,
}

pub struct Llama<B: Backend> {
    pub config: ModelConfig,
    rope: Rope,
    layout: QkvLayout,
    embed: B::Weight,
    /// `None` when the head is tied to the embedding.
    head: Option<B::Weight>,
    final_norm: B::Tensor,
    layers: Vec<Layer<B>>,
}

/// One matrix `[rows, cols]` on its way to the backend.
enum Raw {
    /// GGUF block rows or plain float rows (safetensors F16/BF16/F32 rows are the same bytes).
    Blocks { dtype: GgmlType, rows: usize, cols: usize, bytes: Vec<u8> },
    /// AWQ 4-bit, already in the per-row layout.
    Awq(AwqMatrix),
}

impl Raw {
    fn rows(&self) -> usize {
        match self {
            Raw::Blocks { rows, .. } => *rows,
            Raw::Awq(m) => m.n,
        }
    }

    /// Appends `other`'s rows when both have the same storage (one fused matrix); gives `other`
    /// back when they differ.
    fn try_stack(&mut self, other: Raw) -> Option<Raw> {
        match (self, other) {
            (Raw::Blocks { dtype, rows, cols, bytes }, Raw::Blocks { dtype: d2, rows: r2, cols: c2, bytes: b2 })
                if *dtype == d2 && *cols == c2 =>
            {
                bytes.extend_from_slice(&b2);
                *rows += r2;
                None
            }
            (Raw::Awq(a), Raw::Awq(b)) if (a.k, a.group) == (b.k, b.group) => {
                a.append(b).expect("same K and group");
                None
            }
            (_, other) => Some(other),
        }
    }
}

/// Undoes convert_hf_to_gguf's q/k permutation on rows of `row_len` elements: within each head,
/// GGUF row 2i is HF row i and GGUF row 2i+1 is HF row i + d/2. Rows move whole, so quantized rows
/// need no decoding, and the same function serves biases (rows of one value).
fn unpermute_heads<T: Copy + Default>(data: &[T], row_len: usize, head_dim: usize) -> Vec<T> {
    let mut out = vec![T::default(); data.len()];
    for h in 0..data.len() / row_len / head_dim {
        for i in 0..head_dim / 2 {
            for (src, dst) in [(2 * i, i), (2 * i + 1, i + head_dim / 2)] {
                let (s, d) = ((h * head_dim + src) * row_len, (h * head_dim + dst) * row_len);
                out[d..d + row_len].copy_from_slice(&data[s..s + row_len]);
            }
        }
    }
    out
}

fn read_f32(dtype: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut v = vec![0.0; n];
    crate::backend::cpu::blocks::dequantize_row(dtype, bytes, &mut v);
    v
}

/// Where a checkpoint's tensors come from. Names are logical, GGUF-style without the suffix
/// (`token_embd`, `output`, `output_norm`, `blk.{l}.attn_q`, …); each source maps them to its
/// file's names.
trait Source {
    /// The matrix `name` as `[rows, cols]` (an error when it is missing or shaped otherwise).
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Raw, ModelError>;
    /// The 1-D tensor `name` (`{name}.weight` or, with `bias`, `{name}.bias`) of `n` values as f32.
    fn vector(&self, name: &str, bias: bool, n: usize) -> Result<Option<Vec<f32>>, ModelError>;
    fn has_matrix(&self, name: &str) -> bool;
    /// GGUF `llama` q/k rows are permuted for GPT-J-style rope.
    fn permuted_qk(&self) -> bool;
}

fn check_vector(name: String, dims: &[u64], n: usize) -> Result<(), ModelError> {
    if dims.iter().product::<u64>() != n as u64 || dims.len() != 1 {
        return Err(ModelError::Shape { name, found: dims.to_vec(), expected: vec![n as u64] });
    }
    Ok(())
}

struct GgufSource<'a> {
    file: &'a GgufFile,
    architecture: Architecture,
}

impl Source for GgufSource<'_> {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Raw, ModelError> {
        let name = format!("{name}.weight");
        let t = self.file.tensor(&name).ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
        if t.rows_cols() != (rows, cols) || t.dims.len() > 2 {
            return Err(ModelError::Shape { name, found: t.dims.clone(), expected: vec![cols as u64, rows as u64] });
        }
        Ok(Raw::Blocks { dtype: t.dtype, rows, cols, bytes: self.file.tensor_data(t).to_vec() })
    }

    fn vector(&self, name: &str, bias: bool, n: usize) -> Result<Option<Vec<f32>>, ModelError> {
        let name = format!("{name}.{}", if bias { "bias" } else { "weight" });
        let Some(t) = self.file.tensor(&name) else { return Ok(None) };
        check_vector(name, &t.dims, n)?;
        Ok(Some(read_f32(t.dtype, self.file.tensor_data(t), n)))
    }

    fn has_matrix(&self, name: &str) -> bool {
        self.file.tensor(&format!("{name}.weight")).is_some()
    }

    fn permuted_qk(&self) -> bool {
        self.architecture == Architecture::Llama
    }
}

/// A Hugging Face checkpoint: fp16/bf16/f32 tensors and, with `awq`, AutoAWQ GEMM linears.
struct HfSource<'a> {
    st: &'a SafetensorsDir,
    awq: Option<&'a AwqConfig>,
}

impl HfSource<'_> {
    fn hf_name(name: &str) -> String {
        let role = |r: &str| -> &'static str {
            match r {
                "attn_norm" => "input_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                other => unreachable!("no HF name for layer tensor '{other}'"),
            }
        };
        match name {
            "token_embd" => "model.embed_tokens".into(),
            "output" => "lm_head".into(),
            "output_norm" => "model.norm".into(),
            _ => {
                let rest = name.strip_prefix("blk.").expect("layer tensor names start with blk.");
                let (l, r) = rest.split_once('.').expect("blk.{l}.{role}");
                format!("model.layers.{l}.{}", role(r))
            }
        }
    }

    fn tensor(&self, name: &str) -> Result<&StTensor, ModelError> {
        self.st.tensor(name).ok_or_else(|| ModelError::MissingTensor(name.into()))
    }

    fn shape_err(name: &str, t: &StTensor, expected: &[usize]) -> ModelError {
        ModelError::Shape {
            name: name.into(),
            found: t.shape.iter().map(|&d| d as u64).collect(),
            expected: expected.iter().map(|&d| d as u64).collect(),
        }
    }

    fn float_type(name: &str, t: &StTensor) -> Result<GgmlType, ModelError> {
        match t.dtype {
            Dtype::F16 => Ok(GgmlType::F16),
            Dtype::BF16 => Ok(GgmlType::BF16),
            Dtype::F32 => Ok(GgmlType::F32),
            other => Err(ModelError::Backend(BackendError::BadWeight {
                name: name.into(),
                reason: format!("dtype {other:?} is not a float type (F16, BF16, F32)"),
            })),
        }
    }
}

impl Source for HfSource<'_> {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Raw, ModelError> {
        let base = Self::hf_name(name);
        let qname = format!("{base}.qweight");
        if let (Some(q), Some(awq)) = (self.st.tensor(&qname), self.awq) {
            let g = awq.group_size;
            let (zname, sname) = (format!("{base}.qzeros"), format!("{base}.scales"));
            let (z, s) = (self.tensor(&zname)?, self.tensor(&sname)?);
            let checks = [
                (&qname, q, Dtype::I32, vec![cols, rows / 8]),
                (&zname, z, Dtype::I32, vec![cols / g, rows / 8]),
                (&sname, s, Dtype::F16, vec![cols / g, rows]),
            ];
            for (n, t, dtype, shape) in checks {
                if t.shape != shape || t.dtype != dtype {
                    return Err(Self::shape_err(n, t, &shape));
                }
            }
            let m = AwqMatrix::from_gemm(self.st.data(q), self.st.data(z), self.st.data(s), cols, rows, g)
                .map_err(|reason| BackendError::BadWeight { name: qname, reason })?;
            return Ok(Raw::Awq(m));
        }
        let wname = format!("{base}.weight");
        let t = self.tensor(&wname)?;
        if t.shape != [rows, cols] {
            return Err(Self::shape_err(&wname, t, &[rows, cols]));
        }
        let dtype = Self::float_type(&wname, t)?;
        Ok(Raw::Blocks { dtype, rows, cols, bytes: self.st.data(t).to_vec() })
    }

    fn vector(&self, name: &str, bias: bool, n: usize) -> Result<Option<Vec<f32>>, ModelError> {
        let name = format!("{}.{}", Self::hf_name(name), if bias { "bias" } else { "weight" });
        let Some(t) = self.st.tensor(&name) else { return Ok(None) };
        let dims: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
        check_vector(name.clone(), &dims, n)?;
        Ok(Some(read_f32(Self::float_type(&name, t)?, self.st.data(t), n)))
    }

    fn has_matrix(&self, name: &str) -> bool {
        let base = Self::hf_name(name);
        self.st.tensor(&format!("{base}.weight")).is_some() || self.st.tensor(&format!("{base}.qweight")).is_some()
    }

    fn permuted_qk(&self) -> bool {
        false
    }
}

struct Loader<'a, B: Backend> {
    src: &'a dyn Source,
    be: &'a B,
}

impl<B: Backend> Loader<'_, B> {
    fn vector(&self, name: &str, n: usize) -> Result<B::Tensor, ModelError> {
        let v = self.src.vector(name, false, n)?.ok_or_else(|| ModelError::MissingTensor(format!("{name}.weight")))?;
        Ok(self.be.upload(&v, 1, n))
    }

    fn weight(&self, name: &str, raw: Raw) -> Result<B::Weight, ModelError> {
        Ok(match raw {
            Raw::Blocks { dtype, rows, cols, bytes } => self.be.weight(name, dtype, rows, cols, &bytes)?,
            Raw::Awq(m) => self.be.awq_weight(name, m)?,
        })
    }

    /// Builds one Linear from parts stacked along the output dimension, fusing runs of parts
    /// that share a storage type into one matrix.
    fn linear(&self, name: &str, parts: Vec<(Raw, Option<Vec<f32>>)>) -> Result<Linear<B>, ModelError> {
        let out_features = parts.iter().map(|(r, _)| r.rows()).sum();
        let mut fused: Vec<(Raw, Option<Vec<f32>>, usize)> = Vec::new();
        let mut col0 = 0;
        let any_bias = parts.iter().any(|(_, b)| b.is_some());
        for (raw, bias) in parts {
            let rows = raw.rows();
            let bias = if any_bias { Some(bias.unwrap_or_else(|| vec![0.0; rows])) } else { None };
            let leftover = match fused.last_mut() {
                Some((prev, pb, _)) => match prev.try_stack(raw) {
                    None => {
                        if let (Some(pb), Some(b)) = (pb.as_mut(), bias.clone()) {
                            pb.extend(b);
                        }
                        None
                    }
                    Some(raw) => Some(raw),
                },
                None => Some(raw),
            };
            if let Some(raw) = leftover {
                fused.push((raw, bias, col0));
            }
            col0 += rows;
        }
        let parts = fused
            .into_iter()
            .map(|(raw, bias, col0)| {
                let b = bias.map(|b| self.be.upload(&b, 1, b.len()));
                Ok((self.weight(name, raw)?, b, col0))
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(Linear { parts, out_features })
    }
}

impl<B: Backend> Llama<B> {
    /// Loads a GGUF `llama` or `qwen2` checkpoint onto the backend.
    pub fn from_gguf(file: &GgufFile, be: &B) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_gguf(file)?;
        Self::load(&GgufSource { file, architecture: cfg.architecture }, cfg, be)
    }

    /// Loads a Hugging Face checkpoint (fp16/bf16, or AutoAWQ GEMM 4-bit with `awq`) whose
    /// config.json gave `cfg`.
    pub fn from_safetensors(
        st: &SafetensorsDir,
        cfg: ModelConfig,
        awq: Option<&AwqConfig>,
        be: &B,
    ) -> Result<Self, ModelError> {
        Self::load(&HfSource { st, awq }, cfg, be)
    }

    fn load(src: &dyn Source, mut cfg: ModelConfig, be: &B) -> Result<Self, ModelError> {
        let ld = Loader { src, be };
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let layout = QkvLayout { n_heads: cfg.n_heads, n_kv_heads: cfg.n_kv_heads, head_dim: d };
        // A missing head means a tied one whatever the config says (Llama 3.2 AWQ exports may
        // drop the duplicate `lm_head`).
        cfg.tie_word_embeddings |= !src.has_matrix("output");
        let embed = src.matrix("token_embd", cfg.vocab_size, h)?;
        let head = if cfg.tie_word_embeddings { None } else { Some(src.matrix("output", cfg.vocab_size, h)?) };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let p = |s: &str| format!("blk.{l}.{s}");
            let mut q = src.matrix(&p("attn_q"), layout.q_cols(), h)?;
            let mut k = src.matrix(&p("attn_k"), layout.kv_cols(), h)?;
            let v = src.matrix(&p("attn_v"), layout.kv_cols(), h)?;
            let mut qb = src.vector(&p("attn_q"), true, layout.q_cols())?;
            let mut kb = src.vector(&p("attn_k"), true, layout.kv_cols())?;
            let vb = src.vector(&p("attn_v"), true, layout.kv_cols())?;
            if src.permuted_qk() {
                for raw in [&mut q, &mut k] {
                    if let Raw::Blocks { bytes, rows, .. } = raw {
                        let rb = bytes.len() / *rows;
                        *bytes = unpermute_heads(bytes, rb, d);
                    }
                }
                for b in [qb.as_mut(), kb.as_mut()].into_iter().flatten() {
                    *b = unpermute_heads(b, 1, d);
                }
            }
            let gate = src.matrix(&p("ffn_gate"), cfg.intermediate_size, h)?;
            let up = src.matrix(&p("ffn_up"), cfg.intermediate_size, h)?;
            layers.push(Layer {
                attn_norm: ld.vector(&p("attn_norm"), h)?,
                qkv: ld.linear(&p("attn_qkv"), vec![(q, qb), (k, kb), (v, vb)])?,
                o: ld.linear(&p("attn_output"), vec![(src.matrix(&p("attn_output"), h, layout.q_cols())?, None)])?,
                ffn_norm: ld.vector(&p("ffn_norm"), h)?,
                gate_up: ld.linear(&p("ffn_gate_up"), vec![(gate, None), (up, None)])?,
                down: ld.linear(&p("ffn_down"), vec![(src.matrix(&p("ffn_down"), h, cfg.intermediate_size)?, None)])?,
            });
        }
        Ok(Self {
            rope: cfg.rope(RopeStyle::Neox),
            layout,
            embed: ld.weight("token_embd", embed)?,
            head: head.map(|raw| ld.weight("output", raw)).transpose()?,
            final_norm: ld.vector("output_norm", h)?,
            layers,
            config: cfg,
        })
    }

    pub fn layout(&self) -> QkvLayout {
        self.layout
    }

    /// Bytes of weights one decode step reads: every linear and the head (embedding lookups
    /// read a row per token, which is noise).
    pub fn weight_bytes(&self, be: &B) -> usize {
        let linear = |l: &Linear<B>| l.parts.iter().map(|(w, _, _)| be.weight_bytes(w)).sum::<usize>();
        let layers: usize =
            self.layers.iter().map(|l| linear(&l.qkv) + linear(&l.o) + linear(&l.gate_up) + linear(&l.down)).sum();
        layers + be.weight_bytes(self.head.as_ref().unwrap_or(&self.embed))
    }

    /// Runs `tokens` (the next positions of the sequence in `cache`) and returns the logits of
    /// the last token (`vocab_size` values). With `all_logits`, returns logits of every token,
    /// row after row (for tests and scoring).
    pub fn forward<C: KvCache<B> + Send + ?Sized>(
        &self,
        be: &B,
        tokens: &[u32],
        cache: &mut C,
        all_logits: bool,
    ) -> Result<Vec<f32>, ModelError> {
        self.forward_mm(be, tokens, &MmInput::default(), cache, all_logits)
    }

    /// [`Self::forward`] with a multimodal prompt's extras: image embeddings in place of some
    /// token embeddings, and M-RoPE positions.
    pub fn forward_mm<C: KvCache<B> + Send + ?Sized>(
        &self,
        be: &B,
        tokens: &[u32],
        mm: &MmInput<'_>,
        cache: &mut C,
        all_logits: bool,
    ) -> Result<Vec<f32>, ModelError> {
        self.run(be, tokens, mm, cache, if all_logits { Output::AllLogits } else { Output::LastLogits })
    }

    /// The input embeddings of `ids`, row after row (`hidden_size` each).
    pub fn token_embeddings(&self, be: &B, ids: &[u32]) -> Vec<f32> {
        let mut t = be.zeros(ids.len(), self.config.hidden_size);
        be.embedding(&self.embed, ids, &mut t);
        be.download(&t)
    }

    /// Rope positions for `n` tokens at cache indices `first..`, as the rope wants them: one per
    /// token, or (M-RoPE) three equal ones, shifted by the sequence's `rope_delta`.
    fn text_positions(&self, first: usize, n: usize, rope_delta: i64) -> Vec<u32> {
        let per_row = self.rope.positions_per_row();
        (first..first + n).flat_map(|p| std::iter::repeat_n((p as i64 + rope_delta).max(0) as u32, per_row)).collect()
    }

    /// Runs `tokens` and returns the mean over them of the final-norm hidden states
    /// (`hidden_size` values): the sequence embedding `/api/embed` and `/v1/embeddings` serve.
    pub fn embed_mean<C: KvCache<B> + Send + ?Sized>(
        &self,
        be: &B,
        tokens: &[u32],
        cache: &mut C,
    ) -> Result<Vec<f32>, ModelError> {
        let rows = self.run(be, tokens, &MmInput::default(), cache, Output::Hidden)?;
        let h = self.config.hidden_size;
        let mut mean = vec![0f32; h];
        for row in rows.chunks_exact(h) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v;
            }
        }
        let n = (rows.len() / h).max(1) as f32;
        mean.iter_mut().for_each(|m| *m /= n);
        Ok(mean)
    }

    fn run<C: KvCache<B> + Send + ?Sized>(
        &self,
        be: &B,
        tokens: &[u32],
        mm: &MmInput<'_>,
        cache: &mut C,
        output: Output,
    ) -> Result<Vec<f32>, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Empty);
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(ModelError::TokenOutOfRange { id, vocab: self.config.vocab_size });
        }
        let n = tokens.len();
        let positions = match mm.positions {
            None => self.text_positions(cache.len(), n, mm.rope_delta),
            Some(p) if self.rope.mrope_section.is_none() => {
                return Err(ModelError::Input(format!("{} 3-D positions for a model without M-RoPE", p.len())))
            }
            Some(p) if p.len() != n => {
                return Err(ModelError::Input(format!("{} 3-D positions for {n} tokens", p.len())));
            }
            Some(p) => p.iter().flatten().copied().collect(),
        };
        let h = self.config.hidden_size;
        if mm.embeds.len() != mm.embed_rows.len() * h || mm.embed_rows.iter().any(|&r| r >= n) {
            return Err(ModelError::Input(format!(
                "{} embedding values for rows {:?} of a {n}-token input of width {h}",
                mm.embeds.len(),
                mm.embed_rows
            )));
        }
        let first = cache.len();
        let new_slots = cache.append(n)?;
        let slots = cache.slots().to_vec();
        debug_assert_eq!(first + n, slots.len());
        let seqs = [AttnSeq { q_rows: 0..n, slots: &slots }];
        let rows: Vec<usize> = if output == Output::LastLogits { vec![n - 1] } else { (0..n).collect() };
        let embeds = (!mm.embed_rows.is_empty()).then_some((mm.embed_rows, mm.embeds));
        Ok(self.compute(be, tokens, embeds, &positions, &new_slots, &seqs, &rows, output == Output::Hidden, cache))
    }

    /// One forward over several sequences of a paged cache at once: each `(tokens, sequence)`
    /// appends its tokens (a whole prompt, a prompt chunk, or one decode token) and gets the
    /// logits of its last token. Rows are laid out sequence after sequence; attention keeps each
    /// sequence to its own slots, so every sequence's result equals running it alone.
    pub fn forward_batch(
        &self,
        be: &B,
        cache: &mut PagedKvCache<B>,
        batch: &mut [(&[u32], &mut Sequence)],
    ) -> Result<Vec<Vec<f32>>, ModelError>
    where
        B::KvLayer: Send,
    {
        self.forward_batch_mm(be, cache, batch, &vec![None; batch.len()])
    }

    /// [`Self::forward_batch`] where sequence `i` may be a prompt with images (`mm[i]`): its rows
    /// take their M-RoPE positions and image embeddings from the [`MmPrompt`] by position in the
    /// sequence, so prompt chunks and recomputation after preemption need nothing else; tokens
    /// past the prompt are text at `index + rope_delta`.
    pub fn forward_batch_mm(
        &self,
        be: &B,
        cache: &mut PagedKvCache<B>,
        batch: &mut [(&[u32], &mut Sequence)],
        mm: &[Option<&MmPrompt>],
    ) -> Result<Vec<Vec<f32>>, ModelError>
    where
        B::KvLayer: Send,
    {
        if batch.is_empty() || batch.iter().any(|(t, _)| t.is_empty()) {
            return Err(ModelError::Empty);
        }
        assert_eq!(mm.len(), batch.len(), "one multimodal entry per sequence");
        let (mut tokens, mut positions, mut new_slots, mut rows) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut embed_rows, mut embeds) = (Vec::new(), Vec::new());
        for ((t, seq), m) in batch.iter_mut().zip(mm) {
            if let Some(&id) = t.iter().find(|&&id| id as usize >= self.config.vocab_size) {
                return Err(ModelError::TokenOutOfRange { id, vocab: self.config.vocab_size });
            }
            let (first, n) = (seq.len(), t.len());
            match m {
                None => {
                    new_slots.extend(cache.view(seq, t).append(n)?);
                    positions.extend(self.text_positions(first, n, 0));
                }
                Some(m) => {
                    let keys = m.keys(first, t);
                    new_slots.extend(cache.view(seq, &keys).append(n)?);
                    positions.extend(m.positions_for(self, first, n));
                    let (r, e) = m.embeds_in(first..first + n, self.config.hidden_size);
                    embed_rows.extend(r.into_iter().map(|r| tokens.len() + r - first));
                    embeds.extend_from_slice(e);
                }
            }
            tokens.extend_from_slice(t);
            rows.push(tokens.len() - 1);
        }
        let embeds = (!embed_rows.is_empty()).then_some((&embed_rows[..], &embeds[..]));
        let mut start = 0;
        let seqs: Vec<AttnSeq> = batch
            .iter()
            .map(|(t, seq)| {
                let q = AttnSeq { q_rows: start..start + t.len(), slots: seq.slots() };
                start += t.len();
                q
            })
            .collect();
        let flat = self.compute(be, &tokens, embeds, &positions, &new_slots, &seqs, &rows, false, cache);
        Ok(flat.chunks_exact(self.config.vocab_size).map(<[f32]>::to_vec).collect())
    }

    /// The decoder over flat rows: `tokens[i]` at `positions[i]` (M-RoPE: `positions[3i..3i+3]`)
    /// writes its K/V to `new_slots[i]`; `embeds` replace the token embeddings of some rows;
    /// `seqs` say which rows attend over which slots; returns the final-norm hidden states
    /// (`hidden`) or logits of `out_rows`, row after row.
    #[allow(clippy::too_many_arguments)]
    fn compute<C: KvLayers<B> + Send + ?Sized>(
        &self,
        be: &B,
        tokens: &[u32],
        embeds: Option<(&[usize], &[f32])>,
        positions: &[u32],
        new_slots: &[u32],
        seqs: &[AttnSeq<'_>],
        out_rows: &[usize],
        hidden: bool,
        cache: &mut C,
    ) -> Vec<f32> {
        let n = tokens.len();
        be.run(|| {
            let cfg = &self.config;
            let eps = cfg.rms_norm_eps;
            let mut h = be.zeros(n, cfg.hidden_size);
            be.embedding(&self.embed, tokens, &mut h);
            if let Some((rows, values)) = embeds {
                be.set_rows(&mut h, rows, values);
            }
            let mut normed = be.zeros(n, cfg.hidden_size);
            let mut attn = be.zeros(n, self.layout.q_cols());
            let mut act = be.zeros(n, cfg.intermediate_size);
            // `pending` is the previous block's output, added to the residual by the next fused
            // add+norm (saves one pass over h per block).
            let mut pending: Option<B::Tensor> = None;
            for (l, layer) in self.layers.iter().enumerate() {
                match pending.take() {
                    None => be.rms_norm(&h, &layer.attn_norm, eps, &mut normed),
                    Some(p) => be.add_rms_norm(&mut h, &p, &layer.attn_norm, eps, &mut normed),
                }
                let mut qkv = layer.qkv.forward(be, &normed);
                be.rope(&mut qkv, self.layout.n_heads + self.layout.n_kv_heads, positions, &self.rope);
                let (kc, vc) = cache.kv_layer(l);
                be.write_kv((&mut *kc, &mut *vc), &qkv, self.layout, new_slots);
                be.attention(&qkv, (&*kc, &*vc), self.layout, seqs, &mut attn);
                let o = layer.o.forward(be, &attn);
                be.add_rms_norm(&mut h, &o, &layer.ffn_norm, eps, &mut normed);
                let gu = layer.gate_up.forward(be, &normed);
                be.silu_mul(&gu, &mut act);
                pending = Some(layer.down.forward(be, &act));
            }
            if let Some(p) = pending {
                be.add(&mut h, &p);
            }
            let last = be.gather_rows(&h, out_rows);
            let mut normed = be.zeros(out_rows.len(), cfg.hidden_size);
            be.rms_norm(&last, &self.final_norm, eps, &mut normed);
            if hidden {
                return be.download(&normed);
            }
            let mut logits = be.zeros(out_rows.len(), cfg.vocab_size);
            be.linear(&normed, self.head.as_ref().unwrap_or(&self.embed), None, &mut logits, 0);
            be.download(&logits)
        })
    }
}

/// A multimodal prompt's extras for [`Llama::forward_mm`]. The default is plain text.
#[derive(Clone, Copy, Debug, Default)]
pub struct MmInput<'a> {
    /// M-RoPE positions `(t, h, w)`, one per token (a prompt with images, from
    /// `model::vision::mrope_positions`). `None`: each token at its cache index + `rope_delta`.
    pub positions: Option<&'a [[u32; 3]]>,
    /// M-RoPE: what images shifted later text positions by (negative; 0 without images).
    pub rope_delta: i64,
    /// Rows of the input whose embeddings `embeds` replace (`embed_rows.len() × hidden_size`).
    pub embed_rows: &'a [usize],
    pub embeds: &'a [f32],
}

/// A prompt with images, prepared for the batching engine: everything the decoder needs besides
/// the token ids, indexed by position in the prompt.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MmPrompt {
    /// M-RoPE `(t, h, w)` of every prompt token (empty for a model without M-RoPE).
    pub positions: Vec<[u32; 3]>,
    /// What the images shift later text positions by.
    pub rope_delta: i64,
    /// Prompt indices whose embeddings are replaced, ascending; `embeds` holds their rows.
    pub embed_rows: Vec<usize>,
    pub embeds: Vec<f32>,
    /// The prompt's ids for prefix-cache hashing: placeholders replaced by ids derived from their
    /// image's hash, so the same placeholders for different images never share cached blocks.
    pub key_ids: Vec<u32>,
}

impl MmPrompt {
    /// Hash ids for `tokens` at sequence positions `first..`: the prompt's keys, then the ids.
    pub fn keys(&self, first: usize, tokens: &[u32]) -> Vec<u32> {
        (first..first + tokens.len()).map(|i| self.key_ids.get(i).copied().unwrap_or(tokens[i - first])).collect()
    }

    /// Rope positions for `n` tokens at sequence positions `first..`.
    fn positions_for<B: Backend>(&self, model: &Llama<B>, first: usize, n: usize) -> Vec<u32> {
        if model.rope.mrope_section.is_none() || self.positions.is_empty() {
            return model.text_positions(first, n, self.rope_delta);
        }
        (first..first + n)
            .flat_map(|i| match self.positions.get(i) {
                Some(p) => *p,
                None => [(i as i64 + self.rope_delta).max(0) as u32; 3],
            })
            .collect()
    }

    /// The replaced rows within `range` (sequence positions) and their embedding values.
    fn embeds_in(&self, range: std::ops::Range<usize>, hidden: usize) -> (Vec<usize>, &[f32]) {
        let a = self.embed_rows.partition_point(|&r| r < range.start);
        let b = self.embed_rows.partition_point(|&r| r < range.end);
        (self.embed_rows[a..b].to_vec(), &self.embeds[a * hidden..b * hidden])
    }
}

/// What [`Llama::run`] returns after the last block.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    LastLogits,
    AllLogits,
    /// Final-norm hidden states of every token.
    Hidden,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::reference;

    /// The same weights as an HF checkpoint (safetensors + config.json, q/k rows in HF order)
    /// and as a GGUF (q/k rows permuted) load into the same model: the HF name mapping, the
    /// config.json reader and the GGUF un-permutation agree.
    #[test]
    fn an_hf_checkpoint_of_the_same_weights_gives_the_same_logits() {
        use crate::backend::cpu::{CpuBackend, Precision};
        use crate::model::kv_cache::ContiguousKvCache;
        use crate::model::test_model;
        use crate::model::weights::safetensors::TestTensor;

        let file = test_model::gguf(3);
        let be = CpuBackend::with_precision(1, Precision::F32);
        let from_gguf = Llama::from_gguf(&file, &be).unwrap();
        let c = &from_gguf.config;
        let d = c.head_dim;
        let mut tensors = Vec::new();
        for t in file.tensors() {
            let (rows, cols) = t.rows_cols();
            let mut v = read_f32(t.dtype, file.tensor_data(t), rows * cols);
            let logical = t.name.strip_suffix(".weight").expect("the tiny model has weights only");
            if logical.ends_with("attn_q") || logical.ends_with("attn_k") {
                v = unpermute_heads(&v, cols, d);
            }
            let shape = if t.dims.len() == 1 { vec![cols] } else { vec![rows, cols] };
            let name = format!("{}.weight", HfSource::hf_name(logical));
            tensors.push((name, TestTensor(Dtype::F32, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect())));
        }
        let dir = tempfile::tempdir().unwrap();
        safetensors::serialize_to_file(
            tensors.iter().map(|(n, t)| (n.clone(), t)),
            None,
            &dir.path().join("model.safetensors"),
        )
        .unwrap();
        let config = serde_json::json!({
            "model_type": "llama", "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "num_hidden_layers": c.n_layers,
            "vocab_size": c.vocab_size, "max_position_embeddings": c.context_length, "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_word_embeddings,
        });
        let (cfg, awq) = ModelConfig::from_hf_json(&config).unwrap();
        assert!(awq.is_none());
        let st = SafetensorsDir::open(dir.path()).unwrap();
        let from_hf = Llama::from_safetensors(&st, cfg, None, &be).unwrap();
        assert_eq!(from_hf.config, from_gguf.config);
        let tokens = [1u32, 7, 30, 12, 55, 3];
        let logits = |m: &Llama<CpuBackend>| {
            let mut cache = ContiguousKvCache::new(&be, c.n_layers, m.layout().kv_cols(), 16).unwrap();
            m.forward(&be, &tokens, &mut cache, true).unwrap()
        };
        let (a, b) = (logits(&from_gguf), logits(&from_hf));
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "GGUF and HF logits differ by up to {worst}");
    }

    /// The tiny transformers-made Qwen2 (tests/fixtures/qwen2_tiny) rewritten as a `qwen2` GGUF
    /// the way llama.cpp's converter writes one (same fp16 bytes, llama.cpp names, q/k rows not
    /// permuted, q/k/v biases as `.bias` tensors) gives transformers' logits too: Qwen2 loads
    /// from GGUF and from HF safetensors into the one decoder.
    #[test]
    fn a_qwen2_gguf_gives_the_transformers_logits() {
        use crate::backend::cpu::{CpuBackend, Precision};
        use crate::model::kv_cache::ContiguousKvCache;
        use crate::model::weights::gguf_writer::GgufWriter;
        use crate::model::weights::MetaValue;

        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_tiny");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let (c, _) = ModelConfig::from_hf_json(&json).unwrap();
        let st = SafetensorsDir::open(&dir).unwrap();
        let mut w = GgufWriter::new();
        let u = |v: usize| MetaValue::U32(v as u32);
        w.kv("general.architecture", MetaValue::String("qwen2".into()))
            .kv("qwen2.context_length", u(c.context_length))
            .kv("qwen2.embedding_length", u(c.hidden_size))
            .kv("qwen2.block_count", u(c.n_layers))
            .kv("qwen2.feed_forward_length", u(c.intermediate_size))
            .kv("qwen2.attention.head_count", u(c.n_heads))
            .kv("qwen2.attention.head_count_kv", u(c.n_kv_heads))
            .kv("qwen2.attention.layer_norm_rms_epsilon", MetaValue::F32(c.rms_norm_eps))
            .kv("qwen2.rope.freq_base", MetaValue::F32(c.rope_theta))
            .kv("qwen2.vocab_size", u(c.vocab_size));
        let mut names = vec!["token_embd.weight".to_owned(), "output_norm.weight".into(), "output.weight".into()];
        for l in 0..c.n_layers {
            for r in
                ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
            {
                names.push(format!("blk.{l}.{r}.weight"));
            }
            names.extend(["attn_q", "attn_k", "attn_v"].map(|r| format!("blk.{l}.{r}.bias")));
        }
        for name in names {
            let (logical, suffix) = name.rsplit_once('.').unwrap();
            let t = st.tensor(&format!("{}.{suffix}", HfSource::hf_name(logical))).unwrap();
            assert_eq!(t.dtype, Dtype::F16);
            let dims: Vec<u64> = t.shape.iter().rev().map(|&d| d as u64).collect();
            w.tensor(&name, &dims, GgmlType::F16, st.data(t).to_vec());
        }
        let file = w.build();
        let be = CpuBackend::with_precision(1, Precision::F32);
        let m = Llama::from_gguf(&file, &be).unwrap();
        assert_eq!(m.config.architecture, Architecture::Qwen2);
        let goldens: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("goldens.json")).unwrap()).unwrap();
        for p in goldens["prompts"].as_array().unwrap() {
            let ids: Vec<u32> = p["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            let want: Vec<f32> =
                p["last_logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            let mut cache = ContiguousKvCache::new(&be, c.n_layers, m.layout().kv_cols(), ids.len()).unwrap();
            let got = m.forward(&be, &ids, &mut cache, false).unwrap();
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            // The HF load of the same bytes is within 1.2e-6 (tests/qwen2_golden.rs).
            assert!(worst < 1e-4, "{} tokens: logits differ from transformers by up to {worst}", ids.len());
        }
    }

    /// Embeddings put in place of some rows act exactly like the tokens they embed: the image
    /// path (vision rows into `<|image_pad|>` rows) changes the input and nothing else. Bad
    /// extras are errors, not panics.
    #[test]
    fn injected_embeddings_act_like_the_tokens_they_embed() {
        use crate::backend::cpu::{CpuBackend, Precision};
        use crate::model::kv_cache::ContiguousKvCache;
        use crate::model::test_model;

        let file = test_model::gguf(5);
        let be = CpuBackend::with_precision(1, Precision::F32);
        let m = Llama::from_gguf(&file, &be).unwrap();
        let h = m.config.hidden_size;
        let cache = || ContiguousKvCache::new(&be, m.config.n_layers, m.layout().kv_cols(), 16).unwrap();
        let real = [5u32, 9, 40, 41, 42, 7];
        let want = m.forward(&be, &real, &mut cache(), true).unwrap();
        // Rows 2..5 get placeholders (id 3) and the embeddings of 40, 41, 42 instead.
        let table = m.token_embeddings(&be, &[40, 41, 42]);
        assert_eq!(table.len(), 3 * h);
        let placeholders = [5u32, 9, 3, 3, 3, 7];
        let mm = MmInput { embed_rows: &[2, 3, 4], embeds: &table, ..MmInput::default() };
        let got = m.forward_mm(&be, &placeholders, &mm, &mut cache(), true).unwrap();
        assert_eq!(got, want);
        let bad = MmInput { embed_rows: &[2, 9], embeds: &table[..2 * h], ..MmInput::default() };
        assert!(matches!(m.forward_mm(&be, &placeholders, &bad, &mut cache(), true), Err(ModelError::Input(_))));
        let pos = [[0u32; 3]; 6];
        let bad = MmInput { positions: Some(&pos), ..MmInput::default() };
        let e = m.forward_mm(&be, &placeholders, &bad, &mut cache(), true).unwrap_err();
        assert!(e.to_string().contains("without M-RoPE"), "{e}");
    }

    /// GGUF `llama` q/k rows are stored for GPT-J-style rope. Un-permuting them and applying HF
    /// rotate-half rope gives the same rotated vectors, in HF order, as rotating the stored rows
    /// with adjacent-pair rope: the two conventions are one model.
    #[test]
    fn unpermuted_rows_with_neox_rope_equal_stored_rows_with_norm_rope() {
        let (hd, heads, cols) = (8, 3, 5);
        let rows = hd * heads;
        let mut seed = 17u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        let stored: Vec<f32> = (0..rows * cols).map(|_| rnd()).collect();
        let x: Vec<f32> = (0..cols).map(|_| rnd()).collect();
        let rope = |style| Rope {
            style,
            head_dim: hd,
            inv_freq: (0..hd / 2).map(|i| 100f32.powf(-((2 * i) as f32) / hd as f32)).collect(),
            mrope_section: None,
        };

        let mut a = reference::linear(&x, 1, cols, &stored, rows, None);
        reference::rope(&mut a, rows, heads, &[7], &rope(RopeStyle::Norm));

        let hf = unpermute_heads(&stored, cols, hd);
        let mut b = reference::linear(&x, 1, cols, &hf, rows, None);
        reference::rope(&mut b, rows, heads, &[7], &rope(RopeStyle::Neox));

        for h in 0..heads {
            for i in 0..hd / 2 {
                assert!((a[h * hd + 2 * i] - b[h * hd + i]).abs() < 1e-6);
                assert!((a[h * hd + 2 * i + 1] - b[h * hd + hd / 2 + i]).abs() < 1e-6);
            }
        }
    }
}
