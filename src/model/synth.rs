//! Synthetic AWQ checkpoints: the real tensor names, shapes, packing, config.json and tokenizer
//! files of Llama-3.2-3B-Instruct-AWQ and Qwen2.5-Coder-7B-Instruct-AWQ (plus a tiny one for
//! tests), filled with seeded random values, so tests and benchmarks run without downloads.
//!
//! Values: 4-bit weights and zero points uniform in 0..=15; scales `≈ 1 / (4.6·√K)` (the spread
//! of `q − z` is about 4.6) so each linear roughly keeps the activation scale; fp16 embeddings,
//! head and biases small and normal-ish; norm weights 1. Each tensor is generated from the seed
//! and its name alone, one tensor at a time while it is written (a 7B file never sits in memory).
//! The tokenizer is byte-level BPE with the 256 byte tokens and the family's special tokens; ids
//! above it exist in the model's vocabulary, as Qwen's padded vocabulary has.

use std::borrow::Cow;
use std::path::Path;

use half::f16;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use safetensors::{Dtype, View};
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SynthArch {
    /// Llama-3.2-3B-Instruct shapes (tied head, llama3 rope scaling).
    #[value(name = "llama-3.2-3b")]
    Llama32_3b,
    /// Qwen2.5-Coder-7B-Instruct shapes (q/k/v biases, untied head, padded vocabulary).
    #[value(name = "qwen2.5-7b")]
    Qwen25_7b,
    /// A two-layer Qwen2-style model (head_dim 128, biases, untied head) for tests.
    #[value(name = "tiny")]
    Tiny,
}

/// Group size of every synthetic AWQ linear (the one the published checkpoints use).
pub const GROUP: usize = 128;
/// Shards are cut at about this many bytes, as HF exports are (so the 7B exercises the index).
const SHARD_BYTES: usize = 4 << 30;

impl SynthArch {
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama32_3b => "llama-3.2-3b",
            Self::Qwen25_7b => "qwen2.5-7b",
            Self::Tiny => "tiny",
        }
    }

    fn is_qwen(self) -> bool {
        self != Self::Llama32_3b
    }

    /// The config.json this checkpoint ships.
    pub fn config(self) -> serde_json::Value {
        let quant =
            json!({"bits": 4, "group_size": GROUP, "quant_method": "awq", "version": "gemm", "zero_point": true});
        match self {
            Self::Llama32_3b => json!({
                "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 3072,
                "intermediate_size": 8192, "num_attention_heads": 24, "num_hidden_layers": 28,
                "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": true, "vocab_size": 128256,
                "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "float16",
                "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                "quantization_config": quant,
            }),
            Self::Qwen25_7b => json!({
                "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
                "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
                "num_key_value_heads": 4, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0, "tie_word_embeddings": false, "vocab_size": 152064,
                "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "float16",
                "use_sliding_window": false, "quantization_config": quant,
            }),
            Self::Tiny => json!({
                "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 256,
                "intermediate_size": 512, "num_attention_heads": 4, "num_hidden_layers": 2,
                "num_key_value_heads": 2, "head_dim": 128, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0, "tie_word_embeddings": false, "vocab_size": 384,
                "torch_dtype": "float16", "quantization_config": quant,
            }),
        }
    }

    fn special_tokens(self) -> &'static [&'static str] {
        if self.is_qwen() {
            &["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        } else {
            &[
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eom_id|>",
                "<|eot_id|>",
            ]
        }
    }

    fn tokenizer_config(self) -> serde_json::Value {
        if self.is_qwen() {
            json!({
                "bos_token": null, "eos_token": "<|im_end|>", "add_bos_token": false,
                "chat_template": "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
            })
        } else {
            json!({
                "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": false,
                "chat_template": "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}",
            })
        }
    }
}

/// GPT-2's byte → printable character map (the byte-level BPE alphabet).
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("latin-1")
            } else {
                extra += 1;
                char::from_u32(255 + extra).expect("BMP")
            }
        })
        .collect()
}

fn tokenizer_json(arch: SynthArch) -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> =
        byte_chars().into_iter().enumerate().map(|(i, c)| (c.to_string(), json!(i))).collect();
    let added: Vec<serde_json::Value> = arch
        .special_tokens()
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": 256 + i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

/// How a synthetic tensor's values are drawn.
#[derive(Clone, Copy)]
enum Fill {
    /// Random 32-bit words (packed nibbles: every bit pattern is valid).
    Words,
    /// fp16 `mean + sd · u`, u roughly normal.
    Half { mean: f32, sd: f32 },
    /// fp16 AWQ scales for `k` inputs: `(0.5 + u) / (4.6 √k)`, u uniform in [0, 1).
    Scales { k: usize },
}

struct Synth {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    fill: Fill,
    seed: u64,
}

/// Values are made in chunks of this many bytes, each from its own stream, in parallel.
const CHUNK: usize = 1 << 20;

impl Synth {
    fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * (self.dtype.bitsize() / 8)
    }

    fn generate(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.bytes()];
        // FNV-1a of the name: each tensor's values depend on the seed and its name only.
        let name_hash =
            self.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
            let mut rng =
                ChaCha8Rng::seed_from_u64(self.seed ^ name_hash ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            match self.fill {
                Fill::Words => rng.fill_bytes(chunk),
                Fill::Half { mean, sd } => {
                    for h in chunk.chunks_exact_mut(2) {
                        let w = rng.next_u64();
                        // Sum of four uniforms in [-1, 1): mean 0, sd ≈ 1.15.
                        let u: f32 =
                            (0..4).map(|j| ((w >> (16 * j)) & 0xFFFF) as f32 / 32768.0 - 1.0).sum::<f32>() * 0.87;
                        h.copy_from_slice(&f16::from_f32(mean + sd * u).to_le_bytes());
                    }
                }
                Fill::Scales { k } => {
                    let base = 1.0 / (4.6 * (k as f32).sqrt());
                    for h in chunk.chunks_exact_mut(2) {
                        let u = (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32;
                        h.copy_from_slice(&f16::from_f32((0.5 + u) * base).to_le_bytes());
                    }
                }
            }
        });
        out
    }
}

impl View for &Synth {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.generate())
    }
    fn data_len(&self) -> usize {
        self.bytes()
    }
}

/// Every tensor of the checkpoint, in layer order.
fn tensors(arch: SynthArch, seed: u64) -> Vec<Synth> {
    let c = arch.config();
    let n = |k: &str| c[k].as_u64().expect("synthetic config sizes") as usize;
    let (h, ffn, vocab, heads, kv) =
        (n("hidden_size"), n("intermediate_size"), n("vocab_size"), n("num_attention_heads"), n("num_key_value_heads"));
    let d = c.get("head_dim").and_then(|v| v.as_u64()).map_or(h / heads, |v| v as usize);
    let mut out = Vec::new();
    let mut t = |name: String, dtype, shape: Vec<usize>, fill| out.push(Synth { name, dtype, shape, fill, seed });
    t("model.embed_tokens.weight".into(), Dtype::F16, vec![vocab, h], Fill::Half { mean: 0.0, sd: 0.05 });
    for l in 0..n("num_hidden_layers") {
        let p = format!("model.layers.{l}");
        t(format!("{p}.input_layernorm.weight"), Dtype::F16, vec![h], Fill::Half { mean: 1.0, sd: 0.02 });
        t(format!("{p}.post_attention_layernorm.weight"), Dtype::F16, vec![h], Fill::Half { mean: 1.0, sd: 0.02 });
        let linears = [
            ("self_attn.q_proj", h, heads * d),
            ("self_attn.k_proj", h, kv * d),
            ("self_attn.v_proj", h, kv * d),
            ("self_attn.o_proj", heads * d, h),
            ("mlp.gate_proj", h, ffn),
            ("mlp.up_proj", h, ffn),
            ("mlp.down_proj", ffn, h),
        ];
        for (name, k, n_out) in linears {
            let q = format!("{p}.{name}");
            t(format!("{q}.qweight"), Dtype::I32, vec![k, n_out / 8], Fill::Words);
            t(format!("{q}.qzeros"), Dtype::I32, vec![k / GROUP, n_out / 8], Fill::Words);
            t(format!("{q}.scales"), Dtype::F16, vec![k / GROUP, n_out], Fill::Scales { k });
            if arch.is_qwen() && matches!(name, "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj") {
                t(format!("{q}.bias"), Dtype::F16, vec![n_out], Fill::Half { mean: 0.0, sd: 0.1 });
            }
        }
    }
    t("model.norm.weight".into(), Dtype::F16, vec![h], Fill::Half { mean: 1.0, sd: 0.02 });
    if !c["tie_word_embeddings"].as_bool().unwrap_or(false) {
        t("lm_head.weight".into(), Dtype::F16, vec![vocab, h], Fill::Half { mean: 0.0, sd: 0.05 });
    }
    out
}

/// What [`write`] made.
#[derive(Debug)]
pub struct SynthSummary {
    pub tensors: usize,
    pub bytes: usize,
    pub shards: usize,
}

/// Writes the checkpoint into `dir` (created if missing): config.json, tokenizer.json,
/// tokenizer_config.json, generation_config.json and the weights (sharded with an index when
/// larger than 4 GiB).
pub fn write(arch: SynthArch, dir: &Path, seed: u64) -> std::io::Result<SynthSummary> {
    std::fs::create_dir_all(dir)?;
    let json_file = |name: &str, v: &serde_json::Value| {
        std::fs::write(dir.join(name), serde_json::to_vec_pretty(v).expect("JSON values serialize"))
    };
    // config.json is written last: its presence says the checkpoint is complete (`bench
    // --synthetic` reuses a directory that has one).
    json_file("tokenizer.json", &tokenizer_json(arch))?;
    json_file("tokenizer_config.json", &arch.tokenizer_config())?;
    json_file("generation_config.json", &json!({"do_sample": false}))?;

    let all = tensors(arch, seed);
    let bytes: usize = all.iter().map(Synth::bytes).sum();
    let mut shards: Vec<Vec<&Synth>> = vec![vec![]];
    let mut in_shard = 0;
    for t in &all {
        if in_shard > 0 && in_shard + t.bytes() > SHARD_BYTES {
            shards.push(vec![]);
            in_shard = 0;
        }
        in_shard += t.bytes();
        shards.last_mut().expect("one shard at least").push(t);
    }
    let io = |e: safetensors::SafeTensorError| std::io::Error::other(e.to_string());
    let metadata = Some([("format".to_string(), "pt".to_string())].into());
    if shards.len() == 1 {
        safetensors::serialize_to_file(
            all.iter().map(|t| (t.name.clone(), t)),
            metadata,
            &dir.join("model.safetensors"),
        )
        .map_err(io)?;
    } else {
        let count = shards.len();
        let mut weight_map = serde_json::Map::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
            for t in shard {
                weight_map.insert(t.name.clone(), json!(file));
            }
            safetensors::serialize_to_file(
                shard.iter().map(|t| (t.name.clone(), *t)),
                metadata.clone(),
                &dir.join(&file),
            )
            .map_err(io)?;
        }
        json_file(
            "model.safetensors.index.json",
            &json!({"metadata": {"total_size": bytes}, "weight_map": weight_map}),
        )?;
    }
    // The writer's temporary file is private (0600); a checkpoint is readable like any other file.
    #[cfg(unix)]
    for entry in std::fs::read_dir(dir)? {
        use std::os::unix::fs::PermissionsExt;
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        }
    }
    json_file("config.json", &arch.config())?;
    Ok(SynthSummary { tensors: all.len(), bytes, shards: shards.len() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;

    /// The big checkpoints' tensor lists, without writing them: names and shapes the loader
    /// expects, and the byte totals model-formats.md §2.3 gives (3B: 2.10 GiB, 7B: 5.19 GiB).
    #[test]
    fn real_shapes_and_sizes() {
        for (arch, gib, count) in
            [(SynthArch::Llama32_3b, 2.10, 1 + 28 * 23 + 1), (SynthArch::Qwen25_7b, 5.19, 1 + 28 * 26 + 2)]
        {
            let all = tensors(arch, 0);
            assert_eq!(all.len(), count, "{arch:?}");
            let total = all.iter().map(Synth::bytes).sum::<usize>() as f64 / (1u64 << 30) as f64;
            assert!((total - gib).abs() < 0.02, "{arch:?}: {total:.3} GiB");
            let (cfg, q) = ModelConfig::from_hf_json(&arch.config()).unwrap();
            assert_eq!(q.unwrap().group_size, GROUP);
            assert_eq!(cfg.n_layers, 28);
        }
    }

    /// The tiny checkpoint loads through the HF/AWQ loader onto the CPU and runs: logits are
    /// finite and differ between tokens; the seed alone decides the bytes.
    #[test]
    fn tiny_checkpoint_loads_and_runs() {
        use crate::backend::cpu::{CpuBackend, Precision};
        use crate::model::kv_cache::ContiguousKvCache;
        use crate::model::loaded::LoadedModel;
        let dir = tempfile::tempdir().unwrap();
        let s = write(SynthArch::Tiny, dir.path(), 7).unwrap();
        assert_eq!(s.shards, 1);
        let m =
            LoadedModel::load_hf_dir("tiny", dir.path(), CpuBackend::with_precision(1, Precision::F32), None).unwrap();
        assert_eq!(m.tokenizer.token_id("<|im_end|>"), Some(258));
        let ids = m.tokenizer.encode("hello", false).unwrap();
        assert_eq!(ids, b"hello".iter().map(|&b| b as u32).collect::<Vec<_>>(), "byte tokens are the bytes");
        let cols = m.model.layout().kv_cols();
        let mut cache = ContiguousKvCache::new(&m.backend, m.model.config.n_layers, cols, 16).unwrap();
        let logits = m.model.forward(&m.backend, &[1, 2, 3], &mut cache, true).unwrap();
        assert!(logits.iter().all(|v| v.is_finite()));
        let v = m.model.config.vocab_size;
        assert_ne!(logits[..v], logits[v..2 * v]);
        // Same seed, same checkpoint; another seed, other weights.
        let again = tempfile::tempdir().unwrap();
        write(SynthArch::Tiny, again.path(), 7).unwrap();
        let read = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
        assert_eq!(read(dir.path()), read(again.path()));
        write(SynthArch::Tiny, again.path(), 8).unwrap();
        assert_ne!(read(dir.path()), read(again.path()));
    }

    #[test]
    fn generation_depends_on_seed_and_name_only() {
        let t = |name: &str, seed| Synth {
            name: name.into(),
            dtype: Dtype::F16,
            shape: vec![4096],
            fill: Fill::Scales { k: 128 },
            seed,
        };
        assert_eq!(t("a", 1).generate(), t("a", 1).generate());
        assert_ne!(t("a", 1).generate(), t("b", 1).generate());
        assert_ne!(t("a", 1).generate(), t("a", 2).generate());
        let s: Vec<f32> =
            t("a", 1).generate().chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
        let base = 1.0 / (4.6 * 128f32.sqrt());
        assert!(s.iter().all(|&v| v >= 0.5 * base * 0.99 && v <= 1.5 * base * 1.01));
    }
}
