//! Qwen2-VL image preprocessing against Hugging Face transformers.
//!
//! tests/fixtures/vision/make_goldens.py ran transformers 4.46.3's slow `Qwen2VLImageProcessor`
//! (Pillow 11.0.0, numpy 2.4) on the images in tests/fixtures/vision/images and stored, per
//! image and config: grid_thw, the shape, every row's sum, the full-array sum and abs-sum, and
//! some rows in full. Here `zoe_llm::vision::preprocess` runs on the same bytes.
//!
//! Every format decodes to Pillow's bytes (PNG and WebP through the `image` crate, JPEG through
//! libjpeg-turbo, the library inside Pillow) and everything after decoding is exact, so every
//! case must agree to float rounding: stored rows within 1e-3 (measured: 0 on all 16,
//! bit-identical), row sums within 1e-6 (measured ≤ 2.3e-13, f64 summation order; one uint8
//! level anywhere in a row moves its sum by ≥ 0.029). The JPEGs cover 4:2:0, 4:2:2, 4:4:4,
//! grayscale, progressive, restart markers, odd sizes, Adobe CMYK and EXIF orientation.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use zoe_llm::vision::{preprocess, PreprocessConfig};

#[derive(Deserialize)]
struct Goldens {
    transformers: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    file: String,
    sha256: String,
    min_pixels: usize,
    max_pixels: usize,
    grid_thw: [usize; 3],
    shape: [usize; 2],
    sum: f64,
    abs_sum: f64,
    row_sums: Vec<f64>,
    rows_file: String,
    rows: Vec<usize>,
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vision")
}

/// Largest |ours − theirs| over the stored rows, the largest row-sum difference, and the mean
/// |difference| over the stored rows.
struct Diff {
    max_value: f32,
    mean_value: f64,
    max_row_sum: f64,
    sum: f64,
    abs_sum: f64,
}

fn compare(case: &Case, ours: &[f32]) -> Diff {
    let width = case.shape[1];
    let stored = std::fs::read(dir().join(&case.rows_file)).unwrap();
    let stored: Vec<f32> = stored.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(stored.len(), case.rows.len() * width, "{}", case.rows_file);
    let (mut max_value, mut total) = (0f32, 0f64);
    for (k, &r) in case.rows.iter().enumerate() {
        let theirs = &stored[k * width..(k + 1) * width];
        let mine = &ours[r * width..(r + 1) * width];
        for (a, b) in mine.iter().zip(theirs) {
            max_value = max_value.max((a - b).abs());
            total += f64::from((a - b).abs());
        }
    }
    let mut max_row_sum = 0f64;
    for (row, &want) in ours.chunks_exact(width).zip(&case.row_sums) {
        let got: f64 = row.iter().map(|&v| f64::from(v)).sum();
        max_row_sum = max_row_sum.max((got - want).abs());
    }
    let sum: f64 = ours.iter().map(|&v| f64::from(v)).sum();
    let abs_sum: f64 = ours.iter().map(|&v| f64::from(v).abs()).sum();
    Diff {
        max_value,
        mean_value: total / (case.rows.len() * width) as f64,
        max_row_sum,
        sum: (sum - case.sum).abs(),
        abs_sum: (abs_sum - case.abs_sum).abs(),
    }
}

#[test]
fn pixel_values_match_transformers() {
    let goldens: Goldens = serde_json::from_slice(&std::fs::read(dir().join("goldens.json")).unwrap()).unwrap();
    assert_eq!(goldens.transformers, "4.46.3");
    assert!(goldens.cases.len() >= 16);
    let mut failures = Vec::new();
    for case in &goldens.cases {
        let bytes = std::fs::read(dir().join(&case.file)).unwrap();
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, case.sha256, "{}: not the file the goldens were made from", case.file);

        let cfg = PreprocessConfig { min_pixels: case.min_pixels, max_pixels: case.max_pixels, ..Default::default() };
        let img = preprocess(&bytes, &cfg).unwrap_or_else(|e| panic!("{}: {e}", case.file));
        let label = format!("{} (max_pixels {}, min_pixels {})", case.file, case.max_pixels, case.min_pixels);
        assert_eq!(img.grid_thw, case.grid_thw, "{label}");
        assert_eq!([img.rows(), img.row_len()], case.shape, "{label}");
        assert_eq!(img.pixel_values.len(), case.shape[0] * case.shape[1]);
        assert_eq!(img.hash, hash);
        assert_eq!(img.llm_tokens(), case.shape[0] / 4);

        let d = compare(case, &img.pixel_values);
        eprintln!(
            "{label}: max |diff| {:.3e}, mean |diff| {:.3e} (stored rows); max row-sum diff {:.3e}; sum diff {:.3e}, abs-sum diff {:.3e}",
            d.max_value, d.mean_value, d.max_row_sum, d.sum, d.abs_sum
        );
        let ok = d.max_value <= 1e-3 && d.max_row_sum <= 1e-6 && d.abs_sum <= 1e-6 * case.shape[0] as f64;
        if !ok {
            failures.push(label);
        }
    }
    assert!(failures.is_empty(), "outside the bounds: {failures:?}");
}
