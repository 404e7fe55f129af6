//! The CUDA backend (feature `cuda`): device buffers through cudarc, ops as launches of our own
//! kernels (`kernels/*.cu`, compiled by build.rs) and cuBLAS for prefill-sized matrix products.
//!
//! Numerics: activations are f32 on the device; weights are AWQ 4-bit (the per-row layout of
//! [`AwqMatrix`]) or fp16; the KV cache is fp16. Decode-sized linears (≤ 8 rows) run the fused
//! dequantizing GEMV kernels (memory-bound: they decide tokens/s); larger ones dequantize the AWQ
//! weight into an fp16 scratch matrix and call cuBLAS with f32 accumulation (vLLM's AWQ path
//! from 256 tokens on). Every op has a parity test against the CPU backend (`tests/cuda_parity.rs`).
//!
//! Ops are infallible by the [`Backend`] contract: a failed launch or copy is a device fault and
//! panics; the engine supervisor catches the panic and restarts the engine with a fresh context.
//!
//! Not yet here (see docs/architecture.md, "CUDA engine"): CUDA graphs per batch size, device-side
//! sampling in the engine loop, and a plan-sized memory pool; per-call metadata (positions, slot
//! lists) is uploaded with small synchronous copies.

pub mod kernels;

use std::sync::{Arc, Mutex};

use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::f16;

use super::{AttnSeq, Backend, BackendError, Gelu, GgmlType, QkvLayout, Rope, RopeStyle};
use crate::model::weights::awq::AwqMatrix;

pub use kernels::Kernels;

/// Why there is no CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA device: the CUDA driver library (libcuda) is not installed")]
    NoDriver,
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    #[error("CUDA: {0}")]
    Driver(String),
}

/// Rows up to which `linear` uses the GEMV kernels (they keep up to 8 activation rows in registers).
pub const GEMV_MAX_ROWS: usize = 8;
/// Output rows per block of `awq_gemv_f32` and `linear_f16_f32` (kernels/gemv.cuh GEMV_ROWS_PER_BLOCK).
pub(crate) const GEMV_ROWS_PER_BLOCK: usize = 16;
/// Query rows per block of the prefill attention kernel (kernels/attention.cu).
pub(crate) const PREFILL_TILE_ROWS: usize = 32;
/// Context positions per block of split-K decode attention.
const DECODE_SPLIT: usize = 512;

/// A host-visible verdict on whether CUDA can be used, without panicking where libcuda is absent
/// (cudarc panics if the library cannot be loaded, so it is looked for first).
pub fn device_count() -> Result<usize, CudaError> {
    // SAFETY: only probes whether the shared libraries can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    // cuBLAS panics the same way when its library is absent (a container with the driver mounted
    // but no CUDA runtime libraries).
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(CudaError::NoDevice("libcublas (the CUDA runtime libraries) is not installed".into()));
    }
    match CudaContext::device_count() {
        Ok(0) => Err(CudaError::NoDevice("the driver reports no devices".into())),
        Ok(n) => Ok(n as usize),
        Err(e) => Err(CudaError::NoDevice(e.to_string())),
    }
}

pub struct CudaBackend {
    /// The one stream all work runs on; it also keeps the context alive.
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    device: String,
    scratch: Mutex<Scratch>,
}

/// fp16 scratch for a dequantized weight and the fp16 copy of the activations (prefill GEMM),
/// grown on demand and reused.
#[derive(Default)]
struct Scratch {
    w: Option<CudaSlice<f16>>,
    x: Option<CudaSlice<f16>>,
}

/// A device activation matrix, row-major f32.
pub struct CudaTensor {
    buf: CudaSlice<f32>,
    rows: usize,
    cols: usize,
}

pub enum CudaWeight {
    /// AWQ rows: `qw [n, k/8]`, `scales`/`zeros` `[n, k/group]` in fp16.
    Awq { qw: CudaSlice<u32>, scales: CudaSlice<f16>, zeros: CudaSlice<f16>, n: usize, k: usize, group: usize },
    /// A dense fp16 matrix `[rows, cols]` (embeddings, head; GGUF blocks are dequantized to it).
    F16 { w: CudaSlice<f16>, rows: usize, cols: usize },
}

/// K or V rows of one layer: `[slots, cols]` fp16.
pub struct CudaKv {
    buf: CudaSlice<f16>,
    cols: usize,
}

fn fail<T, E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> T + '_ {
    move |e| panic!("CUDA {what}: {e}")
}

fn cfg(grid: (usize, usize, usize), block: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block_dim: (block as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Kernel int arguments are i32; every size here is checked to fit when tensors are made.
fn i(v: usize) -> i32 {
    i32::try_from(v).expect("size fits in i32")
}

/// Buffers come from the device's default stream-ordered pool (cudarc allocates with
/// `cuMemAllocAsync`). Its release threshold is raised so memory freed by one forward pass is
/// kept for the next instead of going back to the driver at every synchronization: the pool
/// holds the high-water mark of what was actually used, and never reserves address space beyond
/// it (on Jetson's unified memory that matters: no giant virtual reservations).
fn keep_freed_memory(ctx: &CudaContext) {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: plain driver calls on this context's device with valid out-pointers.
    let ok = unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS
            && sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            ) == sys::CUresult::CUDA_SUCCESS
    };
    if !ok {
        tracing::debug!("the device's memory pool keeps its default release threshold");
    }
}

impl CudaBackend {
    /// A backend on device `ordinal`, or why there is none (never a panic when CUDA is absent).
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        let n = device_count()?;
        if ordinal >= n {
            return Err(CudaError::NoDevice(format!("device {ordinal} requested, {n} present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::Driver(e.to_string()))?;
        // One stream owns all work: cudarc's per-buffer event tracking is only needed across streams.
        // SAFETY: every buffer of this backend is used on `stream` alone.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        keep_freed_memory(&ctx);
        let cc = ctx.compute_capability().map_err(|e| CudaError::Driver(e.to_string()))?;
        let k = Kernels::load(&ctx, cc)?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| CudaError::Driver(format!("cuBLAS: {e}")))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let device = format!("{name} (sm_{}{})", cc.0, cc.1);
        tracing::info!(%device, kernels = k.source(), "CUDA backend ready");
        Ok(Self { stream, blas, k, device, scratch: Mutex::new(Scratch::default()) })
    }

    /// The device's name and compute capability.
    pub fn device(&self) -> &str {
        &self.device
    }

    pub fn synchronize(&self) {
        self.stream.synchronize().unwrap_or_else(fail("synchronize"));
    }

    /// Uploads index data (one element at least: the driver refuses empty allocations).
    fn u32s(&self, v: &[u32]) -> CudaSlice<u32> {
        let v = if v.is_empty() { &[0][..] } else { v };
        self.stream.clone_htod(v).unwrap_or_else(fail("upload"))
    }

    fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
        what: &str,
    ) -> Result<CudaSlice<T>, BackendError> {
        self.stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(|_| BackendError::OutOfMemory { what: what.into(), bytes: n * std::mem::size_of::<T>() })
    }

    /// An fp16 scratch buffer of at least `n` values (slot 0: weights, slot 1: activations).
    fn with_scratch<R>(
        &self,
        n_w: usize,
        n_x: usize,
        f: impl FnOnce(&mut CudaSlice<f16>, &mut CudaSlice<f16>) -> R,
    ) -> R {
        let mut s = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let grow = |slot: &mut Option<CudaSlice<f16>>, n: usize| {
            if slot.as_ref().is_none_or(|b| b.len() < n) {
                *slot = Some(self.stream.alloc_zeros::<f16>(n.max(1)).unwrap_or_else(fail("scratch allocation")));
            }
        };
        grow(&mut s.w, n_w);
        grow(&mut s.x, n_x);
        let Scratch { w, x } = &mut *s;
        f(w.as_mut().expect("grown"), x.as_mut().expect("grown"))
    }

    /// `out[:, col0..col0+n] = x16 · w16ᵀ` through cuBLAS: x16 `[rows, k]` and w16 `[n, k]`
    /// row-major fp16 (`dims = (rows, k, n)`), out f32 `[rows, out.cols]`, f32 accumulation.
    fn gemm(
        &self,
        x16: &CudaSlice<f16>,
        w16: &CudaSlice<f16>,
        dims: (usize, usize, usize),
        out: &mut CudaTensor,
        col0: usize,
    ) {
        let (rows, k, n) = dims;
        // Column-major view: out^T (n×rows, ld = out.cols) = W (n×k, stored as k×n col-major, transposed) · x^T (k×rows).
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (a, _ra) = w16.device_ptr(&self.stream);
        let (b, _rb) = x16.device_ptr(&self.stream);
        let (c, _rc) = out.buf.device_ptr_mut(&self.stream);
        let c = c + (col0 * std::mem::size_of::<f32>()) as u64;
        // SAFETY: pointers are live device buffers of the sizes the dimensions say (asserted by
        // the caller); cuBLAS runs on this backend's stream.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                i(n),
                i(rows),
                i(k),
                (&alpha as *const f32).cast(),
                a as *const _,
                blas_sys::cudaDataType_t::CUDA_R_16F,
                i(k),
                b as *const _,
                blas_sys::cudaDataType_t::CUDA_R_16F,
                i(k),
                (&beta as *const f32).cast(),
                c as *mut _,
                blas_sys::cudaDataType_t::CUDA_R_32F,
                i(out.cols),
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .unwrap_or_else(fail("cublasGemmEx"));
    }

    /// Greedy token of each row of `logits` `[rows, vocab]`, on the device.
    pub fn argmax(&self, logits: &CudaTensor) -> Vec<u32> {
        let mut out = self.stream.alloc_zeros::<u32>(logits.rows).unwrap_or_else(fail("alloc"));
        let v = i(logits.cols);
        let mut l = self.stream.launch_builder(&self.k.argmax);
        l.arg(&logits.buf).arg(&v).arg(&mut out);
        // SAFETY: matches argmax_f32.
        unsafe { l.launch(cfg((logits.rows, 1, 1), 1024)) }.unwrap_or_else(fail("argmax"));
        self.stream.clone_dtoh(&out).unwrap_or_else(fail("download"))
    }

    /// Samples one token per row on the device: temperature, top-k (0 = off), top-p, and a
    /// uniform number in [0, 1) per row from the caller's generator (kernels/sample.cu).
    pub fn sample(
        &self,
        logits: &CudaTensor,
        temperature: &[f32],
        top_k: &[u32],
        top_p: &[f32],
        uniform: &[f32],
    ) -> Vec<u32> {
        let r = logits.rows;
        assert!(temperature.len() == r && top_k.len() == r && top_p.len() == r && uniform.len() == r);
        let up = |v: &[f32]| self.stream.clone_htod(v).unwrap_or_else(fail("upload"));
        let (t, k, p, u) = (up(temperature), self.u32s(top_k), up(top_p), up(uniform));
        let mut out = self.stream.alloc_zeros::<u32>(r).unwrap_or_else(fail("alloc"));
        let v = i(logits.cols);
        let mut l = self.stream.launch_builder(&self.k.sample);
        l.arg(&logits.buf).arg(&v).arg(&t).arg(&k).arg(&p).arg(&u).arg(&mut out);
        // SAFETY: matches sample_f32.
        unsafe { l.launch(cfg((r, 1, 1), 1024)) }.unwrap_or_else(fail("sample"));
        self.stream.clone_dtoh(&out).unwrap_or_else(fail("download"))
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type KvLayer = CudaKv;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn sibling(&self) -> Result<Self, BackendError> {
        let dev = |e: &dyn std::fmt::Display| BackendError::Device(format!("CUDA: {e}"));
        let ctx = self.stream.context();
        let stream = ctx.new_stream().map_err(|e| dev(&e))?;
        let cc = ctx.compute_capability().map_err(|e| dev(&e))?;
        let k = Kernels::load(ctx, cc).map_err(|e| dev(&e))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| dev(&format!("cuBLAS: {e}")))?;
        Ok(Self { stream, blas, k, device: self.device.clone(), scratch: Mutex::new(Scratch::default()) })
    }

    fn zeros(&self, rows: usize, cols: usize) -> CudaTensor {
        assert!(rows * cols < i32::MAX as usize, "activation of {rows}x{cols} values");
        CudaTensor { buf: self.stream.alloc_zeros(rows * cols).unwrap_or_else(fail("alloc")), rows, cols }
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> CudaTensor {
        assert_eq!(data.len(), rows * cols);
        CudaTensor { buf: self.stream.clone_htod(data).unwrap_or_else(fail("upload")), rows, cols }
    }

    fn download(&self, t: &CudaTensor) -> Vec<f32> {
        self.stream.clone_dtoh(&t.buf).unwrap_or_else(fail("download"))
    }

    fn shape(&self, t: &CudaTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn weight(
        &self,
        name: &str,
        dtype: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<CudaWeight, BackendError> {
        let bad = |reason: String| BackendError::BadWeight { name: name.into(), reason };
        let row_bytes = super::weight_row_bytes(name, dtype, rows, cols, bytes)?;
        // Dense fp16 on the device: F16 rows as they are, anything else dequantized on the host.
        let host: Vec<f16> = if dtype == GgmlType::F16 {
            bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect()
        } else {
            let mut row = vec![0f32; cols];
            let mut v = Vec::with_capacity(rows * cols);
            for r in bytes.chunks_exact(row_bytes) {
                super::cpu::blocks::dequantize_row(dtype, r, &mut row);
                v.extend(row.iter().map(|&x| f16::from_f32(x)));
            }
            v
        };
        let mut w = self.alloc::<f16>(host.len(), name)?;
        self.stream.memcpy_htod(&host, &mut w).map_err(|e| bad(e.to_string()))?;
        Ok(CudaWeight::F16 { w, rows, cols })
    }

    fn awq_weight(&self, name: &str, m: AwqMatrix) -> Result<CudaWeight, BackendError> {
        let bad = |reason: String| BackendError::BadWeight { name: name.into(), reason };
        AwqMatrix::check_shape(m.n, m.k, m.group).map_err(bad)?;
        let zeros: Vec<f16> = m.zeros.iter().map(|&z| f16::from_f32(z as f32)).collect();
        let mut qw = self.alloc::<u32>(m.qw.len(), name)?;
        let mut scales = self.alloc::<f16>(m.scales.len(), name)?;
        let mut z = self.alloc::<f16>(zeros.len(), name)?;
        let up = |e: cudarc::driver::DriverError| BackendError::BadWeight { name: name.into(), reason: e.to_string() };
        self.stream.memcpy_htod(&m.qw, &mut qw).map_err(up)?;
        self.stream.memcpy_htod(&m.scales, &mut scales).map_err(up)?;
        self.stream.memcpy_htod(&zeros, &mut z).map_err(up)?;
        Ok(CudaWeight::Awq { qw, scales, zeros: z, n: m.n, k: m.k, group: m.group })
    }

    fn kv_layer(&self, slots: usize, kv_cols: usize) -> Result<CudaKv, BackendError> {
        Ok(CudaKv {
            buf: self.alloc::<f16>(slots.saturating_mul(kv_cols), &format!("KV cache of {slots} slots"))?,
            cols: kv_cols,
        })
    }

    fn kv_value_bytes(&self) -> usize {
        2
    }

    fn weight_bytes(&self, w: &CudaWeight) -> usize {
        match w {
            CudaWeight::Awq { n, k, group, .. } => n * k / 2 + 2 * 2 * n * (k / group),
            CudaWeight::F16 { rows, cols, .. } => 2 * rows * cols,
        }
    }

    fn copy_bandwidth(&self) -> f64 {
        // 256 MiB device-to-device (far beyond L2), 10 copies per timing, best of 5 after a
        // warm-up; small enough that the pool's cached memory stays modest afterwards.
        let n = (256usize << 20) / 4;
        let src = self.stream.alloc_zeros::<f32>(n).unwrap_or_else(fail("alloc"));
        let mut dst = self.stream.alloc_zeros::<f32>(n).unwrap_or_else(fail("alloc"));
        let mut best = f64::INFINITY;
        for rep in 0..6 {
            self.synchronize();
            let t = std::time::Instant::now();
            for _ in 0..10 {
                self.stream.memcpy_dtod(&src, &mut dst).unwrap_or_else(fail("copy"));
            }
            self.synchronize();
            if rep > 0 {
                best = best.min(t.elapsed().as_secs_f64() / 10.0);
            }
        }
        2.0 * (n * 4) as f64 / best
    }

    fn embedding(&self, table: &CudaWeight, ids: &[u32], out: &mut CudaTensor) {
        let CudaWeight::F16 { w, rows, cols } = table else { panic!("embedding tables are fp16 on CUDA") };
        assert_eq!((out.rows, out.cols), (ids.len(), *cols));
        // The device would read out of bounds where the CPU panics on a slice: check here.
        assert!(ids.iter().all(|&i| (i as usize) < *rows), "embedding: token id beyond {rows} rows");
        let ids_d = self.u32s(ids);
        let (n, c) = (i(ids.len()), i(*cols));
        let mut l = self.stream.launch_builder(&self.k.embedding);
        l.arg(w).arg(&ids_d).arg(&mut out.buf).arg(&n).arg(&c);
        // SAFETY: matches embedding_f16.
        unsafe { l.launch(cfg((ids.len(), 1, 1), 256)) }.unwrap_or_else(fail("embedding"));
    }

    fn linear(&self, x: &CudaTensor, w: &CudaWeight, bias: Option<&CudaTensor>, out: &mut CudaTensor, col0: usize) {
        let (rows, k) = (x.rows, x.cols);
        let (n, wk) = match w {
            CudaWeight::Awq { n, k, .. } => (*n, *k),
            CudaWeight::F16 { rows, cols, .. } => (*rows, *cols),
        };
        assert_eq!(k, wk, "linear: x has {k} columns, weight has {wk}");
        assert!(out.rows == rows && out.cols >= col0 + n, "linear: output too small");
        assert!(bias.is_none_or(|b| b.rows * b.cols == n), "linear: bias length");
        let null = 0u64;
        let (m, ki, ni, os, c0) = (i(rows), i(k), i(n), i(out.cols), i(col0));
        let g = match w {
            CudaWeight::Awq { group, .. } => i(*group),
            CudaWeight::F16 { .. } => 0,
        };
        if rows <= GEMV_MAX_ROWS {
            let grid = (n.div_ceil(GEMV_ROWS_PER_BLOCK), 1, 1);
            let mut l;
            match w {
                CudaWeight::Awq { qw, scales, zeros, .. } => {
                    l = self.stream.launch_builder(&self.k.awq_gemv);
                    l.arg(&x.buf).arg(&m).arg(&ki).arg(qw).arg(scales).arg(zeros).arg(&g);
                }
                CudaWeight::F16 { w, .. } => {
                    l = self.stream.launch_builder(&self.k.linear_f16);
                    l.arg(&x.buf).arg(&m).arg(&ki).arg(w);
                }
            }
            match bias {
                Some(b) => l.arg(&b.buf),
                None => l.arg(&null),
            };
            l.arg(&mut out.buf).arg(&os).arg(&c0).arg(&ni);
            // SAFETY: matches awq_gemv_f32 / linear_f16_f32 (nullable bias as a null pointer).
            unsafe { l.launch(cfg(grid, 256)) }.unwrap_or_else(fail("gemv"));
            return;
        }
        let nw = if matches!(w, CudaWeight::Awq { .. }) { n * k } else { 0 };
        self.with_scratch(nw, rows * k, |w16, x16| {
            let total = i(rows * k);
            let mut l = self.stream.launch_builder(&self.k.cast_f32_f16);
            l.arg(&x.buf).arg(&mut *x16).arg(&total);
            // SAFETY: matches cast_f32_f16.
            unsafe { l.launch(cfg(((rows * k).div_ceil(256).min(65535), 1, 1), 256)) }.unwrap_or_else(fail("cast"));
            match w {
                CudaWeight::Awq { qw, scales, zeros, .. } => {
                    let mut l = self.stream.launch_builder(&self.k.awq_dequant);
                    l.arg(qw).arg(scales).arg(zeros).arg(&g).arg(&mut *w16).arg(&ni).arg(&ki);
                    // SAFETY: matches awq_dequant_f16.
                    unsafe { l.launch(cfg(((n * k / 8).div_ceil(256).min(65535), 1, 1), 256)) }
                        .unwrap_or_else(fail("awq_dequant"));
                    self.gemm(x16, w16, (rows, k, n), out, col0);
                }
                CudaWeight::F16 { w, .. } => self.gemm(x16, w, (rows, k, n), out, col0),
            }
        });
        if let Some(b) = bias {
            let mut l = self.stream.launch_builder(&self.k.add_bias);
            l.arg(&mut out.buf).arg(&os).arg(&c0).arg(&b.buf).arg(&m).arg(&ni);
            // SAFETY: matches add_bias_f32.
            unsafe { l.launch(cfg(((rows * n).div_ceil(256).min(65535), 1, 1), 256)) }.unwrap_or_else(fail("add_bias"));
        }
    }

    fn rms_norm(&self, x: &CudaTensor, weight: &CudaTensor, eps: f32, out: &mut CudaTensor) {
        assert_eq!((out.rows, out.cols, weight.rows * weight.cols), (x.rows, x.cols, x.cols));
        let c = i(x.cols);
        let mut l = self.stream.launch_builder(&self.k.rms_norm);
        l.arg(&x.buf).arg(&weight.buf).arg(&mut out.buf).arg(&c).arg(&eps);
        // SAFETY: matches rms_norm_f32.
        unsafe { l.launch(cfg((x.rows, 1, 1), kernels::NORM_THREADS)) }.unwrap_or_else(fail("rms_norm"));
    }

    fn add_rms_norm(
        &self,
        residual: &mut CudaTensor,
        x: &CudaTensor,
        weight: &CudaTensor,
        eps: f32,
        out: &mut CudaTensor,
    ) {
        assert_eq!((residual.rows, residual.cols), (x.rows, x.cols));
        assert_eq!((out.rows, out.cols, weight.rows * weight.cols), (x.rows, x.cols, x.cols));
        let c = i(x.cols);
        let mut l = self.stream.launch_builder(&self.k.add_rms_norm);
        l.arg(&mut residual.buf).arg(&x.buf).arg(&weight.buf).arg(&mut out.buf).arg(&c).arg(&eps);
        // SAFETY: matches add_rms_norm_f32.
        unsafe { l.launch(cfg((x.rows, 1, 1), kernels::NORM_THREADS)) }.unwrap_or_else(fail("add_rms_norm"));
    }

    fn add(&self, acc: &mut CudaTensor, x: &CudaTensor) {
        assert_eq!((acc.rows, acc.cols), (x.rows, x.cols));
        let n = i(x.rows * x.cols);
        let mut l = self.stream.launch_builder(&self.k.add);
        l.arg(&mut acc.buf).arg(&x.buf).arg(&n);
        // SAFETY: matches add_f32.
        unsafe { l.launch(cfg(((x.rows * x.cols).div_ceil(256).min(65535), 1, 1), 256)) }.unwrap_or_else(fail("add"));
    }

    fn rope(&self, x: &mut CudaTensor, n_heads: usize, positions: &[u32], rope: &Rope) {
        assert_eq!(rope.style, RopeStyle::Neox, "the CUDA engine loads every checkpoint for rotate-half rope");
        let d = rope.head_dim;
        let per_row = rope.positions_per_row();
        assert!(n_heads * d <= x.cols && positions.len() == x.rows * per_row);
        assert_eq!(rope.inv_freq.len(), d / 2);
        let pos = self.u32s(positions);
        let freq = self.stream.clone_htod(&rope.inv_freq).unwrap_or_else(fail("upload"));
        let (r, s, h, hd) = (i(x.rows), i(x.cols), i(n_heads), i(d));
        // Section ends in frequency pairs: without M-RoPE every pair reads the one position.
        let [s0, s1, _] = rope.mrope_section.unwrap_or([d / 2, 0, 0]);
        let (stride, e0, e1) = (i(per_row), i(s0), i(s0 + s1));
        let mut l = self.stream.launch_builder(&self.k.rope);
        l.arg(&mut x.buf).arg(&r).arg(&s).arg(&h).arg(&hd).arg(&pos).arg(&stride).arg(&e0).arg(&e1).arg(&freq);
        // SAFETY: matches rope_f32.
        unsafe { l.launch(cfg((x.rows, n_heads, 1), d / 2)) }.unwrap_or_else(fail("rope"));
    }

    fn silu_mul(&self, gate_up: &CudaTensor, out: &mut CudaTensor) {
        let h = gate_up.cols / 2;
        assert_eq!((out.rows, out.cols), (gate_up.rows, h));
        let (r, hh) = (i(gate_up.rows), i(h));
        let mut l = self.stream.launch_builder(&self.k.silu_mul);
        l.arg(&gate_up.buf).arg(&mut out.buf).arg(&r).arg(&hh);
        // SAFETY: matches silu_mul_f32.
        unsafe { l.launch(cfg(((gate_up.rows * h).div_ceil(256).min(65535), 1, 1), 256)) }
            .unwrap_or_else(fail("silu_mul"));
    }

    fn write_kv(&self, kv: (&mut CudaKv, &mut CudaKv), qkv: &CudaTensor, layout: QkvLayout, slots: &[u32]) {
        let (kc, vc) = kv;
        let w = layout.kv_cols();
        assert!(kc.cols == w && vc.cols == w && slots.len() == qkv.rows && qkv.cols == layout.total_cols());
        let capacity = kc.buf.len() / w.max(1);
        assert!(slots.iter().all(|&s| (s as usize) < capacity), "write_kv: slot beyond the {capacity}-slot cache");
        let s = self.u32s(slots);
        let (st, ko, vo, kw, r) = (i(qkv.cols), i(layout.k_offset()), i(layout.v_offset()), i(w), i(qkv.rows));
        let mut l = self.stream.launch_builder(&self.k.write_kv);
        l.arg(&qkv.buf).arg(&st).arg(&ko).arg(&vo).arg(&kw).arg(&s).arg(&mut kc.buf).arg(&mut vc.buf).arg(&r);
        // SAFETY: matches write_kv_f16.
        unsafe { l.launch(cfg((qkv.rows, 1, 1), 256)) }.unwrap_or_else(fail("write_kv"));
    }

    fn attention(
        &self,
        qkv: &CudaTensor,
        kv: (&CudaKv, &CudaKv),
        layout: QkvLayout,
        seqs: &[AttnSeq<'_>],
        out: &mut CudaTensor,
    ) {
        assert_eq!((out.rows, out.cols), (qkv.rows, layout.q_cols()));
        assert!(
            matches!(layout.head_dim, 64 | 128),
            "CUDA attention has head dims 64 and 128, not {}",
            layout.head_dim
        );
        assert!(layout.n_kv_heads > 0 && layout.n_heads.is_multiple_of(layout.n_kv_heads));
        let capacity = kv.0.buf.len() / layout.kv_cols().max(1);
        assert!(
            kv.0.cols == layout.kv_cols() && seqs.iter().all(|s| s.slots.iter().all(|&x| (x as usize) < capacity)),
            "attention: slot beyond the {capacity}-slot cache"
        );
        // Split-K decode when every sequence has one query row; tiled prefill otherwise.
        let rows = qkv.rows;
        let d = layout.head_dim;
        let (mut slots, mut row_off, mut row_ctx) = (Vec::new(), vec![0u32; rows], vec![0u32; rows]);
        let mut tiles: Vec<(u32, u32)> = Vec::new();
        for s in seqs {
            let off = slots.len() as u32;
            slots.extend_from_slice(s.slots);
            let first = s.slots.len() - s.q_rows.len();
            for (j, r) in s.q_rows.clone().enumerate() {
                row_off[r] = off;
                row_ctx[r] = (first + j + 1) as u32;
            }
            let mut r0 = s.q_rows.start;
            while r0 < s.q_rows.end {
                let n = (s.q_rows.end - r0).min(PREFILL_TILE_ROWS);
                tiles.push((r0 as u32, n as u32));
                r0 += n;
            }
        }
        let decode = seqs.iter().all(|s| s.q_rows.len() == 1);
        let (slots_d, off_d, ctx_d) = (self.u32s(&slots), self.u32s(&row_off), self.u32s(&row_ctx));
        let scale = 1.0 / (d as f32).sqrt();
        let (kc, vc) = kv;
        let (nh, nkv, stride, kvc, oc) =
            (i(layout.n_heads), i(layout.n_kv_heads), i(qkv.cols), i(kc.cols), i(out.cols));
        if decode {
            let max_ctx = row_ctx.iter().copied().max().unwrap_or(1) as usize;
            let splits = max_ctx.div_ceil(DECODE_SPLIT).max(1);
            let mut part_out =
                self.stream.alloc_zeros::<f32>(rows * layout.n_heads * splits * d).unwrap_or_else(fail("alloc"));
            let mut part_ml =
                self.stream.alloc_zeros::<f32>(rows * layout.n_heads * splits * 2).unwrap_or_else(fail("alloc"));
            let (split, ns) = (i(DECODE_SPLIT), i(splits));
            let f = self.k.attention_decode(d);
            let mut l = self.stream.launch_builder(f);
            l.arg(&qkv.buf).arg(&stride).arg(&kc.buf).arg(&vc.buf).arg(&kvc).arg(&slots_d).arg(&off_d).arg(&ctx_d);
            l.arg(&nh).arg(&nkv).arg(&scale).arg(&split).arg(&mut part_out).arg(&mut part_ml).arg(&ns);
            // SAFETY: argument list matches attention_decode_d{64,128}_f16 (kernels/README.md).
            unsafe { l.launch(cfg((rows, layout.n_heads, splits), 128)) }.unwrap_or_else(fail("attention_decode"));
            let f = self.k.attention_reduce(d);
            let mut l = self.stream.launch_builder(f);
            l.arg(&part_out).arg(&part_ml).arg(&ns).arg(&nh).arg(&mut out.buf).arg(&oc);
            // SAFETY: matches attention_reduce_d{64,128}_f32.
            unsafe { l.launch(cfg((rows, layout.n_heads, 1), d)) }.unwrap_or_else(fail("attention_reduce"));
        } else {
            let t0: Vec<u32> = tiles.iter().map(|t| t.0).collect();
            let tn: Vec<u32> = tiles.iter().map(|t| t.1).collect();
            let (t0_d, tn_d) = (self.u32s(&t0), self.u32s(&tn));
            let f = self.k.attention_prefill(d);
            let mut l = self.stream.launch_builder(f);
            l.arg(&qkv.buf).arg(&stride).arg(&kc.buf).arg(&vc.buf).arg(&kvc).arg(&slots_d).arg(&off_d).arg(&ctx_d);
            l.arg(&t0_d).arg(&tn_d).arg(&nh).arg(&nkv).arg(&scale).arg(&mut out.buf).arg(&oc);
            // SAFETY: matches attention_prefill_d{64,128}_f16.
            unsafe { l.launch(cfg((tiles.len(), layout.n_heads, 1), 128)) }.unwrap_or_else(fail("attention_prefill"));
        }
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[usize]) -> CudaTensor {
        assert!(rows.iter().all(|&r| r < x.rows), "gather_rows: row beyond {}", x.rows);
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx_d = self.u32s(&idx);
        let mut out = self.zeros(rows.len(), x.cols);
        let (n, c) = (i(rows.len()), i(x.cols));
        let mut l = self.stream.launch_builder(&self.k.gather_rows);
        l.arg(&x.buf).arg(&idx_d).arg(&mut out.buf).arg(&n).arg(&c);
        // SAFETY: matches gather_rows_f32.
        unsafe { l.launch(cfg((rows.len().max(1), 1, 1), 256)) }.unwrap_or_else(fail("gather_rows"));
        out
    }

    fn set_rows(&self, x: &mut CudaTensor, rows: &[usize], values: &[f32]) {
        let c = x.cols;
        assert!(values.len() == rows.len() * c && rows.iter().all(|&r| r < x.rows), "set_rows: bad shape");
        // Image rows come in runs (one per image): one copy per run of consecutive rows.
        let mut i = 0;
        while i < rows.len() {
            let mut j = i + 1;
            while j < rows.len() && rows[j] == rows[j - 1] + 1 {
                j += 1;
            }
            let mut dst = x.buf.slice_mut(rows[i] * c..(rows[j - 1] + 1) * c);
            self.stream.memcpy_htod(&values[i * c..j * c], &mut dst).unwrap_or_else(fail("set_rows"));
            i = j;
        }
    }

    fn layer_norm(&self, x: &CudaTensor, weight: &CudaTensor, bias: &CudaTensor, eps: f32, out: &mut CudaTensor) {
        assert_eq!((out.rows, out.cols), (x.rows, x.cols));
        assert_eq!((weight.rows * weight.cols, bias.rows * bias.cols), (x.cols, x.cols));
        let c = i(x.cols);
        let mut l = self.stream.launch_builder(&self.k.layer_norm);
        l.arg(&x.buf).arg(&weight.buf).arg(&bias.buf).arg(&mut out.buf).arg(&c).arg(&eps);
        // SAFETY: matches layer_norm_f32.
        unsafe { l.launch(cfg((x.rows, 1, 1), kernels::NORM_THREADS)) }.unwrap_or_else(fail("layer_norm"));
    }

    fn gelu(&self, x: &mut CudaTensor, kind: Gelu) {
        let n = x.rows * x.cols;
        let (ni, k) = (
            i(n),
            match kind {
                Gelu::Quick => 0i32,
                Gelu::Erf => 1,
            },
        );
        let mut l = self.stream.launch_builder(&self.k.gelu);
        l.arg(&mut x.buf).arg(&ni).arg(&k);
        // SAFETY: matches gelu_f32.
        unsafe { l.launch(cfg((n.div_ceil(256).clamp(1, 65535), 1, 1), 256)) }.unwrap_or_else(fail("gelu"));
    }

    /// K and V go to fp16 scratch rows (`write_kv` with row r at slot r), then the prefill
    /// kernel runs with every row of a span seeing the whole span: `row_ctx` = the span's length,
    /// its slot list = the span's rows, tiles cut within spans.
    fn attention_spans(
        &self,
        qkv: &CudaTensor,
        layout: QkvLayout,
        spans: &[std::ops::Range<usize>],
        out: &mut CudaTensor,
    ) {
        let rows = qkv.rows;
        assert_eq!((qkv.cols, out.rows, out.cols), (layout.total_cols(), rows, layout.q_cols()));
        super::check_spans(spans, rows);
        let d = layout.head_dim;
        assert!(Kernels::has_prefill(d), "CUDA attention_spans has head dims 16, 64, 80 and 128, not {d}");
        assert!(layout.n_kv_heads > 0 && layout.n_heads.is_multiple_of(layout.n_kv_heads));
        let kv_cols = layout.kv_cols();
        let layer = || self.kv_layer(rows, kv_cols).unwrap_or_else(fail("attention_spans K/V"));
        let (mut kc, mut vc) = (layer(), layer());
        let identity: Vec<u32> = (0..rows as u32).collect();
        self.write_kv((&mut kc, &mut vc), qkv, layout, &identity);
        let (mut row_off, mut row_ctx) = (vec![0u32; rows], vec![0u32; rows]);
        let (mut t0, mut tn) = (Vec::new(), Vec::new());
        for s in spans {
            row_off[s.clone()].fill(s.start as u32);
            row_ctx[s.clone()].fill(s.len() as u32);
            for r0 in s.clone().step_by(PREFILL_TILE_ROWS) {
                t0.push(r0 as u32);
                tn.push((s.end - r0).min(PREFILL_TILE_ROWS) as u32);
            }
        }
        let (slots_d, off_d, ctx_d) = (self.u32s(&identity), self.u32s(&row_off), self.u32s(&row_ctx));
        let (t0_d, tn_d) = (self.u32s(&t0), self.u32s(&tn));
        let scale = 1.0 / (d as f32).sqrt();
        let (nh, nkv, stride, kvc, oc) =
            (i(layout.n_heads), i(layout.n_kv_heads), i(qkv.cols), i(kv_cols), i(out.cols));
        let mut l = self.stream.launch_builder(self.k.attention_prefill(d));
        l.arg(&qkv.buf).arg(&stride).arg(&kc.buf).arg(&vc.buf).arg(&kvc).arg(&slots_d).arg(&off_d).arg(&ctx_d);
        l.arg(&t0_d).arg(&tn_d).arg(&nh).arg(&nkv).arg(&scale).arg(&mut out.buf).arg(&oc);
        // SAFETY: matches attention_prefill_d{16,64,80,128}_f16; every slot is < rows.
        unsafe { l.launch(cfg((t0.len(), layout.n_heads, 1), 128)) }.unwrap_or_else(fail("attention_spans"));
    }

    fn reshape(&self, x: CudaTensor, rows: usize, cols: usize) -> CudaTensor {
        assert_eq!(rows * cols, x.rows * x.cols, "reshape: {}x{} is not {rows}x{cols}", x.rows, x.cols);
        CudaTensor { buf: x.buf, rows, cols }
    }
}
