//! A tiny random Llama with a byte-level ChatML tokenizer, as one in-memory GGUF, for tests that
//! need a whole model but not a real one (the generation loop now, the batching engine later).
//!
//! Shape: 2 layers, hidden 64, 4 heads / 2 KV heads (head_dim 16), FFN 128, F32 weights drawn
//! from a seeded generator. Vocabulary: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (control,
//! ids 0–2), then space `Ġ`, newline `Ċ` and the printable ASCII bytes `!`..`~`, plus two merges
//! (`he`, `Ġt`) so BPE has something to do. Generated text is therefore always ASCII.
//!
//! Random weights alone would emit the control tokens (and so end-of-generation) every few dozen
//! tokens, which makes length tests flaky by construction. Hidden dimension 0 is therefore a
//! constant feature: every embedding has `CONST` there and no layer writes to it (row 0 of the
//! attention-output and FFN-down matrices is zero), so after the final norm it is always
//! positive, and the head rows of the control tokens weigh it strongly negative. The rest of the
//! model stays random.

use crate::backend::cpu::test_util::Lcg;
use crate::model::weights::gguf_writer::GgufWriter;
use crate::model::weights::{GgufFile, MetaValue};

pub(crate) const HIDDEN: usize = 64;
pub(crate) const HEADS: usize = 4;
pub(crate) const KV_HEADS: usize = 2;
pub(crate) const FFN: usize = 128;
pub(crate) const LAYERS: usize = 2;
pub(crate) const CONTEXT: usize = 256;
pub(crate) const ENDOFTEXT: u32 = 0;
pub(crate) const IM_START: u32 = 1;
pub(crate) const IM_END: u32 = 2;

/// Value of the constant hidden feature (see the module comment).
const CONST: f32 = 4.0;
/// Head weight of the control tokens on the constant feature.
const CONTROL_PUSH: f32 = -20.0;

/// Plain ChatML, as SmolLM2 and Qwen2 use it (without their default system prompts).
pub(crate) const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

pub(crate) fn vocab() -> Vec<String> {
    let mut v: Vec<String> =
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "\u{120}", "\u{10a}"].into_iter().map(str::to_owned).collect();
    v.extend((b'!'..=b'~').map(|b| (b as char).to_string()));
    v.extend(["he", "\u{120}t"].map(str::to_owned));
    v
}

/// The tiny model's GGUF, ready to build or to adjust (`kv` replaces keys) before building.
/// EOS is `<|im_end|>`; there is no BOS and no chat template until a test adds them.
pub(crate) fn writer(seed: u64) -> GgufWriter {
    let vocab = vocab();
    let n_vocab = vocab.len();
    let mut types = vec![MetaValue::I32(1); n_vocab];
    types[..3].fill(MetaValue::I32(3));
    let strs = |v: Vec<String>| MetaValue::Array(v.into_iter().map(MetaValue::String).collect());

    let mut w = GgufWriter::new();
    let u32v = |v: usize| MetaValue::U32(v as u32);
    w.kv("general.architecture", MetaValue::String("llama".into()))
        .kv("llama.context_length", u32v(CONTEXT))
        .kv("llama.embedding_length", u32v(HIDDEN))
        .kv("llama.block_count", u32v(LAYERS))
        .kv("llama.feed_forward_length", u32v(FFN))
        .kv("llama.attention.head_count", u32v(HEADS))
        .kv("llama.attention.head_count_kv", u32v(KV_HEADS))
        .kv("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-5))
        .kv("llama.rope.freq_base", MetaValue::F32(10000.0))
        .kv("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
        .kv("tokenizer.ggml.pre", MetaValue::String("gpt2".into()))
        .kv("tokenizer.ggml.tokens", strs(vocab))
        .kv("tokenizer.ggml.token_type", MetaValue::Array(types))
        .kv("tokenizer.ggml.merges", strs(vec!["h e".into(), "\u{120} t".into()]))
        .kv("tokenizer.ggml.eos_token_id", u32v(IM_END as usize));

    let mut rng = Lcg(seed.wrapping_mul(2).wrapping_add(1));
    // Weights with standard deviation `scale`, row-major [rows, cols] (GGUF dims are [cols, rows]).
    let mut matrix =
        |rows: usize, cols: usize, scale: f32| -> Vec<f32> { (0..rows * cols).map(|_| rng.normal() * scale).collect() };
    let dims = |rows: usize, cols: usize| [cols as u64, rows as u64];
    let head_dim = HIDDEN / HEADS;
    let (q_rows, kv_rows) = (HEADS * head_dim, KV_HEADS * head_dim);
    let in_scale = |n: usize| 1.0 / (n as f32).sqrt();

    let mut embed = matrix(n_vocab, HIDDEN, 1.0);
    embed.chunks_mut(HIDDEN).for_each(|row| row[0] = CONST);
    w.tensor_f32("token_embd.weight", &dims(n_vocab, HIDDEN), &embed);
    let mut head = matrix(n_vocab, HIDDEN, 0.3);
    for id in [ENDOFTEXT, IM_START, IM_END] {
        head[id as usize * HIDDEN] = CONTROL_PUSH;
    }
    w.tensor_f32("output.weight", &dims(n_vocab, HIDDEN), &head);
    w.tensor_f32("output_norm.weight", &[HIDDEN as u64], &vec![1.0; HIDDEN]);
    for l in 0..LAYERS {
        let p = |s: &str| format!("blk.{l}.{s}");
        w.tensor_f32(&p("attn_norm.weight"), &[HIDDEN as u64], &vec![1.0; HIDDEN]);
        w.tensor_f32(&p("ffn_norm.weight"), &[HIDDEN as u64], &vec![1.0; HIDDEN]);
        w.tensor_f32(&p("attn_q.weight"), &dims(q_rows, HIDDEN), &matrix(q_rows, HIDDEN, in_scale(HIDDEN)));
        w.tensor_f32(&p("attn_k.weight"), &dims(kv_rows, HIDDEN), &matrix(kv_rows, HIDDEN, in_scale(HIDDEN)));
        w.tensor_f32(&p("attn_v.weight"), &dims(kv_rows, HIDDEN), &matrix(kv_rows, HIDDEN, in_scale(HIDDEN)));
        let mut o = matrix(HIDDEN, q_rows, in_scale(q_rows));
        o[..q_rows].fill(0.0);
        w.tensor_f32(&p("attn_output.weight"), &dims(HIDDEN, q_rows), &o);
        w.tensor_f32(&p("ffn_gate.weight"), &dims(FFN, HIDDEN), &matrix(FFN, HIDDEN, in_scale(HIDDEN)));
        w.tensor_f32(&p("ffn_up.weight"), &dims(FFN, HIDDEN), &matrix(FFN, HIDDEN, in_scale(HIDDEN)));
        let mut down = matrix(HIDDEN, FFN, in_scale(FFN));
        down[..FFN].fill(0.0);
        w.tensor_f32(&p("ffn_down.weight"), &dims(HIDDEN, FFN), &down);
    }
    w
}

pub(crate) fn gguf(seed: u64) -> GgufFile {
    writer(seed).build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::model::kv_cache::ContiguousKvCache;
    use crate::model::llama::Llama;
    use crate::model::tokenizer::Tokenizer;

    #[test]
    fn tiny_model_loads_and_keeps_control_tokens_unlikely() {
        let file = gguf(1);
        let tok = Tokenizer::from_gguf(&file).unwrap();
        assert_eq!(tok.vocab_size(), vocab().len());
        assert_eq!(tok.encode("the", false).unwrap().len(), 2, "Ġt/he merges apply: 'the' → t, he");
        assert_eq!(tok.eos_ids(), [IM_END, ENDOFTEXT]);
        let be = CpuBackend::new(1);
        let model = Llama::from_gguf(&file, &be).unwrap();
        let mut cache = ContiguousKvCache::new(&be, LAYERS, model.layout().kv_cols(), 16).unwrap();
        let ids = tok.encode("hello world", false).unwrap();
        let logits = model.forward(&be, &ids, &mut cache, true).unwrap();
        for row in logits.chunks(vocab().len()) {
            let best_control = row[..3].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let best_other = row[3..].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert!(best_control < best_other - 20.0, "{best_control} vs {best_other}");
            // The rest of the distribution is not degenerate: several tokens are in play.
            let close = row[3..].iter().filter(|&&l| l > best_other - 3.0).count();
            assert!(close >= 3, "only {close} tokens within 3 of the max");
        }
    }
}
