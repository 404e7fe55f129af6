//! Random inputs for the CPU backend's tests.

use half::{bf16, f16};

use crate::backend::GgmlType;

/// A small deterministic generator (tests must be reproducible, and a crate is overkill here).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next_u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        // `next_u32` has 31 random bits: scale [0, 2^31) to [0, 2), then shift.
        self.next_u32() as f32 / (1u64 << 30) as f32 - 1.0
    }
    /// Roughly normal (sum of uniforms), mean 0, sd ≈ 1.
    pub fn normal(&mut self) -> f32 {
        (0..6).map(|_| self.uniform()).sum::<f32>() * 0.7
    }
}

/// Random but valid bytes for `n` elements of `dtype`: quant bits random, scale fields small
/// finite f16 values (random bits there would be NaN/inf now and then).
pub fn random_blocks(dtype: GgmlType, n: usize, rng: &mut Lcg) -> Vec<u8> {
    let bytes = dtype.row_bytes(n).expect("whole blocks");
    let mut out: Vec<u8> = (0..bytes).map(|_| rng.next_u32() as u8).collect();
    let put_f16 =
        |out: &mut Vec<u8>, at: usize, v: f32| out[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
    match dtype {
        GgmlType::F32 => {
            for c in out.chunks_exact_mut(4) {
                c.copy_from_slice(&rng.normal().to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for c in out.chunks_exact_mut(2) {
                c.copy_from_slice(&f16::from_f32(rng.normal()).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for c in out.chunks_exact_mut(2) {
                c.copy_from_slice(&bf16::from_f32(rng.normal()).to_le_bytes());
            }
        }
        _ => {
            let bb = dtype.block_bytes();
            for b in 0..bytes / bb {
                let at = b * bb;
                match dtype {
                    GgmlType::Q6K => put_f16(&mut out, at + 208, rng.uniform() * 0.01),
                    GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => {
                        put_f16(&mut out, at, rng.uniform() * 0.05);
                        put_f16(&mut out, at + 2, rng.uniform() * 0.05);
                    }
                    _ => put_f16(&mut out, at, rng.uniform() * 0.05),
                }
            }
        }
    }
    out
}

#[test]
fn normal_has_mean_0_and_sd_1() {
    let mut rng = Lcg(3);
    let v: Vec<f32> = (0..20_000).map(|_| rng.normal()).collect();
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt();
    assert!(mean.abs() < 0.05 && (sd - 1.0).abs() < 0.05, "mean {mean}, sd {sd}");
}
