//! Build script. Embeds every `models/*.toml` manifest into the binary so a fresh install knows its
//! models without any file beside it (read by `src/hub/registry.rs`).
//! The `cuda` feature will also compile `kernels/*.cu` here (CUDA-engine issue).

use std::path::PathBuf;
use std::{env, fs};

fn main() {
    // A directory makes cargo rescan everything below it, so added or removed manifests count too.
    println!("cargo:rerun-if-changed=models");
    let dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join("models");
    let mut paths: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("readable models/ entry").path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    // Sorted so the embedded order (and thus listing order) does not depend on the file system.
    paths.sort();
    let mut out = String::from("/// (file name, contents) of each `models/*.toml`, sorted by name.\n");
    out.push_str("pub(crate) const EMBEDDED: &[(&str, &str)] = &[\n");
    for p in &paths {
        let path = p.to_str().unwrap_or_else(|| panic!("{} is not UTF-8", p.display()));
        let name = p.file_name().and_then(|n| n.to_str()).expect("UTF-8 file name");
        // `{:?}` writes a Rust string literal with escapes, safe for any UTF-8 path.
        out.push_str(&format!("    ({name:?}, include_str!({path:?})),\n"));
    }
    out.push_str("];\n");
    let dest = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("embedded_manifests.rs");
    fs::write(&dest, out).unwrap_or_else(|e| panic!("cannot write {}: {e}", dest.display()));
}
