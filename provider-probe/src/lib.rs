//! What is this box? Board, CPU and memory, read once at start-up to pick a serving plan.
//!
//! Board detection reads the device tree (`/proc/device-tree/model`, `/compatible`), which L4T
//! and Raspberry Pi OS both provide and which containers see too (it is the host kernel's).
//! Core counts describe what *this process* may use (affinity mask, online CPUs, cgroup quota),
//! because they size thread pools: a pool larger than the cores it gets collapses throughput
//! (llama.cpp on 2 cores: ~95 tok/s with 2 threads, 13 tok/s with 4).
//!
//! CUDA driver/devices, TensorRT and upstream Ollama/OpenAI reachability come with the
//! hardware-plans issue.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use serde::Serialize;
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Probe {
    /// CPU architecture as the kernel reports it (`x86_64`, `aarch64`).
    pub arch: String,
    pub board: Board,
    pub cpu_model: String,
    /// Logical CPUs this process may run on (affinity and cgroup quota applied).
    pub logical_cores: usize,
    /// Physical cores among those: the right size for a compute thread pool.
    pub physical_cores: usize,
    /// Physical RAM; on Jetson this is the unified memory the GPU shares. `None` if unreadable.
    pub total_memory_bytes: Option<u64>,
    pub available_memory_bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Board {
    /// Jetson AGX Orin, Orin NX or Orin Nano (Tegra234): runs the CUDA engine.
    JetsonOrin { model: String },
    /// Raspberry Pi: proxies an upstream Ollama.
    RaspberryPi { model: String },
    /// Anything else, with the device-tree model when there is one (other ARM boards, older
    /// Jetsons); PCs have no device tree.
    Other { model: Option<String> },
}

/// Probes this machine. Never fails: what cannot be read is reported as unknown.
pub fn probe() -> Probe {
    let system = System::new_with_specifics(
        RefreshKind::nothing().with_cpu(CpuRefreshKind::nothing()).with_memory(MemoryRefreshKind::nothing().with_ram()),
    )
    .ok();
    let cpu_model = system
        .as_ref()
        .and_then(|s| s.cpus().first().map(|c| c.brand().trim().to_owned()))
        .filter(|brand| !brand.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    // sysinfo reports 0 when /proc/meminfo could not be read.
    let memory = |read: fn(&System) -> u64| system.as_ref().map(read).filter(|&bytes| bytes > 0);
    let dt_model = read_device_tree("/proc/device-tree/model");
    let dt_compatible = read_device_tree("/proc/device-tree/compatible");
    Probe {
        arch: System::cpu_arch(),
        board: detect_board(dt_model.as_deref(), dt_compatible.as_deref()),
        cpu_model,
        logical_cores: logical_cores(),
        physical_cores: physical_cores(),
        total_memory_bytes: memory(System::total_memory),
        available_memory_bytes: memory(System::available_memory),
    }
}

/// The board from the device-tree `model` string and the NUL-separated `compatible` list.
pub fn detect_board(model: Option<&str>, compatible: Option<&str>) -> Board {
    let model = model.map(|m| m.trim_matches(|c: char| c == '\0' || c.is_whitespace())).filter(|m| !m.is_empty());
    let lower = model.map(str::to_lowercase).unwrap_or_default();
    // Tegra234 is the Orin SoC; the compatible list names it even when a vendor carrier board
    // renames the model string.
    let tegra234 = compatible.is_some_and(|c| c.split('\0').any(|entry| entry.trim() == "nvidia,tegra234"));
    if tegra234 || (lower.contains("jetson") && lower.contains("orin")) {
        return Board::JetsonOrin { model: model.unwrap_or("NVIDIA Jetson Orin").to_owned() };
    }
    if lower.starts_with("raspberry pi") {
        return Board::RaspberryPi { model: model.unwrap_or_default().to_owned() };
    }
    Board::Other { model: model.map(str::to_owned) }
}

/// Logical CPUs available to this process: std accounts for the affinity mask and cgroup quota.
pub fn logical_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Physical cores this process can use, at least 1 and at most `logical_cores()`.
///
/// Counts distinct SMT sibling groups (sysfs `topology/core_cpus_list`, or the older
/// `thread_siblings_list`) among the CPUs that are both online and in our affinity mask. Sibling
/// lists are used rather than `core_id`, which repeats across clusters on ARM. Falls back to
/// sysinfo's /proc/cpuinfo count, then to the logical count.
pub fn physical_cores() -> usize {
    let usable = logical_cores();
    let cpu_root = Path::new("/sys/devices/system/cpu");
    let allowed = fs::read_to_string("/proc/self/status").ok().and_then(|s| cpus_allowed(&s));
    let physical = cores_from_sysfs(cpu_root, allowed.as_ref()).or_else(|| System::physical_core_count().ok());
    physical.unwrap_or(usable).clamp(1, usable)
}

fn read_device_tree(path: &str) -> Option<String> {
    fs::read(path).ok().map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
}

/// `Cpus_allowed_list` from /proc/self/status.
fn cpus_allowed(status: &str) -> Option<BTreeSet<usize>> {
    let line = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    parse_cpu_list(line)
}

/// Distinct sibling groups among online CPUs (intersected with `allowed` when known).
fn cores_from_sysfs(root: &Path, allowed: Option<&BTreeSet<usize>>) -> Option<usize> {
    let online = parse_cpu_list(&fs::read_to_string(root.join("online")).ok()?)?;
    let mut groups = BTreeSet::new();
    for cpu in online.iter().filter(|cpu| allowed.is_none_or(|a| a.contains(cpu))) {
        let topology = root.join(format!("cpu{cpu}/topology"));
        let siblings = ["core_cpus_list", "thread_siblings_list"]
            .iter()
            .find_map(|name| fs::read_to_string(topology.join(name)).ok())
            .and_then(|list| parse_cpu_list(&list))
            // No topology: count the CPU as its own core rather than guess a sibling.
            .unwrap_or_else(|| BTreeSet::from([*cpu]));
        groups.insert(siblings);
    }
    (!groups.is_empty()).then_some(groups.len())
}

/// Parses the kernel's CPU list format: `0-3,8,10-11`. `None` on anything malformed.
fn parse_cpu_list(text: &str) -> Option<BTreeSet<usize>> {
    let mut cpus = BTreeSet::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                // The kernel never writes a reversed or absurd range; refuse rather than loop.
                if a > b || b - a > 1 << 16 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => {
                cpus.insert(part.trim().parse().ok()?);
            }
        }
    }
    Some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(s: &str) -> Board {
        detect_board(Some(s), None)
    }

    #[test]
    fn jetson_orin_boards() {
        for name in [
            "NVIDIA Jetson AGX Orin Developer Kit",
            "NVIDIA Jetson Orin NX Engineering Reference Developer Kit",
            "NVIDIA Jetson Orin Nano Developer Kit",
            "Jetson AGX Orin",
        ] {
            assert_eq!(model(name), Board::JetsonOrin { model: name.to_owned() }, "{name}");
        }
        // The device tree's trailing NUL is not part of the name.
        assert_eq!(
            model("NVIDIA Jetson AGX Orin Developer Kit\0"),
            Board::JetsonOrin { model: "NVIDIA Jetson AGX Orin Developer Kit".to_owned() }
        );
        // A carrier board with its own name is still Orin by its SoC.
        let compat = "vendor,carrier\0nvidia,p3767-0000\0nvidia,tegra234\0";
        assert_eq!(
            detect_board(Some("Acme Edge Box"), Some(compat)),
            Board::JetsonOrin { model: "Acme Edge Box".to_owned() }
        );
    }

    #[test]
    fn raspberry_pi_boards() {
        for name in [
            "Raspberry Pi 5 Model B Rev 1.0",
            "Raspberry Pi 4 Model B Rev 1.4",
            "Raspberry Pi Compute Module 4 Rev 1.0",
        ] {
            assert_eq!(model(name), Board::RaspberryPi { model: name.to_owned() }, "{name}");
        }
    }

    #[test]
    fn other_boards() {
        // Older Jetsons cannot run the Orin plan (sm_87 kernels).
        assert_eq!(
            model("NVIDIA Jetson Xavier NX Developer Kit"),
            Board::Other { model: Some("NVIDIA Jetson Xavier NX Developer Kit".to_owned()) }
        );
        assert_eq!(model("Rockchip RK3588 EVB"), Board::Other { model: Some("Rockchip RK3588 EVB".to_owned()) });
        assert_eq!(detect_board(None, None), Board::Other { model: None });
        assert_eq!(model(" \0"), Board::Other { model: None });
    }

    #[test]
    fn board_json_is_tagged() {
        let json = serde_json::to_string(&Board::JetsonOrin { model: "Jetson AGX Orin".to_owned() }).unwrap();
        assert_eq!(json, r#"{"kind":"jetson_orin","model":"Jetson AGX Orin"}"#);
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,8,10-11\n"), Some(BTreeSet::from([0, 1, 2, 3, 8, 10, 11])));
        assert_eq!(parse_cpu_list("5"), Some(BTreeSet::from([5])));
        assert_eq!(parse_cpu_list(""), Some(BTreeSet::new()));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("a-b"), None);
        assert_eq!(
            cpus_allowed("Name:\tx\nCpus_allowed:\tf\nCpus_allowed_list:\t0-1,4\n"),
            Some(BTreeSet::from([0, 1, 4]))
        );
    }

    /// A fake /sys/devices/system/cpu with `siblings[i]` as cpu i's sibling list.
    fn fake_sysfs(online: &str, siblings: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("online"), online).unwrap();
        for (cpu, list) in siblings.iter().enumerate() {
            let topo = dir.path().join(format!("cpu{cpu}/topology"));
            fs::create_dir_all(&topo).unwrap();
            fs::write(topo.join("thread_siblings_list"), list).unwrap();
        }
        dir
    }

    #[test]
    fn physical_cores_count_sibling_groups() {
        // x86 with SMT: cpus 0/2 and 1/3 share cores.
        let smt = fake_sysfs("0-3\n", &["0,2\n", "1,3\n", "0,2\n", "1,3\n"]);
        assert_eq!(cores_from_sysfs(smt.path(), None), Some(2));
        assert_eq!(
            cores_from_sysfs(smt.path(), Some(&BTreeSet::from([0, 2]))),
            Some(1),
            "affinity to one core's two threads"
        );
        // Orin-like ARM: 3 clusters of 4, no SMT; core_id would repeat 0..3 per cluster.
        let lists: Vec<String> = (0..12).map(|c| format!("{c}\n")).collect();
        let arm = fake_sysfs("0-11", &lists.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(cores_from_sysfs(arm.path(), None), Some(12));
        // Offline CPUs (a power mode that parks cores) are not counted.
        let parked = fake_sysfs("0-5", &lists.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(cores_from_sysfs(parked.path(), None), Some(6));
        // No sysfs at all: unknown, so the caller falls back.
        assert_eq!(cores_from_sysfs(Path::new("/nonexistent"), None), None);
    }

    #[test]
    fn this_machine_probes_consistently() {
        let p = probe();
        assert!(p.physical_cores >= 1 && p.physical_cores <= p.logical_cores, "{p:?}");
        assert_eq!(p.logical_cores, logical_cores());
        assert!(!p.arch.is_empty());
        if let (Some(total), Some(avail)) = (p.total_memory_bytes, p.available_memory_bytes) {
            assert!(avail <= total, "{p:?}");
        }
    }
}
