//! Dequantization of every supported block type (the plain reference).
//!
//! This module is the oracle later fast paths (SIMD, fused dot products, CUDA) are tested
//! against, so it trades speed for being obviously correct: one block at a time, scalar code that
//! reads like the layout table in the shared model-formats reference, section 5.2 (sources: ggml
//! `ggml-common.h` block structs and `ggml-quants.c` `dequantize_row_*`).
//!
//! Rounding contract: every output is computed with the same f32 operations in the same order as
//! ggml's `dequantize_row_*` (for example Q4_1 is `(d * q) + m`, Q4_K is
//! `((d * sc) * q) - (dmin * mn)`), one IEEE rounding per operation and no fused multiply-add.
//! gguf-py's numpy dequantizers use the same order, and `tests/gguf.rs` checks that our output is
//! bit-identical to theirs for every type.
//!
//! Inputs are one row: `dst.len()` elements stored in exactly `dtype.row_bytes(dst.len())`
//! bytes. Callers validate tensor shapes when a file is loaded, so a mismatch here is a bug in
//! the caller and panics rather than returning an error.

use half::{bf16, f16};

use crate::backend::GgmlType;

/// Elements per block of the legacy types (Q4_0 … Q8_0).
const QK: usize = 32;
/// Elements per K-quant super-block.
const QK_K: usize = 256;

/// Dequantizes one row of `dtype` blocks from `src` into `dst`.
///
/// Panics if `src.len() != dtype.row_bytes(dst.len())` (including when `dst.len()` is not a
/// whole number of blocks).
pub fn dequantize_row(dtype: GgmlType, src: &[u8], dst: &mut [f32]) {
    match dtype {
        GgmlType::F32 => dequantize_f32(src, dst),
        GgmlType::F16 => dequantize_f16(src, dst),
        GgmlType::BF16 => dequantize_bf16(src, dst),
        GgmlType::Q4_0 => dequantize_q4_0(src, dst),
        GgmlType::Q4_1 => dequantize_q4_1(src, dst),
        GgmlType::Q5_0 => dequantize_q5_0(src, dst),
        GgmlType::Q5_1 => dequantize_q5_1(src, dst),
        GgmlType::Q8_0 => dequantize_q8_0(src, dst),
        GgmlType::Q4K => dequantize_q4_k(src, dst),
        GgmlType::Q5K => dequantize_q5_k(src, dst),
        GgmlType::Q6K => dequantize_q6_k(src, dst),
    }
}

/// The shared length invariant of every entry point; returns the block size in bytes.
fn check_row(dtype: GgmlType, src: &[u8], dst: &[f32]) -> usize {
    let expected = dtype.row_bytes(dst.len());
    assert!(
        expected == Some(src.len()),
        "dequantize {dtype}: {} source bytes for {} outputs, expected {} (block of {} elements in {} bytes)",
        src.len(),
        dst.len(),
        expected.map_or_else(|| "a whole number of blocks".to_string(), |n| n.to_string()),
        dtype.block_len(),
        dtype.block_bytes(),
    );
    dtype.block_bytes()
}

/// Reads the little-endian IEEE half at `b[i..i + 2]`.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

pub fn dequantize_f32(src: &[u8], dst: &mut [f32]) {
    let bytes = check_row(GgmlType::F32, src, dst);
    for (b, out) in src.chunks_exact(bytes).zip(dst.iter_mut()) {
        *out = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

pub fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    let bytes = check_row(GgmlType::F16, src, dst);
    for (b, out) in src.chunks_exact(bytes).zip(dst.iter_mut()) {
        *out = f16_at(b, 0);
    }
}

pub fn dequantize_bf16(src: &[u8], dst: &mut [f32]) {
    let bytes = check_row(GgmlType::BF16, src, dst);
    for (b, out) in src.chunks_exact(bytes).zip(dst.iter_mut()) {
        *out = bf16::from_le_bytes([b[0], b[1]]).to_f32();
    }
}

/// Block `{ f16 d; i8 qs[32] }`: `out[j] = d * qs[j]`.
pub fn dequantize_q8_0(src: &[u8], dst: &mut [f32]) {
    let bytes = check_row(GgmlType::Q8_0, src, dst);
    for (b, out) in src.chunks_exact(bytes).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        let qs = &b[2..2 + QK];
        for j in 0..QK {
            out[j] = d * f32::from(qs[j] as i8);
        }
    }
}

/// Block `{ f16 d; u8 qs[16] }`. Element `j` is the LOW nibble of `qs[j]` and element `j + 16`
/// the HIGH nibble of the same byte (not `2j` / `2j + 1`); both are offset by −8.
pub fn dequantize_q4_0(src: &[u8], dst: &mut [f32]) {
    let bytes = check_row(GgmlType::Q4_0, src, dst);
    for (b, out) in src.chunks_exact(bytes).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        let qs = &b[2..2 + QK / 2];
        for j in 0..QK / 2 {
            let lo = i32::from(qs[j] & 0x0F) - 8;
            let hi = i32::from(qs[j] >> 4) - 8;
            out[j] = d * lo as f32;
            out[j + QK / 2] = d * hi as f32;
        }
    }
}

/// Block `{ f16 d; f16 m; u8 qs[16] }`: `out = d * q + m` (the min is ADDED; it is usually
/// negative), nibble order as Q4_0.
pub fn dequantize_q4_1(src: &[u8], dst: &mut [f32]) {
    let bytes = check_row(GgmlType::Q4_1, src, dst);
    for (b, out) in src.chunks_exact(bytes).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let qs = &b[4..4 + QK / 2];
        for j in 0..QK / 2 {
            out[j] = d * f32::from(qs[j] & 0x0F) + m;
            out[j + QK / 2] = d * f32::from(qs[j] >> 4) + m;
        }
    }
}

/// The 5-bit values of one Q5 block: low nibbles as Q4_0, and bit `j` of the little-endian u32
/// `qh` is the 5th bit (value 16) of element `j`.
fn q5_values(qh: &[u8], qs: &[u8]) -> [u8; QK] {
    let h = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; QK];
    for j in 0..QK / 2 {
        let bit = |k: usize| ((h >> k) & 1) as u8;
        q[j] = (qs[j] & 0x0F) | (bit(j) << 4);
        q[j + QK / 2] = (qs[j] >> 4) | (bit(j + QK / 2) << 4);
    }
    q
}

/// Block `{ f16 d; u8 qh[4]; u8 qs[16] }`: `out = d * (q − 16)`.
pub fn dequantize_q5_0(src: &[u8], dst: &mut [f32]) {
    let bytes = check_row(GgmlType::Q5_0, src, dst);
    for (b, out) in src.chunks_exact(bytes).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        let q = q5_values(&b[2..6], &b[6..6 + QK / 2]);
        for j in 0..QK {
            out[j] = d * (i32::from(q[j]) - 16) as f32;
        }
    }
}

/// Block `{ f16 d; f16 m; u8 qh[4]; u8 qs[16] }`: `out = d * q + m`.
pub fn dequantize_q5_1(src: &[u8], dst: &mut [f32]) {
    let bytes = check_row(GgmlType::Q5_1, src, dst);
    for (b, out) in src.chunks_exact(bytes).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let q = q5_values(&b[4..8], &b[8..8 + QK / 2]);
        for j in 0..QK {
            out[j] = d * f32::from(q[j]) + m;
        }
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit (scale, min) of sub-block `j` (0..8) from the 12 packed
/// bytes. Bytes 0..4 hold scales 0..3 and bytes 4..8 mins 0..3 in their low 6 bits; sub-blocks
/// 4..7 keep their low 4 bits in bytes 8..12 (scale low nibble, min high nibble) and their top 2
/// bits in the top bits of bytes `j − 4` (scale) and `j` (min). Using `j − 4` for the min too is
/// a known porting bug.
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        let sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        let mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        (sc, mn)
    }
}

/// Super-block `{ f16 d; f16 dmin; u8 scales[12]; u8 qs[128] }`, 8 sub-blocks of 32. Each 32-byte
/// run of `qs` serves two sub-blocks: sub-block `2c` from the low nibbles, `2c + 1` from the high.
pub fn dequantize_q4_k(src: &[u8], dst: &mut [f32]) {
    let bytes = check_row(GgmlType::Q4K, src, dst);
    for (b, out) in src.chunks_exact(bytes).zip(dst.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 0);
        let dmin = f16_at(b, 2);
        let scales = &b[4..16];
        let qs = &b[16..16 + QK_K / 2];
        for c in 0..4 {
            let (sc0, mn0) = scale_min_k4(2 * c, scales);
            let (sc1, mn1) = scale_min_k4(2 * c + 1, scales);
            let (d0, m0) = (d * f32::from(sc0), dmin * f32::from(mn0));
            let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(mn1));
            let q = &qs[32 * c..32 * c + 32];
            for l in 0..32 {
                out[64 * c + l] = d0 * f32::from(q[l] & 0x0F) - m0;
                out[64 * c + 32 + l] = d1 * f32::from(q[l] >> 4) - m1;
            }
        }
    }
}

/// Super-block `{ f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128] }`: Q4_K plus a 5th bit
/// (value 16) for output `l` of sub-block `s` in bit `s` of `qh[l]`.
pub fn dequantize_q5_k(src: &[u8], dst: &mut [f32]) {
    let bytes = check_row(GgmlType::Q5K, src, dst);
    for (b, out) in src.chunks_exact(bytes).zip(dst.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 0);
        let dmin = f16_at(b, 2);
        let scales = &b[4..16];
        let qh = &b[16..48];
        let qs = &b[48..48 + QK_K / 2];
        for c in 0..4 {
            let (sc0, mn0) = scale_min_k4(2 * c, scales);
            let (sc1, mn1) = scale_min_k4(2 * c + 1, scales);
            let (d0, m0) = (d * f32::from(sc0), dmin * f32::from(mn0));
            let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(mn1));
            let q = &qs[32 * c..32 * c + 32];
            for l in 0..32 {
                let h0 = ((qh[l] >> (2 * c)) & 1) << 4;
                let h1 = ((qh[l] >> (2 * c + 1)) & 1) << 4;
                out[64 * c + l] = d0 * f32::from((q[l] & 0x0F) | h0) - m0;
                out[64 * c + 32 + l] = d1 * f32::from((q[l] >> 4) | h1) - m1;
            }
        }
    }
}

/// Super-block `{ u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d }` (d is LAST), 16 sub-blocks of
/// 16 with signed 8-bit scales; values are 6-bit, offset by −32. Each half of 128 outputs uses 64
/// bytes of `ql` (low nibbles → outputs 0..64, high nibbles → 64..128) and 32 bytes of `qh`
/// (2-bit fields at shifts 0, 2, 4, 6 for the four 32-output quarters).
pub fn dequantize_q6_k(src: &[u8], dst: &mut [f32]) {
    let bytes = check_row(GgmlType::Q6K, src, dst);
    for (b, out) in src.chunks_exact(bytes).zip(dst.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 208);
        for n in 0..2 {
            let ql = &b[64 * n..64 * n + 64];
            let qh = &b[128 + 32 * n..128 + 32 * n + 32];
            let sc = &b[192 + 8 * n..192 + 8 * n + 8];
            let out = &mut out[128 * n..128 * n + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = i32::from((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
                let q2 = i32::from((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
                let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                let s = |k: usize| d * f32::from(sc[k] as i8);
                out[l] = s(is) * q1 as f32;
                out[l + 32] = s(is + 2) * q2 as f32;
                out[l + 64] = s(is + 4) * q3 as f32;
                out[l + 96] = s(is + 6) * q4 as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    fn deq(dtype: GgmlType, src: &[u8]) -> Vec<f32> {
        let n = src.len() / dtype.block_bytes() * dtype.block_len();
        let mut out = vec![f32::NAN; n];
        dequantize_row(dtype, src, &mut out);
        out
    }

    #[test]
    fn plain_float_types() {
        let mut f32s = Vec::new();
        for x in [1.0f32, -2.5, 3.0e38, f32::MIN_POSITIVE / 4.0] {
            f32s.extend_from_slice(&x.to_le_bytes());
        }
        assert_eq!(deq(GgmlType::F32, &f32s), [1.0, -2.5, 3.0e38, f32::MIN_POSITIVE / 4.0]);

        // 0x3C00 = 1.0, 0xC100 = -2.5, 0x7BFF = 65504 (max half), 0x0001 = 2^-24 (min subnormal),
        // 0xFC00 = -inf.
        let f16s = [0x00, 0x3C, 0x00, 0xC1, 0xFF, 0x7B, 0x01, 0x00, 0x00, 0xFC];
        assert_eq!(deq(GgmlType::F16, &f16s), [1.0, -2.5, 65504.0, 2f32.powi(-24), f32::NEG_INFINITY]);

        // bf16 is the top half of an f32: 0x3F80 = 1.0, 0xC020 = -2.5, 0x0001 = 2^-133.
        let bf16s = [0x80, 0x3F, 0x20, 0xC0, 0x01, 0x00];
        assert_eq!(deq(GgmlType::BF16, &bf16s), [1.0, -2.5, f32::from_bits(0x0001_0000)]);
    }

    #[test]
    fn q8_0_is_signed_bytes_times_d() {
        let mut b = h(0.25).to_vec();
        let qs: Vec<i8> = (0..32).map(|j| (j as i8 - 16) * 8).collect();
        b.extend(qs.iter().map(|&q| q as u8));
        b[2] = 0x80; // -128
        b[33] = 0x7F; // 127
        let out = deq(GgmlType::Q8_0, &b);
        assert_eq!(out[0], -32.0);
        assert_eq!(out[1], -30.0); // (1 - 16) * 8 * 0.25
        assert_eq!(out[16], 0.0);
        assert_eq!(out[31], 31.75);
    }

    #[test]
    fn q4_0_low_nibble_is_j_high_nibble_is_j_plus_16() {
        let mut b = h(0.5).to_vec();
        // Byte j: low nibble j (element j), high nibble 15 - j (element j + 16).
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let out = deq(GgmlType::Q4_0, &b);
        assert_eq!(out[0], -4.0); // (0 - 8) * 0.5
        assert_eq!(out[1], -3.5); // would be 3.5 with the wrong (2j, 2j+1) order
        assert_eq!(out[15], 3.5);
        assert_eq!(out[16], 3.5); // (15 - 8) * 0.5
        assert_eq!(out[31], -4.0);
        for j in 0..16 {
            assert_eq!(out[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(out[j + 16], (7.0 - j as f32) * 0.5);
        }
    }

    #[test]
    fn q4_1_adds_the_min() {
        let mut b = [h(2.0), h(-1.5)].concat();
        b.extend((0..16u8).map(|j| j | (0xF << 4)));
        let out = deq(GgmlType::Q4_1, &b);
        assert_eq!(out[0], -1.5);
        assert_eq!(out[3], 4.5); // 2 * 3 - 1.5
        assert_eq!(out[16], 28.5); // 2 * 15 - 1.5
        assert_eq!(out[31], 28.5);
    }

    #[test]
    fn q5_0_fifth_bit_comes_from_qh_bit_j() {
        let mut b = h(1.0).to_vec();
        // qh = 0x8000_0001 as LE u32: bits 0 and 31 set → elements 0 and 31 get +16.
        b.extend_from_slice(&[0x01, 0x00, 0x00, 0x80]);
        b.extend(std::iter::repeat_n(0x21u8, 16)); // low nibble 1, high nibble 2
        let out = deq(GgmlType::Q5_0, &b);
        assert_eq!(out[0], 1.0); // 1 + 16 - 16
        assert_eq!(out[1], -15.0); // 1 - 16
        assert_eq!(out[16], -14.0); // 2 - 16
        assert_eq!(out[31], 2.0); // 2 + 16 - 16
    }

    #[test]
    fn q5_1_is_d_times_q_plus_m() {
        let mut b = [h(0.5), h(-4.0)].concat();
        // Bit 16 of qh (byte 2, bit 0) → element 16 gets +16.
        b.extend_from_slice(&[0x00, 0x00, 0x01, 0x00]);
        b.extend(std::iter::repeat_n(0xF3u8, 16)); // low 3, high 15
        let out = deq(GgmlType::Q5_1, &b);
        assert_eq!(out[0], -2.5); // 0.5 * 3 - 4
        assert_eq!(out[16], 11.5); // 0.5 * 31 - 4
        assert_eq!(out[17], 3.5); // 0.5 * 15 - 4
    }

    /// Packs 6-bit scales and mins as the layout text in `scale_min_k4` describes (the
    /// inverse, written from the documented layout rather than from the decoder).
    fn pack_k4(sc: [u8; 8], mn: [u8; 8]) -> [u8; 12] {
        let mut s = [0u8; 12];
        for j in 0..4 {
            s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
            s[j + 8] = (sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4);
        }
        s
    }

    #[test]
    fn k4_scale_min_unpacking() {
        // Hand-packed: sub-block 4 has scale 0b10_0101 = 37 and min 0b01_1010 = 26; sub-block 0 has
        // scale 5 and min 9. Byte 0 = scale0 | top2(scale4) << 6, byte 4 = min0 | top2(min4) << 6,
        // byte 8 = low4(scale4) | low4(min4) << 4.
        let mut s = [0u8; 12];
        s[0] = 5 | (0b10 << 6);
        s[4] = 9 | (0b01 << 6);
        s[8] = 0b0101 | (0b1010 << 4);
        assert_eq!(scale_min_k4(0, &s), (5, 9));
        assert_eq!(scale_min_k4(4, &s), (37, 26));

        let sc = [1, 22, 63, 40, 37, 0, 63, 17];
        let mn = [63, 0, 12, 33, 26, 48, 5, 63];
        let s = pack_k4(sc, mn);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &s), (sc[j], mn[j]), "sub-block {j}");
        }
    }

    #[test]
    fn q4_k_sub_blocks_and_nibbles() {
        let sc = [1, 2, 3, 4, 5, 6, 7, 63];
        let mn = [0, 1, 2, 3, 4, 5, 6, 40];
        let mut b = [h(0.5), h(0.25)].concat();
        b.extend_from_slice(&pack_k4(sc, mn));
        // qs[32c + l]: low nibble (l % 16), high nibble 15 - (l % 16).
        b.extend((0..128).map(|i| (i % 16) as u8 | ((15 - (i % 16) as u8) << 4)));
        let out = deq(GgmlType::Q4K, &b);
        assert_eq!(out.len(), 256);
        for c in 0..4 {
            for l in 0..32 {
                let lo = (l % 16) as f32;
                let hi = 15.0 - lo;
                let (s0, m0) = (sc[2 * c] as f32, mn[2 * c] as f32);
                let (s1, m1) = (sc[2 * c + 1] as f32, mn[2 * c + 1] as f32);
                assert_eq!(out[64 * c + l], 0.5 * s0 * lo - 0.25 * m0, "c={c} l={l}");
                assert_eq!(out[64 * c + 32 + l], 0.5 * s1 * hi - 0.25 * m1, "c={c} l={l}");
            }
        }
        // Last output: sub-block 7, high nibble of qs[127] = 15 - 15 = 0 → -dmin * 40.
        assert_eq!(out[255], -10.0);
    }

    #[test]
    fn q5_k_high_bits() {
        let sc = [1; 8];
        let mn = [0; 8];
        let mut b = [h(1.0), h(0.0)].concat();
        b.extend_from_slice(&pack_k4(sc, mn));
        // qh[l] = bit (l % 8): output l of sub-block s gets +16 iff s == l % 8.
        b.extend((0..32).map(|l| 1u8 << (l % 8)));
        b.extend(std::iter::repeat_n(0x00u8, 128));
        let out = deq(GgmlType::Q5K, &b);
        for s in 0..8 {
            for l in 0..32 {
                let want = if s == l % 8 { 16.0 } else { 0.0 };
                assert_eq!(out[32 * s + l], want, "sub-block {s} element {l}");
            }
        }
    }

    #[test]
    fn q6_k_layout() {
        let mut b = vec![0u8; 210];
        // Sub-block scales 1..=16 except scale 0 = -2 (signed).
        for k in 0..16 {
            b[192 + k] = (k as i8 + 1) as u8;
        }
        b[192] = (-2i8) as u8;
        b[208..210].copy_from_slice(&h(0.5));
        // Output 0: ql[0] low = 15, qh[128] bits 0..2 = 3 → q = 63 - 32 = 31, scale -2.
        b[0] = 0x0F;
        b[128] = 0b0000_0011;
        // Output 64 + 1 (third quarter, l = 1): ql[1] high nibble = 2, qh[129] bits 4..6 = 1
        // → q = 2 | 16 = 18 - 32 = -14, scale index 0 + 4 = 4 → 5.
        b[1] = 0x20;
        b[129] = 0b0001_0000;
        // Output 128 + 32 + 20 (second half, second quarter, l = 20): ql[64 + 52] low = 7,
        // qh[128 + 32 + 20] bits 2..4 = 2 → q = 7 | 32 = 39 - 32 = 7, scale 8 + 1 + 2 = 11 → 12.
        b[64 + 52] = 0x07;
        b[128 + 32 + 20] = 0b0000_1000;
        let out = deq(GgmlType::Q6K, &b);
        assert_eq!(out[0], 0.5 * -2.0 * 31.0);
        assert_eq!(out[65], 0.5 * 5.0 * -14.0);
        assert_eq!(out[128 + 32 + 20], 0.5 * 12.0 * 7.0);
        // Everything else has q = 0 - 32 with the scale of its sub-block (16 outputs each).
        for (i, &v) in out.iter().enumerate() {
            if [0, 65, 180].contains(&i) {
                continue;
            }
            let scale = if i < 16 { -2.0 } else { (i / 16 + 1) as f32 };
            assert_eq!(v, 0.5 * scale * -32.0, "output {i}");
        }
    }

    #[test]
    fn multiple_blocks_advance_through_the_row() {
        let mut b = Vec::new();
        for d in [1.0f32, -2.0, 4.0] {
            b.extend_from_slice(&h(d));
            b.extend(std::iter::repeat_n(1u8, 32));
        }
        let out = deq(GgmlType::Q8_0, &b);
        assert_eq!(out.len(), 96);
        assert!(out[..32].iter().all(|&x| x == 1.0));
        assert!(out[32..64].iter().all(|&x| x == -2.0));
        assert!(out[64..].iter().all(|&x| x == 4.0));
    }

    #[test]
    fn empty_row_is_fine() {
        for t in GgmlType::ALL {
            dequantize_row(t, &[], &mut []);
        }
    }

    #[test]
    #[should_panic(expected = "dequantize Q4_1: 19 source bytes for 32 outputs, expected 20")]
    fn wrong_source_length_panics() {
        let mut out = [0.0f32; 32];
        dequantize_row(GgmlType::Q4_1, &[0u8; 19], &mut out);
    }

    #[test]
    #[should_panic(expected = "expected a whole number of blocks")]
    fn partial_block_panics() {
        let mut out = [0.0f32; 31];
        dequantize_row(GgmlType::Q8_0, &[0u8; 34], &mut out);
    }
}
