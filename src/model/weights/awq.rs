//! AutoAWQ "GEMM" 4-bit weights: the checkpoint packing, the one layout every backend starts from,
//! and the exact dequantization the CPU oracle and the CUDA kernels share.
//!
//! Checkpoint tensors of one `nn.Linear` with `K` inputs, `N` outputs and group size `G`
//! (model-formats.md §1, AutoAWQ `WQLinear_GEMM`):
//! - `qweight` I32 `[K, N/8]`: 8 output columns per word, **interleaved**: logical column `8c + j`
//!   sits in nibble `REV[j]` (packing order `[0,2,4,6,1,3,5,7]`);
//! - `qzeros` I32 `[K/G, N/8]`, packed the same way; zeros are raw (no GPTQ "−1");
//! - `scales` F16 `[K/G, N]`.
//!
//! `w[n][k] = f16((q − z) · s)`: `q − z` is a small integer, so the product in f32 is exact and the
//! single rounding to f16 reproduces torch's `dequantize_gemm` bit for bit.
//!
//! [`AwqMatrix`] holds the same numbers per output row (`[N, …]`, inputs contiguous, natural
//! nibble order): rows concatenate along N (fused q|k|v, gate|up), a row dequantizes on its own
//! (the CPU oracle), and it is the layout the CUDA GEMV reads (`kernels/awq.cu`).

use half::f16;
use rayon::prelude::*;

/// `REV[j]` is the nibble of a packed word that holds logical column `j` (AutoAWQ
/// `reverse_awq_order`). Its inverse is the packing order `[0,2,4,6,1,3,5,7]`.
pub const REV: [u32; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// The quantization settings of an AWQ checkpoint (`quantization_config` in config.json, or the
/// older `quant_config.json` spellings).
#[derive(Clone, Debug, PartialEq)]
pub struct AwqConfig {
    pub bits: u32,
    pub group_size: usize,
    pub zero_point: bool,
    /// Module-name substrings that stay fp16 (Qwen2-VL: `["visual"]`).
    pub modules_to_not_convert: Vec<String>,
}

impl AwqConfig {
    /// Reads and checks a `quantization_config` object. Only what the loader and kernels handle is
    /// accepted: 4 bits, the GEMM layout, zero points, a group size that divides into 8-wide words.
    pub fn from_json(q: &serde_json::Value) -> Result<Self, String> {
        let get = |names: &[&str]| names.iter().find_map(|n| q.get(*n));
        let method = get(&["quant_method"]).and_then(|v| v.as_str()).unwrap_or("awq");
        if !method.eq_ignore_ascii_case("awq") {
            return Err(format!("quant_method '{method}' is not supported (supported: awq)"));
        }
        let bits = get(&["bits", "w_bit"]).and_then(|v| v.as_u64()).unwrap_or(4);
        if bits != 4 {
            return Err(format!("AWQ with {bits} bits is not supported (supported: 4)"));
        }
        let version = get(&["version"]).and_then(|v| v.as_str()).unwrap_or("gemm");
        if !version.eq_ignore_ascii_case("gemm") {
            return Err(format!("AWQ version '{version}' is not supported (supported: gemm)"));
        }
        let zero_point = get(&["zero_point"]).and_then(|v| v.as_bool()).unwrap_or(true);
        if !zero_point {
            return Err("AWQ without zero points is not supported".into());
        }
        let group = get(&["group_size", "q_group_size"]).and_then(|v| v.as_i64()).unwrap_or(128);
        if group <= 0 || group % 8 != 0 || group > 1 << 16 {
            return Err(format!(
                "AWQ group_size {group} is not supported (a positive multiple of 8; per-channel -1 is not)"
            ));
        }
        let modules_to_not_convert = get(&["modules_to_not_convert"])
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
            .unwrap_or_default();
        Ok(Self { bits: bits as u32, group_size: group as usize, zero_point, modules_to_not_convert })
    }
}

/// One AWQ-quantized matrix, per output row: `n` rows of `k` 4-bit values.
#[derive(Clone, Debug, PartialEq)]
pub struct AwqMatrix {
    /// Output features (rows).
    pub n: usize,
    /// Input features.
    pub k: usize,
    pub group: usize,
    /// `[n, k/8]`: word `j` of row `r` holds inputs `8j..8j+8`, input `8j+i` in bits `4i..4i+4`.
    pub qw: Vec<u32>,
    /// `[n, k/group]` zero points, 0..=15.
    pub zeros: Vec<u8>,
    /// `[n, k/group]`.
    pub scales: Vec<f16>,
}

fn words(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl AwqMatrix {
    /// Checks that `k` inputs and `n` outputs can hold groups of `group` and 8-wide words.
    pub fn check_shape(n: usize, k: usize, group: usize) -> Result<(), String> {
        if n == 0 || k == 0 || !n.is_multiple_of(8) || !k.is_multiple_of(group) || !group.is_multiple_of(8) {
            return Err(format!(
                "AWQ needs N % 8 == 0, K % group == 0 and group % 8 == 0: N={n}, K={k}, group={group}"
            ));
        }
        Ok(())
    }

    /// Unpacks the checkpoint tensors (little-endian bytes as stored in safetensors).
    pub fn from_gemm(
        qweight: &[u8],
        qzeros: &[u8],
        scales: &[u8],
        k: usize,
        n: usize,
        group: usize,
    ) -> Result<Self, String> {
        Self::check_shape(n, k, group)?;
        let (nw, ng) = (n / 8, k / group);
        for (what, got, want) in [
            ("qweight", qweight.len(), k * nw * 4),
            ("qzeros", qzeros.len(), ng * nw * 4),
            ("scales", scales.len(), ng * n * 2),
        ] {
            if got != want {
                return Err(format!("{what} has {got} bytes, expected {want} for K={k}, N={n}, group={group}"));
            }
        }
        let src: Vec<u32> = words(qweight).collect();
        let kw = k / 8;
        let mut qw = vec![0u32; n * kw];
        // Output rows 8c..8c+8 come from column word c of the checkpoint: a block of 8 rows per
        // task, each output word gathering one nibble from 8 consecutive input rows.
        qw.par_chunks_mut(8 * kw).enumerate().for_each(|(c, rows)| {
            for kb in 0..kw {
                let col: [u32; 8] = std::array::from_fn(|i| src[(kb * 8 + i) * nw + c]);
                for (j, &shift) in REV.iter().enumerate() {
                    let mut w = 0u32;
                    for (i, v) in col.iter().enumerate() {
                        w |= ((v >> (4 * shift)) & 0xF) << (4 * i);
                    }
                    rows[j * kw + kb] = w;
                }
            }
        });
        let zsrc: Vec<u32> = words(qzeros).collect();
        let ssrc: Vec<f16> = scales.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect();
        let mut zeros = vec![0u8; n * ng];
        let mut sc = vec![f16::ZERO; n * ng];
        for g in 0..ng {
            for r in 0..n {
                zeros[r * ng + g] = ((zsrc[g * nw + r / 8] >> (4 * REV[r % 8])) & 0xF) as u8;
                sc[r * ng + g] = ssrc[g * n + r];
            }
        }
        Ok(Self { n, k, group, qw, zeros, scales: sc })
    }

    /// Packs back into the checkpoint tensors `(qweight, qzeros, scales)` as little-endian bytes
    /// (synthetic checkpoints; the inverse of [`Self::from_gemm`]).
    pub fn to_gemm(&self) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let (nw, ng) = (self.n / 8, self.k / self.group);
        let pack =
            |get: &dyn Fn(usize) -> u32| -> u32 { (0..8).fold(0u32, |w, j| w | ((get(j) & 0xF) << (4 * REV[j]))) };
        let mut qweight = Vec::with_capacity(self.k * nw * 4);
        for k in 0..self.k {
            for c in 0..nw {
                qweight.extend_from_slice(&pack(&|j| self.q(8 * c + j, k) as u32).to_le_bytes());
            }
        }
        let mut qzeros = Vec::with_capacity(ng * nw * 4);
        let mut scales = Vec::with_capacity(ng * self.n * 2);
        for g in 0..ng {
            for c in 0..nw {
                qzeros.extend_from_slice(&pack(&|j| self.zeros[(8 * c + j) * ng + g] as u32).to_le_bytes());
            }
            for r in 0..self.n {
                scales.extend_from_slice(&self.scales[r * ng + g].to_le_bytes());
            }
        }
        (qweight, qzeros, scales)
    }

    pub fn groups(&self) -> usize {
        self.k / self.group
    }

    /// The 4-bit value of row `r`, input `k`.
    pub fn q(&self, r: usize, k: usize) -> u8 {
        ((self.qw[r * (self.k / 8) + k / 8] >> (4 * (k % 8))) & 0xF) as u8
    }

    /// Row `r` dequantized: `f16((q − z) · s)` as f32.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.k);
        let (kw, ng, gw) = (self.k / 8, self.groups(), self.group / 8);
        let row = &self.qw[r * kw..(r + 1) * kw];
        for g in 0..ng {
            let z = self.zeros[r * ng + g] as f32;
            let s = self.scales[r * ng + g].to_f32();
            for (j, &w) in row[g * gw..(g + 1) * gw].iter().enumerate() {
                let o = &mut out[(g * gw + j) * 8..][..8];
                for (i, o) in o.iter_mut().enumerate() {
                    let q = ((w >> (4 * i)) & 0xF) as f32;
                    *o = f16::from_f32((q - z) * s).to_f32();
                }
            }
        }
    }

    /// Appends `other`'s rows (same inputs and group) along the output dimension (q|k|v, gate|up).
    pub fn append(&mut self, other: AwqMatrix) -> Result<(), String> {
        if (other.k, other.group) != (self.k, self.group) {
            return Err(format!(
                "cannot fuse AWQ matrices with K={}, group={} and K={}, group={}",
                self.k, self.group, other.k, other.group
            ));
        }
        self.n += other.n;
        self.qw.extend(other.qw);
        self.zeros.extend(other.zeros);
        self.scales.extend(other.scales);
        Ok(())
    }

    /// AutoAWQ's min-max quantizer on a row-major `[n, k]` matrix: per (row, group)
    /// `scale = max((max − min) / 15, 1e-5)`, `zero = clamp(−round(min / scale), 0, 15)`,
    /// `q = clamp(round(w / scale) + zero, 0, 15)` (no activation-aware search: tests re-quantize
    /// real layers with it).
    pub fn quantize(w: &[f32], n: usize, k: usize, group: usize) -> Result<Self, String> {
        Self::check_shape(n, k, group)?;
        assert_eq!(w.len(), n * k);
        let ng = k / group;
        let mut m =
            Self { n, k, group, qw: vec![0; n * k / 8], zeros: vec![0; n * ng], scales: vec![f16::ZERO; n * ng] };
        for r in 0..n {
            for g in 0..ng {
                let vals = &w[r * k + g * group..][..group];
                let (lo, hi) = vals.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
                let s = f16::from_f32(((hi - lo) / 15.0).max(1e-5));
                let sf = s.to_f32();
                let z = (-(lo / sf).round()).clamp(0.0, 15.0);
                m.scales[r * ng + g] = s;
                m.zeros[r * ng + g] = z as u8;
                for (i, &v) in vals.iter().enumerate() {
                    let q = ((v / sf).round() + z).clamp(0.0, 15.0) as u32;
                    let kk = g * group + i;
                    m.qw[r * (k / 8) + kk / 8] |= q << (4 * (kk % 8));
                }
            }
        }
        Ok(m)
    }

    /// The same rows as GGUF Q4_1 blocks of 32 (`w = d·q + m`: d = s, m = f16(−z·s); element j of
    /// a block in the low nibble of byte j, element j+16 in the high nibble). Needs
    /// `group % 32 == 0`.
    pub fn to_q4_1(&self) -> Vec<u8> {
        assert!(self.group.is_multiple_of(32), "Q4_1 blocks need group % 32 == 0");
        let (kw, ng) = (self.k / 8, self.groups());
        let mut out = Vec::with_capacity(self.n * self.k / 32 * 20);
        for r in 0..self.n {
            let row = &self.qw[r * kw..(r + 1) * kw];
            for b in 0..self.k / 32 {
                let g = b * 32 / self.group;
                let s = self.scales[r * ng + g];
                let m = f16::from_f32(-(self.zeros[r * ng + g] as f32) * s.to_f32());
                out.extend_from_slice(&s.to_le_bytes());
                out.extend_from_slice(&m.to_le_bytes());
                let q = |j: usize| ((row[(b * 32 + j) / 8] >> (4 * (j % 8))) & 0xF) as u8;
                out.extend((0..16).map(|j| q(j) | (q(j + 16) << 4)));
            }
        }
        out
    }

    /// Bytes the checkpoint stores for this matrix (qweight + qzeros + scales).
    pub fn stored_bytes(&self) -> usize {
        self.n * self.k / 2 + self.groups() * self.n / 2 + self.groups() * self.n * 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::safetensors::SafetensorsDir;

    /// Packing logical columns 0..7 with the values 0..7 gives 0x75316420 (model-formats.md §1.3).
    #[test]
    fn the_interleave_matches_the_published_word() {
        let m = AwqMatrix {
            n: 8,
            k: 8,
            group: 8,
            qw: (0..8u32).map(|v| v * 0x1111_1111).collect(),
            zeros: vec![0; 8],
            scales: vec![f16::ONE; 8],
        };
        let (qweight, _, _) = m.to_gemm();
        // Input row 0 holds, for output column j, the value j.
        assert_eq!(u32::from_le_bytes(qweight[..4].try_into().unwrap()), 0x7531_6420);
    }

    #[test]
    fn pack_unpack_round_trips_and_rows_concatenate() {
        let mut rng = crate::backend::cpu::test_util::Lcg(3);
        let (n, k, g) = (24, 64, 32);
        let w: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
        let m = AwqMatrix::quantize(&w, n, k, g).unwrap();
        let (qw, qz, sc) = m.to_gemm();
        assert_eq!(AwqMatrix::from_gemm(&qw, &qz, &sc, k, n, g).unwrap(), m);
        // Quantization error is at most half a step (plus fp16 rounding of the product).
        let mut row = vec![0.0; k];
        for r in 0..n {
            m.dequantize_row(r, &mut row);
            for (i, (&a, &b)) in row.iter().zip(&w[r * k..]).enumerate() {
                let s = m.scales[r * (k / g) + i / g].to_f32();
                assert!((a - b).abs() <= 0.5 * s + 1e-2 * b.abs().max(s), "row {r} col {i}: {a} vs {b}");
            }
        }
        let (a, b) =
            (AwqMatrix::quantize(&w[..8 * k], 8, k, g).unwrap(), AwqMatrix::quantize(&w[8 * k..], 16, k, g).unwrap());
        let mut a = a;
        a.append(b).unwrap();
        assert_eq!(a, m);
    }

    /// The CPU backend's AWQ linear (both precisions: AWQ always takes the exact path) equals the
    /// reference linear over the dequantized matrix, with bias and at a column offset.
    #[test]
    fn cpu_linear_equals_the_dequantized_reference() {
        use crate::backend::cpu::{reference, CpuBackend, Precision};
        use crate::backend::Backend;
        let mut rng = crate::backend::cpu::test_util::Lcg(9);
        let (n, k, g, rows) = (40, 256, 128, 3);
        let w: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
        let m = AwqMatrix::quantize(&w, n, k, g).unwrap();
        let mut deq = vec![0.0; n * k];
        for (r, row) in deq.chunks_exact_mut(k).enumerate() {
            m.dequantize_row(r, row);
        }
        let x: Vec<f32> = (0..rows * k).map(|_| rng.normal()).collect();
        let bias: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        let want = reference::linear(&x, rows, k, &deq, n, Some(&bias));
        // Σ|x·w| per output: the scale of the Q8 path's activation-rounding noise.
        let mag: Vec<f32> =
            (0..rows * n).map(|i| (0..k).map(|j| (x[(i / n) * k + j] * deq[(i % n) * k + j]).abs()).sum()).collect();
        for (precision, rel) in [(Precision::F32, 1e-5), (Precision::Q8, 1e-2)] {
            let be = CpuBackend::with_precision(1, precision);
            let wt = be.awq_weight("w", m.clone()).unwrap();
            if precision == Precision::F32 {
                assert_eq!(be.weight_bytes(&wt), m.stored_bytes());
            }
            let mut out = be.zeros(rows, n + 4);
            be.linear(&be.upload(&x, rows, k), &wt, Some(&be.upload(&bias, 1, n)), &mut out, 4);
            let got: Vec<f32> = out.data.chunks_exact(n + 4).flat_map(|r| r[4..].to_vec()).collect();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= rel * mag[i] + 1e-5, "{precision:?} [{i}]: {a} vs {b} (Σ|xw| {})", mag[i]);
            }
        }
    }

    /// The Q4_1 form dequantizes to the AWQ values up to the f16 rounding of `−z·s`.
    #[test]
    fn q4_1_blocks_hold_the_same_weights() {
        let mut rng = crate::backend::cpu::test_util::Lcg(5);
        let (n, k, g) = (16, 256, 64);
        let w: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
        let m = AwqMatrix::quantize(&w, n, k, g).unwrap();
        let q = m.to_q4_1();
        let (mut a, mut b) = (vec![0.0; k], vec![0.0; k]);
        for r in 0..n {
            m.dequantize_row(r, &mut a);
            crate::backend::cpu::blocks::dequantize_row(
                crate::backend::GgmlType::Q4_1,
                &q[r * k / 32 * 20..][..k / 32 * 20],
                &mut b,
            );
            for (c, (x, y)) in a.iter().zip(&b).enumerate() {
                let s = m.scales[r * (k / g) + c / g].to_f32();
                assert!((x - y).abs() <= 16.0 * s * 2f32.powi(-10), "row {r} col {c}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn bad_shapes_and_configs_are_refused() {
        assert!(AwqMatrix::check_shape(12, 128, 128).is_err());
        assert!(AwqMatrix::check_shape(16, 100, 128).is_err());
        assert!(AwqMatrix::from_gemm(&[0; 4], &[0; 4], &[0; 2], 128, 8, 128).unwrap_err().contains("qweight"));
        let cfg = |v: serde_json::Value| AwqConfig::from_json(&v);
        assert_eq!(cfg(serde_json::json!({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": true})).unwrap().group_size, 128);
        assert_eq!(cfg(serde_json::json!({"w_bit": 4, "q_group_size": 64, "version": "GEMM"})).unwrap().group_size, 64);
        assert!(cfg(serde_json::json!({"quant_method": "gptq"})).unwrap_err().contains("gptq"));
        assert!(cfg(serde_json::json!({"bits": 8})).unwrap_err().contains("8 bits"));
        assert!(cfg(serde_json::json!({"version": "gemv_fast"})).unwrap_err().contains("gemv_fast"));
        assert!(cfg(serde_json::json!({"group_size": -1})).unwrap_err().contains("-1"));
    }

    /// The committed fixture was packed and dequantized by an independent implementation of the
    /// format (tests/fixtures/awq/make_fixture.py, numpy, following AutoAWQ's `from_linear`
    /// packing and `dequantize_gemm`): unpacking its tensors must give its matrix bit for bit.
    #[test]
    fn dequantization_matches_the_independent_fixture() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/awq");
        let st = SafetensorsDir::open(&dir).unwrap();
        for layer in ["square", "wide"] {
            let t = |s: &str| st.tensor(&format!("{layer}.{s}")).unwrap_or_else(|| panic!("{layer}.{s}"));
            let (qw, qz, sc, want) = (t("qweight"), t("qzeros"), t("scales"), t("expected"));
            let (k, n) = (qw.shape[0], qw.shape[1] * 8);
            let group = k / qz.shape[0];
            assert_eq!(want.shape, vec![n, k]);
            let m = AwqMatrix::from_gemm(st.data(qw), st.data(qz), st.data(sc), k, n, group).unwrap();
            let expected: Vec<f16> = st.data(want).chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect();
            let mut row = vec![0.0; k];
            for r in 0..n {
                m.dequantize_row(r, &mut row);
                for (c, (&got, &w)) in row.iter().zip(&expected[r * k..(r + 1) * k]).enumerate() {
                    assert_eq!(got.to_bits(), w.to_f32().to_bits(), "{layer}: row {r}, col {c}");
                }
            }
            // And packing it again reproduces the checkpoint's bytes.
            let (q2, z2, s2) = m.to_gemm();
            assert!(q2 == st.data(qw) && z2 == st.data(qz) && s2 == st.data(sc), "{layer}: repacking differs");
        }
    }
}
