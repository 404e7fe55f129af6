//! The CPU backend: host tensors, rayon over rows, block-wise quantized dot products.
//!
//! `reference` holds the plain semantics of every op; the [`Backend`] impl here is the fast path,
//! tested against it in `tests` below. The thread pool is this backend's own, sized to physical
//! cores (more threads than cores make llama.cpp-style kernels collapse: measured 13 tok/s with 4
//! threads on 2 cores vs 90+ with 2), and a forward pass enters it once via [`Backend::run`].

#[cfg(target_arch = "x86_64")]
mod attn_simd;
pub mod blocks;
pub mod dot;
pub mod packed;
pub mod reference;
#[cfg(test)]
pub(crate) mod test_util;
mod tower;

use rayon::prelude::*;

use self::blocks::dequantize_row;
use self::dot::{dot_q8_kernel, dot_q8_x4_kernel, quantize_row_q8, uses_q8_activations, BlockQ8, QK};
use self::packed::Packed;
use super::{AttnSeq, Backend, BackendError, Gelu, GgmlType, QkvLayout, Rope, RopeStyle};
use crate::model::weights::awq::AwqMatrix;

/// A host activation matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

/// A weight matrix in its file's storage type; rows are contiguous runs of blocks.
#[derive(Debug)]
pub struct CpuWeight {
    /// The GGUF storage type; for an AWQ weight F16, the type its dequantized values have.
    pub dtype: GgmlType,
    pub rows: usize,
    pub cols: usize,
    row_bytes: usize,
    /// File-order rows; empty when the weight lives in `packed` instead.
    data: Vec<u8>,
    packed: Option<Packed>,
    /// AWQ 4-bit rows (then `data` is empty): dequantized row by row, exactly, into f32.
    awq: Option<Box<AwqMatrix>>,
}

impl CpuWeight {
    /// Row `r` in file layout (file-order weights only).
    fn row(&self, r: usize) -> &[u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Row `r` dequantized, whichever layout holds it.
    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if let Some(m) = &self.awq {
            return m.dequantize_row(r, out);
        }
        match &self.packed {
            Some(p) => dequantize_row(self.dtype, &p.raw_row(r), out),
            None => dequantize_row(self.dtype, self.row(r), out),
        }
    }
}

/// K or V rows of one layer, one row of `cols` values per cache slot: f16 with `Precision::Q8`
/// (llama.cpp's default cache type: half the memory traffic of attention, which dominates
/// decoding many sequences at once), f32 with `Precision::F32` (the exact model).
#[derive(Debug)]
pub struct CpuKv {
    data: KvData,
    cols: usize,
}

#[derive(Debug)]
enum KvData {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
}

impl CpuKv {
    /// `d` values of `slot`'s row from column `off`, as f32.
    fn row_into(&self, slot: u32, off: usize, buf: &mut [f32]) {
        let s = slot as usize * self.cols + off;
        match &self.data {
            KvData::F32(v) => buf.copy_from_slice(&v[s..s + buf.len()]),
            KvData::F16(v) => {
                use half::slice::HalfFloatSliceExt;
                v[s..s + buf.len()].convert_to_f32_slice(buf)
            }
        }
    }

    /// Stores `values` (one row per slot) from slot `first` on.
    fn write(&mut self, first: usize, values: &[f32]) {
        let s = first * self.cols;
        match &mut self.data {
            KvData::F32(v) => v[s..s + values.len()].copy_from_slice(values),
            KvData::F16(v) => {
                use half::slice::HalfFloatSliceExt;
                v[s..s + values.len()].convert_from_f32_slice(values)
            }
        }
    }

    /// Every value, as f32 (tests compare against the reference with what was stored).
    #[cfg(test)]
    fn to_f32(&self) -> Vec<f32> {
        let len = match &self.data {
            KvData::F32(v) => v.len(),
            KvData::F16(v) => v.len(),
        };
        let mut out = vec![0.0; len];
        for (slot, row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.row_into(slot as u32, 0, row);
        }
        out
    }
}

/// What `linear` multiplies quantized weights with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// Activations quantized to 8 bits per 32-block, integer dot products (llama.cpp's scheme):
    /// fastest. Logits deviate from the exact model by rounding noise (measured ±0.8 on
    /// SmolLM2 logits, the same spread llama.cpp shows), so near-tied greedy choices can flip.
    #[default]
    Q8,
    /// f32 activations times weights dequantized block by block: the exact model (matches an
    /// f32 evaluation of the dequantized weights to ~1e-5), slower.
    F32,
}

pub struct CpuBackend {
    pool: rayon::ThreadPool,
    precision: Precision,
}

impl CpuBackend {
    /// A backend with its own pool of `threads` workers (use the number of physical cores).
    pub fn new(threads: usize) -> Self {
        Self::with_precision(threads, Precision::default())
    }

    pub fn with_precision(threads: usize, precision: Precision) -> Self {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("zoe-cpu-{i}"))
            .build()
            .expect("spawning CPU worker threads");
        Self { pool, precision }
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }
}

/// Output rows handed to one task in `linear`: enough work to amortize scheduling, few enough
/// that both cores of a small model's 192-row projections get work.
const ROWS_PER_TASK: usize = 16;
/// Tokens one weight row is dotted with before the next row (the f32 path): a tile of the
/// activations stays in cache while the task's weight rows stream past it (a vision tower's
/// thousands of rows would otherwise be re-read from memory for every weight row).
const TOKEN_TILE: usize = 32;

/// Shares a raw output pointer across tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// # Safety
    /// `i` is in bounds and no other task writes element `i`.
    unsafe fn write(self, i: usize, v: f32) {
        *self.0.add(i) = v;
    }

    /// # Safety
    /// `i..i + 8` is in bounds and no other task writes those elements.
    unsafe fn write_group(self, i: usize, v: &[f32; packed::GROUP]) {
        std::ptr::copy_nonoverlapping(v.as_ptr(), self.0.add(i), packed::GROUP);
    }
}

/// Sum of products in 8 independent lanes so the compiler can vectorize (a single f32
/// accumulator forces sequential adds).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let scale = 1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type KvLayer = CpuKv;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn sibling(&self) -> Result<Self, BackendError> {
        Ok(Self::with_precision(self.threads(), self.precision))
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    fn zeros(&self, rows: usize, cols: usize) -> CpuTensor {
        CpuTensor { data: vec![0.0; rows * cols], rows, cols }
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> CpuTensor {
        assert_eq!(data.len(), rows * cols);
        CpuTensor { data: data.to_vec(), rows, cols }
    }

    fn download(&self, t: &CpuTensor) -> Vec<f32> {
        t.data.clone()
    }

    fn shape(&self, t: &CpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn weight(
        &self,
        name: &str,
        dtype: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<CpuWeight, BackendError> {
        let row_bytes = super::weight_row_bytes(name, dtype, rows, cols, bytes)?;
        // Repacked for the 8-row kernels when this CPU has them; the file layout is then dropped
        // (the packed form gives rows back for lookups), so memory does not double.
        if self.precision == Precision::Q8 && rows.is_multiple_of(packed::GROUP) && packed::kernel(dtype).is_some() {
            let p = Packed::new(dtype, rows, cols, bytes);
            return Ok(CpuWeight { dtype, rows, cols, row_bytes, data: Vec::new(), packed: Some(p), awq: None });
        }
        Ok(CpuWeight { dtype, rows, cols, row_bytes, data: bytes.to_vec(), packed: None, awq: None })
    }

    fn awq_weight(&self, name: &str, m: AwqMatrix) -> Result<CpuWeight, BackendError> {
        AwqMatrix::check_shape(m.n, m.k, m.group)
            .map_err(|reason| BackendError::BadWeight { name: name.into(), reason })?;
        // Fast path: AWQ rows are Q4_1 blocks in disguise (`s·(q − z) = d·q + m` with d = s,
        // m = −z·s), so `Q8` runs them on the packed integer kernels. Only `m` is rounded (to
        // f16, ≤ 2^-11 relative of z·s), far below the 8-bit activations' own noise; `F32` keeps
        // the exact path, the oracle of the CUDA engine.
        if self.precision == Precision::Q8 && m.group.is_multiple_of(QK) {
            return self.weight(name, GgmlType::Q4_1, m.n, m.k, &m.to_q4_1());
        }
        let (rows, cols) = (m.n, m.k);
        let row_bytes = cols / 2;
        Ok(CpuWeight {
            dtype: GgmlType::F16,
            rows,
            cols,
            row_bytes,
            data: Vec::new(),
            packed: None,
            awq: Some(Box::new(m)),
        })
    }

    fn kv_layer(&self, slots: usize, kv_cols: usize) -> Result<CpuKv, BackendError> {
        let n = slots.saturating_mul(kv_cols);
        let oom = || BackendError::OutOfMemory {
            what: format!("KV cache of {slots} slots"),
            bytes: n.saturating_mul(self.kv_value_bytes()),
        };
        let data = match self.precision {
            Precision::F32 => {
                let mut v = Vec::new();
                v.try_reserve_exact(n).map_err(|_| oom())?;
                v.resize(n, 0.0);
                KvData::F32(v)
            }
            Precision::Q8 => {
                let mut v = Vec::new();
                v.try_reserve_exact(n).map_err(|_| oom())?;
                v.resize(n, half::f16::ZERO);
                KvData::F16(v)
            }
        };
        Ok(CpuKv { data, cols: kv_cols })
    }

    fn weight_bytes(&self, w: &CpuWeight) -> usize {
        match &w.awq {
            Some(m) => m.stored_bytes(),
            None => w.rows * w.row_bytes,
        }
    }

    fn copy_bandwidth(&self) -> f64 {
        // 256 MiB, far beyond any cache; copied by every worker at once in slices, best of 5.
        let n = 256 << 20;
        let src = vec![1u8; n];
        let mut dst = vec![0u8; n];
        let chunk = n / self.threads();
        let best = (0..5)
            .map(|_| {
                let t = std::time::Instant::now();
                self.pool.install(|| {
                    dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s))
                });
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        std::hint::black_box(&dst);
        2.0 * n as f64 / best
    }

    fn kv_value_bytes(&self) -> usize {
        match self.precision {
            Precision::F32 => 4,
            Precision::Q8 => 2,
        }
    }

    fn embedding(&self, table: &CpuWeight, ids: &[u32], out: &mut CpuTensor) {
        assert_eq!((out.rows, out.cols), (ids.len(), table.cols));
        for (&id, o) in ids.iter().zip(out.data.chunks_mut(table.cols)) {
            table.dequantize_row(id as usize, o);
        }
    }

    fn linear(&self, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuTensor>, out: &mut CpuTensor, col0: usize) {
        let (n, k, m) = (x.rows, x.cols, w.rows);
        assert_eq!(k, w.cols, "linear: x has {k} columns, weight has {}", w.cols);
        // The raw-pointer stores below rely on these: tensor fields are public, so check them.
        assert!(out.rows == n && out.cols >= col0 + m, "linear: output too small");
        assert!(out.data.len() == out.rows * out.cols && x.data.len() == n * k, "linear: tensor data/shape mismatch");
        let oc = out.cols;
        let bias = bias.map(|b| &b.data[..m]);
        let ptr = SyncPtr(out.data.as_mut_ptr());
        // About 8 tasks per thread (load balance) but at least ROWS_PER_TASK rows each, a multiple
        // of 8 for the four-row and 8-row-group kernels: a 49k-row head is ~16 tasks, not 3000.
        let rows_per_task = (m.div_ceil(8 * self.threads())).max(ROWS_PER_TASK).next_multiple_of(packed::GROUP);
        let tasks = m.div_ceil(rows_per_task);
        // Each task owns output columns [j0, j1) of every row: disjoint writes through `ptr`.
        let store = move |t: usize, j: usize, v: f32| unsafe { ptr.write(t * oc + col0 + j, v) };
        // AWQ weights always take the exact f32 path: the CPU is their oracle.
        if self.precision == Precision::Q8 && w.awq.is_none() && uses_q8_activations(w.dtype) {
            let nb = k / QK;
            let mut xq = vec![BlockQ8::default(); n * nb];
            xq.par_chunks_mut(nb).zip(x.data.par_chunks(k)).for_each(|(q, xr)| quantize_row_q8(xr, q));
            if let (Some(p), Some(kern)) = (&w.packed, packed::kernel(w.dtype)) {
                const G: usize = packed::GROUP;
                let xrows: Vec<&[BlockQ8]> = xq.chunks_exact(nb).collect();
                // Up to 8 tokens per pass over a group: a decode batch of 8 reads each weight
                // once per step.
                let tiles: Vec<(usize, usize)> = packed::tiles(n).collect();
                // Tasks own whole 8-row groups: rows_per_task is a multiple of 8 when packed.
                (0..tasks).into_par_iter().for_each(|c| {
                    let mut vals = [[0.0f32; G]; packed::MAX_TOKENS];
                    for g in c * rows_per_task / G..((c + 1) * rows_per_task).min(m) / G {
                        let blocks = p.group_blocks(g);
                        let j0 = g * G;
                        for &(t0, len) in &tiles {
                            let vals = &mut vals[..len];
                            (kern.dot)(blocks, &xrows[t0..t0 + len], vals);
                            for (t, v) in (t0..).zip(vals.iter_mut()) {
                                if let Some(b) = bias {
                                    for (v, b) in v.iter_mut().zip(&b[j0..j0 + G]) {
                                        *v += b;
                                    }
                                }
                                // Output columns j0..j0+8 of token t belong to this task alone.
                                unsafe { ptr.write_group(t * oc + col0 + j0, v) };
                            }
                        }
                    }
                });
                return;
            }
            let (one, four) = (dot_q8_kernel(w.dtype), dot_q8_x4_kernel(w.dtype));
            (0..tasks).into_par_iter().for_each(|c| {
                let (j0, j1) = (c * rows_per_task, ((c + 1) * rows_per_task).min(m));
                let mut j = j0;
                while j + 4 <= j1 {
                    let rows = [w.row(j), w.row(j + 1), w.row(j + 2), w.row(j + 3)];
                    for (t, xr) in xq.chunks_exact(nb).enumerate() {
                        for (r, v) in four(rows, xr).into_iter().enumerate() {
                            store(t, j + r, v + bias.map_or(0.0, |b| b[j + r]));
                        }
                    }
                    j += 4;
                }
                for j in j..j1 {
                    let wr = w.row(j);
                    let b = bias.map_or(0.0, |b| b[j]);
                    for (t, xr) in xq.chunks_exact(nb).enumerate() {
                        store(t, j, one(wr, xr) + b);
                    }
                }
            });
        } else {
            // f32 activations: one weight row at a time is dequantized into a task-local buffer
            // and dotted with a tile of tokens (never the whole matrix).
            (0..tasks).into_par_iter().for_each(|c| {
                let mut row = vec![0.0f32; k];
                for t0 in (0..n).step_by(TOKEN_TILE) {
                    let tile = &x.data[t0 * k..(t0 + TOKEN_TILE).min(n) * k];
                    for j in c * rows_per_task..((c + 1) * rows_per_task).min(m) {
                        w.dequantize_row(j, &mut row);
                        let b = bias.map_or(0.0, |b| b[j]);
                        for (t, xr) in (t0..).zip(tile.chunks_exact(k)) {
                            store(t, j, dot(&row, xr) + b);
                        }
                    }
                }
            });
        }
    }

    fn rms_norm(&self, x: &CpuTensor, weight: &CpuTensor, eps: f32, out: &mut CpuTensor) {
        let c = x.cols;
        assert_eq!((out.rows, out.cols, weight.data.len()), (x.rows, c, c));
        out.data.par_chunks_mut(c).zip(x.data.par_chunks(c)).for_each(|(o, xr)| rms_norm_row(xr, &weight.data, eps, o));
    }

    fn add_rms_norm(&self, residual: &mut CpuTensor, x: &CpuTensor, weight: &CpuTensor, eps: f32, out: &mut CpuTensor) {
        let c = x.cols;
        assert_eq!((residual.rows, residual.cols), (x.rows, c));
        assert_eq!((out.rows, out.cols, weight.data.len()), (x.rows, c, c));
        residual.data.par_chunks_mut(c).zip(x.data.par_chunks(c)).zip(out.data.par_chunks_mut(c)).for_each(
            |((r, xr), o)| {
                for (a, b) in r.iter_mut().zip(xr) {
                    *a += b;
                }
                rms_norm_row(r, &weight.data, eps, o);
            },
        );
    }

    fn add(&self, acc: &mut CpuTensor, x: &CpuTensor) {
        assert_eq!((acc.rows, acc.cols), (x.rows, x.cols));
        for (a, b) in acc.data.iter_mut().zip(&x.data) {
            *a += b;
        }
    }

    fn rope(&self, x: &mut CpuTensor, n_heads: usize, positions: &[u32], rope: &Rope) {
        let d = rope.head_dim;
        let per_row = rope.positions_per_row();
        assert!(n_heads * d <= x.cols && positions.len() == x.rows * per_row);
        let cols = x.cols;
        x.data.par_chunks_mut(cols).zip(positions.par_chunks_exact(per_row)).for_each(|(row, pos)| {
            // One sin/cos per frequency, shared by all heads of the row.
            let sc: Vec<(f32, f32)> =
                rope.inv_freq.iter().enumerate().map(|(i, f)| (pos[rope.component(i)] as f32 * f).sin_cos()).collect();
            for head in row[..n_heads * d].chunks_exact_mut(d) {
                match rope.style {
                    RopeStyle::Neox => {
                        let (a, b) = head.split_at_mut(d / 2);
                        for ((x0, x1), &(s, c)) in a.iter_mut().zip(b.iter_mut()).zip(&sc) {
                            let (u, v) = (*x0, *x1);
                            *x0 = u * c - v * s;
                            *x1 = u * s + v * c;
                        }
                    }
                    RopeStyle::Norm => {
                        for (p, &(s, c)) in head.chunks_exact_mut(2).zip(&sc) {
                            let (u, v) = (p[0], p[1]);
                            p[0] = u * c - v * s;
                            p[1] = u * s + v * c;
                        }
                    }
                }
            }
        });
    }

    fn silu_mul(&self, gate_up: &CpuTensor, out: &mut CpuTensor) {
        let h = gate_up.cols / 2;
        assert_eq!((out.rows, out.cols), (gate_up.rows, h));
        out.data.par_chunks_mut(h).zip(gate_up.data.par_chunks(2 * h)).for_each(|(o, gu)| {
            for ((o, g), u) in o.iter_mut().zip(&gu[..h]).zip(&gu[h..]) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        });
    }

    fn write_kv(&self, kv: (&mut CpuKv, &mut CpuKv), qkv: &CpuTensor, layout: QkvLayout, slots: &[u32]) {
        let (kc, vc) = kv;
        let w = layout.kv_cols();
        assert!(kc.cols == w && vc.cols == w && slots.len() == qkv.rows && qkv.cols == layout.total_cols());
        for (row, &slot) in qkv.data.chunks_exact(qkv.cols).zip(slots) {
            kc.write(slot as usize, &row[layout.k_offset()..layout.k_offset() + w]);
            vc.write(slot as usize, &row[layout.v_offset()..layout.v_offset() + w]);
        }
    }

    fn attention(
        &self,
        qkv: &CpuTensor,
        kv: (&CpuKv, &CpuKv),
        layout: QkvLayout,
        seqs: &[AttnSeq<'_>],
        out: &mut CpuTensor,
    ) {
        let (kc, vc) = kv;
        let (d, cols) = (layout.head_dim, qkv.cols);
        let group = layout.n_heads / layout.n_kv_heads;
        assert_eq!((out.rows, out.cols), (qkv.rows, layout.q_cols()));
        // Which sequence, and which position within it, each batch row is.
        let mut row_pos = vec![(usize::MAX, 0usize); qkv.rows];
        for (s, seq) in seqs.iter().enumerate() {
            let first = seq.slots.len() - seq.q_rows.len();
            for (i, r) in seq.q_rows.clone().enumerate() {
                row_pos[r] = (s, first + i);
            }
        }
        let scale = 1.0 / (d as f32).sqrt();
        #[cfg(target_arch = "x86_64")]
        if d.is_multiple_of(attn_simd::CHUNK) && dot::simd_available() {
            // One task per (row, KV head): the `group` query heads sharing a KV head are
            // contiguous in the row, and each cached K/V row is loaded once for all of them.
            let (gw, kvw) = (group * d, layout.kv_cols());
            out.data.par_chunks_mut(gw).enumerate().for_each_init(Vec::new, |scores, (idx, o)| {
                let (r, g) = (idx / layout.n_kv_heads, idx % layout.n_kv_heads);
                let (s, pos) = row_pos[r];
                let slots = &seqs[s].slots[..=pos];
                let q = &qkv.data[r * cols + g * gw..][..gw];
                match (&kc.data, &vc.data) {
                    (KvData::F32(k), KvData::F32(v)) => {
                        let kv = attn_simd::Kv { k, v, stride: kvw, offset: g * d };
                        attn_simd::attend(q, group, d, slots, kv, scale, scores, o);
                    }
                    (KvData::F16(k), KvData::F16(v)) => {
                        let kv = attn_simd::Kv { k, v, stride: kvw, offset: g * d };
                        attn_simd::attend(q, group, d, slots, kv, scale, scores, o);
                    }
                    _ => unreachable!("K and V caches of one layer share their type"),
                }
            });
            return;
        }
        out.data.par_chunks_mut(d).enumerate().for_each_init(
            || vec![0.0f32; d],
            |row, (idx, o)| {
                let (r, h) = (idx / layout.n_heads, idx % layout.n_heads);
                let (s, pos) = row_pos[r];
                let slots = &seqs[s].slots[..=pos];
                let q = &qkv.data[r * cols + h * d..][..d];
                let koff = (h / group) * d;
                let mut scores: Vec<f32> = slots
                    .iter()
                    .map(|&sl| {
                        kc.row_into(sl, koff, row);
                        dot(q, row) * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for v in scores.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                o.fill(0.0);
                for (&p, &sl) in scores.iter().zip(slots) {
                    vc.row_into(sl, koff, row);
                    let p = p / sum;
                    for (a, b) in o.iter_mut().zip(row.iter()) {
                        *a += p * b;
                    }
                }
            },
        );
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[usize]) -> CpuTensor {
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            data.extend_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        CpuTensor { data, rows: rows.len(), cols: x.cols }
    }

    fn set_rows(&self, x: &mut CpuTensor, rows: &[usize], values: &[f32]) {
        assert!(values.len() == rows.len() * x.cols && rows.iter().all(|&r| r < x.rows), "set_rows: bad shape");
        for (&r, v) in rows.iter().zip(values.chunks_exact(x.cols)) {
            x.data[r * x.cols..(r + 1) * x.cols].copy_from_slice(v);
        }
    }

    fn layer_norm(&self, x: &CpuTensor, weight: &CpuTensor, bias: &CpuTensor, eps: f32, out: &mut CpuTensor) {
        assert_eq!((out.rows, out.cols), (x.rows, x.cols));
        tower::layer_norm(&x.data, x.cols, &weight.data, &bias.data, eps, &mut out.data);
    }

    fn gelu(&self, x: &mut CpuTensor, kind: Gelu) {
        tower::gelu(&mut x.data, kind);
    }

    fn attention_spans(
        &self,
        qkv: &CpuTensor,
        layout: QkvLayout,
        spans: &[std::ops::Range<usize>],
        out: &mut CpuTensor,
    ) {
        assert_eq!((qkv.cols, out.rows, out.cols), (layout.total_cols(), qkv.rows, layout.q_cols()));
        tower::attention_spans(&qkv.data, layout, spans, &mut out.data);
    }

    fn reshape(&self, x: CpuTensor, rows: usize, cols: usize) -> CpuTensor {
        assert_eq!(rows * cols, x.data.len(), "reshape: {}x{} is not {rows}x{cols}", x.rows, x.cols);
        CpuTensor { data: x.data, rows, cols }
    }
}

#[cfg(test)]
mod tests {
    //! The fast paths above against `reference`, on random inputs, with the tolerance each needs.
    use super::reference as r;
    use super::test_util::{random_blocks, Lcg};
    use super::*;

    fn rand_vec(n: usize, rng: &mut Lcg) -> Vec<f32> {
        (0..n).map(|_| rng.normal()).collect()
    }

    fn assert_close(got: &[f32], want: &[f32], rel: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((a - b).abs() <= rel * scale, "{what}[{i}]: {a} vs {b} (scale {scale})");
        }
    }

    #[test]
    fn linear_matches_reference_for_every_type_and_batch() {
        for precision in [Precision::Q8, Precision::F32] {
            linear_matches_reference(precision);
        }
    }

    fn linear_matches_reference(precision: Precision) {
        let be = CpuBackend::with_precision(2, precision);
        let mut rng = Lcg(1);
        for t in GgmlType::ALL {
            // Every decode batch size 1..=9 (tiles of up to 8 tokens, 9 = 5 + 4) and a prompt
            // chunk of 17; 37 rows take the file-order kernels, 40 and 64 the 8-row packed ones.
            let shapes = (1..=9).flat_map(|n| [(n, 37), (n, 40)]).chain([(17, 37), (17, 64), (5, 64)]);
            for (n, m) in shapes {
                let k = 512;
                let bytes = random_blocks(t, m * k, &mut rng);
                let w = be.weight("w", t, m, k, &bytes).unwrap();
                let x = be.upload(&rand_vec(n * k, &mut rng), n, k);
                let bias = be.upload(&rand_vec(m, &mut rng), 1, m);
                // Written at a column offset inside a wider output, whose other columns stay.
                let mut out = be.upload(&vec![7.0; n * (m + 5)], n, m + 5);
                be.linear(&x, &w, Some(&bias), &mut out, 3);
                let wd = r::dequantize_matrix(t, m, k, &bytes);
                let want = r::linear(&x.data, n, k, &wd, m, Some(&bias.data));
                let got: Vec<f32> = out.data.chunks(m + 5).flat_map(|row| row[3..3 + m].to_vec()).collect();
                assert!(out.data.chunks(m + 5).all(|row| row[..3] == [7.0; 3] && row[3 + m..] == [7.0; 2]));
                // Legacy types quantize activations to 8 bits (≈0.4% per element, averaging down
                // over 512 products); float and K types use f32 activations.
                let tol = if precision == Precision::Q8 && uses_q8_activations(t) { 2e-2 } else { 1e-4 };
                assert_close(&got, &want, tol, &format!("linear {t} n={n}"));
            }
        }
    }

    /// Each token's output row does not depend on which other tokens share the batch: greedy
    /// decoding in a batch must give what decoding alone gives.
    #[test]
    fn linear_rows_are_independent_of_the_batch() {
        for precision in [Precision::Q8, Precision::F32] {
            let be = CpuBackend::with_precision(2, precision);
            let mut rng = Lcg(4);
            for t in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q6K] {
                let (m, k) = (48, 256);
                let w = be.weight("w", t, m, k, &random_blocks(t, m * k, &mut rng)).unwrap();
                let x = be.upload(&rand_vec(17 * k, &mut rng), 17, k);
                let alone: Vec<Vec<f32>> = (0..17)
                    .map(|i| {
                        let mut out = be.zeros(1, m);
                        be.linear(&be.gather_rows(&x, &[i]), &w, None, &mut out, 0);
                        out.data
                    })
                    .collect();
                for n in 1..=17 {
                    let xs = be.gather_rows(&x, &(0..n).collect::<Vec<_>>());
                    let mut out = be.zeros(n, m);
                    be.linear(&xs, &w, None, &mut out, 0);
                    for (i, row) in out.data.chunks(m).enumerate() {
                        assert_eq!(row, alone[i], "{precision:?} {t} batch {n} row {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn norms_rope_silu_match_reference() {
        let be = CpuBackend::new(2);
        let mut rng = Lcg(2);
        let (n, c) = (5, 128);
        let x = be.upload(&rand_vec(n * c, &mut rng), n, c);
        let w = be.upload(&rand_vec(c, &mut rng), 1, c);
        let mut out = be.zeros(n, c);
        be.rms_norm(&x, &w, 1e-5, &mut out);
        assert_close(&out.data, &r::rms_norm(&x.data, c, &w.data, 1e-5), 1e-5, "rms_norm");

        let y = be.upload(&rand_vec(n * c, &mut rng), n, c);
        let mut res = x.clone();
        be.add_rms_norm(&mut res, &y, &w, 1e-5, &mut out);
        let sum: Vec<f32> = x.data.iter().zip(&y.data).map(|(a, b)| a + b).collect();
        assert_close(&res.data, &sum, 1e-6, "add_rms_norm residual");
        assert_close(&out.data, &r::rms_norm(&sum, c, &w.data, 1e-5), 1e-5, "add_rms_norm");

        for style in [RopeStyle::Neox, RopeStyle::Norm] {
            let rope = Rope {
                style,
                head_dim: 32,
                inv_freq: (0..16).map(|i| 10000f32.powf(-2.0 * i as f32 / 32.0)).collect(),
                mrope_section: None,
            };
            let pos = [0u32, 1, 7, 300, 4095];
            let mut a = x.clone();
            be.rope(&mut a, 3, &pos, &rope);
            let mut b = x.data.clone();
            r::rope(&mut b, c, 3, &pos, &rope);
            assert_close(&a.data, &b, 1e-5, "rope");
            assert_eq!(a.data[3 * 32..c], x.data[3 * 32..c], "heads past n_heads untouched");

            // M-RoPE (sections 4/6/6 of the 16 pairs): each pair turns with its section's
            // position, so the result splices three plain rotations, at t, at h and at w.
            let m = Rope { mrope_section: Some([4, 6, 6]), ..rope.clone() };
            let pos3: Vec<u32> = pos.iter().flat_map(|&p| [p, p * 3 + 1, p / 2 + 5]).collect();
            let mut a = x.clone();
            be.rope(&mut a, 3, &pos3, &m);
            let mut b = x.data.clone();
            r::rope(&mut b, c, 3, &pos3, &m);
            assert_close(&a.data, &b, 1e-5, "mrope");
            let plain = |k: usize| {
                let p: Vec<u32> = pos3.chunks(3).map(|t| t[k]).collect();
                let mut y = x.clone();
                be.rope(&mut y, 3, &p, &rope);
                y.data
            };
            let by = [plain(0), plain(1), plain(2)];
            for (idx, v) in a.data.iter().enumerate() {
                let col = idx % c;
                let pair = match style {
                    RopeStyle::Neox => col % 32 % 16,
                    RopeStyle::Norm => col % 32 / 2,
                };
                let k = if col >= 3 * 32 { 0 } else { m.component(pair) };
                assert_eq!(*v, by[k][idx], "mrope col {col}: pair {pair} turns with position {k}");
            }
            // Text tokens (t = h = w) get plain RoPE.
            let same: Vec<u32> = pos.iter().flat_map(|&p| [p; 3]).collect();
            let mut a = x.clone();
            be.rope(&mut a, 3, &same, &m);
            assert_eq!(a.data, plain(0), "t = h = w is plain rope");
        }

        let mut h = be.zeros(n, c / 2);
        be.silu_mul(&x, &mut h);
        assert_close(&h.data, &r::silu_mul(&x.data, c / 2), 1e-6, "silu_mul");
    }

    /// Head dims 16 (the plain loops), 64 and 128 (the AVX2 path, one and two column blocks),
    /// with grouped and one-to-one KV heads.
    #[test]
    fn attention_matches_reference_with_scattered_slots() {
        for (n_heads, n_kv_heads, head_dim) in [(6, 2, 16), (9, 3, 64), (4, 4, 64), (4, 2, 128)] {
            attention_matches_reference(QkvLayout { n_heads, n_kv_heads, head_dim });
        }
    }

    fn attention_matches_reference(layout: QkvLayout) {
        for precision in [Precision::Q8, Precision::F32] {
            attention_matches_reference_in(layout, CpuBackend::with_precision(2, precision));
        }
    }

    fn attention_matches_reference_in(layout: QkvLayout, be: CpuBackend) {
        let mut rng = Lcg(3);
        let cols = layout.total_cols();
        // Two sequences: one prefilling 4 tokens from scratch, one decoding its 9th token.
        let rows = 5;
        let qkv = be.upload(&rand_vec(rows * cols, &mut rng), rows, cols);
        let (mut kc, mut vc) = (be.kv_layer(32, layout.kv_cols()).unwrap(), be.kv_layer(32, layout.kv_cols()).unwrap());
        let s0: Vec<u32> = vec![3, 10, 11, 2];
        let s1: Vec<u32> = (12..21).collect();
        // Earlier tokens of seq 1 are already cached.
        let hist = rand_vec(32 * layout.kv_cols(), &mut rng);
        kc.write(0, &hist);
        vc.write(0, &hist.iter().map(|v| v * 0.5).collect::<Vec<_>>());
        let new_slots = [3, 10, 11, 2, 20];
        be.write_kv((&mut kc, &mut vc), &qkv, layout, &new_slots);
        let seqs = [AttnSeq { q_rows: 0..4, slots: &s0 }, AttnSeq { q_rows: 4..5, slots: &s1 }];
        let mut out = be.zeros(rows, layout.q_cols());
        be.attention(&qkv, (&kc, &vc), layout, &seqs, &mut out);
        // Against what the cache holds (f16 caches round what they store).
        let want = r::attention(&qkv.data, &kc.to_f32(), &vc.to_f32(), layout, &seqs);
        assert_close(&out.data, &want, 1e-5, &format!("attention {layout:?}"));
        // The decoding row alone gets exactly what it got in the batch.
        let alone = be.gather_rows(&qkv, &[4]);
        let mut out1 = be.zeros(1, layout.q_cols());
        be.attention(&alone, (&kc, &vc), layout, &[AttnSeq { q_rows: 0..1, slots: &s1 }], &mut out1);
        assert_eq!(out1.data, out.data[4 * layout.q_cols()..], "attention {layout:?}: row 4 alone");
    }

    #[test]
    fn weight_shape_errors_are_reported() {
        let be = CpuBackend::new(1);
        let e = be.weight("blk.0.attn_q.weight", GgmlType::Q4_1, 2, 40, &[0; 50]).unwrap_err();
        assert!(e.to_string().contains("blk.0.attn_q.weight") && e.to_string().contains("40 columns"), "{e}");
        let e = be.weight("w", GgmlType::F32, 2, 4, &[0; 31]).unwrap_err();
        assert!(e.to_string().contains("31 bytes"), "{e}");
    }
}
