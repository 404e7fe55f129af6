//! Attention of one row's query heads that share a KV head, with AVX2/FMA f32 arithmetic over an
//! f32 or f16 cache (the build targets baseline x86_64, so the plain loops of `CpuBackend::attention`
//! compile to SSE).

use std::arch::x86_64::*;

/// Head dimensions must be a multiple of this (64 and 128 are): one block of output columns
/// accumulates in 8 registers.
pub const CHUNK: usize = 64;

/// How many slots ahead the score loop prefetches K and V rows.
const PREFETCH: usize = 8;

/// A cache value type: 8 of them load as 8 f32 lanes.
pub trait Elem: Copy {
    /// # Safety
    /// `p` points at 8 readable values; AVX2 and F16C are available.
    unsafe fn load8(p: *const Self) -> __m256;
}

impl Elem for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
}

impl Elem for half::f16 {
    #[inline(always)]
    unsafe fn load8(p: *const half::f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// One layer's K and V caches and where this KV head's columns start in a slot's row.
#[derive(Clone, Copy)]
pub struct Kv<'a, T> {
    pub k: &'a [T],
    pub v: &'a [T],
    pub stride: usize,
    pub offset: usize,
}

impl<T> Kv<'_, T> {
    fn k_row(&self, slot: u32) -> &[T] {
        &self.k[slot as usize * self.stride + self.offset..]
    }
    fn v_row(&self, slot: u32) -> &[T] {
        &self.v[slot as usize * self.stride + self.offset..]
    }
}

/// `out[h]` = softmax(q_h·K / √d)·V over `slots` for the `heads` query heads in `q` (`heads ·
/// d` floats, head after head). `scores` is scratch space.
#[allow(clippy::too_many_arguments)]
pub fn attend<T: Elem>(
    q: &[f32],
    heads: usize,
    d: usize,
    slots: &[u32],
    kv: Kv<'_, T>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    assert!(super::dot::simd_available() && d.is_multiple_of(CHUNK));
    assert!(q.len() == heads * d && out.len() == heads * d);
    // Every row read below holds d floats: checked once per slot here, not per load.
    for &sl in slots {
        assert!(kv.k_row(sl).len() >= d && kv.v_row(sl).len() >= d, "attention: slot {sl} out of the cache");
    }
    unsafe { attend_impl(q, heads, d, slots, kv, scale, scores, out) }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_impl<T: Elem>(
    q: &[f32],
    heads: usize,
    d: usize,
    slots: &[u32],
    kv: Kv<'_, T>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let n = slots.len();
    scores.clear();
    scores.resize(heads * n, 0.0);
    let scale8 = _mm256_set1_ps(scale);
    let whole = n / 8 * 8;
    for (i, &sl) in slots.iter().enumerate() {
        // The cache rows of a long batch do not stay in cache from one step to the next:
        // fetch K and V of a later slot ahead (V is read after the softmax).
        if let Some(&next) = slots.get(i + PREFETCH) {
            let (k, v) = (kv.k_row(next).as_ptr() as *const i8, kv.v_row(next).as_ptr() as *const i8);
            for b in (0..d * std::mem::size_of::<T>()).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(k.add(b));
                _mm_prefetch::<_MM_HINT_T0>(v.add(b));
            }
        }
        if i < whole {
            // Slots in groups of 8: one accumulator per slot, reduced together (one
            // transpose-add for 8 scores instead of a horizontal sum each).
            if i % 8 == 0 {
                let ks: [*const T; 8] = std::array::from_fn(|j| kv.k_row(slots[i + j]).as_ptr());
                for h in 0..heads {
                    let qh = q.as_ptr().add(h * d);
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for c in (0..d).step_by(8) {
                        let qv = _mm256_loadu_ps(qh.add(c));
                        for (a, k) in acc.iter_mut().zip(&ks) {
                            *a = _mm256_fmadd_ps(qv, T::load8(k.add(c)), *a);
                        }
                    }
                    let s8 = _mm256_mul_ps(reduce8(&acc), scale8);
                    _mm256_storeu_ps(scores.as_mut_ptr().add(h * n + i), s8);
                }
            }
            continue;
        }
        let k = kv.k_row(sl).as_ptr();
        for h in 0..heads {
            let qh = q.as_ptr().add(h * d);
            let (mut a, mut b) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for c in (0..d).step_by(16) {
                a = _mm256_fmadd_ps(_mm256_loadu_ps(qh.add(c)), T::load8(k.add(c)), a);
                b = _mm256_fmadd_ps(_mm256_loadu_ps(qh.add(c + 8)), T::load8(k.add(c + 8)), b);
            }
            *scores.get_unchecked_mut(h * n + i) = hsum(_mm256_add_ps(a, b)) * scale;
        }
    }
    for (h, p) in scores.chunks_exact_mut(n).enumerate() {
        let max = p.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in p.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        for c0 in (0..d).step_by(CHUNK) {
            let mut acc = [_mm256_setzero_ps(); CHUNK / 8];
            for (&w, &sl) in p.iter().zip(slots) {
                let w = _mm256_set1_ps(w * inv);
                let v = kv.v_row(sl).as_ptr().add(c0);
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(w, T::load8(v.add(8 * j)), *a);
                }
            }
            let o = out.as_mut_ptr().add(h * d + c0);
            for (j, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(o.add(8 * j), *a);
            }
        }
    }
}

/// The 8 lane sums of `a[0..8]`, in order, in one vector.
#[inline(always)]
unsafe fn reduce8(a: &[__m256; 8]) -> __m256 {
    let (t0, t1) = (_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    let (t2, t3) = (_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    // [a0 a1 a2 a3 | a0 a1 a2 a3] partial sums of the low and high lane halves, likewise a4..a7.
    let (u0, u1) = (_mm256_hadd_ps(t0, t1), _mm256_hadd_ps(t2, t3));
    _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(u0, u1), _mm256_permute2f128_ps::<0x31>(u0, u1))
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}
