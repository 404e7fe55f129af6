//! Weights repacked at load for the integer kernels: 8 rows interleaved per block.
//!
//! In file order each row is its own run of blocks, so a dot product ends in a horizontal sum per
//! row and every block's f16 scale converts alone. Here a group of 8 rows stores, block by block,
//! the 8 scales together (one `vcvtph2ps`) and the quants of the 8 rows interleaved in 4-byte
//! slices, so one 256-bit register holds 4 consecutive elements of each of the 8 rows: a
//! `vpmaddubsw`/`vpdpbusd` against 4 broadcast activation bytes leaves each row's partial sum in its
//! own lane, and 8 outputs come out of one accumulator with no horizontal sums (llama.cpp's
//! repacked Q4_0 8x8 GEMV follows the same idea). Bytes per group and block stay those of the file
//! (8 × 20 for Q4_1, 8 × 34 for Q8_0), so decode reads no more memory.
//!
//! Group layout per block, Q4_1 (160 bytes): `d[8] f16 | m[8] f16 | 4 × 32 quant bytes`, where in
//! chunk k the byte for row r, slot i (r < 8, i < 4) is `q[8k+i] | q[8k+4+i] << 4`.
//! Q8_0 (272 bytes): `d[8] f16 | 8 × 32 quant bytes`, chunk k holding `q[4k..4k+4]` of each row.

use super::dot::{BlockQ8, QK};
use crate::backend::GgmlType;

pub const GROUP: usize = 8;

/// Rows of one weight in packed groups (`rows % 8 == 0`).
#[derive(Debug)]
pub struct Packed {
    pub dtype: GgmlType,
    /// Blocks per row.
    nb: usize,
    data: Vec<u8>,
}

/// Bytes of one group's block in the packed layout.
fn group_block_bytes(dtype: GgmlType) -> usize {
    GROUP * dtype.block_bytes()
}

/// Whether `dtype` has a packed layout and kernel.
pub fn supports(dtype: GgmlType) -> bool {
    matches!(dtype, GgmlType::Q4_1 | GgmlType::Q8_0)
}

impl Packed {
    /// Repacks file-order rows (`rows % 8 == 0`, `supports(dtype)`).
    pub fn new(dtype: GgmlType, rows: usize, cols: usize, data: &[u8]) -> Self {
        assert!(supports(dtype) && rows.is_multiple_of(GROUP));
        let nb = cols / QK;
        let bb = dtype.block_bytes();
        let row_bytes = nb * bb;
        let gbb = group_block_bytes(dtype);
        let mut out = vec![0u8; data.len()];
        for g in 0..rows / GROUP {
            for b in 0..nb {
                let dst = &mut out[(g * nb + b) * gbb..][..gbb];
                for r in 0..GROUP {
                    let src = &data[(g * GROUP + r) * row_bytes + b * bb..][..bb];
                    match dtype {
                        GgmlType::Q4_1 => {
                            dst[2 * r..2 * r + 2].copy_from_slice(&src[0..2]);
                            dst[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&src[2..4]);
                            let q = unpack_nibbles(&src[4..20]);
                            for k in 0..4 {
                                for i in 0..4 {
                                    dst[32 + 32 * k + 4 * r + i] = q[8 * k + i] | (q[8 * k + 4 + i] << 4);
                                }
                            }
                        }
                        GgmlType::Q8_0 => {
                            dst[2 * r..2 * r + 2].copy_from_slice(&src[0..2]);
                            for k in 0..8 {
                                dst[16 + 32 * k + 4 * r..][..4].copy_from_slice(&src[2 + 4 * k..][..4]);
                            }
                        }
                        _ => unreachable!(),
                    }
                }
            }
        }
        Self { dtype, nb, data: out }
    }

    /// Row `r` back in file layout (for lookups such as a tied embedding).
    pub fn raw_row(&self, r: usize) -> Vec<u8> {
        let (g, r) = (r / GROUP, r % GROUP);
        let bb = self.dtype.block_bytes();
        let mut out = vec![0u8; self.nb * bb];
        for b in 0..self.nb {
            let src = self.group(g, b);
            let dst = &mut out[b * bb..(b + 1) * bb];
            match self.dtype {
                GgmlType::Q4_1 => {
                    dst[0..2].copy_from_slice(&src[2 * r..2 * r + 2]);
                    dst[2..4].copy_from_slice(&src[16 + 2 * r..16 + 2 * r + 2]);
                    let mut q = [0u8; 32];
                    for k in 0..4 {
                        for i in 0..4 {
                            let byte = src[32 + 32 * k + 4 * r + i];
                            q[8 * k + i] = byte & 15;
                            q[8 * k + 4 + i] = byte >> 4;
                        }
                    }
                    for j in 0..16 {
                        dst[4 + j] = q[j] | (q[j + 16] << 4);
                    }
                }
                GgmlType::Q8_0 => {
                    dst[0..2].copy_from_slice(&src[2 * r..2 * r + 2]);
                    for k in 0..8 {
                        dst[2 + 4 * k..][..4].copy_from_slice(&src[16 + 32 * k + 4 * r..][..4]);
                    }
                }
                _ => unreachable!(),
            }
        }
        out
    }

    /// The bytes of group `g`, block `b`.
    fn group(&self, g: usize, b: usize) -> &[u8] {
        let gbb = group_block_bytes(self.dtype);
        &self.data[(g * self.nb + b) * gbb..][..gbb]
    }

    /// All blocks of group `g`, contiguous.
    pub fn group_blocks(&self, g: usize) -> &[u8] {
        let n = self.nb * group_block_bytes(self.dtype);
        &self.data[g * n..(g + 1) * n]
    }
}

/// Element order of a legacy 4-bit block: low nibbles are elements 0..16, high nibbles 16..32.
fn unpack_nibbles(qs: &[u8]) -> [u8; 32] {
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = qs[j] & 15;
        q[j + 16] = qs[j] >> 4;
    }
    q
}

/// Dots of the 8 rows of one packed group with one activation row.
pub type DotGroup = fn(&[u8], &[BlockQ8]) -> [f32; GROUP];

/// The packed kernel for `dtype` on this CPU, if there is one (x86_64 with AVX2).
pub fn kernel(dtype: GgmlType) -> Option<DotGroup> {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        return match (dtype, simd::vnni()) {
            (GgmlType::Q4_1, true) => Some(simd::group_q4_1_vnni),
            (GgmlType::Q4_1, false) => Some(simd::group_q4_1_avx2),
            (GgmlType::Q8_0, true) => Some(simd::group_q8_0_vnni),
            (GgmlType::Q8_0, false) => Some(simd::group_q8_0_avx2),
            _ => None,
        };
    }
    let _ = dtype;
    None
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{BlockQ8, GROUP};
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        super::super::dot::simd_available()
    }

    pub fn vnni() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl"))
    }

    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32))
    }

    #[inline(always)]
    unsafe fn store(acc: __m256) -> [f32; GROUP] {
        let mut out = [0.0f32; GROUP];
        _mm256_storeu_ps(out.as_mut_ptr(), acc);
        out
    }

    /// Q4_1: per block, 8 `vpmaddubsw` results summed in i16 (each ≤ 15·127·2 = 3810, eight of
    /// them ≤ 30480 < 2^15), one `vpmaddwd` to i32, then `d·dy·Σ + m·s` for 8 rows at once.
    macro_rules! q4_1_body {
        ($p:expr, $y:expr, $dot4:ident, $finish:ident) => {{
            let mask = _mm256_set1_epi8(15);
            let mut acc = _mm256_setzero_ps();
            for (b, yb) in $y.iter().enumerate() {
                let base = $p.as_ptr().add(b * 160);
                let q = yb.qs.as_ptr();
                let mut isum = _mm256_setzero_si256();
                for k in 0..4 {
                    let v = _mm256_loadu_si256(base.add(32 + 32 * k) as *const __m256i);
                    let lo = _mm256_and_si256(v, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                    isum = $dot4(isum, lo, bcast4(q.add(8 * k)));
                    isum = $dot4(isum, hi, bcast4(q.add(8 * k + 4)));
                }
                let d = _mm256_cvtph_ps(_mm_loadu_si128(base as *const __m128i));
                let m = _mm256_cvtph_ps(_mm_loadu_si128(base.add(16) as *const __m128i));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps($finish(isum)), _mm256_mul_ps(d, _mm256_set1_ps(yb.d)), acc);
                acc = _mm256_fmadd_ps(m, _mm256_set1_ps(yb.s), acc);
            }
            store(acc)
        }};
    }

    // AVX2: the running sum is i16 pairs, widened once per block by `finish`.
    #[inline(always)]
    unsafe fn dot4_i16(acc: __m256i, a: __m256i, y: __m256i) -> __m256i {
        _mm256_add_epi16(acc, _mm256_maddubs_epi16(a, y))
    }
    #[inline(always)]
    unsafe fn widen_i16(acc: __m256i) -> __m256i {
        _mm256_madd_epi16(acc, _mm256_set1_epi16(1))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_avx2(p: &[u8], y: &[BlockQ8]) -> [f32; GROUP] {
        q4_1_body!(p, y, dot4_i16, widen_i16)
    }

    // VNNI: `vpdpbusd` sums the 4 u8×i8 products of each lane straight into i32.
    #[inline(always)]
    unsafe fn dot4_vnni(acc: __m256i, a: __m256i, y: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, a, y)
    }
    #[inline(always)]
    unsafe fn same(acc: __m256i) -> __m256i {
        acc
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    unsafe fn q4_1_vnni(p: &[u8], y: &[BlockQ8]) -> [f32; GROUP] {
        q4_1_body!(p, y, dot4_vnni, same)
    }

    /// Q8_0: signed × signed through the unsigned-left-operand instructions: |w| times y carrying
    /// w's sign. Sums can reach 8 × 2 × 128 × 127, past i16, so AVX2 widens per chunk.
    macro_rules! q8_0_body {
        ($p:expr, $y:expr, $dot4:ident) => {{
            let mut acc = _mm256_setzero_ps();
            for (b, yb) in $y.iter().enumerate() {
                let base = $p.as_ptr().add(b * 272);
                let q = yb.qs.as_ptr();
                let mut isum = _mm256_setzero_si256();
                for k in 0..8 {
                    let w = _mm256_loadu_si256(base.add(16 + 32 * k) as *const __m256i);
                    let yk = bcast4(q.add(4 * k));
                    isum = $dot4(isum, _mm256_sign_epi8(w, w), _mm256_sign_epi8(yk, w));
                }
                let d = _mm256_cvtph_ps(_mm_loadu_si128(base as *const __m128i));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, _mm256_set1_ps(yb.d)), acc);
            }
            store(acc)
        }};
    }

    #[inline(always)]
    unsafe fn dot4_i32(acc: __m256i, a: __m256i, y: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, y), _mm256_set1_epi16(1)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_avx2(p: &[u8], y: &[BlockQ8]) -> [f32; GROUP] {
        q8_0_body!(p, y, dot4_i32)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    unsafe fn q8_0_vnni(p: &[u8], y: &[BlockQ8]) -> [f32; GROUP] {
        q8_0_body!(p, y, dot4_vnni)
    }

    // Safe entry points, handed out by `kernel` only after the CPU features were detected.
    pub fn group_q4_1_avx2(p: &[u8], y: &[BlockQ8]) -> [f32; GROUP] {
        assert!(p.len() >= y.len() * 160);
        unsafe { q4_1_avx2(p, y) }
    }
    pub fn group_q4_1_vnni(p: &[u8], y: &[BlockQ8]) -> [f32; GROUP] {
        assert!(p.len() >= y.len() * 160);
        unsafe { q4_1_vnni(p, y) }
    }
    pub fn group_q8_0_avx2(p: &[u8], y: &[BlockQ8]) -> [f32; GROUP] {
        assert!(p.len() >= y.len() * 272);
        unsafe { q8_0_avx2(p, y) }
    }
    pub fn group_q8_0_vnni(p: &[u8], y: &[BlockQ8]) -> [f32; GROUP] {
        assert!(p.len() >= y.len() * 272);
        unsafe { q8_0_vnni(p, y) }
    }

    #[cfg(test)]
    pub const ALL: [(&str, super::GgmlType, super::DotGroup); 4] = [
        ("q4_1 avx2", super::GgmlType::Q4_1, group_q4_1_avx2),
        ("q4_1 vnni", super::GgmlType::Q4_1, group_q4_1_vnni),
        ("q8_0 avx2", super::GgmlType::Q8_0, group_q8_0_avx2),
        ("q8_0 vnni", super::GgmlType::Q8_0, group_q8_0_vnni),
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::dot::{quantize_row_q8, scalar_kernel};
    use crate::backend::cpu::test_util::{random_blocks, Lcg};

    #[test]
    fn raw_rows_round_trip() {
        let mut rng = Lcg(21);
        for t in [GgmlType::Q4_1, GgmlType::Q8_0] {
            let (rows, cols) = (16, 96);
            let data = random_blocks(t, rows * cols, &mut rng);
            let p = Packed::new(t, rows, cols, &data);
            let rb = t.row_bytes(cols).unwrap();
            for r in 0..rows {
                assert_eq!(p.raw_row(r), data[r * rb..(r + 1) * rb], "{t} row {r}");
            }
        }
    }

    /// Every packed kernel this CPU can run equals the scalar kernel on the file-order rows.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn packed_kernels_match_scalar_rows() {
        if !simd::available() {
            eprintln!("skipped: this CPU has no AVX2/FMA/F16C");
            return;
        }
        let mut rng = Lcg(22);
        for (name, t, f) in simd::ALL {
            if name.ends_with("vnni") && !simd::vnni() {
                eprintln!("skipped {name}: this CPU has no AVX-512 VNNI");
                continue;
            }
            for nb in [1, 5, 18] {
                let (rows, cols) = (16, nb * QK);
                let data = random_blocks(t, rows * cols, &mut rng);
                let p = Packed::new(t, rows, cols, &data);
                let x: Vec<f32> = (0..cols).map(|_| rng.normal() * 2.0).collect();
                let mut xq = vec![BlockQ8::default(); nb];
                quantize_row_q8(&x, &mut xq);
                let rb = t.row_bytes(cols).unwrap();
                for g in 0..rows / GROUP {
                    let got = f(p.group_blocks(g), &xq);
                    for (r, v) in got.iter().enumerate() {
                        let row = g * GROUP + r;
                        let want = scalar_kernel(t)(&data[row * rb..(row + 1) * rb], &xq);
                        assert!(
                            (v - want).abs() <= 1e-4 * want.abs().max(1.0),
                            "{name} nb={nb} row {row}: {v} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
