//! Build script.
//!
//! 1. Embeds every `models/*.toml` manifest into the binary so a fresh install knows its models
//!    without any file beside it (read by `src/hub/registry.rs`).
//! 2. With the `cuda` feature, compiles every `kernels/*.cu` and embeds the results
//!    (`src/backend/cuda/kernels.rs` picks one at run time): PTX for compute_80 (JIT-compiled by
//!    any driver that knows its PTX ISA version, on every GPU from Ampere on) and SASS cubins for
//!    sm_87 (Jetson Orin) and sm_90 (H100), which load without JIT on any driver of the same major
//!    version. The compiler is `nvcc` when there is one (`ZOE_NVCC`, `$CUDA_HOME/bin`, `PATH`),
//!    else NVRTC loaded by path (`ZOE_NVRTC`, `$CUDA_HOME/lib64`, or the PyPI wheel
//!    `nvidia-cuda-nvrtc-cu12` found through `python3`), with the CUDA headers from
//!    `ZOE_CUDA_INCLUDE`, `$CUDA_HOME/include` or the wheel `nvidia-cuda-runtime-cu12`.
//!    Pin the compiler to CUDA 12.6: a driver only loads PTX whose ISA version it knows
//!    (12.6 emits PTX 8.5: JetPack 6.1/6.2; JetPack 6.0's 12.2 driver uses the sm_87 cubin).

use std::path::{Path, PathBuf};
use std::{env, fs};

fn main() {
    embed_manifests();
    #[cfg(feature = "cuda")]
    cuda::compile_kernels();
}

fn embed_manifests() {
    // A directory makes cargo rescan everything below it, so added or removed manifests count too.
    println!("cargo:rerun-if-changed=models");
    let dir = manifest_dir().join("models");
    let paths = files_with_extension(&dir, "toml");
    let mut out = String::from("/// (file name, contents) of each `models/*.toml`, sorted by name.\n");
    out.push_str("pub(crate) const EMBEDDED: &[(&str, &str)] = &[\n");
    for p in &paths {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_else(|| panic!("{} is not UTF-8", p.display()));
        // Relative to the package, not an absolute path, so the generated file stays right when
        // the checkout moves (a target dir reused by another clone). `{:?}` writes a string
        // literal with escapes, safe for any UTF-8 name.
        let rel = format!("/models/{name}");
        out.push_str(&format!("    ({name:?}, include_str!(concat!(env!(\"CARGO_MANIFEST_DIR\"), {rel:?}))),\n"));
    }
    out.push_str("];\n");
    write_out("embedded_manifests.rs", &out);
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
}

fn out_dir() -> PathBuf {
    PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
}

fn write_out(name: &str, text: &str) {
    let dest = out_dir().join(name);
    fs::write(&dest, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", dest.display()));
}

/// `dir/*.ext`, sorted so the embedded order does not depend on the file system.
fn files_with_extension(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    paths.sort();
    paths
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use std::process::Command;

    /// What each kernel file is compiled to: (file suffix, nvcc/NVRTC architecture, is SASS).
    const TARGETS: [(&str, &str, bool); 3] =
        [("ptx", "compute_80", false), ("sm87.cubin", "sm_87", true), ("sm90.cubin", "sm_90", true)];

    pub fn compile_kernels() {
        for var in ["ZOE_NVCC", "ZOE_NVRTC", "ZOE_CUDA_INCLUDE", "CUDA_HOME", "CUDA_PATH"] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        println!("cargo:rerun-if-changed=kernels");
        let kdir = manifest_dir().join("kernels");
        let sources = files_with_extension(&kdir, "cu");
        assert!(!sources.is_empty(), "the cuda feature needs kernels/*.cu");
        let compiler = Compiler::find();
        println!("cargo:warning=compiling {} CUDA kernel files with {}", sources.len(), compiler.describe());
        let out = out_dir();
        // Files compile in parallel (NVRTC programs are independent); each job is one file.
        let jobs: Vec<(PathBuf, &str, &str, bool)> = sources
            .iter()
            .flat_map(|s| TARGETS.iter().map(move |&(suffix, arch, sass)| (s.clone(), suffix, arch, sass)))
            .collect();
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(jobs.len());
        let next = std::sync::atomic::AtomicUsize::new(0);
        let errors = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((src, suffix, arch, sass)) = jobs.get(i) else { break };
                    let stem = src.file_stem().and_then(|s| s.to_str()).expect("UTF-8 kernel file name");
                    let dest = out.join(format!("{stem}.{suffix}"));
                    if let Err(e) = compiler.compile(src, &kdir, arch, *sass, &dest) {
                        errors.lock().unwrap().push(format!("{} for {arch}:\n{e}", src.display()));
                    }
                });
            }
        });
        let errors = errors.into_inner().unwrap();
        if !errors.is_empty() {
            panic!("CUDA kernels failed to compile:\n{}", errors.join("\n\n"));
        }
        let mut rs = String::from(
            "/// (name, PTX for compute_80, cubin for sm_87, cubin for sm_90) of each `kernels/*.cu`.\n\
             pub(crate) const MODULES: &[(&str, &str, &[u8], &[u8])] = &[\n",
        );
        for src in &sources {
            let stem = src.file_stem().and_then(|s| s.to_str()).expect("UTF-8");
            // Relative to OUT_DIR, like the manifests: the target dir may move.
            let p = |suffix: &str| format!("concat!(env!(\"OUT_DIR\"), {:?})", format!("/{stem}.{suffix}"));
            rs.push_str(&format!(
                "    ({stem:?}, include_str!({}), include_bytes!({}), include_bytes!({})),\n",
                p("ptx"),
                p("sm87.cubin"),
                p("sm90.cubin")
            ));
        }
        rs.push_str("];\n");
        write_out("cuda_kernels.rs", &rs);
    }

    enum Compiler {
        Nvcc(PathBuf),
        Nvrtc { lib: libloading::Library, path: PathBuf, include: PathBuf, version: (i32, i32) },
    }

    /// Asks `python3` where an NVIDIA wheel's files are (`nvidia.<module>` is a namespace package).
    fn wheel_dir(module: &str, sub: &str) -> Option<PathBuf> {
        let code = format!("import nvidia.{module} as m; print(list(m.__path__)[0])");
        let out = Command::new("python3").args(["-c", &code]).output().ok()?;
        let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim()).join(sub);
        (out.status.success() && dir.is_dir()).then_some(dir)
    }

    fn cuda_home() -> Option<PathBuf> {
        env::var_os("CUDA_HOME").or_else(|| env::var_os("CUDA_PATH")).map(PathBuf::from)
    }

    impl Compiler {
        fn find() -> Self {
            let nvcc = env::var_os("ZOE_NVCC")
                .map(PathBuf::from)
                .or_else(|| cuda_home().map(|h| h.join("bin/nvcc")).filter(|p| p.is_file()))
                .or_else(|| {
                    env::split_paths(&env::var_os("PATH").unwrap_or_default())
                        .map(|d| d.join("nvcc"))
                        .find(|p| p.is_file())
                });
            if let Some(nvcc) = nvcc {
                return Compiler::Nvcc(nvcc);
            }
            let lib = env::var_os("ZOE_NVRTC")
                .map(PathBuf::from)
                .or_else(|| cuda_home().map(|h| h.join("lib64/libnvrtc.so")).filter(|p| p.is_file()))
                .or_else(|| wheel_dir("cuda_nvrtc", "lib").map(|d| d.join("libnvrtc.so.12")).filter(|p| p.is_file()));
            let include = env::var_os("ZOE_CUDA_INCLUDE")
                .map(PathBuf::from)
                .or_else(|| cuda_home().map(|h| h.join("include")).filter(|p| p.join("cuda_fp16.h").is_file()))
                .or_else(|| wheel_dir("cuda_runtime", "include"));
            let hint = "install CUDA 12.6 (nvcc), or `pip install nvidia-cuda-nvrtc-cu12==12.6.* \
                        nvidia-cuda-runtime-cu12==12.6.*` and set ZOE_NVRTC=<site-packages>/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 \
                        and ZOE_CUDA_INCLUDE=<site-packages>/nvidia/cuda_runtime/include";
            let (Some(path), Some(include)) = (lib, include) else {
                panic!("the cuda feature needs a CUDA compiler and headers: no nvcc, NVRTC library or cuda_fp16.h found; {hint}");
            };
            // SAFETY: loading NVRTC runs its initializers only; the symbols used below have the
            // C signatures of nvrtc.h (stable since CUDA 11).
            let lib = unsafe { libloading::Library::new(&path) }
                .unwrap_or_else(|e| panic!("cannot load NVRTC from {}: {e}; {hint}", path.display()));
            let mut version = (0, 0);
            unsafe {
                let f: libloading::Symbol<unsafe extern "C" fn(*mut i32, *mut i32) -> i32> =
                    lib.get(b"nvrtcVersion\0").expect("nvrtcVersion");
                f(&mut version.0, &mut version.1);
            }
            if version > (12, 6) {
                println!(
                    "cargo:warning=NVRTC {}.{} emits PTX that JetPack 6 drivers (CUDA 12.2-12.6) reject; pin 12.6 for Jetson builds",
                    version.0, version.1
                );
            }
            Compiler::Nvrtc { lib, path, include, version }
        }

        fn describe(&self) -> String {
            match self {
                Compiler::Nvcc(p) => format!("nvcc ({})", p.display()),
                Compiler::Nvrtc { path, version, .. } => {
                    format!("NVRTC {}.{} ({})", version.0, version.1, path.display())
                }
            }
        }

        fn compile(&self, src: &Path, kdir: &Path, arch: &str, sass: bool, dest: &Path) -> Result<(), String> {
            match self {
                Compiler::Nvcc(nvcc) => {
                    let out = Command::new(nvcc)
                        .args(["--std=c++17", "-lineinfo", if sass { "--cubin" } else { "--ptx" }])
                        .arg(format!("-arch={arch}"))
                        .arg("-I")
                        .arg(kdir)
                        .arg("-o")
                        .arg(dest)
                        .arg(src)
                        .output()
                        .map_err(|e| format!("running {}: {e}", nvcc.display()))?;
                    if !out.status.success() {
                        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
                    }
                    Ok(())
                }
                Compiler::Nvrtc { lib, include, .. } => {
                    let text = fs::read_to_string(src).map_err(|e| e.to_string())?;
                    let opts = [
                        "--std=c++17".to_owned(),
                        "-lineinfo".to_owned(),
                        format!("--gpu-architecture={arch}"),
                        format!("-I{}", kdir.display()),
                        format!("-I{}", include.display()),
                    ];
                    let name = src.file_name().and_then(|n| n.to_str()).unwrap_or("kernel.cu");
                    let bytes = unsafe { nvrtc_compile(lib, &text, name, &opts, sass) }?;
                    fs::write(dest, bytes).map_err(|e| format!("writing {}: {e}", dest.display()))
                }
            }
        }
    }

    type Prog = *mut std::ffi::c_void;

    /// One NVRTC compilation: the PTX (NUL dropped) or the cubin bytes, or the log on failure.
    ///
    /// # Safety
    /// `lib` is a loaded NVRTC library.
    unsafe fn nvrtc_compile(
        lib: &libloading::Library,
        src: &str,
        name: &str,
        opts: &[String],
        sass: bool,
    ) -> Result<Vec<u8>, String> {
        use std::ffi::{c_char, CString};
        type Create = unsafe extern "C" fn(
            *mut Prog,
            *const c_char,
            *const c_char,
            i32,
            *const *const c_char,
            *const *const c_char,
        ) -> i32;
        type CompileFn = unsafe extern "C" fn(Prog, i32, *const *const c_char) -> i32;
        type SizeFn = unsafe extern "C" fn(Prog, *mut usize) -> i32;
        type GetFn = unsafe extern "C" fn(Prog, *mut c_char) -> i32;
        type Destroy = unsafe extern "C" fn(*mut Prog) -> i32;
        let sym = |n: &[u8]| -> Result<*const (), String> {
            lib.get::<*const ()>(n).map(|s| *s).map_err(|e| format!("NVRTC symbol {}: {e}", String::from_utf8_lossy(n)))
        };
        use std::mem::transmute;
        let create = transmute::<*const (), Create>(sym(b"nvrtcCreateProgram\0")?);
        let compile = transmute::<*const (), CompileFn>(sym(b"nvrtcCompileProgram\0")?);
        let log_size = transmute::<*const (), SizeFn>(sym(b"nvrtcGetProgramLogSize\0")?);
        let log = transmute::<*const (), GetFn>(sym(b"nvrtcGetProgramLog\0")?);
        let (size_name, get_name): (&[u8], &[u8]) =
            if sass { (b"nvrtcGetCUBINSize\0", b"nvrtcGetCUBIN\0") } else { (b"nvrtcGetPTXSize\0", b"nvrtcGetPTX\0") };
        let out_size = transmute::<*const (), SizeFn>(sym(size_name)?);
        let out_get = transmute::<*const (), GetFn>(sym(get_name)?);
        let destroy = transmute::<*const (), Destroy>(sym(b"nvrtcDestroyProgram\0")?);

        let c_src = CString::new(src).map_err(|e| e.to_string())?;
        let c_name = CString::new(name).map_err(|e| e.to_string())?;
        let c_opts: Vec<CString> = opts.iter().map(|o| CString::new(o.as_str()).expect("no NUL in options")).collect();
        let ptrs: Vec<*const c_char> = c_opts.iter().map(|o| o.as_ptr()).collect();
        let mut prog: Prog = std::ptr::null_mut();
        if create(&mut prog, c_src.as_ptr(), c_name.as_ptr(), 0, std::ptr::null(), std::ptr::null()) != 0 {
            return Err("nvrtcCreateProgram failed".into());
        }
        let rc = compile(prog, ptrs.len() as i32, ptrs.as_ptr());
        let mut n = 0usize;
        log_size(prog, &mut n);
        let mut text = vec![0u8; n.max(1)];
        log(prog, text.as_mut_ptr().cast());
        let text = String::from_utf8_lossy(&text).trim_end_matches('\0').trim().to_owned();
        let result = if rc != 0 {
            Err(if text.is_empty() { format!("NVRTC error {rc}") } else { text })
        } else {
            let mut size = 0usize;
            out_size(prog, &mut size);
            let mut bytes = vec![0u8; size];
            out_get(prog, bytes.as_mut_ptr().cast());
            if !sass {
                // PTX comes NUL-terminated; include_str! wants text.
                while bytes.last() == Some(&0) {
                    bytes.pop();
                }
            }
            Ok(bytes)
        };
        destroy(&mut prog);
        result
    }
}
