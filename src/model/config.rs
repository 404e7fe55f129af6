//! One normalized `ModelConfig` for every Llama-family checkpoint, from GGUF metadata (and, with
//! the AWQ issue, from HF config.json), plus the rotary table the weights require.

use crate::backend::{Rope, RopeStyle};
use crate::model::weights::awq::AwqConfig;
use crate::model::weights::{GgufError, GgufFile};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown architecture '{0}' (supported: llama, qwen2)")]
    UnknownArchitecture(String),
    #[error("model config: {0}")]
    Invalid(String),
    #[error("unsupported rope scaling type '{0}' (supported: none, linear, llama3)")]
    UnsupportedRopeScaling(String),
    #[error(transparent)]
    Gguf(#[from] GgufError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama and its relatives (SmolLM2, Mistral-style GQA): no attention bias.
    Llama,
    /// Qwen2 / Qwen2.5: q, k, v biases.
    Qwen2,
}

/// How inverse frequencies are adjusted for long context.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (equivalently every frequency).
    Linear {
        factor: f32,
    },
    /// Llama 3.x (HF config.json; GGUF files carry the same as `rope_freqs.weight` divisors):
    /// long wavelengths divided by `factor`, a smooth blend between
    /// `original_max / low_freq_factor` and `original_max / high_freq_factor`
    /// (transformers `_compute_llama3_parameters`).
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: f32,
    },
    /// Per-frequency divisors read from the checkpoint (GGUF `rope_freqs.weight`).
    Divisors(Vec<f32>),
    /// Qwen2-VL's multimodal RoPE: plain frequencies, split into sections that turn with a
    /// token's temporal, height and width positions ([`Rope::mrope_section`]).
    MRope {
        section: [usize; 3],
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json` (Llama, Qwen2): the hyper-parameters and, for an AWQ
    /// checkpoint, its `quantization_config`. Sizes are bounded before anything is allocated.
    pub fn from_hf_json(v: &serde_json::Value) -> Result<(Self, Option<AwqConfig>), ConfigError> {
        let bad = |m: String| ConfigError::Invalid(m);
        let arch = v
            .get("model_type")
            .and_then(|m| m.as_str())
            .or_else(|| v.get("architectures").and_then(|a| a.get(0)).and_then(|a| a.as_str()))
            .ok_or_else(|| bad("config.json has neither model_type nor architectures".into()))?;
        let architecture = match arch {
            "llama" | "LlamaForCausalLM" => Architecture::Llama,
            // Qwen2-VL's language model is Qwen2 with M-RoPE (rope_scaling type "mrope").
            "qwen2" | "Qwen2ForCausalLM" | "qwen2_vl" | "Qwen2VLForConditionalGeneration" => Architecture::Qwen2,
            other => return Err(ConfigError::UnknownArchitecture(other.into())),
        };
        let int = |k: &str| -> Result<usize, ConfigError> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .filter(|&x| x > 0 && x <= 1 << 24)
                .map(|x| x as usize)
                .ok_or_else(|| bad(format!("config.json: \"{k}\" must be a positive integer up to 2^24")))
        };
        let float = |k: &str, default: f64| -> Result<f32, ConfigError> {
            match v.get(k) {
                None | Some(serde_json::Value::Null) => Ok(default as f32),
                Some(x) => {
                    x.as_f64().map(|x| x as f32).ok_or_else(|| bad(format!("config.json: \"{k}\" must be a number")))
                }
            }
        };
        let hidden_size = int("hidden_size")?;
        let n_heads = int("num_attention_heads")?;
        let n_kv_heads = if v.get("num_key_value_heads").is_some() { int("num_key_value_heads")? } else { n_heads };
        check_heads(n_heads, n_kv_heads)?;
        let head_dim = match v.get("head_dim") {
            Some(serde_json::Value::Null) | None => hidden_size / n_heads,
            Some(_) => int("head_dim")?,
        };
        check_head_dim(n_heads, n_kv_heads, head_dim, hidden_size)?;
        let n_layers = int("num_hidden_layers")?;
        if n_layers > 1024 {
            return Err(bad(format!("num_hidden_layers {n_layers} is beyond any real model")));
        }
        let rope_scaling = match v.get("rope_scaling") {
            None | Some(serde_json::Value::Null) => RopeScaling::None,
            Some(rs) => {
                let f = |k: &str| rs.get(k).and_then(|x| x.as_f64()).map(|x| x as f32);
                let need = |k: &str| f(k).ok_or_else(|| bad(format!("config.json: rope_scaling.{k} is missing")));
                let kind = rs.get("rope_type").or_else(|| rs.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
                // transformers ≥ 4.46 saves Qwen2-VL's M-RoPE as type "default" with the sections.
                let kind = if kind == "default" && rs.get("mrope_section").is_some() { "mrope" } else { kind };
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear { factor: need("factor")? },
                    "llama3" => RopeScaling::Llama3 {
                        factor: need("factor")?,
                        low_freq_factor: need("low_freq_factor")?,
                        high_freq_factor: need("high_freq_factor")?,
                        original_max_position: need("original_max_position_embeddings")?,
                    },
                    "mrope" => {
                        let s: Vec<usize> = rs
                            .get("mrope_section")
                            .and_then(|s| s.as_array())
                            .map(|a| a.iter().filter_map(|x| x.as_u64()).map(|x| x as usize).collect())
                            .unwrap_or_default();
                        match s[..] {
                            [a, b, c] if a + b + c == head_dim / 2 => RopeScaling::MRope { section: [a, b, c] },
                            _ => {
                                return Err(bad(format!(
                                    "config.json: rope_scaling.mrope_section must be three integers summing to \
                                     head_dim / 2 = {}",
                                    head_dim / 2
                                )))
                            }
                        }
                    }
                    other => return Err(ConfigError::UnsupportedRopeScaling(other.into())),
                }
            }
        };
        let quant = match v.get("quantization_config") {
            None | Some(serde_json::Value::Null) => None,
            Some(q) => Some(AwqConfig::from_json(q).map_err(ConfigError::Invalid)?),
        };
        let cfg = Self {
            architecture,
            hidden_size,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            intermediate_size: int("intermediate_size")?,
            vocab_size: int("vocab_size")?,
            context_length: int("max_position_embeddings")?,
            rms_norm_eps: float("rms_norm_eps", 1e-6)?,
            rope_theta: float("rope_theta", 10000.0)?,
            rope_scaling,
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(|t| t.as_bool()).unwrap_or(false),
        };
        Ok((cfg, quant))
    }

    /// Reads `<arch>.*` hyper-parameters. Tensor-dependent facts (tied head, biases, rope
    /// divisors) are filled from the tensor list.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, ConfigError> {
        let arch_name = f.get_str("general.architecture")?;
        let architecture = match arch_name {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => return Err(ConfigError::UnknownArchitecture(other.into())),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let int = |k: &str| f.get_u64(&key(k)).map(|v| v as usize);
        let hidden_size = int("embedding_length")?;
        let n_heads = int("attention.head_count")?;
        let n_kv_heads =
            if f.get(&key("attention.head_count_kv")).is_some() { int("attention.head_count_kv")? } else { n_heads };
        check_heads(n_heads, n_kv_heads)?;
        let head_dim = match f.get(&key("attention.key_length")) {
            Some(_) => int("attention.key_length")?,
            None => hidden_size / n_heads,
        };
        check_head_dim(n_heads, n_kv_heads, head_dim, hidden_size)?;
        let vocab_size = match f.get(&key("vocab_size")) {
            Some(_) => int("vocab_size")?,
            None => f.get_array("tokenizer.ggml.tokens")?.len(),
        };
        // Every size below comes from the file: bound them before anything is allocated from them.
        let n_layers = int("block_count")?;
        if n_layers == 0 || n_layers > f.tensors().len() {
            return Err(ConfigError::Invalid(format!(
                "block_count {n_layers} does not fit the file's {} tensors",
                f.tensors().len()
            )));
        }
        let rope_scaling = match f.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            None | Some("none") => match f.tensor("rope_freqs.weight") {
                Some(t) => Self::rope_divisors(f, t, head_dim)?,
                None => RopeScaling::None,
            },
            Some("linear") => RopeScaling::Linear { factor: f.get_f64(&key("rope.scaling.factor"))? as f32 },
            Some(other) => return Err(ConfigError::UnsupportedRopeScaling(other.into())),
        };
        let has = |name: &str| f.tensor(name).is_some();
        Ok(Self {
            architecture,
            hidden_size,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            intermediate_size: int("feed_forward_length")?,
            vocab_size,
            context_length: int("context_length")?,
            rms_norm_eps: f.get_f64(&key("attention.layer_norm_rms_epsilon"))? as f32,
            rope_theta: match f.get(&key("rope.freq_base")) {
                Some(_) => f.get_f64(&key("rope.freq_base"))? as f32,
                None => 10000.0,
            },
            rope_scaling,
            tie_word_embeddings: !has("output.weight"),
        })
    }

    fn rope_divisors(
        f: &GgufFile,
        t: &crate::model::weights::TensorInfo,
        head_dim: usize,
    ) -> Result<RopeScaling, ConfigError> {
        if t.dtype != crate::backend::GgmlType::F32 || t.n_elements() as usize != head_dim / 2 {
            return Err(ConfigError::Invalid(format!("rope_freqs.weight must be {} F32 values", head_dim / 2)));
        }
        let v = f.tensor_data(t).chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        Ok(RopeScaling::Divisors(v))
    }

    /// The rotary table: `inv_freq[i] = theta^(−2i/d)` in f32, then the scaling adjustment.
    pub fn rope(&self, style: RopeStyle) -> Rope {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d / 2).map(|i| self.rope_theta.powf(-((2 * i) as f32) / d as f32)).collect();
        let inv_freq = match &self.rope_scaling {
            RopeScaling::None | RopeScaling::MRope { .. } => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Divisors(div) => base.iter().zip(div).map(|(f, d)| f / d).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
                let low_wl = original_max_position / low_freq_factor;
                let high_wl = original_max_position / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wl {
                            f
                        } else if wavelen > low_wl {
                            f / factor
                        } else {
                            let smooth = (original_max_position / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        let mrope_section = match self.rope_scaling {
            RopeScaling::MRope { section } => Some(section),
            _ => None,
        };
        Rope { style, head_dim: d, inv_freq, mrope_section }
    }
}

/// Heads of every checkpoint: some, and query heads in whole groups per KV head.
fn check_heads(n_heads: usize, n_kv_heads: usize) -> Result<(), ConfigError> {
    if n_heads == 0 || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        return Err(ConfigError::Invalid(format!(
            "{n_heads} attention heads is not a multiple of {n_kv_heads} KV heads"
        )));
    }
    Ok(())
}

/// The head dimension rope can pair, and sizes bounded before anything is allocated from them.
fn check_head_dim(n_heads: usize, n_kv_heads: usize, head_dim: usize, hidden_size: usize) -> Result<(), ConfigError> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(ConfigError::Invalid(format!("head dimension {head_dim} must be even and positive")));
    }
    if (n_heads + 2 * n_kv_heads).checked_mul(head_dim).is_none_or(|c| c > 1 << 20) || hidden_size > 1 << 20 {
        return Err(ConfigError::Invalid(format!(
            "{n_heads} heads of dimension {head_dim} (hidden {hidden_size}) is beyond any real model"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2-VL's language model is Qwen2 with M-RoPE; a section that does not cover the head's
    /// frequencies is refused.
    #[test]
    fn qwen2_vl_configs_read_as_qwen2_with_mrope() {
        let mut v = serde_json::json!({
            "model_type": "qwen2_vl", "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
            "num_key_value_heads": 4, "num_hidden_layers": 28, "vocab_size": 152064, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "max_position_embeddings": 32768,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}
        });
        let (c, _) = ModelConfig::from_hf_json(&v).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen2);
        assert_eq!(c.rope_scaling, RopeScaling::MRope { section: [16, 24, 24] });
        let r = c.rope(RopeStyle::Neox);
        assert_eq!(
            (r.mrope_section, r.positions_per_row(), r.component(15), r.component(16), r.component(40)),
            (Some([16, 24, 24]), 3, 0, 1, 2)
        );
        v["rope_scaling"] =
            serde_json::json!({"type": "default", "rope_type": "default", "mrope_section": [16, 24, 24]});
        assert_eq!(ModelConfig::from_hf_json(&v).unwrap().0.rope_scaling, RopeScaling::MRope { section: [16, 24, 24] });
        v["rope_scaling"]["mrope_section"] = serde_json::json!([16, 24, 16]);
        let e = ModelConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(e.contains("mrope_section") && e.contains("64"), "{e}");
    }

    fn llama32() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            hidden_size: 3072,
            n_layers: 28,
            n_heads: 24,
            n_kv_heads: 8,
            head_dim: 128,
            intermediate_size: 8192,
            vocab_size: 128256,
            context_length: 131072,
            rms_norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_scaling: RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position: 8192.0,
            },
            tie_word_embeddings: true,
        }
    }

    /// The llama3 rule for d=128, theta=5e5, factor 32 (model-formats.md 2.2): i ≤ 28 unchanged,
    /// 29..=34 smoothed (i = 30 divided by about 1.651), i ≥ 35 divided by 32.
    #[test]
    fn llama3_scaling_matches_the_published_rule() {
        let cfg = llama32();
        let scaled = cfg.rope(RopeStyle::Neox).inv_freq;
        let plain = ModelConfig { rope_scaling: RopeScaling::None, ..cfg }.rope(RopeStyle::Neox).inv_freq;
        for i in 0..64 {
            let ratio = plain[i] / scaled[i];
            match i {
                0..=28 => assert_eq!(ratio, 1.0, "i={i}"),
                29..=34 => assert!(ratio > 1.0 && ratio < 32.0, "i={i}: {ratio}"),
                _ => assert!((ratio - 32.0).abs() < 1e-3, "i={i}: {ratio}"),
            }
        }
        assert!((plain[30] / scaled[30] - 1.651).abs() < 0.01, "{}", plain[30] / scaled[30]);
    }

    /// Llama-3.2-3B-Instruct-AWQ's config.json (the published values, model-formats.md §2.1).
    #[test]
    fn hf_config_json_reads_llama_3_2_with_awq() {
        let v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 3072,
            "intermediate_size": 8192, "num_attention_heads": 24, "num_hidden_layers": 28,
            "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": true, "vocab_size": 128256,
            "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "quantization_config": {"bits": 4, "group_size": 128, "quant_method": "awq", "version": "gemm", "zero_point": true}
        });
        let (cfg, q) = ModelConfig::from_hf_json(&v).unwrap();
        assert_eq!(cfg, llama32());
        assert_eq!(q.unwrap().group_size, 128);

        let mut bad = v.clone();
        bad["num_attention_heads"] = serde_json::json!(-3);
        assert!(ModelConfig::from_hf_json(&bad).unwrap_err().to_string().contains("num_attention_heads"));
        bad = v.clone();
        bad["rope_scaling"]["rope_type"] = serde_json::json!("yarn");
        assert!(ModelConfig::from_hf_json(&bad).unwrap_err().to_string().contains("yarn"));
        bad = v.clone();
        bad["model_type"] = serde_json::json!("mamba");
        assert!(ModelConfig::from_hf_json(&bad).unwrap_err().to_string().contains("mamba"));
    }
}
