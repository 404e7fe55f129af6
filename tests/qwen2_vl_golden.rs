//! A tiny random Qwen2-VL checkpoint written by Hugging Face transformers (`save_pretrained`:
//! config.json and fp16 model.safetensors, `visual.*` tower of the real shape at small widths)
//! gives transformers' vision-tower outputs and M-RoPE positions. The checkpoint and the
//! references are committed (tests/fixtures/qwen2_vl_tiny/, made once by make_fixture.py
//! there); no Python at test time.
//!
//! goldens.json also holds what a decoder test needs (the prompt's ids, positions and rope
//! delta, the embeddings after the image rows are scattered in, the prefill's last logits and
//! one decode step's logits); this file checks the vision half and the consistency of the
//! embeddings.

use std::path::PathBuf;

use serde_json::Value;
use zoe_llm::backend::cpu::CpuBackend;
use zoe_llm::model::vision::{mrope_positions, VisionConfig, VisionTokenIds, VisionTower};
use zoe_llm::model::weights::safetensors::SafetensorsDir;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_vl_tiny")
}

fn goldens() -> Value {
    serde_json::from_str(include_str!("fixtures/qwen2_vl_tiny/goldens.json")).unwrap()
}

fn config() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("config.json")).unwrap()).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Element `i` of the test images' `pixel_values` (all images' rows concatenated), the same
/// integer hash as `pixel_value` in make_fixture.py: a multiple of 1/128 in [-4, 4], so both
/// sides hold bit-identical f32 inputs (checked against the values the script recorded).
fn pixel_value(seed: u32, i: u32) -> f32 {
    let mut x = i.wrapping_add(seed.wrapping_mul(1_000_003));
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    let s = (x & 0xff) + ((x >> 8) & 0xff) + ((x >> 16) & 0xff) + (x >> 24);
    (s as f32 - 510.0) / 128.0
}

fn pixel_values(g: &Value) -> Vec<f32> {
    let p = &g["pixel_values"];
    let n = p["rows"].as_u64().unwrap() * p["cols"].as_u64().unwrap();
    let v: Vec<f32> = (0..n as u32).map(|i| pixel_value(p["seed"].as_u64().unwrap() as u32, i)).collect();
    assert_eq!(&v[..8], &f32s(&p["first"])[..], "pixel values differ from the script's");
    let sum: f64 = v.iter().map(|&x| x as f64).sum();
    assert_eq!(sum, p["sum"].as_f64().unwrap(), "pixel values differ from the script's");
    v
}

fn grids(g: &Value) -> Vec<[usize; 3]> {
    g["vision"].as_array().unwrap().iter().map(|v| usizes(&v["grid_thw"]).try_into().unwrap()).collect()
}

fn load() -> VisionTower<CpuBackend> {
    let cfg = VisionConfig::from_hf_json(&config()).unwrap();
    assert_eq!((cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.mlp_hidden, cfg.out_hidden), (2, 32, 2, 128, 64));
    assert_eq!((cfg.patch_cols(), cfg.spatial_merge_size), (1176, 2));
    let st = SafetensorsDir::open(&fixture_dir()).unwrap();
    VisionTower::from_safetensors(CpuBackend::new(2), &st, cfg).unwrap()
}

/// The reference is transformers' tower in f32 on the stored fp16 weights (what we compute), so
/// only summation order and libm-level differences in exp/sin/cos/erf separate the two. Measured
/// max |Δ| (outputs of magnitude ≤ 2.7, rms 0.8): 1.7e-6 for the 4×6 image and 1.0e-6 for the
/// 2×2 image, run together or alone, and 1.7e-6 for the scattered embeddings. The bound, 1e-4,
/// is ~60× that and far below what a real defect does (measured in transformers on this
/// checkpoint by make_fixture.py, recorded in goldens.json): rope positions in raster instead of
/// 2×2-block order move the output by 0.78, h and w swapped in the rope by 0.86, attention
/// across the two images by 1.1, LayerNorm without its bias by 0.70, exact GELU instead of
/// QuickGELU in the blocks by 1.1e-2; even the merger's tanh-approximate GELU instead of erf
/// (4.4e-4) fails the bound (checked by making that change here).
const TOL: f32 = 1e-4;

#[test]
fn vision_tower_matches_transformers() {
    let g = goldens();
    let tower = load();
    let pv = pixel_values(&g);
    let grids = grids(&g);
    let hidden = tower.config.out_hidden;
    let want: Vec<Vec<f32>> = g["vision"].as_array().unwrap().iter().map(|v| f32s(&v["output"])).collect();

    // Both images in one call: attention stays within each image.
    let both = tower.forward(&pv, &grids);
    let rows: Vec<usize> = grids.iter().map(|[t, h, w]| t * h * w / 4).collect();
    assert_eq!(rows, vec![6, 1]);
    assert_eq!(both.len(), rows.iter().sum::<usize>() * hidden);
    let mut at = 0;
    for (i, (r, w)) in rows.iter().zip(&want).enumerate() {
        let d = max_abs_diff(&both[at..at + r * hidden], w);
        eprintln!("image {i} {:?} (in one call with the other): max |Δ| {d:.2e}", grids[i]);
        assert!(d <= TOL, "image {i}: tower output differs from transformers by {d}");
        at += r * hidden;
    }

    // Each image alone.
    let mut px = 0;
    for (i, (grid, w)) in grids.iter().zip(&want).enumerate() {
        let n = grid.iter().product::<usize>() * tower.config.patch_cols();
        let alone = tower.forward(&pv[px..px + n], &[*grid]);
        let d = max_abs_diff(&alone, w);
        eprintln!("image {i} {grid:?} alone: max |Δ| {d:.2e}");
        assert!(d <= TOL, "image {i} alone: tower output differs from transformers by {d}");
        px += n;
    }
}

#[test]
fn tower_rejects_pixel_values_that_do_not_fit_the_grids() {
    let tower = load();
    assert!(tower.check_input(24 * 1176, &[[1, 4, 6]]).is_ok());
    assert!(tower.check_input(24 * 1176 - 1, &[[1, 4, 6]]).is_err());
    assert!(tower.check_input(3 * 4 * 1176, &[[1, 3, 4]]).is_err(), "h must be a multiple of the merge size");
    assert!(tower.check_input(0, &[]).is_err());
}

#[test]
fn mrope_positions_match_get_rope_index() {
    let g = goldens();
    let p = &g["prompt"];
    let cfg = config();
    let tok = VisionTokenIds::from_hf_json(&cfg).unwrap();
    assert_eq!(tok.image_pad as u64, p["image_token_id"].as_u64().unwrap());
    assert_eq!(tok.vision_start as u64, p["vision_start_token_id"].as_u64().unwrap());
    assert_eq!(tok.vision_end as u64, p["vision_end_token_id"].as_u64().unwrap());
    let ids: Vec<u32> = usizes(&p["ids"]).into_iter().map(|x| x as u32).collect();
    let grids: Vec<[usize; 3]> =
        p["grids_thw"].as_array().unwrap().iter().map(|v| usizes(v).try_into().unwrap()).collect();
    let merge = VisionConfig::from_hf_json(&cfg).unwrap().spatial_merge_size;

    let (pos, delta) = mrope_positions(&ids, &grids, tok.image_pad, tok.vision_start, merge).unwrap();
    let want: Vec<[u32; 3]> = p["positions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let v = usizes(r);
            [v[0] as u32, v[1] as u32, v[2] as u32]
        })
        .collect();
    assert_eq!(pos, want);
    assert_eq!(delta, p["rope_delta"].as_i64().unwrap());
    assert!(delta < 0, "images take fewer positions than tokens");
    // The decode step after the prompt: sequence index len at position len + delta.
    assert_eq!(ids.len() as i64 + delta, p["decode"]["position"].as_i64().unwrap());
}

/// The goldens' `inputs_embeds` (what transformers' decoder consumed) are the token embeddings
/// with our tower's rows in place of the image pads, in order: the scatter the decoder test will
/// do, checked here so the goldens and the tower agree on it.
#[test]
fn image_rows_replace_the_pad_embeddings_in_order() {
    let g = goldens();
    let p = &g["prompt"];
    let tower = load();
    let hidden = tower.config.out_hidden;
    let image = tower.forward(&pixel_values(&g), &grids(&g));

    let st = SafetensorsDir::open(&fixture_dir()).unwrap();
    let t = st.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!((t.shape[1], t.dtype), (hidden, safetensors::Dtype::F16));
    let table: Vec<f32> = st.data(t).chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();

    let pad = p["image_token_id"].as_u64().unwrap() as u32;
    let ids: Vec<u32> = usizes(&p["ids"]).into_iter().map(|x| x as u32).collect();
    let mut ours = Vec::with_capacity(ids.len() * hidden);
    let mut next_image_row = 0;
    for &id in &ids {
        if id == pad {
            ours.extend_from_slice(&image[next_image_row * hidden..][..hidden]);
            next_image_row += 1;
        } else {
            ours.extend_from_slice(&table[id as usize * hidden..][..hidden]);
        }
    }
    assert_eq!(next_image_row * hidden, image.len(), "one pad per image row");
    let d = max_abs_diff(&ours, &f32s(&p["inputs_embeds"]));
    eprintln!("inputs_embeds: max |Δ| {d:.2e}");
    assert!(d <= TOL, "embeddings after the scatter differ by {d}");
}

/// The whole model: the decoder (Qwen2 with M-RoPE, read from the same config.json) on the
/// prompt with our tower's rows in place of the pads gives transformers' last logits, and one
/// decode step at `index + rope_delta` gives its next logits — through the contiguous cache
/// (`forward_mm`) and through the batching engine's paged path (`forward_batch_mm`, the prompt
/// in two chunks).
#[test]
fn decoder_with_images_matches_transformers() {
    use zoe_llm::backend::cpu::{CpuBackend, Precision};
    use zoe_llm::model::config::{ModelConfig, RopeScaling};
    use zoe_llm::model::kv_cache::ContiguousKvCache;
    use zoe_llm::model::llama::{Llama, MmInput, MmPrompt};
    use zoe_llm::model::paged_kv::PagedKvCache;

    let g = goldens();
    let p = &g["prompt"];
    let tower = load();
    let image = tower.forward(&pixel_values(&g), &grids(&g));
    let (cfg, _) = ModelConfig::from_hf_json(&config()).unwrap();
    assert_eq!(cfg.rope_scaling, RopeScaling::MRope { section: [2, 3, 3] });
    let st = SafetensorsDir::open(&fixture_dir()).unwrap();
    let be = CpuBackend::with_precision(1, Precision::F32);
    let model = Llama::from_safetensors(&st, cfg.clone(), None, &be).unwrap();

    let ids: Vec<u32> = usizes(&p["ids"]).into_iter().map(|x| x as u32).collect();
    let pad = p["image_token_id"].as_u64().unwrap() as u32;
    let positions: Vec<[u32; 3]> = p["positions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let v = usizes(r);
            [v[0] as u32, v[1] as u32, v[2] as u32]
        })
        .collect();
    let delta = p["rope_delta"].as_i64().unwrap();
    let rows: Vec<usize> = ids.iter().enumerate().filter(|(_, &t)| t == pad).map(|(i, _)| i).collect();
    let want_prefill = f32s(&p["last_logits"]);
    let d = &p["decode"];
    let (next, want_decode) = (d["token"].as_u64().unwrap() as u32, f32s(&d["logits"]));

    let mut cache = ContiguousKvCache::new(&be, cfg.n_layers, model.layout().kv_cols(), 64).unwrap();
    let mm = MmInput { positions: Some(&positions), rope_delta: delta, embed_rows: &rows, embeds: &image };
    let got = model.forward_mm(&be, &ids, &mm, &mut cache, false).unwrap();
    let dp = max_abs_diff(&got, &want_prefill);
    let decode = MmInput { rope_delta: delta, ..MmInput::default() };
    let got = model.forward_mm(&be, &[next], &decode, &mut cache, false).unwrap();
    let dd = max_abs_diff(&got, &want_decode);
    eprintln!("decoder: prefill max |Δ| {dp:.2e}, decode step {dd:.2e}");
    // Logits reach about 4; the smallest mistake the fixture's script measured (h and w swapped)
    // moves them by 0.34. f32 with the same fp16 weights agrees to about 1e-6.
    assert!(dp <= 1e-4 && dd <= 1e-4, "prefill {dp}, decode {dd}");

    let prompt = MmPrompt { positions, rope_delta: delta, embed_rows: rows, embeds: image, key_ids: ids.clone() };
    let mut paged = PagedKvCache::new(&be, cfg.n_layers, model.layout().kv_cols(), 64, 4).unwrap();
    let (mut seq, cached) = paged.start(&ids, 64);
    assert_eq!(cached, 0);
    model.forward_batch_mm(&be, &mut paged, &mut [(&ids[..9], &mut seq)], &[Some(&prompt)]).unwrap();
    let got = model.forward_batch_mm(&be, &mut paged, &mut [(&ids[9..], &mut seq)], &[Some(&prompt)]).unwrap();
    assert!(max_abs_diff(&got[0], &want_prefill) <= 1e-4);
    let got = model.forward_batch_mm(&be, &mut paged, &mut [(&[next][..], &mut seq)], &[Some(&prompt)]).unwrap();
    assert!(max_abs_diff(&got[0], &want_decode) <= 1e-4);
}

/// The checkpoint's vision part loads with its language model's width and is refused with any
/// other (its rows would not fit the decoder's embeddings).
#[test]
fn vision_loads_only_for_the_matching_language_model_width() {
    let st = SafetensorsDir::open(&fixture_dir()).unwrap();
    let v =
        zoe_llm::vision::Vision::load(&fixture_dir(), &config(), &st, 64, || Ok(CpuBackend::new(2))).unwrap().unwrap();
    assert_eq!(v.tokens.image_pad, goldens()["prompt"]["image_token_id"].as_u64().unwrap() as u32);
    let e = zoe_llm::vision::Vision::load(&fixture_dir(), &config(), &st, 96, || Ok(CpuBackend::new(2))).unwrap_err();
    assert!(e.contains("vision_config.hidden_size 64") && e.contains("96"), "{e}");
}
