//! NVIDIA software from files alone: the CUDA driver and its devices, TensorRT, L4T/JetPack.
//!
//! Nothing here loads a library (a missing libcuda makes cudarc panic; see the platform notes):
//! the driver library, the kernel driver's `/proc` files and the device nodes are looked up as
//! files. The zoe-llm binary built with the `cuda` feature may refine `available` by asking the
//! driver for its device count.
//!
//! - Library: `libcuda.so.1` in the loader's usual directories. L4T R35 (JetPack 5) keeps it in
//!   `usr/lib/aarch64-linux-gnu/tegra`, R36 (JetPack 6) in `…/nvidia` (its nv_tegra_release names
//!   the directory: `TARGET_USERSPACE_LIB_DIR_PATH`); desktop drivers in the multiarch directory.
//!   The toolkit's `stubs/libcuda.so` links programs but runs nothing, so it does not count.
//! - Devices: a discrete GPU has `/dev/nvidia<N>` and `/proc/driver/nvidia/gpus/<bus>/information`
//!   (`Model: NVIDIA GeForce RTX 4090`); Jetson's integrated GPU has `/dev/nvhost-ctrl-gpu`
//!   (JetPack 5 and 6) or `/dev/nvgpu/igpu0/ctrl` (JetPack 6).
//! - Driver version: `/proc/driver/nvidia/version` (`NVRM version: NVIDIA UNIX x86_64 Kernel
//!   Module  550.54.14  …`), else the version in the library's file name (`libcuda.so.550.54.14`).

use serde::{Deserialize, Serialize};

use crate::root::{printable, Root};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cuda {
    /// A CUDA driver library and a GPU are both there.
    pub available: bool,
    pub driver_version: Option<String>,
    /// The driver libraries found (paths as on the box).
    pub libraries: Vec<String>,
    pub devices: Vec<GpuDevice>,
    /// Why `available` is false.
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuDevice {
    /// The name the driver's files give, or `Orin` for Jetson's integrated GPU.
    pub name: String,
    /// PCI address (`0000:01:00.0`) of a discrete GPU.
    pub bus: Option<String>,
    /// Shares the system memory (Jetson).
    pub integrated: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorRt {
    /// `libnvinfer.so.*` is installed.
    pub available: bool,
    /// From the most specific library file name (`libnvinfer.so.10.3.0` → `10.3.0`).
    pub version: Option<String>,
    pub libraries: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct L4t {
    /// `36.4.3` from `# R36 (release), REVISION: 4.3, …`.
    pub release: String,
    /// The JetPack release that ships it, when known (`6.2`).
    pub jetpack: Option<String>,
}

/// Library directories searched, relative to the root.
const LIB_DIRS: &[&str] = &[
    "usr/lib/aarch64-linux-gnu/nvidia",
    "usr/lib/aarch64-linux-gnu/tegra",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "usr/lib64",
    "usr/lib",
    "usr/local/cuda/compat",
    "usr/lib/wsl/lib",
];

/// L4T release → JetPack, from NVIDIA's release notes (JetPack 5.x = L4T 35.x, 6.x = 36.x).
const JETPACK: &[(&str, &str)] = &[
    ("35.1.0", "5.0.2"),
    ("35.2.1", "5.1"),
    ("35.3.1", "5.1.1"),
    ("35.4.1", "5.1.2"),
    ("35.5.0", "5.1.3"),
    ("35.6.0", "5.1.4"),
    ("36.2.0", "6.0 DP"),
    ("36.3.0", "6.0"),
    ("36.4.0", "6.1"),
    ("36.4.3", "6.2"),
    ("36.4.4", "6.2.1"),
];

/// Parses the first line of `/etc/nv_tegra_release`, and the library directory it names.
pub(crate) fn parse_l4t(text: &str) -> Option<(L4t, Option<String>)> {
    let first = text.lines().next()?;
    let major: u32 =
        first.split_once("# R")?.1.chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()?;
    let revision: String =
        first.split_once("REVISION:")?.1.trim_start().chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    let parts: Vec<&str> = revision.split('.').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() || parts.len() > 3 || major > 99 {
        return None;
    }
    let release = match parts.as_slice() {
        [minor] => format!("{major}.{minor}.0"),
        _ => format!("{major}.{}", parts.join(".")),
    };
    let jetpack = JETPACK.iter().find(|(r, _)| *r == release).map(|(_, j)| (*j).to_owned());
    let lib_dir = text
        .lines()
        .find_map(|l| l.strip_prefix("TARGET_USERSPACE_LIB_DIR_PATH="))
        .map(|d| d.trim().trim_start_matches('/').to_owned())
        .filter(|d| !d.is_empty() && !d.contains(".."));
    Some((L4t { release, jetpack }, lib_dir))
}

pub(crate) fn l4t_major(l4t: &L4t) -> Option<u32> {
    l4t.release.split('.').next()?.parse().ok()
}

/// The version a shared library's file name carries: `libcuda.so.550.54.14` → `550.54.14`.
fn so_version<'a>(name: &'a str, stem: &str) -> Option<&'a str> {
    let v = name.strip_prefix(stem)?.strip_prefix(".so.")?;
    (!v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || c == '.')).then_some(v)
}

/// Library files named `<stem>.so.<version>` in the search directories (plus `extra`).
fn find_libs(root: &Root, extra: Option<&str>, stem: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let dirs = extra.into_iter().chain(LIB_DIRS.iter().copied());
    let mut seen = std::collections::BTreeSet::new();
    for dir in dirs {
        if !seen.insert(dir) {
            continue;
        }
        for name in root.list(dir) {
            if let Some(v) = so_version(&name, stem) {
                let path = format!("{dir}/{name}");
                if root.is_file(&path) {
                    found.push((format!("/{path}"), v.to_owned()));
                }
            }
        }
    }
    found
}

pub(crate) fn probe_cuda(root: &Root, jetson: bool, lib_dir: Option<&str>) -> Cuda {
    let libs = find_libs(root, lib_dir, "libcuda");
    let has_loader_name = libs.iter().any(|(path, v)| v == "1" && !path.contains("/stubs/"));
    let mut cuda = Cuda { libraries: libs.iter().map(|(p, _)| p.clone()).collect(), ..Cuda::default() };
    // The driver version: the kernel module's, else the longest version in a library name.
    cuda.driver_version = root
        .text("proc/driver/nvidia/version", 4096)
        .and_then(|t| {
            let line = t.lines().find(|l| l.starts_with("NVRM version:"))?.to_owned();
            line.split_whitespace().find(|w| is_version(w)).map(str::to_owned)
        })
        .or_else(|| {
            // `libcuda.so.550.54.14`; Jetson's `libcuda.so.1.1` is a soname, not a driver version.
            libs.iter()
                .map(|(_, v)| v)
                .filter(|v| is_version(v) && v.split('.').next().is_some_and(|m| m.len() >= 3))
                .max_by_key(|v| v.len())
                .cloned()
        });
    for bus in root.list("proc/driver/nvidia/gpus").into_iter().take(64) {
        let info = root.text(&format!("proc/driver/nvidia/gpus/{bus}/information"), 4096);
        let name = info
            .as_deref()
            .and_then(|t| t.lines().find_map(|l| l.strip_prefix("Model:")).and_then(printable))
            .unwrap_or_else(|| "NVIDIA GPU".into());
        cuda.devices.push(GpuDevice { name, bus: printable(&bus), integrated: false });
    }
    let dgpu_node = (0..16).any(|n| root.exists(&format!("dev/nvidia{n}")));
    let igpu_node = root.exists("dev/nvhost-ctrl-gpu") || root.exists("dev/nvgpu/igpu0/ctrl");
    if cuda.devices.is_empty() && dgpu_node && !jetson {
        cuda.devices.push(GpuDevice { name: "NVIDIA GPU".into(), bus: None, integrated: false });
    }
    if jetson && igpu_node {
        cuda.devices.push(GpuDevice { name: "Orin".into(), bus: None, integrated: true });
    }
    let device = !cuda.devices.is_empty();
    cuda.available = has_loader_name && device;
    cuda.reason = match (has_loader_name, device) {
        (true, true) => None,
        (true, false) => Some(
            "libcuda.so.1 is installed but no GPU device node is visible (/dev/nvidia0, /dev/nvhost-ctrl-gpu); \
             in a container, run it with the NVIDIA runtime"
                .into(),
        ),
        (false, true) => Some(
            "a GPU is visible but libcuda.so.1 is not installed (install the NVIDIA driver or JetPack, or \
             mount the driver libraries into the container)"
                .into(),
        ),
        (false, false) => Some("no NVIDIA driver or GPU found".into()),
    };
    cuda
}

fn is_version(w: &str) -> bool {
    let parts: Vec<&str> = w.split('.').collect();
    parts.len() >= 2 && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
}

pub(crate) fn probe_tensorrt(root: &Root, lib_dir: Option<&str>) -> TensorRt {
    let libs = find_libs(root, lib_dir, "libnvinfer");
    let version = libs.iter().map(|(_, v)| v).max_by_key(|v| (v.split('.').count(), v.len())).cloned();
    TensorRt { available: !libs.is_empty(), version, libraries: libs.into_iter().map(|(p, _)| p).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l4t_releases() {
        let jp62 = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\nTARGET_USERSPACE_LIB_DIR_PATH=usr/lib/aarch64-linux-gnu/nvidia\n";
        let (l4t, dir) = parse_l4t(jp62).unwrap();
        assert_eq!(l4t, L4t { release: "36.4.3".into(), jetpack: Some("6.2".into()) });
        assert_eq!(dir.as_deref(), Some("usr/lib/aarch64-linux-gnu/nvidia"));
        let (l4t, dir) = parse_l4t("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023\n").unwrap();
        assert_eq!((l4t.release.as_str(), l4t.jetpack.as_deref(), dir), ("35.4.1", Some("5.1.2"), None));
        // A release newer than the table: the L4T version, no JetPack guess.
        let (l4t, _) = parse_l4t("# R36 (release), REVISION: 9.1, GCID: 1\n").unwrap();
        assert_eq!((l4t.release.as_str(), l4t.jetpack), ("36.9.1", None));
        assert_eq!(parse_l4t("garbage"), None);
        assert_eq!(parse_l4t("# R36 (release), REVISION: , GCID"), None);
        assert_eq!(parse_l4t(""), None);
    }

    #[test]
    fn so_versions() {
        assert_eq!(so_version("libcuda.so.550.54.14", "libcuda"), Some("550.54.14"));
        assert_eq!(so_version("libcuda.so.1", "libcuda"), Some("1"));
        assert_eq!(so_version("libcuda.so", "libcuda"), None);
        assert_eq!(so_version("libcudart.so.12", "libcuda"), None);
        assert_eq!(so_version("libnvinfer.so.10.3.0", "libnvinfer"), Some("10.3.0"));
        assert_eq!(so_version("libnvinfer_plugin.so.10", "libnvinfer"), None);
        assert!(is_version("550.54.14") && !is_version("x86_64") && !is_version("1"));
    }
}
