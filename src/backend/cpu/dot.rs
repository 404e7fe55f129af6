//! Dot products of one weight row with one activation row, on blocks, without dequantizing the
//! matrix.
//!
//! Legacy 32-element types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) use llama.cpp's scheme: the activation
//! row is quantized once per op to 8-bit blocks of 32 ([`BlockQ8`]) and each block pair is an
//! integer dot product scaled by both block scales. Other types (F32, F16, BF16, K-quants), and
//! every type under `Precision::F32`, take `linear`'s f32 path instead (one dequantized row at a
//! time against f32 activations).
//!
//! Each integer kernel has a portable scalar form (the fast-path oracle, tested against the f32
//! reference) and, on x86_64 with AVX2, an intrinsic form tested against the scalar one.

use super::blocks::f16_at;
use crate::backend::GgmlType;

pub const QK: usize = 32;

/// An activation block: `x[i] ≈ d · qs[i]`; `s = d · Σ qs` serves the min/offset terms.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct BlockQ8 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}

/// Quantizes a row (length a multiple of 32) to 8-bit blocks, round-to-nearest (halves away from
/// zero), `d = amax / 127`. The AVX2 form gives bit-identical blocks for finite input.
pub fn quantize_row_q8(x: &[f32], out: &mut [BlockQ8]) {
    assert_eq!(x.len(), out.len() * QK);
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        return simd::quantize_row_q8(x, out);
    }
    quantize_row_q8_scalar(x, out)
}

/// The portable form of [`quantize_row_q8`] (and its oracle).
pub fn quantize_row_q8_scalar(x: &[f32], out: &mut [BlockQ8]) {
    debug_assert_eq!(x.len(), out.len() * QK);
    for (xb, ob) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in ob.qs.iter_mut().zip(xb) {
            let r = (v * id).round() as i32;
            *q = r as i8;
            sum += r;
        }
        // ggml stores these as f16; f32 is kept here because bit parity with llama.cpp is out of
        // reach anyway (its Q8 rounding noise is chaotic, see tests/model_goldens.rs) and f32
        // is the more accurate choice.
        ob.d = d;
        ob.s = d * sum as f32;
    }
}

/// Whether `dtype` takes the integer path (activations quantized to [`BlockQ8`]).
pub fn uses_q8_activations(dtype: GgmlType) -> bool {
    matches!(dtype, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0)
}

/// A row dot product over quantized activations.
pub type DotQ8 = fn(&[u8], &[BlockQ8]) -> f32;

/// The fastest available integer kernel for `dtype` on this CPU.
pub fn dot_q8_kernel(dtype: GgmlType) -> DotQ8 {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        match dtype {
            GgmlType::Q4_0 => return simd::dot_q4_0,
            GgmlType::Q4_1 => return simd::dot_q4_1,
            GgmlType::Q8_0 => return simd::dot_q8_0,
            _ => {}
        }
    }
    scalar_kernel(dtype)
}

/// Four weight rows against one activation row: independent accumulator chains and one load of
/// each activation block for four rows (the single-row loop is latency-bound on its one chain).
pub type DotQ8x4 = fn([&[u8]; 4], &[BlockQ8]) -> [f32; 4];

/// The fastest available four-row kernel for `dtype` on this CPU.
pub fn dot_q8_x4_kernel(dtype: GgmlType) -> DotQ8x4 {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        match dtype {
            GgmlType::Q4_0 => return simd::dot_q4_0_x4,
            GgmlType::Q4_1 => return simd::dot_q4_1_x4,
            GgmlType::Q8_0 => return simd::dot_q8_0_x4,
            _ => {}
        }
    }
    match dtype {
        GgmlType::Q4_0 => |w, y| w.map(|r| dot_q4_0_scalar(r, y)),
        GgmlType::Q4_1 => |w, y| w.map(|r| dot_q4_1_scalar(r, y)),
        GgmlType::Q5_0 => |w, y| w.map(|r| dot_q5_0_scalar(r, y)),
        GgmlType::Q5_1 => |w, y| w.map(|r| dot_q5_1_scalar(r, y)),
        GgmlType::Q8_0 => |w, y| w.map(|r| dot_q8_0_scalar(r, y)),
        t => unreachable!("{t} does not use q8 activations"),
    }
}

/// The portable kernel for `dtype` (panics for types that do not take the integer path).
pub fn scalar_kernel(dtype: GgmlType) -> DotQ8 {
    match dtype {
        GgmlType::Q4_0 => dot_q4_0_scalar,
        GgmlType::Q4_1 => dot_q4_1_scalar,
        GgmlType::Q5_0 => dot_q5_0_scalar,
        GgmlType::Q5_1 => dot_q5_1_scalar,
        GgmlType::Q8_0 => dot_q8_0_scalar,
        t => unreachable!("{t} does not use q8 activations"),
    }
}

/// Σ over the 32 nibble-coded values of a legacy block: low nibbles are elements 0..16, high
/// nibbles 16..32 (ggml's order), plus an optional 5th bit from `qh`.
#[inline(always)]
fn sum_nibbles(qs: &[u8], qh: Option<u32>, y: &[i8; QK]) -> i32 {
    let mut sum = 0i32;
    for j in 0..16 {
        let (mut lo, mut hi) = ((qs[j] & 15) as i32, (qs[j] >> 4) as i32);
        if let Some(h) = qh {
            lo |= (((h >> j) & 1) as i32) << 4;
            hi |= (((h >> (j + 16)) & 1) as i32) << 4;
        }
        sum += lo * y[j] as i32 + hi * y[j + 16] as i32;
    }
    sum
}

// Each legacy block decodes to `d·q + c` for an integer q and a per-block offset c
// (Q4_0: c = −8d, Q5_0: c = −16d, Q4_1/Q5_1: c = m), so Σ x·w = d·dy·Σ q·qy + c·(dy·Σ qy) = … + c·s.

pub fn dot_q4_0_scalar(w: &[u8], y: &[BlockQ8]) -> f32 {
    w.chunks_exact(18)
        .zip(y)
        .map(|(b, y)| {
            let d = f16_at(b, 0);
            d * y.d * sum_nibbles(&b[2..18], None, &y.qs) as f32 - 8.0 * d * y.s
        })
        .sum()
}

pub fn dot_q4_1_scalar(w: &[u8], y: &[BlockQ8]) -> f32 {
    w.chunks_exact(20)
        .zip(y)
        .map(|(b, y)| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            d * y.d * sum_nibbles(&b[4..20], None, &y.qs) as f32 + m * y.s
        })
        .sum()
}

pub fn dot_q5_0_scalar(w: &[u8], y: &[BlockQ8]) -> f32 {
    w.chunks_exact(22)
        .zip(y)
        .map(|(b, y)| {
            let d = f16_at(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            d * y.d * sum_nibbles(&b[6..22], Some(qh), &y.qs) as f32 - 16.0 * d * y.s
        })
        .sum()
}

pub fn dot_q5_1_scalar(w: &[u8], y: &[BlockQ8]) -> f32 {
    w.chunks_exact(24)
        .zip(y)
        .map(|(b, y)| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            d * y.d * sum_nibbles(&b[8..24], Some(qh), &y.qs) as f32 + m * y.s
        })
        .sum()
}

pub fn dot_q8_0_scalar(w: &[u8], y: &[BlockQ8]) -> f32 {
    w.chunks_exact(34)
        .zip(y)
        .map(|(b, y)| {
            let d = f16_at(b, 0);
            let sum: i32 = b[2..34].iter().zip(&y.qs).map(|(&a, &c)| a as i8 as i32 * c as i32).sum();
            d * y.d * sum as f32
        })
        .sum()
}

/// Whether the x86_64 AVX2 + FMA + F16C kernels can run here.
#[cfg(target_arch = "x86_64")]
pub(crate) fn simd_available() -> bool {
    simd::available()
}

#[cfg(target_arch = "x86_64")]
mod simd {
    //! AVX2 kernels: nibbles are widened to bytes and multiplied with the signed activation bytes
    //! by `vpmaddubsw` (u8 × i8 → i16 pairs; |15·127·2| fits), then `vpmaddwd` with ones sums to
    //! i32 lanes, converted to f32 and accumulated with FMA. F16 scales convert with F16C.
    use super::{BlockQ8, QK};
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
        })
    }

    #[inline(always)]
    unsafe fn f16(b: *const u8) -> f32 {
        let bits = std::ptr::read_unaligned(b as *const u16);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// 16 packed bytes → 32 unsigned nibbles in element order (low nibbles, then high nibbles).
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let raw = _mm_loadu_si128(p as *const __m128i);
        let mask = _mm_set1_epi8(15);
        let lo = _mm_and_si128(raw, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        _mm256_set_m128i(hi, lo)
    }

    #[inline(always)]
    unsafe fn dot_u8_i8(a: __m256i, y: &[i8; QK]) -> __m256 {
        let yv = _mm256_loadu_si256(y.as_ptr() as *const __m256i);
        let p16 = _mm256_maddubs_epi16(a, yv);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1(w: &[u8], y: &[BlockQ8]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut off = 0.0f32;
        for (i, yb) in y.iter().enumerate() {
            let b = w.as_ptr().add(i * 20);
            let (d, m) = (f16(b), f16(b.add(2)));
            let s = dot_u8_i8(nibbles(b.add(4)), &yb.qs);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * yb.d), s, acc);
            off += m * yb.s;
        }
        hsum(acc) + off
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_0(w: &[u8], y: &[BlockQ8]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut off = 0.0f32;
        for (i, yb) in y.iter().enumerate() {
            let b = w.as_ptr().add(i * 18);
            let d = f16(b);
            let s = dot_u8_i8(nibbles(b.add(2)), &yb.qs);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * yb.d), s, acc);
            off -= 8.0 * d * yb.s;
        }
        hsum(acc) + off
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0(w: &[u8], y: &[BlockQ8]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (i, yb) in y.iter().enumerate() {
            let b = w.as_ptr().add(i * 34);
            let d = f16(b);
            let wv = _mm256_loadu_si256(b.add(2) as *const __m256i);
            let yv = _mm256_loadu_si256(yb.qs.as_ptr() as *const __m256i);
            // maddubs needs an unsigned left operand: |w| times y carrying w's sign.
            let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(yv, wv));
            let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * yb.d), s, acc);
        }
        hsum(acc)
    }

    /// Sum of 32 u8×i8 products as 8 i32 lanes converted to f32.
    #[inline(always)]
    unsafe fn dot_u8_i8_v(a: __m256i, yv: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(a, yv), _mm256_set1_epi16(1)))
    }

    #[inline(always)]
    unsafe fn hsum4(a: [__m256; 4]) -> [f32; 4] {
        [hsum(a[0]), hsum(a[1]), hsum(a[2]), hsum(a[3])]
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_x4(w: [&[u8]; 4], y: &[BlockQ8]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut off = [0.0f32; 4];
        for (i, yb) in y.iter().enumerate() {
            let yv = _mm256_loadu_si256(yb.qs.as_ptr() as *const __m256i);
            for r in 0..4 {
                let b = w[r].as_ptr().add(i * 20);
                let s = dot_u8_i8_v(nibbles(b.add(4)), yv);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(f16(b) * yb.d), s, acc[r]);
                off[r] += f16(b.add(2)) * yb.s;
            }
        }
        let h = hsum4(acc);
        [h[0] + off[0], h[1] + off[1], h[2] + off[2], h[3] + off[3]]
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_0_x4(w: [&[u8]; 4], y: &[BlockQ8]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut off = [0.0f32; 4];
        for (i, yb) in y.iter().enumerate() {
            let yv = _mm256_loadu_si256(yb.qs.as_ptr() as *const __m256i);
            for r in 0..4 {
                let b = w[r].as_ptr().add(i * 18);
                let d = f16(b);
                let s = dot_u8_i8_v(nibbles(b.add(2)), yv);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * yb.d), s, acc[r]);
                off[r] -= 8.0 * d * yb.s;
            }
        }
        let h = hsum4(acc);
        [h[0] + off[0], h[1] + off[1], h[2] + off[2], h[3] + off[3]]
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_x4(w: [&[u8]; 4], y: &[BlockQ8]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        for (i, yb) in y.iter().enumerate() {
            let yv = _mm256_loadu_si256(yb.qs.as_ptr() as *const __m256i);
            for r in 0..4 {
                let b = w[r].as_ptr().add(i * 34);
                let wv = _mm256_loadu_si256(b.add(2) as *const __m256i);
                let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(yv, wv));
                let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(f16(b) * yb.d), s, acc[r]);
            }
        }
        hsum4(acc)
    }

    pub fn dot_q4_0_x4(w: [&[u8]; 4], y: &[BlockQ8]) -> [f32; 4] {
        assert!(w.iter().all(|r| r.len() >= y.len() * 18));
        unsafe { q4_0_x4(w, y) }
    }
    pub fn dot_q4_1_x4(w: [&[u8]; 4], y: &[BlockQ8]) -> [f32; 4] {
        assert!(w.iter().all(|r| r.len() >= y.len() * 20));
        unsafe { q4_1_x4(w, y) }
    }
    pub fn dot_q8_0_x4(w: [&[u8]; 4], y: &[BlockQ8]) -> [f32; 4] {
        assert!(w.iter().all(|r| r.len() >= y.len() * 34));
        unsafe { q8_0_x4(w, y) }
    }

    // Safe entry points: only handed out by `dot_q8_kernel` after `available()` said yes.
    pub fn dot_q4_0(w: &[u8], y: &[BlockQ8]) -> f32 {
        assert!(w.len() >= y.len() * 18);
        unsafe { q4_0(w, y) }
    }
    pub fn dot_q4_1(w: &[u8], y: &[BlockQ8]) -> f32 {
        assert!(w.len() >= y.len() * 20);
        unsafe { q4_1(w, y) }
    }
    pub fn dot_q8_0(w: &[u8], y: &[BlockQ8]) -> f32 {
        assert!(w.len() >= y.len() * 34);
        unsafe { q8_0(w, y) }
    }

    pub fn quantize_row_q8(x: &[f32], out: &mut [BlockQ8]) {
        assert_eq!(x.len(), out.len() * QK);
        unsafe { quantize_q8(x, out) }
    }

    /// The scalar quantizer's arithmetic 8 lanes at a time: the same `amax`, `d`, `1/d` and
    /// products; `round` (halves away from zero) as truncation plus a ±1 step where the exact
    /// remainder is at least one half; the i32 → i8 narrowing by saturating packs, exact for
    /// |q| ≤ 127.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
        let sign = _mm256_set1_ps(-0.0);
        let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
        for (xb, ob) in x.chunks_exact(QK).zip(out.iter_mut()) {
            let p = xb.as_ptr();
            let v = [0, 8, 16, 24].map(|i| _mm256_loadu_ps(p.add(i)));
            let m = _mm256_max_ps(
                _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])),
            );
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let idv = _mm256_set1_ps(id);
            let q = v.map(|v| {
                let r = _mm256_mul_ps(v, idv);
                let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(r);
                let f = _mm256_andnot_ps(sign, _mm256_sub_ps(r, t));
                let step = _mm256_or_ps(one, _mm256_and_ps(sign, r));
                let up = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(f, half), step);
                _mm256_cvttps_epi32(_mm256_add_ps(t, up))
            });
            let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let sum = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b01_00_11_10));
            let sum = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b10_11_00_01)));
            // packs interleave the 128-bit lanes: dwords come out as a0-3 b0-3 c0-3 d0-3 | a4-7 …
            let bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(ob.qs.as_mut_ptr() as *mut __m256i, bytes);
            ob.d = d;
            ob.s = d * sum as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::blocks::dequantize_row;
    use crate::backend::cpu::test_util::{random_blocks, Lcg};

    const LEGACY: [GgmlType; 5] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0];

    /// The scalar integer kernels equal the f32 reference (dequantized weights · dequantized
    /// activations) up to f32 summation order: |err| ≤ 1e-4 · Σ|w·x|.
    #[test]
    fn scalar_kernels_match_dequantized_reference() {
        let mut rng = Lcg(7);
        for t in LEGACY {
            let n = 256;
            let w = random_blocks(t, n, &mut rng);
            let x: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            let mut xq = vec![BlockQ8::default(); n / QK];
            quantize_row_q8(&x, &mut xq);
            let xd: Vec<f32> = xq.iter().flat_map(|b| b.qs.iter().map(move |&q| q as f32 * b.d)).collect();
            let mut wd = vec![0.0; n];
            dequantize_row(t, &w, &mut wd);
            let want: f32 = wd.iter().zip(&xd).map(|(a, b)| a * b).sum();
            let mag: f32 = wd.iter().zip(&xd).map(|(a, b)| (a * b).abs()).sum();
            let got = scalar_kernel(t)(&w, &xq);
            assert!((got - want).abs() <= 1e-4 * mag + 1e-6, "{t}: {got} vs {want}");
        }
    }

    #[test]
    fn fastest_kernels_match_scalar() {
        let mut rng = Lcg(11);
        for t in LEGACY {
            for nb in [1, 3, 18, 48] {
                let n = nb * QK;
                let w = random_blocks(t, n, &mut rng);
                let x: Vec<f32> = (0..n).map(|_| rng.normal() * 3.0).collect();
                let mut xq = vec![BlockQ8::default(); nb];
                quantize_row_q8(&x, &mut xq);
                let (a, b) = (dot_q8_kernel(t)(&w, &xq), scalar_kernel(t)(&w, &xq));
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{t} nb={nb}: {a} vs {b}");
                // The four-row kernel on four different rows equals four scalar calls.
                let rows: Vec<Vec<u8>> = (0..4).map(|_| random_blocks(t, n, &mut rng)).collect();
                let got = dot_q8_x4_kernel(t)([&rows[0], &rows[1], &rows[2], &rows[3]], &xq);
                for (r, g) in rows.iter().zip(got) {
                    let want = scalar_kernel(t)(r, &xq);
                    assert!((g - want).abs() <= 1e-5 * want.abs().max(1.0), "{t} x4 nb={nb}: {g} vs {want}");
                }
            }
        }
    }

    /// The fast quantizer gives the scalar one's blocks bit for bit, ties at .5 included.
    #[test]
    fn quantize_row_q8_matches_scalar_exactly() {
        let mut rng = Lcg(5);
        for nb in [1, 2, 7, 18] {
            for scale in [0.0f32, 1e-30, 1e-3, 1.0, 3e4] {
                let mut x: Vec<f32> = (0..nb * QK).map(|_| rng.normal() * scale).collect();
                if scale == 1.0 {
                    // Exact halves after scaling by 127/amax = 1: amax 127 with .5 remainders.
                    x[0] = 127.0;
                    for (i, v) in x[1..QK].iter_mut().enumerate() {
                        *v = (i as f32 - 15.0) + if i % 2 == 0 { 0.5 } else { -0.5 };
                    }
                }
                let (mut a, mut b) = (vec![BlockQ8::default(); nb], vec![BlockQ8::default(); nb]);
                quantize_row_q8(&x, &mut a);
                quantize_row_q8_scalar(&x, &mut b);
                for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                    assert_eq!(
                        (a.d.to_bits(), a.s.to_bits(), a.qs),
                        (b.d.to_bits(), b.s.to_bits(), b.qs),
                        "nb={nb} scale={scale} block {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn quantize_row_q8_round_trips_within_half_a_step() {
        let mut rng = Lcg(3);
        let x: Vec<f32> = (0..64).map(|_| rng.normal()).collect();
        let mut q = vec![BlockQ8::default(); 2];
        quantize_row_q8(&x, &mut q);
        for (i, v) in x.iter().enumerate() {
            let b = &q[i / QK];
            assert!((b.qs[i % QK] as f32 * b.d - v).abs() <= b.d * 0.5 + 1e-7);
        }
        let zero = [0.0f32; 32];
        quantize_row_q8(&zero, &mut q[..1]);
        assert_eq!((q[0].d, q[0].s), (0.0, 0.0));
    }
}
