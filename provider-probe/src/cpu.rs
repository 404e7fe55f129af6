//! CPU: architecture, model, and core counts.
//!
//! Core counts describe what *this process* may use (affinity mask, online CPUs, cgroup quota),
//! because they size thread pools: a pool larger than the cores it gets collapses throughput
//! (llama.cpp on 2 cores: ~95 tok/s with 2 threads, 13 tok/s with 4). From a fixture root only
//! the files can say: `/sys/devices/system/cpu` topology when present, else `/proc/cpuinfo`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::root::{printable, Root};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cpu {
    /// `x86_64`, `aarch64`, `arm`, `x86`, or `unknown`.
    pub arch: String,
    /// `model name` on x86; on ARM the core names from the part numbers (`8x Cortex-A78AE`,
    /// `4x Cortex-A55 + 4x Cortex-A76`).
    pub model: Option<String>,
    /// CPUs this process may run on (live probe: affinity and cgroup quota applied).
    pub logical_cores: Option<usize>,
    /// Physical cores among those: the right size for a compute thread pool.
    pub physical_cores: Option<usize>,
}

/// Arm's part numbers (`CPU part` with `CPU implementer` 0x41) of the cores these boards use.
const ARM_PARTS: &[(&str, &str)] = &[
    ("0xd03", "Cortex-A53"),
    ("0xd04", "Cortex-A35"),
    ("0xd05", "Cortex-A55"),
    ("0xd07", "Cortex-A57"),
    ("0xd08", "Cortex-A72"),
    ("0xd09", "Cortex-A73"),
    ("0xd0a", "Cortex-A75"),
    ("0xd0b", "Cortex-A76"),
    ("0xd0c", "Neoverse-N1"),
    ("0xd0d", "Cortex-A77"),
    ("0xd40", "Neoverse-V1"),
    ("0xd41", "Cortex-A78"),
    ("0xd42", "Cortex-A78AE"),
    ("0xd44", "Cortex-X1"),
    ("0xd46", "Cortex-A510"),
    ("0xd47", "Cortex-A710"),
    ("0xd49", "Neoverse-N2"),
    ("0xd4f", "Neoverse-V2"),
];

pub(crate) fn probe(root: &Root, notes: &mut Vec<String>) -> Cpu {
    let text = root.text("proc/cpuinfo", 1 << 20);
    let mut cpu = text.as_deref().map(parse_cpuinfo).unwrap_or(Cpu {
        arch: "unknown".into(),
        model: None,
        logical_cores: None,
        physical_cores: None,
    });
    if text.is_some() && cpu.logical_cores.is_none() {
        notes.push("proc/cpuinfo lists no processors".into());
    }
    let sysfs = |rel: &str| root.text(&format!("sys/devices/system/cpu/{rel}"), 4096);
    if let Some(online) = sysfs("online").as_deref().and_then(parse_cpu_list).filter(|s| !s.is_empty()) {
        cpu.logical_cores = Some(online.len());
        cpu.physical_cores = cores_from_sysfs(sysfs, None);
    }
    cpu
}

/// Architecture, model and counts from /proc/cpuinfo text.
pub fn parse_cpuinfo(text: &str) -> Cpu {
    let mut processors = 0usize;
    let mut x86 = false;
    let mut long_mode = false;
    let mut arm_arch = None;
    let mut model_name = None;
    let mut cores: BTreeSet<(String, String)> = BTreeSet::new();
    let (mut physical_id, mut implementer) = (String::new(), String::new());
    let mut parts: BTreeMap<String, usize> = BTreeMap::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "processor" if value.parse::<usize>().is_ok() => processors += 1,
            "vendor_id" => x86 = true,
            "flags" => {
                x86 = true;
                long_mode |= value.split_whitespace().any(|f| f == "lm");
            }
            "model name" if model_name.is_none() => model_name = printable(value),
            "physical id" => physical_id = value.to_owned(),
            "core id" => {
                cores.insert((physical_id.clone(), value.to_owned()));
            }
            "CPU architecture" => arm_arch = value.parse::<u32>().ok().or(arm_arch),
            "CPU implementer" => implementer = value.to_owned(),
            "CPU part" => {
                let name = match ARM_PARTS.iter().find(|(p, _)| *p == value) {
                    Some((_, n)) if implementer == "0x41" => Some((*n).to_owned()),
                    // Another implementer's core (NVIDIA Carmel, Apple…): its raw ids.
                    _ => printable(&format!("{implementer}/{value}")).filter(|n| n.is_ascii()),
                };
                if let Some(name) = name {
                    *parts.entry(name).or_default() += 1;
                }
            }
            _ => {}
        }
    }
    let arch = match (x86, long_mode, arm_arch) {
        (true, true, _) => "x86_64",
        (true, false, _) => "x86",
        (false, _, Some(8..)) => "aarch64",
        (false, _, Some(_)) => "arm",
        _ => "unknown",
    };
    let arm_model = (!parts.is_empty())
        .then(|| parts.iter().map(|(name, n)| format!("{n}x {name}")).collect::<Vec<_>>().join(" + "));
    let logical = (processors > 0).then_some(processors);
    let physical = if x86 && !cores.is_empty() { Some(cores.len()) } else { logical };
    Cpu {
        arch: arch.into(),
        model: if x86 { model_name } else { arm_model.or(model_name) },
        logical_cores: logical,
        physical_cores: physical.zip(logical).map(|(p, l)| p.clamp(1, l)),
    }
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
    let physical = cores_from_sysfs(|rel| fs::read_to_string(cpu_root.join(rel)).ok(), allowed.as_ref())
        .or_else(|| sysinfo::System::physical_core_count().ok());
    physical.unwrap_or(usable).clamp(1, usable)
}

/// `Cpus_allowed_list` from /proc/self/status.
fn cpus_allowed(status: &str) -> Option<BTreeSet<usize>> {
    let line = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    parse_cpu_list(line)
}

/// Distinct sibling groups among online CPUs (intersected with `allowed` when known); `read`
/// gives a file below `/sys/devices/system/cpu`.
fn cores_from_sysfs(read: impl Fn(&str) -> Option<String>, allowed: Option<&BTreeSet<usize>>) -> Option<usize> {
    let online = parse_cpu_list(&read("online")?)?;
    let mut groups = BTreeSet::new();
    for cpu in online.iter().filter(|cpu| allowed.is_none_or(|a| a.contains(cpu))) {
        let siblings = ["core_cpus_list", "thread_siblings_list"]
            .iter()
            .find_map(|name| read(&format!("cpu{cpu}/topology/{name}")))
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

    fn count(dir: &Path, allowed: Option<&BTreeSet<usize>>) -> Option<usize> {
        cores_from_sysfs(|rel| fs::read_to_string(dir.join(rel)).ok(), allowed)
    }

    #[test]
    fn physical_cores_count_sibling_groups() {
        // x86 with SMT: cpus 0/2 and 1/3 share cores.
        let smt = fake_sysfs("0-3\n", &["0,2\n", "1,3\n", "0,2\n", "1,3\n"]);
        assert_eq!(count(smt.path(), None), Some(2));
        assert_eq!(count(smt.path(), Some(&BTreeSet::from([0, 2]))), Some(1), "affinity to one core's two threads");
        // Orin-like ARM: 3 clusters of 4, no SMT; core_id would repeat 0..3 per cluster.
        let lists: Vec<String> = (0..12).map(|c| format!("{c}\n")).collect();
        let arm = fake_sysfs("0-11", &lists.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(count(arm.path(), None), Some(12));
        // Offline CPUs (a power mode that parks cores) are not counted.
        let parked = fake_sysfs("0-5", &lists.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(count(parked.path(), None), Some(6));
        // No sysfs at all: unknown, so the caller falls back.
        assert_eq!(count(Path::new("/nonexistent"), None), None);
    }

    #[test]
    fn cpuinfo_x86_with_smt() {
        let mut text = String::new();
        for (p, core) in [(0, 0), (1, 1), (2, 0), (3, 1)] {
            text += &format!(
                "processor\t: {p}\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU\nphysical id\t: 0\ncore id\t\t: {core}\nflags\t\t: fpu lm avx2\n\n"
            );
        }
        let cpu = parse_cpuinfo(&text);
        assert_eq!(cpu.arch, "x86_64");
        assert_eq!(cpu.model.as_deref(), Some("Intel(R) Xeon(R) CPU"));
        assert_eq!((cpu.logical_cores, cpu.physical_cores), (Some(4), Some(2)));
    }

    #[test]
    fn cpuinfo_arm_big_little() {
        let mut text = String::new();
        for p in 0..8 {
            let part = if p < 4 { "0xd05" } else { "0xd0b" };
            text += &format!("processor\t: {p}\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: {part}\n\n");
        }
        let cpu = parse_cpuinfo(&text);
        assert_eq!(cpu.arch, "aarch64");
        assert_eq!(cpu.model.as_deref(), Some("4x Cortex-A55 + 4x Cortex-A76"));
        assert_eq!((cpu.logical_cores, cpu.physical_cores), (Some(8), Some(8)));
    }

    #[test]
    fn cpuinfo_garbage_is_unknown() {
        let cpu = parse_cpuinfo("\u{fffd}\u{1}junk: :\nprocessor: x\n");
        assert_eq!((cpu.arch.as_str(), cpu.logical_cores, cpu.physical_cores), ("unknown", None, None));
    }
}
