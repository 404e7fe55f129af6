//! The compiled kernels build.rs embedded, loaded into a context: the SASS cubin for this GPU
//! when there is one (sm_87 Jetson Orin, sm_90 H100; no JIT, any driver of the major version),
//! else the compute_80 PTX for the driver to JIT.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::CudaError;

include!(concat!(env!("OUT_DIR"), "/cuda_kernels.rs"));

/// Threads per block of the norm kernels (kernels/norm.cu).
pub const NORM_THREADS: usize = 1024;

pub struct Kernels {
    pub awq_gemv: CudaFunction,
    pub awq_dequant: CudaFunction,
    pub linear_f16: CudaFunction,
    pub rms_norm: CudaFunction,
    pub add_rms_norm: CudaFunction,
    pub layer_norm: CudaFunction,
    pub gelu: CudaFunction,
    pub rope: CudaFunction,
    pub silu_mul: CudaFunction,
    pub add: CudaFunction,
    pub cast_f32_f16: CudaFunction,
    pub embedding: CudaFunction,
    pub gather_rows: CudaFunction,
    pub add_bias: CudaFunction,
    pub write_kv: CudaFunction,
    pub argmax: CudaFunction,
    pub sample: CudaFunction,
    decode: [CudaFunction; 2],
    reduce: [CudaFunction; 2],
    /// Head dims 16, 64, 80, 128 (the vision towers' 16 and 80 too).
    prefill: [CudaFunction; 4],
    source: &'static str,
}

/// Every kernel the backend launches, by its `extern "C"` name (kernels/README.md).
pub const NAMES: [&str; 25] = [
    "awq_gemv_f32",
    "awq_dequant_f16",
    "linear_f16_f32",
    "rms_norm_f32",
    "add_rms_norm_f32",
    "layer_norm_f32",
    "gelu_f32",
    "rope_f32",
    "silu_mul_f32",
    "add_f32",
    "cast_f32_f16",
    "embedding_f16",
    "gather_rows_f32",
    "add_bias_f32",
    "write_kv_f16",
    "argmax_f32",
    "sample_f32",
    "attention_decode_d64_f16",
    "attention_decode_d128_f16",
    "attention_reduce_d64_f32",
    "attention_reduce_d128_f32",
    "attention_prefill_d16_f16",
    "attention_prefill_d64_f16",
    "attention_prefill_d80_f16",
    "attention_prefill_d128_f16",
];

impl Kernels {
    pub fn load(ctx: &Arc<CudaContext>, cc: (i32, i32)) -> Result<Self, CudaError> {
        let mut modules: Vec<Arc<CudaModule>> = Vec::new();
        let mut source = "PTX (compute_80, JIT)";
        for &(name, ptx, sm87, sm90) in MODULES {
            let cubin = match cc {
                (8, 7) => Some(sm87),
                (9, 0) => Some(sm90),
                _ => None,
            };
            let module = match cubin.filter(|c| !c.is_empty()) {
                Some(c) => match ctx.load_module(Ptx::from_binary(c.to_vec())) {
                    Ok(m) => {
                        source = if cc == (8, 7) { "SASS sm_87" } else { "SASS sm_90" };
                        m
                    }
                    Err(e) => {
                        tracing::warn!(module = name, "cubin did not load ({e}); using PTX");
                        ctx.load_module(Ptx::from_src(ptx))
                            .map_err(|e| CudaError::Driver(format!("loading kernels/{name}.cu: {e}")))?
                    }
                },
                None => ctx.load_module(Ptx::from_src(ptx)).map_err(|e| {
                    CudaError::Driver(format!("loading kernels/{name}.cu PTX: {e} (driver too old for PTX 8.5?)"))
                })?,
            };
            modules.push(module);
        }
        let get = |name: &str| -> Result<CudaFunction, CudaError> {
            modules
                .iter()
                .find_map(|m| m.load_function(name).ok())
                .ok_or_else(|| CudaError::Driver(format!("kernel {name} is in no module")))
        };
        Ok(Self {
            awq_gemv: get("awq_gemv_f32")?,
            awq_dequant: get("awq_dequant_f16")?,
            linear_f16: get("linear_f16_f32")?,
            rms_norm: get("rms_norm_f32")?,
            add_rms_norm: get("add_rms_norm_f32")?,
            layer_norm: get("layer_norm_f32")?,
            gelu: get("gelu_f32")?,
            rope: get("rope_f32")?,
            silu_mul: get("silu_mul_f32")?,
            add: get("add_f32")?,
            cast_f32_f16: get("cast_f32_f16")?,
            embedding: get("embedding_f16")?,
            gather_rows: get("gather_rows_f32")?,
            add_bias: get("add_bias_f32")?,
            write_kv: get("write_kv_f16")?,
            argmax: get("argmax_f32")?,
            sample: get("sample_f32")?,
            decode: [get("attention_decode_d64_f16")?, get("attention_decode_d128_f16")?],
            reduce: [get("attention_reduce_d64_f32")?, get("attention_reduce_d128_f32")?],
            prefill: [
                get("attention_prefill_d16_f16")?,
                get("attention_prefill_d64_f16")?,
                get("attention_prefill_d80_f16")?,
                get("attention_prefill_d128_f16")?,
            ],
            source,
        })
    }

    /// Which binary the kernels came from.
    pub fn source(&self) -> &'static str {
        self.source
    }

    fn by_dim(f: &[CudaFunction; 2], d: usize) -> &CudaFunction {
        match d {
            64 => &f[0],
            128 => &f[1],
            _ => panic!("no attention kernel for head dim {d}"),
        }
    }

    pub fn attention_decode(&self, d: usize) -> &CudaFunction {
        Self::by_dim(&self.decode, d)
    }
    pub fn attention_reduce(&self, d: usize) -> &CudaFunction {
        Self::by_dim(&self.reduce, d)
    }
    pub fn attention_prefill(&self, d: usize) -> &CudaFunction {
        match d {
            16 => &self.prefill[0],
            64 => &self.prefill[1],
            80 => &self.prefill[2],
            128 => &self.prefill[3],
            _ => panic!("no prefill attention kernel for head dim {d}"),
        }
    }

    /// Whether [`Self::attention_prefill`] has a kernel for head dim `d`.
    pub fn has_prefill(d: usize) -> bool {
        matches!(d, 16 | 64 | 80 | 128)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs without a GPU: build.rs produced PTX and both cubins for every kernel file, and every
    /// kernel the backend launches is an entry point of some module's PTX.
    #[test]
    fn every_kernel_is_compiled_for_every_target() {
        assert!(!MODULES.is_empty());
        for &(name, ptx, sm87, sm90) in MODULES {
            assert!(ptx.contains(".version") && ptx.contains(".target sm_80"), "{name}: PTX for compute_80");
            for (arch, cubin) in [("sm_87", sm87), ("sm_90", sm90)] {
                assert!(cubin.starts_with(b"\x7fELF"), "{name}: {arch} cubin is an ELF image");
            }
        }
        for k in NAMES {
            let entry = format!(".entry {k}(");
            assert!(MODULES.iter().any(|m| m.1.contains(&entry)), "kernel {k} is in no PTX module");
        }
    }

    /// The launch constants the Rust side uses are the ones the kernels were written for.
    #[test]
    fn launch_constants_match_the_kernel_sources() {
        let define = |src: &str, name: &str| -> usize {
            src.lines()
                .find_map(|l| l.trim().strip_prefix("#define ")?.strip_prefix(name)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("#define {name} <number> not found"))
        };
        let gemv = include_str!("../../../kernels/gemv.cuh");
        assert_eq!(define(gemv, "GEMV_ROWS_PER_BLOCK"), super::super::GEMV_ROWS_PER_BLOCK);
        assert_eq!(define(gemv, "GEMV_THREADS"), 256);
        assert_eq!(
            define(include_str!("../../../kernels/attention.cu"), "PREFILL_TILE_ROWS"),
            super::super::PREFILL_TILE_ROWS
        );
        assert_eq!(define(include_str!("../../../kernels/norm.cu"), "NORM_THREADS"), NORM_THREADS);
    }
}
