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

/// Most activation rows one packed-kernel call takes. A decode step of up to this many sequences
/// passes over each weight group once: the nibble unpacking and scale conversion are shared by
/// every token of the tile, and the weights are read from memory once per step.
pub const MAX_TOKENS: usize = 8;

/// The packed dot kernel for one weight type on this CPU.
#[derive(Clone, Copy)]
pub struct GroupKernel {
    pub dot: DotGroup,
}

/// One packed group against `ys.len()` activation rows (1..=[`MAX_TOKENS`]): `out[token][row]`
/// (`out.len() == ys.len()`). Each token's result is the same whatever the tile size.
pub type DotGroup = fn(&[u8], &[&[BlockQ8]], &mut [[f32; GROUP]]);

/// Splits `n` tokens into tiles of at most [`MAX_TOKENS`], as even as possible (9 → 5 + 4 rather
/// than 8 + 1, whose single-token tile would pay the unpacking alone): `(start, len)` pairs.
pub fn tiles(n: usize) -> impl Iterator<Item = (usize, usize)> {
    let count = n.div_ceil(MAX_TOKENS);
    let (base, extra) = (n.checked_div(count).unwrap_or(0), n.checked_rem(count).unwrap_or(0));
    (0..count).map(move |i| (i * base + i.min(extra), base + usize::from(i < extra)))
}

/// The packed kernels for `dtype` on this CPU, if there are any (x86_64 with AVX2).
pub fn kernel(dtype: GgmlType) -> Option<GroupKernel> {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        return simd::kernels(dtype, simd::vnni());
    }
    let _ = dtype;
    None
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{BlockQ8, GgmlType, GroupKernel, GROUP};
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        super::super::dot::simd_available()
    }

    pub fn vnni() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl"))
    }

    /// How 4 u8×i8 products per 32-bit lane are summed into a running total.
    trait Dot4 {
        /// `acc += Σ_4 a·y` per lane (in the accumulator's own representation).
        unsafe fn dot(acc: __m256i, a: __m256i, y: __m256i) -> __m256i;
        /// The running total as 8 i32 lanes.
        unsafe fn finish(acc: __m256i) -> __m256i;
    }

    /// AVX2, for Q4_1: `vpmaddubsw` results summed in i16 (each ≤ 15·127·2 = 3810, eight of them
    /// ≤ 30480 < 2^15), widened once per block.
    struct I16;
    impl Dot4 for I16 {
        #[inline(always)]
        unsafe fn dot(acc: __m256i, a: __m256i, y: __m256i) -> __m256i {
            _mm256_add_epi16(acc, _mm256_maddubs_epi16(a, y))
        }
        #[inline(always)]
        unsafe fn finish(acc: __m256i) -> __m256i {
            _mm256_madd_epi16(acc, _mm256_set1_epi16(1))
        }
    }

    /// AVX2, for Q8_0: sums can reach 8·2·128·127, past i16, so widen per step.
    struct I32;
    impl Dot4 for I32 {
        #[inline(always)]
        unsafe fn dot(acc: __m256i, a: __m256i, y: __m256i) -> __m256i {
            _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, y), _mm256_set1_epi16(1)))
        }
        #[inline(always)]
        unsafe fn finish(acc: __m256i) -> __m256i {
            acc
        }
    }

    /// AVX-512 VNNI (256-bit form): `vpdpbusd` sums the 4 products of each lane straight into i32.
    struct Vnni;
    impl Dot4 for Vnni {
        #[inline(always)]
        unsafe fn dot(acc: __m256i, a: __m256i, y: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(acc, a, y)
        }
        #[inline(always)]
        unsafe fn finish(acc: __m256i) -> __m256i {
            acc
        }
    }

    /// How far ahead of the block being multiplied the weight stream is fetched, in tiles of at
    /// least `PREFETCH_FROM` tokens. Those spend long enough on each block that the hardware
    /// prefetcher falls behind; a single token streams faster without the hints.
    const PREFETCH_BYTES: usize = 1024;
    const PREFETCH_FROM: usize = 4;

    /// Prefetches the cache lines of the block `PREFETCH_BYTES` ahead of `block` (of `BYTES`
    /// bytes). Past the end of the weights it only hints at addresses that are never read.
    #[inline(always)]
    unsafe fn prefetch<const BYTES: usize>(block: *const u8) {
        let ahead = block.wrapping_add(PREFETCH_BYTES);
        for line in (0..BYTES).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8);
        }
    }

    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32))
    }

    /// Writes each token's 8 sums (a plain loop: `array::map` would call the store out of line,
    /// outside the target features).
    #[inline(always)]
    unsafe fn store<const T: usize>(acc: &[__m256; T], out: &mut [[f32; GROUP]]) {
        assert_eq!(out.len(), T);
        for t in 0..T {
            _mm256_storeu_ps(out[t].as_mut_ptr(), acc[t]);
        }
    }

    /// One Q4_1 group against T activation rows: `d·dy·Σq·qy + m·s` for 8 rows per register.
    // `b` indexes the packed blocks and every token's activation blocks at once.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn q4_1<D: Dot4, const T: usize>(p: &[u8], ys: [&[BlockQ8]; T], out: &mut [[f32; GROUP]]) {
        let nb = ys[0].len();
        assert!(p.len() >= nb * 160 && ys.iter().all(|y| y.len() == nb));
        let mask = _mm256_set1_epi8(15);
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..nb {
            let base = p.as_ptr().add(b * 160);
            if T >= PREFETCH_FROM {
                prefetch::<160>(base);
            }
            let mut isum = [_mm256_setzero_si256(); T];
            for k in 0..4 {
                let v = _mm256_loadu_si256(base.add(32 + 32 * k) as *const __m256i);
                let lo = _mm256_and_si256(v, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                for t in 0..T {
                    let q = ys[t][b].qs.as_ptr();
                    isum[t] = D::dot(isum[t], lo, bcast4(q.add(8 * k)));
                    isum[t] = D::dot(isum[t], hi, bcast4(q.add(8 * k + 4)));
                }
            }
            let d = _mm256_cvtph_ps(_mm_loadu_si128(base as *const __m128i));
            let m = _mm256_cvtph_ps(_mm_loadu_si128(base.add(16) as *const __m128i));
            for t in 0..T {
                let yb = &ys[t][b];
                let s = _mm256_cvtepi32_ps(D::finish(isum[t]));
                acc[t] = _mm256_fmadd_ps(s, _mm256_mul_ps(d, _mm256_set1_ps(yb.d)), acc[t]);
                acc[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(yb.s), acc[t]);
            }
        }
        store(&acc, out)
    }

    /// One Q8_0 group against T activation rows. Signed × signed through the unsigned-left-operand
    /// instructions: |w| times y carrying w's sign.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn q8_0<D: Dot4, const T: usize>(p: &[u8], ys: [&[BlockQ8]; T], out: &mut [[f32; GROUP]]) {
        let nb = ys[0].len();
        assert!(p.len() >= nb * 272 && ys.iter().all(|y| y.len() == nb));
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..nb {
            let base = p.as_ptr().add(b * 272);
            if T >= PREFETCH_FROM {
                prefetch::<272>(base);
            }
            let mut isum = [_mm256_setzero_si256(); T];
            for k in 0..8 {
                let w = _mm256_loadu_si256(base.add(16 + 32 * k) as *const __m256i);
                let aw = _mm256_sign_epi8(w, w);
                for t in 0..T {
                    let yk = bcast4(ys[t][b].qs.as_ptr().add(4 * k));
                    isum[t] = D::dot(isum[t], aw, _mm256_sign_epi8(yk, w));
                }
            }
            let d = _mm256_cvtph_ps(_mm_loadu_si128(base as *const __m128i));
            for t in 0..T {
                let s = _mm256_cvtepi32_ps(D::finish(isum[t]));
                acc[t] = _mm256_fmadd_ps(s, _mm256_mul_ps(d, _mm256_set1_ps(ys[t][b].d)), acc[t]);
            }
        }
        store(&acc, out)
    }

    // One `#[target_feature]` entry per (type, instruction set); the tile size picks a
    // monomorphized body, so every token count has its own unrolled register set. Safe wrappers
    // are handed out by `kernels` only after the CPU features were detected.
    macro_rules! entries {
        ($($name:ident: $body:ident<$d:ty>, $features:literal;)*) => {$(
            mod $name {
                use super::*;
                #[target_feature(enable = $features)]
                unsafe fn dot_impl(p: &[u8], ys: &[&[BlockQ8]], out: &mut [[f32; GROUP]]) {
                    assert_eq!(ys.len(), out.len(), "one output row per token");
                    match ys.len() {
                        1 => $body::<$d, 1>(p, ys.try_into().unwrap(), out),
                        2 => $body::<$d, 2>(p, ys.try_into().unwrap(), out),
                        3 => $body::<$d, 3>(p, ys.try_into().unwrap(), out),
                        4 => $body::<$d, 4>(p, ys.try_into().unwrap(), out),
                        5 => $body::<$d, 5>(p, ys.try_into().unwrap(), out),
                        6 => $body::<$d, 6>(p, ys.try_into().unwrap(), out),
                        7 => $body::<$d, 7>(p, ys.try_into().unwrap(), out),
                        8 => $body::<$d, 8>(p, ys.try_into().unwrap(), out),
                        n => panic!("packed kernel: {n} tokens, expected 1..={}", super::super::MAX_TOKENS),
                    }
                }
                pub fn dot(p: &[u8], ys: &[&[BlockQ8]], out: &mut [[f32; GROUP]]) {
                    unsafe { dot_impl(p, ys, out) }
                }
            }
        )*};
    }

    entries! {
        q4_1_avx2: q4_1<I16>, "avx2,fma,f16c";
        q4_1_vnni: q4_1<Vnni>, "avx2,fma,f16c,avx512vnni,avx512vl";
        q8_0_avx2: q8_0<I32>, "avx2,fma,f16c";
        q8_0_vnni: q8_0<Vnni>, "avx2,fma,f16c,avx512vnni,avx512vl";
    }

    pub fn kernels(dtype: GgmlType, vnni: bool) -> Option<GroupKernel> {
        Some(match (dtype, vnni) {
            (GgmlType::Q4_1, true) => GroupKernel { dot: q4_1_vnni::dot },
            (GgmlType::Q4_1, false) => GroupKernel { dot: q4_1_avx2::dot },
            (GgmlType::Q8_0, true) => GroupKernel { dot: q8_0_vnni::dot },
            (GgmlType::Q8_0, false) => GroupKernel { dot: q8_0_avx2::dot },
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "x86_64")]
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

    #[test]
    fn tiles_cover_every_token_once_evenly() {
        for n in 0..=40 {
            let t: Vec<(usize, usize)> = tiles(n).collect();
            assert_eq!(t.iter().map(|&(_, l)| l).sum::<usize>(), n, "n={n}");
            let mut next = 0;
            for &(s, l) in &t {
                assert_eq!(s, next, "n={n}: tiles are consecutive");
                assert!((1..=MAX_TOKENS).contains(&l), "n={n}: tile of {l}");
                next += l;
            }
            let (min, max) = (t.iter().map(|x| x.1).min(), t.iter().map(|x| x.1).max());
            assert!(max.unwrap_or(0) - min.unwrap_or(0) <= 1, "n={n}: uneven {t:?}");
        }
    }

    /// Every packed kernel this CPU can run, at every tile size 1..=8, equals the scalar kernel on
    /// the file-order rows, and each token's result is bit-identical whatever tile it is in (a
    /// sequence decoded in a batch must get the logits it gets alone).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn packed_kernels_match_scalar_rows() {
        if !simd::available() {
            eprintln!("skipped: this CPU has no AVX2/FMA/F16C");
            return;
        }
        let mut rng = Lcg(22);
        for vnni in [false, true] {
            if vnni && !simd::vnni() {
                eprintln!("skipped the VNNI kernels: this CPU has no AVX-512 VNNI");
                continue;
            }
            for t in [GgmlType::Q4_1, GgmlType::Q8_0] {
                let k = simd::kernels(t, vnni).unwrap();
                for nb in [1, 5, 18] {
                    let (rows, cols) = (24, nb * QK);
                    let data = random_blocks(t, rows * cols, &mut rng);
                    let p = Packed::new(t, rows, cols, &data);
                    let xq: Vec<Vec<BlockQ8>> = (0..MAX_TOKENS + 1)
                        .map(|i| {
                            // Varied magnitudes, including an all-zero row (d = 0).
                            let scale = if i == 3 { 0.0 } else { 0.5 + i as f32 };
                            let x: Vec<f32> = (0..cols).map(|_| rng.normal() * scale).collect();
                            let mut q = vec![BlockQ8::default(); nb];
                            quantize_row_q8(&x, &mut q);
                            q
                        })
                        .collect();
                    let rb = t.row_bytes(cols).unwrap();
                    for g in 0..rows / GROUP {
                        let blocks = p.group_blocks(g);
                        let alone: Vec<[f32; GROUP]> = xq
                            .iter()
                            .map(|y| {
                                let mut o = [[0.0; GROUP]];
                                (k.dot)(blocks, &[y], &mut o);
                                o[0]
                            })
                            .collect();
                        for (tok, (y, got)) in xq.iter().zip(&alone).enumerate() {
                            for (r, &got) in got.iter().enumerate() {
                                let row = g * GROUP + r;
                                let want = scalar_kernel(t)(&data[row * rb..(row + 1) * rb], y);
                                let tol = 1e-4 * want.abs().max(1.0);
                                assert!(
                                    (got - want).abs() <= tol,
                                    "{t} vnni={vnni} nb={nb} row {row} token {tok}: {got} vs {want}"
                                );
                            }
                        }
                        // Every tile size, starting at every offset that fits.
                        for len in 1..=MAX_TOKENS {
                            for start in 0..=xq.len() - len {
                                let ys: Vec<&[BlockQ8]> = xq[start..start + len].iter().map(|v| &v[..]).collect();
                                let mut out = vec![[f32::NAN; GROUP]; len];
                                (k.dot)(blocks, &ys, &mut out);
                                for (i, o) in out.iter().enumerate() {
                                    assert_eq!(
                                        *o,
                                        alone[start + i],
                                        "{t} vnni={vnni} nb={nb} tile {start}+{len}, token {i}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
