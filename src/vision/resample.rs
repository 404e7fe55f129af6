//! Pillow's `Image.resize(size, Image.BICUBIC)` for 8-bit RGB, reproduced bit for bit.
//!
//! Qwen2-VL was trained on images resized by Hugging Face's slow image processor, which hands
//! them to Pillow; a "bicubic" from another library (`image`'s CatmullRom, torchvision) differs
//! by a level or two on many pixels, enough to miss the goldens (1e-3 after normalization is
//! less than a tenth of one level). So this is Pillow's algorithm, arithmetic included:
//!
//! - separable convolution, horizontal pass first (into an 8-bit intermediate image), then
//!   vertical; a pass is skipped when that side keeps its size, and an image that keeps both
//!   is returned unchanged;
//! - the cubic kernel with a = −0.5 and support 2, stretched by the scale factor when
//!   downscaling (so every source pixel contributes: an antialiasing filter), sampled at pixel
//!   centres; the taps of each output pixel are normalized to sum to 1 in f64;
//! - taps converted to fixed point with 22 fractional bits (rounded away from zero),
//!   accumulated in i32 from a rounding bias of 2^21, shifted and clamped to 0..=255.
//!
//! Pillow up to 12.x always runs the horizontal pass first, and so do we. Pillow 13.0 (PR
//! #9549) runs the vertical pass first when the height shrinks more than the width, which
//! moves pixels near hard edges by up to ~15 levels in those cases; transformers 4.46.3
//! shipped in the Pillow 11 era, and Qwen2-VL was trained before the change.
//!
//! The only conceivable source of a difference is a C compiler contracting the f64 kernel
//! formula into fused multiply-adds (aarch64 builds may); that moves a tap by an ulp, which
//! changes a rounded 22-bit tap only if it sits within an ulp of a rounding boundary.

/// Fractional bits of the fixed-point taps: 32 bits less 8 for the pixel value and 2 of
/// headroom for taps that sum above 1 in magnitude (the cubic has negative lobes).
const PRECISION_BITS: u32 = 22;

/// The cubic convolution kernel (Keys, a = −0.5), support [−2, 2].
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The taps of a 1-D resampling from `in_size` to `out_size` samples: output `i` is the sum of
/// `taps[i * ksize + j] * input[first[i] + j]` for `j < count[i]`.
struct Taps {
    first: Vec<usize>,
    count: Vec<usize>,
    ksize: usize,
    taps: Vec<i32>,
}

impl Taps {
    fn new(in_size: usize, out_size: usize) -> Self {
        const SUPPORT: f64 = 2.0;
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = SUPPORT * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv = 1.0 / filterscale;
        let mut first = Vec::with_capacity(out_size);
        let mut count = Vec::with_capacity(out_size);
        let mut taps = vec![0i32; out_size * ksize];
        let mut weights = vec![0f64; ksize];
        for (i, row) in taps.chunks_exact_mut(ksize).enumerate() {
            let center = (i as f64 + 0.5) * scale;
            // `as` truncates toward zero, as C's (int) does; then clamp to the image.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = hi - lo;
            let mut sum = 0.0;
            for (j, w) in weights[..n].iter_mut().enumerate() {
                *w = bicubic(((j + lo) as f64 - center + 0.5) * inv);
                sum += *w;
            }
            for (t, &w) in row.iter_mut().zip(&weights[..n]) {
                let w = if sum != 0.0 { w / sum } else { w };
                let scaled = w * (1u32 << PRECISION_BITS) as f64;
                *t = if w < 0.0 { (scaled - 0.5) as i32 } else { (scaled + 0.5) as i32 };
            }
            first.push(lo);
            count.push(n);
        }
        Self { first, count, ksize, taps }
    }

    fn of(&self, i: usize) -> (usize, &[i32]) {
        (self.first[i], &self.taps[i * self.ksize..i * self.ksize + self.count[i]])
    }
}

/// An accumulated value back to 8 bits: drop the fraction (the bias added at the start makes
/// this a rounding) and clamp.
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const BIAS: i32 = 1 << (PRECISION_BITS - 1);

/// Resizes an RGB8 image (`rgb.len() == 3 * width * height`, rows top to bottom) to
/// `out_width × out_height` exactly as Pillow's BICUBIC resize does.
pub fn resize_bicubic_rgb8(rgb: &[u8], width: usize, height: usize, out_width: usize, out_height: usize) -> Vec<u8> {
    assert_eq!(rgb.len(), 3 * width * height, "RGB8 buffer size");
    assert!(width > 0 && height > 0 && out_width > 0 && out_height > 0, "empty image");
    let horizontal = out_width != width;
    let vertical = out_height != height;
    if !horizontal && !vertical {
        return rgb.to_vec();
    }

    let vtaps = vertical.then(|| Taps::new(height, out_height));
    // The horizontal pass only produces the source rows the vertical pass reads.
    let (row_lo, row_hi) = match &vtaps {
        Some(t) => (t.first[0], t.first[out_height - 1] + t.count[out_height - 1]),
        None => (0, height),
    };

    let tmp;
    let (src, src_width) = if horizontal {
        let taps = Taps::new(width, out_width);
        let mut out = vec![0u8; 3 * out_width * (row_hi - row_lo)];
        for (y, out_row) in out.chunks_exact_mut(3 * out_width).enumerate() {
            let in_row = &rgb[3 * width * (row_lo + y)..3 * width * (row_lo + y + 1)];
            for (x, px) in out_row.chunks_exact_mut(3).enumerate() {
                let (lo, k) = taps.of(x);
                let (mut r, mut g, mut b) = (BIAS, BIAS, BIAS);
                for (s, &t) in in_row[3 * lo..3 * (lo + k.len())].chunks_exact(3).zip(k) {
                    r += s[0] as i32 * t;
                    g += s[1] as i32 * t;
                    b += s[2] as i32 * t;
                }
                px.copy_from_slice(&[clip8(r), clip8(g), clip8(b)]);
            }
        }
        tmp = out;
        (&tmp[..], out_width)
    } else {
        (&rgb[3 * width * row_lo..3 * width * row_hi], width)
    };

    let Some(vtaps) = vtaps else { return src.to_vec() };
    let stride = 3 * src_width;
    let mut out = vec![0u8; stride * out_height];
    let mut acc = vec![0i32; stride];
    for (y, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (lo, k) = vtaps.of(y);
        let lo = lo - row_lo;
        acc.fill(BIAS);
        // Source row by source row: each pixel still sums its taps in Pillow's order, and
        // integer sums do not depend on how they are interleaved across pixels.
        for (j, &t) in k.iter().enumerate() {
            let in_row = &src[stride * (lo + j)..stride * (lo + j + 1)];
            for (a, &s) in acc.iter_mut().zip(in_row) {
                *a += s as i32 * t;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_is_keys_cubic() {
        assert_eq!(bicubic(0.0), 1.0);
        assert_eq!(bicubic(1.0), 0.0);
        assert_eq!(bicubic(2.0), 0.0);
        assert_eq!(bicubic(0.5), 0.5625);
        assert_eq!(bicubic(-1.5), -0.0625);
    }

    #[test]
    fn taps_sum_to_one_in_fixed_point() {
        for (i, o) in [(640, 476), (1000, 308), (29, 56), (150, 28), (7, 3)] {
            let t = Taps::new(i, o);
            for x in 0..o {
                let (lo, k) = t.of(x);
                assert!(lo + k.len() <= i);
                let sum: i32 = k.iter().sum();
                // Each tap is rounded separately: the sum is 2^22 within a few units.
                assert!((sum - (1 << PRECISION_BITS)).abs() <= k.len() as i32, "{i}->{o} at {x}: {sum}");
            }
        }
    }

    #[test]
    fn downscaling_widens_the_kernel() {
        // Upscaling: at most 4 taps (support 2 each side), window of 5 slots.
        assert_eq!(Taps::new(29, 56).ksize, 5);
        // 5.36x down: support 2 * 5.36 = 10.7 -> 11 each side.
        assert_eq!(Taps::new(150, 28).ksize, 23);
    }

    #[test]
    fn same_size_is_a_copy_and_flat_stays_flat() {
        let img: Vec<u8> = (0..3 * 5 * 4).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(resize_bicubic_rgb8(&img, 5, 4, 5, 4), img);
        let flat = vec![200u8; 3 * 33 * 17];
        for (w, h) in [(56, 28), (28, 56), (7, 5), (33, 40)] {
            assert!(resize_bicubic_rgb8(&flat, 33, 17, w, h).iter().all(|&v| v == 200), "{w}x{h}");
        }
    }

    #[test]
    fn overshoot_is_clamped() {
        // A hard 0 -> 255 edge upscaled: the cubic rings below 0 and above 255.
        let mut img = vec![0u8; 3 * 8];
        img[12..].fill(255);
        let out = resize_bicubic_rgb8(&img, 8, 1, 20, 1);
        // Pillow 11.0.0 gives the same row.
        let expected = [0, 0, 0, 0, 0, 0, 0, 0, 0, 66, 189, 255, 255, 255, 255, 255, 255, 255, 255, 255];
        assert_eq!(out.iter().step_by(3).copied().collect::<Vec<u8>>(), expected);
        assert!(out.chunks_exact(3).all(|p| p[0] == p[1] && p[1] == p[2]));
    }

    /// Values computed with Pillow 11.0.0 (13.0.0 agrees: one row has no vertical pass):
    /// `Image.frombytes("RGB", (6, 1), bytes(img)).resize((4, 1), Image.BICUBIC)` and
    /// `.resize((9, 1), …)`.
    #[test]
    fn matches_pillow_on_a_row() {
        let img: Vec<u8> = [10u8, 200, 30, 250, 0, 128].iter().flat_map(|&v| [v, 255 - v, v / 2]).collect();
        let down = resize_bicubic_rgb8(&img, 6, 1, 4, 1);
        let up = resize_bicubic_rgb8(&img, 6, 1, 9, 1);
        let red = |v: &[u8]| v.iter().step_by(3).copied().collect::<Vec<_>>();
        assert_eq!(red(&down), PILLOW_DOWN);
        assert_eq!(red(&up), PILLOW_UP);
    }
    /// 2-D cases where the pass order matters: a 12x10 pattern resized by Pillow 11.0.0 to
    /// each size, fingerprinted as (Σ v, Σ i·v) over the RGB bytes. Vertical-first (Pillow 13
    /// for the first case) would give (37329, 5438130), (17158, 1147877), (262715, 270322785).
    #[test]
    fn matches_pillow_in_2d() {
        let (w, h) = (12, 10);
        let mut img = Vec::new();
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    img.push(((x * 37 + y * 91 + c * 53 + (x * y) % 7 * 40) % 256) as u8);
                }
            }
        }
        let fingerprint = |v: &[u8]| {
            let sum: u64 = v.iter().map(|&b| u64::from(b)).sum();
            let weighted: u64 = v.iter().enumerate().map(|(i, &b)| i as u64 * u64::from(b)).sum();
            (sum, weighted)
        };
        assert_eq!(fingerprint(&resize_bicubic_rgb8(&img, w, h, 14, 7)), (37350, 5439701));
        assert_eq!(fingerprint(&resize_bicubic_rgb8(&img, w, h, 5, 9)), (17159, 1147833));
        assert_eq!(fingerprint(&resize_bicubic_rgb8(&img, w, h, 30, 23)), (262805, 270431056));
    }

    const PILLOW_DOWN: [u8; 4] = [82, 114, 145, 74];
    const PILLOW_UP: [u8; 9] = [0, 109, 188, 40, 145, 231, 25, 53, 136];
}
